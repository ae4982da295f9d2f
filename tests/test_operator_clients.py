"""The operator's API calls: the paths it builds, and the kubernetes client's generated API classes kept out of
its memory (the calls themselves run against the real apiserver in test_cluster_operator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import kopf
import pytest
import urllib3
import yaml
from kubernetes.config import incluster_config, kube_config

from fault_servers import FaultServer, serving
from finetune_operator import api, clients, handlers, reconcile
from finetune_operator.settings import Settings
from kubernetes.client.exceptions import ApiException
from finetune_operator.clients import api_path
from operator_fixture import free_port


def test_the_paths_are_the_apiservers() -> None:
    assert api_path("team-a", "events") == "/api/v1/namespaces/team-a/events"
    assert api_path("team-a", "persistentvolumeclaims", "data") == "/api/v1/namespaces/team-a/persistentvolumeclaims/data"
    assert api_path("team-a", "jobs", "ft-1", group="batch") == "/apis/batch/v1/namespaces/team-a/jobs/ft-1"
    assert api_path("team-a", api.PLURAL, "ft", group=api.GROUP, version=api.VERSION) == \
        "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/ft"


def test_the_generated_api_classes_are_never_imported() -> None:
    """In a fresh interpreter: CoreV1Api alone cost the operator ~21 MB."""
    code = ("import sys; import finetune_operator.handlers, finetune_operator.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _kubeconfig(path: Path, server: str, name: str = "c") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {"token": "t"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}))
    return path


@pytest.fixture
def in_a_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A pod's ServiceAccount as the kubernetes client finds it: the Service's env, the token and the CA (their files
    here, not under /var/run/secrets). The pod's cluster's address."""
    (tmp_path / "token").write_text("pod-token")
    (tmp_path / "ca.crt").write_text("a CA")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return "https://10.96.0.1:443"


def test_a_kubeconfig_named_in_a_pod_is_the_cluster_the_operator_works_on(
        in_a_pod: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As controller-runtime's operators do: $KUBECONFIG before the pod's ServiceAccount, for the handlers' calls and
    kopf's watches alike. The kubernetes client's order (and kopf's login through it) took the pod's own cluster: a
    test run in a CI pod worked on the CI's cluster with the pod's token."""
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:6443")))
    assert clients.Clients(connections=1).api.configuration.host == "https://127.0.0.1:6443"
    info = handlers._connection(kopf.OperatorSettings())
    assert (info.server, info.scheme.lower(), info.token) == ("https://127.0.0.1:6443", "bearer", "t")


def test_without_a_kubeconfig_a_pod_works_on_its_own_cluster(in_a_pod: str) -> None:
    assert clients.Clients(connections=1).api.configuration.host == in_a_pod
    info = handlers._connection(kopf.OperatorSettings())
    assert (info.server, info.scheme.lower(), info.token) == (in_a_pod, "bearer", "pod-token")


def test_no_credentials_stop_the_login_saying_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(kopf.LoginError, match="no Kubernetes credentials"):
        handlers._connection(kopf.OperatorSettings())


def test_an_empty_kubeconfig_variable_names_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`KUBECONFIG=` as kubectl reads it: ~/.kube/config. The client's default was the variable's value at import."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", "")  # as the variable was at import
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()
    _kubeconfig(tmp_path / ".kube" / "config", "https://127.0.0.1:7443")
    assert clients.Clients(connections=1).api.configuration.host == "https://127.0.0.1:7443"


def test_several_kubeconfigs_take_the_first_current_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`KUBECONFIG=a:b` as kubectl merges it: the first file that sets a current-context decides (a later empty one
    does not). The kubernetes client's merger took the last file's: the operator worked on another cluster than
    `kubectl` with the same variable."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    first = _kubeconfig(tmp_path / "first", "https://127.0.0.1:6443", name="first")
    second = _kubeconfig(tmp_path / "second", "https://127.0.0.1:7443", name="second")
    unset = tmp_path / "unset"
    unset.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": ""}))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{unset}:{first}:{second}")
    assert clients.Clients(connections=1).api.configuration.host == "https://127.0.0.1:6443"
    assert handlers._connection(kopf.OperatorSettings()).server == "https://127.0.0.1:6443"
    monkeypatch.setenv("KUBECONFIG", f"{second}:{first}")
    assert clients.Clients(connections=1).api.configuration.host == "https://127.0.0.1:7443"


def test_unchanged_credentials_log_in_again_a_few_times_then_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf logs in again after a 401 or a TLS hiccup that closed the session. A few times, unchanged credentials get a
    new session (an authenticator restarting with the apiserver); then the old one, which kopf refuses as it refuses
    equal credentials (a revoked token), and stops. A new session each time: kopf logged in again for ever."""
    import asyncio

    from finetune_operator.settings import Settings

    token = "a"
    monkeypatch.setattr(handlers, "UNCHANGED_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(handlers, "_connection",
                        lambda _: kopf.ConnectionInfo(server="https://127.0.0.1:6443", token=token))

    async def logins(tokens: str) -> list[kopf.AiohttpSession]:
        memo, found = kopf.Memo(settings=Settings()), []
        for found_token in tokens:
            nonlocal token
            token = found_token
            found.append(await handlers.login(memo=memo, settings=kopf.OperatorSettings()))
        for session in {id(s): s for s in found}.values():
            await session.aiohttp_session.close()
        return found

    found = asyncio.run(logins("a" * (handlers.UNCHANGED_LOGINS + 2) + "b"))
    assert len({id(s) for s in found[:-2]}) == handlers.UNCHANGED_LOGINS + 1  # a new one each time, until
    assert found[-2] is found[-3]  # the same again: refused
    assert found[-1] is not found[-2]  # new credentials (a rotated token), a new session


def test_a_login_that_keeps_failing_stops_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried LOGIN_TRIES times, then kopf's authentication fails, which ends the operator; retried without end, the
    login failed every minute for ever."""
    import asyncio

    from kopf._core.engines.activities import ActivityError, authenticate
    from kopf._core.engines.indexing import OperatorIndexers
    from kopf._cogs.structs.credentials import Vault

    from finetune_operator.settings import Settings

    tries: list[float] = []

    def refused(_: kopf.OperatorSettings) -> kopf.ConnectionInfo:
        tries.append(time.monotonic())
        raise kopf.LoginError("no Kubernetes credentials")

    monkeypatch.setattr(handlers, "_connection", refused)
    monkeypatch.setattr(handlers, "LOGIN_BACKOFF_SECONDS", 0.1)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Settings())

    async def logging_in() -> None:
        await asyncio.wait_for(authenticate(registry=registry, settings=kopf.OperatorSettings(),
                                            indices=OperatorIndexers().indices, vault=Vault(),
                                            memo=kopf.Memo(settings=Settings())), timeout=10)

    with pytest.raises(ActivityError):
        asyncio.run(logging_in())
    assert len(tries) == handlers.LOGIN_TRIES


def test_a_message_nested_to_the_parsers_limit_is_none() -> None:
    """Parsed, then written again to read lone surrogates as the apiserver does: a frame or two deeper, a message
    the parser took raised RecursionError, and the pod was left out of kopf's index."""
    from finetune_operator import outcome

    for depth in range(900, 1000):
        assert isinstance(outcome.parse_message('{"a": ' + "[" * depth + "]" * depth + "}"), dict)
    assert outcome.parse_message('{"a": ' + "[" * 5000 + "]" * 5000 + "}") == {}


@pytest.fixture
def apiserver_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A free local port the kubernetes client takes for the apiserver's."""
    port = free_port()
    # $KUBECONFIG, which the operator reads first: the session's kube fixture sets it to the local cluster's
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")))
    return port


def test_an_apiserver_that_never_answers_fails_the_call_instead_of_hanging_it(apiserver_port: int,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection the apiserver end dropped silently (a replaced apiserver, a NAT timeout) never answers: without
    a timeout the handler thread waits for ever, holding the namespace's Warnings lock and a thread of kopf's pool."""
    monkeypatch.setattr(clients, "REQUEST_TIMEOUT_SECONDS", 0.5)
    started = time.monotonic()
    with FaultServer("127.0.0.1", apiserver_port, "hang"), pytest.raises(urllib3.exceptions.HTTPError):
        clients.Clients(connections=1).call("GET", api_path("team-a", "events"))
    assert time.monotonic() - started < 10


def test_a_call_without_an_answer_is_tried_once_more_and_a_retry_after_is_slept_2_s_at_most(
        apiserver_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3's default tried a GET that timed out 4 times (2 min of a handler thread at the 30 s timeout), and slept
    a 503's or a 429's Retry-After 3 times within one call, outside its timeout: a proxy saying `Retry-After: 600`
    held the thread, and the namespace's Warnings lock, for half an hour. Tried once more, after 2 s at most."""
    monkeypatch.setattr(clients, "REQUEST_TIMEOUT_SECONDS", 0.5)
    with FaultServer("127.0.0.1", apiserver_port, "hang") as server, pytest.raises(urllib3.exceptions.HTTPError):
        clients.Clients(connections=1).call("GET", api_path("team-a", "events"))
    assert server.connections == 2
    with FaultServer("127.0.0.1", apiserver_port, "unavailable") as server, pytest.raises(ApiException) as raised:
        clients.Clients(connections=1).call("GET", api_path("team-a", "events"))
    assert raised.value.status == 503 and server.connections == 2
    slept = server.accepted[1] - server.accepted[0]
    assert 1.5 < slept < 5, slept  # its Retry-After of 600 s slept 2 s (the cap): slack for a loaded machine


def test_a_claim_or_a_child_the_apiserver_did_not_answer_for_holds_the_attempt_back_saying_so(
        apiserver_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout, a refused connection or a proxy's page (no JSON) escaped the tick as an error: a new job had no
    status at all while it lasted, and each tick logged a traceback and counted a reconcile error."""
    from test_operator_reconcile import body

    monkeypatch.setattr(clients, "REQUEST_TIMEOUT_SECONDS", 0.5)
    job = body()
    spec, _ = reconcile.parse_spec(job)
    for behaviour in ("hang", serving(b"<html>a proxy's page</html>")):
        with FaultServer("127.0.0.1", apiserver_port, behaviour):
            api = clients.Clients(connections=1)
            with pytest.raises(handlers.HeldBack) as held:
                handlers.Claims().get(api, "team-a", "data")
            assert held.value.reason == "CreateFailed" and "the claim data could not be read" in str(held.value)
    with FaultServer("127.0.0.1", apiserver_port, "hang"), pytest.raises(handlers.HeldBack) as held:
        handlers._create_attempt(clients.Clients(connections=1), job, spec, 1, Settings())
    assert held.value.reason == "CreateFailed" and "the apiserver did not answer" in str(held.value)


@pytest.mark.timeout(60)
def test_an_apiserver_that_never_answers_at_start_keeps_every_namespace_quickly(apiserver_port: int) -> None:
    """The probe for forbidden namespaces runs before kopf serves /healthz: with the request's 30 s timeout and
    urllib3's 3 retries for each namespace in turn, an apiserver that timed out held the operator's start for minutes,
    and its liveness probe killed it. One short try now, and the first failure ends the probing."""
    namespaces = ("team-a", "team-b", "team-c")
    started = time.monotonic()
    with FaultServer("127.0.0.1", apiserver_port, "hang"):
        assert handlers.watchable(namespaces) == namespaces
    assert time.monotonic() - started < 2 * handlers.PROBE_TIMEOUT_SECONDS


def test_the_waits_for_rbac_to_arrive_are_paid_once_for_all_namespaces(apiserver_port: int) -> None:
    """Each forbidden namespace was retried after 1 s and 2 s in turn: with a fresh install's Roles not there yet in
    ten namespaces, the operator's start waited 30 s before kopf served /healthz."""
    namespaces = tuple(f"team-{i}" for i in range(10))
    started = time.monotonic()
    with FaultServer("127.0.0.1", apiserver_port, "forbidden"):
        assert handlers.watchable(namespaces) == namespaces  # none readable: all kept, for kopf to retry
    # 3 s of waits, paid once (each namespace's own: 30 s); slack for a loaded machine
    assert time.monotonic() - started < sum(handlers.FORBIDDEN_RETRIES) + 10


def test_a_namespace_left_out_stops_the_operator_once_it_may_be_read(apiserver_port: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf cannot add a watch: a namespace left out at the start (its Role gone with it) went unobserved after its
    Role came back (`helm upgrade` once the namespace was made again) until someone restarted the operator."""
    monkeypatch.setattr(handlers, "READABLE_CHECK_SECONDS", 0.1)
    stop = threading.Event()
    with FaultServer("127.0.0.1", apiserver_port, "forbidden"):
        handlers.stop_once_readable(("team-b",), stop.set)
        assert not stop.wait(1.0)
    with FaultServer("127.0.0.1", apiserver_port, serving(b'{"items": []}')):
        assert stop.wait(5.0)


def test_logging_in_leaves_the_event_loop_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig's exec plugin (a cloud's token command) takes seconds: run on the event loop, kopf's login held
    up every watch, probe and timer that long."""
    import asyncio

    from finetune_operator.settings import Settings

    ticks = [0]

    def slow_login(_: kopf.OperatorSettings) -> kopf.ConnectionInfo:
        # Until the loop has ticked 20 times (10 s at most): a fixed 0.5 s left a loaded machine's loop too few ticks
        # to count, and on the loop itself the login would see none.
        until = time.monotonic() + 10
        while ticks[0] < 20 and time.monotonic() < until:
            time.sleep(0.01)
        return kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t")

    async def logging_in() -> int:
        async def ticking() -> None:
            while True:
                await asyncio.sleep(0.01)
                ticks[0] += 1

        ticker = asyncio.create_task(ticking())
        memo = kopf.Memo(settings=Settings())
        session = await handlers.login(memo=memo, settings=kopf.OperatorSettings(), logger=None)
        ticker.cancel()
        assert session is not None and session.server == "https://127.0.0.1:6443"
        await session.aiohttp_session.close()
        return ticks[0]

    monkeypatch.setattr(handlers, "_connection", slow_login)
    assert asyncio.run(logging_in()) >= 20  # ticked while the login waited for it


def test_an_operator_started_where_the_crd_is_not_served_waits_then_exits_saying_so(
        apiserver_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """kopf finds the resources it watches once, at its start: started before the CRD was served (`helm install
    --skip-crds`, a GitOps sync out of order), or restarted after its deletion, the operator watched Jobs and pods
    and never a FineTuneJob, for good, while /healthz answered and it held the Lease."""
    discovery = {"kind": "APIResourceList", "groupVersion": f"{api.GROUP}/{api.VERSION}", "resources": []}
    with FaultServer("127.0.0.1", apiserver_port, "not-found"):
        assert handlers.crd_served(clients.Clients(connections=1)) is False
    with FaultServer("127.0.0.1", apiserver_port, serving(json.dumps(discovery).encode())):
        assert handlers.crd_served(clients.Clients(connections=1)) is False  # the group, another version's CRD
    discovery["resources"] = [{"name": api.PLURAL, "namespaced": True, "kind": api.KIND}]
    with FaultServer("127.0.0.1", apiserver_port, serving(json.dumps(discovery).encode())):
        assert handlers.crd_served(clients.Clients(connections=1)) is True
        assert handlers.wait_for_crd()
    monkeypatch.setattr(clients, "REQUEST_TIMEOUT_SECONDS", 0.5)
    with FaultServer("127.0.0.1", apiserver_port, "hang"):  # not said: kopf's to retry
        assert handlers.crd_served(clients.Clients(connections=1)) is None
    # The command itself, as its pod runs it: it exits 1, saying what to install, once the wait is over.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), FINETUNE_OPERATOR_METRICS_PORT="0",
               FINETUNE_OPERATOR_LIVENESS_PORT=str(free_port()))
    script = ("import sys; from finetune_operator import handlers, __main__ as m; handlers.CRD_WAIT_SECONDS = 2; "
              "sys.argv = ['finetune-operator', 'run']; sys.exit(m.main())")
    with FaultServer("127.0.0.1", apiserver_port, "not-found"):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30, done.stderr
    assert f"does not serve {api.PLURAL}.{api.GROUP}/{api.VERSION}" in done.stderr and "crds/" in done.stderr
