"""The process node really runs pods: env and downward API, volumes in a private mount
namespace, pod IPs, exit codes and termination messages, restarts, graceful deletion, and
the Job and garbage-collection controllers working on its pods."""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from kube import Kube, condition, phase
from pods import (HOLD, HOST_PATH, REPO, RESTRICTED, claim_folder, claim_volume, field_env, finished, make_claim,
                  make_pod, release, terminated)

pytestmark = pytest.mark.cluster

FEATURES_SCRIPT = r"""
import json, os, socket, sys
ip = os.environ["POD_IP"]
with socket.socket() as s:  # the pod IP is really this pod's to bind
    s.bind((ip, 0))
open("/data/hello.txt", "w").write("written by " + os.environ["POD_NAME"])
report = {
    "argv": sys.argv[1:], "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ["GREETING", "TOKEN", "POD_NAME", "POD_NAMESPACE", "POD_IP",
            "APP", "NOTE", "COMPOSED", "CPU_LIMIT", "FROM_ENVFROM_greeting", "KUBERNETES_SERVICE_HOST",
            "API_HOST", "IMAGE_VARS"]},
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
        make_claim("data"),
    ], namespace)
    pod = make_pod("features", FEATURES_SCRIPT,
               metadata={"labels": {"app": "features"}, "annotations": {"note": "hi"}},
               container={
                   "args": ["$(GREETING)-arg", "$$(GREETING)", "$(HOME)"], "workingDir": "/scratch",
                   "envFrom": [{"prefix": "FROM_ENVFROM_", "configMapRef": {"name": "app-config"}}],
                   "env": [
                       {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
                       {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "token"}}},
                       {"name": "POD_NAME", **field_env("metadata.name")},
                       {"name": "POD_NAMESPACE", **field_env("metadata.namespace")},
                       {"name": "POD_IP", **field_env("status.podIP")},
                       {"name": "APP", **field_env("metadata.labels['app']")},
                       {"name": "NOTE", **field_env("metadata.annotations['note']")},
                       {"name": "COMPOSED", "value": "$(POD_NAME)@$(POD_NAMESPACE)"},
                       # The kubelet expands its own variables and the service ones, not the
                       # image's or the runtime's (PATH, HOME, HOSTNAME): those stay as written.
                       {"name": "API_HOST", "value": "$(KUBERNETES_SERVICE_HOST)"},
                       {"name": "IMAGE_VARS", "value": "$(PATH) $(HOME) $(HOSTNAME)"},
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
    done = kube.wait_pod(namespace, "features", finished, "finished")
    ended = terminated(done)
    assert phase(done) == "Succeeded", kube.describe(namespace)
    assert (ended["exitCode"], ended["reason"]) == (0, "Completed")
    assert done["spec"]["nodeName"] == "process-node"
    report = json.loads(ended["message"])
    assert report["argv"] == ["hello-arg", "$(GREETING)", "$(HOME)"]
    assert report["cwd"] == "/scratch"
    env = report["env"]
    assert (env["GREETING"], env["TOKEN"], env["APP"], env["NOTE"]) == ("hello", "s3cret", "features", "hi")
    assert env["POD_NAME"] == "features" and env["POD_NAMESPACE"] == namespace
    assert env["COMPOSED"] == f"features@{namespace}"
    assert env["CPU_LIMIT"] == "2" and env["FROM_ENVFROM_greeting"] == "hello"
    assert env["KUBERNETES_SERVICE_HOST"]  # where is the node's business; in-cluster clients work (below)
    assert (env["API_HOST"], env["IMAGE_VARS"]) == (env["KUBERNETES_SERVICE_HOST"], "$(PATH) $(HOME) $(HOSTNAME)")
    ip = ipaddress.ip_address(env["POD_IP"])
    assert done["status"]["podIP"] == str(ip) != done["status"]["hostIP"]  # the pod's own, and it could bind it
    assert (report["config"], report["settings"], report["secret"]) == ("hello", '{"a": 1}', "s3cret")
    assert report["podinfo"] == 'app="features"'
    assert report["sa_token"] and not report["config_writable"]
    assert (claim_folder(kube, namespace, "data") / "hello.txt").read_text() == "written by features"
    # The mounts were private to the pod: on the host the mount point is an empty folder.
    assert not Path("/mnt/fto/config/greeting").exists()


def test_volume_items_keep_their_own_mode(kube: Kube, namespace: str) -> None:
    # An item's `mode` overrides the volume's defaultMode, in configMap, downwardAPI and projected volumes.
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "modes"}, "data": {"a": "1", "b": "2"}},
               namespace)
    items = [{"key": "a", "path": "a", "mode": 0o600}, {"key": "b", "path": "b"}]
    script = ("import os; open('/dev/termination-log', 'w').write(' '.join("
              "oct(os.stat(f'/v/{v}/{f}').st_mode & 0o777) for v in ('cm', 'down', 'proj') for f in ('a', 'b')))")
    volumes = [
        {"name": "cm", "configMap": {"name": "modes", "defaultMode": 0o440, "items": items}},
        {"name": "down", "downwardAPI": {"items": [
            {"path": "a", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o400},
            {"path": "b", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        {"name": "proj", "projected": {"defaultMode": 0o444, "sources": [{"configMap": {"name": "modes", "items": items}}]}},
    ]
    mounts = [{"name": v["name"], "mountPath": f"/v/{v['name']}"} for v in volumes]
    kube.apply(make_pod("modes", script, volumes=volumes, container={"volumeMounts": mounts}), namespace)
    done = kube.wait_pod(namespace, "modes", finished, "finished")
    assert terminated(done)["message"].split() == ["0o600", "0o440", "0o400", "0o644", "0o600", "0o444"]


def test_claim_can_use_an_existing_host_folder(kube: Kube, namespace: str, host_folder: Path) -> None:
    (host_folder / "model.txt").write_text("weights")
    claim = make_claim("models")
    claim["metadata"]["annotations"] = {HOST_PATH: str(host_folder)}
    script = "open('/dev/termination-log', 'w').write(open('/mnt/pvc/models/model.txt').read())"
    pod = make_pod("reader", script, volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
               container={"volumeMounts": [{"name": "models", "mountPath": "/mnt/pvc/models", "readOnly": True}]})
    kube.apply([claim, pod], namespace)
    assert terminated(kube.wait_pod(namespace, "reader", finished, "finished"))["message"] == "weights"
    volume = claim_volume(kube, namespace, "models")
    kube.kubectl("delete", "pod,pvc", "--all", "-n", namespace)
    kube.wait_for("the released volume reclaimed", lambda: kube.get("pv", volume) is None, namespace)
    assert (host_folder / "model.txt").read_text() == "weights"  # a folder it did not make is kept


def test_host_path_outside_the_allowed_roots_is_refused(kube: Kube, namespace: str) -> None:
    claim = make_claim("escape")
    claim["metadata"]["annotations"] = {HOST_PATH: str(REPO / ".data" / "pvc" / ".." / "..")}
    kube.apply(claim, namespace)

    def refusal() -> str | None:
        events = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return next((e["message"] for e in events if e["reason"] == "ProvisioningFailed"), None)

    message = kube.wait_for("the claim refused", refusal, namespace)
    assert HOST_PATH in message and "not inside an allowed root" in message
    assert kube.get("pvc", "escape", namespace)["status"]["phase"] == "Pending"


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
        make_pod("in-cluster", IN_CLUSTER_SCRIPT, serviceAccountName="reader", container={"securityContext": RESTRICTED}),
    ], namespace)
    done = kube.wait_pod(namespace, "in-cluster", finished, "finished")
    assert phase(done) == "Succeeded", kube.describe(namespace)
    assert terminated(done)["message"] == "in-cluster"


def test_pod_ips_are_unique(kube: Kube, namespace: str) -> None:
    for name in ("ip-a", "ip-b"):
        kube.apply(make_pod(name, "import time; time.sleep(60)", terminationGracePeriodSeconds=1), namespace)
    pods = [kube.wait_pod(namespace, n, lambda p: phase(p) == "Running", "running") for n in ("ip-a", "ip-b")]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ipaddress.ip_address(ip) for ip in ips)
    assert all(condition(p, "Ready").get("status") == "True" for p in pods)


def test_exit_codes_and_termination_messages(kube: Kube, namespace: str) -> None:
    pod = make_pod("fails", "import sys; open('/var/run/msg/out', 'w').write('custom path'); sys.exit(3)",
               container={"terminationMessagePath": "/var/run/msg/out"})
    pod["spec"]["containers"].append({
        "name": "logs", "image": "ignored", "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": ["python", "-c", "import sys\nfor i in range(100): print(f'{i:03} ' + 'y' * 45, flush=True)\n"
                    "print('last words', file=sys.stderr); sys.exit(4)"]})
    pod["spec"]["containers"].append({
        "name": "long", "image": "ignored",
        "command": ["python", "-c", "open('/dev/termination-log', 'w').write('HEAD' + 'x' * 5000 + 'TAIL')"]})
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "fails", finished, "finished")
    assert phase(done) == "Failed"
    main, logs, long = terminated(done, "main"), terminated(done, "logs"), terminated(done, "long")
    assert (main["exitCode"], main["reason"], main["message"]) == (3, "Error", "custom path")
    assert (logs["exitCode"], logs["reason"]) == (4, "Error")
    # The kubelet keeps the end of what was written: the last 4 KiB of the file, or (fallback)
    # the last 2 KiB of the log's last 80 lines.
    assert len(logs["message"]) == 2048 and logs["message"].endswith("y\nlast words\n")
    assert long["message"] == ("x" * 5000 + "TAIL")[-4096:]


def test_init_containers_run_first_and_are_ready_once_done(kube: Kube, namespace: str) -> None:
    pod = make_pod("inits", "open('/dev/termination-log', 'w').write(open('/prep/out').read())",
                   container={"volumeMounts": [{"name": "work", "mountPath": "/prep"}]},
                   volumes=[{"name": "work", "emptyDir": {}}])
    pod["spec"]["initContainers"] = [{"name": "prepare", "image": "ignored", "command": [
        "python", "-c", "open('/prep/out', 'w').write('prepared')"], "volumeMounts": [{"name": "work", "mountPath": "/prep"}]}]
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "inits", finished, "finished")
    assert terminated(done)["message"] == "prepared"
    init = done["status"]["initContainerStatuses"][0]
    # The kubelet marks a completed init container ready (prober_manager.UpdatePodStatus).
    assert (init["ready"], init["state"]["terminated"]["reason"]) == (True, "Completed")


def test_missing_config_waits_then_starts(kube: Kube, namespace: str) -> None:
    pod = make_pod("patient", "import os; open('/dev/termination-log', 'w').write(os.environ['LATE'])", container={
        "env": [{"name": "LATE", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "value"}}}]})
    kube.apply(pod, namespace)

    def waiting_reason(p: dict) -> str:
        statuses = p.get("status", {}).get("containerStatuses") or [{}]
        return (statuses[0].get("state", {}).get("waiting") or {}).get("reason", "")

    kube.wait_pod(namespace, "patient", lambda p: waiting_reason(p) == "CreateContainerConfigError", "config error")
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}, "data": {"value": "here"}},
               namespace)
    done = kube.wait_pod(namespace, "patient", finished, "finished")
    assert phase(done) == "Succeeded" and terminated(done)["message"] == "here"


def test_missing_secret_volume_waits_in_container_creating_with_a_failed_mount_event(kube: Kube, namespace: str
                                                                                       ) -> None:
    # As the kubelet: a volume that cannot be set up keeps the containers in ContainerCreating, and says why in a
    # FailedMount Warning Event on the pod (what the operator reads), not as a container's config error.
    pod = make_pod("mounting", "open('/dev/termination-log', 'w').write(open('/creds/token').read())",
                   container={"volumeMounts": [{"name": "creds", "mountPath": "/creds"}]},
                   volumes=[{"name": "creds", "secret": {"secretName": "late"}}])
    kube.apply(pod, namespace)

    def failed_mount() -> list[str] | None:
        events = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json",
                                         "--field-selector", "involvedObject.name=mounting").stdout)["items"]
        messages = [e["message"] for e in events if e["reason"] == "FailedMount" and e["type"] == "Warning"]
        # The first may be the node authorizer's 403, before it has learnt of the pod (a kubelet sees that too).
        return messages if any(f"secret {namespace}/late not found" in m for m in messages) else None

    kube.wait_for("a FailedMount Event naming the missing secret", failed_mount, namespace)
    # The node posts the Event (runner._tick) before its first status with containerStatuses (the _publish after it):
    # read once in between, the pod had none yet.
    pod = kube.wait_pod(namespace, "mounting", lambda p: bool(p.get("status", {}).get("containerStatuses")),
                        "its first container status")
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ContainerCreating"
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"token": "t0"}},
               namespace)
    done = kube.wait_pod(namespace, "mounting", finished, "finished")
    assert phase(done) == "Succeeded" and terminated(done)["message"] == "t0"


def test_restart_policy_on_failure_restarts_until_success(kube: Kube, namespace: str) -> None:
    # Fails once, then succeeds: the emptyDir survives the restart, as in a real kubelet.
    script = ("import os, sys; p = '/scratch/attempts'; n = int(open(p).read()) if os.path.exists(p) else 0; "
              "open(p, 'w').write(str(n + 1)); sys.exit(1 if n == 0 else 0)")
    pod = make_pod("flaky", script, restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    kube.apply(pod, namespace)
    done = kube.wait_pod(namespace, "flaky", finished, "finished")
    status = done["status"]["containerStatuses"][0]
    assert phase(done) == "Succeeded" and status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(kube: Kube, namespace: str) -> None:
    # What a real cluster guarantees: SIGTERM first, SIGKILL no sooner than the grace period.
    # (The HOLD finalizer keeps the deleted pods readable, as the Job controller's does.)
    graceful = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); print('ready', flush=True); time.sleep(600)")
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: print('sigterm ignored', flush=True))\n"
                "print('ready', flush=True)\nwhile True: time.sleep(0.1)")
    held = {"finalizers": [HOLD]}
    kube.apply([make_pod("graceful", graceful, metadata=held, terminationGracePeriodSeconds=30),
                make_pod("stubborn", stubborn, metadata=held, terminationGracePeriodSeconds=3)], namespace)
    for name in ("graceful", "stubborn"):
        kube.wait_for(f"{name} ready", lambda n=name: "ready" in kube.kubectl("logs", n, "-n", namespace,
                                                                              check=False).stdout, namespace)
    try:
        kube.kubectl("delete", "pod", "graceful", "stubborn", "-n", namespace, "--wait=false")
        # When its grace period ends, read now: the kubelet's final delete (grace 0) sets it again once the pod ended.
        grace_ends = datetime.fromisoformat(kube.get("pod", "stubborn", namespace)["metadata"]["deletionTimestamp"])
        ended = {name: kube.wait_pod(namespace, name, finished, "ended") for name in ("graceful", "stubborn")}
        stubborn_log = kube.kubectl("logs", "stubborn", "-n", namespace).stdout
    finally:
        for name in ("graceful", "stubborn"):
            release(kube, namespace, name)
    assert terminated(ended["graceful"])["exitCode"] == 0  # its SIGTERM handler ran
    stubborn_end = terminated(ended["stubborn"])
    assert stubborn_end["exitCode"] == 137  # SIGKILL
    assert "sigterm ignored" in stubborn_log
    killed = datetime.fromisoformat(stubborn_end["finishedAt"])
    assert killed >= grace_ends - timedelta(seconds=1)  # timestamps have whole seconds


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
    template = make_pod("unused", RENDEZVOUS_SCRIPT, subdomain="workers", container={
        "securityContext": RESTRICTED,
        "env": [{"name": "POD_NAME", **field_env("metadata.name")}, {"name": "POD_IP", **field_env("status.podIP")}]})
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "indexed"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": {"spec": template["spec"]}}}
    # As the operator makes one for torchrun: the names resolve as soon as the pods exist.
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "workers"},
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": "indexed"}}}
    kube.apply([service, job], namespace)
    kube.wait_for("job indexed complete",
                  lambda: condition(kube.get("job", "indexed", namespace) or {}, "Complete").get("status") == "True",
                  namespace)
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", "job-name=indexed", "-o", "json").stdout)
    messages = set()
    for pod in pods["items"]:
        ended = terminated(pod)
        assert pod["spec"]["nodeName"] == "process-node" and phase(pod) == "Succeeded"
        assert ended["exitCode"] == 0
        messages.add(ended["message"])
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
        make_pod("child-pod", "import time; time.sleep(600)", metadata=ref, terminationGracePeriodSeconds=1),
    ], namespace)
    kube.wait_pod(namespace, "child-pod", lambda p: phase(p) == "Running", "running")
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    kube.wait_for("children collected", lambda: kube.get("secret", "child-secret", namespace) is None
                  and kube.get("pod", "child-pod", namespace) is None, namespace)
