"""The process node's agent and pod runner (deploy/local/process_node) without a cluster: a stand-in for the
apiserver, and real containers, started as the node starts them (so, as the node, as root). What a kubelet
guarantees: a pod's end reaches the API even while the apiserver restarts, its deletion is finished whenever it
comes, SIGTERM goes to a container's main process alone, no process of a container outlives it, a subPath never
leads out of its volume, and /etc/hosts always names the pod."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import pytest

from conftest import LOCAL
from pods import make_pod

sys.path.insert(0, str(LOCAL))
from process_node import agent as agent_module  # noqa: E402
from process_node import dns as dns_module  # noqa: E402
from process_node import launcher  # noqa: E402
from process_node import processes  # noqa: E402
from process_node.agent import Agent  # noqa: E402
from process_node.dns import Dns  # noqa: E402
from process_node.kubeapi import ApiError  # noqa: E402
from process_node import runner as runner_module  # noqa: E402
from process_node.runner import PodRunner  # noqa: E402

T = TypeVar("T")


class Api:
    """The apiserver as the agent calls it: records the pod statuses it accepted and the pods deleted; `on_terminal`
    runs at each write of a pod's end, `on_delete` at each delete, before it is accepted (either may raise, as a
    request to a restarting apiserver does). A list of pods gives `pods`, a watch of them `events`, then nothing until
    `closed` is set."""

    host, port = "127.0.0.1", 6443

    def __init__(self) -> None:
        self.statuses: list[dict] = []
        self.deleted: list[str] = []  # the uids of the pods deleted
        self.on_terminal: Callable[[], None] = lambda: None
        self.on_delete: Callable[[], None] = lambda: None
        self.pods: list[dict] = []
        self.events: list[dict] = []
        self.closed = threading.Event()

    def watch(self, path: str) -> Iterator[dict]:
        yield from self.events
        self.closed.wait()

    def request(self, method: str, path: str, body: dict | None = None, content_type: str = "",
                missing_ok: bool = False) -> dict:
        if method == "GET" and path.startswith("/api/v1/pods"):
            return {"items": self.pods, "metadata": {"resourceVersion": "1"}}
        if method == "PATCH" and path.endswith("/status"):
            if body["status"]["phase"] in ("Succeeded", "Failed"):
                self.on_terminal()
            self.statuses.append(body["status"])
        elif method == "DELETE":
            self.on_delete()
            self.deleted.append(body["preconditions"]["uid"])
        return {}


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def agent(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    """An agent that was never registered: its pods are started by handing them to _sync, as its watch does."""
    monkeypatch.setattr(agent_module.Cgroups, "detect", lambda name: (None, "not in these tests"))
    node = Agent(api, "test-node", tmp_path, {"cpu": "1", "memory": "1Gi"}, (Path(), Path(), Path()), None, [])
    yield node
    node.shutdown(grace_seconds=0)


def _pod(script: str, **spec: object) -> dict:
    pod = make_pod("p", script, **spec)
    pod["metadata"] |= {"namespace": "ns", "uid": str(uuid.uuid4())}
    return pod


def _run(agent: Agent, pod: dict) -> PodRunner:
    agent._sync(pod)
    return agent.runners[pod["metadata"]["uid"]]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _eventually(what: str, check: Callable[[], T]) -> T:
    """check()'s first true answer."""
    deadline = time.monotonic() + 10
    while not (answer := check()):
        assert time.monotonic() < deadline, f"no {what} within 10 s"
        time.sleep(0.05)
    return answer


def _first_line(runner: PodRunner) -> str:
    """What the container printed first, once it did."""
    log = runner.log_path("main", 0)
    _eventually("line printed", lambda: log.exists() and "\n" in log.read_text())
    return log.read_text().partition("\n")[0]


def _state(api: Api, container: str) -> dict:
    """The container's state in the last status the API accepted (waiting, running, terminated: all but one None)."""
    statuses = api.statuses[-1]["containerStatuses"] if api.statuses else []
    return next((c["state"] for c in statuses if c["name"] == container), {})


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


@contextmanager
def _watching(agent: Agent, api: Api) -> Iterator[None]:
    """The agent's watch of its pods, running meanwhile."""
    watcher = threading.Thread(target=agent._watch_pods, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        agent.stopping.set()
        api.closed.set()
        watcher.join(10)


def _deleting(pod: dict, grace_seconds: int) -> dict:
    """The pod as the watch shows it once deleted."""
    return {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2025-01-01T00:00:00Z",
                                "deletionGracePeriodSeconds": grace_seconds}}


def test_a_pod_s_end_reaches_the_api_even_while_the_apiserver_restarts(agent: Agent, api: Api) -> None:
    # The kubelet's status manager keeps sending what the API lacks: were the pod's end lost, the pod would stay
    # Running in the API and its Job would never end.
    refusals = iter([OSError("connection refused")] * 2)

    def restarting() -> None:
        if (error := next(refusals, None)) is not None:
            raise error

    api.on_terminal = restarting
    runner = _run(agent, _pod("pass"))
    runner.join(10)
    assert api.statuses[-1]["phase"] == "Succeeded" and not runner.is_alive()


def test_a_pod_s_end_reaches_the_api_after_hours_of_refusals(agent: Agent, api: Api,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A thousand refusals in a row (some 3 h of outage at the back-off's cap) must not end the runner: its back-off
    # stays at the cap (here shortened, not to wait 10 s).
    monkeypatch.setattr(runner_module, "PUBLISH_BACKOFF_MAX", 0.5)
    refusals = iter([OSError("connection refused")] * 2)
    api.on_terminal = lambda: _raise(next(refusals, None))
    runner = _run(agent, _pod("import time; time.sleep(1)"))
    _eventually("Running", lambda: api.statuses and api.statuses[-1]["phase"] == "Running")
    runner._publish_failures = 1023
    runner.join(10)
    assert api.statuses[-1]["phase"] == "Succeeded" and not runner.is_alive()


def test_a_status_the_api_refuses_for_good_is_not_sent_for_ever(agent: Agent, api: Api) -> None:
    # A pod deleted by force and made again under its name: the old one's status, sent with its uid, is refused
    # (422, the uid is immutable) at every try. The runner, its warnings and its DNS entry stayed until the agent ended.
    api.on_terminal = lambda: _raise(ApiError(422, "metadata.uid: field is immutable"))
    runner = _run(agent, _pod("pass"))
    runner.join(5)
    assert not runner.is_alive()


def test_a_deletion_that_comes_as_the_pod_ends_is_finished(agent: Agent, api: Api) -> None:
    # The Job controller deletes a pod once it sees it end, here while its end is being written: the kubelet still
    # sends the final delete, else the pod would stay Terminating until the next relist.
    pod = _pod("pass")
    api.on_terminal = lambda: agent._sync(_deleting(pod, 30))
    _run(agent, pod).join(10)
    assert api.deleted == [pod["metadata"]["uid"]]


def test_a_deleted_pod_s_end_reaches_the_api_before_its_final_delete(agent: Agent, api: Api) -> None:
    # As the kubelet: a Job counts its pods by their end (podFailurePolicy, its tracking finalizer), so a pod deleted
    # with its end unseen would never count. Both the end and the delete are sent until the apiserver takes them.
    pod = _pod("import time; print('ready', flush=True); time.sleep(60)")
    runner = _run(agent, pod)
    assert _first_line(runner) == "ready"
    status_refusals, delete_refusals = iter([OSError("connection refused")]), iter([OSError("connection refused")])
    api.on_terminal = lambda: _raise(next(status_refusals, None))
    phases_at_delete: list[str] = []
    api.on_delete = lambda: phases_at_delete.append(api.statuses[-1]["phase"]) or _raise(next(delete_refusals, None))
    agent._sync(_deleting(pod, 30))
    runner.join(10)
    assert api.deleted == [pod["metadata"]["uid"]] and phases_at_delete == ["Failed", "Failed"]


def _phases_at_delete(api: Api) -> list[str]:
    """The pod's phase in the API at each final delete, as it comes."""
    phases: list[str] = []
    api.on_delete = lambda: phases.append(api.statuses[-1]["phase"] if api.statuses else "Pending")
    return phases


def test_a_runner_that_fails_at_once_says_so_and_its_pod_s_deletion_is_finished(agent: Agent, api: Api) -> None:
    # Whatever fails in a runner (here the pod's folder cannot be made) shows in the pod, and a deletion of a pod
    # whose runner ended is finished by the agent, the pod's end (Failed) first, as a kubelet ends it: it would
    # otherwise stay Terminating, and a Job with a podFailurePolicy would count it neither failed nor gone.
    agent.pods_dir.write_text("")  # a file where the pods' folders go
    pod = _pod("pass")
    _run(agent, pod).join(10)
    assert _state(api, "main")["waiting"]["reason"] == "RunContainerError"
    phases_at_delete = _phases_at_delete(api)
    agent._sync(_deleting(pod, 30))
    assert api.deleted == [pod["metadata"]["uid"]] and phases_at_delete == ["Failed"]
    assert _state(api, "main")["terminated"]["reason"] == "ContainerStatusUnknown"


def test_a_node_whose_pods_folder_cannot_be_listed_still_runs_its_pods_watch(agent: Agent, api: Api) -> None:
    # The first list's sweep of old pod folders raised on the watch's thread: each list failed before any pod was
    # synced, every second, for good, and the pods stayed Pending with nothing said in them.
    agent.pods_dir.write_text("")  # a file where the pods' folders go
    api.pods = [pod := _pod("pass")]
    with _watching(agent, api):
        _eventually("the pod's failure said", lambda: api.statuses and _state(api, "main")["waiting"])
    assert _state(api, "main")["waiting"]["reason"] == "RunContainerError" and pod["metadata"]["uid"] in agent.runners


def test_a_deletion_that_comes_as_a_failed_runner_says_so_ends_the_pod_failed(
        agent: Agent, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner's failure (Pending, RunContainerError) was sent once the runner had ended: a deletion meanwhile was
    # the agent's to finish, its end (Failed) landed first, and the failure after it put the deleted pod back to
    # Pending. A kubelet never moves a pod out of a terminal phase.
    agent.pods_dir.write_text("")  # a file where the pods' folders go: the runner fails at once
    pod = _pod("pass")
    publish, deleted = agent.publish_status, threading.Event()

    def deleted_as_sent(sent: dict, status: dict) -> bool:
        """publish_status, the pod deleted as its failure is sent."""
        if status["containerStatuses"][0]["state"]["waiting"] and not deleted.is_set():
            deleted.set()
            agent._sync(_deleting(pod, 30))
        return publish(sent, status)

    monkeypatch.setattr(agent, "publish_status", deleted_as_sent)
    _run(agent, pod).join(10)
    assert deleted.is_set() and api.deleted == [pod["metadata"]["uid"]]
    assert api.statuses[-1]["phase"] == "Failed"


def test_a_pod_first_seen_deleted_ends_failed_before_its_final_delete(agent: Agent, api: Api) -> None:
    # A relist after a broken watch shows a pod already deleted that never ran here: as the kubelet, it ends Failed,
    # its containers terminated with exit code 137 (ContainerStatusUnknown), and none starts.
    pod = _pod("pass")
    phases_at_delete = _phases_at_delete(api)
    agent._sync(_deleting(pod, 30))
    assert api.deleted == [pod["metadata"]["uid"]] and phases_at_delete == ["Failed"]
    assert _state(api, "main")["terminated"]["exitCode"] == 137
    assert pod["metadata"]["uid"] not in agent.runners


def test_the_end_of_a_pod_first_seen_deleted_is_sent_again_unless_refused_for_good(agent: Agent, api: Api) -> None:
    # A failure that may pass leaves the deletion to the watch's next relist; a refusal for good (422) must not stop
    # every relist there, before the pods listed after it.
    pod = _pod("pass")
    api.on_terminal = lambda: _raise(OSError("connection refused"))
    with pytest.raises(OSError):
        agent._sync(_deleting(pod, 30))
    assert api.deleted == []
    api.on_terminal = lambda: _raise(ApiError(422, "status.containerStatuses: Forbidden"))
    agent._sync(_deleting(pod, 30))
    assert api.deleted == [pod["metadata"]["uid"]]


def test_a_deletion_seen_after_the_pod_succeeded_keeps_its_success(agent: Agent, api: Api) -> None:
    # The Job controller deletes pods as they exit; a delete event handled after the runner sent Succeeded carries the
    # status from before it (Running): the pod was ended Failed, 137, over its success, which the operator then
    # counted as a failed attempt. A kubelet never moves a pod out of a terminal phase.
    pod = _pod("pass")
    running = {**pod, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                                 "containerStatuses": [{"name": "main", "state": {"running": {}}}]}}
    runner = _run(agent, pod)
    runner.join(10)
    assert api.statuses[-1]["phase"] == "Succeeded"
    agent._sync(_deleting(running, 30))
    assert [s["phase"] for s in api.statuses if s["phase"] != "Running"] == ["Succeeded"]
    assert api.deleted == [pod["metadata"]["uid"]] and _state(api, "main")["terminated"]["exitCode"] == 0


def test_a_pod_ended_for_its_deletion_is_no_longer_ready(agent: Agent, api: Api) -> None:
    # As the kubelet says of a pod that ended: Ready and ContainersReady False (PodCompleted), not left True.
    pod = {**_pod("pass"), "status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
        {"type": "Initialized", "status": "True"}]}}
    agent._sync(_deleting(pod, 30))
    said = {c["type"]: (c["status"], c.get("reason")) for c in api.statuses[-1]["conditions"]}
    assert said == {"Ready": ("False", "PodCompleted"), "ContainersReady": ("False", "PodCompleted"),
                    "Initialized": ("True", None)}


def test_a_deleted_pod_whose_end_the_api_cannot_take_holds_up_no_pod_listed_after_it(
        agent: Agent, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # A status the API keeps refusing for a while (a 503 from a webhook) for one deleted pod stopped every relist at
    # it: the pods listed after it never started. It is tried again at the next list, after the others.
    stuck, new = _deleting(_pod("pass"), 30), _pod("pass")
    api.on_terminal = lambda: _raise(ApiError(503, "the server is currently unable to handle the request"))
    api.pods = [stuck, new]
    monkeypatch.setattr(agent_module.time, "sleep", lambda _: agent.stopping.wait(0.05))
    with _watching(agent, api):
        _eventually("the pod listed after it started", lambda: new["metadata"]["uid"] in agent.runners)
        assert api.deleted == []  # and the stuck one is not deleted unended


def test_the_watch_goes_on_while_a_gone_pod_s_folder_is_removed(agent: Agent, api: Api,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A gone pod's folder (an emptyDir of checkpoints: many GB) was removed on the watch's thread: no other pod's
    # event was handled until it was gone. A pod made again under its name keeps its own folder and DNS entry.
    old, new = _pod("pass"), _pod("import time; time.sleep(60)")
    runner = _run(agent, old)
    runner.join(10)  # ended: its folder waits for the pod object to go
    removing, done = threading.Event(), threading.Event()
    remove = agent_module.remove_pod_folders

    def slow_remove(folder: Path) -> None:
        removing.set()
        done.wait()
        remove(folder)

    monkeypatch.setattr(agent_module, "remove_pod_folders", slow_remove)
    api.pods, api.events = [old], [{"type": "DELETED", "object": old}, {"type": "ADDED", "object": new}]
    with _watching(agent, api):
        try:
            _eventually("removal under way", removing.is_set)
            _eventually("start of the pod made again", lambda: new["metadata"]["uid"] in agent.runners)
        finally:
            done.set()
        _eventually("removal of the old folder", lambda: [p.name for p in runner.dir.iterdir()] == ["logs"])
        hosts = agent.runners[new["metadata"]["uid"]].hosts_file
        assert _eventually("new hosts file", hosts.exists) and "\tp\n" in hosts.read_text()


@pytest.mark.parametrize("gone", ["ended", "still stopping", "making its volumes"])
def test_a_pod_made_again_under_a_gone_pod_s_hostname_never_resolves_to_it(agent: Agent, api: Api,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            gone: str) -> None:
    # The next attempt's rank 0 takes the gone one's name in its headless Service (p.web). Were the gone pod's DNS
    # entry removed after the watch went on (on the thread that removes its folders), or only at its runner's end
    # (a pod force-deleted while it runs: up to its grace period), the new pod's hosts file was written naming the
    # gone pod's address first, and a peer connected there. So where its runner, making its volumes as it was
    # forgotten, added its entry back once they were made.
    spec = {"metadata": {"labels": {"app": "web"}}, "hostname": "p", "subdomain": "web",
            "terminationGracePeriodSeconds": 2}
    making, made_volumes = threading.Event(), threading.Event()
    materialize = runner_module.volumes.materialize
    if gone == "making its volumes":
        monkeypatch.setattr(runner_module.volumes, "materialize",
                            lambda *args: making.set() or made_volumes.wait(10) and materialize(*args))
    script = "pass" if gone == "ended" else "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
        "print('ready', flush=True); time.sleep(60)"
    old, new = _pod(script, **spec), _pod("import time; time.sleep(60)", **spec)
    agent.dns.service_event("ADDED", {"metadata": {"namespace": "ns", "name": "web"}, "spec": {
        "selector": {"app": "web"}, "publishNotReadyAddresses": True, "clusterIP": "None"}})
    ending = _run(agent, old)
    if gone == "ended":
        ending.join(10)
        agent.dns.add_pod(old, ending.ip, ending.hosts_file)  # the window between the runner's end and its DNS removal
    elif gone == "still stopping":
        assert _first_line(ending) == "ready"
    else:
        assert making.wait(10)
    written: list[tuple[Path, str]] = []
    write = dns_module._write_in_place
    monkeypatch.setattr(dns_module, "_write_in_place", lambda path, text: written.append((path, text.decode()))
                        or write(path, text))
    remove = agent.dns.remove_pod
    monkeypatch.setattr(agent.dns, "remove_pod", lambda pod: time.sleep(0.5) or remove(pod))
    agent._forget(old)
    made_volumes.set()
    _eventually("the gone pod's volumes made", lambda: gone != "making its volumes" or ending.folders is not None)
    agent._sync(new)
    made = agent.runners[new["metadata"]["uid"]]
    _eventually("the new pod's hosts file", made.hosts_file.exists)
    texts = [text for path, text in written if path == made.hosts_file]
    assert texts and not [text for text in texts if f"{ending.ip}\t" in text]


def test_a_pod_deleted_while_its_volumes_are_made_starts_no_container(agent: Agent, api: Api,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A deletion that came while the pod's volumes were being made: its container was started anyway once they were,
    # with no hosts file to mount (exit 128, 'failed to create the container').
    making, made_volumes = threading.Event(), threading.Event()
    materialize = runner_module.volumes.materialize
    monkeypatch.setattr(runner_module.volumes, "materialize",
                        lambda *args: making.set() or made_volumes.wait(10) and materialize(*args))
    pod = _pod("print('started', flush=True)")
    runner = _run(agent, pod)
    assert making.wait(10)
    agent._sync(_deleting(pod, 30))
    made_volumes.set()
    runner.join(10)
    assert not runner.is_alive() and [c.proc for c in runner.containers] == [None]


def test_a_forgotten_pod_s_hosts_file_is_not_written_again(agent: Agent, api: Api) -> None:
    # A pod forgotten while still among the node's DNS answers (its runner ending meanwhile): a later rewrite of the
    # node's hosts files made its removed folder's hosts file again.
    pod = _pod("pass", metadata={"name": "p", "labels": {"app": "web"}})
    runner = _run(agent, pod)
    runner.join(10)
    agent.dns.add_pod(pod, runner.ip, runner.hosts_file)  # the window between the runner's end and its DNS removal
    agent._forget(pod)
    _eventually("its hosts file removed", lambda: not runner.hosts_file.exists())
    # a Service that selects it changes its answers: every pod's file whose answers changed is written
    agent.dns.service_event("ADDED", {"metadata": {"namespace": "ns", "name": "web"}, "spec": {
        "selector": {"app": "web"}, "publishNotReadyAddresses": True, "clusterIP": "10.96.0.10"}})
    assert not runner.hosts_file.exists()


def test_a_runner_that_fails_while_its_pod_is_deleted_ends_it_failed(agent: Agent, api: Api,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in the runner during a deletion: the pod still ends (Failed) and its deletion is finished; it stayed
    # Terminating with a RunContainerError container, never terminal.
    pod = _pod(WORKER_SCRIPT, container={"args": ["60"]})
    runner = _run(agent, pod)
    worker = int(_first_line(runner))
    try:
        phases_at_delete = _phases_at_delete(api)
        agent._sync(_deleting(pod, 30))  # SIGTERM, which the container ignores
        monkeypatch.setattr(runner_module, "_exit_code", lambda proc, root: _raise(RuntimeError("a bug")))
        runner.join(10)
        assert api.deleted == [pod["metadata"]["uid"]] and phases_at_delete == ["Failed"]
        assert not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_pod_with_a_long_name_runs(agent: Agent, api: Api) -> None:
    # A pod's name may have 253 characters: its folder must still be a valid file name, and its hostname is cut to a
    # hostname's 63 characters, as the kubelet cuts it.
    pod = _pod("import socket; print(socket.gethostname())", metadata={"name": "p" * 240})
    runner = _run(agent, pod)
    runner.join(10)
    assert _state(api, "main")["terminated"]["exitCode"] == 0 and _first_line(runner) == "p" * 63


# Writes to its emptyDir, says so, and runs until deleted.
SCRATCH_SCRIPT = "import time; open('/scratch/x', 'w').close(); print('ready', flush=True); time.sleep(60)"


@pytest.mark.parametrize("gone", ["while it runs", "after it ended"])
def test_a_deleted_pod_s_volumes_and_roots_are_removed_and_its_logs_kept(agent: Agent, api: Api, gone: str) -> None:
    # As a kubelet removes a deleted pod's volumes: its emptyDirs, each run's private /tmp, its Secret, ConfigMap and
    # token files stayed on the node until the next `cluster up`. Its logs stay (tests read them after).
    pod = _pod(SCRATCH_SCRIPT, volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    runner = _run(agent, pod)
    assert _first_line(runner) == "ready" and (runner.dir / "volumes" / "scratch" / "x").exists()
    if gone == "after it ended":
        os.kill(runner.containers[0].proc.pid, signal.SIGKILL)
        runner.join(10)
        agent._forget(pod)  # the pod object is gone
    else:  # the watch sees the pod gone as the runner's final delete lands: what it left is the runner's to remove
        api.on_delete = lambda: agent._forget(pod)
        agent._sync(_deleting(pod, 30))
        runner.join(10)
    _eventually("all but its logs removed", lambda: [p.name for p in runner.dir.iterdir()] == ["logs"])
    assert runner.log_path("main", 0).exists()


def test_a_gone_pod_s_folder_is_removed_before_the_node_exits(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its removal runs on a thread of its own: a node that exited without waiting for it left the folder half removed.
    runner = _run(agent, _pod(SCRATCH_SCRIPT, volumes=[{"name": "scratch", "emptyDir": {}}],
                              container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}))
    assert _first_line(runner) == "ready"
    os.kill(runner.containers[0].proc.pid, signal.SIGKILL)
    runner.join(10)
    remove = agent_module.remove_pod_folders
    monkeypatch.setattr(agent_module, "remove_pod_folders", lambda folder: time.sleep(0.5) or remove(folder))
    agent._forget(runner.pod)
    agent.shutdown(grace_seconds=5)
    assert [p.name for p in runner.dir.iterdir()] == ["logs"]


def test_a_force_deleted_pod_still_stopping_is_stopped_before_the_node_exits(agent: Agent) -> None:
    # Its runner leaves the node's list at the force delete and kills it at the end of its grace period: a node that
    # exited before then left its processes running, on no node.
    runner = _run(agent, _pod("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(120)", terminationGracePeriodSeconds=60))
    assert _first_line(runner) == "ready"
    worker = runner.containers[0].proc.pid
    try:
        agent._forget(_deleting(runner.pod, 0))  # force-deleted: the spec's 60 s
        assert runner.is_alive() and _alive(worker)
        agent.shutdown(grace_seconds=1)
        assert not _alive(worker) and not runner.is_alive()
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_node_s_start_sweeps_the_folders_of_gone_pods_and_keeps_those_of_its_pods(agent: Agent, api: Api) -> None:
    # A node killed (or exiting) before it removed a gone pod's folder left it for good: nothing removes it later. A
    # pod still bound to the node runs again in its folder, its data kept, as through a kubelet's restart.
    live = _pod("import time; print(open('/scratch/kept').read(), flush=True); time.sleep(60)",
                volumes=[{"name": "scratch", "emptyDir": {}}],
                container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    for uid in (live["metadata"]["uid"], "gone"):
        (agent.pods_dir / uid / "volumes" / "scratch").mkdir(parents=True)
        (agent.pods_dir / uid / "volumes" / "scratch" / "kept").write_text("data")
        (agent.pods_dir / uid / "logs" / "main").mkdir(parents=True)
        (agent.pods_dir / uid / "logs" / "main" / "0.log").write_text("")
    api.pods = [live]
    with _watching(agent, api):
        gone = agent.pods_dir / "gone"
        _eventually("the gone pod's folder swept", lambda: [p.name for p in gone.iterdir()] == ["logs"])
        assert (gone / "logs" / "main" / "0.log").exists()
        assert _first_line(_eventually("the pod run again", lambda: agent.runners.get(live["metadata"]["uid"]))) == \
            "data"


def test_a_deleted_pod_s_folder_stays_while_a_process_runs_in_its_roots(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A process the kill did not end (uninterruptible sleep) still has its root, /tmp and volumes: the folder stays.
    (tmp_path / "volumes" / "scratch").mkdir(parents=True)
    monkeypatch.setattr(processes, "processes_in", lambda folder: [os.getpid()])
    runner_module.remove_pod_folders(tmp_path)
    assert (tmp_path / "volumes" / "scratch").exists()


# A container's main process that starts a worker as torch elastic does (in a session of its own), says its pid, and
# exits after argv[1] seconds. Neither heeds SIGTERM: only a SIGKILL ends them.
WORKER_SCRIPT = r"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_a_container_s_processes_end_with_its_main_process(agent: Agent) -> None:
    # As a runtime ends the whole container: a worker left running would go on writing to the pod's volumes.
    runner = _run(agent, _pod(WORKER_SCRIPT, container={"args": ["0"]}))
    worker = int(_first_line(runner))
    try:
        runner.join(10)
        assert not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_sigkill_at_the_end_of_the_grace_period_ends_every_process_of_the_container(agent: Agent, api: Api) -> None:
    pod = _pod(WORKER_SCRIPT, container={"args": ["60"]})
    runner = _run(agent, pod)
    worker = int(_first_line(runner))
    try:
        agent._sync(_deleting(pod, 1))
        runner.join(10)
        assert _state(api, "main")["terminated"]["exitCode"] == 137
        assert not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_runner_that_fails_ends_its_containers(agent: Agent, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in the runner ends it: nothing would reap or stop its containers after.
    runner = _run(agent, _pod(WORKER_SCRIPT, container={"args": ["60"]}))
    worker = int(_first_line(runner))
    main = runner.containers[0].proc.pid
    try:
        monkeypatch.setattr(runner_module, "_exit_code", lambda proc, root: _raise(RuntimeError("a bug")))
        runner.join(10)
        assert _state(api, "main")["waiting"]["reason"] == "RunContainerError"
        assert not _alive(main) and not _alive(worker)
    finally:
        for pid in (main, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class FakeCgroups:
    """The node's cgroups as plain folders (this machine has no writable cgroup v2); Cgroups.remove is the test's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def create(self, name: str, resources: dict) -> Path:
        (self.folder / name).mkdir()
        return self.folder / name


@pytest.fixture
def cgroups(agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Limits enforced with fake cgroups; the cgroups removed, as they are asked to be."""
    removed: list[Path] = []
    agent.cgroups = FakeCgroups(tmp_path)
    monkeypatch.setattr(runner_module.Cgroups, "oom_killed", staticmethod(lambda path: False))
    monkeypatch.setattr(runner_module.Cgroups, "remove", staticmethod(removed.append))
    return removed


def test_a_cgroup_that_will_not_go_leaves_the_container_s_end_right(agent: Agent, api: Api, cgroups: list[Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Busy past the wait (a process in uninterruptible sleep), or no cgroup.kill (Linux before 5.14): the error
    # escaped into the runner's catch-all, and a container that exited 0 showed RunContainerError, its pod never ending.
    monkeypatch.setattr(runner_module.Cgroups, "remove", staticmethod(
        lambda path: _raise(OSError(errno.EBUSY, "Device or resource busy"))))
    runner = _run(agent, _pod("pass"))
    runner.join(10)
    assert api.statuses[-1]["phase"] == "Succeeded" and _state(api, "main")["terminated"]["reason"] == "Completed"


def test_the_cgroup_of_a_container_that_never_started_is_removed_with_its_pod(
        agent: Agent, api: Api, cgroups: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A start refused after its cgroup was made (CreateContainerConfigError, retried) keeps the cgroup for the next
    # try; a deletion meanwhile left it behind.
    monkeypatch.setattr(runner_module.volumes, "container_mounts", lambda pod, spec, folders: _raise(
        runner_module.downward.ConfigError("not yet")))
    pod = _pod("pass")
    runner = _run(agent, pod)
    _eventually("refusal", lambda: (_state(api, "main").get("waiting") or {}).get("message"))
    made = runner.containers[0].cgroup
    agent._sync(_deleting(pod, 30))
    runner.join(10)
    assert made is not None and cgroups == [made]


def test_a_pid_that_left_the_container_s_root_is_not_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between the listing of a container's processes and their SIGKILL, a listed one may end and its pid go to
    # another process, outside the container: that one lives on.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    listings = iter([[other.pid]])
    monkeypatch.setattr(processes, "processes_in", lambda folder: next(listings, []))
    try:
        processes.kill_all(tmp_path)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("end", ["kill_all", "terminate_all"])
def test_more_processes_than_the_open_file_limit_all_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         end: str) -> None:
    """A pidfd held per process ran out of file descriptors past the soft limit (1024 as a rule): kill_all raised
    EMFILE with about half of them running, and terminate_all with all of them, which it then never killed."""
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(60)]
    pids = {c.pid for c in children}
    # The children as a container's processes: listed, and inside while they run (a zombie has no exe).
    monkeypatch.setattr(processes, "processes_in", lambda folder: sorted(pids))
    monkeypatch.setattr(processes, "_inside", lambda pid, folder: pid in pids and os.path.exists(f"/proc/{pid}/exe"))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 30, limits[1]))
    try:
        processes.kill_all(tmp_path) if end == "kill_all" else processes.terminate_all(tmp_path, 1.0)
        assert [c.wait(timeout=5) for c in children] == [-signal.SIGKILL if end == "kill_all" else -signal.SIGTERM] * 60
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        for child in children:
            child.kill()
            child.wait()


# The main process ends on SIGTERM; its child, in its process group, would say if a SIGTERM reached it too.
SIGTERM_SCRIPT = r"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                  "signal.signal(signal.SIGTERM, lambda *_: print('child: SIGTERM', flush=True))\n"
                  "print('ready', flush=True)\n"
                  "time.sleep(60)"]).wait()
"""


def test_deletion_sends_sigterm_to_the_main_process_alone(agent: Agent, api: Api) -> None:
    # As the kubelet asks the runtime: SIGTERM to the container's PID 1, which passes it on as it sees fit (torchrun
    # gives its workers a grace period of its own); what is left when it ends is killed with it.
    pod = _pod(SIGTERM_SCRIPT)
    runner = _run(agent, pod)
    assert _first_line(runner) == "ready"
    agent._sync(_deleting(pod, 30))
    runner.join(10)
    assert _state(api, "main")["terminated"]["exitCode"] == 128 + signal.SIGTERM
    assert "SIGTERM" not in runner.log_path("main", 0).read_text()


# Says when SIGTERM reached it, takes argv[1] seconds to stop (a trainer writing its checkpoint), says so and ends.
TERM_SCRIPT = r"""
import signal, sys, time

def stop(*_):
    print("SIGTERM", flush=True)
    time.sleep(float(sys.argv[1]))
    sys.exit(print("stopped", flush=True))

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("deletion", "spec_grace", "stopping"), [
    pytest.param("grace period 0", None, 3, id="grace period 0: the spec's"),
    pytest.param("force-deleted", None, 3, id="force-deleted: the spec's"),
    pytest.param("grace period 0", 0, 1, id="grace period 0, the spec's too: 2 s"),
])
def test_a_pod_deleted_without_a_grace_period_gets_sigterm_and_time_to_stop(
        agent: Agent, api: Api, deletion: str, spec_grace: int | None, stopping: int) -> None:
    # As the kubelet computes a kill's grace period: a deletion's 0, or a pod gone from the API (force-deleted), gets
    # the spec's terminationGracePeriodSeconds (30 s by default), and none gets under 2 s (minimumGracePeriodInSeconds),
    # SIGTERM first. Without it, torchrun never stopped its workers nor a trainer wrote its checkpoint: SIGKILL came
    # alone, or a tick after SIGTERM. A stop taking longer than 2 s tells the spec's period from the minimum.
    pod = _pod(TERM_SCRIPT, container={"args": [str(stopping)]},
               **({} if spec_grace is None else {"terminationGracePeriodSeconds": spec_grace}))
    runner = _run(agent, pod)
    assert _first_line(runner) == "ready"
    if deletion == "force-deleted":
        agent._forget(_deleting(pod, 0))
    else:
        agent._sync(_deleting(pod, 0))
    runner.join(10)
    assert runner.log_path("main", 0).read_text() == "ready\nSIGTERM\nstopped\n"


def test_a_sub_path_folder_that_cannot_be_given_its_owner_leaves_no_descriptor_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent makes a subPath's missing folders (as the volume's owner) for every container it starts: a descriptor
    # left open at each refusal would add up in a process that runs for days.
    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError("refused")

    monkeypatch.setattr(launcher.os, "fchown", refused)
    open_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        launcher.open_beneath(str(tmp_path), "made", like=tmp_path.stat())
    assert set(os.listdir("/proc/self/fd")) == open_before


# What a container can leave in its emptyDir: a folder, a symlink to it, and a symlink out of the volume (argv[1]).
PLANT_SCRIPT = ("import os, sys; os.mkdir('/scratch/real'); os.symlink('real', '/scratch/inside'); "
                "os.symlink(sys.argv[1], '/scratch/escape')")


def test_a_sub_path_never_leads_out_of_its_volume(agent: Agent, api: Api, tmp_path: Path) -> None:
    # Followed by the node, on the host, a symlink a container made could lead a subPath anywhere, to be made there
    # and mounted writable. The kubelet refuses to create such a container (CreateContainerConfigError), and
    # follows a symlink that stays in the volume.
    outside = tmp_path / "outside"
    outside.mkdir()
    pod = _pod("open('/out/written', 'w').close()", volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/out", "subPath": "inside/made"}]})
    pod["spec"]["initContainers"] = [{"name": "plant", "image": "ignored", "command": [
        "python", "-c", PLANT_SCRIPT, str(outside)], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]
    escape = {"name": "scratch", "mountPath": "/out", "subPath": "escape/x"}
    pod["spec"]["containers"].append(
        {"name": "escape", "image": "ignored", "command": ["python", "-c", "pass"], "volumeMounts": [escape]})
    runner = _run(agent, pod)
    _eventually("refusal", lambda: (_state(api, "escape").get("waiting") or {}).get("message"))
    waiting = _state(api, "escape")["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError" and "'escape/x'" in waiting["message"]
    assert _eventually("end of main", lambda: _state(api, "main").get("terminated"))["exitCode"] == 0
    assert (runner.dir / "volumes" / "scratch" / "real" / "made" / "written").exists()
    assert list(outside.iterdir()) == []


# Reads the file (argv[1]) over and over for argv[3] seconds, then prints how many reads lacked the line argv[2].
READER_SCRIPT = r"""
import sys, time
path, line, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
misses, deadline = 0, time.monotonic() + seconds
print("reading", flush=True)
while time.monotonic() < deadline:
    with open(path) as f:
        misses += line not in f.read().splitlines()
print(misses)
"""


def test_etc_hosts_always_names_the_pod_while_it_is_rewritten(tmp_path: Path) -> None:
    # The kubelet's /etc/hosts always has the pod's own name, which torchrun's rendezvous looks up; here the file
    # changes when a Service comes or goes or a pod turns ready, and a lookup meanwhile must still find it.
    dns = Dns()
    pod = _pod("", metadata={"labels": {"app": "x"}})
    dns.add_pod(pod, "127.9.0.1", tmp_path / "hosts")
    dns.set_services([{"metadata": {"namespace": "ns", "name": "api"}, "spec": {"selector": {"app": "x"}}}])
    reader = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(tmp_path / "hosts"), "127.9.0.1\tp", "0.5"],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "reading\n"
    ready = False
    while reader.poll() is None:  # the Service's line comes and goes
        ready = not ready
        dns.set_ready(pod, ready)
    assert reader.stdout.read() == "0\n"


def test_etc_hosts_holds_no_wrong_address_before_it_is_cut_to_a_shorter_text(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Rewritten in place, the file holds the new text, then whatever is left of the old one, until it is cut to
    # length: a lookup meanwhile must find the new text's addresses and none of the old tail's.
    hosts = tmp_path / "hosts"
    before_cut: list[str] = []

    def watched_open(fd: int, mode: str) -> IO:
        """open(), whose file records what a lookup reads just before the cut."""
        f = open(fd, mode)
        cut = f.truncate

        def truncate(*size: int) -> int:
            f.flush()
            before_cut.append(hosts.read_text())
            return cut(*size)

        f.truncate = truncate
        return f

    dns = Dns()
    pod = _pod("", metadata={"labels": {"app": "x"}})
    dns.add_pod(pod, "127.9.0.1", hosts)
    dns.set_services([{"metadata": {"namespace": "ns", "name": "a-service-of-a-long-name"},
                       "spec": {"selector": {"app": "x"}}}])
    dns.set_ready(pod, True)
    monkeypatch.setattr(dns_module, "open", watched_open, raising=False)
    dns.set_ready(pod, False)  # the Service's line goes
    assert before_cut[-1].split() == hosts.read_text().split()


def test_etc_hosts_is_written_only_where_its_text_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every Service or readiness change on the node reaches every pod's file; one whose text stays is left alone.
    written: list[str] = []

    def counted_open(fd: int, mode: str) -> IO:
        written.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return open(fd, mode)

    dns = Dns()
    served, other = _pod("", metadata={"labels": {"app": "x"}}), _pod("", metadata={"labels": {"app": "y"}})
    dns.add_pod(served, "127.9.0.1", tmp_path / "served")
    dns.add_pod(other, "127.9.0.2", tmp_path / "other")
    dns.set_services([{"metadata": {"namespace": "ns", "name": "api"}, "spec": {"selector": {"app": "x"}}}])
    monkeypatch.setattr(dns_module, "open", counted_open, raising=False)
    dns.set_ready(other, True)  # no Service selects it
    dns.service_event("ADDED", {"metadata": {"namespace": "elsewhere", "name": "db"}, "spec": {"selector": {"a": "b"}}})
    assert written == []
    dns.set_ready(served, True)  # api's line comes to both files
    assert sorted(written) == ["other", "served"]
    assert "api.ns" in (tmp_path / "other").read_text()
