"""The local control plane is safe on a person's machine: the tests refuse a cluster they did
not start; `cluster-down` stops only what it recorded (whole command lines), copes with
components that already exited, finds pod processes the node agent left behind, and waits
for no one: a second session on the same state folder is refused while one holds its lock.
`up` reuses a cluster only while it runs the current binaries, and refuses, before it changes
anything, a foreign folder, an incomplete cache, a missing openssl and a user who is not root;
`make demo`'s operator is recorded, and stopped, as the components are."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import LOCAL
from kube import OPT_IN, Kube, RefusedCluster, chosen_kubeconfig, one_session

sys.path.insert(0, str(LOCAL))
import cluster  # noqa: E402  (deploy/local/cluster.py)
import demo  # noqa: E402  (deploy/local/demo.py)


def _kubeconfig(path: Path, cluster_name: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": cluster_name, "cluster": {"server": "https://192.0.2.1:6443"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": cluster_name, "user": "someone"}}],
        "users": [{"name": "someone", "user": {}}]}))
    return path


def test_a_kubeconfig_from_the_environment_is_refused_unless_its_cluster_is_named(tmp_path: Path) -> None:
    local = tmp_path / "local" / "kubeconfig"
    foreign = _kubeconfig(tmp_path / "prod.yaml", "prod-eu")
    assert chosen_kubeconfig({}, local) is None  # no KUBECONFIG: the local cluster
    assert chosen_kubeconfig({"KUBECONFIG": str(local)}, local) is None  # the local cluster's own
    with pytest.raises(RefusedCluster, match=f"set {OPT_IN}=prod-eu"):
        chosen_kubeconfig({"KUBECONFIG": str(foreign)}, local)
    with pytest.raises(RefusedCluster, match="'prod-eu'"):
        chosen_kubeconfig({"KUBECONFIG": str(foreign), OPT_IN: "staging"}, local)
    assert chosen_kubeconfig({"KUBECONFIG": str(foreign), OPT_IN: "prod-eu"}, local) == foreign


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state folder for processes recorded the way `up` records them."""
    for sub in ("logs", "pids"):
        (tmp_path / sub).mkdir()
    return tmp_path


def _record(state: Path, component: str, argv: list[str]) -> subprocess.Popen:
    return cluster.start_process(cluster.Cluster(state, Path()), component, argv)


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def test_down_stops_what_it_recorded_and_copes_with_what_already_exited(state: Path) -> None:
    etcd = _record(state, "etcd", ["sleep", "301"])
    exited = _record(state, "kwok", ["sleep", "0"])
    exited.wait()
    # A reused PID: the scheduler's file names a live process, but not the command it recorded.
    stranger = subprocess.Popen(["sleep", "302"])
    (state / "pids" / "kube-scheduler.pid").write_bytes(f"{stranger.pid}\n".encode() + b"sleep\x00303\x00")
    try:
        cluster.down(state)
        etcd.wait(timeout=5)
        assert _alive(stranger)  # the same binary, another command line: not ours
        assert list((state / "pids").iterdir()) == []
    finally:
        stranger.kill()
        etcd.kill()


def _slow_to_exec(folder: Path) -> Path:
    """A program whose process shows another command line for a while after Popen returned, as one does while the
    kernel ends its exec (/proc shows it empty then): it runs sleep, under its own argv, a moment later."""
    folder.mkdir()
    program = folder / "kwok"
    program.write_text(f"#!{sys.executable}\nimport os, shutil, sys, time\ntime.sleep(0.3)\n"
                       "os.execv(shutil.which('sleep'), sys.argv)\n")
    program.chmod(0o755)
    return program


def test_a_start_that_fails_part_way_leaves_none_of_its_processes_running(state: Path) -> None:
    """A start failed at the process node (a worktree without .venv), and its cleanup left kwok, started a moment
    before, running and unrecorded: kwok's exec had not ended, so /proc showed another command line than its record."""
    local = cluster.Cluster(state, Path())
    kwok = cluster.start_process(local, "kwok", [str(_slow_to_exec(state / "bin")), "315"])
    try:
        with pytest.raises(cluster.ClusterError, match="cannot start process-node"):
            cluster.start_process(local, "process-node", [str(state / "no-venv" / "bin" / "python")])
        cluster.down(state)  # as `up` cleans up after a failed start
        assert kwok.wait(timeout=5) == -signal.SIGTERM
        assert list((state / "pids").iterdir()) == []
    finally:
        kwok.kill()


def _popen_spied(monkeypatch: pytest.MonkeyPatch, then: Callable[[], object] = lambda: None) -> list[subprocess.Popen]:
    """The processes Popen starts from now on: also those whose caller failed before it returned them. `then` runs
    before each Popen returns."""
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> subprocess.Popen:
        started.append(popen(*args, **kwargs))
        then()
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", spy)
    return started


def test_a_start_whose_record_fails_leaves_no_process_running(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process started, then its record not written (the state folder gone, an interrupt): nothing would stop it."""
    started = _popen_spied(monkeypatch)
    monkeypatch.setattr(cluster.Cluster, "pid_file", lambda self, component: state / "gone" / f"{component}.pid")
    try:
        with pytest.raises(FileNotFoundError):
            cluster.start_process(cluster.Cluster(state, Path()), "etcd", ["sleep", "316"])
        assert started[0].wait(timeout=5) == -signal.SIGKILL
    finally:
        for proc in started:
            proc.kill()


def test_an_interrupted_start_leaves_its_process_recorded(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while Popen waited for the exec was raised from inside Popen: its child ran on, with neither a Popen nor a
    record to stop it by."""
    started = _popen_spied(monkeypatch, then=lambda: signal.raise_signal(signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start_process(cluster.Cluster(state, Path()), "etcd", ["sleep", "317"])
        cluster.down(state)  # as `up` cleans up after an interrupted start
        assert started[0].wait(timeout=5) == -signal.SIGTERM
    finally:
        for proc in started:
            proc.kill()


def test_down_stops_pod_processes_the_node_left_behind(state: Path) -> None:
    root = cluster.pod_roots(state) / "pod-uid" / "roots" / "main-0"
    root.mkdir(parents=True)
    # A pod process, as the launcher leaves it: chrooted into its pod's root (its children too).
    orphan = subprocess.Popen([sys.executable, "-c", f"import os, time; os.chroot({str(root)!r}); time.sleep(300)"])
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in cluster.pod_processes(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orphan.pid in cluster.pod_processes(state)
        cluster.down(state)
        assert orphan.wait(timeout=10) == -signal.SIGTERM
    finally:
        orphan.kill()


def test_down_waits_for_pod_processes_without_scanning_proc_again(state: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = state / "node" / "pods" / "pod-uid" / "roots" / "main-0"
    root.mkdir(parents=True)
    # A pod process that takes half a second to end on SIGTERM: the wait for it sleeps on the process, where a scan
    # of /proc at each tick would cost a pass over every process of the machine.
    orphan = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), os._exit(0))); "
        f"os.chroot({str(root)!r}); time.sleep(300)")])
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in cluster.pod_processes(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        scans = 0
        scan = cluster.processes_in

        def counted(folder: Path) -> list[int]:
            nonlocal scans
            scans += 1
            return scan(folder)

        monkeypatch.setattr(cluster, "processes_in", counted)
        monkeypatch.setattr(sys.modules[scan.__module__], "processes_in", counted)
        cluster.down(state)
        assert orphan.wait(timeout=10) == 0
        assert scans <= 2  # one to send SIGTERM, one to find what is left to SIGKILL
    finally:
        orphan.kill()


def test_a_second_session_is_refused_while_one_holds_the_state_folder(state: Path) -> None:
    etcd = _record(state, "etcd", ["sleep", "304"])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('4242'); f.flush(); print('locked', flush=True); time.sleep(60)"), str(state / cluster.LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        down = subprocess.run([sys.executable, str(LOCAL / "cluster.py"), "down", f"--state-dir={state}"],
                              capture_output=True, text=True)
        assert down.returncode == 1 and "is in use" in down.stderr and "4242" in down.stderr
        assert _alive(etcd)
    finally:
        holder.kill()
        holder.wait()
        etcd.kill()
    cluster.down(state)  # the lock is free again
    assert not (state / "pids" / "etcd.pid").exists()


@pytest.mark.cluster
def test_keys_and_credentials_are_owner_only(kube: Kube) -> None:
    state = kube.cluster_dir
    assert state is not None, "needs the local cluster"
    assert (state.stat().st_mode & 0o777) == 0o700
    private = [*(state / "pki").iterdir(), *state.glob("*.kubeconfig"), state / "kubeconfig"]
    loose = [str(p) for p in private if p.stat().st_mode & 0o077]
    assert loose == []
    assert ((state / "node").stat().st_mode & 0o777) == 0o700  # pod folders: secrets, tokens


@pytest.mark.cluster
def test_etcd_serves_only_tls_to_clients_with_a_cluster_cert(kube: Kube) -> None:
    state = kube.cluster_dir
    port = json.loads((state / "cluster.json").read_text())["ports"]["etcd"]
    local = cluster.Cluster(state, Path())

    def health(scheme: str, context: ssl.SSLContext | None) -> str:
        try:
            with cluster.open_url(f"{scheme}://127.0.0.1:{port}/health", 5, context) as r:
                return str(r.status)
        except (OSError, ssl.SSLError) as error:
            return type(error).__name__

    no_client_cert = ssl.create_default_context(cafile=str(state / "pki" / "ca.crt"))
    assert health("http", None) != "200"
    assert health("https", no_client_cert) != "200"
    assert health("https", cluster.client_tls(local, "apiserver-etcd-client")) == "200"


@pytest.mark.cluster
def test_the_process_node_is_held_to_what_a_node_may_do(kube: Kube, namespace: str) -> None:
    state = kube.cluster_dir
    node = [f"--kubeconfig={state / 'process-node.kubeconfig'}"]
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unrelated"}, "stringData": {"k": "v"}},
               namespace)
    whoami = kube.kubectl(*node, "auth", "whoami", "-o", "json")
    assert '"system:node:process-node"' in whoami.stdout and '"system:nodes"' in whoami.stdout
    # The Node authorizer: a secret no pod of this node uses is not the node's to read.
    secret = kube.kubectl(*node, "get", "secret", "unrelated", "-n", namespace, check=False)
    assert secret.returncode != 0 and "Forbidden" in secret.stderr
    # NodeRestriction: a node may change its own Node object only.
    other = kube.kubectl(*node, "label", "node", "kwok-gpu-0", "touched=yes", check=False)
    assert other.returncode != 0 and "Forbidden" in other.stderr


def test_starting_a_cluster_leaves_the_callers_umask_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` makes its keys and logs owner-only through the umask, and left it so for the rest of the process: every
    file a test session wrote after the control plane started was owner-only."""
    monkeypatch.setattr(cluster, "bin_dir", lambda: tmp_path / "no-binaries")
    before = os.umask(0o022)
    try:
        with pytest.raises(cluster.ClusterError, match="missing binaries"):
            cluster.up(tmp_path / "state")
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_a_folder_it_refuses_is_left_as_it_was(tmp_path: Path) -> None:
    """`up --state-dir` on someone's non-empty folder refused, but only after making it 0700 and leaving a `lock`
    file in it."""
    folder = tmp_path / "notes"
    folder.mkdir()
    folder.chmod(0o755)  # whatever the umask
    (folder / "todo.txt").write_text("mine\n")
    with pytest.raises(cluster.ClusterError, match="not empty and holds no cluster"):
        cluster.up(folder)
    assert (folder.stat().st_mode & 0o777) == 0o755
    assert [p.name for p in folder.iterdir()] == ["todo.txt"]


def _cache(folder: Path) -> Path:
    """A binaries' cache whose programs stand in for the real ones: links to sleep, so /proc shows their path."""
    folder.mkdir(parents=True)
    for name in [*cluster.COMPONENTS[:-1], "python"]:
        (folder / name).symlink_to(shutil.which("sleep"))
    return folder


def _record_cluster(state: Path, programs: Path, python: Path | None = None) -> None:
    """Stand-ins run from `programs`, the process node's from `python` (by default there too)."""
    for component in cluster.COMPONENTS:
        program = (python or programs / "python") if component == "process-node" else programs / component
        _record(state, component, [str(program), "310"])


def test_a_cluster_running_other_binaries_is_refused_not_reused(state: Path, tmp_path_factory: pytest.TempPathFactory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """After a version bump (versions.env) `up` reused the cluster that still ran the older cache's binaries: `make
    test` ran the old apiserver and etcd with the new kubectl."""
    old, new = _cache(tmp_path_factory.mktemp("old") / "bin"), _cache(tmp_path_factory.mktemp("new") / "bin")
    monkeypatch.setattr(cluster, "bin_dir", lambda: new)
    monkeypatch.setenv("FTO_VENV", str(new.parent))  # the process node's python: <venv>/bin/python
    try:
        _record_cluster(state, old)
        running = cluster.running(cluster.Cluster(state, Path()))
        with pytest.raises(cluster.ClusterError, match=f"{old}.*{new}.*cluster.py down"):
            cluster.up(state)
        assert cluster.running(cluster.Cluster(state, Path())) == running  # left running: its etcd is someone's
        cluster.down(state)
        _record_cluster(state, new)  # what `up` would start now, on other ports: reused
        assert cluster.up(state).bin_dir == new
        cluster.down(state)
        # The same versions cached elsewhere (another FTO_K8S_CACHE): the cache folder names them, so reused too.
        elsewhere = _cache(tmp_path_factory.mktemp("elsewhere") / new.parent.name / "bin")
        _record_cluster(state, elsewhere, python=new / "python")
        assert cluster.up(state).bin_dir == new
    finally:
        cluster.down(state)


def test_kwok_is_cached_only_with_its_stages(tmp_path: Path) -> None:
    """build-binaries.sh took kwok as cached by its binary alone: after a copy of its stages was cut short it stayed
    so, and every `up` failed reading them."""
    go_offline = {"GOPROXY": "off", "GOTOOLCHAIN": "local", "GOPATH": str(tmp_path / "go"),
                  "GOMODCACHE": str(tmp_path / "go" / "mod"), "GOCACHE": str(tmp_path / "go" / "cache")}
    env = {**os.environ, "FTO_K8S_CACHE": str(tmp_path / "cache"), **go_offline}  # a build fails here, fetches nothing
    script = str(LOCAL / "build-binaries.sh")
    bin_dir = Path(subprocess.run([script, "--print-bin-dir"], env=env, capture_output=True, text=True).stdout.strip())
    bin_dir.mkdir(parents=True)
    for name in [*cluster.COMPONENTS[:-1], "kubectl", "helm"]:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    build = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120)
    cached = [line.split("] ")[1].split()[0] for line in build.stdout.splitlines() if line.endswith(": cached")]
    assert cached == ["kubernetes", "etcd"] and build.returncode != 0  # kwok is built again (and fails offline)


def test_up_names_what_the_cache_lacks_rather_than_crashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With kwok's binary but not its stages, `up` crashed with a FileNotFoundError once it had made the PKI."""
    monkeypatch.setattr(cluster, "bin_dir", lambda: _cache(tmp_path / "cache" / "bin"))
    with pytest.raises(cluster.ClusterError, match="missing binaries.*kwok-stages/node/fast.*make k8s-binaries"):
        cluster.up(tmp_path / "state")


def _full_cache(folder: Path) -> Path:
    bin_dir = _cache(folder)
    for stage in cluster._stage_files(cluster.Cluster(Path(), bin_dir)):
        stage.parent.mkdir(parents=True, exist_ok=True)
        stage.touch()
    return bin_dir


def test_up_says_it_needs_openssl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the openssl command `up` crashed with a FileNotFoundError from deep in making the PKI."""
    bin_dir = _full_cache(tmp_path / "cache" / "bin")
    monkeypatch.setattr(cluster, "bin_dir", lambda: bin_dir)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(cluster.ClusterError, match="openssl command is not on PATH"):
        cluster.up(tmp_path / "state")


def test_up_says_it_needs_the_virtualenv_s_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a worktree without .venv, `up` started etcd, the apiserver, kcm, the scheduler and kwok, then failed to
    start the process node."""
    ready = cluster.Cluster(tmp_path / "state", _full_cache(tmp_path / "cache" / "bin"))
    monkeypatch.setenv("FTO_VENV", str(tmp_path / "no-venv"))
    with pytest.raises(cluster.ClusterError, match="no-venv/bin/python is missing.*make install.*FTO_VENV"):
        cluster._check_prerequisites(ready, euid=0)


def test_up_refuses_to_start_a_process_node_that_is_not_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not as root, the cluster came up and then every pod on the process node failed: `unshare failed: Operation not
    permitted`."""
    ready = cluster.Cluster(tmp_path / "state", _full_cache(tmp_path / "cache" / "bin"))
    monkeypatch.setenv("FTO_VENV", str(ready.bin_dir.parent))  # its python: <venv>/bin/python
    with pytest.raises(cluster.ClusterError, match="uid 1000.*Operation not permitted.*as root"):
        cluster._check_prerequisites(ready, euid=1000)
    cluster._check_prerequisites(ready, euid=0)


def test_down_stops_the_operator_make_demo_started(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """demo.py kept its operator's PID beside pids/: `down` left the operator running, and the next `up` wiped the
    file, so nothing knew of it any more."""
    operator = _record(state, demo.OPERATOR, ["sleep", "311"])  # as demo.start_operator records it
    try:
        assert cluster._read_pid(cluster.Cluster(state, Path()), demo.OPERATOR) == operator.pid  # no real one starts
        demo.start_operator(cluster.Cluster(state, Path()))
        assert capsys.readouterr().out == f"operator already running (pid {operator.pid})\n"
        cluster.down(state)
        assert operator.wait(timeout=5) == -signal.SIGTERM
        assert list((state / "pids").iterdir()) == []
    finally:
        operator.kill()


def test_the_demo_stops_its_own_operator_only_and_for_good(state: Path) -> None:
    """`demo.py stop` signalled any process whose command line held "finetune_operator" (after PID reuse, another
    worktree's or a test's operator), and dropped its record of an operator that ignored SIGTERM."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(313)", "finetune_operator"])
    record = state / "pids" / f"{demo.OPERATOR}.pid"
    record.write_bytes(f"{stranger.pid}\n".encode() + b"python\0-m\0finetune_operator\0")
    try:
        demo.stop_operator(state)
        assert _alive(stranger) and not record.exists()
    finally:
        stranger.kill()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the child inherits it, across exec too
    try:
        stubborn = _record(state, demo.OPERATOR, ["sleep", "314"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        demo.stop_operator(state, grace=0.2)
        assert stubborn.wait(timeout=5) == -signal.SIGKILL and not record.exists()
    finally:
        stubborn.kill()


def test_readiness_checks_bypass_the_environment_s_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an http(s)_proxy in the environment (a machine that reaches its registries through one), urllib sent
    etcd's and the apiserver's health checks on loopback to it, and `up` timed out waiting for etcd."""
    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.setattr(urllib.request, "_opener", None)  # not the tests' own (conftest): cluster.py's alone
        assert cluster._http_ok(f"http://127.0.0.1:{server.server_port}/health", None)
    finally:
        server.shutdown()
        server.server_close()


def test_a_second_test_session_on_a_cluster_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two sessions on one folder: the second took the first's running cluster as one to leave up, and the first
    stopped it, at its end, under the second's tests."""
    state = tmp_path / "cluster"
    with one_session(state):
        with pytest.raises(pytest.exit.Exception, match=f"another test session \\(pid {os.getpid()}\\) uses"):
            with one_session(state):
                pass
    with one_session(state):  # free again once the first is over
        pass
    (tmp_path / "link").symlink_to(state)
    with one_session(state):  # and the same folder through a link is the same folder
        with pytest.raises(pytest.exit.Exception, match="another test session"):
            with one_session(tmp_path / "link"):
                pass
