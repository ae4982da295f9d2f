"""Disruptions end a process-node pod as a kubelet and the controllers would: an eviction
(the Eviction API, `kubectl drain`) SIGTERMs it within its grace period, it ends Failed and
keeps the apiserver's DisruptionTarget condition, so a Job's pod failure policy sees it."""

from __future__ import annotations

import json
import subprocess

import pytest

from kube import Kube, condition, phase
from pods import HOLD, condition_of, make_pod, release, terminated

pytestmark = pytest.mark.cluster

NODE = "process-node"
# Exits 143 on SIGTERM, as a trainer does, through a handler: a container's PID 1 without one ignores SIGTERM (and is
# SIGKILLed after the grace period, 137), which only a PID namespace shows, and the process node has none.
WORKER = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
          "print('working', flush=True); time.sleep(600)")


def _evict(kube: Kube, namespace: str, name: str) -> None:
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace},
                "deleteOptions": {"gracePeriodSeconds": 5}}
    kube.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
                 stdin=json.dumps(eviction))


def _running(kube: Kube, namespace: str, name: str) -> dict:
    return kube.wait_pod(namespace, name, lambda p: phase(p) == "Running", "running")


def test_an_evicted_pod_ends_failed_with_the_disruption_condition(kube: Kube, namespace: str) -> None:
    kube.apply(make_pod("evicted", WORKER, metadata={"finalizers": [HOLD]}), namespace)
    _running(kube, namespace, "evicted")
    try:
        _evict(kube, namespace, "evicted")
        pod = kube.wait_pod(namespace, "evicted", lambda p: phase(p) == "Failed", "failed")
    finally:
        release(kube, namespace, "evicted")
    disruption = condition_of(pod, "DisruptionTarget")
    assert (disruption.get("status"), disruption.get("reason")) == ("True", "EvictionByEvictionAPI")
    assert terminated(pod)["exitCode"] == 143  # SIGTERM
    assert condition_of(pod, "Ready")["status"] == "False"


def test_a_job_ignores_an_evicted_pod_by_its_pod_failure_policy(kube: Kube, namespace: str) -> None:
    # What the operator relies on: a disruption is not the trainer's failure.
    template = make_pod("unused", WORKER, terminationGracePeriodSeconds=5)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
           "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]},
                    "podFailurePolicy": {"rules": [
                        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}}}
    kube.apply(job, namespace)

    def pods() -> list[dict]:
        listing = kube.kubectl("get", "pods", "-n", namespace, "-l", "job-name=train", "-o", "json").stdout
        return json.loads(listing)["items"]

    first = kube.wait_for("a running job pod", lambda: next((p for p in pods() if phase(p) == "Running"), None),
                          namespace)
    _evict(kube, namespace, first["metadata"]["name"])
    replacement = kube.wait_for(
        "a replacement pod running",
        lambda: next((p for p in pods() if phase(p) == "Running" and p["metadata"]["uid"] != first["metadata"]["uid"]),
                     None), namespace, timeout=90)
    assert replacement["metadata"]["name"] != first["metadata"]["name"]
    job_now = kube.get("job", "train", namespace)
    assert condition(job_now, "Failed").get("status") != "True", job_now["status"]


def test_drain_evicts_the_pods_of_the_node(kube: Kube, namespace: str) -> None:
    kube.apply(make_pod("drained", WORKER, metadata={"labels": {"drain-test": namespace}, "finalizers": [HOLD]}),
               namespace)
    _running(kube, namespace, "drained")
    # Only this test's pod: others' pods on the node are not this test's to disturb. Drain waits
    # for the pod to be gone, which the HOLD finalizer delays until the test has read it.
    drain = subprocess.Popen([*kube.kubectl_argv(), "drain", NODE, f"--pod-selector=drain-test={namespace}",
                              "--force", "--timeout=60s", "--grace-period=5"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pod = kube.wait_pod(namespace, "drained", lambda p: phase(p) == "Failed", "failed")
        assert kube.get("node", NODE)["spec"].get("unschedulable") is True
        release(kube, namespace, "drained")
        output, _ = drain.communicate(timeout=60)
        assert drain.returncode == 0, output
    finally:
        drain.kill()
        kube.kubectl("uncordon", NODE, check=False)
        release(kube, namespace, "drained")
    disruption = condition_of(pod, "DisruptionTarget")
    assert (disruption.get("status"), disruption.get("reason")) == ("True", "EvictionByEvictionAPI")
