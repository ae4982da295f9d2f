"""A second process node, started by the test: when its agent exits its pods' processes end
with it, and when it is lost (killed: its Lease stops) the controllers take its pods away as
in a real cluster, marking them with the DisruptionTarget condition. A FineTuneJob whose trainer
was on it retries on another node, as a disruption (not counted). Before that eviction, the node
controller marks the lost node's pods not ready, which tells a gang's stranded worker apart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import LOCAL
from kube import Kube, condition, phase
from operator_fixture import OperatorEnv, crd_installed, example, operator_env  # noqa: F401 (fixtures)
from pods import condition_of, make_pod

sys.path.insert(0, str(LOCAL))
import cluster  # noqa: E402  (deploy/local/cluster.py)
import pki  # noqa: E402

pytestmark = pytest.mark.cluster

TAINT = "finetune.dev/test-node"  # keeps every other test's pods off this node


@dataclass
class Node:
    name: str
    state: Path
    agent: subprocess.Popen

    def pod(self, name: str, script: str) -> dict:
        """A pod bound to this node that leaves at once when the node is lost."""
        tolerations = [{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": 0} for t in ("unreachable", "not-ready")]
        return make_pod(name, script, nodeName=self.name, tolerations=tolerations, terminationGracePeriodSeconds=2)


@pytest.fixture
def extra_node(kube: Kube, tmp_path: Path) -> Iterator[Node]:
    assert kube.cluster_dir is not None, "needs the local cluster"
    name = f"extra-{uuid.uuid4().hex[:5]}"
    pki_dir, identity = kube.cluster_dir / "pki", f"node-{name}"
    pki.client_cert(pki_dir, identity, f"system:node:{name}", "system:nodes")
    server = json.loads((kube.cluster_dir / "cluster.json").read_text())["server"]
    kubeconfig = tmp_path / "node.kubeconfig"
    pki.write_kubeconfig(kubeconfig, pki_dir, server, identity)
    agent = subprocess.Popen(
        [str(cluster.venv_python()), "-m", "process_node", f"--kubeconfig={kubeconfig}",
         f"--state-dir={tmp_path / 'node'}", f"--node-name={name}", f"--register-with-taints={TAINT}=yes:NoSchedule",
         f"--tls-cert-file={pki_dir / 'kubelet.crt'}", f"--tls-private-key-file={pki_dir / 'kubelet.key'}",
         f"--client-ca-file={pki_dir / 'ca.crt'}"],
        cwd=LOCAL, stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        kube.wait_for(f"node {name} Ready", lambda: condition(kube.get("node", name) or {}, "Ready").get("status")
                      == "True", "default")
        yield Node(name, tmp_path, agent)
    finally:
        agent.kill()
        agent.wait()
        # its pods' processes that left their main process (a torch worker, a shell's child): the death signal
        # that a pod's main process gets from the agent's end is cleared by a fork, so they ran on past the session
        cluster.stop_pod_processes(tmp_path)
        kube.kubectl("delete", "node", name, "--wait=false", check=False)  # PodGC then removes its pods
        for path in pki_dir.glob(f"{identity}.*"):
            path.unlink()


def _process_id(pod: dict) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_pods_end_with_their_node_agent(kube: Kube, namespace: str, extra_node: Node) -> None:
    # A child that ignores SIGTERM: the process group is SIGKILLed after the grace period.
    script = ("import subprocess, time; subprocess.Popen(['python', '-c', "
              "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)")
    kube.apply(extra_node.pod("worker", script), namespace)
    pod = kube.wait_pod(namespace, "worker", lambda p: phase(p) == "Running", "running")
    kube.wait_for("both processes", lambda: len(cluster.pod_processes(extra_node.state)) == 2, namespace)
    extra_node.agent.send_signal(signal.SIGTERM)
    extra_node.agent.wait(timeout=30)
    assert _gone(_process_id(pod)) and cluster.pod_processes(extra_node.state) == []


def test_a_lost_node_has_its_pods_evicted_by_the_controllers(kube: Kube, namespace: str, extra_node: Node) -> None:
    kube.apply(extra_node.pod("stranded", "import time; time.sleep(600)"), namespace)
    pod = kube.wait_pod(namespace, "stranded", lambda p: phase(p) == "Running", "running")
    extra_node.agent.kill()  # no goodbye: the Lease just stops
    extra_node.agent.wait()
    # Its processes die with it (the parent-death signal), as a powered-off machine's would.
    kube.wait_for("the pod's process gone", lambda: _gone(_process_id(pod)), namespace, timeout=10)
    node = kube.wait_for(
        "the node marked Unknown", lambda: (n := kube.get("node", extra_node.name))
        and condition(n, "Ready").get("status") == "Unknown" and n, namespace, timeout=60)
    assert condition(node, "Ready")["reason"] == "NodeStatusUnknown"
    # The taint manager writes the condition, then deletes the pod: two writes, read in between at times.
    evicted = kube.wait_pod(namespace, "stranded", lambda p: condition_of(p, "DisruptionTarget").get("status") == "True"
                            and "deletionTimestamp" in p["metadata"], "DisruptionTarget and deleted", timeout=30)
    assert condition_of(evicted, "DisruptionTarget")["reason"] == "DeletionByTaintManager"
    assert phase(evicted) == "Running"  # Terminating until the node is back or removed: no kubelet reports it stopped


@pytest.mark.slow
def test_a_trainer_on_a_lost_node_is_retried_on_another_without_counting(operator_env: OperatorEnv,
                                                                         extra_node: Node) -> None:
    env = operator_env
    # Every attempt may run on the test node and leaves it at once when it is lost; the first prefers it, and a
    # lost node is tainted NoSchedule, so the retry goes to the other process node.
    lost_now = [{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 0}
                for t in ("unreachable", "not-ready")]
    prefer = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [extra_node.name]}]}}]}}
    doc = example("minilm-sentiment", dataset={"maxTrainSamples": 256, "maxEvalSamples": 64})
    doc["spec"]["backoffLimit"] = 0  # a counted failure would fail the job
    doc["spec"]["pod"] = {"tolerations": [{"key": TAINT, "operator": "Exists"}, *lost_now], "affinity": prefer}
    name = env.apply(doc)
    env.wait_ftj(name, lambda o: o.get("status", {}).get("progress", {}).get("step", 0) >= 1, "training", timeout=300)
    first = env.objects("pods", name)
    assert [p["spec"]["nodeName"] for p in first] == [extra_node.name]
    extra_node.agent.kill()  # the node is lost with the trainer on it: no kubelet will report the pod stopped
    extra_node.agent.wait()
    # Node Unknown (20 s), the taint manager's eviction, the pod's grace period (30 s) and the operator's 30 s margin.
    restarted = env.wait_ftj(name, lambda o: o.get("status", {}).get("attempts") == 2, "a second attempt", timeout=180)
    assert restarted["status"].get("failures", 0) == 0
    stranded = env.kube.get("pod", first[0]["metadata"]["name"], env.namespace)
    assert stranded and phase(stranded) == "Running" and "deletionTimestamp" in stranded["metadata"], \
        "the lost node's pod should still be Terminating: nothing can report it stopped"
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 2 and done["status"].get("failures", 0) == 0
    assert [p["spec"]["nodeName"] for p in env.objects("pods", name) if p["metadata"]["labels"]["finetune.dev/attempt"]
            == "2"] == ["process-node"]
    jobs = [j["metadata"]["name"] for j in env.objects("jobs", name)]
    assert jobs == [done["status"]["children"]["job"]], f"the lost attempt's Job should be deleted: {jobs}"
    assert any(e["reason"] == "DeletionByTaintManager" for e in env.events(name)), \
        [(e["reason"], e["message"]) for e in env.events(name)]



def test_a_lost_nodes_pods_are_marked_not_ready_long_before_their_eviction(kube: Kube, namespace: str,
                                                                         extra_node: Node) -> None:
    """What the operator reads of a gang's worker on a lost node (outcome.pod_summary's node_unready): the node
    controller marks its pods not ready once the node is Unknown, with no reason (MarkPodsNotReady keeps the one Ready
    had while True), where the taint manager evicts them only after their tolerationSeconds (300 by default)."""
    from finetune_operator import outcome

    tolerations = [{"key": TAINT, "operator": "Exists"}, *({"key": f"node.kubernetes.io/{t}", "operator": "Exists",
                   "effect": "NoExecute", "tolerationSeconds": 300} for t in ("unreachable", "not-ready"))]
    kube.apply(make_pod("stranded", "import time; time.sleep(600)", nodeName=extra_node.name, tolerations=tolerations),
               namespace)
    running = kube.wait_pod(namespace, "stranded", lambda p: condition_of(p, "Ready").get("status") == "True", "ready")
    assert not outcome.pod_summary(running)["node_unready"]
    extra_node.agent.kill()  # no goodbye: the Lease just stops
    extra_node.agent.wait()
    marked = kube.wait_pod(namespace, "stranded", lambda p: condition_of(p, "Ready").get("status") == "False",
                           "marked not ready", timeout=60)
    assert outcome.pod_summary(marked)["node_unready"] and phase(marked) == "Running"
    assert not condition_of(marked, "DisruptionTarget") and "deletionTimestamp" not in marked["metadata"]
