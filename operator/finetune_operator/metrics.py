"""The operator's own Prometheus metrics (`finetune_operator_*`), shared with the dashboard.

Labels stay bounded: phases, causes and reasons are small sets (`bounded`); no job names.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from finetune_operator.api import Phase
from finetune_operator.scrape import REASONS

REGISTRY = CollectorRegistry()
LEADER = Gauge("finetune_operator_leader", "1 on the active operator (it holds the Lease, or elects none), 0 on a "
               "standby replica", registry=REGISTRY)


def lead() -> None:
    """This replica is the active one (once a process). process_start_time_seconds comes from then on: the dashboard
    counts the operator's restarts from it without kube-state-metrics, where a standby's would read as one."""
    ProcessCollector(registry=REGISTRY)
    LEADER.set(1)


class JobsByPhase:
    """finetune_operator_jobs{phase}, counted from kopf's index of the FineTuneJobs at each scrape, so it is
    as fresh as the operator's watch (a gauge set by reconciles would lag the last one)."""

    def __init__(self) -> None:
        self.index: Mapping[str, Collection[tuple[str, str]]] | None = None  # each phase's jobs: namespace, uid
        self.gone: Collection[tuple[str, str]] = frozenset()  # those of jobs deleted unseen (handlers.Vanished)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("finetune_operator_jobs", "FineTuneJobs by phase", labels=["phase"])
        index, gone = self.index, self.gone
        for phase in Phase:
            jobs = tuple(index.get(phase.value, ())) if index is not None else ()
            family.add_metric([phase.value], sum(job not in gone for job in jobs))
        yield family


JOBS = JobsByPhase()
REGISTRY.register(JOBS)  # type: ignore[arg-type]
RECONCILE_SECONDS = Histogram(
    "finetune_operator_reconcile_duration_seconds", "Time one reconcile of a FineTuneJob took", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Up to a day: a job queued for GPUs (Kueue) waits hours, and past the top bucket the dashboard's quantiles read
# that bucket's bound (they said 1 h of any longer wait).
TIME_TO_RUNNING = Histogram(
    "finetune_operator_time_to_running_seconds", "From a FineTuneJob's creation to its first Running condition",
    registry=REGISTRY, buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400),
)
# A failure's reason, and the cause of the attempt after it, are the trainer's termination message's, which a user's
# own image writes: one writing a new word at each job or attempt would add a series each, for the operator's life.
MAX_LABEL_VALUES = 64
OTHER = "Other"
_label_values: dict[Counter, set[str]] = {}


def bounded(counter: Counter, value: str) -> Counter:
    """The child of a counter of one label for `value`, or for OTHER once MAX_LABEL_VALUES values have one."""
    taken = _label_values.setdefault(counter, set())
    if value not in taken and len(taken) >= MAX_LABEL_VALUES:
        value = OTHER
    taken.add(value)
    return counter.labels(value)


ATTEMPTS = Counter("finetune_operator_attempts_total", "Attempts started, by what started them", ["cause"], registry=REGISTRY)
FAILURES = Counter("finetune_operator_job_failures_total", "FineTuneJobs that ended Failed, by reason", ["reason"],
                   registry=REGISTRY)
POLL_ERRORS = Counter("finetune_operator_metric_poll_errors_total",
                      "Failed reads of rank 0's /metrics, by reason (not after it reported Done: it closes its "
                      "endpoint then)", ["reason"], registry=REGISTRY)
# At 0 from the start: a series whose first sample is 1 is an error that rate() and increase() never count.
for _reason in REASONS:
    POLL_ERRORS.labels(reason=_reason)
RECONCILE_ERRORS = Counter("finetune_operator_reconcile_errors_total", "Reconciles that raised, by exception type",
                           ["error"], registry=REGISTRY)


def serve(address: str, port: int) -> None:
    if port:
        start_http_server(port, addr=address, registry=REGISTRY)
