"""The operator as a user runs it, for end-to-end tests: `finetune-operator run` as a process,
authenticated as a ServiceAccount that holds only the operator's RBAC rules (a missing rule
fails the test), watching one restricted namespace that has the bundled model and data as
claims. Its log is printed when a test fails."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube import Kube, condition, terminate
from ports import free_port  # noqa: F401 (deploy/local/ports.py, on the path since kube; the tests import it here)

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "deploy" / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = REPO / "deploy" / "examples"
ASSETS = REPO / ".data" / "pvc"
SERVICE_ACCOUNT = "finetune-operator"


def claim(name: str, modes: list[str], host_path: Path | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if host_path:
        meta["annotations"] = {"local.finetune.dev/host-path": str(host_path)}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
            "spec": {"accessModes": modes, "resources": {"requests": {"storage": "1Gi"}}}}


def example(name: str, **changes: Any) -> dict[str, Any]:
    """A deploy/examples manifest writing to the test's own `results` claim, with `changes` merged into its spec."""
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    doc["spec"]["output"]["uri"] = f"pvc://results/{doc['metadata']['name']}"
    for section, values in changes.items():
        current = doc["spec"].get(section)
        doc["spec"][section] = current | values if isinstance(current, dict) and isinstance(values, dict) else values
    return doc


# kwok's stages read these pod annotations/labels (deploy/local): when a Job's pod completes, and whether it fails.
KWOK_COMPLETE_DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"
KWOK_COMPLETE_JITTER = "pod-complete.stage.kwok.x-k8s.io/jitter-delay"
KWOK_COMPLETE_WEIGHT = "pod-complete.stage.kwok.x-k8s.io/weight"
KWOK_FAIL = "pod-container-running-failed.stage.kwok.x-k8s.io"


def kwok_claim(namespace: str, name: str = "kwok-results") -> list[dict[str, Any]]:
    """A claim any node can mount, for jobs on kwok's nodes (which mount nothing): bound ahead to a PersistentVolume
    without node affinity (a local-path volume would pin its pods to the process node)."""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-{name}"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "hostPath": {"path": "/nonexistent/kwok-mounts-nothing"},
                   "claimRef": {"namespace": namespace, "name": name}}}
    pvc = claim(name, ["ReadWriteMany"])
    pvc["spec"] |= {"storageClassName": "", "volumeName": pv["metadata"]["name"]}
    return [pv, pvc]


@pytest.fixture
def kwok_results(operator_env: OperatorEnv) -> Iterator[str]:
    """pvc://kwok-results/... for the test's kwok jobs; its PersistentVolume is removed afterwards."""
    objects = kwok_claim(operator_env.namespace)
    operator_env.kube.apply(objects, operator_env.namespace)
    yield "pvc://kwok-results"
    operator_env.kube.kubectl("delete", "pv", objects[0]["metadata"]["name"], "--wait=false", check=False)


def kwok_job(name: str, output: str, runs_for: str = "0s", up_to: str | None = None, fail: bool = False) -> dict[str, Any]:
    """The MiniLM example as a GPU cluster runs it (hub model and data, one GPU per worker), so its pods land on
    kwok's simulated GPU nodes: Running at once, they succeed after `runs_for` (or at a uniformly random moment
    between `runs_for` and `up_to`), or fail."""
    doc = yaml.safe_load((EXAMPLES / "minilm-sentiment.yaml").read_text())
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["model"]["uri"] = "hf://sentence-transformers/all-MiniLM-L6-v2"
    spec["dataset"]["uri"] = "hf://example/sentiment"
    spec["output"]["uri"] = output
    spec["runtime"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"memory": "256Mi", "nvidia.com/gpu": "1"}}
    spec["pod"] = {"annotations": {KWOK_COMPLETE_DELAY: runs_for, KWOK_COMPLETE_JITTER: up_to or runs_for}}
    if fail:
        spec["pod"]["labels"] = {KWOK_FAIL: "true"}
        # Both stages match a Running, Ready pod so marked, and kwok draws one by weight (10000 to 1) on each of
        # the pod's updates: weight 0 keeps pod-complete out of the draw (a failing job's attempt once succeeded).
        spec["pod"]["annotations"][KWOK_COMPLETE_WEIGHT] = "0"
    return doc


@dataclass
class OperatorEnv:
    kube: Kube
    namespace: str
    kubeconfig: Path
    log: Path
    metrics_port: int
    liveness_port: int
    process: subprocess.Popen | None = None
    restarts: list[int] = field(default_factory=list)

    def start(self, *also: str, flags: tuple[str, ...] = ()) -> None:
        """The operator, watching the test's namespace and `also` these, with `flags` besides."""
        command = [sys.executable, "-m", "finetune_operator", "run", "--namespace", ",".join((self.namespace, *also)),
                   "--poll-seconds", "1", "--metrics-port", str(self.metrics_port),
                   "--liveness-port", str(self.liveness_port), "--bind-address", "127.0.0.1",
                   "--trainer-image", "finetune-trainer:local", *flags]
        # The kubernetes client writes the kubeconfig's CA to a temporary file and removes it at exit, which a
        # SIGKILL (`kill`) skips: keep such files in the test's folder.
        tmp = self.log.parent / "tmp"
        tmp.mkdir(exist_ok=True)
        env = os.environ | {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
        with self.log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.restarts.append(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    def apply(self, doc: dict[str, Any]) -> str:
        self.kube.apply(doc, self.namespace)
        return doc["metadata"]["name"]

    def ftj(self, name: str) -> dict[str, Any]:
        found = self.kube.get("ftj", name, self.namespace)
        assert found is not None, f"FineTuneJob {name} is gone"
        return found

    def wait_ftj(self, name: str, predicate: Any, description: str, timeout: float = 240) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            assert self.process is None or self.process.poll() is None or self.restarts, \
                f"the operator exited:\n{self.log.read_text()[-5000:]}"
            found = self.kube.get("ftj", name, self.namespace)
            return found if found is not None and predicate(found) else None
        try:
            return self.kube.wait_for(f"{name}: {description}", probe, self.namespace, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log:\n{self.log.read_text()[-6000:]}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
        def reached(obj: dict[str, Any]) -> bool:
            status = obj.get("status", {})
            terminal = status.get("phase") in ("Succeeded", "Failed")
            if terminal and status["phase"] != phase:
                raise AssertionError(f"{name} ended {status['phase']} ({status.get('reason')}): "
                                     f"{yaml.safe_dump(status)}\n{self.kube.describe(self.namespace)}"
                                     f"\n--- operator log:\n{self.log.read_text()[-6000:]}")
            return status.get("phase") == phase
        return self.wait_ftj(name, reached, f"phase {phase}", timeout)

    def objects(self, kind: str, name: str) -> list[dict[str, Any]]:
        listed = self.kube.kubectl("get", kind, "-n", self.namespace, "-l", f"finetune.dev/job-name={name}", "-o", "yaml")
        return yaml.safe_load(listed.stdout)["items"]

    def events(self, name: str) -> list[dict[str, Any]]:
        listed = self.kube.kubectl("get", "events", "-n", self.namespace, "--field-selector",
                                   f"involvedObject.name={name},involvedObject.kind=FineTuneJob", "-o", "yaml")
        return yaml.safe_load(listed.stdout)["items"]

    def wait_events(self, name: str, reason: str, *reasons: str, type: str | None = None,  # noqa: A002 (its field)
                    timeout: float = 60) -> list[dict[str, Any]]:
        """The job's Events of `reason, *reasons` (of `type`, where given), once each is among them. kopf posts an
        Event in the background, after the status patch that holds its transition: read just after that status was
        seen, the Events may not have been posted yet."""
        def said() -> list[dict[str, Any]] | None:
            events = [e for e in self.events(name) if e["reason"] in {reason, *reasons}
                      and (type is None or e["type"] == type)]
            return events if {reason, *reasons} <= {e["reason"] for e in events} else None
        return self.kube.wait_for(f"{name}'s Events {', '.join((reason, *reasons))}", said, self.namespace, timeout)


def install_crd(kube: Kube) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    name = yaml.safe_load(CRD.read_text())["metadata"]["name"]
    kube.wait_for(f"CRD {name} established",
                  lambda: condition(kube.get("crd", name) or {}, "Established").get("status") == "True", "default")


def granted(namespace: str, name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Role `name` of `rules` in `namespace`, bound to the operator's ServiceAccount there."""
    from finetune_operator import rbac

    return [rbac.role("Role", name, namespace, rules),
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]}]


def service_account_kubeconfig(kube: Kube, namespace: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a bound token)."""
    from finetune_operator import rbac

    kube.apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT}},
                *granted(namespace, SERVICE_ACCOUNT, rbac.RULES)], namespace)
    token = kube.kubectl("create", "token", SERVICE_ACCOUNT, "-n", namespace, "--duration=7200s").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = copy.deepcopy(admin["clusters"][0])
    config = {"apiVersion": "v1", "kind": "Config", "clusters": [cluster],
              "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
              "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": SERVICE_ACCOUNT,
                                                            "namespace": namespace}}],
              "current-context": "operator"}
    path.write_text(yaml.safe_dump(config))
    return path


def assert_pods_confined(kube: Kube, namespace: str) -> None:
    """After every end-to-end test: no trainer pod was refused by the namespace's "restricted" Pod Security
    admission, and none that exists carries an API token."""
    events = yaml.safe_load(kube.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate",
                                         "-o", "yaml").stdout)["items"]
    refused = [e["message"] for e in events if "PodSecurity" in e.get("message", "")]
    assert not refused, f"pods refused by Pod Security admission: {refused}"
    pods = yaml.safe_load(kube.kubectl("get", "pods", "-n", namespace, "-l", "finetune.dev/job-name",
                                       "-o", "yaml").stdout)["items"]
    for pod in pods:
        assert pod["spec"].get("automountServiceAccountToken") is False, pod["metadata"]["name"]
        assert not any("projected" in v for v in pod["spec"].get("volumes", [])), pod["metadata"]["name"]


@pytest.fixture(scope="session")
def crd_installed(kube: Kube) -> None:
    install_crd(kube)


@pytest.fixture
def operator_env(kube: Kube, crd_installed: None, restricted_namespace: str, tmp_path: Path) -> Iterator[OperatorEnv]:
    """A running operator for one restricted namespace holding the claims `models`, `data` (the bundled assets,
    read-only to many) and `results` (empty, read-write to many)."""
    namespace = restricted_namespace
    kube.apply([claim("models", ["ReadOnlyMany"], ASSETS / "models"), claim("data", ["ReadOnlyMany"], ASSETS / "data"),
                claim("results", ["ReadWriteMany"])], namespace)
    env = OperatorEnv(kube, namespace, service_account_kubeconfig(kube, namespace, tmp_path / "kubeconfig"),
                      tmp_path / "operator.log", free_port(), free_port())
    env.start()
    yield env
    try:
        assert_pods_confined(kube, namespace)
    finally:  # a refusal there left the operator running past the session, on a dead apiserver
        # While the operator still runs, so that kopf releases its finalizer and the namespace can go.
        kube.kubectl("delete", "ftj", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
        # A trainer still stopping (its grace period) would take the next test's CPU, whose timings then fail too
        kube.kubectl("wait", "--for=delete", "pod", "--all", "-n", namespace, "--timeout=60s", check=False)
        env.stop()


def a_trainer_outlived_by_a_sidecar_is_ended(env: OperatorEnv, output: str) -> None:
    """A trainer that exits 1 (a user error) beside a container a service mesh injected as a plain one, which runs on:
    the pod, and its Job, would never end. Neither node here runs injected sidecars or enforces a pod's deadline, so
    the test writes the kwok pod's status as the kubelet does: the trainer terminated beside a running proxy, then,
    once the operator has given the pod its deadline, the pod failed DeadlineExceeded (pkg/kubelet's
    activeDeadlineHandler). The job fails for the trainer's reason, never retried, and the pod stays to be read."""
    doc = kwok_job("outlived", f"{output}/outlived", runs_for="600s")
    doc["spec"]["backoffLimit"] = 3  # a user error fails it all the same
    name = env.apply(doc)
    pod = env.kube.wait_for("the trainer running", lambda: next(
        (p for p in env.objects("pods", name) if p.get("status", {}).get("phase") == "Running"), None),
        env.namespace, timeout=120)
    [trainer] = pod["status"]["containerStatuses"]
    said = {"exitCode": 1, "reason": "InvalidDataset", "message": "no column label", "stage": "Loading"}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    exited = dict(trainer, ready=False, started=False, state={"terminated": {
        "exitCode": 1, "reason": "Error", "message": json.dumps(said), "startedAt": trainer["state"]["running"]["startedAt"],
        "finishedAt": now}})
    proxy = dict(trainer, name="istio-proxy", image="proxyv2:1.20")

    def write(status: dict[str, Any]) -> None:
        env.kube.kubectl("patch", "pod", pod["metadata"]["name"], "-n", env.namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": status}))

    write({"containerStatuses": [exited, proxy]})
    env.kube.wait_for("the pod given a deadline", lambda: (env.kube.get("pod", pod["metadata"]["name"], env.namespace)
                      or {}).get("spec", {}).get("activeDeadlineSeconds") == 1, env.namespace, timeout=60)
    # posted after the deadline's patch, in the background
    told = [e["message"] for e in env.wait_events(name, "TrainerOutlived", type="Warning")]
    assert "istio-proxy" in told[0], told
    killed = dict(proxy, ready=False, started=False, state={"terminated": {
        "exitCode": 137, "reason": "Error", "startedAt": trainer["state"]["running"]["startedAt"], "finishedAt": now}})
    write({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the "
           "specified deadline", "containerStatuses": [exited, killed]})
    failed = env.wait_phase(name, "Failed", timeout=60)["status"]
    assert (failed["reason"], failed["attempts"]) == ("InvalidDataset", 1) and not failed.get("failures"), failed
    # Said once, though the ticks between the deadline's patch and the pod watch bringing it patch it again. kopf posts
    # Events in the background: a second one, queued by a tick before Failed, is posted within moments of it.
    time.sleep(3)
    told = [e["message"] for e in env.events(name) if e["reason"] == "TrainerOutlived"]
    assert len(told) == 1, told
