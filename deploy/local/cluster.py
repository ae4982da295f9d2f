"""Start, check and stop the local control plane on loopback.

    python deploy/local/cluster.py up [--state-dir DIR] [--timeout S]
    python deploy/local/cluster.py down [--state-dir DIR]
    python deploy/local/cluster.py status [--state-dir DIR]

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake
GPU nodes) and the process node (real pods as local processes), each as a detached
process whose PID and command line are written to <state>/pids/. It returns once the
cluster is ready, or fails with the component and its log path. `down` stops exactly
those processes and any other recorded there (demo.py's operator; a PID counts only while
it still runs the recorded command line), then
any pod process still running in one of the process node's pod roots. Both hold a lock
on the state folder, so two sessions never start or wipe one cluster at once.
Binaries come from build-binaries.sh's cache; ports are picked free on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script; pki and ports are sibling modules
import pki  # noqa: E402
from ports import free_ports  # noqa: E402
from process_node.network import kwok_cidr  # noqa: E402
from process_node.processes import processes_in, terminate_all  # noqa: E402

REPO = HERE.parents[1]
DEFAULT_STATE = REPO / ".cluster"
SERVICE_CIDR = "10.0.0.0/24"
LOCK = "lock"  # in the state folder; never wiped
POD_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for pod processes the process node left behind
EXEC_PATIENCE = 5.0  # seconds for a started process's exec to show its command line in /proc
# Claims may name folders under these with local.finetune.dev/host-path (`make assets` fills it).
HOST_PATH_ROOTS = [REPO / ".data" / "pvc"]
# Stop order is the reverse: the process node first, so it can end its pods.
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "process-node"]
# The kwok stages we run (v0.8 has none built in), from the kwok module's kustomize/stage.
KWOK_STAGES = [
    "node/fast/node-initialize",
    "node/heartbeat-with-lease/node-heartbeat-with-lease",
    "pod/fast/pod-ready",
    # Job pods succeed 1–5 s after they are ready, or after the pod's annotation
    # pod-complete.stage.kwok.x-k8s.io/delay (and /jitter-delay): a test holds one Running that way.
    "pod/general/pod-complete",
    "pod/fast/pod-delete",
    # Tests make a kwok pod fail with the label
    # pod-container-running-failed.stage.kwok.x-k8s.io=true (exit code etc. via annotations).
    "pod/chaos/pod-container-running-failed",
]


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message names the component and its log."""


@dataclass
class Cluster:
    state: Path
    bin_dir: Path

    @property
    def kubeconfig(self) -> Path:
        return pki.kubeconfig_path(self.state, "admin")

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def export(self) -> str:
        """The shell line that points kubectl (the cached one: a fresh machine has none) at this cluster; quoted, as a
        checkout's path may hold spaces."""
        return f"export KUBECONFIG={shlex.quote(str(self.kubeconfig))} PATH={shlex.quote(str(self.bin_dir))}:$PATH"

    def log(self, component: str) -> Path:
        return self.state / "logs" / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.state / "pids" / f"{component}.pid"

    @property
    def audit_log(self) -> Path:
        return audit_log(self.state)


def bin_dir() -> Path:
    """The cached binaries' directory (build-binaries.sh is the only place that knows it)."""
    out = subprocess.run([str(HERE / "build-binaries.sh"), "--print-bin-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _progress(message: str, started: float) -> None:
    print(f"[cluster +{time.monotonic() - started:5.1f}s] {message}", flush=True)


# ---------------------------------------------------------------- processes

def _record(cluster: Cluster, component: str) -> tuple[int, bytes]:
    """A pid file's PID and command line, as /proc shows it: each argument NUL-terminated (start_process)."""
    pid, recorded = cluster.pid_file(component).read_bytes().split(b"\n", 1)
    return int(pid), recorded


def _read_pid(cluster: Cluster, component: str) -> int | None:
    """The PID we recorded, if that process is still alive and runs the command line we started."""
    try:
        pid, recorded = _record(cluster, component)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    # Guards against PID reuse: the whole command line must match, not just the binary.
    return int(pid) if cmdline == recorded else None


def _cmdline(argv: list[str]) -> bytes:
    """As /proc/<pid>/cmdline shows it: each argument NUL-terminated."""
    return b"".join(a.encode() + b"\0" for a in argv)


def _await_exec(proc: subprocess.Popen, component: str, cmdline: bytes) -> None:
    """Wait until /proc shows `cmdline` for the process (or it exited). Popen returns once the exec can no longer
    fail, before the kernel has set up the new command line: /proc showed it empty then, and `down` right after a start
    that failed part-way took kwok, started a moment before, for another's process, dropped its record and left it
    running. Read only while the child is not reaped, so its PID is no one else's."""
    deadline = time.monotonic() + EXEC_PATIENCE
    while proc.poll() is None and Path(f"/proc/{proc.pid}/cmdline").read_bytes() != cmdline:
        if time.monotonic() > deadline:
            raise ClusterError(f"{component} (pid {proc.pid}) does not show the command line it was started with in "
                               "/proc: `down` could not tell it from another's process")
        time.sleep(0.001)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C meanwhile is raised at the end: inside Popen, once it had forked, it left the child running with no Popen
    to stop it by. Python runs signal handlers in the main thread only, so elsewhere there is none to hold off."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler not set from Python, which could not be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # to the handler it was meant for


def _spawn(cluster: Cluster, component: str, argv: list[str], env: dict[str, str] | None) -> subprocess.Popen:
    try:
        with cluster.log(component).open("ab") as log:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=cluster.state, env=env, start_new_session=True,  # survives `make`'s exit, own group
            )
    except OSError as error:
        raise ClusterError(f"cannot start {component} ({argv[0]}): {error}") from error


def start_process(cluster: Cluster, component: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` detached and record its PID and command line, by which `down` stops it; returns once /proc shows
    that command line. A start that fails after the process began kills it, as nothing else would; Ctrl-C meanwhile
    is raised once it is recorded, for `up`'s cleanup to stop it."""
    cmdline = _cmdline(argv)
    with _sigint_deferred():
        proc = _spawn(cluster, component, argv, env)
        try:
            _await_exec(proc, component, cmdline)
            cluster.pid_file(component).write_bytes(f"{proc.pid}\n".encode() + cmdline)
        except BaseException:
            proc.kill()  # our child, not reaped yet (or reaped, and then no signal is sent): its PID is still its own
            proc.wait()
            raise
    return proc


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it exited meanwhile: that is what we wanted


def _stop(cluster: Cluster, component: str, grace: float = 10.0) -> None:
    pid = _read_pid(cluster, component)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _read_pid(cluster, component) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        if _read_pid(cluster, component) == pid:
            _signal(pid, signal.SIGKILL)
    cluster.pid_file(component).unlink(missing_ok=True)


def audit_log(state: Path) -> Path:
    """What ServiceAccounts outside kube-system asked the apiserver (JSON lines, Metadata level)."""
    return state / "logs" / "audit.log"


def node_state(state: Path) -> Path:
    """The process node's --state-dir."""
    return state / "node"


def pod_roots(state: Path) -> Path:
    """The folder of the process node's pod roots (its agent's pods_dir)."""
    return node_state(state) / "pods"


def pod_processes(state: Path) -> list[int]:
    """Processes whose root is one of the process node's pod roots (children inherit it)."""
    return processes_in(pod_roots(state))


@contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Hold the state folder's lock, or fail saying who holds it."""
    state.mkdir(parents=True, exist_ok=True)
    with (state / LOCK).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ClusterError(f"{state} is in use: cluster.py (pid {lock.read().strip() or '?'}) is starting "
                               "or stopping this cluster; wait for it, or choose another --state-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def running(cluster: Cluster) -> dict[str, int | None]:
    return {c: _read_pid(cluster, c) for c in COMPONENTS}


# ---------------------------------------------------------------- readiness

def open_url(url: str, timeout: float, context: ssl.SSLContext | None = None) -> HTTPResponse:
    """urlopen, bypassing the environment's proxies: every server here is on loopback, which urllib sends to an
    http(s)_proxy that no_proxy does not name (a machine that reaches its package registries through one), and
    `up` timed out on etcd's health. Go's clients (the components, kubectl) never proxy loopback."""
    handlers = urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)


def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with open_url(url, 2, context) as response:
            return response.status == 200
    except (OSError, ssl.SSLError):
        return False


def client_tls(cluster: Cluster, cert: str) -> ssl.SSLContext:
    """TLS to our servers with the cluster CA and the client cert <cert>.crt/.key."""
    context = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    context.load_cert_chain(str(cluster.pki / f"{cert}.crt"), str(cluster.pki / f"{cert}.key"))
    return context


def _self_signed_ok() -> ssl.SSLContext:
    # kcm and the scheduler serve /healthz with a self-signed cert made at start-up.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _wait(cluster: Cluster, what: str, check, procs: dict[str, subprocess.Popen], deadline: float) -> None:
    """Poll `check` until it holds; fail fast if a started process dies, clearly on timeout."""
    while not check():
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = cluster.log(name).read_text(errors="replace").splitlines()[-15:]
                raise ClusterError(
                    f"{name} exited with code {proc.returncode} while waiting for {what}; "
                    f"log: {cluster.log(name)}\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            logs = "\n".join(f"  {c}: {cluster.log(c)}" for c in procs)
            raise ClusterError(f"timed out waiting for {what}; logs:\n{logs}")
        time.sleep(0.2)


def _kubectl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True, text=True)


def _nodes_ready(cluster: Cluster, expected: int) -> bool:
    """Every node Ready and untainted by node-lifecycle, so pods can schedule."""
    out = _kubectl(cluster, "get", "nodes", "-o", "json")
    if out.returncode != 0:
        return False
    nodes = json.loads(out.stdout)["items"]
    ready = [
        n for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        and not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints", []))
    ]
    return len(ready) == expected


# ---------------------------------------------------------------- the components

def _stage_files(cluster: Cluster) -> list[Path]:
    """KWOK_STAGES, as build-binaries.sh copies them next to the binaries."""
    return [cluster.bin_dir.parent / "kwok-stages" / f"{s}.yaml" for s in KWOK_STAGES]


def _kwok_stages(cluster: Cluster) -> Path:
    path = cluster.state / "kwok-stages.yaml"
    path.write_text("---\n".join(stage.read_text() for stage in _stage_files(cluster)))
    return path


def _scheduler_config(cluster: Cluster) -> Path:
    path = cluster.state / "scheduler-config.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(pki.kubeconfig_path(cluster.state, "scheduler"))},
        "leaderElection": {"leaderElect": False},
    }))
    return path


def _audit_policy(cluster: Cluster) -> Path:
    """Record the requests of workloads' ServiceAccounts (an operator's, say), not the control plane's."""
    path = cluster.state / "audit-policy.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                  {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                  {"level": "None"}],
    }))
    return path


def _program(cluster: Cluster, component: str) -> str:
    """What `up` starts as the component now: the cache's binary (its folder names the versions), the venv's python."""
    if component == "process-node":
        return str(venv_python())
    return str(cluster.bin_dir / component)


def venv_python() -> Path:
    """The Python of the project's virtualenv (FTO_VENV: a worktree may use its main checkout's), which runs
    process nodes and, through them, every pod (a folder under /tmp would not be there: pods' /tmp is their own)."""
    return Path(os.environ.get("FTO_VENV", REPO / ".venv")) / "bin" / "python"


def _argvs(cluster: Cluster, ports: dict[str, int]) -> dict[str, list[str]]:
    p, s = cluster.pki, cluster.state
    etcd_url = f"https://127.0.0.1:{ports['etcd']}"
    peer_url = f"https://127.0.0.1:{ports['etcd-peer']}"

    def delegated(identity: str) -> list[str]:
        # kcm and the scheduler check their callers' credentials with the apiserver.
        return [f"--authentication-kubeconfig={pki.kubeconfig_path(s, identity)}",
                f"--authorization-kubeconfig={pki.kubeconfig_path(s, identity)}"]

    return {
        "etcd": [
            _program(cluster, "etcd"), "--name=local", f"--data-dir={s / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=local={peer_url}",
            # TLS only, and only clients with a cert from the cluster CA (the apiserver's).
            f"--cert-file={p / 'etcd.crt'}", f"--key-file={p / 'etcd.key'}",
            "--client-cert-auth", f"--trusted-ca-file={p / 'ca.crt'}",
            f"--peer-cert-file={p / 'etcd.crt'}", f"--peer-key-file={p / 'etcd.key'}",
            "--peer-client-cert-auth", f"--peer-trusted-ca-file={p / 'ca.crt'}",
            "--unsafe-no-fsync",  # a throwaway test cluster: speed over durability
            "--log-level=warn",
        ],
        "kube-apiserver": [
            _program(cluster, "kube-apiserver"), f"--etcd-servers={etcd_url}", f"--etcd-cafile={p / 'ca.crt'}",
            f"--etcd-certfile={p / 'apiserver-etcd-client.crt'}", f"--etcd-keyfile={p / 'apiserver-etcd-client.key'}",
            # Without a default route the apiserver cannot pick an address by itself.
            "--advertise-address=127.0.0.1", "--bind-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--cert-dir={p}", f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # On top of the defaults: PodSecurity (restricted-PSS namespaces) and
            # ExtendedResourceToleration (GPU pods tolerate the GPU nodes' taint).
            "--enable-admission-plugins=NodeRestriction,PodSecurity,ExtendedResourceToleration",
            "--allow-privileged=true",
            # `kubectl logs` goes through the apiserver to the process node's kubelet API.
            "--kubelet-preferred-address-types=InternalIP", f"--kubelet-certificate-authority={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            # The tests compare the operator's requests with its RBAC rules (tests/test_cluster_security.py).
            f"--audit-policy-file={_audit_policy(cluster)}", f"--audit-log-path={cluster.audit_log}",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
        ],
        "kube-controller-manager": [
            _program(cluster, "kube-controller-manager"),
            f"--kubeconfig={pki.kubeconfig_path(s, 'controller-manager')}", *delegated("controller-manager"),
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={ports['kcm']}",
            "--controllers=*",
            # Checks node health each second (default 5 s): new nodes lose their not-ready
            # taint sooner, which is most of the wait after the components answer.
            "--node-monitor-period=1s",
            # A node whose Lease stops is NotReady (and its pods evicted) after 20 s, not 50 s.
            "--node-monitor-grace-period=20s",
            # Each controller acts as its own service account, as in kubeadm clusters.
            "--use-service-account-credentials=true",
            f"--root-ca-file={p / 'ca.crt'}", f"--service-account-private-key-file={p / 'sa.key'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
        ],
        "kube-scheduler": [
            _program(cluster, "kube-scheduler"), f"--config={_scheduler_config(cluster)}", *delegated("scheduler"),
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
        ],
        "kwok": [
            _program(cluster, "kwok"), f"--kubeconfig={cluster.kubeconfig}",
            "--manage-nodes-with-label-selector=finetune.dev/node-kind=kwok",
            f"--config={_kwok_stages(cluster)}", f"--cidr={kwok_cidr(s / 'node')}", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
        "process-node": [
            _program(cluster, "process-node"), "-m", "process_node",
            f"--kubeconfig={pki.kubeconfig_path(s, pki.NODE_NAME)}",
            f"--state-dir={node_state(s)}", f"--node-name={pki.NODE_NAME}",
            f"--tls-cert-file={p / 'kubelet.crt'}", f"--tls-private-key-file={p / 'kubelet.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--provisioner-kubeconfig={pki.kubeconfig_path(s, 'local-path-provisioner')}",
            *(f"--host-path-root={root}" for root in HOST_PATH_ROOTS),
        ],
    }


def _children(state: Path) -> list[Path]:
    return [c for c in state.glob("*") if c.name != LOCK] if state.exists() else []


def _refuse_foreign(state: Path) -> None:
    """`up` wipes its state folder: never one that holds something else than a cluster."""
    if _children(state) and not (state / "pids").is_dir():
        raise ClusterError(f"{state} is not empty and holds no cluster; choose another --state-dir")


def _prepare_state(cluster: Cluster) -> None:
    """A fresh cluster every time, but keep a still-valid PKI so kubeconfig paths stay put."""
    _refuse_foreign(cluster.state)  # again, under the lock: the wipe below must never hit a wrong folder
    children = _children(cluster.state)
    valid = pki.still_valid(cluster.pki)
    for child in children:
        if child.name == "pki" and valid:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    for sub in ("logs", "pids"):
        (cluster.state / sub).mkdir(parents=True, exist_ok=True)
    if not valid:
        pki.make_pki(cluster.pki)
    pki.protect(cluster.pki)  # also a PKI made before files were kept private


@contextmanager
def _owner_only() -> Iterator[None]:
    """Keys, kubeconfigs, logs and etcd's data made meanwhile are the owner's only, and so every file of the
    components started meanwhile (they keep the umask). Restored after: `up` runs inside test sessions and tools,
    whose own files it left owner-only for the rest of the process."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


def up(state: Path = DEFAULT_STATE, timeout: float = 90.0) -> Cluster:
    """Start everything and wait until nodes are Ready; reuse a cluster that already runs."""
    _refuse_foreign(state.resolve())  # before the lock file and the chmod: a folder it refuses is left as it was
    with _owner_only(), _locked(state.resolve()):
        return _up(state.resolve(), timeout)


def _check_prerequisites(cluster: Cluster, euid: int) -> None:
    """What a start needs, checked before it wipes or starts anything: the cache's binaries and kwok stages, the
    openssl command (the PKI), the virtualenv's python (the process node's: without it a start failed half-way), and
    root, as `up` always starts the process node, which runs each pod in its own mount namespace and root, as the
    pod's user."""
    cache = cluster.bin_dir.parent
    needed = [*(cluster.bin_dir / c for c in COMPONENTS[:-1]), *_stage_files(cluster)]
    missing = [str(path.relative_to(cache)) for path in needed if not path.exists()]
    if missing:
        raise ClusterError(f"missing binaries {missing} in {cache}; run `make k8s-binaries` first")
    if shutil.which("openssl") is None:
        raise ClusterError("the openssl command is not on PATH; the cluster's certificates are made with it "
                           "(Debian/Ubuntu: apt-get install openssl)")
    if not venv_python().exists():
        raise ClusterError(f"the process node's python {venv_python()} is missing: run `make install`, or point "
                           "FTO_VENV at another checkout's .venv (a worktree has none of its own)")
    if euid != 0:
        raise ClusterError(f"the process node needs root (unshare, mount, chroot, setresuid) and this runs as uid "
                           f"{euid}: every pod on it would fail with `unshare failed: Operation not permitted`. "
                           "Start the cluster as root.")


def _up(state: Path, timeout: float) -> Cluster:
    started = time.monotonic()
    cluster = Cluster(state=state, bin_dir=bin_dir())
    state.chmod(0o700)
    pids = running(cluster)
    if all(pids.values()):
        _refuse_other_programs(cluster)
        _progress(f"already running; {cluster.export}", started)
        return cluster
    _down(cluster.state)  # leftovers of a half-dead cluster
    _check_prerequisites(cluster, os.geteuid())
    _prepare_state(cluster)
    names = ["etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok"]
    # Outside the ephemeral range (ports.py): kcm, the scheduler and kwok bind theirs after the apiserver opened its
    # connections to etcd, each of which the kernel could have given one of them
    ports = dict(zip(names, free_ports(len(names))))
    server = f"https://127.0.0.1:{ports['apiserver']}"
    pki.write_kubeconfigs(cluster.state, cluster.pki, server)
    (cluster.state / "cluster.json").write_text(json.dumps({"server": server, "ports": ports}, indent=2))
    argvs = _argvs(cluster, ports)
    etcd_tls = client_tls(cluster, "apiserver-etcd-client")
    deadline = started + timeout
    procs: dict[str, subprocess.Popen] = {}

    def launch(*names: str) -> None:
        for name in names:
            env = {**os.environ, "PYTHONPATH": str(HERE)} if name == "process-node" else None
            procs[name] = start_process(cluster, name, argvs[name], env)

    try:
        launch("etcd")
        _wait(cluster, "etcd", lambda: _http_ok(f"https://127.0.0.1:{ports['etcd']}/health", etcd_tls),
              procs, deadline)
        _progress("etcd ready", started)
        launch("kube-apiserver")
        tls = client_tls(cluster, "admin")
        _wait(cluster, "kube-apiserver /readyz", lambda: _http_ok(f"{server}/readyz", tls), procs, deadline)
        _progress("kube-apiserver ready", started)
        # Before the components that need them: the provisioner's RBAC, the StorageClass, kwok's nodes.
        applied = _kubectl(cluster, "apply", "-f", str(HERE / "manifests"))
        if applied.returncode != 0:
            raise ClusterError(f"applying {HERE / 'manifests'} failed:\n{applied.stderr}")
        launch("kube-controller-manager", "kube-scheduler", "kwok", "process-node")
        insecure = _self_signed_ok()
        for name, url in [
            ("kube-controller-manager", f"https://127.0.0.1:{ports['kcm']}/healthz"),
            ("kube-scheduler", f"https://127.0.0.1:{ports['scheduler']}/healthz"),
            ("kwok", f"http://127.0.0.1:{ports['kwok']}/healthz"),
        ]:
            _wait(cluster, name, lambda url=url: _http_ok(url, insecure if url.startswith("https") else None),
                  procs, deadline)
            _progress(f"{name} ready", started)
        _wait(cluster, "3 Ready nodes (process-node, kwok-gpu-0/1)", lambda: _nodes_ready(cluster, 3), procs, deadline)
        _progress("nodes ready and untainted", started)
        _wait(cluster, "the default service account",
              lambda: _kubectl(cluster, "get", "serviceaccount", "default").returncode == 0, procs, deadline)
    except BaseException:
        _down(cluster.state)
        raise
    _progress(f"cluster ready; {cluster.export}", started)
    return cluster


def _refuse_other_programs(cluster: Cluster) -> None:
    """A running cluster is reused only while it runs what `up` would start now: after a change of versions.env,
    the tests would meet the old apiserver and etcd with the new kubectl. It is left running rather than restarted,
    as a restart empties etcd, and whatever someone made on it with it."""
    programs = {c: _record(cluster, c)[1].split(b"\0")[0].decode() for c in COMPONENTS}
    other: dict[str, list[str]] = {}  # folder -> the components run from it
    for c, program in programs.items():
        if not _same_program(cluster, c, Path(program)):
            other.setdefault(str(Path(program).parent), []).append(c)
    if other:
        runs = "; ".join(f"{', '.join(components)} from {folder}" for folder, components in other.items())
        cli = f".venv/bin/python deploy/local/cluster.py {{}} --state-dir {shlex.quote(str(cluster.state))}"
        raise ClusterError(
            f"the cluster in {cluster.state} runs {runs}: not the current binaries in {cluster.bin_dir} "
            f"(versions.env changed?). It is left running; to start it afresh on the current ones, with an empty "
            f"etcd: {cli.format('down')} && {cli.format('up')}")


def _same_program(cluster: Cluster, component: str, program: Path) -> bool:
    """Whether `program` is what `up` would start as the component now. A binary by the cache folder that names its
    versions, not by its path: the same versions cached elsewhere (FTO_K8S_CACHE, another $HOME) are the same."""
    now = Path(_program(cluster, component))
    if component == "process-node":
        return program == now
    return (program.name, program.parent.parent.name) == (now.name, now.parent.parent.name)


def restart(state: Path, component: str, timeout: float = 60.0) -> None:
    """Stop one component (SIGTERM, as a rolling control-plane upgrade does) and start it again on the same
    ports and data, waiting until it answers: for tests of what survives a control-plane restart."""
    if component not in ("etcd", "kube-apiserver"):
        raise ValueError(f"restart supports etcd and kube-apiserver, not {component}")
    with _owner_only(), _locked(state.resolve()):
        cluster = Cluster(state=state.resolve(), bin_dir=bin_dir())
        ports = json.loads((cluster.state / "cluster.json").read_text())["ports"]
        _stop(cluster, component)
        proc = start_process(cluster, component, _argvs(cluster, ports)[component])
        if component == "etcd":
            url, tls = f"https://127.0.0.1:{ports['etcd']}/health", client_tls(cluster, "apiserver-etcd-client")
        else:
            url, tls = f"https://127.0.0.1:{ports['apiserver']}/readyz", client_tls(cluster, "admin")
        _wait(cluster, component, lambda: _http_ok(url, tls), {component: proc}, time.monotonic() + timeout)


def down(state: Path = DEFAULT_STATE) -> None:
    """Stop the processes this state directory's `up` started, newest first, by PID (and any other recorded
    there, as demo.py records its operator), then any pod process the process node left behind."""
    if (state / "pids").exists():
        with _locked(state.resolve()):
            _down(state.resolve())


def _down(state: Path) -> None:
    cluster = Cluster(state=state, bin_dir=Path())
    # First what else was recorded here (demo.py's operator): a client of the components, and a fresh `up` wipes
    # its record.
    others = sorted({path.stem for path in (state / "pids").glob("*.pid")} - set(COMPONENTS))
    for name in [*others, *reversed(COMPONENTS)]:
        _stop(cluster, name)
    stop_pod_processes(state)  # what the process node left running (it was killed, say)


def stop_pod_processes(state: Path) -> None:
    """SIGTERM, then after POD_GRACE SIGKILL, to every process in a pod root of the process node of `state`."""
    terminate_all(pod_roots(state), POD_GRACE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds for `up` to become ready")
    args = parser.parse_args()
    if args.command == "up":
        try:
            up(args.state_dir, args.timeout)
        except ClusterError as error:
            print(f"cluster-up failed: {error}", file=sys.stderr)
            return 1
    elif args.command == "down":
        try:
            down(args.state_dir)
        except ClusterError as error:
            print(f"cluster-down failed: {error}", file=sys.stderr)
            return 1
    else:
        cluster = Cluster(state=args.state_dir.resolve(), bin_dir=Path())
        for component, pid in running(cluster).items():
            print(f"{component:24} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
