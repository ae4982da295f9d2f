"""What the trainer tells the world: Prometheus metrics, progress lines and the termination message.

Metric names are shared with the operator and the dashboard (the README's trainer contract). Rank 0 serves
them on FINETUNE_METRICS_ADDR:FINETUNE_METRICS_PORT (default 127.0.0.1:9090; port 0 turns
the endpoint off). Loopback unless told otherwise: a local run must not listen on the
network, and in a pod the operator sets the address to the pod's IP. `finetune_trainer_stage{stage=...}` is 1 for the current stage and 0
for the others; the training gauges (loss, step, throughput...) appear with an attempt's first step, and the rates
(throughput, steps/s, MFU) go again once it leaves Training; `finetune_trainer_eval_metric{phase,metric}` has phase baseline, training
(the latest evaluation during training), final, or teacher (a distilled job's teacher, on the test split).
In a pod, `finetune_trainer_pod_info{uid}` names the pod that answers (FINETUNE_POD_UID), so that the
operator never reads another pod's numbers for its job's. prometheus_client's `process_*` are served too: the
dashboard tells the newest run and attempt by `process_start_time_seconds`.

The final evaluation is set only seconds before the process ends (export is quick), so `close` keeps
the endpoint up until each reader still scraping it (Prometheus, the operator) has read it once more,
for at most FINETUNE_METRICS_LINGER_SECONDS (60; 0: not at all). Not after a SIGTERM, and a SIGTERM
ends the wait, so the exit code stays the trainer's.

The termination message goes to $TERMINATION_MESSAGE_PATH, else to /dev/termination-log
when Kubernetes created it; it is compact JSON of at most 4 KiB.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from finetune_trainer.analyze import Severity, StepFlops
from finetune_trainer.config import Stage
from finetune_trainer.torchrun import local_world_size, rank, world_size
from finetune_trainer.errors import EXIT_OK, EXIT_TERMINATED, EXIT_USER_ERROR, describe, exit_code_of, reason_of

log = logging.getLogger(__name__)

PORT_ENV = "FINETUNE_METRICS_PORT"
ADDR_ENV = "FINETUNE_METRICS_ADDR"
POD_UID_ENV = "FINETUNE_POD_UID"
DEFAULT_PORT = 9090
TERMINATION_ENV = "TERMINATION_MESSAGE_PATH"
KUBERNETES_TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
LINGER_ENV = "FINETUNE_METRICS_LINGER_SECONDS"
DEFAULT_LINGER_SECONDS = 60.0
MAX_READERS = 32  # the readers the linger may wait for: the most recent
RATE_WINDOW_SECONDS = 30.0  # of training time: the throughput gauges (and MFU) follow a slowdown within it
_last_exit_code: list[int | None] = [None]  # the exit code of the latest termination message (write_termination)

# Dense bf16 peak per GPU by the exact name torch.cuda.get_device_name gives (torchtitan's figures, NVIDIA's
# datasheets): a part of a name would give an H100 PCIe (756) the SXM's 989, or an L40 the L4's. MFU is
# reported only where the peak is known.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA B200": 2250e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12,
    "NVIDIA A10G": 70e12, "NVIDIA L4": 121e12,
}


class Readers:
    """Who reads /metrics: when each last read it and the longest gap between two of its reads. A reader is its address
    and its User-Agent: readers can share an address (the process node's pods all connect from 127.0.0.1; hostNetwork
    pods on one node share the node's), and the operator's read every few seconds ended the wait for Prometheus. Two
    readers of one address and one User-Agent (Prometheus replicas behind one proxy) are still one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}
        self.gap: dict[str, float] = {}
        self.began: dict[str, float] = {}  # when the answer of each one's last read began to be made
        self.answering: Counter[str] = Counter()  # the reads of each one whose answers are being made or sent

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def recorded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
            client = f'{environ.get("REMOTE_ADDR", "")} {environ.get("HTTP_USER_AGENT", "")}'
            began = self.answer(client)
            try:
                yield from app(environ, start_response)
                # Once sent: counted as it came in, the read ended the wait, and the process exited while the answer,
                # the final evaluation in it, was still being made or written. And as of when its answer began to be
                # made: one made just before the final evaluation was set and sent just after the wait began ended
                # the wait, though it held none of it.
                self.read(client, time.monotonic(), began)
            finally:  # sent, or the client gone
                self.answered(client)
        return recorded

    def answer(self, client: str) -> float:
        """`client`'s read is being answered from now on (returned)."""
        with self.lock:
            self.answering[client] += 1
        return time.monotonic()

    def answered(self, client: str) -> None:
        with self.lock:
            self.answering[client] -= 1
            if not self.answering[client]:
                del self.answering[client]

    def read(self, client: str, now: float, began: float | None = None) -> None:
        """`client` read at `now`, its answer made from `began` on (by default: at once)."""
        with self.lock:
            if client in self.last:
                self.gap[client] = max(self.gap.get(client, 0.0), now - self.last[client])
            elif len(self.last) >= MAX_READERS:  # a User-Agent made anew at each read would grow these for ever
                oldest = min(self.last, key=self.last.__getitem__)
                self.last.pop(oldest)
                self.gap.pop(oldest, None)
                self.began.pop(oldest, None)
            self.last[client] = now
            # the freshest answer read: two scrapers behind one proxy share a key, and a stale answer counted after a
            # fresh one said no fresh one was read
            self.began[client] = max(self.began.get(client, -math.inf), now if began is None else began)

    def deadlines(self, since: float, cap: float) -> dict[str, float]:
        """For each reader still scraping at `since`, by when its next read is due (a reader seen once: `cap`). One
        whose answer is being made or sent: `cap`, until that read is counted. Its due time passed under a slow
        answer begun before the final values were set, that reader was let go, and it read the old values last."""
        with self.lock:
            due = {client: last + (1.5 * self.gap[client] + 1 if client in self.gap else cap)
                   for client, last in self.last.items()}
            due.update(dict.fromkeys(self.answering, math.inf))
        return {client: min(at, since + cap) for client, at in due.items() if at > since}

    def read_since(self, client: str, since: float) -> bool:
        """Whether `client` has read an answer made after `since` (the values as they were then, or later)."""
        with self.lock:
            return self.began.get(client, 0.0) > since


class Latest:
    """A gauge exported only once set: before the first step of an attempt (loading, analysis, the baseline) there
    is no loss, no step count and no throughput, rather than 0s that the operator put in the status (a Loss of 0,
    progress back to 0 of 0 steps on a resumed attempt) and the dashboard drew."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def clear(self) -> None:
        """Not exported again until set."""
        self.value = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.doc, value=self.value)


class Recent:
    """Rates per second over the latest RATE_WINDOW_SECONDS of training steps, from the run's running totals
    (training time, then samples, tokens...). The totals' own ratio, the average since the run began (carried over a
    resume), hid a slowdown hours into a run from the dashboard, and gave a run resumed on slower GPUs or fewer
    workers the first attempt's speed, so its ETA in the status said a fraction of the time left."""

    def __init__(self) -> None:
        self.points: deque[tuple[float, ...]] = deque()

    def add(self, seconds: float, *totals: float) -> tuple[float, ...] | None:
        """The rates of `totals` up to these; None until two steps of this process span some time."""
        self.points.append((seconds, *totals))
        while len(self.points) > 2 and seconds - self.points[1][0] >= RATE_WINDOW_SECONDS:
            self.points.popleft()
        elapsed = seconds - self.points[0][0]
        if elapsed <= 0:
            return None
        return tuple((total - first) / elapsed for total, first in zip(totals, self.points[0][1:]))


class Metrics:
    """The trainer's gauges in a registry of their own (a test may run the pipeline twice in one process)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.monotonic) -> None:
        # the device is required: left out, a GPU job's memory read 0 until its first step (see gpu_memory_bytes)
        self.device = device
        self.clock = clock
        self.first_steps: float | None = None  # the steps of this attempt's first report (see training_share)
        self.began: tuple[float, float] | None = None  # (training seconds, clock) at the report after its first step
        self.registry = CollectorRegistry()
        # process_start_time_seconds and the like: the dashboard tells the newest run and attempt by their start
        ProcessCollector(registry=self.registry)
        self.server: Any = None
        self.readers = Readers()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"finetune_trainer_{name}", doc, labels, registry=self.registry)

        def latest(name: str, doc: str) -> Latest:
            value = Latest(f"finetune_trainer_{name}", doc)
            self.registry.register(value)  # type: ignore[arg-type]
            return value

        self.loss = latest("loss", "Training loss of the latest step (token-normalised)")
        self.learning_rate = latest("learning_rate", "Learning rate of the fastest parameter group that trains, as "
                                    "scheduled")
        self.grad_norm = latest("grad_norm", "Global L2 norm of the latest step's gradient, before clipping")
        self.step = latest("step", "Optimizer steps taken")
        self.total_steps = latest("total_steps", "Optimizer steps planned")
        self.epoch = latest("epoch", "Current epoch (0-based)")
        self.samples_per_second = latest("samples_per_second", "Training samples per second, all workers, over the "
                                         f"latest {RATE_WINDOW_SECONDS:.0f} s of training")
        self.tokens_per_second = latest("tokens_per_second", "Training tokens per second, all workers, over the "
                                        f"latest {RATE_WINDOW_SECONDS:.0f} s of training")
        # The ETA's rate: rows a step vary (a small split's batches are smaller than batchSize, the last of an epoch
        # too), so the time left from samples/s and the global batch was up to twice the real one.
        self.steps_per_second = latest("steps_per_second", "Optimizer steps per second over the latest "
                                       f"{RATE_WINDOW_SECONDS:.0f} s of training, times the share of this attempt's "
                                       "time since its first step that training took (not evaluations, checkpoints)")
        self.recent = Recent()
        self.stage = gauge("stage", "1 for the pipeline stage running now, 0 for the others", ("stage",))
        self.eval_metric = gauge("eval_metric", "Evaluation metric: test split (baseline, final, and teacher: a "
                                 "distilled job's), validation split (training)", ("phase", "metric"))
        # 0 on a CPU from the start: the dashboard counts a job as on GPUs by its GPU memory. On a GPU it is read at
        # each scrape: set at steps, it was 0 through loading, analysis and the baseline (minutes on a large test
        # split), where the model already filled the GPU and the dashboard counted the job as not on GPUs.
        self.gpu_memory_bytes = gauge("gpu_memory_bytes", "Peak GPU memory allocated by this worker")
        if device.type == "cuda":
            self.gpu_memory_bytes.set_function(lambda: torch.cuda.max_memory_allocated(device))
        # 0 on a CPU too; on a GPU whose peak is not in PEAK_BF16_FLOPS (a T4, a V100) none at all, where it said 0.
        self.mfu = latest("mfu", "Model FLOPs utilisation: achieved training FLOP/s over the GPU's bf16 peak")
        if device.type != "cuda":
            self.mfu.set(0)
        # A deleted pod's IP goes to the next pod; the operator reads rank 0 by the IP its watch last saw, and this is
        # how it tells that another job's trainer answered.
        if uid := os.environ.get(POD_UID_ENV):
            gauge("pod_info", "1, labelled with the uid of the pod that serves these metrics", ("uid",)
                  ).labels(uid=uid).set(1)

    def serve(self) -> None:
        port = int(os.environ.get(PORT_ENV, DEFAULT_PORT))
        if port == 0:
            return
        addr = os.environ.get(ADDR_ENV, "127.0.0.1")
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
            self.server.set_app(self.readers.wrap(self.server.get_app()))
            log.info("metrics on http://%s:%d/metrics", addr, port)
        except OSError as exc:  # a local run next to a Prometheus on 9090: train anyway
            log.warning("metrics endpoint %s:%d not started (%s); set %s to a free port", addr, port, exc, PORT_ENV)

    def close(self) -> None:
        if self.server is not None:
            self.linger()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def linger(self) -> None:
        """Keep serving until every reader still scraping has read the values as they are now (module docstring)."""
        if _last_exit_code[0] == EXIT_TERMINATED:
            return
        now = time.monotonic()
        cap = float(os.environ.get(LINGER_ENV, DEFAULT_LINGER_SECONDS))
        waiting = self.readers.deadlines(now, cap)
        if not waiting:
            return
        stop = threading.Event()
        previous: Any = signal.getsignal(signal.SIGTERM)
        installed = False
        with contextlib.suppress(ValueError):  # not the main thread: SIGTERM keeps its handler
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            installed = True
        try:
            log.info("metrics: waiting up to %.0f s for the last scrape", max(waiting.values()) - now)
            while waiting and not stop.wait(0.05):
                at = time.monotonic()
                # A read counted after the wait began (its answer made before) moves its reader's next due time on:
                # kept at the one due before, the wait ended just as that reader's next read was coming. Not kept at
                # the cap of a read being answered either, once it is counted.
                due_now = self.readers.deadlines(now, cap)
                waiting = {c: due_now.get(c, due) for c, due in waiting.items()}
                waiting = {c: due for c, due in waiting.items() if due > at and not self.readers.read_since(c, now)}
        finally:
            if installed:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def set_stage(self, stage: Stage) -> None:
        for s in Stage:
            self.stage.labels(stage=s.value).set(1 if s == stage else 0)
        if stage != Stage.TRAINING:
            self.rates_stopped()

    def rates_stopped(self) -> None:
        """Out of Training no steps are made: the rates (throughput, steps/s, MFU) are none, as before the first step.
        Kept, the Throughput and MFU panels drew the last step's rate through the evaluation, the export and the
        linger. The step, the total and the loss stay: how far the run got (the status and the Progress stat read
        them); the operator keeps the status's last training throughput and says no time left once training ended."""
        for rate in (self.samples_per_second, self.tokens_per_second, self.steps_per_second):
            rate.clear()
        if self.device.type == "cuda":  # a CPU's 0 is said from the start, and stays
            self.mfu.clear()

    def set_eval(self, phase: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.eval_metric.labels(phase=phase, metric=name).set(value)

    @functools.cached_property
    def peak_flops(self) -> float | None:
        """The GPU's peak for the MFU gauge (peak_flops), looked up at the first step and kept: the GPU and the world
        size stay for the run."""
        return peak_flops(self.device) if self.device.type == "cuda" else None

    def training_share(self, seconds: float, steps: float) -> float:
        """The share of this attempt's time that its steps took (`seconds`: the run's training time, `steps`: its
        steps), from its first report after a step it made: the rest went to evaluations and checkpoints, which the
        time left holds too (from the steps' rate alone the ETA said 0.5 s where 5.6 s were left: an evaluation of
        1 s every 2 steps of 0.1 s). Not from a resume's report, made before any step: the evaluation and loading
        before its first step made the ETA 100 times too long."""
        now = self.clock()
        if self.first_steps is None:
            self.first_steps = steps  # a resume's report, or the first step's
        elif self.began is None and steps != self.first_steps:
            self.began = seconds, now
        if self.began is None:
            return 1.0
        trained, passed = seconds - self.began[0], now - self.began[1]
        return min(trained / passed, 1.0) if passed > 0 and trained > 0 else 1.0

    def set_throughput(self, totals: tuple[float, float, float, float, float], flops: StepFlops | None) -> None:
        """From the run's totals of training seconds, steps, samples, tokens and padded tokens after a step
        (`Recent`); at an attempt's first step, their average."""
        seconds, *counts = totals
        steps_per_second, samples_per_second, tokens_per_second, padded_per_second = (
            self.recent.add(seconds, *counts) or tuple(count / max(seconds, 1e-9) for count in counts))
        self.steps_per_second.set(steps_per_second * self.training_share(seconds, counts[0]))
        self.samples_per_second.set(samples_per_second)
        if counts[2]:  # images have no tokens: the dashboard and the status showed their samples/s as tokens/s
            self.tokens_per_second.set(tokens_per_second)
        if self.peak_flops and flops and flops.flops:
            self.mfu.set(flops.per_second(samples_per_second, padded_per_second) / self.peak_flops)


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of all workers together (throughput is counted over all of them), if this GPU's is known."""
    peak = PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device))
    return None if peak is None else peak * world_size()


def termination_path() -> Path | None:
    if path := os.environ.get(TERMINATION_ENV):
        return Path(path)
    if KUBERNETES_TERMINATION_LOG.exists() and os.access(KUBERNETES_TERMINATION_LOG, os.W_OK):
        return KUBERNETES_TERMINATION_LOG
    return None


def termination_message(message: dict[str, Any]) -> str:
    """Compact JSON within the 4 KiB Kubernetes keeps; the least severe findings and then the text give way first."""
    message = dict(message)
    text = compact(message)
    if len(text.encode()) > TERMINATION_LIMIT and message.get("analysis", {}).get("findings"):
        analysis = message["analysis"] = dict(message["analysis"])
        # A checkpoint with all its matrices zero has a ZeroWeights warning for each: dropped all together, none
        # reached the job's status, in a message of 500 bytes.
        findings = sorted(analysis.pop("findings"), key=lambda f: Severity.RANK.get(f.get("severity"), len(Severity.RANK)))
        if kept := fitting(findings, TERMINATION_LIMIT - len(compact(message).encode()) - len(',"findings":[]')):
            analysis["findings"] = kept
        text = compact(message)
    while len(text.encode()) > TERMINATION_LIMIT and len(message.get("message", "")) > 40:
        message["message"] = message["message"][: len(message["message"]) // 2] + "..."
        text = compact(message)
    return text


def compact(value: Any) -> str:
    # whatever a value is, the message goes out: a TypeError here left the termination log empty, the operator no word
    return json.dumps(value, separators=(",", ":"), default=str)


def fitting(items: list[Any], room: int) -> list[Any]:
    """The first of `items` that add at most `room` bytes to an empty compact JSON list."""
    kept = []
    for item in items:
        room -= len(compact(item).encode()) + 1  # and its comma
        if room < 0:
            break
        kept.append(item)
    return kept


def precedence(message: dict[str, Any]) -> int:
    """How much a message tells the operator about why the container stopped: success, then a user error (never
    the consequence of another rank's failure), then an infrastructure failure, then SIGTERM (which torchrun sends
    to every worker once one of them has failed)."""
    return {EXIT_OK: 3, EXIT_USER_ERROR: 2, EXIT_TERMINATED: 0}.get(message.get("exitCode"), 1)


def replaces(message: dict[str, Any], there: dict[str, Any]) -> bool:
    """Whether `message` replaces a sibling's `there`: it tells more (`precedence`; of equal failures the first, the
    cause, stays), or it is rank 0's success, the only one with the export's figures (a pruned model's size and
    latency after export: only rank 0 exports)."""
    if precedence(message) != precedence(there):
        return precedence(message) > precedence(there)
    return message.get("exitCode") == EXIT_OK and rank() == 0


def write_failure(stage: Stage, exc: BaseException, progress: dict[str, Any] | None = None) -> None:
    """The termination message of a run that `exc` stopped in `stage` (the operator reads its exit code)."""
    write_termination({"stage": stage.value, "reason": reason_of(exc), "message": describe(exc),
                       "exitCode": exit_code_of(exc), **(progress or {})})


def write_termination(message: dict[str, Any]) -> None:
    """Every local rank writes what stopped it into the container's one termination log, under a lock. With
    siblings (torchrun's LOCAL_WORLD_SIZE > 1) a message replaces the one there only when it tells more
    (`replaces`); a process alone overwrites what is there."""
    _last_exit_code[0] = message.get("exitCode")
    if (path := termination_path()) is None:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            try:
                there = json.loads(file.read() or "{}")
            except ValueError:
                there = {}
            alone = local_world_size() == 1
            if there and not alone and not replaces(message, there):
                return
            file.seek(0)
            file.truncate()
            file.write(termination_message(message))
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
