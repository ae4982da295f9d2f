"""Helpers for tests against a real cluster: kubectl/helm runners and waits that show the
cluster's state when they time out."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "local"
sys.path.insert(0, str(LOCAL))
import cluster as local_cluster  # noqa: E402  (deploy/local/cluster.py: the local cluster's folders)

T = TypeVar("T")
OPT_IN = "FTO_TEST_CLUSTER"


class RefusedCluster(Exception):
    """KUBECONFIG names a cluster the tests were not allowed to touch."""


def chosen_kubeconfig(env: Mapping[str, str], local_kubeconfig: Path) -> Path | None:
    """The kubeconfig the tests may use from the environment; None: use the local cluster.

    The tests create namespaces, CRDs and charts, so a KUBECONFIG other than the local
    cluster's own counts only when FTO_TEST_CLUSTER names the cluster its current context uses.
    """
    if "KUBECONFIG" not in env:
        return None
    path = Path(env["KUBECONFIG"])
    if path.resolve() == local_kubeconfig.resolve():
        return None
    try:
        config = yaml.safe_load(path.read_text()) or {}
        context = next(c["context"] for c in config.get("contexts", []) if c["name"] == config.get("current-context"))
        cluster = context["cluster"]
    except (OSError, StopIteration, KeyError, TypeError, yaml.YAMLError) as error:
        raise RefusedCluster(f"KUBECONFIG={path}: cannot tell which cluster it uses ({error!r}); "
                             "unset KUBECONFIG to run the tests on the local cluster") from None
    if env.get(OPT_IN) != cluster:
        raise RefusedCluster(
            f"KUBECONFIG={path} points at cluster {cluster!r}, which the tests did not start; they would "
            f"install CRDs, namespaces and charts there. To use it anyway, set {OPT_IN}={cluster}; to use "
            "the local cluster, unset KUBECONFIG.")
    return path


@dataclass(frozen=True)
class Kube:
    kubeconfig: Path
    bin_dir: Path | None  # the cached kubectl/helm; None: use those on PATH
    cluster_dir: Path | None  # the local cluster's state folder, when this session runs it

    @property
    def audit_log(self) -> Path | None:
        """The apiserver's audit log of ServiceAccounts' requests."""
        return local_cluster.audit_log(self.cluster_dir) if self.cluster_dir else None

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def kubectl_argv(self) -> list[str]:
        return [self._tool("kubectl"), f"--kubeconfig={self.kubeconfig}"]

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.kubectl_argv(), *args],
                                input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self._tool("helm"), f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, manifest: dict | list[dict], namespace: str, *flags: str,
              check: bool = True) -> subprocess.CompletedProcess:
        docs = manifest if isinstance(manifest, list) else [manifest]
        return self.kubectl("apply", "-n", namespace, *flags, "-f", "-", stdin=yaml.safe_dump_all(docs), check=check)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """The object as JSON, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        result = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found", check=False)
        if result.returncode != 0:
            raise AssertionError(f"kubectl get {kind} {name} failed:\n{result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def pod_logs(self, pod: dict) -> str:
        """A process-node pod's container logs (every run's), read from its folder."""
        if self.cluster_dir is None:
            return ""
        folder = local_cluster.pod_roots(self.cluster_dir) / pod["metadata"]["uid"] / "logs"
        return "".join(f"--- {log}\n{log.read_text(errors='replace')[-2000:]}" for log in sorted(folder.glob("*/*.log")))

    def describe(self, namespace: str) -> str:
        """What a person would look at first when a wait fails in this namespace."""
        parts = [self.kubectl("get", "all,pvc,events", "-n", namespace, "-o", "wide", check=False).stdout,
                 self.kubectl("get", "nodes", "-o", "wide", check=False).stdout]
        pods = json.loads(self.kubectl("get", "pods", "-n", namespace, "-o", "json", check=False).stdout or '{"items": []}')
        for pod in pods["items"]:
            parts.append(f"=== pod {pod['metadata']['name']} status:\n{yaml.safe_dump(pod.get('status', {}))}")
            parts.append(self.pod_logs(pod))
        return "\n".join(parts)

    def wait_for(self, description: str, probe: Callable[[], T | None], namespace: str,
                 timeout: float = 60.0) -> T:
        return wait_for(description, probe, lambda: self.describe(namespace), timeout)

    def wait_pod(self, namespace: str, name: str, condition: Callable[[dict], bool], description: str,
                 timeout: float = 60.0) -> dict:
        def probe() -> dict | None:
            pod = self.get("pod", name, namespace)
            return pod if pod is not None and condition(pod) else None
        return self.wait_for(f"pod {namespace}/{name}: {description}", probe, namespace, timeout)


def wait_for(description: str, probe: Callable[[], T | None], show_state: Callable[[], str],
             timeout: float = 60.0, interval: float = 0.25) -> T:
    """Poll `probe` until it returns something truthy; on timeout fail with the state shown."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {description}\n{show_state()}")
        time.sleep(interval)


def terminate(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to a process a test started, then SIGKILL after the grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def phase(pod: dict) -> str:
    return pod.get("status", {}).get("phase", "")


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


@contextmanager
def one_session(state: Path) -> Iterator[None]:
    """Hold `<state>.session` locked while a session uses the cluster folder `state` (beside it: `up` wipes the
    folder); another session fails at once, naming the holder's PID."""
    path = Path(f"{state.resolve()}.session")  # as `up` resolves it: a link to the folder is the same folder
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pytest.exit(f"another test session (pid {lock.read().strip() or '?'}) uses the cluster folder {state}; "
                        "wait for it, or set FTO_CLUSTER_DIR to another folder", returncode=4)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
