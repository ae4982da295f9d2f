"""Rank 0's /metrics, read and parsed with prometheus_client's parser: the only network read
the operator makes besides the Kubernetes API. Bounded in time and size, so a hanging or
chatty trainer cannot stall a reconcile."""

from __future__ import annotations

import http.client
import io
import math
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from finetune_operator.children import METRICS_PORT
from finetune_trainer.config import Stage

TIMEOUT_SECONDS = 1.0
# The trainer serves about 4 KB with every metric set. The parser costs the operator's one core 0.2 to 0.8 s a MiB,
# at every poll of every running job, and the port is the tenant's: a few jobs answering 1 MiB held that core.
MAX_BYTES = 64 << 10
CHUNK = 64 << 10
GAUGES = ("loss", "learning_rate", "step", "total_steps", "epoch", "steps_per_second", "samples_per_second",
          "tokens_per_second")
PREFIX = "finetune_trainer_"
STAGES = {stage.value for stage in Stage}
# Every ScrapeError reason: metrics.POLL_ERRORS exports each at 0 from the start.
REASONS = ("MetricsTimeout", "MetricsUnreachable", "MetricsBadResponse", "MetricsUnparsable", "MetricsMissing",
           "MetricsTooLarge", "MetricsFromAnotherPod")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an HTTP error: rank 0's port is the tenant's, and followed, its 3xx would send the operator's GET
    anywhere the operator can reach (a cloud's metadata address) and bring the answer back into the job's status."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"{msg}, a redirect, which is never followed", headers, fp)


class _UntilDeadline(io.RawIOBase):
    """A socket's reads, each allowed only the time left until `deadline` (TimeoutError after it)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        # the socket's own reader, which keeps it open until this is closed too (a response outlives its connection)
        self.sock, self.raw, self.deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline has passed")
        self.sock.settimeout(left)
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket whose response reads end at `deadline`; anything else goes to the socket itself."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:  # http.client's one reader of the response
        return io.BufferedReader(_UntilDeadline(self.sock, self.deadline))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _DeadlineConnection(http.client.HTTPConnection):
    """Its timeout bounds the whole exchange, not each socket operation: a server dripping the status line or the
    headers a byte at a time, or answering `100 Continue` without end, held a handler thread for as long as it chose
    (http.client's line and header limits allow days of it), and the operator's deletion waited for that thread."""

    def connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        super().connect()
        self.sock = _DeadlineSocket(self.sock, deadline)


class _DeadlineHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineConnection, req)


# Pod IPs are read directly, never through a proxy in the environment (a cluster-wide one): urllib would send them to
# it unless NO_PROXY names them in a way it reads, and it reads no CIDR (10.128.0.0/14), only host names.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect(), _DeadlineHandler())


class ScrapeError(Exception):
    """The endpoint did not answer with metrics; `reason` is a CamelCase word for status and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(text: str, pod_uid: str | None = None) -> dict[str, Any]:
    """The trainer's gauges (without the prefix) and the current stage. A gauge at NaN or ±Inf (valid Prometheus
    text, but no JSON number), or a stage outside status.stage's enum (a trainer image of another version), reads as
    absent: in a status patch the apiserver would refuse the whole patch. Metrics that name a pod other than
    `pod_uid` are refused: a pod deleted while the operator's watch missed it left its IP to another pod, perhaps
    another job's trainer. A trainer that names no pod (an image from before the name) is read."""
    sample: dict[str, Any] = {}
    ours = False
    others: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            name = family.name.removeprefix(PREFIX)
            ours = ours or name != family.name
            for s in family.samples:
                if name in GAUGES and math.isfinite(s.value):
                    sample[name] = s.value
                elif name == "stage" and s.value == 1 and s.labels.get("stage") in STAGES:
                    sample["stage"] = s.labels.get("stage")
                elif name == "pod_info" and pod_uid and s.labels.get("uid", pod_uid) != pod_uid:
                    others.add(s.labels["uid"])
    except ValueError as exc:
        raise ScrapeError("MetricsUnparsable", f"not Prometheus text: {exc}") from exc
    if not ours:
        raise ScrapeError("MetricsMissing", "no finetune_trainer_* metrics")
    if others:
        raise ScrapeError("MetricsFromAnotherPod", f"answered by pod {', '.join(sorted(others))[:80]}, not by rank 0 "
                          f"({pod_uid}): its IP is another pod's now")
    return sample


def _timed_out(exc: OSError) -> bool:
    """A read's timeout, or a connect's, which urllib wraps in a URLError (a SYN dropped, as by a default-deny
    NetworkPolicy: no answer, where a refusal is one)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, TimeoutError)


def scrape(ip: str, port: int = METRICS_PORT, timeout: float = TIMEOUT_SECONDS,
           pod_uid: str | None = None) -> dict[str, Any]:
    """One read of the pod `pod_uid` (`parse`), bounded in total time (not only per socket operation: a server that
    drips bytes is cut off, _DeadlineConnection)."""
    url = f"http://{ip}:{port}/metrics"
    chunks: list[bytes] = []
    try:
        with DIRECT.open(url, timeout=timeout) as response:  # noqa: S310 (a pod IP, http only)
            while chunk := response.read1(CHUNK):
                chunks.append(chunk)
                if sum(map(len, chunks)) > MAX_BYTES:
                    raise ScrapeError("MetricsTooLarge", f"{url}: more than {MAX_BYTES} bytes")
            if response.length:  # read1 ends quietly where the connection did: a step of 123 read as 12
                raise ScrapeError("MetricsUnreachable", f"{url}: the answer ended {response.length} bytes short "
                                                        "of its Content-Length")
    except OSError as exc:  # refused, reset, closed early, an HTTP error status; or timed out
        if _timed_out(exc):
            raise ScrapeError("MetricsTimeout", f"{url}: no complete answer within {timeout} s") from exc
        raise ScrapeError("MetricsUnreachable", f"{url}: {exc}") from exc
    except http.client.HTTPException as exc:  # not HTTP at all
        raise ScrapeError("MetricsBadResponse", f"{url}: not an HTTP answer ({type(exc).__name__})") from exc
    return parse(b"".join(chunks).decode("utf-8", errors="replace"), pod_uid)
