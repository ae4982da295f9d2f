"""The pieces of leader election that need no real apiserver (the rest: test_cluster_leader.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest

from finetune_operator import leader
from operator_fixture import free_port


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not _ipv6(), reason="no IPv6 loopback here"))])
def test_a_standby_answers_healthz_on_the_bind_address_of_either_family(host: str) -> None:
    """bindAddress :: (or an IPv6 pod IP) stopped every operator of the chart at its start: the standby's server was
    IPv4-only."""
    port = free_port()
    with leader._standby_health(host, port):
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200 and response.read() == b"standby\n"
    with pytest.raises(OSError):  # closed, for kopf's own endpoint to take the port
        urllib.request.urlopen(url, timeout=5)


def test_sigterm_stops_a_standby_quietly_and_the_handlers_are_given_back() -> None:
    """As PID 1 (the image's), a process without a SIGTERM handler never gets the signal: a standby ran on through an
    upgrade, took the lease as the active pod stopped, and held the new pods back until its SIGKILL."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, leader.stopped_by_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 0 and signal.getsignal(signal.SIGTERM) is before


class _Apiserver:
    """The Lease's API, held by "a", answering every request with `odd` instead while it is set: a body that is no
    Lease, or an error the client raises. `renewed`: when the read of the last renewal that went through came in (no
    later than its write was sent)."""

    def __init__(self) -> None:
        self.odd: bytes | Exception | None = None
        self.read_at = self.renewed = 0.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> bytes:
        if isinstance(self.odd, Exception):
            raise self.odd
        if self.odd is None:
            if method == "GET":
                self.read_at = time.monotonic()
            else:
                self.renewed = self.read_at
        lease = {"metadata": {"name": "ops", "resourceVersion": "1"}, "spec": {"holderIdentity": "a"}}
        return self.odd or (json.dumps(lease).encode() if method == "GET" else b"{}")


@pytest.mark.parametrize("odd", [b"<html>a proxy's login page</html>", b"[]", RuntimeError("unforeseen")],
                         ids=["not-json", "not-a-lease", "client-error"])
def test_a_leader_whose_renewals_fail_on_an_odd_answer_exits_at_its_deadline(
        odd: bytes | Exception, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A 200 whose body was no Lease (an intercepting proxy's page) raised in the renewing thread, which ended
    quietly: no renewal and no exit, and a standby took the lease 15 s later while this one led on: two leaders."""
    caplog.set_level(logging.INFO)
    apiserver = _Apiserver()
    exits: list[tuple[int, float, float]] = []  # (its code, when, the last renewal then: the thread renews on after)
    monkeypatch.setattr(leader, "os", SimpleNamespace(
        _exit=lambda code: exits.append((code, time.monotonic(), apiserver.renewed))))
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # pytest's own handlers stay open
    lease = leader.Lease(apiserver, "ns", "ops", "a")  # type: ignore[arg-type]
    assert lease.try_hold()
    with leader.leading(lease, retry=0.05, deadline=0.5):
        time.sleep(0.2)  # renewed
        apiserver.odd = odd
        odd_since = time.monotonic()
        while not exits and time.monotonic() < odd_since + 10:
            time.sleep(0.05)
        apiserver.odd = None  # answering again, for the lease to be given up
    assert exits and {code for code, *_ in exits} == {leader.EXIT_LEASE_LOST}, exits
    # Its deadline counts from its last renewal that went through, which a loaded machine may have delayed to well
    # before the odd answers began (measured from those, a stalled renewing thread "exited early", 0.3 s after them):
    # not before the deadline after that renewal, and well within the wait.
    _, exited, renewed = exits[0]
    assert exited - renewed >= 0.5 and exited - odd_since < 5, (exited - renewed, exited - odd_since)
    assert "it was not renewed for 0.5 s" in caplog.text and "gave up the lease" in caplog.text


class _SlowApiserver(_Apiserver):
    """Answers a read `read` seconds late, a write `answer` seconds after it commits; keeps the requests' bounds."""

    def __init__(self, read: float = 0.0, answer: float = 0.0) -> None:
        super().__init__()
        self.read, self.answer = read, answer
        self.bounds: list[float | None] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **options: Any) -> bytes:
        self.bounds.append(options.get("request_timeout"))
        time.sleep(self.read if method == "GET" else 0)
        answer = super().call(method, path, body)
        time.sleep(self.answer if method != "GET" else 0)
        return answer


# Scaled so that a right exit and a wrong one are seconds apart (at a 1 s deadline a thread delayed 0.35 s by a
# loaded machine failed): right, a late answer's exit comes at 3 s (wrong: 4.8), a slow read's at 4.8 (wrong: 3).
@pytest.mark.parametrize(("read", "answer", "exit_after"), [(0.0, 1.8, (2.7, 4.2)), (1.8, 0.0, (4.5, 6.6))],
                         ids=["write-answered-late", "read-slow"])
def test_a_new_leader_counts_its_renewal_deadline_from_the_write_that_took_the_lease(
        read: float, answer: float, exit_after: tuple[float, float], monkeypatch: pytest.MonkeyPatch) -> None:
    """The take's write committed and its answer came late (each request may take up to LEASE_SECONDS): the new
    leader counted its renewal deadline from when it began renewing, and led on, unrenewed, past the time a standby
    (which counts from when it sees the write) took the lease. Counted from the try's start instead, a slow read
    before the write left a healthy new leader no time for its first renewal, and it exited. From the write's
    sending: with no renewal going through, it exits `deadline` after that, and the take's requests are bounded."""
    exits: list[float] = []
    monkeypatch.setattr(leader, "os", SimpleNamespace(_exit=lambda code: exits.append(time.monotonic())))
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    apiserver = _SlowApiserver(read=read, answer=answer)
    lease = leader.Lease(apiserver, "ns", "ops", "a")  # type: ignore[arg-type]
    began = time.monotonic()
    leader.wait_to_lead(lease, "127.0.0.1", 0, retry=0.05, deadline=3.0)
    assert apiserver.bounds and all(b is not None and b <= 3.0 for b in apiserver.bounds)
    apiserver.odd = RuntimeError("unanswered")  # no renewal goes through
    with leader.leading(lease, retry=0.05, deadline=3.0):
        while not exits and time.monotonic() < began + 10:
            time.sleep(0.02)
        apiserver.odd = None
    low, high = exit_after
    assert exits and low < exits[0] - began < high, exits[0] - began


class _HalfOpenOnce(_Apiserver):
    """Answers every request but the `hung`th, which waits out its bound, as a read on a half-open connection does."""

    def __init__(self, hung: int) -> None:
        super().__init__()
        self.hung, self.calls = hung, 0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **options: Any) -> bytes:
        self.calls += 1
        if self.calls == self.hung:
            time.sleep(options["request_timeout"])
            raise TimeoutError("read timed out")
        return super().call(method, path, body)


def test_one_renewal_on_a_half_open_connection_is_dropped_in_time_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each renewal request was bounded by the whole time left to the deadline: one sent on a half-open connection
    (a control-plane node gone without a reset) waited it out, and the leader exited with the apiserver answering
    every other request (scaled: retries every 0.4 s, a deadline of 4 s, a request's bound 0.5 s; at a 2 s deadline
    the renewal after the hung one had 0.7 s to spare, which a loaded machine's stalled thread could use up)."""
    exits: list[int] = []
    monkeypatch.setattr(leader, "os", SimpleNamespace(_exit=exits.append))
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(leader, "REQUEST_SECONDS", 0.5)
    apiserver = _HalfOpenOnce(hung=3)  # the take's read and write, then the first renewal's read
    lease = leader.Lease(apiserver, "ns", "ops", "a")  # type: ignore[arg-type]
    assert lease.try_hold()
    with leader.leading(lease, retry=0.4, deadline=4.0):
        time.sleep(6)  # bounded by the time left instead, the hung request waits out the deadline: an exit at ~4 s
    assert apiserver.calls > 6 and not exits, (apiserver.calls, exits)
