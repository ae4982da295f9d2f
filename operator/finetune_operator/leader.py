"""One active operator among replicas: a coordination.k8s.io Lease, held while it is renewed.

client-go's leader election, on the operator's own Clients (the kubernetes client's is a loop of blocking sleeps
that never gives the lease back, through the generated API classes the operator does not import): a standby takes
the lease once its holder gave it up (a clean exit) or has not renewed it for LEASE_SECONDS, as measured on the
standby's own clock from when it last saw the lease change (the two clocks need not agree). A leader stops at once
when it sees another holder, and when no renewal of its own has committed within RENEW_DEADLINE_SECONDS: every
request of a renewal is bounded by that deadline, so it cannot run on past it while a slow request hangs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator.clients import Clients, api_path

log = logging.getLogger("finetune_operator")

LEASE_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_SECONDS = 2
# One request's bound within the renewal's deadline: a renewal sent on a half-open connection (an apiserver's node
# gone without a reset) waited out the whole deadline, and the leader exited with the apiserver reachable.
REQUEST_SECONDS = 3.0
EXIT_LEASE_LOST = 1
LEASES = "coordination.k8s.io"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease(answer: bytes) -> dict[str, Any]:
    """The Lease an answer carries; ValueError for any other body (a 200 from an intercepting proxy: its page)."""
    lease = json.loads(answer)
    if not isinstance(lease, dict) or not isinstance(lease.get("spec") or {}, dict):
        raise ValueError(f"not a Lease: {answer[:80]!r}")
    return lease


class Lease:
    """The Lease `namespace/name`, tried for by `identity`."""

    def __init__(self, clients: Clients, namespace: str, name: str, identity: str,
                 duration: int = LEASE_SECONDS) -> None:
        self.clients, self.namespace, self.name, self.identity, self.duration = clients, namespace, name, identity, duration
        self.path = api_path(namespace, "leases", name, group=LEASES)
        self.holder: str | None = None  # as last seen
        self.error: str | None = None  # why the last try could not read or write it, if it could not
        self.seen: tuple[Any, ...] | None = None  # the holder's record as last seen
        self.seen_at = 0.0  # when it was first seen so (monotonic)
        self.sent = 0.0  # when its last write was sent (monotonic): the earliest that write may have committed

    def try_hold(self, by: float | None = None) -> bool:
        """Take the lease or renew it: one try, True when this identity holds it now. `by`: a monotonic time that
        neither request runs past."""
        try:
            lease = _lease(self._call("GET", self.path, by))
        except ApiException as exc:
            if exc.status != 404:
                return self._failed(exc)
            lease = {"apiVersion": f"{LEASES}/v1", "kind": "Lease",
                     "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec({}, taken=True)}
            return self._write("POST", api_path(self.namespace, "leases", group=LEASES), lease, by)
        except (urllib3.exceptions.HTTPError, TimeoutError, ValueError) as exc:
            return self._failed(exc)
        spec = lease.get("spec") or {}
        self.holder = spec.get("holderIdentity") or None
        record = (self.holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self.seen:
            self.seen, self.seen_at = record, time.monotonic()
        ours = self.holder == self.identity
        if self.holder and not ours and time.monotonic() < self.seen_at + (record[2] or self.duration):
            self.error = None
            return False
        lease["spec"] = self._spec(spec, taken=not ours)
        return self._write("PUT", self.path, lease, by)  # with its resourceVersion: of two standbys at once, one wins

    def renew(self, by: float) -> bool:
        """try_hold for the leader's renewing thread, which must not end: any error is a failed try, logged, and left
        to the renewal's deadline. An error that ended the thread ended the renewals while the operator led on, and a
        standby took the lease LEASE_SECONDS later: two leaders."""
        try:
            return self.try_hold(by)
        except Exception as exc:  # noqa: BLE001 (any: see above)
            log.warning("finetune-operator: renewing the lease %s/%s failed", self.namespace, self.name, exc_info=exc)
            return self._failed(exc)

    def _call(self, method: str, path: str, by: float | None, body: dict[str, Any] | None = None) -> bytes:
        left = None if by is None else by - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("the renewal's deadline has passed")
        return self.clients.call(method, path, body,
                                 request_timeout=REQUEST_SECONDS if left is None else min(left, REQUEST_SECONDS))

    def _spec(self, old: dict[str, Any], taken: bool) -> dict[str, Any]:
        now = _now()
        spec = dict(old, holderIdentity=self.identity, leaseDurationSeconds=self.duration, renewTime=now)
        if taken:  # a new lease (no transition yet), or one another identity held or gave up
            spec |= {"acquireTime": now, "leaseTransitions": (old.get("leaseTransitions") or 0) + bool(old)}
        return spec

    def _write(self, method: str, path: str, body: dict[str, Any], by: float | None) -> bool:
        self.sent = time.monotonic()
        try:
            self._call(method, path, by, body)
        except ApiException as exc:
            if exc.status == 409:  # another took or renewed it first
                self.error = None
                return False
            return self._failed(exc)
        except (urllib3.exceptions.HTTPError, TimeoutError) as exc:
            return self._failed(exc)
        self.holder, self.error = self.identity, None
        return True

    def _failed(self, exc: Exception) -> bool:
        self.error = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc) or type(exc).__name__
        return False

    def release(self) -> None:
        """Give the lease up (a clean exit): a standby takes over at its next try, not LEASE_SECONDS later."""
        try:
            lease = _lease(self.clients.call("GET", self.path))
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = dict(lease["spec"], holderIdentity=None, leaseDurationSeconds=1, renewTime=_now())
            self.clients.call("PUT", self.path, lease)
            log.info("finetune-operator: gave up the lease %s/%s", self.namespace, self.name)
        except (ApiException, urllib3.exceptions.HTTPError, ValueError) as exc:
            log.warning("finetune-operator: the lease %s/%s was not given up (%s): a standby takes over once it "
                        "expires", self.namespace, self.name, exc)


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGINT end a standby at once, quietly (SystemExit), and a leader before its operator starts (kopf
    takes the signals over then). The image runs the operator as PID 1, which the kernel leaves SIGTERM-deaf without
    a handler: a standby of an upgrade or a scale-down then took the lease as the active pod stopped, ran the old
    version on a pod being deleted until its SIGKILL, and the new pods waited out the lease after it."""
    def stop(signum: int, _: Any) -> None:
        log.info("finetune-operator: %s: stopping", signal.Signals(signum).name)
        raise SystemExit(0)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def wait_to_lead(lease: Lease, host: str, liveness_port: int, retry: float = RETRY_SECONDS,
                 deadline: float = RENEW_DEADLINE_SECONDS) -> None:
    """Block until `lease` is held. Meanwhile /healthz answers (kopf's own endpoint starts only when leading): the
    liveness probe would restart a standby for ever. A try's requests are bounded as a renewal's are (`leading`
    counts its deadline from its write): unbounded, a take answered late left it no renewal in time."""
    with _standby_health(host, liveness_port):
        told: tuple[str | None, str | None] = (None, None)
        while not lease.try_hold(by=time.monotonic() + deadline):
            if (lease.holder, lease.error) != told:
                told = (lease.holder, lease.error)
                if lease.error:  # a missing Role says so, and is no silent standby for ever
                    log.warning("finetune-operator: standby: cannot take the lease %s/%s: %s (the operator's rules "
                                "for leases: rbac.LEASE_RULES)", lease.namespace, lease.name, lease.error)
                else:
                    log.info("finetune-operator: standby: the lease %s/%s is held by %s; taking over once it is given "
                             "up or not renewed for %d s", lease.namespace, lease.name, lease.holder, lease.duration)
            time.sleep(retry)
    log.info("finetune-operator: leading (lease %s/%s, as %s)", lease.namespace, lease.name, lease.identity)


class _DualStackServer(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        # the family of the address, as kopf's endpoint and the metrics server pick theirs (bindAddress may be ::)
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)


@contextmanager
def _standby_health(host: str, port: int) -> Iterator[None]:
    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *_: Any) -> None:
            pass

    server = _DualStackServer((host, port), Healthz)
    thread = threading.Thread(target=server.serve_forever, name="standby-healthz", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def leading(lease: Lease, retry: float = RETRY_SECONDS, deadline: float = RENEW_DEADLINE_SECONDS) -> Iterator[None]:
    """Renew the held lease every `retry` seconds in a thread while the body runs, and give it up after. When another
    holds it, or no renewal committed within `deadline` seconds of its start (its requests bounded by that), the
    process exits at once (EXIT_LEASE_LOST): a standby may be leading by then, and two operators would each write
    the same jobs' status and children."""
    stop = threading.Event()

    def renew() -> None:
        # From when the write that took it was sent, not from now: it may have committed seconds before its answer
        # came (a standby counts the lease's time from when it sees it), and a leader exits before a standby takes it.
        # Not from the try's start either: a slow read before the write left a new leader no time for a renewal.
        renewed = lease.sent
        while not stop.wait(retry):
            if lease.renew(by=renewed + deadline):
                renewed = lease.sent
                continue
            other = lease.holder not in (None, lease.identity) and lease.error is None
            if other or time.monotonic() - renewed >= deadline:
                why = f"it is held by {lease.holder}" if other else f"it was not renewed for {deadline:g} s ({lease.error})"
                log.error("finetune-operator: lost the lease %s/%s: %s: exiting", lease.namespace, lease.name, why)
                logging.shutdown()
                os._exit(EXIT_LEASE_LOST)

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lease.release()
