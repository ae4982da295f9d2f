"""The process node honours securityContext as a kubelet and runtime do: the uid, gid and
groups a container runs as (fsGroup owning its volumes), runAsNonRoot, capabilities,
no_new_privs and a read-only root; and a container's mount points live in its own root,
never on the host."""

from __future__ import annotations

import json
import pwd
import uuid
from pathlib import Path

import pytest

from kube import Kube
from pods import HOST_PATH, RESTRICTED, finished, make_claim, make_pod, terminated

pytestmark = pytest.mark.cluster


def _home(uid: int) -> str:
    """HOME as a runtime sets it: the user's entry in the image's passwd (the host's here), else /."""
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"

NON_ROOT_SCRIPT = r"""
import json, os, stat
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as error:
        return type(error).__name__
open("/scratch/made", "w").write("x")
open("/scratch-sub/made", "w").write("x")  # a subPath folder, made by the node, is as writable
open("/mnt/pvc/output/result.txt", "w").write("trained")
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
import finetune_trainer  # the project's virtualenv, root-owned, imports as any user
report = {
    "ids": [os.getuid(), os.getgid(), sorted(os.getgroups())],
    "home": os.environ["HOME"],
    "shadow": attempt(lambda: open("/etc/shadow").read()),
    "model": open("/mnt/pvc/models/model.txt").read(),
    "config": open("/etc/app/greeting").read(),
    "scratch_group": os.stat("/scratch/made").st_gid,
    "output_group": os.stat("/mnt/pvc/output/result.txt").st_gid,
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
}
open("/dev/termination-log", "w").write(json.dumps(report))
"""


def test_a_restricted_pod_runs_as_its_user_and_owns_its_volumes(kube: Kube, restricted_namespace: str,
                                                                 host_folder: Path) -> None:
    # What the operator's trainer pods look like: restricted, uid 1000, an fsGroup, reading a
    # model from a claim on an existing host folder and writing its output to another claim.
    namespace = restricted_namespace
    (host_folder / "model.txt").write_text("weights")  # root-owned, as `make assets` leaves it
    models = make_claim("models")
    models["metadata"]["annotations"] = {HOST_PATH: str(host_folder)}
    pod = make_pod("trainer", NON_ROOT_SCRIPT,
                   securityContext={"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000,
                                    "supplementalGroups": [4000], "seccompProfile": {"type": "RuntimeDefault"}},
                   volumes=[{"name": "scratch", "emptyDir": {}},
                            {"name": "config", "configMap": {"name": "app"}},
                            {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                            {"name": "output", "persistentVolumeClaim": {"claimName": "output"}}],
                   container={"securityContext": RESTRICTED, "volumeMounts": [
                       {"name": "scratch", "mountPath": "/scratch"},
                       {"name": "scratch", "mountPath": "/scratch-sub", "subPath": "sub"},
                       {"name": "config", "mountPath": "/etc/app"},
                       {"name": "models", "mountPath": "/mnt/pvc/models", "readOnly": True},
                       {"name": "output", "mountPath": "/mnt/pvc/output"}]})
    kube.apply([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"}, "data": {"greeting": "hi"}},
                models, make_claim("output"), pod], namespace)
    done = kube.wait_pod(namespace, "trainer", finished, "finished", timeout=120)
    assert done["status"]["phase"] == "Succeeded", kube.describe(namespace)
    report = json.loads(terminated(done)["message"])
    # The container's runAsUser (1000) wins over the pod's; fsGroup and supplementalGroups are its groups.
    assert report["ids"] == [1000, 3000, [2000, 4000]]
    assert report["home"] == _home(1000)
    assert report["shadow"] == "PermissionError"  # a non-root pod cannot read root-only files
    assert (report["model"], report["config"]) == ("weights", "hi")
    assert report["scratch_group"] == report["output_group"] == 2000  # setgid folders of the fsGroup
    assert report["cap_eff"] == report["cap_bnd"] == "0000000000000000"  # drop: [ALL]
    assert report["no_new_privs"] == "1"  # allowPrivilegeEscalation: false


CAPABILITY_SCRIPT = r"""
import json
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
open("/dev/termination-log", "w").write(json.dumps({k: status[k].strip() for k in ("Uid", "CapBnd", "CapEff")}))
"""


def test_a_root_container_keeps_the_runtime_default_capabilities_less_those_dropped(
        kube: Kube, namespace: str) -> None:
    kube.apply([make_pod("default", CAPABILITY_SCRIPT),
                make_pod("dropped", CAPABILITY_SCRIPT, container={"securityContext": {
                    "capabilities": {"drop": ["NET_RAW", "CHOWN"], "add": ["SYS_PTRACE"]}}})], namespace)
    default, dropped = (terminated(kube.wait_pod(namespace, n, finished, "finished"))["message"]
                        for n in ("default", "dropped"))
    default_caps, dropped_caps = (int(json.loads(m)["CapBnd"], 16) for m in (default, dropped))
    chown, net_raw, sys_admin, sys_ptrace = 1 << 0, 1 << 13, 1 << 21, 1 << 19
    assert json.loads(default)["Uid"].split()[0] == "0"
    assert default_caps & chown and default_caps & net_raw and not default_caps & sys_admin
    assert dropped_caps == (default_caps & ~chown & ~net_raw) | sys_ptrace
    assert json.loads(dropped)["CapEff"] == json.loads(dropped)["CapBnd"]


READ_ONLY_SCRIPT = r"""
import json
def attempt(path):
    try:
        open(path, "w").write("x")
        return "ok"
    except OSError as error:
        return error.strerror
open("/dev/termination-log", "w").write(json.dumps({p: attempt(p) for p in ["/etc/new", "/tmp/new", "/scratch/new"]}))
"""


def test_read_only_root_filesystem_leaves_only_volumes_writable(kube: Kube, namespace: str) -> None:
    kube.apply(make_pod("ro", READ_ONLY_SCRIPT, volumes=[{"name": "scratch", "emptyDir": {}}], container={
        "securityContext": {"readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}), namespace)
    report = json.loads(terminated(kube.wait_pod(namespace, "ro", finished, "finished"))["message"])
    assert report == {"/etc/new": "Read-only file system", "/tmp/new": "Read-only file system", "/scratch/new": "ok"}
    assert not Path("/etc/new").exists()


def test_run_as_non_root_without_a_user_is_refused_as_the_kubelet_does(kube: Kube, namespace: str) -> None:
    kube.apply(make_pod("rooted", "print('never')", container={"securityContext": {"runAsNonRoot": True}}), namespace)

    def waiting(pod: dict) -> dict:
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting") or {}

    pod = kube.wait_pod(namespace, "rooted", lambda p: waiting(p).get("reason") == "CreateContainerConfigError",
                        "CreateContainerConfigError")
    assert "runAsNonRoot and image will run as root" in waiting(pod)["message"]
    assert pod["status"]["phase"] == "Pending"


def test_mount_points_are_made_in_the_pods_root_not_on_the_host(kube: Kube, namespace: str) -> None:
    unique = f"fto-{uuid.uuid4().hex[:8]}"
    targets = [f"/{unique}", f"/mnt/{unique}/config", f"/var/lib/{unique}/data", f"/dev/{unique}.log"]
    # /usr/share/doc exists on the host: a mount point made later beside it (in /usr) must
    # not undo the mount on it.
    script = ("import os, sys; sys.exit(0 if all(os.path.exists(p) for p in sys.argv[1:]) "
              "and open('/usr/share/doc/marker').read() == 'here' else 1)")
    kube.apply([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "doc"}, "data": {"marker": "here"}},
                make_pod("mounts", script, volumes=[{"name": "scratch", "emptyDir": {}},
                                                    {"name": "doc", "configMap": {"name": "doc"}}], container={
                    "args": targets[:3], "terminationMessagePath": targets[3],
                    "volumeMounts": [{"name": "doc", "mountPath": "/usr/share/doc"}, *(
                        {"name": "scratch", "mountPath": t, "subPath": str(i)}
                        for i, t in enumerate([*targets[:3], f"/usr/{unique}"]))]})], namespace)
    done = kube.wait_pod(namespace, "mounts", finished, "finished")
    assert done["status"]["phase"] == "Succeeded", kube.describe(namespace)
    assert [t for t in [*targets, f"/usr/{unique}"] if Path(t).exists()] == []


LIMITS = "finetune.dev/resource-limits"  # the process node's word on whether it enforces limits


def test_a_container_over_its_memory_limit_is_oom_killed(kube: Kube, namespace: str) -> None:
    limits = kube.get("node", "process-node")["metadata"]["annotations"][LIMITS]
    if limits.startswith("not enforced"):
        pytest.skip(f"the process node says resource limits are {limits}")
    script = "import time; hog = bytearray(512 * 2**20); time.sleep(30)"
    kube.apply(make_pod("hog", script, container={"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}}),
               namespace)
    ended = terminated(kube.wait_pod(namespace, "hog", finished, "finished"))
    assert (ended["exitCode"], ended["reason"]) == (137, "OOMKilled")
