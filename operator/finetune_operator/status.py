"""Status from observations (pure): conditions kept as metav1 wants them, the phase and reason
derived from them, and progress and metrics from rank 0's numbers."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from finetune_operator.api import (MAX_FINDINGS, MAX_LAYERS, MESSAGE_MAX, ConditionType, FineTuneJobStatus, Phase,
                                   reason_or)
from finetune_operator.outcome import NOT_CREATED, QUEUED, STUCK_WAITING
from finetune_trainer.config import Stage
from finetune_trainer.rules import error_lines

T = ConditionType
METRICS_READ = "MetricsRead"  # MetricsStale's reason once rank 0 answers again (told by an Event)
SUSPENDED = "Suspended"  # Suspended True, and what stops for it
RESUMED = "Resumed"  # Suspended False, and Restarting True when the attempt it stopped is followed by the next
# Rank 0's metrics count as stale once no read succeeded for this long (a few polls: one slow answer is no news), or
# for three polls where they are longer (`stale_after`).
STALE_AFTER_SECONDS = 10
STALE_AFTER_POLLS = 3
# Before an attempt's first read its rank 0 is still starting (torchrun, then importing torch and the model's code
# from a cold image: tens of seconds on a GPU node), which is no news either.
STARTING_SECONDS = 60

# Once rank 0 reported Done it closes its metrics after they are read (the telemetry linger ends on that read), so
# the clock starts at the last successful read; its pods exiting (the process group's teardown, the Job's
# completion) may take minutes on a loaded node. Past that, a pod that still has not exited is stuck (an NCCL
# teardown, a non-daemon thread).
DONE_EXIT_SECONDS = 300
NOT_EXITING = "NotExiting"  # MetricsStale's reason for that


def stale_after(poll_seconds: float) -> float:
    """Seconds without a good read before rank 0's metrics are stale, at `poll_seconds` (settings.pollSeconds, up to
    300): a fixed 10 s was one poll at 10 s and less than one at 30, so one read that timed out made a job
    MetricsStale, with a Warning Event, and the next poll's read took it back."""
    return max(STALE_AFTER_SECONDS, STALE_AFTER_POLLS * poll_seconds)


def starting_grace(poll_seconds: float) -> float:
    """Seconds an attempt's rank 0 has to answer its first read (STARTING_SECONDS), never fewer than `stale_after`."""
    return max(STARTING_SECONDS, stale_after(poll_seconds))


def timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def short(text: str, limit: int = MESSAGE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Conditions:
    """The conditions of one status, changed in place; a condition keeps its lastTransitionTime
    while its status stays the same (a merge patch replaces the whole list, so all are sent)."""

    def __init__(self, existing: list[dict[str, Any]], generation: int, now: datetime) -> None:
        self.by_type = {c["type"]: dict(c) for c in existing}
        self.generation = generation
        self.now = timestamp(now)

    def set(self, kind: ConditionType, true: bool, reason: str, message: str = "") -> None:
        status = "True" if true else "False"
        old = self.by_type.get(kind.value)
        changed = old is None or old.get("status") != status
        self.by_type[kind.value] = {
            # str(): a backstop for words from a trainer's message (any JSON there), which crashed short() or got the
            # status patch refused
            "type": kind.value, "status": status, "reason": reason, "message": short(str(message)),
            "lastTransitionTime": self.now if changed else old["lastTransitionTime"],
            "observedGeneration": self.generation,
        }

    def clear(self, kind: ConditionType, reason: str, message: str = "") -> None:
        """Set False, but only where it was ever set: absent conditions stay absent."""
        if kind.value in self.by_type:
            self.set(kind, False, reason, message)

    def drop(self, kind: ConditionType) -> None:
        """Absent again, as before it was ever said (the whole list is written)."""
        self.by_type.pop(kind.value, None)

    def true(self, kind: ConditionType) -> bool:
        return self.by_type.get(kind.value, {}).get("status") == "True"

    def get(self, kind: ConditionType) -> dict[str, Any]:
        return self.by_type.get(kind.value, {})

    def as_list(self) -> list[dict[str, Any]]:
        """In ConditionType's order; a type this version does not know (another version's) is kept, last."""
        order = {kind.value: i for i, kind in enumerate(ConditionType)}
        return sorted(self.by_type.values(), key=lambda c: order.get(c["type"], len(order)))


def condition(existing: list[dict[str, Any]] | None, kind: ConditionType) -> dict[str, Any]:
    """One condition of a status's list, {} when absent."""
    return next((c for c in existing or [] if c["type"] == kind.value), {})


def not_started(condition: dict[str, Any]) -> bool:
    """Whether a condition is Running=False saying why an attempt's containers have not started (an image that does
    not pull, a volume that does not mount), rather than that a run ended."""
    return condition.get("type") == T.RUNNING.value and condition.get("status") == "False" and (
        condition["reason"] in STUCK_WAITING or condition["reason"] in NOT_CREATED)


def phase_of(conditions: Conditions) -> tuple[Phase, str | None]:
    """The phase and its reason: a pure function of the conditions, in order of precedence. A pending job's reason
    is what its attempt waits for now (its quota, a node, its queue, an image), else why there is a new attempt."""
    for kind, phase in ((T.FAILED, Phase.FAILED), (T.SUCCEEDED, Phase.SUCCEEDED), (T.SUSPENDED, Phase.SUSPENDED),
                        (T.RUNNING, Phase.RUNNING)):
        if conditions.true(kind):
            return phase, conditions.get(kind)["reason"]
    running = conditions.get(T.RUNNING)
    for condition in (conditions.get(T.CREATED), conditions.get(T.SCHEDULED), running if not_started(running) else {}):
        if condition.get("status") == "False":
            return Phase.PENDING, condition["reason"]
    for condition in (conditions.get(T.RESTARTING) if conditions.true(T.RESTARTING) else {}, running,
                      conditions.get(T.CREATED)):
        if condition:
            return Phase.PENDING, condition["reason"]
    return Phase.PENDING, None


# Conditions whose each True is one attempt's (its message names the attempt): retries that failed before any tick saw
# them run kept Restarting True with one reason, and Created AttemptCreated, so attempts 2 to N made no Event at all.
PER_ATTEMPT = (T.CREATED.value, T.RESTARTING.value)


def transitions(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """One Event (type, reason, message) per condition that changed status or reason, or attempt (`PER_ATTEMPT`)."""
    def state(c: dict[str, Any]) -> tuple[str, str, str]:
        return c["status"], c["reason"], c["message"] if c["type"] in PER_ATTEMPT and c["status"] == "True" else ""

    old = {c["type"]: state(c) for c in before}
    warn = {(T.FAILED.value, "True"), (T.RESTARTING.value, "True"), (T.CREATED.value, "False"),
            (T.SCHEDULED.value, "False"), (T.METRICS_STALE.value, "True"), (T.RUNNING.value, "False")}
    events = []
    for c in after:
        if old.get(c["type"]) == state(c):
            continue
        if c["status"] == "False" and c["type"] not in (T.CREATED.value, T.SCHEDULED.value, T.SUSPENDED.value) \
                and c["reason"] != METRICS_READ and not not_started(c):
            continue  # "not running any more" is told by the condition that became true
        # A restart because the user resumed the job, an attempt held for a suspend, or one its queue holds until it
        # admits it (each job's wait in Kueue), is no warning: alerts on Warning Events fired at each resume.
        kind = "Warning" if (c["type"], c["status"]) in warn and c["reason"] not in (RESUMED, SUSPENDED, QUEUED) \
            else "Normal"
        text = c["message"] or f"{c['type']} is {c['status']}"
        if (kind, c["reason"], text) not in events:  # a failure that ends a back-off says so once, not for Created too
            events.append((kind, c["reason"], text))
    return events


def merged(target: Any, patch: Any) -> Any:
    """`target` once the JSON merge patch `patch` is applied (RFC 7386): what the apiserver will store."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key), value)
    return out


def composed(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """One merge patch that does what `first` and then `then` do, but for a field `first` deletes and `then` sets to
    an object, which no one patch says (the operator's status patches do not)."""
    out = dict(first)
    for key, value in then.items():
        out[key] = composed(first[key], value) if isinstance(value, dict) and isinstance(first.get(key), dict) else value
    return out


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The fields of `new` that would change `old` once merge-patched: an unchanged status costs no patch."""
    return {field: value for field, value in new.items() if merged(old.get(field), value) != old.get(field)}


def schema_checked(changes: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A status merge patch without the fields the status schema would refuse, and one line for each thing refused.
    The apiserver refuses a patch whole: one value from a trainer (its termination message and its port are the
    image's to write) that the schema refuses kept a job's conditions and phase from being written, for good. A
    backstop: such values are bounded where they are read."""
    sent = {field: _known(field, _set(value)) for field, value in changes.items() if value is not None}
    # Nothing set (most ticks of a job at rest) needs no check; one of the whole costs a third of one for each field.
    if not sent or not _refusals(sent):
        return changes, []
    refused = {field: lines for field in sent if (lines := _refusals({field: sent[field]}))}
    if "conditions" in refused:  # the phase and its reason are the conditions': written alone, they would belie them
        refused |= {field: [] for field in ("phase", "reason") if field in changes}
    return {f: v for f, v in changes.items() if f not in refused}, [line for lines in refused.values() for line in lines]


def _set(value: Any) -> Any:
    """What a merge patch sets: its nulls delete (a field the schema may require, once set)."""
    return {k: _set(v) for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def _refusals(status: dict[str, Any]) -> list[str]:
    """What the status schema says against `status`: nothing when it takes it."""
    try:
        FineTuneJobStatus.from_wire(status)
    except ValidationError as exc:
        return error_lines(exc, root="status")
    except ValueError as exc:  # no JSON (NaN)
        return [f"status.{', '.join(status)}: {exc}"]
    return []


def _known(field: str, value: Any) -> Any:
    """What this version judges of a status field: not the conditions of a type it does not know, another version's,
    which it sends back as they were stored (Conditions.as_list)."""
    return [c for c in value if c.get("type") in KNOWN_CONDITIONS] if field == "conditions" else value


KNOWN_CONDITIONS = frozenset(kind.value for kind in ConditionType)


def progress_and_metrics(sample: dict[str, Any], global_batch: int, now: datetime) -> dict[str, Any]:
    """status.progress, status.metrics and status.stage from rank 0's metrics. Before an attempt's first step the
    trainer has no step to report (loading, the baseline): a resumed attempt keeps the previous one's progress, but
    updatedAt says the read succeeded. MetricsStale counts from it, so without it one failed read after the attempt's
    first minute (a baseline on a large test split takes many) made a job stale that had been read at every poll."""
    out: dict[str, Any] = {"stage": sample["stage"]} if sample.get("stage") else {}
    if sample.get("step") is None:
        return out | {"progress": {"updatedAt": timestamp(now)}}
    # The port is the tenant's: a step of -1 or 1e30 was refused by the status schema at every poll, for good.
    step, total = count(sample["step"]) or 0, count(sample.get("total_steps")) or 0
    progress: dict[str, Any] = {
        "percent": min(100, int(100 * step / total)) if total else 0,
        "step": step, "totalSteps": total, "epoch": max(0.0, round(number(sample.get("epoch")) or 0.0, 3)),
        "updatedAt": timestamp(now),
    }
    # An unknown value is an explicit None, which clears the previous one from the merge-patched status.
    # Never below 0: a run resumed past a total that shrank while suspended (maxSteps, workers) has none left.
    # The trainer's steps/s; a trainer image without that gauge, its samples/s over the global batch (too long where
    # batches are short of it: a small split's, an epoch's last).
    samples_per_second = number(sample.get("samples_per_second")) or 0.0
    steps_per_second = number(sample.get("steps_per_second")) or samples_per_second / global_batch
    # Once training has ended (the final evaluation, the export) the trainer serves no rates (none are made): no time
    # is left, and status.metrics keeps the last training throughput read, as the termination message gives it.
    trained = sample.get("stage") in TRAINED
    progress["etaSeconds"] = 0 if trained else (
        count((total - step) / steps_per_second) if steps_per_second > 0 and total else None)
    metrics = {k: _rounded(sample.get(s)) for k, s in METRICS if not (trained and s in RATES)}
    return out | {"progress": progress, "metrics": metrics}


# status.metrics' fields and the trainer's gauges they are read from
METRICS = (("loss", "loss"), ("learningRate", "learning_rate"), ("samplesPerSecond", "samples_per_second"),
           ("tokensPerSecond", "tokens_per_second"))
RATES = ("samples_per_second", "tokens_per_second")  # status.metrics' training rates
TRAINED = frozenset(s.value for s in (Stage.EVALUATING, Stage.EXPORTING, Stage.DONE))  # stages after training


def _rounded(value: Any) -> float | None:
    """Rounded for `kubectl get` (the Loss column prints every digit); Prometheus keeps the exact values. Rounded up
    near a float's limit, a value would pass it: that one is kept as it is."""
    if (found := number(value)) is None:
        return None
    rounded = float(f"{found:.4g}")
    return rounded if math.isfinite(rounded) else found


INT64_MAX = 2**63 - 1


def count(value: Any) -> int | None:
    """A count as the status schema takes it (an int64, at least 0) of a number a trainer reported (its termination
    message and its metrics are the image's to write); None for what is no number, a bool too (Python's int)."""
    if isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and not isinstance(value, bool):
        return min(max(int(value), 0), INT64_MAX)
    return None


def number(value: Any) -> float | None:
    """A finite float of a number a trainer reported; None for what is none (a bool, text, an integer past a float's
    range): the status schema refuses the one, JSON has no other."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        found = float(value)
    except OverflowError:
        return None
    return found if math.isfinite(found) else None


def finished_progress(message: dict[str, Any], last: dict[str, Any], now: datetime) -> dict[str, Any] | None:
    """status.progress of a run that succeeded: the steps rank 0's termination message says it took (an early stop
    takes fewer than planned; read `now`), else the last read's total; None when neither says."""
    reported = message.get("progress")
    reported = reported if isinstance(reported, dict) else {}
    step, epoch = reported.get("step"), number(reported.get("epoch"))
    if (steps := count(step)) is None or step < 0:  # none it could mean (a bool, text, a step below 0)
        total = last.get("totalSteps")
        return last | {"percent": 100, "step": total, "etaSeconds": 0} if total else None
    progress = last | {"percent": 100, "step": steps, "totalSteps": steps, "etaSeconds": 0, "updatedAt": timestamp(now)}
    return progress | ({"epoch": round(epoch, 3)} if epoch is not None and epoch >= 0 else {})


def finished_metrics(message: dict[str, Any]) -> dict[str, float] | None:
    """status.metrics from the termination message (the last step's), for a run whose metrics no read reached."""
    reported = message.get("metrics")
    if not isinstance(reported, dict):
        return None
    return {k: v for k, _ in METRICS if (v := _rounded(reported.get(k))) is not None} or None


def _summary(baseline: dict[str, float], final: dict[str, float]) -> str:
    parts = []
    for metric, value in list(final.items())[:2]:
        before = baseline.get(metric)
        parts.append(f"{metric} {_figure(before)}→{_figure(value)}" if before is not None
                     else f"{metric} {_figure(value)}")
    return ", ".join(parts)


def _figure(value: float) -> str:
    """Three decimals, or three significant digits where three decimals show fewer (a detector's first mAPs, 0.0004
    then 0.0009, read "map 0.000→0.001") or a needlessly long number (a perplexity of 1e30 took 35 characters)."""
    return format(value, ".3f" if value == 0 or 0.1 <= abs(value) < 1e6 else ".3g")


def evaluation_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """status.evaluation from the trainer's termination message."""
    evaluation = _object(result.get("evaluation"))
    final, baseline, teacher = (_metric_values(evaluation.get(phase)) for phase in ("final", "baseline", "teacher"))
    if not final and not baseline:
        return None
    return {"baseline": baseline, "final": final, **({"teacher": teacher} if teacher else {}),
            "summary": short(_summary(baseline, final), 256)}


def stage_of(message: dict[str, Any]) -> str | None:
    """The stage a termination message says the trainer stopped in; None for what is no stage (an image's own)."""
    try:
        return Stage(message.get("stage")).value
    except ValueError:
        return None


def _object(value: Any) -> dict[str, Any]:
    """A JSON object of a trainer's message, where the image may have written any JSON."""
    return value if isinstance(value, dict) else {}


def _metric_values(values: Any) -> dict[str, float]:
    """The numbers of a metric name to value object, at most the 16 the CRD takes."""
    return dict([(k, v) for k, raw in _object(values).items() if (v := number(raw)) is not None][:16])


def analysis_of(result: dict[str, Any]) -> dict[str, Any] | None:
    analysis = result.get("analysis")
    if not isinstance(analysis, dict):
        return None
    out: dict[str, Any] = {k: n for k in ("totalParameters", "trainableParameters")
                           if (n := count(analysis.get(k))) is not None}
    if importance := _numbers(analysis.get("layerImportance"), MAX_LAYERS):
        out["layerImportance"] = importance
    severity = {"fatal": 0, "warning": 1, "info": 2}
    found = analysis.get("findings")
    findings = [f for f in found if isinstance(f, dict) and isinstance(f.get("severity"), str)
                and f["severity"] in severity] if isinstance(found, list) else []
    findings.sort(key=lambda f: severity[f["severity"]])
    out["findings"] = [{"severity": f["severity"], "code": reason_or(f.get("code"), "Finding"),
                        "message": short(str(f.get("message", "")))} for f in findings[:MAX_FINDINGS]]
    return out


def _numbers(values: Any, limit: int) -> list[float]:
    return [v for v in map(number, values[:limit]) if v is not None] if isinstance(values, list) else []


def pruning_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """status.pruning from the trainer's termination message."""
    pruning = result.get("pruning")
    if not isinstance(pruning, dict):
        return None
    out: dict[str, Any] = {"removedLayers": [int(i) for i in _numbers(pruning.get("removedLayers"), MAX_LAYERS)
                                             if 0 <= i <= INT64_MAX]}
    for key in ("parameters", "latencyMs"):
        pair = _object(pruning.get(key))
        before, after = number(pair.get("before")), number(pair.get("after"))
        if before is not None and after is not None:
            out[key] = {"before": before, "after": after}
    if isinstance(pruning.get("metricsBefore"), dict):
        out["metricsBefore"] = _metric_values(pruning["metricsBefore"])
    return out
