"""The process node really runs pods: env and downward API, volumes in a private mount
namespace, pod IPs, exit codes and termination messages, restarts, graceful deletion, and
the Job and garbage-collection controllers working on its pods."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest

from kube import Kube, condition, phase

pytestmark = pytest.mark.cluster

RESTRICTED = {  # what the restricted Pod Security Standard demands of a container
    "runAsNonRoot": True, "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


def _pod(name: str, script: str, **spec: object) -> dict:
    container = {"name": "main", "image": "ignored.example/python:3.11", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def _terminated(pod: dict, container: str = "main") -> dict:
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    return status["state"].get("terminated") or {}


def _done(pod: dict) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def _field(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _claim(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}


def _claim_folder(kube: Kube, namespace: str, claim: str) -> Path:
    """The local folder behind a claim, once the process node's provisioner bound it."""
    def bound() -> dict | None:
        pvc = kube.get("pvc", claim, namespace)
        return pvc if pvc and pvc["status"].get("phase") == "Bound" else None

    pvc = kube.wait_for(f"claim {claim} bound", bound, namespace)
    return Path(kube.get("pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])


FEATURES_SCRIPT = r"""
import json, os, socket, sys
ip = os.environ["POD_IP"]
with socket.socket() as s:  # the pod IP is really this pod's to bind
    s.bind((ip, 0))
open("/data/hello.txt", "w").write("written by " + os.environ["POD_NAME"])
report = {
    "argv": sys.argv[1:], "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ["GREETING", "TOKEN", "POD_NAME", "POD_NAMESPACE", "POD_IP",
            "APP", "NOTE", "COMPOSED", "CPU_LIMIT", "FROM_ENVFROM_greeting", "KUBERNETES_SERVICE_HOST"]},
    "config": open("/mnt/fto/config/greeting").read(),
    "settings": open("/mnt/fto/config/settings.json").read(),
    "secret": open("/mnt/fto/secret/token").read(),
    "podinfo": open("/mnt/fto/podinfo/labels").read(),
    "sa_token": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
    "config_writable": os.access("/mnt/fto/config", os.W_OK),
}
open("/dev/termination-log", "w").write(json.dumps(report))
"""


def test_pod_sees_env_volumes_and_its_own_ip(kube: Kube, namespace: str) -> None:
    kube.apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"},
         "data": {"greeting": "hello", "settings.json": '{"a": 1}'}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret"}, "stringData": {"token": "s3cret"}},
        _claim("data"),
    ], namespace)
    pod = _pod("features", FEATURES_SCRIPT,
               metadata={"labels": {"app": "features"}, "annotations": {"note": "hi"}},
               container={
                   "args": ["$(GREETING)-arg", "$$(GREETING)"], "workingDir": "/scratch",
                   "envFrom": [{"prefix": "FROM_ENVFROM_", "configMapRef": {"name": "app-config"}}],
                   "env": [
                       {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
                       {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "token"}}},
                       {"name": "POD_NAME", **_field("metadata.name")},
                       {"name": "POD_NAMESPACE", **_field("metadata.namespace")},
                       {"name": "POD_IP", **_field("status.podIP")},
                       {"name": "APP", **_field("metadata.labels['app']")},
                       {"name": "NOTE", **_field("metadata.annotations['note']")},
                       {"name": "COMPOSED", "value": "$(POD_NAME)@$(POD_NAMESPACE)"},
                       {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                   ],
                   "resources": {"limits": {"cpu": "2", "memory": "1Gi"}},
                   "volumeMounts": [
                       {"name": "config", "mountPath": "/mnt/fto/config"},
                       {"name": "secret", "mountPath": "/mnt/fto/secret"},
                       {"name": "podinfo", "mountPath": "/mnt/fto/podinfo"},
                       {"name": "scratch", "mountPath": "/scratch"},
                       {"name": "data", "mountPath": "/data"},
                   ],
               },
               volumes=[
                   {"name": "config", "configMap": {"name": "app-config"}},
                   {"name": "secret", "secret": {"secretName": "app-secret"}},
                   {"name": "podinfo", "downwardAPI": {"items": [
                       {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                   {"name": "scratch", "emptyDir": {}},
                   {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
               ])
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "features", _done, "finished")
    terminated = _terminated(done)
    assert phase(done) == "Succeeded", kube.describe(namespace)
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert done["spec"]["nodeName"] == "process-node"
    report = json.loads(terminated["message"])
    assert report["argv"] == ["hello-arg", "$(GREETING)"]
    assert report["cwd"] == "/scratch"
    env = report["env"]
    assert (env["GREETING"], env["TOKEN"], env["APP"], env["NOTE"]) == ("hello", "s3cret", "features", "hi")
    assert env["POD_NAME"] == "features" and env["POD_NAMESPACE"] == namespace
    assert env["COMPOSED"] == f"features@{namespace}"
    assert env["CPU_LIMIT"] == "2" and env["FROM_ENVFROM_greeting"] == "hello"
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    ip = ipaddress.ip_address(env["POD_IP"])
    assert ip.is_loopback and str(ip) != "127.0.0.1" and done["status"]["podIP"] == str(ip)
    assert (report["config"], report["settings"], report["secret"]) == ("hello", '{"a": 1}', "s3cret")
    assert report["podinfo"] == 'app="features"'
    assert report["sa_token"] and not report["config_writable"]
    assert (_claim_folder(kube, namespace, "data") / "hello.txt").read_text() == "written by features"
    # The mounts were private to the pod: on the host the mount point is an empty folder.
    assert not Path("/mnt/fto/config/greeting").exists()


def test_claim_can_use_an_existing_host_folder(kube: Kube, namespace: str, tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("weights")
    claim = _claim("models")
    claim["metadata"]["annotations"] = {"local.finetune.dev/host-path": str(tmp_path)}
    script = "open('/dev/termination-log', 'w').write(open('/mnt/pvc/models/model.txt').read())"
    pod = _pod("reader", script, volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
               container={"volumeMounts": [{"name": "models", "mountPath": "/mnt/pvc/models", "readOnly": True}]})
    kube.apply([claim, pod], namespace)
    assert _terminated(kube.wait_pod(namespace, "reader", _done, "finished"))["message"] == "weights"


IN_CLUSTER_SCRIPT = r"""
from kubernetes import client, config
config.load_incluster_config()  # the projected token, the cluster CA and KUBERNETES_SERVICE_HOST
pods = client.CoreV1Api().list_namespaced_pod(open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read())
open("/dev/termination-log", "w").write(",".join(sorted(p.metadata.name for p in pods.items)))
"""


def test_pod_talks_to_the_apiserver_with_its_service_account(kube: Kube, restricted_namespace: str) -> None:
    namespace = restricted_namespace  # as an operator pod would run
    kube.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]},
        _pod("in-cluster", IN_CLUSTER_SCRIPT, serviceAccountName="reader", container={"securityContext": RESTRICTED}),
    ], namespace)
    done = kube.wait_pod(namespace, "in-cluster", _done, "finished")
    assert phase(done) == "Succeeded", kube.describe(namespace)
    assert _terminated(done)["message"] == "in-cluster"


def test_pod_ips_are_unique(kube: Kube, namespace: str) -> None:
    for name in ("ip-a", "ip-b"):
        kube.apply(_pod(name, "import time; time.sleep(60)", terminationGracePeriodSeconds=1), namespace)
    pods = [kube.wait_pod(namespace, n, lambda p: phase(p) == "Running", "running") for n in ("ip-a", "ip-b")]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    assert all(condition(p, "Ready").get("status") == "True" for p in pods)


def test_exit_codes_and_termination_messages(kube: Kube, namespace: str) -> None:
    pod = _pod("fails", "import sys; open('/var/run/msg/out', 'w').write('custom path'); sys.exit(3)",
               container={"terminationMessagePath": "/var/run/msg/out"})
    pod["spec"]["containers"].append({
        "name": "logs", "image": "ignored", "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": ["python", "-c", "import sys; print('last words', file=sys.stderr); sys.exit(4)"]})
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "fails", _done, "finished")
    assert phase(done) == "Failed"
    main, logs = _terminated(done, "main"), _terminated(done, "logs")
    assert (main["exitCode"], main["reason"], main["message"]) == (3, "Error", "custom path")
    assert (logs["exitCode"], logs["reason"]) == (4, "Error") and "last words" in logs["message"]


def test_kubectl_logs_reaches_the_process_node(kube: Kube, namespace: str) -> None:
    script = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.5)"
    kube.apply(_pod("talker", script), namespace)
    kube.wait_pod(namespace, "talker", lambda p: phase(p) != "Pending", "started")
    followed = kube.kubectl("logs", "-f", "talker", "-n", namespace).stdout  # ends when the container does
    assert followed.splitlines() == ["line 0", "line 1", "line 2"]
    assert kube.kubectl("logs", "--tail=1", "talker", "-n", namespace).stdout == "line 2\n"


def test_missing_config_waits_then_starts(kube: Kube, namespace: str) -> None:
    pod = _pod("patient", "import os; open('/dev/termination-log', 'w').write(os.environ['LATE'])", container={
        "env": [{"name": "LATE", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "value"}}}]})
    kube.apply(pod, namespace)

    def waiting_reason(p: dict) -> str:
        statuses = p.get("status", {}).get("containerStatuses") or [{}]
        return (statuses[0].get("state", {}).get("waiting") or {}).get("reason", "")

    kube.wait_pod(namespace, "patient", lambda p: waiting_reason(p) == "CreateContainerConfigError", "config error")
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}, "data": {"value": "here"}},
               namespace)
    done = kube.wait_pod(namespace, "patient", _done, "finished")
    assert phase(done) == "Succeeded" and _terminated(done)["message"] == "here"


def test_restart_policy_on_failure_restarts_until_success(kube: Kube, namespace: str) -> None:
    # Fails once, then succeeds: the emptyDir survives the restart, as in a real kubelet.
    script = ("import os, sys; p = '/scratch/attempts'; n = int(open(p).read()) if os.path.exists(p) else 0; "
              "open(p, 'w').write(str(n + 1)); sys.exit(1 if n == 0 else 0)")
    pod = _pod("flaky", script, restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "flaky", _done, "finished")
    status = done["status"]["containerStatuses"][0]
    assert phase(done) == "Succeeded" and status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(kube: Kube, namespace: str) -> None:
    kube.apply(_claim("signals"), namespace)
    graceful = ("import signal, sys, time\n"
                "def bye(*_): open('/data/graceful', 'w').write('sigterm'); sys.exit(0)\n"
                "signal.signal(signal.SIGTERM, bye); open('/data/graceful', 'w').write('started'); time.sleep(600)")
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: open('/data/stubborn', 'w').write('sigterm ignored'))\n"
                "open('/data/stubborn', 'w').write('started')\nwhile True: time.sleep(0.1)")
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "signals"}}]
    kube.apply([_pod("graceful", graceful, volumes=volumes, container=mount, terminationGracePeriodSeconds=30),
                _pod("stubborn", stubborn, volumes=volumes, container=mount, terminationGracePeriodSeconds=3)],
               namespace)
    folder = _claim_folder(kube, namespace, "signals")
    for name in ("graceful", "stubborn"):
        kube.wait_for(f"{name} started", lambda n=name: (folder / n).exists(), namespace)
    started = time.monotonic()
    kube.kubectl("delete", "pod", "graceful", "stubborn", "-n", namespace, "--wait=false")
    kube.wait_for("graceful gone", lambda: kube.get("pod", "graceful", namespace) is None, namespace)
    graceful_s = time.monotonic() - started
    kube.wait_for("stubborn gone", lambda: kube.get("pod", "stubborn", namespace) is None, namespace)
    stubborn_s = time.monotonic() - started
    assert (folder / "graceful").read_text() == "sigterm" and graceful_s < 3
    assert (folder / "stubborn").read_text() == "sigterm ignored" and 3 <= stubborn_s < 15


# Index 1 finds index 0 by its DNS-style name (hostname.subdomain), as torchrun's rendezvous would.
RENDEZVOUS_SCRIPT = r"""
import os, socket, time
i = int(os.environ["JOB_COMPLETION_INDEX"])
message = f"index {i} of {os.environ['POD_NAME']} on {socket.gethostname()}"
if i == 0:
    with socket.create_server((os.environ["POD_IP"], 29500)) as server:
        server.settimeout(60)
        connection, _ = server.accept()
        message += " heard " + connection.recv(100).decode()
else:
    deadline = time.time() + 60
    while True:
        try:
            connection = socket.create_connection(("indexed-0.workers", 29500), timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    connection.sendall(socket.gethostname().encode())
    message += " reached indexed-0.workers"
open("/dev/termination-log", "w").write(message)
"""


def test_indexed_job_completes_on_the_process_node(kube: Kube, restricted_namespace: str) -> None:
    namespace = restricted_namespace  # the pods must also pass the restricted Pod Security Standard
    template = _pod("unused", RENDEZVOUS_SCRIPT, subdomain="workers", container={
        "securityContext": RESTRICTED,
        "env": [{"name": "POD_NAME", **_field("metadata.name")}, {"name": "POD_IP", **_field("status.podIP")}]})
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "indexed"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": {"spec": template["spec"]}}}
    kube.apply(job, namespace)
    kube.wait_for("job indexed complete",
                  lambda: condition(kube.get("job", "indexed", namespace) or {}, "Complete").get("status") == "True",
                  namespace)
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", "job-name=indexed", "-o", "json").stdout)
    messages = set()
    for pod in pods["items"]:
        terminated = _terminated(pod)
        assert pod["spec"]["nodeName"] == "process-node" and phase(pod) == "Succeeded"
        assert terminated["exitCode"] == 0
        messages.add(terminated["message"])
    zero, one = sorted(messages)
    assert zero.startswith("index 0 of indexed-0-") and zero.endswith(" on indexed-0 heard indexed-1")
    assert one.startswith("index 1 of indexed-1-") and one.endswith(" on indexed-1 reached indexed-0.workers")


def test_deleting_an_owner_garbage_collects_its_children(kube: Kube, namespace: str) -> None:
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace)
    owner = kube.get("configmap", "owner", namespace)
    ref = {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                "uid": owner["metadata"]["uid"]}]}
    kube.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child-secret", **ref}, "stringData": {"k": "v"}},
        _pod("child-pod", "import time; time.sleep(600)", metadata=ref, terminationGracePeriodSeconds=1),
    ], namespace)
    kube.wait_pod(namespace, "child-pod", lambda p: phase(p) == "Running", "running")
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    kube.wait_for("children collected", lambda: kube.get("secret", "child-secret", namespace) is None
                  and kube.get("pod", "child-pod", namespace) is None, namespace)
