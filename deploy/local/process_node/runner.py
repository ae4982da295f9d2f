"""One pod's life on the process node: its volumes, its containers as local processes
(each in its own root, as its securityContext's user), restarts per restartPolicy,
SIGTERM-then-SIGKILL deletion, and kubelet-like status.

Each pod runs in one thread that ticks every POLL seconds: it starts what is due, reaps
what exited, and publishes the status when it changed. Each run of a container writes its
own log (logs/<container>/<restart count>.log), so the previous one stays readable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Protocol

from . import downward, processes, security, volumes
from .cgroups import Cgroups
from .dns import Dns, pod_hostname
from .kubeapi import ApiError
from .kubelet_api import tail_offset

POLL = 0.2
# The kubelet backs off 10 s doubling to 5 min; a test harness wants quicker retries.
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
# A status the API refused is sent again after POLL, doubling up to this (the kubelet's status manager retries
# every 10 s): what a pod ended with must reach the API, or the pod stays Running there and its Job never ends.
PUBLISH_BACKOFF_MAX = 10.0
TERMINAL = ("Succeeded", "Failed")
# Like the kubelet: the termination message is the file's last 4 KiB, and with
# FallbackToLogsOnError a failed container's last 80 log lines, of which the last 2 KiB,
# stand in for a missing one (tail.ReadAtMost, readLastStringFromContainerLogs).
MESSAGE_MAX_BYTES, FALLBACK_MAX_BYTES, FALLBACK_LOG_LINES = 4096, 2048, 80
LAUNCHER = Path(__file__).with_name("launcher.py")
# Why a pod's volumes cannot be set up, or a container started, yet: retried. A kubelet shows the first as
# ContainerCreating with a FailedMount Event (a missing Secret volume, a token the node authorizer does not yet let
# it ask for), the second as CreateContainerConfigError (a missing ConfigMap key in env, runAsNonRoot as root).
NOT_YET = (downward.ConfigError, ApiError, OSError)
# Paths every container must reach whatever its uid: the virtualenv and the Python under it.
INTERPRETER = sorted({sys.prefix, os.path.realpath(sys.executable)})
# The checkout the virtualenv belongs to (its editable installs import from there): the image's software.
SOFTWARE = [str(Path(sys.prefix).resolve().parent)]

log = logging.getLogger("process_node")


class Node(Protocol):
    """What a pod needs from its node (implemented in agent.py)."""

    name: str
    allocatable: dict[str, str]
    image_env: dict[str, str]  # what an image would set (PATH, ...): under the container's env, never expanded
    service_env: dict[str, str]  # the kubelet's service variables (KUBERNETES_SERVICE_HOST, ...)
    cluster: volumes.Cluster
    dns: Dns
    cgroups: Cgroups | None  # None: limits are not enforced on this machine
    stopping: threading.Event  # set when the node exits: what is left to send is left

    def publish_status(self, pod: dict, status: dict) -> bool: ...  # False: to be sent again
    def delete_pod(self, pod: dict) -> None: ...  # raises OSError or ApiError when not sent
    def warn(self, pod: dict, reason: str, message: str) -> None: ...
    def clean_up(self, pod: dict) -> None: ...  # once it is gone: its DNS entry, then its folders but the logs


# The exponent stops where the cap is passed: 2.0 ** 1024 (some 3 h of refusals) overflows a float.
DOUBLINGS = math.ceil(math.log2(PUBLISH_BACKOFF_MAX / POLL))


def _retry_delay(failures: int) -> float:
    """POLL doubled per failure in a row, up to PUBLISH_BACKOFF_MAX."""
    return min(PUBLISH_BACKOFF_MAX, POLL * 2 ** min(failures, DOUBLINGS))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kill(proc: subprocess.Popen, root: Path) -> None:
    """SIGKILL the whole container, as a runtime does: its process group (the launcher, before it chroots) and
    every process in its root, whatever session it started for itself."""
    if proc.returncode is None:  # once reaped, its group's id may be another's
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    processes.kill_all(root)


def _exit_code(proc: subprocess.Popen, root: Path) -> int | None:
    """The container's exit code once its main process ended; what it left running is killed
    first (a runtime ends the whole container with its main process), while the unreaped main
    process still holds the group's id."""
    if proc.returncode is not None:
        return proc.returncode
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        return None
    _kill(proc, root)
    return proc.wait()


def _mounted_beneath(folder: Path) -> bool:
    """Whether anything is mounted at or under `folder` in the node's own mount namespace."""
    folder = folder.resolve()
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        escaped = line.split()[4]  # a space, tab, newline or backslash in it comes as \ and three octal digits
        mount_point = re.sub(rb"\\([0-7]{3})", lambda digits: bytes([int(digits[1], 8)]), escaped)
        if Path(os.fsdecode(mount_point)).is_relative_to(folder):
            return True
    return False


def remove_pod_folders(pod_dir: Path) -> None:
    """What a deleted pod leaves on the node, removed as a kubelet removes a deleted pod's volumes: its volumes
    (emptyDirs; Secret, ConfigMap and token files), each run's root with its own /tmp, its hosts and
    termination-log files. Its logs stay: they are the node's, read after the pod is gone. All is left, with a
    warning, while a process runs in one of its roots or anything is mounted beneath it (its containers mount in
    namespaces of their own): a removal would reach into what that holds."""
    if not pod_dir.exists():
        return
    try:
        # a folder of logs alone (swept again at each start of the node) is passed over before the costlier checks
        left = [entry for entry in pod_dir.iterdir() if entry.name != "logs"]
        if left and (processes.processes_in(pod_dir / "roots") or _mounted_beneath(pod_dir)):
            log.warning("%s left: a process still runs in it, or something is mounted there", pod_dir)
            return
        for entry in left:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as error:
        log.warning("%s: not all removed: %s", pod_dir, error)


def _last_bytes(f: BinaryIO, start: int, limit: int) -> bytes:
    """The last `limit` bytes between offset `start` and the end of the file."""
    f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
    return f.read()


def _state_triple(state: dict) -> dict:
    # Explicit nulls: pod status is sent as a strategic merge patch, which would otherwise
    # keep the previous state's key (a container both waiting and running).
    return {k: state.get(k) for k in ("waiting", "running", "terminated")}


# How the kubelet ends a container of a deleted pod that has no end of its own (status manager, TerminatePod).
STATUS_UNKNOWN = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                 "message": "The container could not be located when the pod was terminated"}}


def _started(status: dict) -> bool:
    """Whether a container status shows that it ran once (kubelet: not waiting, or a previous run ended)."""
    return not status["state"].get("waiting") or bool((status.get("lastState") or {}).get("terminated"))


def _unknown_unless_ended(status: dict) -> dict:
    if status["state"].get("terminated"):
        return status
    return {**status, "ready": False, "started": False, "state": _state_triple(STATUS_UNKNOWN)}


def ended(pod: dict, status: dict) -> dict:
    """`status` as the kubelet's status manager ends a pod (TerminatePod), before its final delete: phase Failed
    unless it ended already, and every container with no end that ran or was due to run terminated as
    ContainerStatusUnknown (137): the regular ones once the pod initialized, the init ones up to the last that ran
    (at least the first). A Job counts a deleted pod only once it is terminal (podFailurePolicy's finalizer)."""
    spec = pod["spec"]
    init = _statuses(spec.get("initContainers", []), status.get("initContainerStatuses"), True)
    regular = _statuses(spec["containers"], status.get("containerStatuses"), False)
    initialized = not init or any(map(_started, regular)) or \
        (init[-1]["state"].get("terminated") or {}).get("exitCode") == 0
    ran = max((i + 1 for i, s in enumerate(init) if _started(s)), default=1)
    # nothing runs: not ready, as the kubelet says of a pod that ended (PodCompleted)
    conditions = [dict(c, status="False", reason="PodCompleted", lastTransitionTime=_now())
                  if c["type"] in ("Ready", "ContainersReady") and c["status"] == "True" else c
                  for c in status.get("conditions") or []]
    return {**status, "phase": status.get("phase") if status.get("phase") in TERMINAL else "Failed",
            **({"conditions": conditions} if conditions else {}),
            "initContainerStatuses": [_unknown_unless_ended(s) if i < ran else s for i, s in enumerate(init)] or None,
            "containerStatuses": [_unknown_unless_ended(s) for s in regular] if initialized else regular}


@dataclass
class Container:
    spec: dict
    is_init: bool = False
    proc: subprocess.Popen | None = None
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restart_count: int = 0
    next_start: float = 0.0  # monotonic time when it may (re)start
    cgroup: Path | None = None  # this run's, where limits are enforced
    done: bool = False  # exited for good: no restart will follow

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def exit_code(self) -> int | None:
        return self.state.get("terminated", {}).get("exitCode")

    @property
    def never_started(self) -> bool:
        return self.proc is None and self.restart_count == 0 and not self.done

    def status(self) -> dict:
        running = "running" in self.state
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"process://{self.proc.pid}" if self.proc else None,
            # An init container is ready once it completed, as the kubelet reports it.
            "ready": self.exit_code == 0 if self.is_init else running, "started": running,
            "restartCount": self.restart_count,
            "state": _state_triple(self.state), "lastState": _state_triple(self.last_state),
        }


def _statuses(specs: list[dict], statuses: list[dict] | None, is_init: bool) -> list[dict]:
    """Each container's status in the spec's order; one the API lacks (a pod never run here) as not yet created."""
    known = {s["name"]: s for s in statuses or []}
    return [known.get(c["name"]) or Container(c, is_init).status() for c in specs]


class PodRunner(threading.Thread):
    def __init__(self, node: Node, pod: dict, pod_ip: str, pods_dir: Path) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod {meta['namespace']}/{meta['name']}", daemon=True)
        self.node, self.pod, self.ip = node, pod, pod_ip
        self.dir = pods_dir / meta["uid"]  # as the kubelet's: namespace_name_uid can pass a file name's 255 bytes
        self.policy = pod["spec"].get("restartPolicy", "Always")
        self.init = [Container(c, is_init=True) for c in pod["spec"].get("initContainers", [])]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.start_time = _now()
        self.conditions: dict[str, dict] = {}
        self.folders: dict[str, Path] | None = None
        self._mount_at, self._mount_problem = 0.0, ""  # the next try at the volumes, and the last failure's words
        self.hostname = pod_hostname(pod)
        self.hosts_file = self.dir / "hosts"
        self._kill_at: float | None = None  # set on deletion: SIGKILL what still runs at this time
        self._terminated_signalled = False
        self._ended = False  # the loop has ended (or is ending without a final delete): a stop() would be lost
        self._lock = threading.Lock()
        self._published: str = ""
        self._publish_at, self._publish_failures = 0.0, 0  # the next try after a refused status; refusals in a row

    # ------------------------------------------------------------ called by the agent

    def stop(self, grace_seconds: float) -> bool:
        """The pod is being deleted: SIGTERM now, SIGKILL after the grace period, then the final delete. False when
        the runner has ended (or is ending) without one: the caller finishes the deletion."""
        with self._lock:
            if self._ended or not self.is_alive():  # not alive: it died without saying so (a bug)
                return False
            kill_at = time.monotonic() + grace_seconds
            self._kill_at = kill_at if self._kill_at is None else min(self._kill_at, kill_at)
            return True

    def published(self) -> dict | None:
        """The status the API last took from this runner, if any."""
        return json.loads(self._published) if self._published else None

    def log_path(self, container_name: str, restarts: int) -> Path:
        return self.dir / "logs" / container_name / f"{restarts}.log"

    def log_of(self, container_name: str, previous: bool) -> tuple[Path, Callable[[], bool]] | None:
        """A run's log file (the current one, or the one before the last restart), and
        whether more may still be written to it."""
        container = next((c for c in self.init + self.containers if c.name == container_name), None)
        if container is None:
            return None
        with self._lock:
            run = container.restart_count - 1 if previous else container.restart_count
            path = self.log_path(container_name, run)
        if run < 0 or not path.exists():
            return None
        return path, lambda: not previous and self.is_alive() and not container.done and \
            container.restart_count == run

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            self._loop()
        finally:
            with self._lock:
                self._ended = True
            self.node.dns.remove_pod(self.pod)

    def _loop(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            while True:
                with self._lock:
                    kill_at = self._kill_at
                if kill_at is not None:
                    if self._terminate(kill_at):
                        break
                else:
                    self._tick()
                if self._publish() and self._phase() in TERMINAL and self._end_unless_stopped():
                    return  # finished, and the API knows; the agent deletes it when asked
                time.sleep(POLL)
        except Exception as error:  # a bug here must show in the pod, not leave it Pending
            if not self._fail(error):
                return
        # As the kubelet: the final delete once the API has the pod's end (a Job counts its pods by their end, and
        # the pod would be gone with its end unseen), each sent until it lands.
        # Then what it left, unless the node is exiting (the pod lives on, as through a kubelet's restart).
        if self._until_sent(lambda: self._publish(now=True)) and self._until_sent(self._final_delete) and \
                not self.node.stopping.is_set():
            self.node.clean_up(self.pod)

    def _fail(self, error: Exception) -> bool:
        """The runner failed: its containers are killed and say why. Whether the pod is being deleted: its end (Failed)
        and final delete are then sent here, else a later deletion is the agent's to finish."""
        log.exception("pod %s: runner failed", self.name)
        failed = [c for c in self.init + self.containers if not c.done]
        for container in failed:
            if container.proc is not None:  # no process outlives its pod's runner
                _kill(container.proc, self._root(container))
            self._remove_cgroup(container)
            container.state = {"waiting": {"reason": "RunContainerError", "message": f"process node: {error!r}"}}
        # Said before the runner ends: sent after, it could land on the end the agent gives a deletion then, and put
        # a Failed pod back to Pending. A deletion meanwhile is this runner's to finish.
        self._publish(now=True)
        deleting = not self._end_unless_stopped()
        for container in failed:
            container.done = deleting  # none starts again
        return deleting

    def _until_sent(self, send: Callable[[], bool]) -> bool:
        """send() until it succeeds, backing off as a refused status does; False if the node exits first."""
        failures = 0
        while not send():
            failures += 1
            if self.node.stopping.wait(_retry_delay(failures)):
                return False
        return True

    def _final_delete(self) -> bool:  # not _delete: threading.Thread has one
        try:
            self.node.delete_pod(self.pod)
            return True
        except (OSError, ApiError) as error:
            log.warning("pod %s: final delete failed: %s", self.name, error)
            return False

    def _end_unless_stopped(self) -> bool:
        """End now, unless a deletion came meanwhile (it is then finished here); under the lock, so that a stop()
        either comes in time or learns that it came too late."""
        with self._lock:
            self._ended = self._kill_at is None
            return self._ended

    def _tick(self) -> None:
        if self.folders is None:
            if time.monotonic() < self._mount_at:
                return
            try:
                self.folders = volumes.materialize(self.pod, self.dir, self.node.cluster, self.node.allocatable)
                with self._lock:  # as stop(): a pod deleted meanwhile (its entry gone: agent._forget) starts nothing
                    if self._kill_at is not None:
                        return
                    self.node.dns.add_pod(self.pod, self.ip, self.hosts_file)
            except NOT_YET as error:
                self._mount_at = time.monotonic() + BACKOFF_START
                if str(error) != self._mount_problem:  # one Event per problem; a kubelet's recorder aggregates
                    self._mount_problem = str(error)
                    self.node.warn(self.pod, "FailedMount", f"MountVolume.SetUp failed: {error}")
                return
        pending_init = next((c for c in self.init if not c.done), None)
        if pending_init is not None:
            self._step(pending_init)
            return
        if self._init_failed():
            return
        for container in self.containers:
            self._step(container)

    def _step(self, container: Container) -> None:
        """Start the container when due, or reap it when it exited."""
        if container.done:
            return
        if container.proc is None:
            if time.monotonic() >= container.next_start:
                self._start(container)
            return
        code = _exit_code(container.proc, self._root(container))
        if code is not None:
            self._reap(container, code)

    def _root(self, container: Container) -> Path:
        """The folder of the current run's root: its processes' root. A fresh one per run: its mount points are left
        from the last one's."""
        return self.dir / "roots" / f"{container.name}-{container.restart_count}"

    def _start(self, container: Container) -> None:
        spec = container.spec
        try:
            user = security.identity(self.pod, spec)
            env = downward.container_env(
                self._pod_view(), spec, self.node.cluster.data, self.node.allocatable, self.node.service_env)
            if not spec.get("command"):
                raise downward.ConfigError("the process node ignores images, so a container needs a `command`")
            argv = [downward.expand(a, env) for a in spec["command"] + spec.get("args", [])]
            if self.node.cgroups is not None and container.cgroup is None:
                run = f"{self.pod['metadata']['uid']}-{container.name}-{container.restart_count}"
                container.cgroup = self.node.cgroups.create(run, spec.get("resources") or {})
            mounts = volumes.container_mounts(self.pod, spec, self.folders or {})
        except NOT_YET as error:
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            container.next_start = time.monotonic() + BACKOFF_START
            return
        term_log = self.dir / f"{container.name}.termination-log"
        term_log.write_text("")
        term_log.chmod(0o666)  # as the kubelet makes it: any container user may write it
        mounts.append(volumes.Mount(str(term_log), spec.get("terminationMessagePath", "/dev/termination-log"), False))
        mounts.append(volumes.Mount(str(self.hosts_file), "/etc/hosts", True))
        launch = {
            "root": str(self._root(container)),
            "mounts": [m.as_dict() for m in mounts], "traversable": INTERPRETER, "software": SOFTWARE,
            "argv": argv, "hostname": self.hostname,
            # As a runtime: the image's env, HOME and HOSTNAME, then the kubelet's over them.
            "env": {**self.node.image_env, "HOME": user.home, "HOSTNAME": self.hostname, **env},
            "cwd": spec.get("workingDir") or "/",  # no image WORKDIR: a runtime's default
            "termination_log": str(term_log), "read_only_root": user.read_only_root,
            "user": user.launcher_user(), "cgroup": str(container.cgroup) if container.cgroup else None,
        }
        (self.dir / "roots").mkdir(exist_ok=True)
        log_path = self.log_path(container.name, container.restart_count)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            container.proc = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", sys.executable, str(LAUNCHER)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: a SIGKILL reaches its children too
            )
        try:
            container.proc.stdin.write(json.dumps(launch).encode())
            container.proc.stdin.close()
        except BrokenPipeError:
            pass  # the launcher died at once; its exit code is reaped like any other
        container.state = {"running": {"startedAt": _now()}}
        log.info("pod %s: started %s (pid %d): %s", self.name, container.name, container.proc.pid, argv)

    def _reap(self, container: Container, code: int) -> None:
        exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as a shell says
        reason = "Completed" if exit_code == 0 else "Error"
        if container.cgroup is not None and Cgroups.oom_killed(container.cgroup):
            reason = "OOMKilled"
        self._remove_cgroup(container)
        terminated = {
            "exitCode": exit_code, "reason": reason,
            "startedAt": container.state.get("running", {}).get("startedAt", self.start_time),
            "finishedAt": _now(), "containerID": f"process://{container.proc.pid}",
        }
        if message := self._termination_message(container, exit_code):
            terminated["message"] = message
        log.info("pod %s: %s exited with %d", self.name, container.name, exit_code)
        restart = exit_code != 0 if (container.is_init or self.policy == "OnFailure") else self.policy == "Always"
        if self.policy == "Never" or not restart or self._kill_at is not None:
            container.state, container.done = {"terminated": terminated}, True
            return
        container.last_state = {"terminated": terminated}
        with self._lock:  # the kubelet API reads it to find the current log
            container.restart_count += 1
        backoff = min(BACKOFF_MAX, BACKOFF_START * 2 ** (container.restart_count - 1))
        container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {backoff:.0f}s restarting"}}
        container.next_start = time.monotonic() + backoff
        container.proc = None

    def _remove_cgroup(self, container: Container) -> None:
        """Remove the run's cgroup, if it has one. One that will not go (busy past the wait, or no cgroup.kill before
        Linux 5.14) is left, with a warning: the container's end must still reach the pod's status."""
        if container.cgroup is None:
            return
        try:
            Cgroups.remove(container.cgroup)
        except OSError as error:
            log.warning("pod %s: cgroup %s of %s left behind: %s", self.name, container.cgroup, container.name, error)
        container.cgroup = None

    def _termination_message(self, container: Container, exit_code: int) -> str:
        message = b""
        path = self.dir / f"{container.name}.termination-log"
        if path.exists():
            with path.open("rb") as f:
                message = _last_bytes(f, 0, MESSAGE_MAX_BYTES)
        fallback = container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and exit_code != 0:
            with self.log_path(container.name, container.restart_count).open("rb") as f:
                message = _last_bytes(f, tail_offset(f, FALLBACK_LOG_LINES), FALLBACK_MAX_BYTES)
        return message.decode(errors="replace")

    def _terminate(self, kill_at: float) -> bool:
        """Deletion: SIGTERM once, SIGKILL at kill_at; True once every process is gone."""
        live = [c for c in self.init + self.containers if c.proc is not None and not c.done]
        for container in live:
            code = _exit_code(container.proc, self._root(container))
            if code is not None:
                self._reap(container, code)
            elif not self._terminated_signalled:  # always first; as a runtime sends it: to the main process alone
                os.kill(container.proc.pid, signal.SIGTERM)
            elif time.monotonic() >= kill_at:
                _kill(container.proc, self._root(container))
        self._terminated_signalled = True
        for container in (c for c in self.init + self.containers if c.proc is None):  # none of these starts now
            container.done = True
            self._remove_cgroup(container)  # made for a start refused since (CreateContainerConfigError)
        return all(c.done for c in live)

    # ------------------------------------------------------------ status

    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def _init_failed(self) -> bool:
        return any(c.done and c.exit_code != 0 for c in self.init)

    def _phase(self) -> str:
        if self._init_failed():
            return "Failed"
        if all(c.done for c in self.containers):  # a container that never ran counts as failed
            return "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"
        if not all(c.done for c in self.init) or all(c.never_started for c in self.containers):
            return "Pending"
        return "Running"

    def _condition(self, kind: str, true: bool, reason: str = "") -> dict:
        status = "True" if true else "False"
        previous = self.conditions.get(kind)
        if previous is None or previous["status"] != status:
            previous = {"type": kind, "status": status, "lastTransitionTime": _now(), "lastProbeTime": None}
        previous["reason"] = reason or None
        self.conditions[kind] = previous
        return previous

    def _pod_view(self) -> dict:
        """The pod as the downward API sees it: with our status fields filled in."""
        status = {**self.pod.get("status", {}), "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                  "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}]}
        return {**self.pod, "status": status}

    def _status(self) -> dict:
        phase = self._phase()
        initialized = all(c.done for c in self.init) and not self._init_failed()
        ready = phase == "Running" and all("running" in c.state for c in self.containers)
        not_ready_reason = "PodCompleted" if phase in TERMINAL else "ContainersNotReady"
        status = {
            **self._pod_view()["status"],
            "phase": phase, "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.folders is not None),
                self._condition("Initialized", initialized, "" if initialized else "ContainersNotInitialized"),
                self._condition("ContainersReady", ready, "" if ready else not_ready_reason),
                self._condition("Ready", ready, "" if ready else not_ready_reason),
            ],
            "initContainerStatuses": [c.status() for c in self.init] or None,
            "containerStatuses": [c.status() for c in self.containers],
        }
        return ended(self.pod, status) if phase in TERMINAL else status

    def _publish(self, now: bool = False) -> bool:
        """Send the status if it changed (after a refusal: once its back-off passed, or `now`); whether the API has
        it."""
        status = self._status()
        ready = next(c["status"] == "True" for c in status["conditions"] if c["type"] == "Ready")
        self.node.dns.set_ready(self.pod, ready and self._kill_at is None)
        fingerprint = json.dumps(status, sort_keys=True)  # only send what changed
        if fingerprint == self._published:
            return True
        if time.monotonic() < self._publish_at and not now:
            return False
        if not self.node.publish_status(self.pod, status):
            self._publish_failures += 1
            self._publish_at = time.monotonic() + _retry_delay(self._publish_failures)
            return False
        self._published, self._publish_failures = fingerprint, 0
        return True
