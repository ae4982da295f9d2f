"""Reading rank 0's /metrics from real sockets that misbehave: every fault becomes a ScrapeError with a reason,
within the time bound, and never anything else (an exception that escaped would fail the whole reconcile)."""

from __future__ import annotations

import ast
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fault_servers import OK, FaultServer, redirect, serving
from finetune_operator.scrape import TIMEOUT_SECONDS, ScrapeError, parse, scrape
from operator_fixture import free_port


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("hang", "MetricsTimeout"),
    ("drip", "MetricsTimeout"),
    ("header-drip", "MetricsTimeout"),
    ("continue-flood", "MetricsTimeout"),
    ("close", "MetricsUnreachable"),
    ("cut-short", "MetricsUnreachable"),
    ("error", "MetricsUnreachable"),
    ("not-http", "MetricsBadResponse"),
    ("garbage", "MetricsUnparsable"),
    ("foreign", "MetricsMissing"),
    ("huge", "MetricsTooLarge"),
])
def test_a_faulty_endpoint_is_a_scrape_error_with_its_reason(behaviour: str, reason: str) -> None:
    with FaultServer("127.0.0.1", 0, behaviour) as server:
        started = time.monotonic()
        with pytest.raises(ScrapeError) as error:
            scrape("127.0.0.1", server.port)
        assert error.value.reason == reason, str(error.value)
        # slack for a loaded machine, yet under the 5 s after which header-drip and continue-flood answer: a read
        # bounded by the timeout each (not as a whole) would get that answer, or be late
        assert time.monotonic() - started < TIMEOUT_SECONDS + 3.5


def test_an_answer_far_beyond_the_trainers_is_refused_before_it_is_parsed() -> None:
    """Rank 0's port is the tenant's: 1 MiB of gauges took the operator's parser up to 0.8 s of CPU, every poll
    (2 s), so a handful of such jobs held the operator's one core and every other job's status waited. What the
    trainer serves with every metric set is read, 8 times over too (a user's image adding its own); 64 times that is
    refused unparsed."""
    import torch
    from prometheus_client import generate_latest

    from finetune_trainer.config import Stage
    from finetune_trainer.telemetry import Metrics

    trainer = Metrics(torch.device("cpu"))
    trainer.set_stage(Stage.TRAINING)
    detection = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
                 "mar_small", "mar_medium", "mar_large", "loss")
    for phase in ("baseline", "training", "final"):
        trainer.set_eval(phase, dict.fromkeys(detection, 0.123456789))
    trainer.loss.set(2.5)
    full = generate_latest(trainer.registry)
    for body, expected in ((full, None), (full * 8, None), (full * 64, "MetricsTooLarge")):
        with FaultServer("127.0.0.1", 0, serving(body)) as server:
            if expected is None:
                assert scrape("127.0.0.1", server.port)["loss"] == 2.5
            else:
                with pytest.raises(ScrapeError) as error:
                    scrape("127.0.0.1", server.port)
                assert error.value.reason == expected


def test_nothing_listening_is_unreachable_and_a_good_endpoint_is_read() -> None:
    port = free_port()
    with pytest.raises(ScrapeError) as error:
        scrape("127.0.0.1", port)
    assert error.value.reason == "MetricsUnreachable"
    with FaultServer("127.0.0.1", port, "ok"):
        assert scrape("127.0.0.1", port) == {"step": 7.0}


def test_a_connect_that_times_out_is_a_timeout_not_unreachable() -> None:
    """A SYN dropped (a default-deny NetworkPolicy) times the connect out, which urllib wraps in a URLError: it read
    MetricsUnreachable, as a refusal does. A listener whose accept backlog is full drops SYNs alike."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        port, held = server.getsockname()[1], []
        try:
            while len(held) < 16:  # the backlog takes a connection or two, then every SYN is dropped
                held.append(socket.create_connection(("127.0.0.1", port), timeout=0.2))
        except TimeoutError:
            pass
        try:
            assert len(held) < 16, "the backlog never filled"
            with pytest.raises(ScrapeError) as error:
                scrape("127.0.0.1", port, timeout=0.3)
            assert error.value.reason == "MetricsTimeout", error.value
        finally:
            for sock in held:
                sock.close()


def test_every_poll_error_reason_is_exported_before_its_first_error() -> None:
    """A labelled counter first exported at 1 is a series that starts at 1: rate() and increase() never count that
    error, so the dashboard's "Metric poll errors" panel showed nothing for a lone MetricsTimeout."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from finetune_operator import metrics, scrape as scrape_module

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())}
    exported = {s.labels["reason"] for s in families["finetune_operator_metric_poll_errors"].samples
                if s.name.endswith("_total")}
    assert raised_reasons() <= set(scrape_module.REASONS) and set(scrape_module.REASONS) <= exported


def raised_reasons() -> set[str]:
    """The reason of every ScrapeError(...) in the operator's code, read from its source: a hand-typed list passed
    a new reason left out of REASONS, whose first error was then never counted."""
    from finetune_operator import scrape as scrape_module

    reasons = set()
    for source in Path(scrape_module.__file__).parent.glob("*.py"):
        for call in ast.walk(ast.parse(source.read_text())):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "ScrapeError":
                reason = call.args[0]
                assert isinstance(reason, ast.Constant), f"{source.name}:{call.lineno}: a reason the test can read"
                reasons.add(reason.value)
    assert "MetricsTimeout" in reasons  # the source was read
    return reasons


def test_a_gauge_json_cannot_carry_reads_as_absent() -> None:
    """Valid Prometheus text from whatever answers on rank 0's port (a user's own trainer image): a NaN step failed
    every reconcile (int(nan)) and a NaN loss got the whole status patch refused, so the job's status froze."""
    from finetune_operator.status import progress_and_metrics

    sample = parse("finetune_trainer_step NaN\nfinetune_trainer_total_steps 10\nfinetune_trainer_loss +Inf\n"
                   "finetune_trainer_epoch 1\n")
    assert sample == {"total_steps": 10.0, "epoch": 1.0}
    # No numbers: only that rank 0 was read.
    assert progress_and_metrics(sample, 16, datetime(2026, 12, 1)) == {
        "progress": {"updatedAt": "2026-12-01T00:00:00Z"}}


def test_rank_0_is_read_directly_whatever_proxy_the_operators_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster-wide proxy put HTTP_PROXY in the operator's environment (OpenShift's OLM does), with the pod network
    in NO_PROXY as a CIDR, which Python's urllib does not read: every scrape of a pod IP went to the proxy, which
    cannot reach it, and every running job was MetricsStale."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "10.128.0.0/14,127.0.0.0/8,.cluster.local,.svc")
    with FaultServer("127.0.0.1", 0, "ok") as server:
        assert scrape("127.0.0.1", server.port) == {"step": 7.0}


def test_a_redirect_from_rank_0_is_not_followed() -> None:
    """Rank 0's port is the tenant's (a user's own image): a 302 sent the operator's GET wherever the tenant chose, from
    the operator's place in the network (a cloud's metadata address, a service only the operator may reach), and the
    answer's first unparsable line came back in the job's MetricsStale message."""
    # The target stands for the address the tenant may not reach itself.
    with FaultServer("127.0.0.1", 0, "ok") as target, \
            FaultServer("127.0.0.1", 0, redirect(f"http://127.0.0.1:{target.port}/latest/meta-data/")) as server:
        with pytest.raises(ScrapeError) as error:
            scrape("127.0.0.1", server.port)
        assert error.value.reason == "MetricsUnreachable" and "302" in str(error.value), str(error.value)
        assert target.connections == 0


def test_a_stage_the_status_does_not_know_reads_as_absent() -> None:
    """A trainer image of another version (or a user's own) reporting a stage outside status.stage's enum got every
    status patch refused whole, so the running job's status froze."""
    from finetune_operator.status import progress_and_metrics

    sample = parse('finetune_trainer_stage{stage="Healing"} 1\nfinetune_trainer_stage{stage="Training"} 0\n'
                   "finetune_trainer_step 3\nfinetune_trainer_total_steps 10\n")
    assert sample == {"step": 3.0, "total_steps": 10.0}
    assert "stage" not in progress_and_metrics(sample, 16, datetime(2026, 12, 1))
    # Before its first step it reports only the stage: what answers is still the trainer, not MetricsMissing.
    assert parse('finetune_trainer_stage{stage="Healing"} 1\n') == {}


def test_an_endpoint_that_hangs_is_read_less_often_once_stale_and_its_error_stands_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a hanging endpoint held one of the operator's handler threads for the whole timeout, every poll:
    a few dozen such jobs (pods behind a default-deny NetworkPolicy) held all of them. Once its job is stale it is
    read less often, its last error standing; before that (a blip) and when it fails fast, it is read every poll."""
    import functools
    from datetime import timezone

    from finetune_operator import handlers, metrics
    from finetune_operator.reconcile import Observed
    from finetune_operator.status import STALE_AFTER_SECONDS

    later = [0.0]  # seconds the clock of the backoff is moved on; what a read takes is real, and small beside a poll
    monkeypatch.setattr(handlers, "time", type("Clock", (), {"monotonic": lambda: time.monotonic() + later[0]}))
    # 5 s polls: stale after 3 of them (status.stale_after: 15 s, not STALE_AFTER_SECONDS, which was 2 polls, and one
    # poll at pollSeconds 10), so from the fourth slow read on, later ones are held back
    poll = STALE_AFTER_SECONDS / 2
    slow = handlers.SlowScrapes(poll_seconds=poll)

    def sample(name: str) -> Observed:
        running = {"type": "Running", "status": "True", "reason": "Training",  # long since: no longer starting
                   "lastTransitionTime": "2026-12-01T12:00:00Z"}
        body = {"metadata": {"name": name, "namespace": "ns", "uid": "u"}, "spec": {},
                "status": {"attempts": 1, "conditions": [running]}}
        pods = [{"name": f"{name}-1-0-x", "attempt": 1, "index": 0, "phase": "Running", "ip": "127.0.0.1"}]
        seen = Observed(body, [], pods, datetime.now(timezone.utc).replace(tzinfo=None))
        handlers._sample(seen, slow, "ns", name)
        return seen

    def timeouts() -> float:
        return metrics.REGISTRY.get_sample_value("finetune_operator_metric_poll_errors_total",
                                                 {"reason": "MetricsTimeout"}) or 0.0

    counted = timeouts()
    with FaultServer("127.0.0.1", 0, "hang") as hanging:
        monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=hanging.port))
        reads = []
        for _ in range(12):  # a tick every poll
            seen = sample("hung")
            assert seen.sample is None and seen.scrape_error and seen.scrape_error[0] == "MetricsTimeout"
            reads.append(hanging.connections)
            later[0] += poll
    # every poll until stale (polls 0, 1, 2, 3), then 2 polls later (5) and 4 after that (9)
    assert reads == [1, 2, 3, 4, 4, 5, 5, 5, 5, 6, 6, 6], reads
    assert timeouts() - counted == 6  # what is counted is reads, not ticks

    with FaultServer("127.0.0.1", 0, "close") as closing:
        monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=closing.port))
        for _ in range(4):
            assert sample("refused").scrape_error[0] == "MetricsUnreachable"
            later[0] += poll
        assert closing.connections == 4
    with FaultServer("127.0.0.1", 0, "ok") as answering:  # the hung job's rank 0 answers again at its next read
        monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=answering.port))
        later[0] += poll * 8
        assert sample("hung").sample == {"step": 7.0} and sample("hung").sample == {"step": 7.0}
    assert not slow.slow


def test_scrapes_take_half_the_handler_threads_at_most_and_a_tick_without_a_slot_reads_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SlowScrapes holds back endpoints that fail slowly; one that answers just inside the time bound (a tenant's
    trainer sleeping 0.95 s) was read every poll, and a few dozen held every handler thread: every other job's
    reconcile queued behind them. With every slot taken a tick reads nothing, and says no error."""
    import functools
    import threading
    from datetime import timezone

    from finetune_operator import handlers
    from finetune_operator.reconcile import Observed

    def sample() -> Observed:
        body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {}, "status": {"attempts": 1}}
        pods = [{"name": "j-1-0-x", "attempt": 1, "index": 0, "phase": "Running", "ip": "127.0.0.1"}]
        seen = Observed(body, [], pods, datetime.now(timezone.utc).replace(tzinfo=None))
        handlers._sample(seen, handlers.SlowScrapes(poll_seconds=2), "ns", "j")
        return seen

    # The reads are held until the ticks without a slot are done, whatever that takes on a loaded machine: a bound of
    # 0.8 s let a slot go back before every tick had started, and a tick that started late read in it. Each read's
    # timeout outlasts that wait, so a slot is let go only by the answer.
    held = 30.0
    answer = threading.Event()
    port = free_port()
    monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=port, timeout=held * 2))

    def slowly(conn: Any, stop: threading.Event) -> None:
        answer.wait(held)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK))

    with FaultServer("127.0.0.1", port, slowly) as server:
        ticks = [threading.Thread(target=sample) for _ in range(handlers.HANDLER_THREADS)]
        for tick in ticks:
            tick.start()
        deadline = time.monotonic() + held
        # Half of them find no slot and return at once; a tick that waited for a slot instead, or a read beyond
        # half, keeps them from it
        while (sum(not tick.is_alive() for tick in ticks) < len(ticks) // 2 and time.monotonic() < deadline
               and server.connections <= handlers.HANDLER_THREADS // 2):
            time.sleep(0.01)
        answer.set()
        for tick in ticks:
            tick.join()
        assert server.connections == handlers.HANDLER_THREADS // 2
    with FaultServer("127.0.0.1", port, "ok"):
        taken = [handlers.SCRAPE_SLOTS.acquire(blocking=False) for _ in range(handlers.HANDLER_THREADS // 2)]
        try:
            assert all(taken)
            seen = sample()
            assert seen.sample is None and seen.scrape_error is None
        finally:
            for _ in taken:
                handlers.SCRAPE_SLOTS.release()
        assert sample().sample == {"step": 7.0}


def test_reads_that_fail_once_rank_0_reported_done_are_no_poll_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 closes its endpoint on purpose once it reported Done and its last values were read, minutes before its
    pods exit on a loaded node: each poll meanwhile counted an error, so every job's end fired an alert on the
    counter. An attempt's own failed reads still count, the attempt before's Done notwithstanding."""
    import functools
    from datetime import timezone

    from finetune_operator import handlers, metrics
    from finetune_operator.reconcile import Observed

    monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=free_port()))  # nothing listens: refused
    running = {"type": "Running", "status": "True", "reason": "Training", "lastTransitionTime": "2026-12-01T12:00:00Z"}

    def errors_counted(read_at: str) -> float:
        status = {"attempts": 1, "stage": "Done", "conditions": [running], "progress": {"updatedAt": read_at}}
        body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {}, "status": status}
        pods = [{"name": "j-1-0-x", "attempt": 1, "index": 0, "phase": "Running", "ip": "127.0.0.1"}]
        before = metrics.REGISTRY.get_sample_value("finetune_operator_metric_poll_errors_total",
                                                   {"reason": "MetricsUnreachable"}) or 0.0
        seen = Observed(body, [], pods, datetime.now(timezone.utc).replace(tzinfo=None))
        handlers._sample(seen, handlers.SlowScrapes(poll_seconds=2), "ns", "j")
        assert seen.scrape_error and seen.scrape_error[0] == "MetricsUnreachable"
        return metrics.REGISTRY.get_sample_value("finetune_operator_metric_poll_errors_total",
                                                 {"reason": "MetricsUnreachable"}) - before

    assert errors_counted("2026-12-01T12:05:00Z") == 0  # Done read in this attempt
    assert errors_counted("2026-12-01T11:55:00Z") == 1  # Done was the attempt before's


def test_reads_that_fail_while_rank_0_starts_are_no_poll_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 serves its metrics once Python has imported torch and the trainer (tens of seconds from a cold image):
    each poll before counted an error, so every job's start fired an alert on the counter. As MetricsStale, they count
    once the attempt has run STARTING_SECONDS unread, or after its first read."""
    import functools
    from datetime import timedelta, timezone

    from finetune_operator import handlers, metrics
    from finetune_operator.reconcile import Observed
    from finetune_operator.status import STARTING_SECONDS, timestamp

    monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=free_port()))  # nothing listens: refused
    now = datetime.now(timezone.utc).replace(tzinfo=None)

    def errors_counted(running_for: float | None, read_after: float | None = None) -> float:
        status: dict[str, Any] = {"attempts": 1}
        if running_for is not None:
            turned = now - timedelta(seconds=running_for)
            status["conditions"] = [{"type": "Running", "status": "True", "reason": "Training",
                                     "lastTransitionTime": timestamp(turned)}]
            if read_after is not None:
                status["progress"] = {"updatedAt": timestamp(turned + timedelta(seconds=read_after))}
        body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {}, "status": status}
        pods = [{"name": "j-1-0-x", "attempt": 1, "index": 0, "phase": "Running", "ip": "127.0.0.1"}]
        before = metrics.REGISTRY.get_sample_value("finetune_operator_metric_poll_errors_total",
                                                   {"reason": "MetricsUnreachable"}) or 0.0
        seen = Observed(body, [], pods, now)
        handlers._sample(seen, handlers.SlowScrapes(poll_seconds=2), "ns", "j")
        assert seen.scrape_error and seen.scrape_error[0] == "MetricsUnreachable"  # said, whether counted or not
        return metrics.REGISTRY.get_sample_value("finetune_operator_metric_poll_errors_total",
                                                 {"reason": "MetricsUnreachable"}) - before

    assert errors_counted(None) == 0  # the tick that first sees the pod run: the status says Running later
    assert errors_counted(5) == 0
    assert errors_counted(STARTING_SECONDS + 5) == 1  # never answered: counted
    assert errors_counted(10, read_after=3) == 1  # it answered, then stopped


def test_metrics_that_another_pod_serves_are_refused_and_the_pods_own_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank 0 deleted while the operator's watch missed it (a relist gap) stays in its index with its IP, and the
    IP goes to the next pod, perhaps another job's trainer: its numbers were read into this job's status. The trainer
    names its pod (FINETUNE_POD_UID, the downward API's metadata.uid), and another pod's answer is refused."""
    import torch
    from prometheus_client import generate_latest

    from finetune_trainer.telemetry import POD_UID_ENV, Metrics

    monkeypatch.setenv(POD_UID_ENV, "7f0c2d4e-rank-0")
    trainer = Metrics(torch.device("cpu"))
    trainer.step.set(12)
    with FaultServer("127.0.0.1", 0, serving(generate_latest(trainer.registry))) as server:
        assert scrape("127.0.0.1", server.port, pod_uid="7f0c2d4e-rank-0")["step"] == 12
        with pytest.raises(ScrapeError) as error:
            scrape("127.0.0.1", server.port, pod_uid="1b9e-another-pod")
    assert error.value.reason == "MetricsFromAnotherPod"
    assert "7f0c2d4e-rank-0" in str(error.value) and "1b9e-another-pod" in str(error.value)
    # A trainer image from before the name is read; so is any answer where the index has no uid to compare.
    monkeypatch.delenv(POD_UID_ENV)
    assert parse(generate_latest(Metrics(torch.device("cpu")).registry).decode(), "1b9e-another-pod") == {}
    assert parse(generate_latest(trainer.registry).decode())["step"] == 12
