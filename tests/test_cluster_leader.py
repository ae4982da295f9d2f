"""One active operator among replicas (operator/finetune_operator/leader.py), on the real apiserver: the Lease's
rules, then two operator processes, the standby taking over when the active one is killed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest.mock import ANY

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import leader, rbac
from finetune_operator.clients import Clients
from fault_servers import FaultServer
from kube import Kube
from operator_fixture import (SERVICE_ACCOUNT, OperatorEnv, crd_installed, free_port, granted,  # noqa: F401
                              kwok_claim, kwok_job, operator_env)

pytestmark = pytest.mark.cluster


def test_the_lease_goes_to_one_and_to_another_once_given_up_or_left_to_expire(kube: Kube, namespace: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))  # the operator reads it first
    clients = Clients(connections=2, timeout=5, retries=False)
    a, b = (leader.Lease(clients, namespace, "ops", who, duration=2) for who in ("a", "b"))
    assert a.try_hold() and not b.try_hold() and b.holder == "a"
    assert a.try_hold() and not b.try_hold()  # renewed: still a's
    a.release()
    assert b.try_hold() and not a.try_hold() and a.holder == "b"  # given up: b at once, and a no more
    spec = kube.get("lease", "ops", namespace)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1 and spec["leaseDurationSeconds"] == 2
    # b stops renewing (a lost node): a takes it once 2 s have passed on a's own clock since it last saw b's renewal.
    seen = a.seen_at
    while not a.try_hold():
        assert time.monotonic() - seen < 10, "the expired lease was not taken"
        time.sleep(0.2)
    assert time.monotonic() - seen >= 2
    assert kube.get("lease", "ops", namespace)["spec"]["holderIdentity"] == "a" and not b.try_hold()


HOLDER = """
import logging, sys, time
from finetune_operator import leader
from finetune_operator.clients import Clients
logging.basicConfig(level=logging.INFO)
lease = leader.Lease(Clients(connections=1, timeout=30, retries=False), sys.argv[1], "ops", "a", duration=30)
assert lease.try_hold()
if len(sys.argv) > 2:  # the apiserver stops answering it: every request from now on goes to a server that hangs
    lease.clients.api.configuration.host = sys.argv[2]
    leader.REQUEST_SECONDS = 30  # a request's own bound far past the deadline: only the deadline can end it in time
print("held", flush=True)
with leader.leading(lease, retry=0.2, deadline=1.0):
    time.sleep(60)
"""


def _holder(kube: Kube, namespace: str, *also: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, namespace, *also], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"KUBECONFIG": str(kube.kubeconfig)})


def test_an_active_operator_that_sees_another_hold_its_lease_exits_at_once(kube: Kube, namespace: str) -> None:
    """Another holds the lease now (it expired while this one was stopped, a long GC pause, a partition): two active
    operators would each write the same jobs' status and children, so this one exits, not waiting out a deadline."""
    holder = _holder(kube, namespace)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        kube.kubectl("patch", "lease", "ops", "-n", namespace, "--type", "merge",
                     "-p", '{"spec": {"holderIdentity": "b", "leaseDurationSeconds": 30}}')
        assert holder.wait(timeout=15) == leader.EXIT_LEASE_LOST
        assert "lost the lease" in (said := holder.stderr.read()) and "it is held by b: exiting" in said
    finally:
        holder.kill()
        holder.wait()


def test_an_active_operator_whose_renewals_hang_exits_by_its_deadline(kube: Kube, namespace: str) -> None:
    """A request that hangs (an apiserver that stopped answering, a link that drops packets) held the renewal past
    its deadline for its whole timeout, while a standby could take the lease: each is bounded by the deadline."""
    with FaultServer("127.0.0.1", 0, "hang") as apiserver:
        holder = _holder(kube, namespace, f"http://127.0.0.1:{apiserver.port}")
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            held = time.monotonic()
            assert holder.wait(timeout=20) == leader.EXIT_LEASE_LOST
            # the deadline is 1 s; each request's own bound 30 s: slack for a loaded machine (at 4 s, 3 s of it, and
            # REQUEST_SECONDS' 3 s bound alone would have passed for the deadline)
            assert time.monotonic() - held < 10
            assert "it was not renewed for 1 s" in holder.stderr.read()
        finally:
            holder.kill()
            holder.wait()


def _log_says(env: OperatorEnv, pattern: str) -> bool:
    return bool(re.search(pattern, env.log.read_text()))


def _metrics(env: OperatorEnv) -> dict[str, float]:
    """The operator's leader gauge and start time, as it serves them."""
    url = f"http://127.0.0.1:{env.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {f.name: f.samples[0].value for f in families
                if f.name in ("finetune_operator_leader", "process_start_time_seconds")}


def _leader_gauge(env: OperatorEnv) -> float | None:
    """finetune_operator_leader as served now; None while a scrape fails (a loaded machine's slow answer)."""
    try:
        return _metrics(env).get("finetune_operator_leader")
    except OSError:
        return None


def _healthz(env: OperatorEnv) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{env.liveness_port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_standby_operator_takes_over_when_the_active_one_is_killed(operator_env: OperatorEnv, tmp_path: Path) -> None:
    first = operator_env
    kube, ns = first.kube, first.namespace
    claim = kwok_claim(ns)
    first.stop()
    lease = ("--lease-namespace", ns, "--lease-name", "finetune-operator")
    first.start(flags=lease)  # before its Role for the Lease: it says so, and is no silent standby
    kube.wait_for("the operator saying it may not take the lease",
                  lambda: _log_says(first, r"WARNING.*cannot take the lease .*: 403 Forbidden"), ns, timeout=60)
    kube.apply([*granted(ns, f"{SERVICE_ACCOUNT}-lease", rbac.lease_rules("finetune-operator")), *claim], ns)
    kube.wait_for("the first operator leading", lambda: _log_says(first, r"leading \(lease"), ns, timeout=60)
    second = OperatorEnv(kube, ns, first.kubeconfig, tmp_path / "second.log", free_port(), free_port())
    second.start(flags=lease)
    try:
        kube.wait_for("the second operator standing by", lambda: _log_says(second, r"standby: the lease"), ns, 60)
        assert _healthz(second), "a standby's /healthz must answer, or the liveness probe restarts it for ever"
        # Its /metrics answers too (a target down would raise alerts), saying it is no active operator: no
        # process_start_time_seconds, which the dashboard would count as a restart.
        assert _metrics(second) == {"finetune_operator_leader": 0.0}
        assert _metrics(first) == {"finetune_operator_leader": 1.0, "process_start_time_seconds": ANY}
        name = first.apply(kwok_job("held", "pvc://kwok-results/held", runs_for="600s"))
        first.wait_ftj(name, lambda o: o.get("status", {}).get("phase") == "Running", "the first operator's job")
        assert not _log_says(second, r"leading \(lease")
        first.kill()  # SIGKILL: no release, so the second waits out the lease (15 s)
        killed = time.monotonic()
        # On the gauge, not the log: "leading (lease" is logged as the lease is taken (leader.wait_to_lead), before
        # metrics.lead() sets finetune_operator_leader (__main__.run), so a scrape just after the line could say 0.
        kube.wait_for("the second operator leading", lambda: _leader_gauge(second) == 1.0, ns, timeout=60)
        assert _log_says(second, r"leading \(lease")
        assert time.monotonic() - killed >= leader.LEASE_SECONDS - leader.RETRY_SECONDS - 1
        assert _metrics(second) == {"finetune_operator_leader": 1.0, "process_start_time_seconds": ANY}
        late = second.apply(kwok_job("late", "pvc://kwok-results/late", runs_for="600s"))
        second.wait_ftj(late, lambda o: o.get("status", {}).get("phase") == "Running", "the second operator's job")
        assert kube.get("lease", "finetune-operator", ns)["spec"]["holderIdentity"].endswith(f"/{second.process.pid}")
        # A standby stops at once on SIGTERM (an upgrade, a scale-down), never taking the lease on its way out.
        third = OperatorEnv(kube, ns, first.kubeconfig, tmp_path / "third.log", free_port(), free_port())
        third.start(flags=lease)
        kube.wait_for("a third operator standing by", lambda: _log_says(third, r"standby: the lease"), ns, 60)
        assert third.process is not None
        third.process.terminate()
        assert third.process.wait(timeout=10) == 0 and _log_says(third, "SIGTERM: stopping")
    finally:
        second.stop()
        kube.kubectl("delete", "pv", claim[0]["metadata"]["name"], "--wait=false", check=False)
    # Stopped cleanly, it gave the lease up: the next one leads at once.
    assert kube.get("lease", "finetune-operator", ns)["spec"].get("holderIdentity") is None
    restarted = len(first.log.read_text())
    first.start(flags=lease)
    # "At once" as the log tells it, not by a clock: a lease not given up would also be taken within a 20 s limit
    # (15 s), and a cold start on a loaded machine can take most of it. Waiting, it would log a standby line first.
    kube.wait_for("a new operator leading", lambda: first.log.read_text().count("leading (lease") == 2, ns,
                  timeout=60)
    assert "standby: the lease" not in first.log.read_text()[restarted:], "the new operator waited as a standby"
