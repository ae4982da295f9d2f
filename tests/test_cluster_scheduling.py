"""kwok's fake GPU nodes: GPU pods land there and are simulated (ready, complete, fail on
request); a pod asking for more GPUs than any node has stays Unschedulable."""

from __future__ import annotations

import pytest

from kube import Kube, condition, phase

pytestmark = pytest.mark.cluster

FAIL_STAGE = "pod-container-running-failed.stage.kwok.x-k8s.io"  # kwok's chaos stage, see deploy/local


def _gpu_pod(name: str, gpus: int, labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "trainer", "image": "ignored", "command": ["python", "-m", "finetune_trainer"],
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}


def test_gpu_pod_lands_on_a_kwok_gpu_node(kube: Kube, namespace: str) -> None:
    kube.apply(_gpu_pod("gpu", 2), namespace)
    pod = kube.wait_pod(namespace, "gpu", lambda p: phase(p) == "Running", "running")
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    # Added by the ExtendedResourceToleration admission plugin, not by us.
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_too_many_gpus_is_unschedulable(kube: Kube, namespace: str) -> None:
    kube.apply(_gpu_pod("greedy", 9), namespace)
    pod = kube.wait_pod(namespace, "greedy", lambda p: condition(p, "PodScheduled").get("reason") == "Unschedulable",
                        "PodScheduled=False, Unschedulable")
    scheduled = condition(pod, "PodScheduled")
    assert scheduled["status"] == "False" and "nvidia.com/gpu" in scheduled["message"]


def test_a_pod_naming_a_scheduler_not_running_gets_no_word_from_any(kube: Kube, namespace: str) -> None:
    """What the operator's NoScheduler reads: only the scheduler a pod names sets its PodScheduled, so a pod naming
    one not running has no such condition, while its neighbour of the default scheduler is placed."""
    unheard = _gpu_pod("unheard", 1)
    unheard["spec"]["schedulerName"] = "no-such-scheduler"
    kube.apply([unheard, _gpu_pod("placed", 1)], namespace)
    kube.wait_pod(namespace, "placed", lambda p: condition(p, "PodScheduled").get("status") == "True", "scheduled")
    pod = kube.get("pod", "unheard", namespace)
    assert phase(pod) == "Pending" and not condition(pod, "PodScheduled") and not pod["spec"].get("nodeName")


def test_gpu_job_completes_and_a_marked_pod_fails(kube: Kube, namespace: str) -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gpu-job"},
           "spec": {"backoffLimit": 0, "template": {"spec": _gpu_pod("unused", 1)["spec"]}}}
    failing = _gpu_pod("doomed", 1, labels={FAIL_STAGE: "true"},
                       annotations={f"{FAIL_STAGE}/exit-code": "7", f"{FAIL_STAGE}/delay": "0"})
    kube.apply([job, failing], namespace)
    kube.wait_for("gpu-job complete",
                  lambda: condition(kube.get("job", "gpu-job", namespace) or {}, "Complete").get("status") == "True",
                  namespace)
    pod = kube.wait_pod(namespace, "doomed", lambda p: phase(p) == "Failed", "failed by the kwok stage")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
