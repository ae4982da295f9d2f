"""One active operator among replicas: a coordination.k8s.io Lease, held while it is renewed.

client-go's leader election, on the operator's own Clients (the kubernetes client's is a loop of blocking sleeps
that never gives the lease back, through the generated API classes the operator does not import): a standby takes
the lease once its holder gave it up (a clean exit) or has not renewed it for LEASE_SECONDS, as measured on the
standby's own clock from when it last saw the lease change (the two clocks need not agree). A leader that cannot
renew within RENEW_DEADLINE_SECONDS exits at once: a standby may hold the lease by then.
"""

from __future__ import annotations

import json
import logging
import os
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
EXIT_LEASE_LOST = 1


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lease:
    """The Lease `namespace/name`, tried for by `identity`."""

    def __init__(self, clients: Clients, namespace: str, name: str, identity: str,
                 duration: int = LEASE_SECONDS) -> None:
        self.clients, self.namespace, self.name, self.identity, self.duration = clients, namespace, name, identity, duration
        self.path = api_path(namespace, "leases", name, group="coordination.k8s.io")
        self.holder: str | None = None  # as last seen
        self.seen: tuple[Any, ...] | None = None  # the holder's record as last seen, and since when (monotonic)
        self.seen_at = 0.0

    def try_hold(self) -> bool:
        """Take the lease or renew it: one try, True when this identity holds it now."""
        try:
            lease = json.loads(self.clients.call("GET", self.path))
        except ApiException as exc:
            if exc.status != 404:
                log.debug("lease %s/%s not read: %s", self.namespace, self.name, exc.reason)
                return False
            return self._write("POST", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                        "metadata": {"name": self.name, "namespace": self.namespace},
                                        "spec": self._spec({}, taken=True)})
        except urllib3.exceptions.HTTPError as exc:
            log.debug("lease %s/%s not read: %s", self.namespace, self.name, exc)
            return False
        spec = lease.get("spec") or {}
        self.holder = spec.get("holderIdentity") or None
        record = (self.holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self.seen:
            self.seen, self.seen_at = record, time.monotonic()
        ours = self.holder == self.identity
        if self.holder and not ours and time.monotonic() < self.seen_at + (record[2] or self.duration):
            return False
        lease["spec"] = self._spec(spec, taken=not ours)
        return self._write("PUT", lease)  # with its resourceVersion: of two standbys at once, one wins

    def _spec(self, old: dict[str, Any], taken: bool) -> dict[str, Any]:
        now = _now()
        spec = dict(old, holderIdentity=self.identity, leaseDurationSeconds=self.duration, renewTime=now)
        if taken:  # a new lease (no transition yet), or one another identity held or gave up
            spec |= {"acquireTime": now, "leaseTransitions": (old.get("leaseTransitions") or 0) + bool(old)}
        return spec

    def _write(self, method: str, body: dict[str, Any]) -> bool:
        path = self.path if method == "PUT" else self.path.rsplit("/", 1)[0]
        try:
            self.clients.call(method, path, body)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:  # 409: another took or renewed it first
            log.debug("lease %s/%s not written: %s", self.namespace, self.name, exc)
            return False
        self.holder = self.identity
        return True

    def release(self) -> None:
        """Give the lease up (a clean exit): a standby takes over at its next try, not LEASE_SECONDS later."""
        try:
            lease = json.loads(self.clients.call("GET", self.path))
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = dict(lease["spec"], holderIdentity=None, leaseDurationSeconds=1, renewTime=_now())
            self.clients.call("PUT", self.path, lease)
            log.info("finetune-operator: gave up the lease %s/%s", self.namespace, self.name)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("finetune-operator: the lease %s/%s was not given up (%s): a standby takes over once it "
                        "expires", self.namespace, self.name, exc)


def wait_to_lead(lease: Lease, host: str, liveness_port: int, retry: float = RETRY_SECONDS) -> None:
    """Block until `lease` is held. Meanwhile /healthz answers (kopf's own endpoint starts only when leading): the
    liveness probe would restart a standby for ever."""
    with _standby_health(host, liveness_port):
        told = None
        while not lease.try_hold():
            if lease.holder != told:
                told = lease.holder
                log.info("finetune-operator: standby: the lease %s/%s is held by %s; taking over once it is given up "
                         "or not renewed for %d s", lease.namespace, lease.name, told, lease.duration)
            time.sleep(retry)
    log.info("finetune-operator: leading (lease %s/%s, as %s)", lease.namespace, lease.name, lease.identity)


@contextmanager
def _standby_health(host: str, port: int) -> Iterator[None]:
    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Healthz)
    thread = threading.Thread(target=server.serve_forever, name="standby-healthz", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def leading(lease: Lease, retry: float = RETRY_SECONDS,
            deadline: float = RENEW_DEADLINE_SECONDS) -> Iterator[threading.Event]:
    """Renew the held lease every `retry` seconds in a thread while the body runs, and give it up after. Not renewed
    for `deadline` seconds, the process exits at once (EXIT_LEASE_LOST): a standby may be leading by then, and two
    operators would each write the same jobs' status and children. The event yielded is set when renewing stops."""
    stop = threading.Event()

    def renew() -> None:
        renewed = time.monotonic()
        while not stop.wait(retry):
            if lease.try_hold():
                renewed = time.monotonic()
            elif time.monotonic() - renewed > deadline:
                log.error("finetune-operator: the lease %s/%s was not renewed for %d s (held by %s now): exiting",
                          lease.namespace, lease.name, deadline, lease.holder)
                logging.shutdown()
                os._exit(EXIT_LEASE_LOST)

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join()
        lease.release()
