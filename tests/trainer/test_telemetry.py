"""The trainer's metrics endpoint at the end of a run: the final values reach whoever scrapes it."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import telemetry
from finetune_trainer.analyze import StepFlops
from finetune_trainer.errors import EXIT_OK, EXIT_TERMINATED
from finetune_trainer.telemetry import ADDR_ENV, LINGER_ENV, PORT_ENV, TERMINATION_ENV, Metrics, write_termination
from tiny import free_port

CPU = torch.device("cpu")


class Scraper:
    """Reads /metrics every `interval` seconds, as Prometheus does, and keeps what it read."""

    def __init__(self, port: int, interval: float, agent: str = "Prometheus/3.5.0", timeout: float = 5) -> None:
        self.request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"User-Agent": agent})
        self.interval = interval
        self.timeout = timeout
        self.bodies: list[str] = []
        self.read = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.bodies.append(urllib.request.urlopen(self.request, timeout=self.timeout).read().decode())
                self.read.set()
            except OSError:
                pass
            self.done.wait(self.interval)

    def wait_for_a_read(self) -> None:
        self.read.clear()
        assert self.read.wait(10), "not read"

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path) -> tuple[Metrics, int]:  # type: ignore[no-untyped-def]
    port = free_port()
    monkeypatch.setenv(PORT_ENV, str(port))
    monkeypatch.setenv(ADDR_ENV, "127.0.0.1")
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    monkeypatch.setattr(telemetry, "_last_exit_code", [None])  # finish sets it in place: each test its own
    metrics = Metrics(CPU)
    metrics.serve()
    yield metrics, port
    metrics.close()


def finish(metrics: Metrics, code: int) -> float:
    """What the pipeline does last: the final evaluation, the termination message, then close; its seconds."""
    metrics.set_eval("final", {"accuracy": 0.9})
    write_termination({"exitCode": code})
    started = time.monotonic()
    metrics.close()
    return time.monotonic() - started


def test_the_final_evaluation_is_read_by_a_scraper_before_the_endpoint_closes(endpoint: tuple[Metrics, int]) -> None:
    """It was set under a second before the process ended (0.44 s in tiny-causal-lm): a Prometheus scraping every
    15 s almost never saw it, and the dashboard's fine-tuned bars and change stayed empty."""
    metrics, port = endpoint
    scraper = Scraper(port, interval=1.5)
    try:
        scraper.wait_for_a_read()
        scraper.wait_for_a_read()  # its interval is known now
        took = finish(metrics, EXIT_OK)
    finally:
        scraper.stop()
    assert 'phase="final"' in scraper.bodies[-1]
    # its next read was due by 1.5 * 1.5 + 1 s (shutdown takes up to 0.5 s); slack for a loaded machine, far under
    # the 60 s linger a wait for nothing would take
    assert took < 20


def test_a_reader_beside_another_at_its_address_is_waited_for(endpoint: tuple[Metrics, int]) -> None:
    """On the process node every pod connects from 127.0.0.1: the operator's read each second ended the wait, and
    Prometheus, scraping as often, missed the final evaluation (the chart test's fine-tuned bar empty, once in four
    runs). Readers are told apart by their User-Agent too."""
    metrics, port = endpoint
    prometheus = Scraper(port, interval=2)
    operator = Scraper(port, interval=0.1, agent="Python-urllib/3.11")
    try:
        for _ in range(2):
            prometheus.wait_for_a_read()
        took = finish(metrics, EXIT_OK)  # just after Prometheus's read: the operator reads again first
    finally:
        operator.stop()
        prometheus.stop()
    assert 'phase="final"' in operator.bodies[-1]
    assert 'phase="final"' in prometheus.bodies[-1], f"closed after {took:.1f} s, before Prometheus read again"


def test_a_read_counts_once_its_answer_is_sent_and_the_readers_kept_are_bounded() -> None:
    """Counted as it came in, a read ended the linger while its answer (the final evaluation in it) was still being
    made: the process exited under it. A client that names itself anew at each read grew the readers for ever."""
    readers = telemetry.Readers()
    made = threading.Event()

    def slow_app(environ: dict, start_response: object) -> list[bytes]:
        made.wait(5)
        return [b"finetune_trainer_step 3\n"]

    environ = {"REMOTE_ADDR": "10.0.0.9", "HTTP_USER_AGENT": "Prometheus/3.5.0"}
    before = time.monotonic()
    answer = readers.wrap(slow_app)(environ, lambda *_: None)
    reading = threading.Thread(target=lambda: list(answer))
    reading.start()
    time.sleep(0.2)
    assert not readers.read_since("10.0.0.9 Prometheus/3.5.0", before)  # its answer is still being made
    made.set()
    reading.join(5)
    assert readers.read_since("10.0.0.9 Prometheus/3.5.0", before)
    for n in range(100):
        readers.read(f"10.0.0.9 curl/{n}", time.monotonic())
    assert len(readers.last) == telemetry.MAX_READERS and "10.0.0.9 curl/99" in readers.last
    assert set(readers.gap) <= set(readers.last) and set(readers.began) == set(readers.last)
    # A client gone before its answer was sent is no longer being answered: it would hold the wait to its cap.
    two_chunks = readers.wrap(lambda *_: [b"finetune_trainer_step 3\n", b"finetune_trainer_loss 1\n"])
    gone = two_chunks(environ, lambda *_: None)
    next(gone)  # the first written, then the client closed the connection
    gone.close()
    assert not readers.answering


def test_a_read_whose_answer_was_made_before_the_wait_began_does_not_end_it() -> None:
    """Counted once sent, a read whose answer was made just before the final evaluation was set, and sent just after
    the linger began, ended the wait: the process exited, and that reader never saw the final evaluation (the test
    beside Prometheus's read failed so when its server thread was slow to count the read)."""
    readers = telemetry.Readers()
    making, made = threading.Event(), threading.Event()

    def slow_app(environ: dict, start_response: object) -> list[bytes]:
        making.set()
        made.wait(5)
        return [b"finetune_trainer_step 3\n"]

    environ = {"REMOTE_ADDR": "10.0.0.9", "HTTP_USER_AGENT": "Prometheus/3.5.0"}
    answer = readers.wrap(slow_app)(environ, lambda *_: None)
    reading = threading.Thread(target=lambda: list(answer))
    reading.start()
    assert making.wait(5)
    since = time.monotonic()  # the final values set, the wait begun: after its answer began to be made
    made.set()
    reading.join(5)
    assert "10.0.0.9 Prometheus/3.5.0" in readers.last  # read, and counted for its next read's due time
    assert not readers.read_since("10.0.0.9 Prometheus/3.5.0", since)
    again = readers.wrap(lambda *_: [b"finetune_trainer_step 3\n"])(environ, lambda *_: None)
    assert list(again) and readers.read_since("10.0.0.9 Prometheus/3.5.0", since)  # its next read: the final values
    # Two scrapers behind one proxy share a name: the other's stale answer, counted after, takes nothing back.
    readers.read("10.0.0.9 Prometheus/3.5.0", time.monotonic(), began=since - 1)
    assert readers.read_since("10.0.0.9 Prometheus/3.5.0", since)


@pytest.mark.parametrize("due", ["during the wait", "before the wait"])
def test_a_slow_answer_begun_before_the_wait_holds_it_until_its_readers_next_read(endpoint: tuple[Metrics, int],
                                                                                   due: str) -> None:
    """A read begun before the final evaluation was set, whose answer was still being made at its reader's due time
    (or was when the wait began): the wait ended under it, and the reader read those old values last. Its due time
    is counted from that read once it is sent."""
    metrics, port = endpoint
    slow, making, made = threading.Event(), threading.Event(), threading.Event()

    class SlowCollector:  # a gauge read at each scrape (as GPU memory is) that takes its time once
        def collect(self) -> list[object]:
            if slow.is_set():
                slow.clear()
                making.set()
                made.wait(30)
            return []

    metrics.registry.register(SlowCollector())  # type: ignore[arg-type]
    scraper = Scraper(port, interval=0.5, timeout=30)
    try:
        scraper.wait_for_a_read()
        scraper.wait_for_a_read()  # its interval is known now
        slow.set()
        assert making.wait(10)
        (reader, last), = metrics.readers.last.items()
        old_due = last + 1.5 * metrics.readers.gap[reader] + 1  # of its next read, as of its last read sent
        if due == "before the wait":
            time.sleep(max(old_due - time.monotonic(), 0) + 0.2)
        # sent well after that due time: the broken wait has ended by then
        release = threading.Timer(max(old_due - time.monotonic(), 0) + 2, made.set)
        release.start()
        took = finish(metrics, EXIT_OK)
    finally:
        made.set()
        scraper.stop()
    assert 'phase="final"' in scraper.bodies[-1], f"closed after {took:.1f} s, before the reader read again"
    assert took < 20  # ~3 s: until the slow answer is sent, then the next read (the cap: 60 s)


def test_a_read_counted_after_the_wait_began_moves_its_readers_due_time_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read whose answer was made before the wait began, and counted just after it did (its server thread slow),
    left the wait on the due time of the read before: it ended ~1 s later, just before that reader's next read."""
    monkeypatch.setattr(telemetry, "_last_exit_code", [None])
    metrics = Metrics(CPU)
    readers, reader = metrics.readers, "10.0.0.9 Prometheus/3.5.0"
    start = time.monotonic()
    readers.read(reader, start - 3.0)
    readers.read(reader, start - 2.0)  # every second: next due by start + 0.5 s (1.5 * 1 + 1)
    deadlines = readers.deadlines

    def counted_late(since: float, cap: float) -> dict[str, float]:
        due = deadlines(since, cap)
        if readers.last[reader] < since:  # the wait's first look: the read made before it is counted just after
            readers.read(reader, time.monotonic(), began=start)
        return due

    monkeypatch.setattr(readers, "deadlines", counted_late)
    read_again = threading.Event()

    def next_read() -> None:
        time.sleep(1.0)  # after the due time of the read before; well before the one the late read sets (>4 s)
        now = time.monotonic()
        readers.read(reader, now, began=now)
        read_again.set()

    reading = threading.Thread(target=next_read)
    reading.start()
    began = time.monotonic()
    metrics.linger()
    took, ended = time.monotonic() - began, read_again.is_set()
    reading.join(10)
    assert ended, "the wait ended before the reader's next read"
    assert took < 10, took  # ~1 s: it ends at that read


def test_the_wait_ends_at_its_cap_while_stale_reads_keep_moving_due_times_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Due times move on as reads are counted, never past the cap counted from the wait's start: the pod's grace
    period bounds the wait, and a reader whose answers were all made before it would hold it for ever."""
    monkeypatch.setattr(telemetry, "_last_exit_code", [None])
    monkeypatch.setenv(LINGER_ENV, "1")
    metrics = Metrics(CPU)
    readers, reader = metrics.readers, "10.0.0.9 Prometheus/3.5.0"
    start = time.monotonic()
    readers.read(reader, start - 20.0)
    readers.read(reader, start - 10.0)  # every 10 s: next due long past the cap
    done = threading.Event()

    def stale_reads() -> None:
        while not done.wait(0.2):
            readers.read(reader, time.monotonic(), began=start - 1)  # made before the wait: not the final values

    reading = threading.Thread(target=stale_reads)
    reading.start()
    try:
        metrics.linger()
        took = time.monotonic() - start
    finally:
        done.set()
        reading.join(5)
    assert 0.9 < took < 5, took


def test_no_wait_without_readers_after_sigterm_or_when_turned_off(endpoint: tuple[Metrics, int],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, port = endpoint
    scraper = Scraper(port, interval=5)
    try:
        scraper.wait_for_a_read()
        scraper.wait_for_a_read()
        assert finish(metrics, EXIT_TERMINATED) < 5  # the kubelet's grace period is for the checkpoint (a wait: 8.5 s)
    finally:
        scraper.stop()
    for env in ({}, {LINGER_ENV: "0"}):
        monkeypatch.setattr(telemetry, "_last_exit_code", [None])
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        again = Metrics(CPU)
        again.serve()
        if env:  # a reader, but lingering turned off
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert finish(again, EXIT_OK) < 5


def test_a_sigterm_ends_the_wait_and_a_gone_reader_holds_nothing(endpoint: tuple[Metrics, int]) -> None:
    metrics, port = endpoint
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()  # read once: its interval unknown
    # A SIGTERM outside finish's handler (sent late, or finish never listening) lands here, never on pytest's default
    stray: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda *_: stray.append(1))
    stop = threading.Event()

    def sigterm_once_handled() -> None:
        while signal.getsignal(signal.SIGTERM) is ours and not stop.wait(0.01):
            pass
        if not stop.wait(0.5):
            os.kill(os.getpid(), signal.SIGTERM)

    ours = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=sigterm_once_handled)
    sender.start()
    try:
        assert finish(metrics, EXIT_OK) < 5 and not stray
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        stop.set()
        sender.join()
        signal.signal(signal.SIGTERM, before)
    # A reader whose next read was due long ago has stopped scraping: nothing to wait for.
    again = Metrics(CPU)
    again.serve()
    for _ in range(2):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    again.readers.last = {c: t - 60 for c, t in again.readers.last.items()}
    assert finish(again, EXIT_OK) < 5


def test_before_the_first_step_there_is_no_loss_step_or_throughput_only_the_stage() -> None:
    """They were 0s: the operator read them into the status (a Loss of 0 during loading and the baseline, progress
    back to 0 of 0 steps and a loss of 0 on a resumed attempt) and the dashboard drew them."""
    from datetime import datetime

    from prometheus_client import generate_latest

    from finetune_operator import scrape, status
    from finetune_trainer.config import Stage

    metrics = Metrics(CPU)
    metrics.set_stage(Stage.BASELINE)
    sample = scrape.parse(generate_latest(metrics.registry).decode())
    assert sample == {"stage": "Baseline"}
    # The status takes the stage and the time of the read alone: a resumed attempt keeps the previous progress and
    # loss until its first step.
    assert status.progress_and_metrics(sample, 32, datetime(2026, 1, 1)) == {
        "stage": "Baseline", "progress": {"updatedAt": "2026-01-01T00:00:00Z"}}
    body = generate_latest(metrics.registry).decode()
    assert "finetune_trainer_gpu_memory_bytes 0.0" in body  # a CPU job says so from the start
    for gauge, value in ((metrics.loss, 2.5), (metrics.step, 1), (metrics.total_steps, 10)):
        gauge.set(value)
    assert scrape.parse(generate_latest(metrics.registry).decode()) == {
        "stage": "Baseline", "loss": 2.5, "step": 1.0, "total_steps": 10.0}


def test_throughput_and_the_eta_follow_the_latest_steps_not_the_runs_average(caplog: pytest.LogCaptureFixture) -> None:
    """An hour at 32 samples/s, then the run resumed on slower GPUs at 8: the gauges were the run's average (its
    totals, which a checkpoint carries over), still 30 samples/s after 4 minutes, and the status's ETA from them a
    quarter of the time left."""
    from datetime import datetime

    import torch
    from prometheus_client import generate_latest

    from finetune_operator import scrape, status
    from finetune_trainer.pipeline import Progress
    from finetune_trainer.train import LoopState

    state = LoopState()

    def steps(progress: Progress, count: int, seconds: float) -> None:
        for _ in range(count):
            state.step += 1
            state.seconds += seconds
            state.samples += 32
            state.tokens += 32 * 128
            state.history.append({"step": state.step, "seconds_since_train_start": state.seconds, "loss": 1.0,
                                  "lr": 1e-4, "grad_norm": 1.0})
            progress.step(state, 10_000, None)

    steps(Progress(Metrics(CPU), main=False), 3600, 1.0)
    resumed = Metrics(CPU)
    progress = Progress(resumed, main=True)
    steps(progress, 59, 4.0)
    progress.last_log = 0.0  # a progress line at the next step
    with caplog.at_level(logging.INFO, logger="finetune_trainer.pipeline"):
        steps(progress, 1, 4.0)
    # The log says what the status and the dashboard say (it said 30.5 samples/s, eta 6652 s).
    assert "8.0 samples/s eta 25360s" in caplog.text
    assert resumed.samples_per_second.value == pytest.approx(8)
    assert resumed.tokens_per_second.value == pytest.approx(8 * 128)
    sample = scrape.parse(generate_latest(resumed.registry).decode())
    read = status.progress_and_metrics(sample, 32, datetime(2026, 1, 1))
    assert read["progress"]["etaSeconds"] == pytest.approx((10_000 - 3660) * 4, rel=0.01)
    # The end's termination message says the same rates (it said the run's average, 30.5 samples/s, beside the last
    # read's 1,024 tokens/s, which it did not replace).
    assert status.finished_metrics(progress.message) == {k: v for k, v in read["metrics"].items() if k != "updatedAt"}


def test_the_eta_counts_steps_where_batches_are_short_of_the_global_batch() -> None:
    """137 rows at batchSize 16 on 8 workers: a step trains about 17 rows, not 128. The status's ETA was the steps
    left times the global batch over samples/s, 1.9 times the time left; now the steps left over steps/s."""
    from datetime import datetime

    from prometheus_client import generate_latest

    from finetune_operator import scrape, status
    from finetune_trainer.pipeline import Progress
    from finetune_trainer.train import LoopState

    state, metrics = LoopState(), Metrics(CPU)
    progress = Progress(metrics, main=False)
    for _ in range(20):
        state.step, state.seconds, state.samples = state.step + 1, state.seconds + 0.5, state.samples + 17
        state.history.append({"step": state.step, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0})
        progress.step(state, 180, None)
    sample = scrape.parse(generate_latest(metrics.registry).decode())
    assert sample["steps_per_second"] == pytest.approx(2)
    assert status.progress_and_metrics(sample, 128, datetime(2026, 1, 1))["progress"]["etaSeconds"] == 80
    # A trainer image without the gauge: from samples/s and the global batch, as before
    del sample["steps_per_second"]
    assert status.progress_and_metrics(sample, 17, datetime(2026, 1, 1))["progress"]["etaSeconds"] == 80


def test_the_etas_rate_counts_the_time_evaluations_take() -> None:
    """Steps of 0.1 s and an evaluation of 1 s every 2 steps: from the steps' rate alone (10/s) the ETA at step 3 of
    12 said 0.5 s where 5.6 s were left. The rate is slowed by the share of the attempt's time its steps took."""
    now = [100.0]
    metrics = Metrics(CPU, clock=lambda: now[0])
    seconds = 0.0
    for step in range(1, 11):
        seconds += 0.1
        now[0] += 0.1
        metrics.set_throughput((seconds, step, 8.0 * step, 0.0, 0.0), None)
        if step % 2 == 0:
            now[0] += 1.0  # an evaluation
    # steps 3 to 10 trained 0.8 s of the 4.8 s since step 2's report (four evaluations between)
    assert metrics.steps_per_second.value == pytest.approx(10 * 0.8 / 4.8)
    assert metrics.samples_per_second.value == pytest.approx(80)  # throughput stays the steps' own
    # an attempt that only trains keeps the steps' rate
    alone = Metrics(CPU, clock=lambda: now[0])
    for step in range(1, 5):
        now[0] += 0.1
        alone.set_throughput((0.1 * step, step, 8.0 * step, 0.0, 0.0), None)
    assert alone.steps_per_second.value == pytest.approx(10)
    # A resume reports its place before any step; the 120 s before its first step (its due evaluation, loading) are
    # no share of the steps to come: counted, the ETA of 100 steps of 1 s said 12,100 s
    resumed = Metrics(CPU, clock=lambda: now[0])
    resumed.set_throughput((100.0, 100, 800.0, 0.0, 0.0), None)
    now[0] += 120
    for step in range(101, 111):
        now[0] += 1
        resumed.set_throughput((float(step), step, 8.0 * step, 0.0, 0.0), None)
    assert resumed.steps_per_second.value == pytest.approx(1)


def test_an_image_run_reports_no_tokens_per_second(pvc_root: Path) -> None:
    """An image batch counted its samples as its tokens: the dashboard's Throughput drew an image job's samples/s
    again as tokens/s, and the status said tokensPerSecond."""
    from datetime import datetime

    from prometheus_client import generate_latest

    from finetune_operator import scrape, status
    from finetune_trainer.batches import encode_images, make_collate
    from finetune_trainer.config import DatasetSpec, ModelSpec, Task, TrainingSpec
    from finetune_trainer.data import load_dataset
    from finetune_trainer.distributed import World
    from finetune_trainer.models import load_model
    from finetune_trainer.pipeline import Progress
    from finetune_trainer.rearrange import new_head
    from finetune_trainer.train import Hooks, make_scheduler, train_loop

    data = load_dataset(DatasetSpec(uri="pvc://data/digits", maxTrainSamples=32), Task.IMAGE_CLASSIFICATION, 0)
    model = load_model(ModelSpec(task="image-classification", architecture="resnet18"), None, seed=0)
    new_head(model, "net.fc", 10, data.id2label, reinitialize=False)
    spec = TrainingSpec(batchSize=8, maxSteps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics = Metrics(CPU)
    progress = Progress(metrics, main=False)
    train_loop(model, optimizer, make_scheduler(optimizer, spec, 2), encode_images(data.train),
               make_collate(Task.IMAGE_CLASSIFICATION, 0, 16), spec, Task.IMAGE_CLASSIFICATION,
               World(rank=0, size=1, device=CPU), Hooks(on_step=lambda state, planned: progress.step(state, planned, None)))
    sample = scrape.parse(generate_latest(metrics.registry).decode())
    assert sample["samples_per_second"] > 0 and "tokens_per_second" not in sample
    # None: the merge patch clears it from the status
    assert status.progress_and_metrics(sample, 8, datetime(2026, 1, 1))["metrics"]["tokensPerSecond"] is None


def test_a_gpu_job_reports_its_gpu_memory_before_its_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU memory was set at steps only: 0 through loading, analysis and the baseline, with the model on the GPU, so
    the dashboard's GPU memory said 0 B and its running GPU jobs left the job out. Now read at each scrape."""
    import torch
    from prometheus_client import generate_latest

    from finetune_trainer.config import Stage

    allocated = [0]
    if not torch.cuda.is_available():  # this machine's stand-in for the allocator's peak
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated[0])
    metrics = Metrics(torch.device("cuda", 0))
    metrics.set_stage(Stage.BASELINE)
    if torch.cuda.is_available():
        weights = torch.ones(1 << 20, device="cuda")  # noqa: F841 (held while scraped)
    else:
        allocated[0] = 4 << 20
    body = generate_latest(metrics.registry).decode()
    value = next(float(line.split()[1]) for line in body.splitlines()
                 if line.startswith("finetune_trainer_gpu_memory_bytes "))
    assert value >= 4 << 20


@pytest.mark.parametrize(("gpu", "mfu"), [("NVIDIA H200", 0.5), ("Tesla T4", None)])
def test_mfu_is_reported_only_where_the_gpus_peak_is_known(monkeypatch: pytest.MonkeyPatch, gpu: str,
                                                          mfu: float | None) -> None:
    """A GPU missing from the peak table (a T4, a V100) had an MFU of 0 on the dashboard, as if it did nothing."""
    import torch
    from prometheus_client import generate_latest

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)  # no GPU here
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    metrics = Metrics(torch.device("cuda", 0))
    per_sample = StepFlops(0.5 * telemetry.PEAK_BF16_FLOPS["NVIDIA H200"] / 100, per_token=False)  # half at 100/s
    metrics.set_throughput((10.0, 10.0, 1000.0, 0.0, 0.0), per_sample)
    lines = [line for line in generate_latest(metrics.registry).decode().splitlines()
             if line.startswith("finetune_trainer_mfu ")]
    assert [float(line.split()[1]) for line in lines] == ([] if mfu is None else [pytest.approx(mfu)])
    assert "finetune_trainer_mfu 0.0" in generate_latest(Metrics(CPU).registry).decode()  # a CPU's


def test_the_rates_are_none_once_training_ends_and_the_status_keeps_its_last_training_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The throughput, steps/s and MFU gauges kept the last step's values: the dashboard's Throughput and MFU drew a
    run training at full speed through its final evaluation, its export and the linger. The step, the total and the
    loss stay (how far it got); the status keeps its last throughput and says no time is left."""
    from datetime import datetime

    import torch
    from prometheus_client import generate_latest

    from finetune_operator import scrape, status
    from finetune_trainer.config import Stage
    from finetune_trainer.pipeline import Progress
    from finetune_trainer.train import LoopState

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")  # no GPU here
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    metrics = Metrics(torch.device("cuda", 0))
    progress = Progress(metrics, main=False)
    progress.enter(Stage.TRAINING)
    state = LoopState()
    per_sample = StepFlops(0.5 * telemetry.PEAK_BF16_FLOPS["NVIDIA H200"] / 32, per_token=False)  # half at 32/s
    for _ in range(10):
        state.step, state.seconds, state.samples, state.tokens = state.step + 1, state.seconds + 1, \
            state.samples + 32, state.tokens + 32 * 128
        state.history.append({"step": state.step, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0})
        progress.step(state, 10, per_sample)

    def read() -> dict[str, Any]:
        body = generate_latest(metrics.registry).decode()
        return scrape.parse(body) | {"mfu": [float(line.split()[1]) for line in body.splitlines()
                                             if line.startswith("finetune_trainer_mfu ")]}

    training = read()
    assert training["samples_per_second"] == pytest.approx(32) and training["mfu"] == [pytest.approx(0.5)]
    assert training["steps_per_second"] > 0 and training["tokens_per_second"] == pytest.approx(32 * 128)
    before = status.progress_and_metrics(training, 32, datetime(2026, 1, 1))
    assert before["metrics"]["samplesPerSecond"] == pytest.approx(32)
    for stage in (Stage.EVALUATING, Stage.EXPORTING, Stage.DONE):
        progress.enter(stage)
        sample = read()
        assert sample == {"stage": stage.value, "loss": 0.5, "learning_rate": 1e-4, "step": 10.0,
                          "total_steps": 10.0, "epoch": 0.0, "mfu": []}, stage
        after = status.progress_and_metrics(sample, 32, datetime(2026, 1, 1, 0, 1))
        assert after["progress"]["etaSeconds"] == 0 and after["progress"]["percent"] == 100
        # the rates are left out of the merge patch: the last training read's stand
        assert status.merged(before["metrics"], after["metrics"]) == before["metrics"]
    # a CPU's MFU, 0 from the start, stays 0
    cpu = Metrics(CPU)
    cpu.set_stage(Stage.EVALUATING)
    assert "finetune_trainer_mfu 0.0" in generate_latest(cpu.registry).decode()


def test_the_gpus_peak_is_looked_up_once_for_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MFU gauge asked the driver for the GPU's name (and read WORLD_SIZE) at every step, for a peak that does not
    change during a run."""
    import torch

    asked: list[Any] = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)  # no GPU here
    metrics = Metrics(torch.device("cuda", 0))
    per_sample = StepFlops(0.5 * telemetry.PEAK_BF16_FLOPS["NVIDIA H200"] / 100, per_token=False)  # half at 100/s
    for step in range(1, 4):
        metrics.set_throughput((10.0 * step, 10.0 * step, 1000.0 * step, 0.0, 0.0), per_sample)
    assert len(asked) == 1 and metrics.mfu.value == pytest.approx(0.5)


def test_mfu_counts_flops_per_padded_token_so_the_probe_batchs_length_does_not_scale_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gauge took the FLOPs per sample of one probe batch, whose padded length length-bucketed batching draws with
    the seed (36 to 343 tokens on a corpus whose batches average 125): MFU read 0.3x to 2.7x what the steps did. Per
    padded token, probes of 4 and of 64 tokens give one MFU at one rate of padded tokens (within attention's part,
    quadratic in the length, which a wide model of one layer keeps small)."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune_trainer.analyze import step_flops
    from finetune_trainer.batches import Encoded, collate_text

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")  # no GPU here
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=256, num_hidden_layers=1, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=64))
    totals = (10.0, 100.0, 2_000.0, 40_000.0, 40_000.0)  # the run's: 200 samples/s of 20 padded tokens
    mfu = {}
    for length in (4, 64):
        rows = Encoded([[1] * length] * 4, [0] * 4, [length] * 4)
        flops = step_flops(model, [collate_text(rows, [0, 1, 2, 3], 0, causal=False)], None)
        metrics = Metrics(torch.device("cuda", 0))
        metrics.set_throughput(totals, flops)
        mfu[length] = metrics.mfu.value
    assert mfu[4] and mfu[64] == pytest.approx(mfu[4], rel=0.1)  # per sample: 16x


def test_a_run_stopped_early_ends_at_100_percent_with_no_time_left(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """Early stopping ended a run at step 4 of 40 planned: the gauges kept the plan, so the dashboard's Progress said
    10% and its ETA the time of the 36 steps never to come, for a job that had succeeded (its status said 100%)."""
    from finetune_operator import scrape
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from tiny import tiny_classifier_doc

    port = free_port()
    monkeypatch.setenv(PORT_ENV, str(port))
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    stop = {"patience": 1, "minDelta": 100}  # at the second evaluation
    doc = tiny_classifier_doc(tmp_path / "out", maxSteps=40, evalEverySteps=2, earlyStopping=stop)
    doc["evaluation"] = {"baseline": False}
    scraper = Scraper(port, 0.05)
    try:
        report = pipeline.run(TrainerConfig.model_validate(doc), tmp_path / "out")
    finally:
        scraper.stop()
    assert report["training"]["stopped_early"] and report["training"]["steps"] == 4
    last = scrape.parse(scraper.bodies[-1])
    assert (last["stage"], last["step"], last["total_steps"]) == ("Done", 4, 4)
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["progress"]["totalSteps"] == 4  # what the operator reads says the same end


def test_rank_0_answers_with_stage_starting_while_the_ranks_join_and_stops_when_the_join_fails(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Rank 0 served only after the join: through a slow rendezvous its Running pod refused the operator's scrapes
    (MetricsStale after a minute), and Starting was never exported."""
    from finetune_operator import scrape
    from finetune_trainer import distributed, pipeline
    from finetune_trainer.config import TrainerConfig
    from tiny import tiny_classifier_doc

    port = free_port()
    monkeypatch.setenv(PORT_ENV, str(port))
    monkeypatch.setenv(LINGER_ENV, "0")
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    monkeypatch.setattr(telemetry, "_last_exit_code", [None])
    joining, failed = threading.Event(), threading.Event()

    def join() -> None:  # a rendezvous that waits for the other ranks, then times out
        joining.set()
        failed.wait(10)
        raise RuntimeError("rendezvous timed out")

    monkeypatch.setattr(distributed, "join", join)
    cfg = TrainerConfig.model_validate(tiny_classifier_doc(tmp_path / "out"))
    errors: list[RuntimeError] = []

    def start() -> None:
        try:
            pipeline.run(cfg, tmp_path / "out")
        except RuntimeError as exc:
            errors.append(exc)

    run = threading.Thread(target=start)
    run.start()
    try:
        assert joining.wait(10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert scrape.parse(body)["stage"] == "Starting"
    finally:
        failed.set()
        run.join(10)
    assert [str(e) for e in errors] == ["rendezvous timed out"]
    assert json.loads((tmp_path / "termination-log").read_text())["stage"] == "Starting"
    with pytest.raises(OSError):  # the endpoint is closed with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)

