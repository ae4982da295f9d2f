"""One reconcile of a FineTuneJob, as a pure function: what is observed in, what to do out.

Level-based: the decision reads only the object, its children's summaries (the indexes) and
rank 0's latest metrics, so a restarted operator, a missed event or a repeated tick all
land on the same answer. Two rules keep it safe under crashes and stale reads:

- the attempt number is the larger of `status.attempts` and the newest child's attempt,
  and children have deterministic names, so nothing is ever created twice;
- a retry is decided first (status: attempts+1, failures counted) and its children are
  created on a later tick, so a crash between the two can neither lose nor double-count
  a failure. A repeated decision from a stale object writes the same numbers again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from finetune_operator import api, children, outcome
from finetune_operator import coretypes as core
from finetune_operator.api import ConditionType as T
from finetune_operator.outcome import Outcome, Retry, State
from finetune_operator.status import (DONE_EXIT_SECONDS, METRICS_READ, NOT_EXITING, RESUMED, SUSPENDED, Conditions,
                                      analysis_of, condition, evaluation_of, finished_metrics, finished_progress,
                                      merged, not_started, phase_of, progress_and_metrics, pruning_of, stage_of,
                                      stale_after, starting_grace, timestamp, transitions)
from finetune_trainer.rules import error_lines


@dataclass
class Observed:
    """Everything one reconcile reads."""

    body: dict[str, Any]  # the FineTuneJob
    jobs: list[dict[str, Any]]  # outcome.job_summary of each child Job
    pods: list[dict[str, Any]]  # outcome.pod_summary of each trainer pod
    now: datetime
    problems: list[str] = field(default_factory=list)  # what only the operator can judge (claims, regexes)
    claims_missing: list[str] = field(default_factory=list)  # those of the problems that are claims not there (yet)
    sample: dict[str, Any] | None = None  # rank 0's metrics, when read
    scrape_error: tuple[str, str] | None = None  # (reason, message) when reading them failed
    job_warning: tuple[str, str] | None = None  # (reason, message) of the Job's latest Warning Event, when podless
    pod_warning: tuple[str, str] | None = None  # (reason, message) of why a pod's containers are not created
    # (reason, message) of why the attempt's children could not be made yet (a ResourceQuota refused one, an object
    # not this job's holds a name): it waits, and tries again
    held_back: tuple[str, str] | None = None
    stale: str | None = None  # why the attempt's children, made in part from an earlier spec, cannot be used
    # jobs and pods as the apiserver listed them this tick, not the indexes: a Job missing from them is gone
    listed: bool = False
    trainer_gpus: int = 0  # those of the operator's trainer resources: a worker's where the spec sets none
    poll_seconds: float = 2.0  # the operator's pollSeconds: MetricsStale waits a few polls (status.stale_after)
    earlier_pods: list[dict[str, Any]] = field(default_factory=list, init=False)  # an earlier FineTuneJob's, this name

    def __post_init__(self) -> None:
        """Only this FineTuneJob's children: the indexes are keyed by name, and an earlier FineTuneJob of the same
        name leaves children until the garbage collector deletes them (its pods apart: the first attempt waits for
        them). A summary without a uid is from before the uid label, so ours."""
        uid = self.body["metadata"]["uid"]
        self.jobs = [j for j in self.jobs if j.get("uid") in (None, uid)]
        self.earlier_pods = [p for p in self.pods if p.get("uid") not in (None, uid)]
        self.pods = [p for p in self.pods if p.get("uid") in (None, uid)]


@dataclass
class Decision:
    status: dict[str, Any]  # the whole status to merge-patch (None values clear a field)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    create_attempt: int | None = None
    delete_job: str | None = None
    delete_job_reason: str = ""
    # pods whose trainer exited that other containers outlive, each with why it is ended
    end_pods: list[tuple[str, str]] = field(default_factory=list)
    delete_self: bool = False


def parse_spec(body: dict[str, Any]) -> tuple[api.FineTuneJobSpec | None, list[str]]:
    """Only the spec is parsed: a status field this version does not know never fails a reconcile."""
    try:
        return api.FineTuneJobSpec.model_validate(body.get("spec") or {}), []
    except ValidationError as exc:
        return None, error_lines(exc, root="spec")


@dataclass(frozen=True, slots=True)
class SpecFacts:
    """What `decide` reads of a spec: a few numbers where the parsed spec is about 13 KB of models."""

    managed_by: str | None
    suspend: bool
    workers: int
    processes: int  # per worker
    gpus: int | None  # per worker, where the spec sets runtime.resources (else the operator's are used)
    rendezvous: bool  # the attempt has a Service
    global_batch: int
    backoff_limit: int
    active_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    output_uri: str
    recipe: str  # children.recipe: what a child Job was made from
    ignored: tuple[str, ...]  # fields set that nothing reads (FreezeSpec.ignored)

    @classmethod
    def of(cls, spec: api.FineTuneJobSpec) -> SpecFacts:
        rt = spec.runtime
        return cls(spec.managed_by, spec.suspend, rt.workers, rt.processes_per_worker,
                   children.gpus(rt.resources) if rt.resources else None, children.rendezvous(spec), global_batch(spec),
                   spec.backoff_limit,
                   spec.active_deadline_seconds, spec.ttl_seconds_after_finished, spec.output.uri,
                   children.recipe(spec), tuple(spec.adjust.freeze.ignored()))


FACTS_CACHED = 4096
_facts: OrderedDict[tuple[str, int], tuple[SpecFacts | None, list[str]]] = OrderedDict()
_facts_lock = threading.Lock()


def spec_facts(body: dict[str, Any]) -> tuple[SpecFacts | None, list[str]]:
    """`parse_spec`'s verdict, kept by the job's uid and generation: validating every live job's spec on every tick
    was a large share of the operator's CPU, and a spec changes rarely (only `suspend`, by the API's transition
    rules). The apiserver raises metadata.generation on every change of the spec (and only then: the status is a
    subresource), so the pair names one spec. What is kept is the verdict's facts, not the parsed spec: with a
    thousand live jobs, each with a spec of its own, parsed specs held about 15 MB of the operator's memory."""
    key = (body["metadata"]["uid"], body["metadata"]["generation"])
    with _facts_lock:
        found = _facts.get(key)
        if found is not None:
            _facts.move_to_end(key)
            return found
    spec, invalid = parse_spec(body)
    found = (SpecFacts.of(spec) if spec is not None else None, invalid)
    with _facts_lock:
        _facts[key] = found
        while len(_facts) > FACTS_CACHED:
            _facts.popitem(last=False)
    return found


def _parse_time(text: str | None) -> datetime | None:
    return outcome.parse_time(text) if text else None


def current_attempt(status: dict[str, Any], jobs: list[dict[str, Any]]) -> int:
    return max([status.get("attempts") or 0] + [j["attempt"] for j in jobs])


def current_job(status: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[int, dict[str, Any] | None]:
    """The current attempt, and its Job if the index has it."""
    attempt = current_attempt(status, jobs)
    return attempt, next((j for j in jobs if j["attempt"] == attempt), None)


def _live(job: dict[str, Any]) -> bool:
    """Whether a Job has not ended and is not going."""
    return not (job["complete"] or job["failure"] or job["deleting"])


def _children(name: str, spec: SpecFacts) -> dict[str, str | None]:
    """An attempt's ConfigMap, Service (if any) and Job share one name. No Service is an explicit None: status is
    merge-patched, where an absent key would keep a previous attempt's Service."""
    return {"configMap": name, "job": name, "service": name if spec.rendezvous else None}


def global_batch(spec: api.FineTuneJobSpec) -> int:
    return (spec.training.batch_size * spec.training.gradient_accumulation * spec.runtime.workers
            * spec.runtime.processes_per_worker)


def decide(seen: Observed) -> Decision | None:
    """What to do about one FineTuneJob; None when it is not ours to run."""
    body, now = seen.body, seen.now
    meta, old = body["metadata"], dict(body.get("status") or {})
    spec, invalid = spec_facts(body)
    if spec is not None and spec.managed_by not in (None, api.MANAGED_BY):
        return None
    conds = Conditions(old.get("conditions") or [], meta.get("generation", 0), now)
    status: dict[str, Any] = {"observedGeneration": meta.get("generation", 0)}
    decision = Decision(status)
    _stop_outlived(decision, seen.pods)
    finished = conds.true(T.SUCCEEDED) or conds.true(T.FAILED)
    attempt, job = current_job(old, seen.jobs)
    wait = _queue_wait(job, attempt, old)
    # A disrupted pod deleted long ago but still Running is on a lost node, whose kubelet cannot report it stopped:
    # the attempt ends with it as a disruption, and its Job, which waits for that report, is deleted (below).
    pods = [p for p in seen.pods if p["attempt"] == attempt]
    lost = [p["name"] for p in pods if _lost(p, now)]
    pods = [dict(p, phase="Failed") if p["name"] in lost else p for p in pods]

    def fail(reason: str, message: str) -> None:
        conds.set(T.FAILED, True, reason, message)
        conds.clear(T.RUNNING, reason, message)
        conds.clear(T.RESTARTING, reason)
        conds.clear(T.METRICS_STALE, reason)
        # No attempt comes: a back-off cut short by the end (its deadline, backoffLimit lowered) promised one.
        status["retryAfter"] = None
        if conds.get(T.CREATED).get("status") == "False":  # no attempt waits any more (a back-off, a suspend)
            conds.set(T.CREATED, False, reason, message)
        status["completionTime"] = timestamp(now)
        _workers_stopped(status, old, pods)

    if finished:
        ttl = spec.ttl_seconds_after_finished if spec else None
        done = _parse_time(old.get("completionTime"))
        if ttl is not None and done and now >= done + timedelta(seconds=ttl):
            decision.delete_self = True
        # The CEL rules let a finished job be suspended and retuned ("may change only while the job is suspended" is
        # what refusing a plain edit says), and nothing runs it again: said once, when the new generation is seen.
        # Suspending it is said too, as a job failed before it had a Job (InvalidSpec) has nothing to compare with.
        # Once per change (status.ignoredChange): compared with the Job alone, it was said again at every later edit.
        if spec and old.get("observedGeneration") != meta.get("generation"):
            ignored = _ignored_change(spec) if spec.suspend or job and _retuned(job, meta, spec) else None
            if ignored != old.get("ignoredChange"):
                status["ignoredChange"] = ignored  # None, once nothing is ignored: the same change again is told
                if ignored:
                    phase = "succeeded" if conds.true(T.SUCCEEDED) else "failed"
                    decision.events.append(("Warning", "SpecChangeIgnored", f"the job has {phase}: neither a suspend "
                                            "nor a changed spec runs it again; delete it and apply it again to run it"))
        return decision  # observedGeneration (and ignoredChange) only: a spec edited after the end has been seen
    status["attempts"] = attempt
    if spec is None or invalid or seen.problems:
        if spec and not invalid and seen.problems == seen.claims_missing and _claims_may_come(meta, now):
            conds.set(T.CREATED, False, "ClaimNotFound", "; ".join(seen.problems) + f" (waiting up to "
                      f"{CLAIM_WAIT_SECONDS} s from the job's creation for it to be made)")
            return _finish(decision, old, conds)
        fail("InvalidSpec", "; ".join(invalid or seen.problems))
        # A spec this operator cannot read under a running attempt (a rollback to a version that lacks one of its
        # fields): a failed job is never reconciled again, so its workers would hold their GPUs to the end unwatched.
        _stop(decision, job, old, meta["name"], attempt, "InvalidSpec")
        return _finish(decision, old, conds)
    workers = spec.workers
    if job:
        status["children"] = _children(job["name"], spec)
        status["queue"] = wait
        status["retryAfter"] = None  # started (a status write lost after its create left the back-off said)
        status["workers"] = {k: job[k] for k in ("active", "ready", "succeeded", "failed")}
        # Made, whatever the status says: a status patch lost after the creation (the operator killed in between)
        # left Created absent, or False saying why an earlier try was held back, for the rest of the job. With the
        # Job's workers, not the spec's: a workers edit while suspended rewrote the message and told AttemptCreated.
        _created(conds, attempt, job.get("workers", workers))

    def observe() -> Decision:
        result = outcome.attempt_outcome(job, pods, seen.job_warning, seen.pod_warning, _held(pods, now))
        _observe(result, conds, status, old, spec, seen, attempt, fail)
        if status["attempts"] > attempt:
            _carry_clock(status, old, wait, now)
        # An end seen late (the operator was down, or rolled by an upgrade) is the Job's: the TTL counts from it, and
        # the job's duration is its own, not the outage's.
        if "completionTime" in status and job and job.get("ended"):
            status["completionTime"] = job["ended"]
        # else the Job stays active for ever: its other workers run on beside the next attempt, and it keeps its quota
        if lost and job and not (job["failure"] or job["deleting"]):
            decision.delete_job, decision.delete_job_reason = job["name"], "NodeLost"
        return _finish(decision, old, conds)

    # An attempt that ended is judged by how it ended, however late that is seen: a suspend or a deadline after
    # its end must neither fail a completed job nor retry one that exit 1 says cannot succeed. Not an end that a
    # delete by hand made (JobDeleted, below).
    if job and (job["complete"] or job["failure"]) and not _stopped_by_a_delete(job):
        return _finish(decision, old, conds) if _pods_behind(job, pods, now) else observe()

    if spec.suspend:
        if job or not conds.true(T.SUSPENDED):  # one made but not yet seen, at the first tick that sees the suspend
            _stop(decision, job, old, meta["name"], attempt, SUSPENDED)
        conds.set(T.SUSPENDED, True, SUSPENDED, "spec.suspend is true: no pods run; checkpoints stay for the resume")
        conds.clear(T.RUNNING, SUSPENDED)
        conds.clear(T.METRICS_STALE, SUSPENDED)
        conds.clear(T.RESTARTING, SUSPENDED)  # a retry decided before the suspend waits for the resume
        conds.drop(T.SCHEDULED)  # no worker has a node: "every worker has a node" stayed through the suspend
        # and not a back-off's time: the resume starts it at once ("attempt 2 starts at ..." stayed, for days)
        status["retryAfter"] = None
        if conds.get(T.CREATED).get("reason") in (BACKOFF_WAITING, PODS_STOPPING):  # not what it waits for now
            conds.set(T.CREATED, False, SUSPENDED, f"attempt {max(attempt, 1)} waits for the resume")
        status["workers"] = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0}
        return _finish(decision, old, conds)

    if conds.true(T.SUSPENDED):  # resumed: the next attempt picks up the checkpoints, and the clock restarts
        conds.set(T.SUSPENDED, False, RESUMED, "spec.suspend is false")
        # The suspend's Running=False stayed the job's reason (Pending, Suspended) until the resumed pods ran
        conds.clear(T.RUNNING, RESUMED, "spec.suspend is false")
        # A new number only if the current one's children were made: an attempt decided (a retry) but not created
        # before the suspend is the one that resumes.
        if _made(old, meta["name"], attempt):
            _stop(decision, job, old, meta["name"], attempt, SUSPENDED)  # if it outlived the suspend, unseen
            conds.set(T.RESTARTING, True, RESUMED, f"attempt {attempt + 1} resumes from the latest checkpoint")
            _numbered(conds, status, attempt + 1)
        status["startTime"] = timestamp(now)
        status["retryAfter"] = None  # a resume is asked for: it starts at once, whatever back-off it cut short
        if conds.get(T.CREATED).get("reason") == SUSPENDED:  # held in its back-off by the suspend
            conds.set(T.CREATED, False, RESUMED, f"attempt {max(attempt, 1)} is made at the next tick")
        return _finish(decision, old, conds)

    # Retuned while suspended, and resumed before a tick saw the suspend (`kubectl patch` suspend, then `kubectl apply`
    # of the retuned spec, within a poll): the attempt ran on as it was made, an unschedulable one stayed so for ever.
    # It is stopped, and the next attempt resumes with the new spec, as after a suspend that was seen.
    if job and not job["deleting"] and _retuned(job, meta, spec):
        decision.delete_job, decision.delete_job_reason = job["name"], RESUMED
        _next_attempt(conds, status, attempt, RESUMED,
                      f"the spec was changed while the job was suspended (generation {job['generation']} to "
                      f"{meta.get('generation')}) and the Job {job['name']} ran as it was made")
        status["startTime"] = timestamp(now)
        return _finish(decision, old, conds)

    # No clock runs while the queue (Kueue) holds the attempt (_clock). A status without a start: its Job's, though seen
    # later (the operator down), or now (a status write lost, or an earlier operator's, which cleared it in the queue).
    if job and not old.get("startTime"):
        status["startTime"] = job.get("started") or timestamp(now)
    start = _clock(status.get("startTime", old.get("startTime")), wait, now)
    deadline = spec.active_deadline_seconds
    if deadline and start and now >= start + timedelta(seconds=deadline):
        fail("DeadlineExceeded", f"the job was active longer than activeDeadlineSeconds ({deadline} s)")
        _stop(decision, job, old, meta["name"], attempt, "DeadlineExceeded")  # its pods stop (SIGTERM, checkpoint)
        return _finish(decision, old, conds)

    # The attempt's Job is gone, or going (a foreground delete keeps it until its pods are gone), and its pods are being
    # deleted: someone else deleted it (`kubectl delete job` of a hung attempt; the operator's own deletions move on to
    # the next attempt). Made again under the same number, the new Job took the old pods, once Failed, for failures of
    # its own: one counted, and the new Job left running beside the next attempt, which waited for it to finish; kept,
    # their exit 143 on the SIGTERM was counted. So the next attempt comes, not counted, as for a disruption.
    # Listed from the apiserver (the indexes may keep a Job and pods deleted in a watch's relist gap), an attempt whose
    # children were made and whose Job is gone was deleted too, with its pods or without (`--cascade=orphan`: they
    # run on, and ended unseen the attempt was made again under its number; the next one waits for them to stop).
    # A foreground delete keeps the Job, failed by it, until its pods are gone: seen then, it is the same delete, once
    # the apiserver's list says they are gone, not only late to the index (waits_on_jobs asks it).
    if job and job["deleting"] and not pods and not seen.listed:
        return _finish(decision, old, conds)
    if (job is None or job["deleting"]) and pods and all(p.get("deletionTimestamp") for p in pods) or (
            job and job["deleting"] and not pods) or (
            seen.listed and job is None and _made(old, meta["name"], attempt)):
        _next_attempt(conds, status, attempt, "JobDeleted",
                      f"the Job {children.child_name(meta['name'], attempt)} was deleted")
        _carry_clock(status, old, wait, now)
        return _finish(decision, old, conds)

    # backoffLimit lowered below the failures (to stop a job that keeps failing), while a retry waits or runs: as a
    # Job's controller does at each sync, the job fails, and its attempt, made (seen or not) or running, is stopped: the
    # job is not reconciled again. Left to the attempt's own failure, a retry ran on for hours on its GPUs.
    if (failures := old.get("failures") or 0) > spec.backoff_limit:
        fail("BackoffLimitExceeded", f"{failures} failed attempts (backoffLimit {spec.backoff_limit}, lowered "
                                     "since the last one failed)")
        _stop(decision, job, old, meta["name"], attempt, "BackoffLimitExceeded")
        return _finish(decision, old, conds)

    if attempt == 0 or job is None:
        # Made, and its Job not in the index, but the apiserver's list failed (waits_on_jobs asked for it): only a list
        # tells a Job deleted (JobDeleted, above) from one the watch has not brought yet. Read from the index, the
        # attempt's own pods were named as the attempt before's, to be deleted by hand, and once they had ended the
        # attempt was made again under its number. It waits for a list that succeeds.
        if job is None and _made(old, meta["name"], attempt) and not seen.listed:
            return _finish(decision, old, conds)
        if stopping := [p["name"] for p in seen.pods if _may_run(p, now)]:  # they still checkpoint to the claims
            # Said whatever Created said, but a back-off still running: past its end, "attempt 2 starts at ..." was
            # the job's reason while they took their grace; after a resume or a free retry, Created stayed True
            # "attempt 1: 1 worker(s)" beside attempts 2; orphans, which nothing stops, held it for good behind
            # "JobDeleted". Said anew while it waits: orphans deleted by hand were still to "delete ... to go on" for
            # their grace period.
            orphans = _orphans(seen, now)
            if orphans or not (conds.get(T.CREATED).get("reason") == BACKOFF_WAITING and _backing_off_until(old, now)):
                conds.set(T.CREATED, False, PODS_STOPPING, f"attempt {max(attempt, 1)} waits for the pods of the "
                          f"attempt before it to stop ({_some(stopping)}): they may still write checkpoints"
                          + (f"; {_some(orphans)} belong to no Job and are not being deleted (orphaned by kubectl "
                             "delete --cascade=orphan): delete them to go on" if orphans else ""))
            return _finish(decision, old, conds)
        # An earlier attempt's Job that has not ended and is not going (one made, then passed over unseen), as the
        # apiserver lists it (waits_on_jobs): started beside it, the new gang would train on the same output when it
        # gets its pods. It is stopped, unless its pods have ended, and the Job controller's verdict is a second away.
        if earlier := _earlier_job(seen.jobs, attempt):
            if not any(p["attempt"] == earlier["attempt"] and p["phase"] in ("Succeeded", "Failed") for p in seen.pods):
                decision.delete_job, decision.delete_job_reason = earlier["name"], "Superseded"
            conds.set(T.CREATED, False, "EarlierAttemptRunning", f"the Job {earlier['name']} of attempt "
                      f"{earlier['attempt']} has not ended: waiting for it to stop before attempt {max(attempt, 1)}")
            return _finish(decision, old, conds)
        # `kubectl delete` and `apply` again (how a running job's recipe is changed): the deleted one's pods stop only
        # after the garbage collector reaches them, then take their grace period to checkpoint. Started beside them,
        # attempt 1 removed the checkpoint folder they were writing (another recipe's) or resumed from a step before
        # the one they were saving.
        if stopping := [p["name"] for p in seen.earlier_pods if _may_run(p, now)]:
            conds.set(T.CREATED, False, "EarlierPodsStopping",
                      f"the pods of an earlier FineTuneJob named {meta['name']} may still run "
                      f"({_some(stopping)}) and write to the same "
                      "claims: waiting for them to stop "
                      "(a Job of it orphaned by kubectl delete --cascade=orphan must be deleted by hand)")
            return _finish(decision, old, conds)
        if due := _backing_off_until(old, now):
            _backing_off(conds, max(attempt, 1), due, old.get("failures") or 0)
            return _finish(decision, old, conds)
        if seen.stale:  # its ConfigMap stays, the job's (the garbage collector takes it with the job)
            # and its Job, made beside that ConfigMap but not yet seen (a watch behind), would run the old recipe
            decision.delete_job = children.child_name(meta["name"], max(attempt, 1))
            decision.delete_job_reason = RESUMED
            _next_attempt(conds, status, max(attempt, 1), RESUMED, seen.stale)
            return _finish(decision, old, conds)
        decision.create_attempt = max(attempt, 1)
        _numbered(conds, status, decision.create_attempt)
        status["retryAfter"] = None
        status.setdefault("startTime", old.get("startTime") or timestamp(now))
        # not its children: a resume reads them as an attempt that ran, and counts the next one; and the condition,
        # else the job said nothing while it waited, for ever behind an orphaned child
        if seen.held_back:
            conds.set(T.CREATED, False, *seen.held_back)
        else:
            status["children"] = _children(children.child_name(meta["name"], decision.create_attempt), spec)
            _created(conds, decision.create_attempt, workers)
            decision.events += _idle_gpus(spec, seen.trainer_gpus)
            # the trainer's log alone said it, on every rank, where a user looks at the job's Events
            decision.events += [("Warning", "FieldIgnored", ignored) for ignored in spec.ignored]
        return _finish(decision, old, conds)

    return observe()


def _queue_wait(job: dict[str, Any] | None, attempt: int, old: dict[str, Any]) -> dict[str, Any] | None:
    """The current attempt's times in its queue (Kueue): its Job's, else as the status kept them (status.queue). A Job
    deleted by hand (`kubectl delete job`, or orphaning its pods) took them along: the same tick counted the attempt's
    whole wait against activeDeadlineSeconds, and could fail the job DeadlineExceeded for time it spent queued."""
    if job and job.get("created"):
        return {"attempt": attempt, "since": job["created"],
                "admitted": None if job.get("suspended") else job.get("started")}
    kept = old.get("queue")
    return kept if kept and kept.get("attempt") == attempt else None


def _clock(started: str | None, wait: dict[str, Any] | None, now: datetime) -> datetime | None:
    """When activeDeadlineSeconds' clock started: status.startTime, moved on by the time the attempt's Job waited for
    its queue (Kueue) to admit it (suspended from its creation by Kueue's webhook), to now while it waits (or once it
    is gone unadmitted): the clock pauses in the queue, and neither counts that wait nor forgets the time the earlier
    attempts ran. Not from before the clock's start (a resume restarts it). A preemption restarts the attempt's own
    share of the clock: Kueue's admission sets the Job's startTime again (as it restarts a Job's
    activeDeadlineSeconds), and the run it cut short is work lost to the queue, not the job; the earlier attempts'
    time stays counted."""
    start = _parse_time(started)
    since = _parse_time(wait["since"]) if wait else None
    if start is None or since is None:
        return start
    admitted = _parse_time(wait.get("admitted")) or now
    return start + max(admitted - max(since, start), timedelta(0))


def _carry_clock(status: dict[str, Any], old: dict[str, Any], wait: dict[str, Any] | None, now: datetime) -> None:
    """The job moves on to its next attempt: status.startTime moves on by this attempt's wait in its queue. Written
    with the new attempt number, so that no later tick moves it twice (the next attempt's Job is the one read then):
    moved at admission instead, a tick could not tell whether it had been."""
    if start := _clock(old.get("startTime"), wait, now):
        status["startTime"] = timestamp(start)


def _stopped_by_a_delete(job: dict[str, Any]) -> bool:
    """A Job deleted in the foreground stays, deleting, until its pods are gone, and the Job controller fails it on
    their exit to the delete's SIGTERM (backoffLimit 0): whether it ended after the delete. By the times, not the exit
    codes: torchrun exits 1 on a SIGTERM, and a worker that had failed by itself, its pod already counted, is gone at
    once when the Job is deleted, leaving its peers' 143. The time the failure was decided, not Failed's: a delete
    during the peers' checkpoint after a worker's own failure comes before Failed."""
    deleted, ended = _parse_time(job["deleting"]), _parse_time(job.get("decided"))
    return deleted is not None and ended is not None and ended >= deleted


# A trainer that exited while other containers in its pod run on (outcome.pod_summary's outlived_by).
OUTLIVED = "TrainerOutlived"


def _stop_outlived(decision: Decision, pods: list[dict[str, Any]]) -> None:
    """Ends the pods, of any attempt, whose trainer has exited while containers injected beside it run on, by the
    pod's own deadline (spec.activeDeadlineSeconds, which the kubelet enforces: the pod fails, DeadlineExceeded, no
    disruption), not a delete: a deleted pod of a Job is gone a second after its end, the trainer's termination
    message with it, and an exit 1 was then counted as an infrastructure failure, a success retried. The Job
    controller and the attempt's outcome then read the trainer's exit as they would have. A trainer's exit 0 waits
    for rank 0's, while rank 0 runs: a peer done a moment before rank 0 wrote its success is no end of the run, and
    its pod's failure would fail the Job under rank 0."""
    outlived = [pod for pod in pods if pod.get("outlived_by")]
    if not outlived:  # as at almost every tick: the pods are not looked through again
        return
    running = {p["attempt"] for p in pods if p["index"] == 0 and not p.get("terminated")}
    for pod in outlived:
        if pod["terminated"]["exitCode"] != outcome.EXIT_OK or pod["attempt"] not in running:
            decision.end_pods.append((pod["name"], f"the trainer of pod {pod['name']} exited "
                                      f"{pod['terminated']['exitCode']}, but its containers {pod['outlived_by']} run on "
                                      "and hold the pod, its GPUs and its Job"))


# The Jobs and the pods come on separate watch streams, the pods' far the busier (every change of every trainer pod, a
# relist after a dropped stream): a Job's end may be seen before its pods'.
POD_LAG_SECONDS = 30
# A peer that never ends may be on a lost node: the node controller marks its pods not ready once the node has missed
# its heartbeats for node-monitor-grace-period (50 s by default), and outcome.failure_cause reads that mark.
NODE_LOST_SECONDS = 60


def _pods_behind(job: dict[str, Any], pods: list[dict[str, Any]], now: datetime) -> bool:
    """Whether the attempt's Job ended POD_LAG_SECONDS ago or less (NODE_LOST_SECONDS where only knock-ons have ended)
    and its pods, as seen, do not show that end yet: for a success rank 0's (its termination message holds the
    evaluation and the final metrics), for a failure any exit or disruption. Judged without them, a finished job lost
    its results for good (it is never reconciled again), and a trainer's exit 1 was counted and retried as an
    infrastructure failure."""
    ended = _parse_time(job.get("ended"))
    if ended is None or now >= ended + timedelta(seconds=NODE_LOST_SECONDS):
        return False
    lagging = now < ended + timedelta(seconds=POD_LAG_SECONDS)
    # Not seen at all is behind too: a short-lived attempt's pods may reach the index after its Job's end.
    if job["complete"]:
        return lagging and not any(p["index"] == 0 and "terminated" in p for p in pods)
    told = [p for p in pods if "terminated" in p or p.get("disrupted") or p["phase"] == "Failed"]
    if outcome.failure_cause(job, pods).retry == Retry.FREE:  # a disruption the Job's own verdict tells
        return False
    if not told:
        return lagging
    # Only knock-ons yet (a rank whose peer died ends first): the peer's own exit, the cause, is still to come; or,
    # from a peer on a lost node, never, and NODE_LOST_SECONDS tells that apart.
    return len(told) < len(pods) and all("terminated" in p and outcome.knock_on(p) for p in told)


def _stop(decision: Decision, job: dict[str, Any] | None, old: dict[str, Any], name: str, attempt: int,
          reason: str) -> None:
    """Deletes the attempt's Job unless it has ended or is going: the one seen, or, where the status says it was made
    but its watch event has not come yet (made at the previous tick), by name. Waiting to see it left it running
    unwatched: the job failed or moved on to the next attempt, and no later tick deleted it, so two gangs trained on
    the same output. A Job already gone answers 404, which is nothing."""
    if job is None and _made(old, name, attempt) or job and _live(job):
        decision.delete_job, decision.delete_job_reason = children.child_name(name, attempt), reason


def _made(old: dict[str, Any], name: str, attempt: int) -> bool:
    """Whether the status says the attempt's children were made (the tick that makes them writes their names)."""
    return (old.get("children") or {}).get("job") == children.child_name(name, attempt)


def _created(conds: Conditions, attempt: int, workers: int) -> None:
    conds.set(T.CREATED, True, "AttemptCreated", f"attempt {attempt}: {workers} worker(s)")


def _idle_gpus(spec: SpecFacts, trainer_gpus: int) -> list[tuple[str, str, str]]:
    """A Warning where a worker has more GPUs than processes: torchrun gives each process one GPU, and the rest sit
    idle, which nothing else tells (more processes than GPUs are refused: by the apiserver, or judge's InvalidSpec)."""
    gpus, where = ((spec.gpus, "runtime.resources.limits") if spec.gpus is not None
                   else (trainer_gpus, "the operator's trainer resources"))
    if gpus <= spec.processes:
        return []
    return [("Warning", "GPUsIdle", f"each worker has {gpus} GPUs ({where} {core.GPU}) and runs {spec.processes} "
             f"process(es) (runtime.processesPerWorker): {gpus - spec.processes} GPU(s) idle; set "
             f"runtime.processesPerWorker to {gpus}")]


def _ignored_change(spec: SpecFacts) -> str:
    """What a finished job's spec asks that nothing does (status.ignoredChange): its suspend, and its recipe."""
    return f"suspend={str(spec.suspend).lower()},recipe={spec.recipe}"


def _retuned(job: dict[str, Any], meta: dict[str, Any], spec: SpecFacts) -> bool:
    """Whether the Job was made from a recipe the spec no longer has. Asked only when the generation moved since: an
    operator of another version may digest the same recipe otherwise (a new field's default), and a Job made by one
    before the annotations has none."""
    made_from = job.get("generation")
    return made_from is not None and made_from != meta.get("generation") and job.get("recipe") != spec.recipe


# `kubectl apply -f dir/` creates in file order, so a job's claims may come moments after it (job.yaml sorts before
# pvc.yaml); a claim that a typo names never comes, and fails the job once this has passed.
CLAIM_WAIT_SECONDS = 30


def _claims_may_come(meta: dict[str, Any], now: datetime) -> bool:
    created = _parse_time(meta.get("creationTimestamp"))
    return created is None or now < created + timedelta(seconds=CLAIM_WAIT_SECONDS)


# Pulling a trainer image of several GB also waits in ContainerCreating, for minutes.
CREATING_GRACE_SECONDS = 120


def pod_warning(seen: Observed, warnings: Callable[[str], dict[str, tuple[str, str]]]) -> tuple[str, str] | None:
    """Why a pod of the current attempt still waits for its containers CREATING_GRACE_SECONDS after it was
    scheduled (a Secret or claim that does not mount, a claim attached to another node), from `warnings(pod name)`:
    its Warning Events (`outcome.warnings_of`), read only for such a pod."""
    attempt = current_attempt(seen.body.get("status") or {}, seen.jobs)
    for pod in seen.pods:
        since = _parse_time(pod.get("creating"))
        if pod["attempt"] == attempt and since and seen.now >= since + timedelta(seconds=CREATING_GRACE_SECONDS):
            problem = outcome.creation_problem(warnings(pod["name"]))
            if problem:
                return problem[0], f"pod {pod['name']} waits (not counted as a failure): {problem[1]}"
    return None


# Kueue's topology-aware scheduling gate lifts within seconds, and a running scheduler speaks of a pod within
# moments (PodScheduled); a gate whose controller is missing never lifts, and a scheduler not running never speaks.
HELD_GRACE_SECONDS = 60


def _held(pods: list[dict[str, Any]], now: datetime) -> tuple[str, str] | None:
    """Why a pod of the attempt is still kept from any scheduler HELD_GRACE_SECONDS after its gates held it, or after
    its creation with no scheduler's word on it (spec.pod.schedulerName names one not running, or misspelled)."""
    for pod in pods:
        gated = pod.get("gated")
        since = _parse_time((gated or {}).get("since"))
        if gated and (since is None or now >= since + timedelta(seconds=HELD_GRACE_SECONDS)):
            return outcome.SCHEDULING_GATED, (
                f"pod {pod['name']} is held from the scheduler by its scheduling gates ({gated['gates']}) since "
                f"{gated['since'] or 'its creation'}: the controller that removes them (Kueue's topology-aware "
                "scheduling, a webhook's) has not")
        created = _parse_time(pod.get("created"))
        if pod.get("unheard") and created and now >= created + timedelta(seconds=HELD_GRACE_SECONDS):
            return outcome.NO_SCHEDULER, (
                f"pod {pod['name']} has had no word from its scheduler, {pod['unheard']}, since its creation at "
                f"{pod['created']}: is that scheduler running (spec.pod.schedulerName)?")
    return None


# The kubelet counts a deleted pod's grace period from when it sees the deletion, and reports the end later still.
KILL_MARGIN_SECONDS = 30


def waits_on_pods(seen: Observed) -> bool:
    """Whether the next attempt would wait for pods that may still run (decide's wait before it makes one), or for
    those of the attempt before it, decided on (Restarting) with none of them seen: its Job deleted (by hand, or by
    the operator for a suspend or a retune) before they reached the index, the pods' watch lagging the Jobs', they
    may still checkpoint to the same claims."""
    status = seen.body["status"]
    attempt, job = current_job(status, seen.jobs)
    restarting = condition(status.get("conditions"), T.RESTARTING).get("status") == "True"
    if _backing_off_until(status, seen.now):
        return False  # no attempt is made before then: listed at every poll of a back-off of up to 6 min, for nothing
    return (attempt == 0 or job is None) and (
        any(_may_run(p, seen.now) for p in (*seen.pods, *seen.earlier_pods))
        or restarting and attempt > 1 and not any(p["attempt"] == attempt - 1 for p in seen.pods))


def waits_on_jobs(seen: Observed) -> bool:
    """Whether decide would act on Jobs that the indexes may keep after they are gone (deleted in a watch's relist
    gap, kept as last seen until the operator restarts), or lack: an earlier attempt's Job running on where the current
    attempt has none, which would hold the next attempt back for good; the current one deleting with no pods seen
    (gone with them, or not yet indexed); or the current one made but not seen (gone with its pods before any tick saw
    it go, it was made again under its number, its end never told; or a watch behind)."""
    status = seen.body["status"]
    if status.get("phase") in api.FINISHED or (seen.body.get("spec") or {}).get("suspend"):
        return False  # a suspended job makes no attempt, and a ghost would be listed at every tick of the suspension
    attempt, job = current_job(status, seen.jobs)
    if job:
        return bool(job["deleting"]) and not any(p["attempt"] == attempt for p in seen.pods)
    return _made(status, seen.body["metadata"]["name"], attempt) or _earlier_job(seen.jobs, attempt) is not None


def _earlier_job(jobs: list[dict[str, Any]], attempt: int) -> dict[str, Any] | None:
    """An earlier attempt's Job that has not ended and is not going."""
    return next((j for j in jobs if j["attempt"] < max(attempt, 1) and _live(j)), None)


def _may_run(pod: dict[str, Any], now: datetime) -> bool:
    """Whether a pod may still be running: not terminal, and if deleted, not long past its grace period (after it,
    the kubelet has killed it, or it is on a lost node that would keep it Running for ever)."""
    killed_at = _parse_time(pod.get("deletionTimestamp"))
    return pod["phase"] not in ("Succeeded", "Failed") and (
        killed_at is None or now < killed_at + timedelta(seconds=KILL_MARGIN_SECONDS))


def _orphans(seen: Observed, now: datetime) -> list[str]:
    """This job's pods that run on with no Job, and that nothing deletes."""
    return [p["name"] for p in seen.pods if p.get("orphaned") and not p.get("deletionTimestamp") and _may_run(p, now)]


def _lost(pod: dict[str, Any], now: datetime) -> bool:
    """A disrupted pod (the taint manager's DeletionByTaintManager) that is not terminal past its grace period."""
    return bool(pod.get("disrupted")) and pod["phase"] not in ("Succeeded", "Failed") and not _may_run(pod, now)


def _cause_over(said: dict[str, Any], created: int, workers: int) -> bool:
    """Whether Scheduled False's cause is over, the pods waiting for the scheduler: gates removed, the queue's
    admission, or pods not created (a quota's FailedCreate), or unheard of by their scheduler (NoScheduler), that all
    exist now (`created` of `workers`); not a cause
    merely unseen at a tick (Events unread, an unschedulable pod made again), which would be said anew, with its
    Warning."""
    if said.get("status") != "False" or said.get("reason") == "Unschedulable":
        return False
    return said.get("reason") in (outcome.SCHEDULING_GATED, outcome.QUEUED) or created >= workers


def _observe(result: Outcome, conds: Conditions, status: dict[str, Any], old: dict[str, Any],
             spec: SpecFacts, seen: Observed, attempt: int, fail: Any) -> None:
    pods = [p for p in seen.pods if p["attempt"] == attempt]
    if result.state == State.PENDING:
        if result.queued:
            conds.set(T.SCHEDULED, False, result.reason, result.message)
            conds.clear(T.RUNNING, result.reason, result.message)
            conds.clear(T.METRICS_STALE, result.reason)  # stopped by its queue: no alert on it for the whole wait
        elif result.unschedulable:  # or gated
            conds.set(T.SCHEDULED, False, result.reason, result.unschedulable)
        elif result.not_created:
            conds.set(T.SCHEDULED, False, result.reason, result.not_created)
        elif result.stuck:  # scheduled, but a container cannot start: Running=False says why
            conds.set(T.SCHEDULED, True, "Scheduled", "every worker has a node")
            said = conds.get(T.RUNNING)
            same = (said.get("status") == "False" and said.get("reason") == result.reason  # and the same pod's words
                    and said.get("message", "").split(": ", 1)[0] == result.message.split(": ", 1)[0])
            conds.set(T.RUNNING, False, result.reason, said["message"] if same and result.back_off else result.message)
        elif pods and all(p["scheduled"] for p in pods):
            conds.set(T.SCHEDULED, True, "Scheduled", "every worker has a node")
        elif _cause_over(conds.get(T.SCHEDULED), outcome.created_workers(pods), spec.workers):
            conds.drop(T.SCHEDULED)
        if not (result.queued or result.unschedulable or result.not_created or result.stuck) and not_started(
                conds.get(T.RUNNING)):
            # The cause is over (the Secret made, the registry back): "MountVolume.SetUp failed" stayed the reason
            # while a large image was pulled, until the pods ran.
            conds.set(T.RUNNING, False, result.reason, result.message)
        if not result.queued and conds.get(T.RUNNING).get("reason") == outcome.QUEUED:
            # Kueue preempted a running attempt and admitted it again: "waits to be admitted" stayed the job's reason
            # in `kubectl get` until its pods ran.
            conds.set(T.RUNNING, False, outcome.ADMITTED, "its queue admitted the Job: its pods start")
        return
    if result.state == State.RUNNING:
        conds.set(T.SCHEDULED, True, "Scheduled", "every worker has a node")
        conds.set(T.RUNNING, True, "Training", result.message)
        conds.clear(T.RESTARTING, "Running", f"attempt {attempt} is running")
        if seen.sample:
            status |= progress_and_metrics(seen.sample, spec.global_batch, seen.now)
            conds.clear(T.METRICS_STALE, METRICS_READ, "rank 0's metrics are read again")
        elif old.get("stage") == "Done" and _read_this_attempt(conds.get(T.RUNNING), old):  # only the exit is left
            _not_exiting(conds, old, seen.now)
        elif seen.scrape_error:
            _stale(conds, old, seen.now, seen.poll_seconds, *seen.scrape_error)
        return
    if result.state == State.SUCCEEDED:
        said = outcome.trainer_line(result.result)  # the steps, the test metric's change
        said = f" ({said})" if said else ""
        conds.set(T.SUCCEEDED, True, "Completed",
                  f"attempt {attempt} finished{said}; the model is at {spec.output_uri}")
        conds.clear(T.RUNNING, "Completed")
        conds.clear(T.RESTARTING, "Completed")
        conds.clear(T.METRICS_STALE, "Completed")
        status["completionTime"] = timestamp(seen.now)
        # rank 0's success stands while the Job controller stops peers left after it
        _workers_stopped(status, old, pods)
        status["stage"] = "Done"
        status["output"] = {"uri": spec.output_uri}
        if progress := finished_progress(result.result, old.get("progress") or {}, seen.now):
            status["progress"] = progress
        if metrics := finished_metrics(result.result):  # the last step's: never older than a read
            status["metrics"] = metrics
        status["evaluation"] = evaluation_of(result.result)
        status["analysis"] = analysis_of(result.result)
        status["pruning"] = pruning_of(result.result)
        return
    # Failed: never retried, retried for free, or counted against backoffLimit.
    status["analysis"] = analysis_of(result.result) or old.get("analysis")
    if pruning := pruning_of(result.result):  # the layers removed, from rearrange on
        status["pruning"] = pruning
    # Where it stopped: a job that fails before its first metrics read (a missing dataset, while Loading) had none.
    if stage := stage_of(result.result):
        status["stage"] = stage
    if result.retry == Retry.NEVER:
        fail(result.reason, result.message)
        return
    failures = status["failures"] = (old.get("failures") or 0) + (result.retry == Retry.COUNTED)
    if failures > spec.backoff_limit:
        fail("BackoffLimitExceeded", f"{failures} failed attempts (backoffLimit {spec.backoff_limit}); "
                                     f"the last: {result.reason}: {result.message}")
        return
    _next_attempt(conds, status, attempt, result.reason, f"attempt {attempt} failed ({result.message})")
    # Only a counted failure backs off: a disruption is the cluster's doing, not the job's, and restarts at once.
    due = seen.now + timedelta(seconds=retry_delay(failures)) if result.retry == Retry.COUNTED else None
    status["retryAfter"] = timestamp(due) if due else None
    if due:
        _backing_off(conds, attempt + 1, due, failures)


# As a batch/v1 Job's controller waits before it replaces a failed pod: a transient failure (an NFS blip, a flaky
# node, a dataset server restarting) burnt every retry within seconds, each one a new Job, pods, ConfigMap, Service.
RETRY_BACKOFF_SECONDS, RETRY_BACKOFF_MAX_SECONDS = 10, 360
BACKOFF_WAITING = "BackoffWaiting"  # Created's reason while the next attempt waits
PODS_STOPPING = "PodsStopping"  # and once it has waited, while the attempt before's pods still run


def _some(names: list[str]) -> str:
    """The first three names, for a message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _backing_off_until(status: dict[str, Any], now: datetime) -> datetime | None:
    """When the back-off of a status (retryAfter) ends, while it has not."""
    due = _parse_time(status.get("retryAfter"))
    return due if due and now < due else None


def retry_delay(failures: int) -> int:
    """Seconds the next attempt waits after the `failures`th counted failure: 10, doubled per failure, at most 360."""
    return min(RETRY_BACKOFF_SECONDS * 2 ** max(failures - 1, 0), RETRY_BACKOFF_MAX_SECONDS)


def _workers_stopped(status: dict[str, Any], old: dict[str, Any], pods: list[dict[str, Any]]) -> None:
    """A finished job's pods are being stopped (by the operator, or the Job controller): none runs or waits any more.
    Counted as seen now, its WORKERS column showed them running for ever, as it is never reconciled again. The
    attempt's `pods` seen ended count too: the Job controller counts them a moment later, and a job that succeeded
    on rank 0's exit said `succeeded: 0` for good."""
    if workers := status.get("workers", old.get("workers")):
        exits = [(p.get("terminated") or {}).get("exitCode") for p in pods]
        succeeded = sum(p["phase"] == "Succeeded" or code == 0 for p, code in zip(pods, exits))
        failed = sum(p["phase"] == "Failed" or code not in (None, 0) for p, code in zip(pods, exits))
        status["workers"] = dict(workers, active=0, ready=0, succeeded=max(workers.get("succeeded", 0), succeeded),
                                 failed=max(workers.get("failed", 0), failed))


def _backing_off(conds: Conditions, attempt: int, due: datetime, failures: int) -> None:
    """Created False (BackoffWaiting) until `due`: the job's reason in `kubectl get`, and a Warning Event."""
    conds.set(T.CREATED, False, BACKOFF_WAITING, f"attempt {attempt} starts at {timestamp(due)}: a back-off of "
              f"{retry_delay(failures)} s after {failures} counted failure(s), doubled per failure up to "
              f"{RETRY_BACKOFF_MAX_SECONDS} s")


def _next_attempt(conds: Conditions, status: dict[str, Any], attempt: int, reason: str, why: str) -> None:
    """Attempt `attempt` is over without ending the job: the next one comes, Restarting says why. Its workers are
    none: its count stayed in the WORKERS column through a back-off, or while a deleted Job's pods stopped."""
    _numbered(conds, status, attempt + 1)
    status["workers"] = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0}
    conds.set(T.RESTARTING, True, reason, f"{why}; attempt {attempt + 1} resumes from the latest checkpoint, "
                                          "if there is one")
    conds.clear(T.RUNNING, reason)
    conds.clear(T.METRICS_STALE, reason)


def _numbered(conds: Conditions, status: dict[str, Any], attempt: int) -> None:
    """The job is at attempt `attempt` now. Scheduled is dropped: the attempt before's "every worker has a node" (or
    its gates, its queue) said so of the new one's pods while it waited (a back-off, its pods stopping, a quota)."""
    status["attempts"] = attempt
    conds.drop(T.SCHEDULED)


def _not_exiting(conds: Conditions, old: dict[str, Any], now: datetime) -> None:
    """Rank 0 reported Done, then closed its endpoint (or exited): a failed or skipped read is no news, and
    MetricsStale (reason NotExiting) comes only once some pod has not exited DONE_EXIT_SECONDS after the last read."""
    updated = _parse_time((old.get("progress") or {}).get("updatedAt"))
    if updated and (now - updated).total_seconds() >= DONE_EXIT_SECONDS:
        conds.set(T.METRICS_STALE, True, NOT_EXITING,
                  f"rank 0 reported Done (last read at {timestamp(updated)}); its pods have not exited")


def _stale(conds: Conditions, old: dict[str, Any], now: datetime, poll_seconds: float, reason: str,
           message: str) -> None:
    """MetricsStale once the last good read of this attempt is `stale_after` old (STALE_AFTER_SECONDS, or three polls
    where they are longer), or, before its first read, once it has run for `starting_grace` (STARTING_SECONDS): a
    retried or resumed attempt's rank 0 gets the same time to start as the first's, though the last read (the previous
    attempt's) is older. The last numbers stay in status.progress and status.metrics, whose updatedAt tells their
    age."""
    updated = _parse_time((old.get("progress") or {}).get("updatedAt"))
    if read := _read_this_attempt(conds.get(T.RUNNING), old):
        last, grace = read, stale_after(poll_seconds)
    else:
        last, grace = _parse_time(conds.get(T.RUNNING).get("lastTransitionTime")), starting_grace(poll_seconds)
    if last is None or (now - last).total_seconds() < grace:
        return
    since = f"since {timestamp(updated)}" if updated else "yet"
    conds.set(T.METRICS_STALE, True, reason, f"rank 0's metrics not read {since}: {message}")


def reported_done(status: dict[str, Any]) -> bool:
    """Whether rank 0 of the running attempt reported Done: it closes its endpoint then, on purpose, before its pods
    exit (minutes on a loaded node), so a read that fails is no fault."""
    return status.get("stage") == "Done" and _read_this_attempt(condition(status.get("conditions"), T.RUNNING),
                                                                 status) is not None


def still_starting(status: dict[str, Any], now: datetime, poll_seconds: float) -> bool:
    """Whether rank 0 of the running attempt has not been read yet and has not run `starting_grace` (the grace before
    MetricsStale, `_stale`): its endpoint comes up once torch is imported, so a read that fails then is no fault. So
    too where the status does not say Running yet (the tick that first sees the pod run)."""
    running = condition(status.get("conditions"), T.RUNNING)
    if _read_this_attempt(running, status):
        return False
    turned = _parse_time(running.get("lastTransitionTime")) if running.get("status") == "True" else None
    return turned is None or (now - turned).total_seconds() < starting_grace(poll_seconds)


def _read_this_attempt(running: dict[str, Any], old: dict[str, Any]) -> datetime | None:
    """When rank 0's metrics were last read, if that was in the running attempt (not before the `running` condition
    last turned): status.progress and status.stage stay from the attempt before until the new one is read."""
    updated = _parse_time((old.get("progress") or {}).get("updatedAt"))
    turned = _parse_time(running.get("lastTransitionTime"))
    return updated if updated and (turned is None or updated >= turned) else None


def _no_eta(status: dict[str, Any], old: dict[str, Any]) -> None:
    """No time until training ends where no attempt trains: failed for good, suspended, a retry waiting out its
    back-off or starting. The last read's etaSeconds stayed ("600 s to go" on a job failed days ago). The rest of
    status.progress stays: how far it got (a retry resumes from there)."""
    if status["phase"] in (api.Phase.RUNNING, api.Phase.SUCCEEDED):
        return
    if merged(old.get("progress"), status.get("progress", {})).get("etaSeconds") is not None:
        status["progress"] = {**status.get("progress", {}), "etaSeconds": None}


def _finish(decision: Decision, old: dict[str, Any], conds: Conditions) -> Decision:
    status = decision.status
    status["conditions"] = conds.as_list()
    status["phase"], status["reason"] = phase_of(conds)
    _no_eta(status, old)
    # the transitions' Events first, then those decided above (a created attempt's idle GPUs)
    decision.events = transitions(old.get("conditions") or [], status["conditions"]) + decision.events
    return decision
