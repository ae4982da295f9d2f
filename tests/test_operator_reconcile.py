"""The reconcile decision, the attempt outcome and the status, as pure functions."""

from __future__ import annotations

import itertools
import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from finetune_operator import outcome, reconcile
from finetune_operator.reconcile import Observed, decide, pod_warning
from finetune_operator.api import ConditionType, FineTuneJobStatus
from finetune_operator.status import Conditions, evaluation_of, merged, schema_checked, status_patch, timestamp

NOW = datetime(2026, 12, 1, 12, 0, 0)
BACKOFF = timedelta(seconds=10)  # before the attempt after a first counted failure
EXAMPLE = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "examples" / "minilm-sentiment.yaml").read_text())


GENERATIONS = itertools.count(1)  # each body a spec of its own, as the apiserver numbers them (spec_facts' key)


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "ft", "namespace": "ns", "uid": "u", "generation": next(GENERATIONS),
                         "creationTimestamp": "2026-12-01T11:59:00Z"},
            "spec": EXAMPLE["spec"] | spec, "status": status or {}}


def job(attempt: int = 1, **fields: Any) -> dict[str, Any]:
    """An `outcome.job_summary`; the end decided when it came (`decided`), unless given apart."""
    return {"name": f"ft-{attempt}", "attempt": attempt, "active": 1, "ready": 0, "succeeded": 0, "failed": 0,
            "complete": False, "failure": None, "deleting": None, "decided": fields.get("ended")} | fields


def pod(attempt: int = 1, index: int = 0, phase: str = "Running", exit_code: int | None = None,
        message: dict[str, Any] | str | None = None, finished: str = "", reason: str = "", **fields: Any) -> dict[str, Any]:
    summary = {"name": f"ft-{attempt}-{index}-x", "attempt": attempt, "index": index, "phase": phase, "ip": "10.0.0.1",
               "ready": phase == "Running", "scheduled": True, "unschedulable": None, "disrupted": None} | fields
    if exit_code is not None:
        text = json.dumps(message) if isinstance(message, dict) else message
        summary["terminated"] = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                                 "finishedAt": finished, "message": outcome.parse_message(text)}
    return summary


def after(decision: Any, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status once the decision's merge patch is applied."""
    return merged(previous or {}, decision.status)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


def test_a_quota_refusal_waits_visibly_and_the_next_tick_creates_the_attempt() -> None:
    refused = "the ConfigMap ft-1 waits for quota: exceeded quota: team-quota"
    waiting = decide(Observed(body(), [], [], NOW, held_back=("ExceededQuota", refused)))
    status = after(waiting)
    assert status["phase"] == "Pending" and status["reason"] == "ExceededQuota"
    assert conditions(status)["Created"] == ("False", "ExceededQuota") and "Failed" not in conditions(status)
    assert ("Warning", "ExceededQuota", refused) in waiting.events
    created = decide(Observed(body(status), [], [], NOW + timedelta(seconds=30)))
    assert created.create_attempt == 1 and conditions(after(created, status))["Created"] == ("True", "AttemptCreated")


def test_an_attempt_a_quota_held_back_is_the_one_a_resume_creates() -> None:
    """Suspended while a ResourceQuota held attempt 1 back, then resumed: the job counted attempt 1 as one that ran,
    said "attempt 2 resumes from the latest checkpoint" in a Warning, and ATTEMPTS read 2 with none ever run."""
    refused = "the ConfigMap ft-1 waits for quota: exceeded quota: team-quota"
    waiting = after(decide(Observed(body(), [], [], NOW, held_back=("ExceededQuota", refused))))
    assert "children" not in waiting  # none were made
    suspended = after(decide(Observed(body(waiting, suspend=True), [], [], NOW + timedelta(seconds=30))), waiting)
    assert suspended["phase"] == "Suspended"
    resumed = decide(Observed(body(suspended), [], [], NOW + timedelta(minutes=1)))
    status = after(resumed, suspended)
    assert status["attempts"] == 1 and "Restarting" not in conditions(status)
    created = decide(Observed(body(status), [], [], NOW + timedelta(minutes=1, seconds=2)))
    assert created.create_attempt == 1 and after(created, status)["children"]["job"] == "ft-1"


def test_a_child_name_held_by_an_object_not_its_own_is_waited_for_visibly() -> None:
    """A child of an earlier job of this name, orphaned (`kubectl delete --cascade=orphan`) or not yet collected, holds
    the name of the new one's: the job said nothing in its status (kopf only logged), for ever behind an orphan."""
    taken = "a ConfigMap named ft-1 exists and is not this FineTuneJob's (an earlier one's of this name?): waiting"
    waiting = decide(Observed(body(), [], [], NOW, held_back=("NameTaken", taken)))
    status = after(waiting)
    assert status["phase"] == "Pending" and status["reason"] == "NameTaken" and "children" not in status
    assert conditions(status)["Created"] == ("False", "NameTaken") and ("Warning", "NameTaken", taken) in waiting.events
    created = decide(Observed(body(status), [], [], NOW + timedelta(seconds=5)))
    assert created.create_attempt == 1 and conditions(after(created, status))["Created"] == ("True", "AttemptCreated")


def test_a_new_job_gets_its_first_attempt() -> None:
    decision = decide(Observed(body(), [], [], NOW))
    assert decision.create_attempt == 1
    status = after(decision)
    assert status["attempts"] == 1 and status["phase"] == "Pending" and status["reason"] == "AttemptCreated"
    assert conditions(status)["Created"] == ("True", "AttemptCreated")
    assert status["children"]["job"] == "ft-1" and status["startTime"] == "2026-12-01T12:00:00Z"
    assert [e[1] for e in decision.events] == ["AttemptCreated"]


def idle_gpu_warnings(runtime: dict[str, Any], trainer_gpus: int = 0) -> list[tuple[str, str, str]]:
    """The GPUsIdle Events of the tick that creates a job's first attempt, and of the next tick, which sees it made."""
    decision = decide(Observed(body(runtime=runtime), [], [], NOW, trainer_gpus=trainer_gpus))
    assert decision.create_attempt == 1
    later = decide(Observed(body(after(decision)), [job(1)], [pod(1, phase="Pending")], NOW, trainer_gpus=trainer_gpus))
    return [e for e in decision.events + later.events if e[1] == "GPUsIdle"]


def test_a_worker_with_more_gpus_than_processes_is_warned_of_once_when_its_attempt_is_made() -> None:
    """8 GPUs and the default processesPerWorker 1: torchrun ran one process, and seven GPUs sat idle, unsaid (more
    processes than GPUs the trainer refuses)."""
    eight = {"limits": {"memory": "64Gi", "nvidia.com/gpu": 8}}
    assert idle_gpu_warnings({"resources": eight}) == [(
        "Warning", "GPUsIdle", "each worker has 8 GPUs (runtime.resources.limits nvidia.com/gpu) and runs 1 "
        "process(es) (runtime.processesPerWorker): 7 GPU(s) idle; set runtime.processesPerWorker to 8")]
    assert idle_gpu_warnings({"resources": eight, "processesPerWorker": 8}) == []
    assert idle_gpu_warnings(EXAMPLE["spec"]["runtime"]) == []  # a CPU job
    # a spec without resources gets the operator's, and theirs are the GPUs told; a spec's own win over them
    assert "each worker has 4 GPUs (the operator's trainer resources nvidia.com/gpu)" in idle_gpu_warnings(
        {"workers": 2}, trainer_gpus=4)[0][2]
    assert idle_gpu_warnings(EXAMPLE["spec"]["runtime"], trainer_gpus=4) == []


def test_freeze_fields_the_strategy_does_not_read_are_warned_of_in_the_jobs_events() -> None:
    """{freeze: {count: 2}} (strategy none by default) freezes nothing: the API takes it (a refusal failed jobs
    stored before it), and only the trainer's log said so, on every rank, where a user reads the job's Events."""
    adjust = {"freeze": {"count": 2, "pattern": "encoder"}}
    decision = decide(Observed(body(adjust=adjust), [], [], NOW))
    assert decision.create_attempt == 1
    assert [e for e in decision.events if e[1] == "FieldIgnored"] == [
        ("Warning", "FieldIgnored", "adjust.freeze.count is read only with strategy bottom-layers, and the strategy is "
         "none: ignored"),
        ("Warning", "FieldIgnored", "adjust.freeze.pattern is read only with strategy regex, and the strategy is none: "
         "ignored")]
    later = decide(Observed(body(after(decision), adjust=adjust), [job(1)], [pod(1, phase="Pending")], NOW))
    assert not [e for e in later.events if e[1] == "FieldIgnored"]  # once an attempt, at its making
    read = {"freeze": {"strategy": "bottom-layers", "count": 2}}
    assert not [e for e in decide(Observed(body(adjust=read), [], [], NOW)).events if e[1] == "FieldIgnored"]


def test_an_existing_child_is_never_created_again() -> None:
    # A restarted operator may hold a status from before its last creation: the children count too.
    decision = decide(Observed(body({"attempts": 0}), [job(1)], [pod(1, phase="Pending")], NOW))
    assert decision.create_attempt is None and after(decision)["attempts"] == 1


def test_the_children_of_an_earlier_job_of_the_same_name_are_not_its_own() -> None:
    # "ft" succeeded, was deleted and created again; its child Job and pod wait for the garbage collector.
    old_job = {"metadata": {"name": "ft-1", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/attempt": "1"},
                            "ownerReferences": [{"kind": "FineTuneJob", "name": "ft", "uid": "old"}],
                            "deletionTimestamp": "2026-12-01T11:59:59Z"},
               "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    old_pod = {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/job-uid": "old",
                                                           "finetune.dev/attempt": "1"}},
               "status": {"phase": "Succeeded", "containerStatuses": [
                   {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": '{"exitCode": 0}'}}}]}}
    decision = decide(Observed(body(), [outcome.job_summary(old_job)], [outcome.pod_summary(old_pod)], NOW))
    status = after(decision)
    assert decision.create_attempt == 1 and status["phase"] == "Pending" and status["attempts"] == 1


def test_a_job_made_again_under_its_name_waits_for_the_deleted_ones_pods_to_stop() -> None:
    """`kubectl delete` then `apply` again (how a running job's recipe is changed): the deleted job's trainer was still
    writing its last checkpoint (SIGTERM, its grace period) when attempt 1 of the new one started on the same output,
    and removed that checkpoint folder (another recipe's) from under it."""
    checkpointing = pod(uid="old", deletionTimestamp="2026-12-01T12:00:30Z")  # SIGTERM at 12:00:00, a 30 s grace
    waiting = decide(Observed(body(), [], [checkpointing], NOW))
    status = after(waiting)
    assert waiting.create_attempt is None and status["phase"] == "Pending" and status["reason"] == "EarlierPodsStopping"
    assert "ft-1-0-x" in [c["message"] for c in status["conditions"] if c["type"] == "Created"][0]
    assert ("Warning", "EarlierPodsStopping") in [e[:2] for e in waiting.events] and not status["attempts"]
    stopped = dict(checkpointing, phase="Failed")
    created = decide(Observed(body(status), [], [stopped], NOW + timedelta(seconds=20)))
    assert created.create_attempt == 1 and conditions(after(created, status))["Created"] == ("True", "AttemptCreated")
    # One its kubelet never reports stopped (a lost node) holds it only a while past its grace period.
    assert decide(Observed(body(status), [], [checkpointing], NOW + timedelta(minutes=5))).create_attempt == 1


def test_an_unschedulable_worker_shows_the_schedulers_message() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    seen = Observed(body({"attempts": 1}), [job()], [pod(phase="Pending", scheduled=False, unschedulable=message)], NOW)
    status = after(decide(seen))
    assert conditions(status)["Scheduled"] == ("False", "Unschedulable")
    assert status["phase"] == "Pending" and status["reason"] == "Unschedulable"
    assert [c["message"] for c in status["conditions"] if c["type"] == "Scheduled"] == [message]


def test_a_worker_held_by_its_scheduling_gates_says_so_after_a_grace() -> None:
    """A gate whose controller is slow or missing (Kueue's topology-aware scheduling, any webhook's) left the job
    Pending/AttemptCreated for ever, with no reason nor Event: PodScheduled's SchedulingGated was not read."""
    gated = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
        "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/topology"}]},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                       "reason": "SchedulingGated",
                                                       "lastTransitionTime": "2026-12-01T12:00:00Z"}]}})
    made = after(decide(Observed(body({"attempts": 1}), [job()], [gated], NOW)))
    lifting = decide(Observed(body(made), [job()], [gated], NOW + timedelta(seconds=30)))
    assert "Scheduled" not in conditions(after(lifting, made)) and not lifting.events  # Kueue's lifts in seconds
    held = decide(Observed(body(made), [job()], [gated], NOW + timedelta(seconds=61)))
    status = after(held, made)
    assert conditions(status)["Scheduled"] == ("False", "SchedulingGated") and status["reason"] == "SchedulingGated"
    assert [e[:2] for e in held.events] == [("Warning", "SchedulingGated")]
    assert "gates (kueue.x-k8s.io/topology)" in held.events[0][2]
    # Lifted, the pod waits for the scheduler: "held by its scheduling gates" stayed until every worker had a node
    lifted = dict(gated, gated=None)
    freed = after(decide(Observed(body(status), [job()], [lifted], NOW + timedelta(seconds=70))), status)
    assert "Scheduled" not in conditions(freed) and freed["reason"] == "AttemptCreated"


def unscheduled_pod(conditions: list[dict[str, str]], **spec: str) -> dict[str, Any]:
    """The summary of attempt 1's pod made at NOW, Pending with `conditions` (PodScheduled's) and `spec`."""
    return outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}, "creationTimestamp": timestamp(NOW),
                     "ownerReferences": [{"kind": "Job"}]},
        "spec": spec, "status": {"phase": "Pending", "conditions": conditions}})


def test_a_worker_no_scheduler_speaks_of_says_so_after_a_grace() -> None:
    """spec.pod.schedulerName naming a scheduler not running (not installed, misspelled): only that scheduler sets
    PodScheduled, so the pod had no condition and the job stayed Pending/AttemptCreated for ever, with no Event."""
    unheard = unscheduled_pod([], schedulerName="volcano")
    made = after(decide(Observed(body({"attempts": 1}), [job()], [unheard], NOW)))
    waiting = decide(Observed(body(made), [job()], [unheard], NOW + timedelta(seconds=30)))
    assert "Scheduled" not in conditions(after(waiting, made)) and not waiting.events  # a scheduler speaks in moments
    held = decide(Observed(body(made), [job()], [unheard], NOW + timedelta(seconds=61)))
    status = after(held, made)
    assert conditions(status)["Scheduled"] == ("False", "NoScheduler") and status["reason"] == "NoScheduler"
    assert [e[:2] for e in held.events] == [("Warning", "NoScheduler")]
    assert "its scheduler, volcano, since its creation at 2026-12-01T12:00:00Z" in held.events[0][2]
    # The scheduler started, and found no node: its own word replaces ours
    refused = unscheduled_pod([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": "0/3 nodes are available"}], schedulerName="volcano")
    assert "unheard" not in refused
    found = after(decide(Observed(body(status), [job()], [refused], NOW + timedelta(seconds=70))), status)
    assert conditions(found)["Scheduled"] == ("False", "Unschedulable")
    # A pod of no schedulerName is the default scheduler's, and a pod past Pending is no scheduler's business
    assert unscheduled_pod([])["unheard"] == "default-scheduler"
    assert "unheard" not in outcome.pod_summary({"metadata": {"name": "p"}, "status": {"phase": "Failed"}})


def test_a_schedulers_error_on_a_worker_shows_its_reason_and_message() -> None:
    """PodScheduled False for a reason other than Unschedulable (SchedulerError: a volume's PreBind timing out, an
    extender down), which the scheduler retries as it does an unschedulable pod: the job stayed Pending/AttemptCreated
    with no condition nor Event for as long as the error lasted."""
    error = unscheduled_pod([{"type": "PodScheduled", "status": "False", "reason": "SchedulerError",
                              "message": 'running PreBind plugin "VolumeBinding": binding volumes: context deadline '
                                         'exceeded'}])
    assert "unheard" not in error
    decision = decide(Observed(body({"attempts": 1}), [job()], [error], NOW))
    status = after(decision)
    assert conditions(status)["Scheduled"] == ("False", "Unschedulable") and status["reason"] == "Unschedulable"
    said = 'SchedulerError: running PreBind plugin "VolumeBinding": binding volumes: context deadline exceeded'
    assert [c["message"] for c in status["conditions"] if c["type"] == "Scheduled"] == [said]
    assert ("Warning", "Unschedulable") in [e[:2] for e in decision.events]


def test_a_new_attempt_is_not_said_scheduled_for_the_attempt_before() -> None:
    """A retry kept Scheduled True, "every worker has a node", from attempt 1 while attempt 2's pods had none."""
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW)))
    assert conditions(running)["Scheduled"] == ("True", "Scheduled")
    crashed = job(active=0, failed=1, failure={"reason": "PodFailurePolicy", "message": "Pod ns/ft-1-0-x has "
                  "condition DisruptionTarget matching FailJob rule at index 0"}, ended="2026-12-01T12:00:10Z")
    retrying = after(decide(Observed(body(running), [crashed], [], NOW + timedelta(seconds=10))), running)
    created = decide(Observed(body(retrying), [crashed], [], NOW + timedelta(seconds=20)))
    assert created.create_attempt == 2 and "Scheduled" not in conditions(after(created, retrying))
    # nor while it waits: a quota holding it back (or a back-off, the pods stopping) kept attempt 1's for minutes
    assert "Scheduled" not in conditions(retrying)
    quota = ("ExceededQuota", "the ConfigMap ft-2 waits for quota: exceeded quota: team-quota")
    held = decide(Observed(body(retrying), [crashed], [], NOW + timedelta(seconds=20), held_back=quota))
    assert "Scheduled" not in conditions(after(held, retrying))
    suspended = after(decide(Observed(body(running, suspend=True), [job(ready=1)], [pod()], NOW)), running)
    resumed = after(decide(Observed(body(suspended), [], [], NOW + timedelta(seconds=10))), suspended)
    assert resumed["attempts"] == 2 and "Scheduled" not in conditions(resumed)


def test_a_job_whose_pods_cannot_be_created_says_why() -> None:
    warning = ("FailedCreate", 'Error creating: pods "ft-1-0-x" is forbidden: error looking up service account ns/gone')
    status = after(decide(Observed(body({"attempts": 1}), [job(active=0)], [], NOW, job_warning=warning)))
    assert conditions(status)["Scheduled"] == ("False", "FailedCreate") and status["reason"] == "FailedCreate"
    assert "service account" in [c["message"] for c in status["conditions"] if c["type"] == "Scheduled"][0]
    # a tick that could not read the Job's Events (a 429: read as none) keeps what was said, and says it once
    unread = after(decide(Observed(body(status), [job(active=0)], [], NOW + timedelta(seconds=5))), status)
    assert conditions(unread)["Scheduled"] == ("False", "FailedCreate") and unread["reason"] == "FailedCreate"
    again = decide(Observed(body(unread), [job(active=0)], [], NOW + timedelta(seconds=10), job_warning=warning))
    assert not again.events
    # its pod made (the account back), waiting for the scheduler: the quota's words went no more
    made = after(decide(Observed(body(unread), [job(active=1)], [pod(phase="Pending", scheduled=False)],
                                 NOW + timedelta(seconds=15), job_warning=warning)), unread)
    assert "Scheduled" not in conditions(made) and made["reason"] == "AttemptCreated"


def test_a_gang_with_a_pod_the_job_controller_could_not_create_is_not_running_and_says_why() -> None:
    """Two workers, and a quota that let the Job controller create only one pod: the job showed Running ("1
    worker(s) running", Scheduled and Training Events) until torchrun's rendezvous timed out and a counted failure
    followed, and the quota's FailedCreate was never read once a pod existed."""
    from finetune_operator import handlers

    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}}
    quota = ("FailedCreate", 'Error creating: pods "ft-1-1-x" is forbidden: exceeded quota: gpus')
    made = after(decide(Observed(body(**spec), [], [], NOW)))
    one = [pod(index=0)]
    for rank in (0, 1):  # whichever pod is missing
        half = after(decide(Observed(body(made, **spec), [job(workers=2, ready=1)], [pod(index=rank)], NOW,
                                     job_warning=quota)), made)
        assert half["phase"] == "Pending" and conditions(half)["Scheduled"] == ("False", "FailedCreate"), half
        assert "Running" not in conditions(half)
        slow = after(decide(Observed(body(made, **spec), [job(workers=2, ready=1)], [pod(index=rank)], NOW)), made)
        assert slow["phase"] == "Pending" and "Running" not in conditions(slow)
    # pod 0 made again beside the one it replaces, still terminating: two pods, one worker, pod 1 still missing
    again = [pod(index=0, deletionTimestamp="2026-12-01T12:00:00Z"), pod(index=0, phase="Pending", scheduled=False)]
    for warning in (quota, None):  # and at a tick whose Events were unread: kept, not dropped and said again
        replaced = after(decide(Observed(body(half, **spec), [job(workers=2, ready=1)], again, NOW,
                                         job_warning=warning)), half)
        assert conditions(replaced)["Scheduled"] == ("False", "FailedCreate"), warning
    whole = after(decide(Observed(body(made, **spec), [job(workers=2, active=2)], [pod(), pod(index=1)], NOW)), made)
    assert whole["phase"] == "Running"
    # A worker that finished before rank 0 leaves the gang running.
    ahead = [pod(), pod(index=1, phase="Succeeded", exit_code=0)]
    assert after(decide(Observed(body(whole, **spec), [job(workers=2, succeeded=1)], ahead, NOW)), whole)["phase"] \
        == "Running"
    # The operator reads the Job's Warning Events while a pod of the gang is missing, and not once it has all.
    asked: list[str] = []

    class Events:
        def of(self, _clients: Any, _ns: str, name: str) -> dict[str, tuple[str, str]]:
            asked.append(name)
            return {"FailedCreate": ("2026-12-01T12:00:05Z", quota[1])}

    made_at = {"created": "2026-12-01T11:59:00Z", "complete": False, "failure": None}
    seen = Observed(body(made), [job(workers=2, **made_at)], one, NOW)
    assert handlers._job_warning(None, Events(), seen, "ns") == quota and asked == ["ft-1"]
    seen = Observed(body(made), [job(workers=2, **made_at)], [*one, pod(index=1)], NOW)
    assert handlers._job_warning(None, Events(), seen, "ns") is None and asked == ["ft-1"]


def test_rank_0s_success_stands_when_a_peer_fails_in_its_teardown_after_it() -> None:
    """Rank 0 exported the model and exited 0, then a peer's teardown failed (or the user deleted a peer stuck in
    it): the Job failed, and the job was retried, or failed at backoffLimit 0 with its evaluation lost. The Job is
    made with rank 0's success policy (test_operator_children), which completes it then on Kubernetes 1.31 on."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}}
    done = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41}, "final": {"accuracy": 0.66}}}
    running = after(decide(Observed(body({"attempts": 1}, **spec), [job(workers=2, active=2)], [pod(), pod(index=1)],
                                    NOW)))
    pods = [pod(phase="Succeeded", exit_code=0, message=done),
            pod(index=1, phase="Failed", exit_code=143, message={"exitCode": 143, "reason": "Terminated"})]
    failed = job(workers=2, active=0, succeeded=1, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})
    status = after(decide(Observed(body(running, backoffLimit=0, **spec), [failed], pods, NOW)), running)
    assert status["phase"] == "Succeeded" and status["evaluation"]["final"] == {"accuracy": 0.66}
    assert not status.get("failures") and status["attempts"] == 1
    lost = [pods[0], pod(index=1, phase="Failed")]  # a peer on a node lost after rank 0's success: no exit to read
    assert after(decide(Observed(body(running, backoffLimit=0, **spec), [failed], lost, NOW)), running)["phase"] \
        == "Succeeded"
    # Rank 0 done but a peer failing before it ended, or the peer's failure alone, is a failure as before.
    early = [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "stage": "Training"}), pods[1]]
    assert after(decide(Observed(body(running, backoffLimit=0, **spec), [failed], early, NOW)), running)["phase"] \
        == "Failed"


def test_rank_0s_success_stands_while_the_job_controller_stops_the_peers_left_after_it() -> None:
    """Three workers: rank 0 exported and exited 0, and peer 1, whose c10d store it hosted, failed in its teardown.
    The Job controller judges that failure before rank 0's success policy and deletes peer 2, which checkpoints on the
    SIGTERM for its grace period, Running across several ticks: each judged peer 1's knock-on, and the job failed
    (backoffLimit 0) with its evaluation lost, or retried counted."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 3}}
    done = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41}, "final": {"accuracy": 0.66}}}
    running = after(decide(Observed(body({"attempts": 1}, **spec), [job(workers=3, active=3)],
                                    [pod(), pod(index=1), pod(index=2)], NOW - timedelta(minutes=1))))
    rank0 = pod(phase="Succeeded", exit_code=0, message=done, finished="2026-12-01T11:59:58Z")
    store_gone = {"exitCode": 2, "reason": "DistributedFailure", "message": "TCPStore: connection reset"}
    peer1 = pod(index=1, phase="Failed", exit_code=1, message=store_gone, finished="2026-12-01T11:59:59Z")
    failed = job(workers=3, active=1, succeeded=1, failed=1, ended="2026-12-01T12:00:00Z",
                 failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
    checkpointing = pod(index=2, deletionTimestamp="2026-12-01T12:00:30Z")  # deleted at 12:00:00, a 30 s grace
    for limit in (0, 3):
        # Every tick of its grace period, and one that sees the Job's failure before the pod's deletion.
        for peer2, seconds in ((checkpointing, 2), (checkpointing, 20), (pod(index=2), 1)):
            status = after(decide(Observed(body(running, backoffLimit=limit, **spec), [failed], [rank0, peer1, peer2],
                                           NOW + timedelta(seconds=seconds))), running)
            assert status["phase"] == "Succeeded" and status["evaluation"]["final"] == {"accuracy": 0.66}, status
            assert not status.get("failures") and status["attempts"] == 1
        # A tick inside the Job controller's batch, before its verdict, where peer 1 crashed in its teardown (a
        # segfault, no knock-on): every rank had passed the barrier after the export, so the run succeeded.
        crashed = pod(index=1, phase="Failed", exit_code=139, finished="2026-12-01T11:59:59Z")
        status = after(decide(Observed(body(running, backoffLimit=limit, **spec),
                                       [job(workers=3, active=2, succeeded=1)], [rank0, crashed, pod(index=2)],
                                       NOW + timedelta(seconds=1))), running)
        assert status["phase"] == "Succeeded" and status["evaluation"]["final"] == {"accuracy": 0.66}, status
        assert not status.get("failures") and status["attempts"] == 1
        # The Job counted two running, and a finished job is never reconciled again: `kubectl get` said WORKERS 2
        # for ever.
        assert (status["workers"]["active"], status["workers"]["ready"]) == (0, 0)


def with_a_sidecar(index: int, trainer: dict[str, Any], attempt: int = 1, spec: dict[str, Any] | None = None,
                   **meta: Any) -> dict[str, Any]:
    """A pod as the apiserver has it, its trainer in the state given, beside a proxy a service mesh injected as a
    plain container, which runs on: the pod stays Running."""
    return outcome.pod_summary({
        "metadata": {"name": f"ft-{attempt}-{index}-x", "labels": {
            "finetune.dev/attempt": str(attempt), "batch.kubernetes.io/job-completion-index": str(index)}} | meta,
        "spec": spec or {},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "PodScheduled", "status": "True"}],
                   "containerStatuses": [{"name": "trainer", "state": trainer},
                                         {"name": "istio-proxy", "state": {"running": {}}}]}})


def exited(code: int, message: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "finishedAt": "2026-12-01T11:59:58Z",
                           **({"message": json.dumps(message)} if message else {})}}


def outlived(decision: Any) -> list[str]:
    """The pods ended for a trainer that other containers outlive, each with why, naming them."""
    assert all("istio-proxy" in why for _, why in decision.end_pods)
    return [pod for pod, _ in decision.end_pods]


def test_a_trainers_exit_ends_its_pod_though_a_sidecar_would_keep_it_running() -> None:
    """A sidecar injected as a plain container (a service mesh's proxy, a secrets agent) keeps the pod Running after
    the trainer exits, and its Job neither fails nor completes: a trainer's exit 1 left the job Running for ever with
    its GPUs held, and a success left the pod holding them after the job had succeeded. The pod is given a deadline
    already past, which its kubelet enforces: it fails (DeadlineExceeded), kept with the trainer's termination message
    (a deleted pod of a Job is gone a second after its end), and the Job and the attempt read the trainer's exit as
    they would have."""
    bad = {"exitCode": 1, "reason": "InvalidDataset", "message": "no column label", "stage": "Loading"}
    done = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41}, "final": {"accuracy": 0.66}}}
    running = {"attempts": 1, "children": {"job": "ft-1"}}
    for code, message in ((1, bad), (2, {"exitCode": 2, "reason": "NcclError", "message": "x"}), (0, done)):
        decision = decide(Observed(body(running, backoffLimit=3), [job(active=1)], [with_a_sidecar(0, exited(code, message))],
                                   NOW))
        assert outlived(decision) == ["ft-1-0-x"] and decision.delete_job is None
    # Ended by its kubelet, it fails, and the trainer's exit 1 fails the job for good.
    ended = pod(phase="Failed", exit_code=1, message=bad)
    status = after(decide(Observed(body(running, backoffLimit=3), [job(active=0, failed=1, failure={
        "reason": "BackoffLimitExceeded", "message": ""})], [ended], NOW + timedelta(seconds=5))), running)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidDataset")
    # Being deleted (a preemption, a drain) or given its deadline (a tick before), it is ending: nothing more is done
    # or said.
    going = with_a_sidecar(0, exited(1, bad), deletionTimestamp="2026-12-01T12:00:30Z")
    assert not outlived(decide(Observed(body(running), [job(active=1)], [going], NOW)))
    ending = with_a_sidecar(0, exited(1, bad), spec={"activeDeadlineSeconds": 1})
    assert not outlived(decide(Observed(body(running), [job(active=1)], [ending], NOW)))
    # A deadline of its own (a policy engine's, a day) ends it no sooner.
    own = with_a_sidecar(0, exited(1, bad), spec={"activeDeadlineSeconds": 86400})
    assert outlived(decide(Observed(body(running), [job(active=1)], [own], NOW))) == ["ft-1-0-x"]
    # A peer done a moment before rank 0 wrote its success is no end of the run: its pod is given its deadline once
    # rank 0's trainer has exited too.
    two = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}}
    peer = with_a_sidecar(1, exited(0))
    decision = decide(Observed(body(running, **two), [job(workers=2, active=2)],
                               [with_a_sidecar(0, {"running": {}}), peer], NOW))
    assert not outlived(decision) and after(decision, running)["phase"] == "Running"
    decision = decide(Observed(body(running, **two), [job(workers=2, active=2)],
                               [with_a_sidecar(0, exited(0, done)), peer], NOW))
    assert outlived(decision) == ["ft-1-0-x", "ft-1-1-x"] and after(decision, running)["phase"] == "Succeeded"
    # An earlier attempt's pods (orphaned by kubectl delete --cascade=orphan) hold their GPUs no more than its own,
    # a peer's exit 0 too once its rank 0 is gone.
    retried = {"attempts": 2, "children": {"job": "ft-2"}}
    orphans = [with_a_sidecar(0, exited(2), attempt=1), with_a_sidecar(1, exited(0), attempt=3)]
    assert outlived(decide(Observed(body(retried), [job(2)], [*orphans, pod(2)], NOW))) == ["ft-1-0-x", "ft-3-1-x"]


def test_a_pod_is_ended_saying_so_once_and_a_refusal_to_end_it_is_told_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Warning was said with the decision, every tick while the pod was not ended: a refusal (a ResourceQuota
    scoped Terminating counts a pod given a deadline, 1.33 on) said "ending the pod" every 2 s, of a pod that was not;
    a deadline given was said again at each tick until the pod watch brought the patched spec back."""
    import kopf
    from kubernetes.client.exceptions import ApiException

    from finetune_operator import handlers

    said: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *_, message, **__: said.append(message))
    told = handlers.Once()

    class Refusing:
        patched: list[tuple[str, Any]] = []

        def __init__(self, status: int) -> None:
            self.status = status

        def call(self, method: str, path: str, body: Any = None, **_: Any) -> bytes:
            self.patched.append((path, body))
            if self.status:
                raise ApiException(status=self.status, reason="no")
            return b"{}"

    ftj = kopf.Body(body())
    # An apiserver that fails for a while (a 503, a 429) refuses nothing: tried again at the next tick, unsaid.
    handlers._end_pod(Refusing(503), told, ftj, "ns", "ft-1-0-x", "the trainer of pod ft-1-0-x exited 1")
    assert not said
    for _ in range(3):
        handlers._end_pod(Refusing(403), told, ftj, "ns", "ft-1-0-x", "the trainer of pod ft-1-0-x exited 1")
    assert Refusing.patched == [("/api/v1/namespaces/ns/pods/ft-1-0-x", {"spec": {"activeDeadlineSeconds": 1}})] * 4
    assert len(said) == 1 and "could not be ended" in said[0] and "delete it" in said[0]
    # The refusal lifted (the quota raised): the end is said, once, though the ticks patch again until the watch
    # brings the pod's deadline; another pod's end is its own.
    for pod in ("ft-1-0-x", "ft-1-0-x", "ft-1-1-x", "ft-1-1-x"):
        handlers._end_pod(Refusing(0), told, ftj, "ns", pod, f"the trainer of pod {pod} exited 1")
    assert len(Refusing.patched) == 8 and len(said) == 3
    assert all("ending it (spec.activeDeadlineSeconds)" in message for message in said[1:])
    assert [message.split(" exited")[0] for message in said[1:]] == ["the trainer of pod ft-1-0-x",
                                                                     "the trainer of pod ft-1-1-x"]


def test_the_cause_of_a_gangs_failure_is_the_worker_that_failed_not_the_peers_it_took_down() -> None:
    """A worker's user error took rank 0 down with a DistributedFailure in the same second: in one pod order the job
    failed for the user error, in the other it was retried for the DistributedFailure, counted. A rank whose peer
    died can also end first."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}, "backoffLimit": 3}
    user = {"exitCode": 1, "reason": "FatalAnalysisFinding", "message": "NaN weights in layer 3", "stage": "Analyzing"}
    peer = {"exitCode": 2, "reason": "DistributedFailure", "message": "DistBackendError: reset", "stage": "Analyzing"}
    failed = [job(active=0, failed=2, failure={"reason": "BackoffLimitExceeded", "message": ""})]
    for peer_ended in ("2026-12-01T11:59:50Z", "2026-12-01T11:59:49Z"):  # in the same second, or before
        pods = [pod(phase="Failed", exit_code=1, finished=peer_ended, message=peer),
                pod(index=1, phase="Failed", exit_code=1, finished="2026-12-01T11:59:50Z", message=user)]
        for order in (pods, pods[::-1]):
            status = after(decide(Observed(body({"attempts": 1}, **spec), failed, order, NOW)))
            assert (status["phase"], status["reason"]) == ("Failed", "FatalAnalysisFinding"), status
    # Seen before the cause's own pod has ended (the Job failed at the first exit): it waits for it, as for any pod
    # that lags its Job, and then fails for the user error, not retried.
    running = after(decide(Observed(body({"attempts": 1}, **spec), [job(workers=2, active=2)], [pod(), pod(index=1)],
                                    NOW)))
    first = [pod(phase="Failed", exit_code=1, finished="2026-12-01T11:59:49Z", message=peer), pod(index=1)]
    just = [job(active=1, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""}, ended="2026-12-01T11:59:55Z")]
    waited = after(decide(Observed(body(running, **spec), just, first, NOW)), running)
    assert waited["phase"] == "Running" and "Restarting" not in conditions(waited) and not waited.get("failures")
    both = [first[0], pod(index=1, phase="Failed", exit_code=1, finished="2026-12-01T12:00:01Z", message=user)]
    status = after(decide(Observed(body(running, **spec), just, both, NOW + timedelta(seconds=2))), running)
    assert (status["phase"], status["reason"]) == ("Failed", "FatalAnalysisFinding")
    # Two infrastructure failures in one second: the lower index, whatever the order.
    other = {"exitCode": 2, "reason": "InfrastructureFailure", "message": "x", "stage": "Training"}
    pods = [pod(index=i, phase="Failed", exit_code=1, finished="2026-12-01T11:59:50Z", message=other | {"message": m})
            for i, m in ((0, "rank 0's"), (1, "rank 1's"))]
    for order in (pods, pods[::-1]):
        status = after(decide(Observed(body({"attempts": 1}, **spec), failed, order, NOW)))
        assert status["failures"] == 1 and "rank 0's" in next(
            c["message"] for c in status["conditions"] if c["type"] == "Restarting")


def test_a_knock_on_seen_before_the_jobs_verdict_waits_for_the_cause() -> None:
    """Rank 1 raised a user error and rank 0's collective failed with it: rank 0's DistributedFailure reached the API
    first, and a tick before the Job controller wrote FailureTarget (its 1 s batch) counted it and retried ("Pending
    DistributedFailure", a Warning), though an exit 1 is never retried."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}, "backoffLimit": 3}
    user = {"exitCode": 1, "reason": "DatasetNotFound", "message": "no such split", "stage": "Loading"}
    peer = {"exitCode": 2, "reason": "DistributedFailure", "message": "DistBackendError: reset", "stage": "Loading"}
    running = after(decide(Observed(body({"attempts": 1}, **spec), [job(workers=2, active=2)], [pod(), pod(index=1)],
                                    NOW - timedelta(seconds=10))))
    first = pod(phase="Failed", exit_code=1, finished="2026-12-01T11:59:59Z", message=peer)
    before_verdict = decide(Observed(body(running, **spec), [job(workers=2, active=1, failed=1)], [first, pod(index=1)],
                                     NOW))
    waited = after(before_verdict, running)
    assert waited["phase"] == "Running" and waited["attempts"] == 1 and not waited.get("failures"), waited
    assert "Restarting" not in conditions(waited) and not [e for e in before_verdict.events if e[0] == "Warning"]
    failed = job(workers=2, active=1, failed=1, ended="2026-12-01T12:00:01Z",
                 failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
    both = [first, pod(index=1, phase="Failed", exit_code=1, finished="2026-12-01T12:00:00Z", message=user)]
    status = after(decide(Observed(body(waited, **spec), [failed], both, NOW + timedelta(seconds=2))), waited)
    assert (status["phase"], status["reason"]) == ("Failed", "DatasetNotFound") and not status.get("failures")
    # One worker has no cause to wait for, and a failure that is no knock-on is its own: both judged at once.
    alone = outcome.attempt_outcome(job(), [pod(phase="Failed", exit_code=143, message={"exitCode": 143})])
    assert alone.state == outcome.State.FAILED and alone.retry == outcome.Retry.COUNTED
    crash = {"exitCode": 2, "reason": "InfrastructureFailure", "message": "CUDA error", "stage": "Training"}
    own = outcome.attempt_outcome(job(workers=2), [pod(phase="Failed", exit_code=1, message=crash), pod(index=1)])
    assert (own.state, own.reason) == (outcome.State.FAILED, "InfrastructureFailure")


def test_a_gang_whose_worker_is_on_a_lost_node_restarts_uncounted_once_the_node_controller_marks_it() -> None:
    """A worker's node stops reporting; its peer's collective fails (DistributedFailure) and the Job fails, but the
    worker never ends: no kubelet reports it, and the taint manager evicts it only after its tolerationSeconds (300 by
    default). Judged 30 s after the Job's end, the peer's knock-on was counted (with backoffLimit 0 the job failed)."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}, "backoffLimit": 0}
    peer = {"exitCode": 2, "reason": "DistributedFailure", "message": "Connection closed by peer", "stage": "Training"}
    running = {"attempts": 1, "startTime": "2026-12-01T11:50:00Z", "phase": "Running"}
    failed = [job(workers=2, active=1, failed=1, ended="2026-12-01T12:00:00Z",
                  failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})]
    knocked = pod(phase="Failed", exit_code=1, finished="2026-12-01T11:59:59Z", message=peer)

    def stranded(ready: dict[str, str]) -> dict[str, Any]:  # Running, deleted by the Job controller, never ending
        return outcome.pod_summary({
            "metadata": {"name": "ft-1-1-x", "labels": {"finetune.dev/attempt": "1", "batch.kubernetes.io/job-"
                                                        "completion-index": "1"},
                         "deletionTimestamp": "2026-12-01T12:00:30Z"},
            "status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"},
                                                          {"type": "Ready", **ready}]}})

    marked = stranded({"status": "False"})  # MarkPodsNotReady: Ready False, keeping the reason it had while True
    assert marked["node_unready"] and marked["index"] == 1
    assert not stranded({"status": "False", "reason": "ContainersNotReady"})["node_unready"]  # a kubelet's
    assert not stranded({"status": "True"})["node_unready"]
    # Past the 30 s a lagging pod is waited for, the node not marked yet (node-monitor-grace-period, 50 s): it waits.
    unmarked = stranded({"status": "True"})
    waiting = after(decide(Observed(body(running, **spec), failed, [knocked, unmarked], NOW + timedelta(seconds=40))),
                    running)
    assert waiting["attempts"] == 1 and not waiting.get("failures") and not {"Failed", "Restarting"} & set(
        conditions(waiting)), waiting
    decision = decide(Observed(body(running, **spec), failed, [knocked, marked], NOW + timedelta(seconds=45)))
    status = after(decision, running)
    assert status["attempts"] == 2 and not status.get("failures") and status["phase"] == "Pending", status
    assert conditions(status)["Restarting"] == ("True", "NodeNotReady")
    assert "pod ft-1-1-x's node is not ready" in next(e[2] for e in decision.events if e[1] == "NodeNotReady")
    # A worker that never ends on a node that does report (a process stuck in D state): counted, past 60 s.
    stuck = after(decide(Observed(body(running, **spec), failed, [knocked, unmarked], NOW + timedelta(seconds=61))),
                  running)
    assert (stuck["phase"], stuck["reason"], stuck["failures"]) == ("Failed", "BackoffLimitExceeded", 1), stuck


def test_every_retry_is_told_though_none_was_seen_running() -> None:
    """Attempts that failed before any tick saw them run kept Restarting True with one reason, and Created
    AttemptCreated: after attempt 1's Warning, attempts 2 to 4 failed and were made with no Event until the last
    BackoffLimitExceeded, while `failures` and `attempts` climbed."""
    status: dict[str, Any] = {}
    told: list[tuple[str, str]] = []
    for n in (1, 2, 3, 4):
        when = NOW + timedelta(hours=n)  # past each back-off
        made = decide(Observed(body(status, backoffLimit=3), [], [], when))
        status = after(made, status)
        crash = {"exitCode": 2, "reason": "InfrastructureFailure", "message": f"boom {n}", "stage": "Loading"}
        failed = decide(Observed(body(status, backoffLimit=3), [job(n, active=0, failed=1, failure={
            "reason": "BackoffLimitExceeded", "message": ""})], [pod(n, phase="Failed", exit_code=2, message=crash)], when))
        status = after(failed, status)
        told += [(kind, reason) for kind, reason, _ in made.events + failed.events]
    assert told.count(("Normal", "AttemptCreated")) == 4 and told.count(("Warning", "BackoffWaiting")) == 3
    assert told.count(("Warning", "InfrastructureFailure")) == 3 and told[-1] == ("Warning", "BackoffLimitExceeded")
    assert status["phase"] == "Failed" and status["failures"] == 4


def test_a_jobs_warnings_from_before_it_was_made_are_not_its_own() -> None:
    """A FineTuneJob deleted and made again under its name makes a Job of the old one's name: the old Job's
    FailedCreate (a quota since raised) stayed an hour under that name and was shown as the new Job's."""
    quota = ("2026-12-01T11:00:00Z", 'Error creating: pods "ft-1-0-x" is forbidden: exceeded quota: gpus')
    account = ("2026-12-01T12:00:00.250000Z", "Error creating: error looking up service account ns/gone")
    assert outcome.latest_warning({"FailedCreate": quota}, since="2026-12-01T12:00:00Z") is None
    # An eventTime (microseconds) in the second the Job was made is its own.
    assert outcome.latest_warning({"FailedCreate": quota, "": account}, since="2026-12-01T12:00:00Z") == (
        "FailedCreate", account[1])
    assert outcome.latest_warning({"FailedCreate": quota}) == ("FailedCreate", quota[1])


def test_a_reason_the_status_schema_refuses_from_another_controller_is_not_copied() -> None:
    """Any controller or webhook may post a Warning on the Job, or set a DisruptionTarget reason: one not CamelCase
    became a condition's reason and status.reason, which the CRD's pattern refuses, so every status patch was refused
    (a TemporaryError every 5 s) for as long as it was the latest."""
    quota = ("2026-12-01T12:00:01Z", 'pods "ft-1-0" is forbidden: violates PodSecurity')
    assert outcome.latest_warning({"failed-create": quota}) == ("FailedCreate", quota[1])
    seen = Observed(body({"attempts": 1, "children": {"job": "ft-1"}}), [job(active=0)], [], NOW,
                    job_warning=outcome.latest_warning({"failed-create": quota}))
    assert after(decide(seen))["reason"] == "FailedCreate"
    raw = {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
           "status": {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                                         "reason": "evicted by a-descheduler"}]}}
    assert outcome.pod_summary(raw)["disrupted"] == "Disrupted"


def test_a_running_job_shows_progress_from_rank_zeros_metrics() -> None:
    sample = {"step": 30, "total_steps": 120, "epoch": 0.25, "loss": 0.61, "learning_rate": 1e-3,
              "samples_per_second": 32.0, "tokens_per_second": 900.0, "stage": "Training"}
    status = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW, sample=sample)))
    assert status["phase"] == "Running" and status["stage"] == "Training"
    assert status["progress"] | {"updatedAt": None} == {"percent": 25, "step": 30, "totalSteps": 120, "epoch": 0.25,
                                                         "etaSeconds": 45, "updatedAt": None}  # 90 steps x 16 / 32
    assert status["metrics"] == {"loss": 0.61, "learningRate": 1e-3, "samplesPerSecond": 32.0, "tokensPerSecond": 900.0}
    # A trainer that serves its steps/s: the ETA is the steps left over it, whatever rows a step holds
    status = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW, sample=sample | {"steps_per_second": 3.0})))
    assert status["progress"]["etaSeconds"] == 30


def test_a_scraped_step_total_or_epoch_out_of_range_is_bounded() -> None:
    """Rank 0's port is the tenant's: a step of -1 or 1e30, a total of -10, an epoch of -1 were refused by the status
    schema at every poll, so the job's conditions and Events froze where they were."""
    base = {"step": 30, "total_steps": 120, "epoch": 0.25, "loss": 0.6, "samples_per_second": 32.0, "stage": "Training"}
    for served, shown in (({"step": -1}, {"step": 0, "percent": 0}), ({"total_steps": -10}, {"totalSteps": 0}),
                          ({"epoch": -1.0}, {"epoch": 0.0}), ({"step": 1e30}, {"step": 2**63 - 1, "percent": 100}),
                          ({"samples_per_second": 5e-324}, {"step": 30})):  # an ETA past any integer: none
        status = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW, sample=base | served)))
        assert status["phase"] == "Running" and status["progress"].items() >= shown.items(), served
        FineTuneJobStatus.from_wire(status)


def test_a_resumed_attempt_keeps_the_progress_until_its_first_step() -> None:
    before = {"step": 30, "total_steps": 120, "epoch": 0.25, "loss": 0.61, "samples_per_second": 32.0,
              "stage": "Training"}
    first = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW, sample=before)))
    # Attempt 2 loads and measures its baseline: its trainer reports the stage, and no step, loss or throughput yet.
    loading = after(decide(Observed(body(first | {"attempts": 2}), [job(2)], [pod(2)], NOW,
                                    sample={"stage": "Loading"})), first)
    assert loading["stage"] == "Loading"
    assert (loading["progress"]["step"], loading["progress"]["percent"], loading["metrics"]["loss"]) == (30, 25, 0.61)


def test_what_a_new_observation_lacks_leaves_the_merge_patched_status() -> None:
    two_workers = {"configMap": "ft-1", "service": "ft-1", "job": "ft-1"}
    suspended = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "children": two_workers,
                 "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "",
                                 "lastTransitionTime": "2026-12-01T11:30:00Z"}]}
    # Resumed with one worker (spec.runtime.workers was 2): the next attempt has no Service.
    resumed = after(decide(Observed(body(suspended), [job(1, active=0, deleting="2026-12-01T12:00:30Z")], [], NOW)), suspended)
    assert resumed["children"] == {"configMap": "ft-1", "job": "ft-1"}
    sample = {"step": 30, "total_steps": 120, "samples_per_second": 32.0, "tokens_per_second": 900.0}
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW, sample=sample)))
    assert running["progress"]["etaSeconds"] == 45
    again = decide(Observed(body(running), [job()], [pod()], NOW, sample=sample))
    assert not {"children", "progress", "metrics"} & set(status_patch(running, again.status))  # nothing new to send
    stalled = after(decide(Observed(body(running), [job()], [pod()], NOW, sample=sample | {
        "step": 31, "samples_per_second": 0.0, "tokens_per_second": None})), running)
    assert "etaSeconds" not in stalled["progress"] and "tokensPerSecond" not in stalled["metrics"]


def test_no_eta_is_left_once_the_attempt_stops_without_success() -> None:
    """status.progress.etaSeconds was computed while reads succeeded, and cleared only by success: a job failed for
    good, suspended, or waiting out a retry's back-off said "600 s until training ends" for ever. How far it got
    (percent, step) stays."""
    sample = {"step": 400, "total_steps": 1000, "epoch": 0, "loss": 0.61, "samples_per_second": 32.0,
              "steps_per_second": 1.0, "stage": "Training"}
    base = {"attempts": 1, "children": {"job": "ft-1"}}
    running = after(decide(Observed(body(base), [job()], [pod()], NOW, sample=sample)), base)
    assert running["phase"] == "Running" and running["progress"]["etaSeconds"] == 600
    ended = [job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})]
    later = NOW + timedelta(seconds=5)

    def exited(code: int, reason: str) -> list[dict[str, Any]]:
        return [pod(phase="Failed", exit_code=code, message={"exitCode": code, "reason": reason, "message": "x",
                                                             "stage": "Training"})]

    failed = after(decide(Observed(body(running), ended, exited(1, "InvalidDataset"), later)), running)
    retrying = after(decide(Observed(body(running, backoffLimit=3), ended, exited(2, "NcclError"), later)), running)
    suspending = after(decide(Observed(body(running, suspend=True), [job()], [pod()], later)), running)
    suspended = after(decide(Observed(body(suspending, suspend=True), [], [], NOW + timedelta(minutes=30))), suspending)
    for status, phase in ((failed, "Failed"), (retrying, "Pending"), (suspending, "Suspended"),
                          (suspended, "Suspended")):
        assert status["phase"] == phase and "etaSeconds" not in status["progress"], status
        assert status["progress"] | {"updatedAt": None} == {"percent": 40, "step": 400, "totalSteps": 1000,
                                                             "epoch": 0.0, "updatedAt": None}
        FineTuneJobStatus.from_wire(status)
    assert retrying["reason"] == "BackoffWaiting"
    # Nothing is sent where nothing is left to clear: once cleared, or where no read ever gave one (an empty
    # progress the apiserver would store).
    again = decide(Observed(body(suspended, suspend=True), [], [], NOW + timedelta(minutes=31)))
    assert "progress" not in status_patch(suspended, again.status)
    unread = decide(Observed(body(base), ended, exited(1, "InvalidDataset"), later))
    assert unread.status["phase"] == "Failed" and "progress" not in status_patch(base, unread.status)


def test_success_brings_the_evaluation_and_analysis_into_status() -> None:
    message = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41, "f1": 0.3},
                                                              "final": {"accuracy": 0.65, "f1": 0.61}},
               "analysis": {"totalParameters": 100, "trainableParameters": 10,
                            "findings": [{"severity": "info", "code": "Fine", "message": "ok"},
                                         {"severity": "warning", "code": "Odd", "message": "hmm"}]}}
    seen = Observed(body({"attempts": 1, "progress": {"totalSteps": 96, "step": 90}}), [job(complete=True, active=0, succeeded=1)],
                    [pod(phase="Succeeded", exit_code=0, message=message)], NOW)
    status = after(decide(seen))
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2026-12-01T12:00:00Z"
    assert status["evaluation"]["summary"] == "accuracy 0.410→0.650, f1 0.300→0.610"
    assert "teacher" not in status["evaluation"]
    assert status["analysis"]["findings"][0]["code"] == "Odd"  # most severe first
    assert status["output"] == {"uri": "pvc://models/minilm-sentiment"} and status["progress"]["percent"] == 100
    # A distilled job's message gives its teacher's own test scores beside them.
    message["evaluation"]["teacher"] = {"accuracy": 0.7, "f1": 0.66}
    seen.pods[0] = pod(phase="Succeeded", exit_code=0, message=message)
    status = after(decide(seen))
    assert status["evaluation"]["teacher"] == {"accuracy": 0.7, "f1": 0.66}
    FineTuneJobStatus.from_wire(status)


def test_a_success_seen_before_the_job_controller_counts_it_counts_its_workers() -> None:
    """Rank 0's exit is the success, seen at the tick before the Job controller counts its pod: the job, never
    reconciled again, said `workers: {succeeded: 0}` for good (`kubectl describe` of the demo's job)."""
    message = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41}, "final": {"accuracy": 0.6}}}
    running = {"attempts": 1, "workers": {"active": 1, "ready": 1, "succeeded": 0, "failed": 0}}
    status = after(decide(Observed(body(running), [job(active=1, ready=0)],
                                   [pod(phase="Succeeded", exit_code=0, message=message)], NOW)), running)
    assert status["phase"] == "Succeeded"
    assert status["workers"] == {"active": 0, "ready": 0, "succeeded": 1, "failed": 0}
    # Three workers, one of them failed in its teardown and counted by the Job already: the counts are the larger
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 3}}
    pods = [pod(phase="Succeeded", exit_code=0, message=message), pod(index=1, phase="Failed", exit_code=1),
            pod(index=2, phase="Succeeded", exit_code=0)]
    status = after(decide(Observed(body(running, **spec), [job(workers=3, active=2, failed=1)], pods, NOW)), running)
    assert status["workers"] == {"active": 0, "ready": 0, "succeeded": 2, "failed": 1}


# What a real run wrote (tiny BERT, maxSteps 200, evalEverySteps 2, earlyStopping patience 1): it stopped at step 62.
EARLY_STOPPED = {"stage": "Done", "reason": "Succeeded", "message": "62 steps; test loss 1.1 -> 1.069", "exitCode": 0,
                 "progress": {"step": 62, "totalSteps": 200, "epoch": 7},
                 "metrics": {"loss": 1.0455777645111084, "learningRate": 0.0008415419751390154,
                             "samplesPerSecond": 790.3285355574961},
                 "evaluation": {"baseline": {"loss": 1.1000742018222809, "accuracy": 0.234375},
                                "final": {"loss": 1.0690083503723145, "accuracy": 0.390625}}}


def test_success_gives_the_steps_the_run_took_not_the_ones_it_planned() -> None:
    """An early-stopped run read step 200 of 200 at the end, though it took 62 (the last read said 62 of 200)."""
    read = {"percent": 31, "step": 62, "totalSteps": 200, "epoch": 7.0, "etaSeconds": 1, "updatedAt": "2026-12-01T11:59:58Z"}
    seen = Observed(body({"attempts": 1, "progress": read, "metrics": {"loss": 1.046}}),
                    [job(complete=True, active=0, succeeded=1)],
                    [pod(phase="Succeeded", exit_code=0, message=EARLY_STOPPED)], NOW)
    status = after(decide(seen), seen.body["status"])
    assert status["progress"] | {"updatedAt": None} == {"percent": 100, "step": 62, "totalSteps": 62, "epoch": 7.0,
                                                         "etaSeconds": 0, "updatedAt": None}
    assert status["metrics"]["loss"] == 1.046  # the last step's, not the last read's (1.046 read at step 62 of 200)


def test_success_says_what_the_run_did_in_its_condition_and_event() -> None:
    """The trainer's line for people ("62 steps; test loss 1.1 -> 1.069") reached no one: `kubectl describe` ended
    its story with "attempt 1 finished; the model is at ..."."""
    seen = Observed(body({"attempts": 1}), [job(complete=True, active=0, succeeded=1)],
                    [pod(phase="Succeeded", exit_code=0, message=EARLY_STOPPED)], NOW)
    decision = decide(seen)
    said = "attempt 1 finished (62 steps; test loss 1.1 -> 1.069); the model is at pvc://models/minilm-sentiment"
    assert ("Normal", "Completed", said) in decision.events
    assert next(c for c in after(decision)["conditions"] if c["type"] == "Succeeded")["message"] == said


def test_success_of_a_run_whose_metrics_were_never_read_gives_its_steps_and_loss() -> None:
    """A job whose metrics no read reached (a NetworkPolicy closing port 9090, a run shorter than a poll) ended
    with no progress and a blank Loss column, though the termination message has both."""
    seen = Observed(body({"attempts": 1}), [job(complete=True, active=0, succeeded=1)],
                    [pod(phase="Succeeded", exit_code=0, message=EARLY_STOPPED)], NOW)
    status = after(decide(seen))
    assert status["progress"] == {"percent": 100, "step": 62, "totalSteps": 62, "epoch": 7.0, "etaSeconds": 0,
                                  "updatedAt": "2026-12-01T12:00:00Z"}
    assert status["metrics"] == {"loss": 1.046, "learningRate": 0.0008415, "samplesPerSecond": 790.3}


def test_a_pruned_model_brings_its_layer_scores_size_and_latency_into_status() -> None:
    message = {"stage": "Done", "exitCode": 0, "evaluation": {"final": {"accuracy": 0.62}},
               "analysis": {"totalParameters": 100, "layerImportance": [0.13, 0.11, 0.12, "x"]},
               "pruning": {"removedLayers": [1, 2], "parameters": {"before": 22714371, "after": 19165443},
                           "latencyMs": {"before": 41.5, "after": 28.1}, "metricsBefore": {"accuracy": 0.33}}}
    seen = Observed(body({"attempts": 1}), [job(complete=True, active=0, succeeded=1)],
                    [pod(phase="Succeeded", exit_code=0, message=message)], NOW)
    status = after(decide(seen))
    assert status["analysis"]["layerImportance"] == [0.13, 0.11, 0.12]  # what is not a number is dropped
    assert status["pruning"] == {"removedLayers": [1, 2], "parameters": {"before": 22714371.0, "after": 19165443.0},
                                 "latencyMs": {"before": 41.5, "after": 28.1}, "metricsBefore": {"accuracy": 0.33}}
    FineTuneJobStatus.from_wire(status)  # what the operator writes, the CRD's schema accepts


def test_a_pruned_run_that_stops_keeps_the_layers_it_removed_in_status() -> None:
    """The termination message names the removed layers from rearrange on, but only a success put them in status: a
    pruned job that failed or restarted in training did not say which layers it had removed."""
    # What a real run wrote (tiny BERT of 4 layers, rearrange.prune.count 1), SIGTERMed in training.
    message = {"stage": "Training", "reason": "Terminated", "message": "stopped by SIGTERM at step 80; a checkpoint "
               "holds it", "exitCode": 143, "analysis": {"totalParameters": 1005667, "trainableParameters": 1005667,
                                                         "layerImportance": [0.0, 0.0001, 0.0001, 0.0001]},
               "pruning": {"removedLayers": [0]}, "progress": {"step": 80, "totalSteps": 100000, "epoch": 9}}
    failed = {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
    seen = Observed(body({"attempts": 1}), [job(failure=failed)], [pod(phase="Failed", exit_code=143, message=message)],
                    NOW)
    status = after(decide(seen))
    assert conditions(status)["Restarting"] == ("True", "Terminated") and status["pruning"] == {"removedLayers": [0]}


def test_a_reason_or_code_the_status_schema_refuses_is_replaced_not_sent() -> None:
    """One bad value in a trainer's message (another version's, a user's own image) got the whole status patch
    refused by the apiserver: the job kept its old status for ever."""
    message = {"stage": "Training", "reason": "bad reason!", "message": "it broke", "exitCode": 1,
               "analysis": {"findings": [{"severity": "warning", "code": "not-camel", "message": "odd"},
                                         {"severity": "info", "code": "Fine" * 20, "message": "long"}]}}
    seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                    [pod(phase="Failed", exit_code=1, message=message)], NOW)
    status = after(decide(seen))
    assert status["reason"] == "TrainerError" and status["phase"] == "Failed" and status["stage"] == "Training"
    assert [f["code"] for f in status["analysis"]["findings"]] == ["Finding", "Finding"]
    FineTuneJobStatus.from_wire(status)  # what the operator writes, the CRD's schema accepts


def test_numbers_json_cannot_carry_never_reach_the_status() -> None:
    """A checkpoint with NaN weights fails its analysis (a NonFiniteWeights finding, exit 1) with NaN layer scores,
    which Python's json writes as NaN: a status patch holding one is no JSON to the apiserver, which refused it
    whole, so the job never showed Failed. The finite scores (the layers below the first NaN) stay."""
    message = {"stage": "Analyzing", "reason": "FatalAnalysisFinding", "exitCode": 1,
               "message": "NonFiniteWeights: layer.2.weight has 9 NaN/Inf values: the checkpoint is broken",
               "analysis": {"totalParameters": 10, "layerImportance": [0.25, float("nan"), float("nan")]},
               "evaluation": {"baseline": {"loss": float("inf"), "accuracy": 0.5}}}
    seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                    [pod(phase="Failed", exit_code=1, message=json.dumps(message))], NOW)
    status = after(decide(seen))
    assert status["phase"] == "Failed" and status["reason"] == "FatalAnalysisFinding"
    assert status["analysis"]["layerImportance"] == [0.25]
    json.dumps(status, allow_nan=False)  # what the apiserver reads
    FineTuneJobStatus.from_wire(status)
    assert evaluation_of(outcome.parse_message(json.dumps(message)))["baseline"] == {"accuracy": 0.5}


def ended_with(message: dict[str, Any] | str, exit_code: int = 1) -> dict[str, Any]:
    """The status once attempt 1 ended (a success at exit 0, else a failure) with rank 0's termination `message`."""
    ended = job(complete=True, active=0, succeeded=1) if exit_code == 0 else \
        job(failure={"reason": "BackoffLimitExceeded", "message": ""})
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return after(decide(Observed(body({"attempts": 1}), [ended], [pod(phase=phase, exit_code=exit_code,
                                                                       message=message)], NOW)))


def test_a_trainers_message_that_is_no_text_is_not_the_conditions() -> None:
    """The termination message's "message" is the image's to write: a number crashed the reconcile (short() took its
    len), a list got every status patch refused. Either way the job stayed Running for good, its deadline never
    fired. The operator's own words stand in for it."""
    for words, exit_code, told in ((42, 1, ("Failed", "the trainer exited 1 (see `kubectl logs ft-1-0-x`)")),
                                   (["a"], 1, ("Failed", "the trainer exited 1 (see `kubectl logs ft-1-0-x`)")),
                                   ({"x": 1}, 2, ("Restarting", "attempt 1 failed (pod ft-1-0-x exited 2)"))):
        status = ended_with({"reason": "Bad", "message": words, "exitCode": exit_code}, exit_code)
        kind, said = told
        assert next(c["message"] for c in status["conditions"] if c["type"] == kind).startswith(said), words
        FineTuneJobStatus.from_wire(status)
    conds = Conditions([], 1, NOW)
    conds.set(ConditionType.FAILED, True, "Bad", 42)  # type: ignore[arg-type]  # whatever reaches it is sent as text
    assert conds.get(ConditionType.FAILED)["message"] == "42"


def test_a_number_past_a_floats_range_reads_as_none() -> None:
    """JSON's 1e400 parsed as infinity: in status.progress.epoch or status.metrics.loss the patch was no JSON the
    apiserver reads (400), in pruning.removedLayers int() of it crashed the reconcile, at every tick for good."""
    assert outcome.parse_message('{"loss": 1e400, "epoch": -1e400, "step": 2.5}') == {"loss": None, "epoch": None,
                                                                                    "step": 2.5}
    failed = ended_with('{"reason":"Bad","message":"m","exitCode":1,"pruning":{"removedLayers":[1e400, 3]}}')
    assert failed["phase"] == "Failed" and failed["pruning"]["removedLayers"] == [3]
    for progress, metrics in (('{"step":5,"epoch":1e400}', '{}'), ('{"step":5}', '{"loss":1e400,"learningRate":0.1}')):
        status = ended_with(f'{{"stage":"Done","reason":"Succeeded","message":"ok","exitCode":0,'
                            f'"progress":{progress},"metrics":{metrics}}}', exit_code=0)
        assert status["phase"] == "Succeeded" and status["progress"]["step"] == 5
        assert "epoch" not in status["progress"] and status.get("metrics", {}).get("loss") is None
        json.dumps(status, allow_nan=False)
        FineTuneJobStatus.from_wire(status)


def test_a_count_out_of_range_in_a_trainers_message_is_bounded() -> None:
    """A negative or boolean totalParameters, or a success's progress.step of true (Python's int), was refused by the
    status schema: the failed job stayed Running for good. A count past int64 is capped, as the schema is."""
    for total, shown in ((-5, 0), (True, None), (10**30, 2**63 - 1), ("5", None)):
        status = ended_with({"reason": "Bad", "message": "m", "exitCode": 1,
                             "analysis": {"totalParameters": total, "trainableParameters": 3}})
        assert status["phase"] == "Failed" and status["analysis"].get("totalParameters") == shown, total
        FineTuneJobStatus.from_wire(status)
    status = ended_with('{"stage":"Done","reason":"Succeeded","message":"ok","exitCode":0,"progress":{"step":true}}', 0)
    assert status["phase"] == "Succeeded" and "progress" not in status  # none said, and no read before
    FineTuneJobStatus.from_wire(status)


def test_a_trainers_message_of_any_shape_still_ends_the_job() -> None:
    """Each of these crashed the reconcile (a list where an object was read, a severity no key can be, an integer
    past a float's range), at every tick for good: the job never showed how it ended."""
    big = 10**400
    for hostile in ({"evaluation": [1]}, {"evaluation": {"final": [1], "baseline": {"a": big}}},
                    {"analysis": {"findings": 5}}, {"analysis": {"findings": [{"severity": ["fatal"]}]}},
                    {"analysis": {"layerImportance": [big]}}, {"pruning": {"parameters": {"before": big, "after": 1}}},
                    {"pruning": {"metricsBefore": {"a": big}}}, {"metrics": {"loss": big}},
                    {"progress": {"step": big, "epoch": big}}):
        for exit_code in (0, 1):
            status = ended_with({"stage": "Done", "reason": "Bad", "message": "m", "exitCode": exit_code} | hostile,
                                exit_code)
            assert status["phase"] == ("Succeeded" if exit_code == 0 else "Failed"), hostile
            FineTuneJobStatus.from_wire(status)


def test_an_exit_code_in_a_message_that_is_no_integer_is_none_said() -> None:
    """`"exitCode": true` read as 1 (Python's bool is an int): a user error, never retried, for a worker that exited 2;
    `false` read as a reported success. The container's own exit code stands."""
    status = ended_with({"reason": "Odd", "message": "m", "exitCode": True}, exit_code=2)
    assert status["phase"] != "Failed" and status["failures"] == 1, status
    assert any(c["type"] == "Restarting" and c["status"] == "True" for c in status["conditions"])


def test_what_the_status_schema_refuses_is_left_out_of_the_patch_and_the_rest_is_written() -> None:
    """The apiserver refuses a status patch whole: one value it refuses kept the conditions and the phase from being
    written, for good. Only that field is left out, and what it was is told; a condition of a type another version
    wrote (kept as it was stored) is no refusal."""
    theirs = {"type": "Degraded", "status": "True", "reason": "Theirs", "lastTransitionTime": "2026-12-01T11:00:00Z"}
    failed = {"type": "Failed", "status": "True", "reason": "Bad", "message": "m",
              "lastTransitionTime": "2026-12-01T12:00:00Z", "observedGeneration": 1}
    changes = {"phase": "Failed", "reason": "Bad", "conditions": [failed, theirs], "progress": None,
               "children": {"job": "ft-1", "service": None}, "analysis": {"totalParameters": -5},
               "metrics": {"loss": float("nan")}}
    kept, refused = schema_checked(changes)
    assert kept == {k: changes[k] for k in ("phase", "reason", "conditions", "progress", "children")}  # nulls delete
    assert refused[0].startswith("status.analysis.totalParameters: Input should be greater than or equal to 0")
    assert refused[1].startswith("status.metrics: not JSON") and len(refused) == 2
    assert schema_checked(kept) == (kept, [])


def test_a_tick_writes_the_conditions_and_phase_whatever_else_the_schema_refuses(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The wiring of the check above: the tick's patch leaves out what the schema refuses and logs it."""
    import kopf

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop
    monkeypatch.setattr(reconcile, "analysis_of", lambda _: {"totalParameters": -5})  # a value no source bounds
    failed = pod(phase="Failed", exit_code=1, message={"reason": "Bad", "message": "m", "exitCode": 1})
    made = ticked(body({"attempts": 1}), ({("ns", "ft"): [job(failure={"reason": "X", "message": ""})]},
                                          {("ns", "ft"): [failed]}))
    assert made.patches[0]["phase"] == "Failed" and conditions(made.patches[0])["Failed"] == ("True", "Bad")
    assert "analysis" not in made.patches[0]
    assert "ns/ft: not written, the status schema refuses it: status.analysis.totalParameters" in caplog.text


def test_a_tick_whose_conditions_are_refused_writes_no_phase_and_posts_no_events(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Written without its conditions, `phase: Failed` belied them, and the transitions' Events (and the failures
    counted) came again at every tick, as the stored conditions never changed."""
    import kopf

    from finetune_operator import status as status_module

    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *_, reason, **__: posted.append(reason))
    refuse = status_module._refusals
    monkeypatch.setattr(status_module, "_refusals",  # a condition the schema refuses, whatever the source
                        lambda s: ["status.conditions[0]: refused"] if "conditions" in s else refuse(s))
    failed = pod(phase="Failed", exit_code=1, message={"reason": "Bad", "message": "m", "exitCode": 1})
    made = ticked(body({"attempts": 1}), ({("ns", "ft"): [job(failure={"reason": "X", "message": ""})]},
                                          {("ns", "ft"): [failed]}))
    assert not {"conditions", "phase", "reason"} & set(made.patches[0]) and posted == []
    assert "ns/ft: not written, the status schema refuses it: status.conditions[0]: refused" in caplog.text


def test_a_lone_surrogate_in_a_message_reads_as_the_apiserver_reads_it() -> None:
    """json.dumps writes a file name os.listdir decoded with surrogateescape as a lone surrogate: the apiserver reads
    it as U+FFFD, and the schema's check refused it, so the conditions holding it were not written."""
    status = ended_with('{"reason": "Bad", "message": "no file \\udce9.csv", "exitCode": 1}')
    assert status["phase"] == "Failed" and status["reason"] == "Bad"
    assert "no file \ufffd.csv" in next(c["message"] for c in status["conditions"] if c["type"] == "Failed")
    assert schema_checked(status)[1] == []


def test_a_user_error_fails_at_once_with_the_trainers_reason() -> None:
    message = {"stage": "Loading", "reason": "InvalidDataset", "message": "data/x.csv: does not exist", "exitCode": 1}
    seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                    [pod(phase="Failed", exit_code=1, message=message)], NOW)
    decision = decide(seen)
    status = after(decision)
    assert status["phase"] == "Failed" and status["reason"] == "InvalidDataset" and status["attempts"] == 1
    assert status["stage"] == "Loading"  # where it stopped, though no metrics were read before
    assert decision.create_attempt is None and ("Warning", "InvalidDataset", "data/x.csv: does not exist") in decision.events


def test_a_stage_that_is_none_of_the_pipelines_is_not_shown() -> None:
    """The termination message is the image's to write: what is no stage of ours leaves status.stage alone."""
    for stage in (["Loading"], "Sleeping", None):
        message = {"stage": stage, "reason": "InvalidDataset", "message": "x", "exitCode": 1}
        seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                        [pod(phase="Failed", exit_code=1, message=message)], NOW)
        status = after(decide(seen))
        assert status["phase"] == "Failed" and "stage" not in status, stage


def test_under_torchrun_the_messages_exit_code_decides_and_the_gang_retries() -> None:
    # torchrun exits 1 for any failed worker: the trainer's own exitCode (2: infrastructure) is trusted.
    message = {"stage": "Training", "reason": "RuntimeError", "message": "NCCL timeout", "exitCode": 2}
    seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                    [pod(phase="Failed", exit_code=1, message=message)], NOW)
    decision = decide(seen)
    status = after(decision)
    assert status["attempts"] == 2 and status["failures"] == 1
    assert conditions(status)["Restarting"] == ("True", "RuntimeError") and status["phase"] == "Pending"
    # An attempt that failed before training (make demo's, at Analyzing) left no checkpoint to resume from.
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["message"].endswith("attempt 2 resumes from the latest checkpoint, if there is one")
    assert decision.create_attempt is None  # a tick after its back-off creates attempt 2, once this status is stored
    following = decide(Observed(body(status), [job(failure={"reason": "X", "message": ""})], [], NOW + BACKOFF))
    assert following.create_attempt == 2


def test_a_worker_that_left_no_message_failed_for_infrastructure() -> None:
    # torchrun (or Python itself, before the trainer ran) exits 1 with no message: not the user's error.
    result = outcome.attempt_outcome(job(failure={"reason": "BackoffLimitExceeded", "message": ""}),
                                     [pod(phase="Failed", exit_code=1, message="Traceback (most recent call last): ...")])
    assert result.retry == outcome.Retry.COUNTED


def test_a_worker_that_left_no_message_is_told_by_its_containers_own_exit_code() -> None:
    """torchrun's 1 is read as infrastructure (2), and the status said "pod ... exited 2" of a container that
    `kubectl describe pod` shows exited 1."""
    result = outcome.attempt_outcome(job(failure={"reason": "BackoffLimitExceeded", "message": ""}),
                                     [pod(phase="Failed", exit_code=1, message="")])
    assert (result.reason, result.message) == ("WorkerFailed", "pod ft-1-0-x exited 1")


# The end of a real log (FallbackToLogsOnError's tail) of a worker SIGKILLed under torchrun, which wrote no message.
TORCHRUN_TAIL = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
======================================================
finetune_trainer.cli FAILED
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_00:15:26
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 18169)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 18169
======================================================
"""


def test_a_worker_that_left_no_message_says_how_its_log_ends() -> None:
    """The pods run with FallbackToLogsOnError, but a log tail in place of the trainer's message was dropped whole: the
    status said only "pod ... exited 1" of a worker SIGKILLed under torchrun, or of an image whose import failed."""
    raw = {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 1, "reason": "Error", "finishedAt": "2026-12-04T00:15:27Z", "message": TORCHRUN_TAIL}}}]}}
    result = outcome.attempt_outcome(job(failure={"reason": "BackoffLimitExceeded", "message": ""}),
                                     [outcome.pod_summary(raw)])
    assert result.message == "pod ft-1-0-x exited 1; its log ends: traceback : Signal 9 (SIGKILL) received by PID 18169"


def test_a_success_written_before_the_process_died_is_no_reason_of_the_failure() -> None:
    """Rank 0 wrote its success, then its process died (a crash in NCCL's teardown; under torchrun, a sibling's): the
    job restarted with the Warning "Succeeded: attempt 1 failed (8 steps; test accuracy 0.2344 -> 0.3906)"."""
    # What a real run wrote (tiny BERT, maxSteps 8), analysis left out.
    message = {"stage": "Done", "reason": "Succeeded", "message": "8 steps; test accuracy 0.2344 -> 0.3906",
               "exitCode": 0, "progress": {"step": 8, "totalSteps": 8, "epoch": 0},
               "evaluation": {"baseline": {"accuracy": 0.234375}, "final": {"accuracy": 0.390625}}}
    seen = Observed(body({"attempts": 1}), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})],
                    [pod(phase="Failed", exit_code=139, message=message)], NOW)
    decision = decide(seen)
    assert conditions(after(decision))["Restarting"] == ("True", "WorkerFailed")
    assert ("Warning", "WorkerFailed", "attempt 1 failed (pod ft-1-0-x exited 139 after the trainer reported success); "
            "attempt 2 resumes from the latest checkpoint, if there is one") in decision.events


def test_the_cause_is_the_earliest_failure_that_is_not_a_peers_143() -> None:
    pods = [pod(index=0, phase="Failed", exit_code=143, finished="2026-12-01T11:00:01Z"),
            pod(index=1, phase="Failed", exit_code=137, reason="OOMKilled", finished="2026-12-01T11:00:02Z", message="oom"),
            pod(index=2, phase="Failed", exit_code=143, finished="2026-12-01T11:00:00Z")]
    result = outcome.attempt_outcome(job(failure={"reason": "BackoffLimitExceeded", "message": ""}), pods)
    assert result.reason == "OOMKilled" and result.retry == outcome.Retry.COUNTED


def test_a_disruption_is_retried_without_counting() -> None:
    failed = job(failure={"reason": "PodFailurePolicy", "message": "Pod ns/ft-1-0-x has condition DisruptionTarget "
                                                                   "matching FailJob rule at index 0"})
    status = after(decide(Observed(body({"attempts": 1, "failures": 1}), [failed], [], NOW)))
    assert status["attempts"] == 2 and status["failures"] == 1 and status["phase"] == "Pending"
    evicted = pod(phase="Failed", exit_code=143, disrupted="EvictionByEvictionAPI")
    status = after(decide(Observed(body({"attempts": 1}), [job(failure={"reason": "X", "message": ""})], [evicted], NOW)))
    assert conditions(status)["Restarting"] == ("True", "EvictionByEvictionAPI") and status["failures"] == 0


def kubelet_evicted(message: str, conditions: list[dict[str, Any]] | None = None, exit_code: int = 137) -> dict[str, Any]:
    """A trainer pod as the kubelet's eviction manager leaves it (evictPod): Failed, reason Evicted, its message, the
    container killed after the eviction's 1 s grace period; a node-pressure eviction adds DisruptionTarget."""
    return {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
            "status": {"phase": "Failed", "reason": "Evicted", "message": message, "conditions": conditions or [],
                       "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "state": {
                           "terminated": {"exitCode": exit_code, "reason": "Error",
                                          "finishedAt": "2026-12-01T11:59:30Z"}}}]}}


# The kubelet's own messages (pkg/kubelet/eviction/helpers.go), trailing space and all, and the field each names.
OWN_LIMITS = {
    'Container trainer exceeded its local ephemeral storage limit "1Gi". ':
        "spec.runtime.resources.limits.ephemeral-storage",
    "Pod ephemeral local storage usage exceeds the total limit of containers 1Gi. ":
        "spec.runtime.resources.limits.ephemeral-storage",
    'Usage of EmptyDir volume "finetune-shm" exceeds the limit "1Gi". ': "spec.runtime.shmSize",
    'Usage of EmptyDir volume "scratch" exceeds the limit "10Gi". ':
        "the emptyDir.sizeLimit of volume scratch in spec.runtime.volumes",
    'Container istio-proxy exceeded its local ephemeral storage limit "1Gi". ':  # a LimitRange's default on a sidecar
        "the ephemeral-storage limit of container istio-proxy, which is not the trainer (another controller adds it)",
}


@pytest.mark.parametrize("message", OWN_LIMITS)
def test_an_eviction_for_the_pods_own_limit_is_counted_and_names_the_field_to_raise(message: str) -> None:
    """Evicted for going past its own limit, the pod carries no DisruptionTarget (KEP-3329): the operator said only
    "pod ... exited 137", or "stopped by SIGTERM" as for a preemption, and every attempt went past the same limit."""
    failed = job(failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
    evicted = outcome.pod_summary(kubelet_evicted(message))
    result = outcome.attempt_outcome(failed, [evicted])
    assert (result.reason, result.retry) == ("StorageLimitExceeded", outcome.Retry.COUNTED)
    assert result.message == (f"pod ft-1-0-x was evicted by its kubelet: {message.strip()} Raise {OWN_LIMITS[message]}, "
                              "or the next attempt may go past it again")
    # A trainer that caught the SIGTERM and said so is no knock-on: the eviction is the cause, and its peers' exits not.
    said = dict(evicted, terminated=dict(evicted["terminated"], exitCode=143, message={
        "exitCode": 143, "reason": "Terminated", "message": "stopped by SIGTERM in stage Training", "stage": "Training"}))
    peer = pod(index=1, phase="Failed", exit_code=143, finished="2026-12-01T11:59:29Z")
    result = outcome.attempt_outcome(failed, [peer, said])
    assert result.reason == "StorageLimitExceeded" and result.result["stage"] == "Training"
    # A pod the kubelet has not told its container's end yet is enough.
    told = outcome.attempt_outcome(failed, [{k: v for k, v in evicted.items() if k != "terminated"}])
    assert told.reason == "StorageLimitExceeded"
    status = after(decide(Observed(body({"attempts": 1}, backoffLimit=0), [failed], [evicted], NOW)))
    assert status["reason"] == "BackoffLimitExceeded" and status["failures"] == 1
    assert OWN_LIMITS[message] in next(c for c in status["conditions"] if c["type"] == "Failed")["message"]


def pressure_evicted(message: str) -> dict[str, Any]:
    """A trainer pod the kubelet evicted for its node's pressure: DisruptionTarget (TerminationByKubelet), its message
    in the condition and the pod's status alike; the Job failed by its pod-failure policy's disruption rule."""
    return outcome.pod_summary(kubelet_evicted(message, [
        {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "message": message}], 143))


DISRUPTED_JOB = {"reason": "PodFailurePolicy", "message": "Pod ns/ft-1-0-x has condition DisruptionTarget matching "
                                                          "FailJob rule at index 0"}
# The kubelet's node-pressure messages (helpers.go's evictionMessage, trailing space and all) that name the trainer over
# its request, as 1.27 on and the kubelets before write them, and the request field each names.
OVER_REQUEST = {
    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi. Container trainer was using "
    "3Gi, request is 2Gi, has larger consumption of memory. ": "spec.runtime.resources.requests.memory",
    "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 5Gi. Container trainer "
    "was using 120Gi, request is 0, has larger consumption of ephemeral-storage. ":
        "spec.runtime.resources.requests.ephemeral-storage to what a worker writes to its node's disk, the hub cache "
        "(an emptyDir at HF_HOME) included",
    "The node was low on resource: memory. Container istio-proxy was using 90Mi, which exceeds its request of 64Mi. "
    "Container trainer was using 3Gi, which exceeds its request of 2Gi. ": "spec.runtime.resources.requests.memory",
}


@pytest.mark.parametrize("message", OVER_REQUEST)
def test_a_node_pressure_eviction_the_trainer_caused_is_counted_and_names_the_request_to_raise(message: str) -> None:
    """Evicted as its node ran short of what the trainer used past its request: the pressure lifted once the pod was
    gone, the next attempt on the same node did the same (the hub model downloaded again, memory grown again), and
    as a free retry it went on for ever, failures 0, with no back-off; backoffLimit never ended it."""
    evicted = pressure_evicted(message)
    result = outcome.attempt_outcome(job(failure=DISRUPTED_JOB), [evicted])
    assert (result.reason, result.retry) == ("EvictedOverRequest", outcome.Retry.COUNTED)
    assert f"Raise {OVER_REQUEST[message]}, or the next attempt may be evicted again" in result.message
    assert result.message.startswith("pod ft-1-0-x was evicted by its kubelet, its node short of ")
    retrying = after(decide(Observed(body({"attempts": 1}), [job(failure=DISRUPTED_JOB)], [evicted], NOW)))
    assert retrying["failures"] == 1 and retrying["retryAfter"] == timestamp(NOW + BACKOFF)
    assert conditions(retrying)["Created"] == ("False", "BackoffWaiting")


def test_a_node_pressure_eviction_the_trainer_caused_fails_a_job_of_backoff_limit_0() -> None:
    message = next(iter(OVER_REQUEST))
    status = after(decide(Observed(body({"attempts": 1}, backoffLimit=0), [job(failure=DISRUPTED_JOB)],
                                   [pressure_evicted(message)], NOW)))
    assert status["phase"] == "Failed" and status["reason"] == "BackoffLimitExceeded" and status["failures"] == 1
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")["message"]
    assert "EvictedOverRequest" in failed and "spec.runtime.resources.requests.memory" in failed


def test_a_node_pressure_eviction_for_others_use_stays_a_free_retry() -> None:
    """The kubelet evicts for memory or disk the node runs short of with DisruptionTarget (TerminationByKubelet): where
    the trainer is not the container it names over its request, the node caused it, and it is retried without
    counting; and an Evicted message of another kind is no own limit."""
    for message in ("The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi. Container "
                    "istio-proxy was using 3Gi, request is 64Mi, has larger consumption of memory. ",
                    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi. ",
                    "The node was low on resource: pids. "):
        pressure = pressure_evicted(message)
        result = outcome.attempt_outcome(job(failure=DISRUPTED_JOB), [pressure])
        assert (result.reason, result.retry) == ("TerminationByKubelet", outcome.Retry.FREE), message
        status = after(decide(Observed(body({"attempts": 1}, backoffLimit=0), [job(failure=DISRUPTED_JOB)], [pressure],
                                       NOW)))
        assert status["attempts"] == 2 and status.get("failures", 0) == 0 and not status.get("retryAfter")
        assert outcome.own_limit_field(message) is None
    assert outcome.own_limit_field(None) is None
    # Only the kubelet's exact words: a message that quotes one inside another is none of them.
    assert outcome.own_limit_field('pod says: Usage of EmptyDir volume "finetune-shm" exceeds the limit "1Gi". ') is None
    assert outcome.over_request("pod says: The node was low on resource: memory. Container trainer was using 3Gi, "
                                "request is 2Gi, has larger consumption of memory. ") is None
    # Refused at admission by a node under pressure (kubelet.rejectPod): no container ran, no DisruptionTarget, and the
    # Job's backoffLimit 0 failed it; it was counted as "a worker failed and left no exit code".
    rejected = outcome.pod_summary(kubelet_evicted("Pod was rejected: The node had condition: [DiskPressure]. "))
    del rejected["terminated"]
    failed = job(failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
    result = outcome.attempt_outcome(failed, [rejected])
    assert (result.reason, result.retry) == ("RejectedByNode", outcome.Retry.FREE)


def kubelet_rejected(reason: str, message: str, index: int = 0) -> dict[str, Any]:
    """A trainer pod its node's kubelet refused to admit (kubelet.go's rejectPod): Failed with the admit handler's
    reason and "Pod was rejected: " before its message; no container ever ran, no DisruptionTarget."""
    return {"metadata": {"name": f"ft-1-{index}-x", "labels": {"finetune.dev/attempt": "1"},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": "Failed", "reason": reason, "message": f"Pod was rejected: {message}",
                       "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "state": {
                           "waiting": {"reason": "ContainerCreating"}}}]}}


def test_a_pod_its_kubelet_refused_says_why_and_is_free_only_for_a_state_the_scheduler_avoids() -> None:
    """A pod refused at admission never ran: it was counted as "a worker failed and left no exit code", and at
    backoffLimit 0 failed the job, with the kubelet's reason and message nowhere. A node shutting down (as a node under
    pressure) is left for good and avoided by the scheduler: a free retry. A refusal the scheduler does not see (a
    device plugin's failed allocation, a GPU the kubelet counts short, a topology policy) may meet every attempt on the
    same node: counted, or free retries would go on for ever."""
    failed = job(failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
    shutdown = outcome.pod_summary(kubelet_rejected("NodeShutdown", "Pod was rejected as the node is shutting down."))
    status = after(decide(Observed(body({"attempts": 1}, backoffLimit=0), [failed], [shutdown], NOW)))
    assert status["attempts"] == 2 and not status.get("failures") and status["phase"] == "Pending", status
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "RejectedByNode"
    assert "pod ft-1-0-x was refused by its node's kubelet (NodeShutdown: Pod was rejected: Pod was rejected as the " \
           "node is shutting down.)" in restarting["message"]
    refusals = {"UnexpectedAdmissionError": "Allocate failed due to requested number of devices unavailable for "
                                            "nvidia.com/gpu. Requested: 1, Available: 0, which is unexpected",
                "OutOfnvidia.com/gpu": "Node didn't have enough resource: nvidia.com/gpu, requested: 1, used: 8, "
                                       "capacity: 8",
                "TopologyAffinityError": "Resources cannot be allocated with Topology locality"}
    for reason, message in refusals.items():
        # counted, and it says why, though its peer, stopped with the Job, left an exit 143
        refused = outcome.pod_summary(kubelet_rejected(reason, message))
        peer = pod(index=1, phase="Failed", exit_code=143, finished="2026-12-01T11:59:59Z")
        result = outcome.attempt_outcome(failed, [refused, peer])
        assert (result.reason, result.retry) == ("RejectedByNode", outcome.Retry.COUNTED)
        assert result.message == f"pod ft-1-0-x was refused by its node's kubelet ({reason}: Pod was rejected: {message})"
        status = after(decide(Observed(body({"attempts": 1}, backoffLimit=0), [failed], [refused], NOW)))
        assert status["phase"] == "Failed" and status["reason"] == "BackoffLimitExceeded", status
        assert f"({reason}: Pod was rejected: {message})" in status["conditions"][-1]["message"]


def test_failures_beyond_the_backoff_limit_fail_the_job() -> None:
    failed = [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "RuntimeError", "message": "boom"})]
    status = after(decide(Observed(body({"attempts": 2, "failures": 1}, backoffLimit=1),
                                   [job(1, failure={"reason": "X", "message": ""}), job(2, failure={"reason": "X", "message": ""})],
                                   [dict(failed[0], attempt=2)], NOW)), {"attempts": 2, "failures": 1})
    assert status["phase"] == "Failed" and status["reason"] == "BackoffLimitExceeded" and "boom" in status["conditions"][-1]["message"]
    assert status["failures"] == 2  # the last failure counts too, as the message says


def crashed_attempt(attempt: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attempt `attempt`'s Job and pod once its worker crashed (exit 2: infrastructure, counted)."""
    return ([job(attempt, active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
            [pod(attempt, phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])


def test_a_counted_failure_backs_off_before_the_next_attempt_as_a_jobs_pods_do() -> None:
    """The next attempt came at the next tick: with backoffLimit 3 a job failed for good about 15 s after its first
    failure, and a transient one (an NFS blip, a dataset server restarting) burnt every retry. As a batch/v1 Job's
    controller does, the attempt after a counted failure waits 10 s, doubled for each one; the wait is in the status,
    so a restarted operator keeps it, and it ticks every poll meanwhile (Restarting)."""
    from finetune_operator.handlers import ticks_every_poll, ticks_slowly

    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-1"}}
    failed = decide(Observed(body(running), *crashed_attempt(1), NOW))
    retrying = after(failed, running)
    assert (retrying["phase"], retrying["reason"], retrying["retryAfter"]) == ("Pending", "BackoffWaiting",
                                                                              "2026-12-01T12:00:10Z")
    assert conditions(retrying)["Restarting"] == ("True", "NcclError") and retrying["failures"] == 1
    told = {reason: message for _, reason, message in failed.events}
    assert told["BackoffWaiting"].startswith("attempt 2 starts at 2026-12-01T12:00:10Z: a back-off of 10 s")
    meta = body(retrying)["metadata"]
    assert ticks_every_poll(spec=EXAMPLE["spec"], status=retrying, meta=meta)
    waiting = decide(Observed(body(retrying), *crashed_attempt(1), NOW + timedelta(seconds=2)))
    assert waiting.create_attempt is None and after(waiting, retrying)["reason"] == "BackoffWaiting"
    assert not waiting.events  # told once
    created = decide(Observed(body(retrying), *crashed_attempt(1), NOW + timedelta(seconds=11)))
    second = after(created, retrying)
    assert created.create_attempt == 2 and "retryAfter" not in second
    assert conditions(second)["Created"] == ("True", "AttemptCreated")
    # Made, its pods wait (for GPUs, a queue) as a first attempt's do: Restarting is True until they run, and a
    # retried job waiting hours for GPUs was reconciled every poll.
    assert conditions(second)["Restarting"][0] == "True"
    assert ticks_slowly(spec=EXAMPLE["spec"], status=second, meta=meta)
    assert not ticks_every_poll(spec=EXAMPLE["spec"], status=second, meta=meta)
    # The second counted failure waits twice as long.
    later = NOW + timedelta(minutes=5)
    jobs, pods = crashed_attempt(2)
    again = after(decide(Observed(body(second), crashed_attempt(1)[0] + jobs, pods, later)), second)
    assert again["failures"] == 2 and again["retryAfter"] == "2026-12-01T12:05:20Z"
    assert decide(Observed(body(again), jobs, pods, later + timedelta(seconds=19))).create_attempt is None
    assert decide(Observed(body(again), jobs, pods, later + timedelta(seconds=20))).create_attempt == 3


def test_a_back_off_that_ends_while_the_failed_attempts_pods_still_stop_says_they_are_what_it_waits_for() -> None:
    """Rank 0 crashed, rank 1 takes its grace period to checkpoint: past the back-off's end the next attempt waits
    for it, and the job's reason (Created's) said "BackoffWaiting", "attempt 2 starts at" a time gone, till it ended."""
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-1"}}
    jobs, crashed = crashed_attempt(1)
    pods = crashed + [pod(1, index=1, deletionTimestamp="2026-12-01T12:00:00Z")]
    retrying = after(decide(Observed(body(running), jobs, pods, NOW)), running)
    waiting = after(decide(Observed(body(retrying), jobs, pods, NOW + timedelta(seconds=5))), retrying)
    assert waiting["reason"] == "BackoffWaiting"  # its own time is not over
    late = decide(Observed(body(retrying), jobs, pods, NOW + timedelta(seconds=11)))
    stopping = after(late, retrying)
    assert late.create_attempt is None and (stopping["phase"], stopping["reason"]) == ("Pending", "PodsStopping")
    assert conditions(stopping)["Created"][0] == "False" and "ft-1-1-x" in next(
        c["message"] for c in stopping["conditions"] if c["type"] == "Created")
    assert decide(Observed(body(stopping), jobs, crashed, NOW + timedelta(seconds=12))).create_attempt == 2
    # Suspended meanwhile: it waits for the resume, not for pods named once (they stayed in its reason for days)
    suspended = after(decide(Observed(body(stopping, suspend=True), jobs, crashed, NOW + timedelta(seconds=12))),
                      stopping)
    assert conditions(suspended)["Created"] == ("False", "Suspended")


def test_a_job_that_ends_in_its_back_off_promises_no_attempt_and_a_started_one_no_wait() -> None:
    """Its deadline passed, or its backoffLimit lowered, while a retry waited: the job failed with retryAfter and
    Created (BackoffWaiting, "attempt 2 starts at ...") left as they were, an attempt promised that never came. And an
    attempt seen made (its create tick's status write lost) kept the wait it had started after."""
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z"}
    retrying = after(decide(Observed(body(running), *crashed_attempt(1), NOW)), running)
    assert retrying["retryAfter"] and conditions(retrying)["Created"] == ("False", "BackoffWaiting")
    for spec in ({"activeDeadlineSeconds": 3605}, {"backoffLimit": 0}):
        failed = decide(Observed(body(retrying, **spec), *crashed_attempt(1), NOW + timedelta(seconds=6)))
        ended = after(failed, retrying)
        assert ended["phase"] == "Failed" and "retryAfter" not in ended
        assert conditions(ended)["Created"] == ("False", ended["reason"])
        assert [reason for _, reason, _ in failed.events] == [ended["reason"]]  # said once, not for Created too
    # Suspended in its back-off: no time is promised while it is, and the suspend is no warning.
    suspended = decide(Observed(body(retrying, suspend=True), *crashed_attempt(1), NOW + timedelta(seconds=2)))
    held = after(suspended, retrying)
    assert "retryAfter" not in held and conditions(held)["Created"] == ("False", "Suspended")
    assert ("Normal", "Suspended", "attempt 2 waits for the resume") in suspended.events
    resumed = after(decide(Observed(body(held), *crashed_attempt(1), NOW + timedelta(seconds=3))), held)
    assert (resumed["phase"], resumed["reason"]) == ("Pending", "Resumed")
    # and failed before its attempt is made (backoffLimit lowered meanwhile): no attempt is said to wait
    ended = after(decide(Observed(body(resumed, backoffLimit=0), *crashed_attempt(1), NOW + timedelta(seconds=4))),
                  resumed)
    assert ended["phase"] == "Failed" and conditions(ended)["Created"] == ("False", "BackoffLimitExceeded")
    jobs, _ = crashed_attempt(1)
    seen = after(decide(Observed(body(retrying), jobs + [job(2)], [], NOW + timedelta(seconds=11))), retrying)
    assert "retryAfter" not in seen and conditions(seen)["Created"] == ("True", "AttemptCreated")


def test_a_job_in_its_back_off_lists_no_pods() -> None:
    """Failed as its Job says with its pods gone, a waiting attempt asked the apiserver for the earlier attempt's pods
    at every poll of its wait, up to 6 minutes (waits_on_pods): none is made before the wait ends."""
    jobs, _ = crashed_attempt(1)
    retrying = after(decide(Observed(body({"attempts": 1}), jobs, [], NOW)))
    assert retrying["retryAfter"] == "2026-12-01T12:00:10Z"
    assert not reconcile.waits_on_pods(Observed(body(retrying), jobs, [], NOW + timedelta(seconds=4)))
    assert reconcile.waits_on_pods(Observed(body(retrying), jobs, [], NOW + BACKOFF))


def test_the_back_off_doubles_per_counted_failure_up_to_six_minutes() -> None:
    assert [reconcile.retry_delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 360, 360]
    assert reconcile.retry_delay(101) == 360  # backoffLimit's largest
    status = {"attempts": 7, "failures": 6, "startTime": "2026-12-01T11:00:00Z"}
    retrying = after(decide(Observed(body(status, backoffLimit=10), *crashed_attempt(7), NOW)), status)
    assert retrying["failures"] == 7 and retrying["retryAfter"] == "2026-12-01T12:06:00Z"


def test_a_disruption_or_a_resume_restarts_at_once_even_after_a_counted_failure() -> None:
    """Only the job's own failures back off: a disruption is the cluster's doing, and a resume is asked for."""
    status = {"attempts": 2, "failures": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-2"}}
    evicted = pod(2, phase="Failed", exit_code=143, disrupted="EvictionByEvictionAPI")
    disrupted = after(decide(Observed(body(status), [job(2, failure={"reason": "X", "message": ""})], [evicted], NOW)),
                      status)
    assert disrupted["attempts"] == 3 and disrupted["failures"] == 1 and "retryAfter" not in disrupted
    assert conditions(disrupted)["Restarting"] == ("True", "EvictionByEvictionAPI")
    assert decide(Observed(body(disrupted), [], [], NOW + timedelta(seconds=2))).create_attempt == 3
    # Suspended in its back-off and resumed: attempt 2 starts at the resume.
    retrying = after(decide(Observed(body({"attempts": 1}), *crashed_attempt(1), NOW)))
    suspended = after(decide(Observed(body(retrying, suspend=True), *crashed_attempt(1), NOW + timedelta(seconds=1))),
                      retrying)
    resumed = after(decide(Observed(body(suspended), *crashed_attempt(1), NOW + timedelta(seconds=2))), suspended)
    assert "retryAfter" not in resumed
    assert decide(Observed(body(resumed), *crashed_attempt(1), NOW + timedelta(seconds=3))).create_attempt == 2


def test_a_backoff_limit_lowered_while_a_retry_waits_makes_no_attempt_more() -> None:
    """Lowered to stop a job that keeps failing (2 failures, backoffLimit 3 to 1), the limit was read only at the next
    failure: the retry already decided was made, and ran (for hours, on its GPUs) until it failed too."""
    crashed = ([job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
               [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])
    retrying = after(decide(Observed(body({"attempts": 1, "failures": 1}), *crashed, NOW)))
    assert retrying["attempts"] == 2 and retrying["failures"] == 2 and retrying["phase"] == "Pending"
    decision = decide(Observed(body(retrying, backoffLimit=1), *crashed, NOW + timedelta(seconds=2)))
    status = after(decision, retrying)
    assert decision.create_attempt is None and status["phase"] == "Failed"
    assert status["reason"] == "BackoffLimitExceeded" and "backoffLimit 1" in status["conditions"][-1]["message"]
    assert "Restarting" in conditions(status) and conditions(status)["Restarting"][0] == "False"
    # Raised instead, or left alone, the retry is made after its back-off (20 s: the second counted failure).
    assert decide(Observed(body(retrying, backoffLimit=2), *crashed, NOW + 2 * BACKOFF)).create_attempt == 2


def test_the_next_attempt_waits_until_the_previous_ones_pods_have_stopped() -> None:
    failed = job(active=1, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})
    crashed = pod(index=1, phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})
    # Rank 0 got SIGTERM at 12:00:00 with a 60 s grace period: it is writing its checkpoint.
    checkpointing = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}, "deletionTimestamp": "2026-12-01T12:01:00Z"},
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}})
    retrying = after(decide(Observed(body({"attempts": 1}), [failed], [crashed, checkpointing], NOW)))
    assert retrying["attempts"] == 2 and retrying["phase"] == "Pending"
    assert decide(Observed(body(retrying), [failed], [crashed, checkpointing], NOW + timedelta(seconds=10))).create_attempt is None
    stopped = dict(checkpointing, phase="Failed")
    assert decide(Observed(body(retrying), [failed], [crashed, stopped], NOW + timedelta(seconds=20))).create_attempt == 2
    # A pod its kubelet never reports stopped (a lost node) holds the next attempt only a while past its grace period.
    lost = decide(Observed(body(retrying), [failed], [crashed, checkpointing], NOW + timedelta(minutes=5)))
    assert lost.create_attempt == 2


def test_a_worker_on_a_lost_node_ends_the_attempt_as_a_disruption_and_its_job_goes() -> None:
    # The node stopped answering; at 11:59:30 the taint manager marked the pod and deleted it with a 30 s grace
    # period. Its kubelet, unreachable, never reports it stopped: it stays Running.
    lost = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "deletionTimestamp": "2026-12-01T12:00:00Z", "deletionGracePeriodSeconds": 30,
                     "labels": {"finetune.dev/job-name": "ft", "finetune.dev/job-uid": "u", "finetune.dev/attempt": "1"},
                     "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "status": {"phase": "Running", "podIP": "10.0.0.9", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"},
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
             "message": "Taint manager: deleting due to NoExecute taint"}],
            "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "2026-12-01T11:00:00Z"}}}]}})
    running = {"attempts": 1, "failures": 0, "startTime": "2026-12-01T11:00:00Z",
               "conditions": [{"type": "Running", "status": "True", "reason": "Training", "message": "",
                               "lastTransitionTime": "2026-12-01T11:00:00Z"}]}
    active = job(active=1)  # the Job controller waits for the pod to be terminal
    # Within its grace period and the margin after it, the pod may still be checkpointing.
    waiting = decide(Observed(body(running, backoffLimit=0), [active], [lost], NOW + timedelta(seconds=20)))
    assert after(waiting, running)["phase"] == "Running" and waiting.delete_job is None
    ended = decide(Observed(body(running, backoffLimit=0), [active], [lost], NOW + timedelta(minutes=1)))
    status = after(ended, running)
    assert status["attempts"] == 2 and status["failures"] == 0 and status["phase"] == "Pending"
    assert conditions(status)["Restarting"] == ("True", "DeletionByTaintManager")
    assert ended.delete_job == "ft-1" and ended.create_attempt is None
    # A tick that still reads the earlier status decides the same again, but the Job being deleted is left alone.
    deleting = [dict(active, deleting="2026-12-01T12:00:30Z")]
    stale = decide(Observed(body(running, backoffLimit=0), deleting, [lost], NOW + timedelta(minutes=1)))
    assert after(stale, running)["attempts"] == 2 and stale.delete_job is None
    # The next tick starts the next attempt: the lost pod holds it no longer.
    assert decide(Observed(body(status, backoffLimit=0), deleting, [lost], NOW + timedelta(minutes=2))).create_attempt == 2


def test_a_backoff_limit_lowered_while_a_retry_runs_fails_the_job_and_stops_it() -> None:
    """2 failures, attempt 3 running, backoffLimit lowered from 3 to 1 to stop the job: only a retry not yet made was
    stopped, and this one ran on (for hours, on its GPUs) until it failed too. As a Job's controller fails a Job whose
    failed pods are past a lowered limit at its next sync, the job fails and its attempt is stopped."""
    running = {"attempts": 3, "failures": 2, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-3"}}
    status = after(decide(Observed(body(running, backoffLimit=3), [job(3, ready=1)], [pod(3)], NOW)), running)
    assert status["phase"] == "Running"
    decision = decide(Observed(body(status, backoffLimit=1), [job(3, ready=1)], [pod(3)], NOW + timedelta(seconds=2)))
    ended = after(decision, status)
    assert (ended["phase"], ended["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert next(c["message"] for c in ended["conditions"] if c["type"] == "Failed").startswith(
        "2 failed attempts (backoffLimit 1, lowered")
    assert decision.delete_job == "ft-3" and decision.delete_job_reason == "BackoffLimitExceeded"
    # Where it was lowered to the failures, the running attempt is the last one: it runs on.
    assert after(decide(Observed(body(status, backoffLimit=2), [job(3, ready=1)], [pod(3)], NOW)), status)[
        "phase"] == "Running"


def test_a_child_job_its_queue_suspended_is_queued_and_its_stopped_pods_are_no_failures() -> None:
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    # its metrics stale when it was preempted: MetricsStale True stayed through the queue's wait, an alert firing
    running["conditions"].append({"type": "MetricsStale", "status": "True", "reason": "MetricsTimeout", "message": "",
                                  "lastTransitionTime": "2026-12-01T12:00:00Z"})
    # Kueue preempted the workload: it suspended the Job, whose controller stopped the pods (SIGTERM: exit 143).
    preempted = outcome.job_summary({
        "metadata": {"name": "ft-1", "labels": {"finetune.dev/attempt": "1"}}, "spec": {"suspend": True},
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]}})
    stopped = pod(phase="Failed", exit_code=143, message={"exitCode": 143, "reason": "Terminated", "message": "SIGTERM"})
    for later in (timedelta(seconds=5), timedelta(hours=6)):
        status = after(decide(Observed(body(running, backoffLimit=0), [preempted], [stopped], NOW + later)), running)
        assert status["phase"] == "Pending" and status["reason"] == "Queued"
        assert conditions(status)["Running"] == ("False", "Queued") and status["attempts"] == 1
        assert not status.get("failures") and "Restarting" not in conditions(status)
        assert conditions(status)["MetricsStale"] == ("False", "Queued")


def test_a_wait_in_the_queue_is_told_by_a_normal_event() -> None:
    """Each job of a Kueue user waits to be admitted, and again after each preemption: a Warning Event at each wait
    was noise to an alert on Warnings, as a resume's was."""
    made = after(decide(Observed(body(), [], [], NOW)))
    queued = job(created=timestamp(NOW), suspended=True, active=0)
    decision = decide(Observed(body(made), [queued], [], NOW + timedelta(seconds=10)))
    assert after(decision, made)["reason"] == "Queued"
    assert [e[:2] for e in decision.events if e[1] == "Queued"] == [("Normal", "Queued")]


def test_the_pods_a_suspend_stopped_are_no_failure_of_the_jobs_next_admission() -> None:
    """Kueue admitted the Job again while the pods its suspend stopped (exit 143) were being removed: one seen Failed
    in that moment counted as the attempt's failure, and a job of backoffLimit 0 failed for good."""
    readmitted = outcome.job_summary({
        "metadata": {"name": "ft-1", "labels": {"finetune.dev/attempt": "1"}}, "spec": {"suspend": False},
        "status": {"startTime": "2026-12-01T12:10:00Z", "active": 1}})
    stopped = pod(phase="Failed", exit_code=143, message={"exitCode": 143, "reason": "Terminated", "message": "SIGTERM"},
                  created="2026-12-01T12:00:00Z", deletionTimestamp="2026-12-01T12:09:30Z")
    # The controller stamps startTime after it made the new pods, to the second: one a second older is this one's.
    started = pod(created="2026-12-01T12:09:59Z", name="ft-1-0-y")
    running = {"attempts": 1, "startTime": "2026-12-01T12:00:00Z"}
    status = after(decide(Observed(body(running, backoffLimit=0), [readmitted], [stopped, started], NOW)), running)
    assert status["phase"] == "Running" and "Failed" not in conditions(status) and "Restarting" not in conditions(status)
    failed = pod(phase="Failed", exit_code=1, message={"exitCode": 1, "reason": "InvalidDataset", "message": "x"},
                 created="2026-12-01T12:09:59Z", name="ft-1-0-y")  # this admission's own failure still counts
    status = after(decide(Observed(body(running, backoffLimit=0), [readmitted], [stopped, failed], NOW)), running)
    assert status["phase"] == "Failed" and status["reason"] == "InvalidDataset"


class Listing:
    """Clients whose apiserver lists `pods` (and `jobs`) for any selector; it keeps what was asked."""

    def __init__(self, pods: list[dict[str, Any]], jobs: list[dict[str, Any]] | None = None) -> None:
        self.pods, self.jobs = pods, jobs or []
        self.asked: list[tuple[str, dict[str, object]]] = []

    def call(self, method: str, path: str, body: object = None, **query: object) -> bytes:
        self.asked.append((path, query))
        return json.dumps({"items": self.jobs if path.endswith("/jobs") else self.pods}).encode()


def test_a_pod_the_index_kept_after_a_relist_holds_the_next_attempt_back_no_longer() -> None:
    """After a watch's 410 Gone kopf lists again and reports only what exists: a pod deleted in that gap stayed in
    the index as last seen, Running, and the retry waited for it to stop, for ever. The apiserver is asked."""
    from finetune_operator import handlers

    oom = pod(phase="Failed", exit_code=137, reason="OOMKilled")
    retrying = after(decide(Observed(body({"attempts": 1}), [job(failure={"reason": "X", "message": ""})], [oom], NOW)))
    assert retrying["attempts"] == 2  # attempt 1's Job is deleted; attempt 2 waits for its pods to stop
    vanished = pod(name="ft-1-1-x", index=1)  # rank 1, last seen Running: its deletion came in the gap
    seen = Observed(body(retrying), [], [vanished], NOW + BACKOFF)
    assert reconcile.waits_on_pods(seen) and decide(seen).create_attempt is None
    apiserver = Listing([])
    assert decide(handlers._listed(apiserver, seen, "ns", "ft", jobs=False)).create_attempt == 2
    assert apiserver.asked == [("/api/v1/namespaces/ns/pods", {"labelSelector": "finetune.dev/job-name=ft"})]


def test_an_earlier_attempts_job_the_index_kept_after_a_relist_holds_the_next_attempt_back_no_longer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 1's Job, deleted (JobDeleted) in a watch's relist gap, stays in the index as last seen, running: an
    attempt is not made beside an earlier one that runs on, so the job waited for it for good. The apiserver is
    asked, Jobs too, and the tick that wires it does so before deciding."""
    import kopf

    from finetune_operator import handlers

    deleted = {"attempts": 2, "children": {"job": "ft-1"}, "startTime": "2026-12-01T11:00:00Z"}
    seen = Observed(body(deleted), [job(1, active=1)], [], NOW)
    assert reconcile.waits_on_jobs(seen) and not reconcile.waits_on_pods(seen)
    assert decide(seen).create_attempt is None
    apiserver = Listing([])
    assert decide(handlers._listed(apiserver, seen, "ns", "ft", jobs=True)).create_attempt == 2
    assert [path.rsplit("/", 1)[1] for path, _ in apiserver.asked] == ["pods", "jobs"]
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop
    made = ticked(body(deleted), ({("ns", "ft"): [job(1, active=1)]}, {}))
    assert [path.rsplit("/", 1)[1] for path, _ in made.asked][:2] == ["pods", "jobs"]
    assert made.patches[0]["children"]["job"] == "ft-2" and conditions(made.patches[0])["Created"][0] == "True"
    # One the apiserver still has, stopping within its grace period, is still waited for.
    stopping = {"metadata": {"name": "ft-1-1-x", "deletionTimestamp": "2026-12-01T12:00:20Z",
                             "labels": {"finetune.dev/attempt": "1", "batch.kubernetes.io/job-completion-index": "1"}},
                "status": {"phase": "Running"}}
    assert decide(handlers._listed(Listing([stopping]), seen, "ns", "ft", jobs=False)).create_attempt is None


def test_a_job_and_pods_the_index_kept_after_a_relist_are_listed_now_and_then_and_the_next_attempt_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Job and its pods deleted by hand in a watch's relist gap stayed in the indexes as last seen, Running: the job
    said Running (MetricsStale once its reads failed) until the operator restarted. While a job's metrics are not
    read, its children are listed from the apiserver once in a while, and the attempt that is gone is JobDeleted."""

    from finetune_operator import handlers

    made = after(decide(Observed(body(), [], [], NOW)))
    running = after(decide(Observed(body(made), [job(ready=1)], [pod()], NOW)), made)
    assert running["phase"] == "Running" and running["children"]["job"] == "ft-1"
    seen = Observed(body(running), [job(ready=1)], [pod()], NOW + timedelta(minutes=5),
                    scrape_error=("ConnectionRefused", "x"))
    assert handlers._in_doubt(seen) and decide(seen).create_attempt is None
    apiserver = Listing([], [])
    listed = handlers._listed(apiserver, seen, "ns", "ft", jobs=True)
    assert [path for path, _ in apiserver.asked] == ["/api/v1/namespaces/ns/pods", "/apis/batch/v1/namespaces/ns/jobs"]
    assert {tuple(q.items()) for _, q in apiserver.asked} == {(("labelSelector", "finetune.dev/job-name=ft"),)}
    assert listed.scrape_error == ("ConnectionRefused", "x")  # what the tick read before stays
    status = after(decide(listed), running)
    assert status["attempts"] == 2 and conditions(status)["Restarting"] == ("True", "JobDeleted")
    assert not status.get("failures") and status["phase"] == "Pending"
    # A Job the apiserver has is this job's attempt still, and the same list as the index's decides as it does.
    live = {"metadata": {"name": "ft-1", "labels": {"finetune.dev/attempt": "1"}}, "status": {"active": 1, "ready": 1}}
    rank0 = {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1",
                                                         "batch.kubernetes.io/job-completion-index": "0"}},
             "status": {"phase": "Running", "podIP": "10.0.0.1"}}
    assert after(decide(handlers._listed(Listing([rank0], [live]), seen, "ns", "ft", jobs=True)), running)["phase"] \
        == "Running"
    # Listed before its children were made (a quota held them back), no Job is no deletion: they are made.
    held = after(decide(Observed(body(), [], [], NOW, held_back=("ExceededQuota", "x"))))
    assert decide(handlers._listed(Listing([], []), Observed(body(held), [], [], NOW), "ns", "ft", jobs=True)
                  ).create_attempt == 1
    # Not asked while the metrics are read (live pods), nor for a finished job.
    assert not handlers._in_doubt(Observed(body(running), [job(ready=1)], [pod()], NOW, sample={"step": 1}))
    assert not handlers._in_doubt(Observed(body(running | {"phase": "Succeeded"}), [job(ready=1)], [pod()], NOW))
    # At most once per interval a job, counted from when it was first asked about (a clock moved by hand: real sleeps
    # of 0.25 s against intervals of 0.2 s failed on a loaded machine).
    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    checks, key, gone = handlers.ChildChecks(every=20, keep=60), ("ns", "ft", "u"), ("ns", "gone", "v")
    assert not checks.due(key) and not checks.due(gone)
    clock[0] += 25
    assert checks.due(key) and not checks.due(key)
    clock[0] += 19
    assert not checks.due(key)
    clock[0] += 35  # one not asked about for `keep` goes (deleted); one asked about keeps its clock
    assert checks.due(key) and gone not in checks.since


class Apiserver(Listing):
    """Listing that also takes the tick's status patch (kept) and its Event lists (none)."""

    def __init__(self, version: str = "1") -> None:
        super().__init__([], [])
        self.patches: list[dict[str, Any]] = []
        self.version = version  # what a status patch makes

    def call(self, method: str, path: str, body: Any = None, **query: object) -> bytes:
        if method == "PATCH":
            self.patches.append(body["status"])
            # as the apiserver answers: compact, keys sorted (a label keyed resourceVersion before metadata's own)
            return json.dumps({"metadata": {"labels": {"resourceVersion": "7"}, "name": "ft",
                                            "resourceVersion": self.version, "uid": "u"}},
                              separators=(",", ":"), sort_keys=True).encode()
        if path.endswith("/events"):
            return b'{"items": []}'
        if method == "GET" and ("/configmaps/" in path or "/services/" in path):  # an earlier attempt's: none here
            self.asked.append((path, query))
            raise ApiException(status=404, reason="NotFound")
        return super().call(method, path, body, **query)


class EventsFailing(Apiserver):
    """Apiserver whose Event lists fail with `error` (a 429, a Role without list on events, a dropped connection)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error, self.failed = error, 0

    def call(self, method: str, path: str, body: Any = None, **query: object) -> bytes:
        if path.endswith("/events"):
            self.failed += 1
            raise self.error
        return super().call(method, path, body, **query)


def ticked(live: dict[str, Any], indexes: tuple[dict[Any, Any], dict[Any, Any]], checks: Any = None,
           written: Any = None, makes: str = "1", apiserver: Apiserver | None = None,
           settings: Any = None, told: Any = None) -> Apiserver:
    """One `handlers._reconcile` of the FineTuneJob `live`, its (jobs, pods) indexes as given; the calls it made."""
    import kopf

    from finetune_operator import handlers
    from finetune_operator.settings import Settings

    apiserver = apiserver or Apiserver(makes)
    memo = kopf.Memo(settings=settings or Settings(), clients=apiserver, slow_scrapes=handlers.SlowScrapes(2.0),
                     child_checks=checks or handlers.ChildChecks(),
                     written=handlers.Written() if written is None else written, job_warnings=handlers.Warnings("Job"),
                     counted=handlers.Once(), told=told or handlers.Once(), vanished=handlers.Vanished(),
                     pod_warnings=handlers.Warnings("Pod"), claims=handlers.Claims())
    handlers._reconcile(kopf.Body(live), memo, *indexes)
    return apiserver


@pytest.mark.parametrize("error", [ApiException(status=429, reason="Too Many Requests"),
                                   ApiException(status=403, reason="Forbidden"),
                                   urllib3.exceptions.ProtocolError("Connection aborted.")])
def test_a_tick_whose_event_list_fails_writes_its_status_all_the_same(monkeypatch: pytest.MonkeyPatch,
                                                                      error: Exception) -> None:
    """Events only add detail (why a Job makes no pods, why a pod's containers are not made): a failed list of them
    escaped the tick before its status write, so the job had no status while it lasted (a hand-written Role without
    list on events: for good)."""
    import kopf

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop
    made = after(decide(Observed(body(), [], [], NOW)))
    podless = ({("ns", "ft"): [job(created="2026-12-01T11:00:00Z")]}, {})  # the Job's warnings are read
    creating = ({("ns", "ft"): [job(created="2026-12-01T11:00:00Z")]},  # the pod's
                {("ns", "ft"): [pod(phase="Pending", ready=False, creating="2026-12-01T11:00:00Z")]})
    for indexes in (podless, creating):
        apiserver = ticked(body(made), indexes, apiserver=EventsFailing(error))
        assert apiserver.failed == 1 and apiserver.patches, indexes


def test_a_job_without_resources_is_warned_of_the_idle_gpus_of_the_operators_trainer_resources(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick that makes the attempt posts the Warning, with the GPUs of the resources its Job is given."""
    import kopf

    from finetune_operator.settings import Settings

    told: list[tuple[str, str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda _, *, type, reason, message: told.append((type, reason, message)))
    runtime = {k: v for k, v in EXAMPLE["spec"]["runtime"].items() if k != "resources"}
    apiserver = ticked(body(runtime=runtime), ({}, {}), settings=Settings.model_validate(
        {"trainer_resources": {"limits": {"memory": "64Gi", "nvidia.com/gpu": 2}}}))
    assert apiserver.patches and [(kind, reason) for kind, reason, _ in told] == [
        ("Normal", "AttemptCreated"), ("Warning", "GPUsIdle")]
    assert told[1][2].startswith("each worker has 2 GPUs (the operator's trainer resources nvidia.com/gpu)")


class PodPatching(Apiserver):
    """Apiserver whose pod patches fail as one does for a moment (a 503), or go through; `ended` are the pods they
    went through for."""

    def __init__(self, failing: bool) -> None:
        super().__init__()
        self.failing, self.ended = failing, []

    def call(self, method: str, path: str, body: Any = None, **query: object) -> bytes:
        if method == "PATCH" and "/pods/" in path:
            if self.failing:
                raise ApiException(status=503, reason="Service Unavailable")
            self.ended.append(path.rsplit("/", 1)[1])
            return b"{}"
        return super().call(method, path, body, **query)


def test_a_success_whose_pod_a_sidecar_outlives_is_written_once_the_pod_is_ended(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick that reads the trainer's success also ends its pod, which a sidecar keeps Running: a patch that failed
    for a moment was left to the next tick, and the job, written Succeeded, had none (a finished job is not ticked):
    the pod ran on, its Job active on its GPUs, unsaid."""
    import time

    import kopf

    from finetune_operator import handlers

    said: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda *_, type, reason, message: said.append((reason, message)))
    done = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.41}, "final": {"accuracy": 0.66}}}
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    indexes = ({("ns", "ft"): [job(active=1)]}, {("ns", "ft"): [with_a_sidecar(0, exited(0, done))]})
    failing, told = PodPatching(failing=True), handlers.Once()
    for _ in range(2):
        with pytest.raises(kopf.TemporaryError, match="pods ft-1-0-x not ended yet"):
            ticked(body(running), indexes, apiserver=failing, told=told)
    assert not failing.patches  # not written Succeeded: the retry ends the pod first
    apiserver = ticked(body(running), indexes, apiserver=PodPatching(failing=False))
    assert apiserver.ended == ["ft-1-0-x"] and apiserver.patches[-1]["phase"] == "Succeeded"
    # Not for ever: a webhook on pods that is down fails every patch; after a minute the end is written, and said
    later = time.monotonic() + handlers.END_HOLD_SECONDS
    monkeypatch.setattr(handlers.time, "monotonic", lambda: later)
    ticked(body(running), indexes, apiserver=failing, told=told)
    assert failing.patches[-1]["phase"] == "Succeeded"
    assert [m for r, m in said if "could not be ended" in m] == [
        "pods ft-1-0-x could not be ended for 60 s (their patch failed: the operator's log says why): delete them, "
        "their Job holds their GPUs"]
    # Deleted and applied again under its name, the new job's end is held as long, and said, as its own
    again = body(running)
    again["metadata"]["uid"] = "u2"
    with pytest.raises(kopf.TemporaryError, match="pods ft-1-0-x not ended yet"):
        ticked(again, indexes, apiserver=failing, told=told)


class Failing(Apiserver):
    """Apiserver that answers a create, or a claim's read, with `error`."""

    def __init__(self, error: ApiException, on: str) -> None:
        super().__init__()
        self.error, self.on = error, on

    def call(self, method: str, path: str, body: Any = None, **query: object) -> bytes:
        if method == self.on and (method == "POST" or "/persistentvolumeclaims/" in path):
            raise self.error
        return super().call(method, path, body, **query)


@pytest.mark.parametrize(("status", "message", "on"), [
    (500, 'Internal error occurred: failed calling webhook "mworkload.kb.io": connection refused', "POST"),
    (403, 'User "op" cannot create resource "configmaps"', "POST"),
    (403, 'User "op" cannot get resource "persistentvolumeclaims"', "GET")])
def test_a_create_or_claim_read_the_apiserver_fails_waits_saying_why_in_status_and_an_event(
        monkeypatch: pytest.MonkeyPatch, status: int, message: str, on: str) -> None:
    """A mutating webhook down (Kueue's, failurePolicy Fail), the operator's Role short of a verb, a 429: the tick
    raised before its status write, so a new job had no phase nor reason, only kopf's Event with 'Forbidden'."""
    import kopf

    told: list[tuple[str, str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda _, *, type, reason, message: told.append((type, reason, message)))
    error = ApiException(status=status, reason="Refused")
    error.body = json.dumps({"kind": "Status", "code": status, "message": message})
    apiserver = Failing(error, on)
    with pytest.raises(kopf.TemporaryError):  # kopf tries again
        ticked(body(), ({}, {}), apiserver=apiserver)
    written = apiserver.patches[0]
    assert written["phase"] == "Pending" and written["reason"] == "CreateFailed" and "children" not in written
    assert conditions(written)["Created"] == ("False", "CreateFailed") and message in written["conditions"][0]["message"]
    assert [(kind, reason) for kind, reason, _ in told] == [("Warning", "CreateFailed")]


def test_an_event_list_outage_is_told_again_after_a_list_that_worked_and_a_page_that_is_no_list_is_none(
        caplog: pytest.LogCaptureFixture) -> None:
    """The failure was told once per process: a second outage (the Role's rule removed an hour later) went unsaid.
    And a 200 that was no list (a proxy's page) escaped the tick as a JSONDecodeError."""
    from finetune_operator import handlers

    answers: list[bytes | Exception] = [ApiException(status=403, reason="Forbidden"), b'{"items": []}',
                                        ApiException(status=403, reason="Forbidden"), b"<html>sign in</html>"]

    class Answers:
        def call(self, *_: Any, **__: Any) -> bytes:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    warnings = handlers.Warnings("Job")
    caplog.set_level(logging.DEBUG, logger="finetune_operator")
    for ns in ("a", "b", "c", "d"):  # a namespace each: none is read from the cache of another's list
        assert warnings.of(Answers(), ns, "ft") == {}  # type: ignore[arg-type]
    told = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records if "not listed" in r.getMessage()]
    assert told == [(logging.WARNING, "a"), (logging.WARNING, "c"), (logging.DEBUG, "d")]


def test_a_tick_lists_the_children_of_a_job_whose_metrics_it_cannot_read_and_not_of_one_whose_it_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of the check above in a tick: rank 0 answering, nothing is listed; refusing, the Jobs and pods are
    listed (when due), and the attempt the apiserver no longer has is JobDeleted in the status the tick writes."""
    import functools

    import kopf

    from fault_servers import FaultServer, serving
    from finetune_operator import handlers
    from finetune_operator.scrape import scrape
    from operator_fixture import free_port

    made = after(decide(Observed(body(), [], [], NOW)))
    running = after(decide(Observed(body(made), [job(ready=1)], [pod()], NOW)), made)
    live = body(running)
    indexes = {("ns", "ft"): [job(ready=1)]}, {("ns", "ft"): [pod(ip="127.0.0.1", pod_uid="rank-0")]}
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop

    def tick(checks: handlers.ChildChecks, port: int) -> Apiserver:
        monkeypatch.setattr(handlers, "scrape", functools.partial(scrape, port=port))
        return ticked(live, indexes, checks)

    with FaultServer("127.0.0.1", 0, "ok") as server:
        read = tick(handlers.ChildChecks(every=0), server.port)
    assert read.asked == [] and "progress" in read.patches[0]  # the metrics read, still Running
    refused = tick(handlers.ChildChecks(every=0), free_port())
    assert [path.rsplit("/", 1)[1] for path, _ in refused.asked] == ["pods", "jobs"]
    assert refused.patches[0]["attempts"] == 2 and conditions(refused.patches[0])["Restarting"] == ("True", "JobDeleted")
    assert tick(handlers.ChildChecks(), free_port()).asked == []  # not yet due: first asked about now
    # The IP answers, as another pod (a deleted rank 0's IP given to another job's trainer): no numbers of that job
    # reach this one's status, and its children are listed as when nothing answers.
    another = b'finetune_trainer_step 999\nfinetune_trainer_pod_info{uid="other"} 1\n'
    with FaultServer("127.0.0.1", 0, serving(another)) as server:
        answered = tick(handlers.ChildChecks(every=0), server.port)
    assert [path.rsplit("/", 1)[1] for path, _ in answered.asked] == ["pods", "jobs"]
    assert "progress" not in answered.patches[0] and conditions(answered.patches[0])["Restarting"][1] == "JobDeleted"


def test_a_tick_on_a_copy_older_than_the_operators_writes_decides_on_them_and_repeats_no_transition(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf hands a timer the latest copy its watch has; under load a tick came before the watch brought back the
    earlier ticks' writes (a progress update, then the end), decided on the status before them and made the same
    transition again: a second Completed Event and a completionTime moved to that tick's time. Until the watch
    brings the last write's version, a tick decides on its copy with the writes applied; a later version (another
    writer's) is decided as it reads."""
    import kopf

    from finetune_operator import handlers

    events: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *_, reason, **__: events.append(reason))
    monkeypatch.setattr(handlers, "scrape", lambda *_, **__: {"stage": "Training", "step": 5.0, "total_steps": 10.0})
    made = after(decide(Observed(body(), [], [], NOW)))
    running = after(decide(Observed(body(made), [job(ready=1)], [pod()], NOW)), made)
    done = {"stage": "Done", "exitCode": 0, "evaluation": {"baseline": {"accuracy": 0.4}, "final": {"accuracy": 0.6}}}
    training = ({("ns", "ft"): [job(ready=1)]}, {("ns", "ft"): [pod()]})
    ended = ({("ns", "ft"): [job(complete=True, active=0, succeeded=1)]},
             {("ns", "ft"): [pod(phase="Succeeded", exit_code=0, message=done)]})
    copy = body(running)
    copy["metadata"]["resourceVersion"] = "10"

    def at(version: str, status: dict[str, Any]) -> dict[str, Any]:
        return body(status) | {"metadata": copy["metadata"] | {"resourceVersion": version}}

    written = handlers.Written()
    progressed = ticked(copy, training, written=written, makes="11").patches[0]  # a read's progress: version 11
    assert progressed["progress"]["step"] == 5 and not events
    first = ticked(copy, ended, written=written, makes="12")  # still on 10: the end, version 12
    assert first.patches[0]["phase"] == "Succeeded" and events == ["Completed"]
    time.sleep(1.1)  # completionTime has seconds: a repeat would move it
    assert not ticked(copy, ended, written=written).patches and events == ["Completed"]
    in_between = at("11", merged(running, progressed))  # the watch brings the progress write, not yet the end
    assert not ticked(in_between, ended, written=written).patches and events == ["Completed"]
    arrived = at("12", merged(merged(running, progressed), first.patches[0]))
    assert not ticked(arrived, ended, written=written).patches and written.by_uid == {}
    # Another writer set the status back since: decided on what it says, so nothing stops the job's reconciles.
    assert ticked(at("13", running), ended, written=written).patches[0]["phase"] == "Succeeded"
    assert events == ["Completed"] * 2
    # An entry the watch never caught up with (a deleted job's) goes once it is old.
    written.wrote(at("13", running), {"phase": "Failed"}, "99")
    assert written.status(at("13", running))["phase"] == "Failed"
    monkeypatch.setattr(handlers, "WRITTEN_KEEP_SECONDS", 0.0)
    written.swept = 0.0
    assert written.status(at("13", running)) == running and written.by_uid == {}


def test_a_retried_attempt_that_waits_shows_what_it_waits_for_as_the_reason() -> None:
    """kubectl get ftj's Reason is status.reason: a retried attempt waiting for GPUs still said OOMKilled (Restarting
    came first), and one its queue (Kueue) preempted after it ran said Running, Restarting's reason once False."""
    oom = pod(phase="Failed", exit_code=137, reason="OOMKilled")
    retrying = after(decide(Observed(body({"attempts": 1}), [job(failure={"reason": "X", "message": ""})], [oom], NOW)))
    assert retrying["phase"] == "Pending" and retrying["reason"] == "BackoffWaiting" and retrying["attempts"] == 2
    assert conditions(retrying)["Restarting"] == ("True", "OOMKilled")
    created = after(decide(Observed(body(retrying), [job(failure={"reason": "X", "message": ""})], [], NOW + BACKOFF)),
                    retrying)
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    waiting = after(decide(Observed(body(created), [job(2)], [pod(2, phase="Pending", scheduled=False,
                                                                 unschedulable=message)], NOW)), created)
    assert waiting["phase"] == "Pending" and waiting["reason"] == "Unschedulable"
    assert conditions(waiting)["Restarting"] == ("True", "OOMKilled")
    running = after(decide(Observed(body(waiting), [job(2, ready=1)], [pod(2)], NOW)), waiting)
    assert running["phase"] == "Running" and conditions(running)["Restarting"] == ("False", "Running")
    preempted = outcome.job_summary({
        "metadata": {"name": "ft-2", "labels": {"finetune.dev/attempt": "2"}}, "spec": {"suspend": True},
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]}})
    queued = after(decide(Observed(body(running), [preempted], [], NOW)), running)
    assert queued["phase"] == "Pending" and queued["reason"] == "Queued"
    # admitted, its pods not yet placed: the queue's word stayed as Scheduled's
    admitted = after(decide(Observed(body(queued), [job(2)], [pod(2, phase="Pending", scheduled=False)], NOW)), queued)
    assert "Scheduled" not in conditions(admitted)
    # nor as Running's, the job's reason: it said Queued, "waits to be admitted", until the pods ran
    assert admitted["reason"] == "Admitted" and conditions(admitted)["Running"] == ("False", "Admitted")
    assert after(decide(Observed(body(admitted), [job(2, ready=1)], [pod(2)], NOW)), admitted)["phase"] == "Running"


def test_suspend_stops_the_attempt_and_resume_starts_the_next() -> None:
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW)))
    decision = decide(Observed(body(running, suspend=True), [job()], [pod()], NOW))
    status = after(decision, running)
    assert decision.delete_job == "ft-1" and status["phase"] == "Suspended"
    assert "Scheduled" not in conditions(status)  # it said "every worker has a node" through the suspend
    resumed = decide(Observed(body(status), [job(deleting="2026-12-01T12:00:30Z")], [], NOW + timedelta(minutes=5)))
    status = after(resumed, status)
    assert status["attempts"] == 2 and status["phase"] == "Pending" and conditions(status)["Restarting"][1] == "Resumed"
    # The user's resume is told, and is no warning (alerts on Warning Events fired at each one).
    assert {e[1] for e in resumed.events} == {"Resumed"} and {e[0] for e in resumed.events} == {"Normal"}
    assert status["startTime"] == "2026-12-01T12:05:00Z"  # as for a Job, the deadline's clock restarts
    assert decide(Observed(body(status), [job(deleting="2026-12-01T12:00:30Z")], [], NOW)).create_attempt == 2


def test_a_retune_whose_suspend_no_tick_saw_stops_the_attempt_and_the_next_resumes_with_it() -> None:
    """`kubectl patch` suspend, then `kubectl apply` of the retuned spec (suspend false) within a poll: no tick saw the
    job suspended, and its attempt ran on as it was made (an unschedulable one stayed so for ever) while the spec,
    and observedGeneration, said otherwise."""
    from finetune_operator import children, reconcile

    first = body({"attempts": 1})
    made = job(generation=first["metadata"]["generation"], recipe=children.recipe(reconcile.parse_spec(first)[0]))
    running = after(decide(Observed(first, [made], [pod()], NOW)))
    assert running["phase"] == "Running"
    # A new generation with the same recipe (a lifecycle field) leaves the attempt alone.
    assert decide(Observed(body(running, backoffLimit=5), [made], [pod()], NOW)).delete_job is None
    retuned = body(running, training=EXAMPLE["spec"]["training"] | {"epochs": 5})
    decision = decide(Observed(retuned, [made], [pod()], NOW + timedelta(seconds=5)))
    status = after(decision, running)
    assert decision.delete_job == "ft-1" and status["attempts"] == 2 and not status.get("failures")
    assert status["phase"] == "Pending" and conditions(status)["Restarting"] == ("True", "Resumed")
    assert {e[0] for e in decision.events} == {"Normal"}  # the user's own doing
    # The next attempt comes once the stopped one's pods are gone, made from the new spec.
    later = NOW + timedelta(seconds=10)
    assert decide(Observed(body(status), [dict(made, deleting="2026-12-01T12:00:30Z")], [], later)).create_attempt == 2
    # An attempt that ended is judged by its end; a Job an operator made before the annotations runs on.
    ended = dict(made, complete=True, active=0, succeeded=1)
    assert after(decide(Observed(retuned, [ended], [pod(phase="Succeeded", exit_code=0, message={})], NOW)),
                 running)["phase"] == "Succeeded"
    assert decide(Observed(retuned, [job()], [pod()], NOW)).delete_job is None


def test_a_workers_edit_while_suspended_creates_nothing_and_tells_no_attempt() -> None:
    """Created's message named the spec's workers, not the Job's: an edit of workers while suspended (its Job still
    being deleted, or resumed in the same apply) rewrote attempt 1's message, and posted AttemptCreated for it."""
    from finetune_operator import children, reconcile

    first = body({"attempts": 1})
    made = job(workers=1, generation=first["metadata"]["generation"],
               recipe=children.recipe(reconcile.parse_spec(first)[0]))
    running = after(decide(Observed(first, [made], [pod()], NOW)))
    suspended = after(decide(Observed(body(running, suspend=True), [made], [pod()], NOW)), running)
    assert suspended["phase"] == "Suspended"
    stopping = dict(made, deleting="2026-12-01T12:00:05Z")
    wider = EXAMPLE["spec"]["runtime"] | {"workers": 2}
    edited = decide(Observed(body(suspended, suspend=True, runtime=wider), [stopping], [], NOW + timedelta(seconds=5)))
    status = after(edited, suspended)
    assert edited.create_attempt is None and not edited.events and status["phase"] == "Suspended"
    # Edited and resumed in one apply (the CEL rules take a change whose old object was suspended), before a tick saw
    # the suspend: the attempt is stopped and the next one resumes; attempt 1 was made with 1 worker all the same.
    resumed = decide(Observed(body(running, runtime=wider), [made], [pod()], NOW + timedelta(seconds=5)))
    assert resumed.delete_job == "ft-1" and resumed.create_attempt is None
    assert [e[1] for e in resumed.events] == ["Resumed"]


def test_an_ended_attempt_is_judged_by_its_end_before_a_later_suspend_or_deadline() -> None:
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "phase": "Running"}
    completed = [job(complete=True, active=0, succeeded=1)], [pod(phase="Succeeded", exit_code=0, message={})]
    # It completed before its deadline, and is seen just after it.
    late = after(decide(Observed(body(running, activeDeadlineSeconds=3600), *completed, NOW)), running)
    assert late["phase"] == "Succeeded"
    assert after(decide(Observed(body(running, suspend=True), *completed, NOW)), running)["phase"] == "Succeeded"
    # Exit 1 is never retried, not even through a suspend and a resume.
    user_error = ([job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
                  [pod(phase="Failed", exit_code=1, message={"exitCode": 1, "reason": "DatasetNotFound", "message": "x"})])
    suspended = after(decide(Observed(body(running, suspend=True), *user_error, NOW)), running)
    assert suspended["phase"] == "Failed" and suspended["reason"] == "DatasetNotFound"
    assert decide(Observed(body(suspended), *user_error, NOW + timedelta(minutes=1))).create_attempt is None


def test_a_retry_decided_before_a_suspend_is_the_attempt_that_resumes() -> None:
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "phase": "Running"}
    crashed = ([job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
               [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])
    retrying = after(decide(Observed(body(running, suspend=True), *crashed, NOW)), running)
    assert retrying["attempts"] == 2 and retrying["failures"] == 1
    suspended = after(decide(Observed(body(retrying, suspend=True), *crashed, NOW)), retrying)
    assert suspended["phase"] == "Suspended"
    resumed = after(decide(Observed(body(suspended), *crashed, NOW + timedelta(minutes=1))), suspended)
    assert decide(Observed(body(resumed), *crashed, NOW + timedelta(minutes=1))).create_attempt == 2


def test_the_deadline_fails_the_job_and_stops_its_pods() -> None:
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z",
               "workers": {"active": 2, "ready": 2, "succeeded": 0, "failed": 0}}
    seen = Observed(body(running, activeDeadlineSeconds=600), [job(active=2, ready=2)], [pod(), pod(index=1)], NOW)
    decision = decide(seen)
    status = after(decision, running)
    assert status["reason"] == "DeadlineExceeded" and decision.delete_job == "ft-1"
    # A failed job is never reconciled again: `kubectl get ftj` showed its 2 stopped workers as running for ever.
    assert status["workers"] == {"active": 0, "ready": 0, "succeeded": 0, "failed": 0}


def test_a_job_made_but_not_yet_seen_is_stopped_by_name_and_no_attempt_starts_beside_an_earlier_one() -> None:
    """The tick that makes an attempt's Job writes its name; a suspend, a deadline or a failure seen before the Job's
    watch event deleted only a Job in the index, so nothing: that Job ran on unwatched, and a resume made the next
    attempt beside it, two gangs on the same output and checkpoints."""
    failed = job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})
    made = {"attempts": 2, "failures": 1, "startTime": "2026-12-01T11:59:50Z", "children": {"job": "ft-2"}}
    suspending = decide(Observed(body(made, suspend=True), [failed], [], NOW))
    suspended = after(suspending, made)
    assert suspending.delete_job == "ft-2" and suspended["phase"] == "Suspended"
    # Once said, a suspended job does not delete again at every tick a Job it no longer sees.
    assert decide(Observed(body(suspended, suspend=True), [failed], [], NOW + timedelta(seconds=2))).delete_job is None
    # Resumed while Job ft-2 (now seen) outlived the suspend: stopped, and attempt 3 waits until it is going.
    ft2 = job(2, active=1)
    resuming = decide(Observed(body(suspended), [failed, ft2], [], NOW + timedelta(seconds=4)))
    resumed = after(resuming, suspended)
    assert resuming.delete_job == "ft-2" and resumed["attempts"] == 3
    waiting = decide(Observed(body(resumed), [failed, ft2], [], NOW + timedelta(seconds=6)))
    assert waiting.create_attempt is None and waiting.delete_job == "ft-2"
    # Its pods have ended: the Job controller's verdict is a second away, and the pods keep their logs meanwhile.
    ended = pod(2, phase="Failed", exit_code=1, message={"exitCode": 1, "reason": "ConfigError", "message": "bad"})
    held = decide(Observed(body(resumed), [failed, ft2], [ended], NOW + timedelta(seconds=6)))
    assert held.create_attempt is None and held.delete_job is None
    assert conditions(after(waiting, resumed))["Created"] == ("False", "EarlierAttemptRunning")
    gone = job(2, active=0, deleting="2026-12-01T12:00:06Z")
    assert decide(Observed(body(resumed), [failed, gone], [], NOW + timedelta(seconds=8))).create_attempt == 3
    # A Job deleted in a watch's relist gap stays in the index as last seen: the apiserver is asked (waits_on_jobs),
    # and its list, without it, makes the attempt; held back by the index alone, the job waited for good.
    ghost = Observed(body(resumed), [failed, ft2], [], NOW + timedelta(seconds=8))
    assert reconcile.waits_on_jobs(ghost)
    # A Job gone with its pods before any tick saw it go: asked, it is JobDeleted (the next attempt), not made again
    # under its number with its end untold.
    vanished = {"attempts": 1, "children": {"job": "ft-1"}, "startTime": "2026-12-01T11:00:00Z"}
    assert reconcile.waits_on_jobs(Observed(body(vanished), [], [], NOW))
    gone = after(decide(Observed(body(vanished), [], [], NOW, listed=True)), vanished)
    assert gone["attempts"] == 2 and conditions(gone)["Restarting"] == ("True", "JobDeleted")
    # Suspended, it makes no attempt: no list at every tick of the suspension for a ghost.
    assert not reconcile.waits_on_jobs(Observed(body(resumed, suspend=True), [failed, ft2], [], NOW))
    listed = Observed(body(resumed), [failed], [], NOW + timedelta(seconds=8), listed=True)
    assert not reconcile.waits_on_jobs(listed) and decide(listed).create_attempt == 3
    # The deadline, a backoffLimit lowered below the failures, and a spec the operator cannot read end the job: each
    # stops the Job it made, seen or not.
    ends = [dict(made, startTime="2026-12-01T10:00:00Z"), {"activeDeadlineSeconds": 600}], [made, {"backoffLimit": 0}]
    for status, spec in ends:
        decision = decide(Observed(body(status, **spec), [failed], [], NOW))
        assert after(decision, status)["phase"] == "Failed" and decision.delete_job == "ft-2", spec
    unreadable = body(made) | {"spec": EXAMPLE["spec"] | {"backoffLimit": -1}}
    decision = decide(Observed(unreadable, [failed], [], NOW))
    assert after(decision, made)["reason"] == "InvalidSpec" and decision.delete_job == "ft-2"


def test_the_deadline_does_not_run_while_the_queue_holds_the_job() -> None:
    """As for a Job that Kueue suspends, the clock starts at admission: a job of activeDeadlineSeconds 600 that waited
    two hours in its queue failed DeadlineExceeded there, never having run."""
    queued = outcome.job_summary({
        "metadata": {"name": "ft-1", "labels": {"finetune.dev/attempt": "1"},
                     "creationTimestamp": "2026-12-01T12:00:00Z"},
        "spec": {"suspend": True},
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]}})
    status = after(decide(Observed(body(), [], [], NOW)))  # attempt 1 created at 12:00; Kueue suspends its Job
    for later in (timedelta(seconds=10), timedelta(hours=2)):
        status = after(decide(Observed(body(status, activeDeadlineSeconds=600), [queued], [], NOW + later)), status)
        assert status["phase"] == "Pending" and status["reason"] == "Queued"
    admitted = NOW + timedelta(hours=2, seconds=10)
    started = job(created=queued["created"], started="2026-12-01T14:00:10Z")
    status = after(decide(Observed(body(status, activeDeadlineSeconds=600), [started], [pod(phase="Pending")],
                                   admitted)), status)
    assert status["phase"] == "Pending"
    status = after(decide(Observed(body(status, activeDeadlineSeconds=600), [started], [pod()], admitted
                                   + timedelta(minutes=9))), status)
    assert status["phase"] == "Running"
    late = decide(Observed(body(status, activeDeadlineSeconds=600), [started], [pod()], admitted + timedelta(minutes=10)))
    assert after(late, status)["reason"] == "DeadlineExceeded" and late.delete_job == "ft-1"


def test_the_deadline_pauses_while_the_queue_holds_a_retry_and_keeps_the_earlier_attempts_time() -> None:
    """Each attempt is a Job of its own, which Kueue suspends at its creation: the clock was cleared in the queue and
    started again at the retry's admission, so the earlier attempts' time was forgotten, and a job of
    activeDeadlineSeconds 3600 whose first attempt ran 55 min was still Running 75 min after it started."""
    hour = {"activeDeadlineSeconds": 3600}
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-1"}}
    jobs, pods = crashed_attempt(1)  # at 11:55
    jobs = [dict(jobs[0], created="2026-12-01T11:00:00Z", started="2026-12-01T11:00:00Z")]
    crashed = datetime(2026, 12, 1, 11, 55)
    retrying = after(decide(Observed(body(running, **hour), jobs, pods, crashed)), running)
    made = decide(Observed(body(retrying, **hour), jobs, pods, crashed + BACKOFF))
    assert made.create_attempt == 2
    status = after(made, retrying)
    queued = job(2, active=0, suspended=True, created="2026-12-01T11:55:10Z")
    # Past an hour from its start, 55 min of it run: it waits, the clock paused.
    status = after(decide(Observed(body(status, **hour), jobs + [queued], [], NOW + timedelta(minutes=5))), status)
    assert status["phase"] == "Pending" and status["reason"] == "Queued"
    admitted = dict(queued, active=1, suspended=False, started="2026-12-01T12:10:00Z")  # after 14 min 50 s
    status = after(decide(Observed(body(status, **hour), jobs + [admitted], [pod(2)], NOW + timedelta(minutes=11))),
                   status)
    assert status["phase"] == "Running"
    # Disrupted at 12:12 (not counted), attempt 3 waits a minute in the queue: 55 min 10 s and 2 min run, 2 min 50 s
    # left of the hour.
    evicted = pod(2, phase="Failed", exit_code=143, disrupted="EvictionByEvictionAPI")
    jobs += [dict(admitted, active=0, failure={"reason": "X", "message": ""})]
    status = after(decide(Observed(body(status, **hour), jobs, [evicted], NOW + timedelta(minutes=12))), status)
    assert status["attempts"] == 3 and status["startTime"] == "2026-12-01T11:14:50Z"  # its wait is carried on
    third = job(3, created="2026-12-01T12:12:05Z", started="2026-12-01T12:13:05Z")
    status = after(decide(Observed(body(status, **hour), jobs + [third], [pod(3)], NOW + timedelta(minutes=15,
                                                                                                  seconds=40))), status)
    assert status["phase"] == "Running"
    late = decide(Observed(body(status, **hour), jobs + [third], [pod(3)], NOW + timedelta(minutes=15, seconds=50)))
    assert after(late, status)["reason"] == "DeadlineExceeded" and late.delete_job == "ft-3"


def test_a_preemption_restarts_only_the_preempted_attempts_share_of_the_deadline() -> None:
    """Kueue's admission sets a Job's startTime again, as it restarts a Job's activeDeadlineSeconds: the preempted
    attempt's run and its waits are left out, the earlier attempts' time (here 40 min) stays counted."""
    hour = {"activeDeadlineSeconds": 3600}
    status = {"attempts": 2, "failures": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-2"}}
    preempted = job(2, active=0, suspended=True, created="2026-12-01T11:40:00Z")  # ran 11:50 to 12:00
    status = after(decide(Observed(body(status, **hour), [preempted], [], NOW + timedelta(hours=1))), status)
    assert status["phase"] == "Pending" and status["reason"] == "Queued"
    admitted = job(2, created="2026-12-01T11:40:00Z", started="2026-12-01T13:30:00Z")
    status = after(decide(Observed(body(status, **hour), [admitted], [pod(2)], NOW + timedelta(minutes=109))), status)
    assert status["phase"] == "Running"
    late = decide(Observed(body(status, **hour), [admitted], [pod(2)], NOW + timedelta(minutes=110)))
    assert after(late, status)["reason"] == "DeadlineExceeded" and late.delete_job == "ft-2"


def test_a_job_deleted_by_hand_leaves_its_wait_in_the_queue_uncounted() -> None:
    """`kubectl delete job` of an attempt that Kueue had held two hours: its times went with it, and the tick that saw
    it gone counted the whole wait against activeDeadlineSeconds 3600 and failed the job DeadlineExceeded, 10 min after
    it had started to run. status.queue keeps them: the next attempt comes, its clock moved on by the wait."""
    hour = {"activeDeadlineSeconds": 3600}
    status = {"attempts": 1, "startTime": "2026-12-01T10:00:00Z", "children": {"job": "ft-1"}}
    admitted = job(created="2026-12-01T10:00:00Z", started="2026-12-01T12:00:00Z")
    status = after(decide(Observed(body(status, **hour), [admitted], [pod()], NOW + timedelta(minutes=9))), status)
    assert status["phase"] == "Running" and status["queue"] == {
        "attempt": 1, "since": "2026-12-01T10:00:00Z", "admitted": "2026-12-01T12:00:00Z"}
    gone = decide(Observed(body(status, **hour), [], [], NOW + timedelta(minutes=10), listed=True))
    status = after(gone, status)
    assert status["phase"] == "Pending" and conditions(status)["Restarting"] == ("True", "JobDeleted")
    assert status["attempts"] == 2 and status["startTime"] == "2026-12-01T12:00:00Z"  # 10 min run, 50 left
    # Attempt 2, unqueued, runs on to the hour's end counted from its admission
    second = job(2, created="2026-12-01T12:10:05Z", started="2026-12-01T12:10:05Z")
    running = after(decide(Observed(body(status, **hour), [second], [pod(2)], NOW + timedelta(minutes=59))), status)
    assert running["phase"] == "Running" and running["queue"]["attempt"] == 2
    late = decide(Observed(body(running, **hour), [second], [pod(2)], NOW + timedelta(minutes=60)))
    assert after(late, running)["reason"] == "DeadlineExceeded"


def test_a_job_deleted_by_hand_while_its_queue_holds_it_carries_the_wait_to_the_next_attempt() -> None:
    """Deleted while Kueue still held it (suspended, never admitted): the wait up to the tick that sees it gone is
    the queue's, not the job's."""
    hour = {"activeDeadlineSeconds": 3600}
    status = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z", "children": {"job": "ft-1"}}
    queued = job(active=0, suspended=True, created="2026-12-01T11:00:00Z")
    status = after(decide(Observed(body(status, **hour), [queued], [], NOW + timedelta(minutes=30))), status)
    assert status["reason"] == "Queued" and "admitted" not in status["queue"]
    gone = after(decide(Observed(body(status, **hour), [], [], NOW + timedelta(minutes=40), listed=True)), status)
    assert gone["phase"] == "Pending" and gone["attempts"] == 2
    assert gone["startTime"] == "2026-12-01T12:40:00Z"  # nothing of the hour spent
    # A record of the attempt before is not the new attempt's: its own Job, once seen, says its wait
    assert reconcile._queue_wait(None, 2, gone) is None


def test_the_ttl_deletes_a_finished_job_only_when_it_has_passed() -> None:
    done = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "",
                            "lastTransitionTime": "2026-12-01T11:59:00Z"}], "completionTime": "2026-12-01T11:59:30Z"}
    assert not decide(Observed(body(done, ttlSecondsAfterFinished=60), [], [], NOW)).delete_self
    assert decide(Observed(body(done, ttlSecondsAfterFinished=30), [], [], NOW)).delete_self
    assert not decide(Observed(body(done), [], [], NOW)).delete_self  # no TTL: kept


def test_unchanged_conditions_keep_their_transition_time() -> None:
    first = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    later = after(decide(Observed(body(first), [job()], [pod()], NOW + timedelta(minutes=1))), first)
    running = [c for c in later["conditions"] if c["type"] == "Running"][0]
    assert running["lastTransitionTime"] == "2026-12-01T12:00:00Z"


def test_a_failure_is_counted_once_however_often_it_is_seen() -> None:
    failed = [job(failure={"reason": "X", "message": ""})]
    pods = [pod(phase="Failed", exit_code=2)]
    first = after(decide(Observed(body({"attempts": 1, "failures": 0}), failed, pods, NOW)))
    # Once the retry is stored, the same failed attempt is history: attempt 2 is created, nothing is counted again.
    again = decide(Observed(body(first), failed, pods, NOW + BACKOFF))
    assert again.create_attempt == 2
    assert after(again, first)["failures"] == first["failures"] == 1 and after(again, first)["attempts"] == 2


def test_unknown_status_fields_and_other_controllers_jobs() -> None:
    # A status field of another version changes no decision, and the merge patch leaves it alone (a None clears it).
    known = body({"attempts": 1})
    future = {**known, "status": known["status"] | {"fromTheFuture": {"x": 1}}}
    decision = decide(Observed(future, [job()], [pod()], NOW))
    assert decision == decide(Observed(known, [job()], [pod()], NOW)) and "fromTheFuture" not in decision.status
    assert after(decision, future["status"])["fromTheFuture"] == {"x": 1}
    # A condition type of another version (its CRD stays after a rollback: Helm leaves crds/ alone) is kept, last.
    future = {"type": "Degraded", "status": "True", "reason": "Slow", "message": "",
              "lastTransitionTime": "2026-12-01T11:00:00Z"}
    status = after(decide(Observed(body({"attempts": 1, "conditions": [future]}), [job()], [pod()], NOW)))
    assert status["phase"] == "Running" and status["conditions"][-1] == future
    assert decide(Observed(body(managedBy="kueue.x-k8s.io/multikueue"), [], [], NOW)) is None


@pytest.mark.parametrize("problem", ["spec.output.uri: the PersistentVolumeClaim 'models' does not exist in namespace ns"])
def test_what_only_the_operator_can_judge_fails_as_invalid_spec(problem: str) -> None:
    decision = decide(Observed(body(), [], [], NOW, problems=[problem]))
    status = after(decision)
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec" and decision.create_attempt is None
    assert problem in [c["message"] for c in status["conditions"] if c["type"] == "Failed"][0]


def test_a_claim_made_moments_after_its_job_is_waited_for_and_one_never_made_fails_the_job() -> None:
    # `kubectl apply -f dir/` makes job.yaml's job before pvc.yaml's claim.
    missing = "spec.dataset.uri: the PersistentVolumeClaim 'data' does not exist in namespace ns"
    young = NOW - timedelta(seconds=60) + timedelta(seconds=5)  # body() was created 5 s before this
    waiting = decide(Observed(body(), [], [], young, problems=[missing], claims_missing=[missing]))
    status = after(waiting)
    assert status["phase"] == "Pending" and status["reason"] == "ClaimNotFound" and waiting.create_attempt is None
    assert conditions(status)["Created"] == ("False", "ClaimNotFound") and "Failed" not in conditions(status)
    assert any(e[:2] == ("Warning", "ClaimNotFound") and missing in e[2] for e in waiting.events)
    created = decide(Observed(body(status), [], [], young + timedelta(seconds=10)))  # the claim is there now
    assert created.create_attempt == 1 and conditions(after(created, status))["Created"] == ("True", "AttemptCreated")
    # Still missing 30 s after the job was made: a typo, not a race.
    late = decide(Observed(body(status), [], [], young + timedelta(seconds=25), problems=[missing],
                           claims_missing=[missing]))
    assert after(late, status)["reason"] == "InvalidSpec" and late.create_attempt is None
    # Beside another problem nothing is worth waiting for.
    regex = "spec.adjust.freeze.pattern: unbalanced parenthesis"
    mixed = decide(Observed(body(), [], [], young, problems=[missing, regex], claims_missing=[missing]))
    assert after(mixed)["reason"] == "InvalidSpec"


def test_claims_must_exist_and_fit_the_workers() -> None:
    from finetune_operator import judge
    from finetune_operator.api import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(EXAMPLE["spec"] | {"runtime": {"workers": 2}})
    rwo = {"spec": {"accessModes": ["ReadWriteOnce"]}}
    rwx = {"spec": {"accessModes": ["ReadWriteMany"]}}
    assert judge.spec_problems(spec, {"models": rwx, "data": {"spec": {"accessModes": ["ReadOnlyMany"]}}}, "ns") == []
    problems = judge.spec_problems(spec, {"models": rwo, "data": None}, "ns")
    assert problems[0].startswith("spec.output.uri: claim 'models' is ReadWriteOnce")
    assert problems[1].startswith("spec.dataset.uri: the PersistentVolumeClaim 'data' does not exist")
    single = FineTuneJobSpec.model_validate(EXAMPLE["spec"] | {"adjust": {"freeze": {"strategy": "regex", "pattern": "(("}}})
    assert judge.spec_problems(single, {"models": rwo, "data": rwo}, "ns") == [
        "spec.adjust.freeze.pattern: not a valid regular expression (missing ), unterminated subpattern at position 1)"]
    # A raw block device no container mounts as a folder (the kubelet refused, told late as a stuck volume); a claim
    # being deleted, waited for as a missing one (made again by `kubectl delete -f dir/; kubectl apply -f dir/`).
    one = FineTuneJobSpec.model_validate(EXAMPLE["spec"])
    block = {"spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}}
    deleting = rwo | {"metadata": {"deletionTimestamp": "2026-12-06T10:00:00Z"}}
    [problem] = judge.spec_problems(one, {"models": block, "data": rwo}, "ns")
    assert problem.startswith("spec.output.uri: claim 'models' is a raw block device") and not judge.missing_claims(
        one, {"models": block, "data": rwo}, "ns")
    [problem] = judge.spec_problems(one, {"models": deleting, "data": rwo}, "ns")
    assert problem == "spec.output.uri: the PersistentVolumeClaim 'models' is being deleted"
    assert judge.missing_claims(one, {"models": deleting, "data": rwo}, "ns") == [problem]
    # model.config's keys are preserved unknown fields, which the apiserver's CEL cannot read: refused before any pod.
    remote = FineTuneJobSpec.model_validate(EXAMPLE["spec"] | {"model": EXAMPLE["spec"]["model"] | {
        "config": {"trust_remote_code": True}}})
    [problem] = judge.spec_problems(remote, {"models": rwo, "data": rwo}, "ns")
    assert problem.startswith("spec.model.config.trust_remote_code: the trainer never runs a model repository's")
    revision = FineTuneJobSpec.model_validate(EXAMPLE["spec"] | {"model": EXAMPLE["spec"]["model"] | {
        "config": {"revision": "v2"}}})
    [problem] = judge.spec_problems(revision, {"models": rwo, "data": rwo}, "ns")
    assert problem.startswith("spec.model.config.revision: an argument of from_pretrained") and \
        problem.endswith("set model.revision")


def _volume_spec(**runtime: Any) -> Any:
    from finetune_operator.api import FineTuneJobSpec

    return FineTuneJobSpec.model_validate(EXAMPLE["spec"] | {"runtime": EXAMPLE["spec"]["runtime"] | runtime})


def test_claims_of_runtime_volumes_must_exist_and_fit_the_workers() -> None:
    """Only the claims of pvc:// URIs were judged: a claim mounted through runtime.volumes that was missing left the
    pods Pending for ever, one of volumeMode Block left them in FailedMount, and a ReadWriteOnce one shared by two
    workers attached to one node (Multi-Attach): the other worker never started, and rank 0 held its GPUs until the
    rendezvous timed out."""
    from finetune_operator import judge

    rwo, rwop = {"spec": {"accessModes": ["ReadWriteOnce"]}}, {"spec": {"accessModes": ["ReadWriteOncePod"]}}
    rox, rwx = {"spec": {"accessModes": ["ReadOnlyMany"]}}, {"spec": {"accessModes": ["ReadWriteMany"]}}
    uris = {"models": rwx, "data": rox}  # the example's pvc:// claims, fit for any number of workers
    field = "spec.runtime.volumes[1].persistentVolumeClaim.claimName"
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "persistentVolumeClaim": {"claimName": "hub"}}]
    written = _volume_spec(workers=2, volumes=volumes, volumeMounts=[{"name": "cache", "mountPath": "/cache"}])
    for modes in (rwo, rwop, rox):  # written to by every worker: only ReadWriteMany serves
        [problem] = judge.spec_problems(written, uris | {"hub": modes}, "ns")
        assert problem == (f"{field}: claim 'hub' is {modes['spec']['accessModes'][0]}, but the 2 workers all need it "
                           "(ReadWriteMany)")
    assert judge.spec_problems(written, uris | {"hub": rwx}, "ns") == []
    assert "hub" in judge.claim_names(written) and "hub" not in judge.claim_fields(written)  # no /mnt/pvc mount
    # Read only, by the volume's readOnly or by every mount's: ReadOnlyMany serves, ReadWriteOnce still attaches once.
    mounts = [{"name": "cache", "mountPath": "/cache", "readOnly": True}, {"name": "cache", "mountPath": "/more"}]
    for read in (_volume_spec(workers=2, volumes=[{"name": "cache", "persistentVolumeClaim": {
                     "claimName": "hub", "readOnly": True}}], volumeMounts=mounts),
                 _volume_spec(workers=2, volumes=volumes, volumeMounts=[m | {"readOnly": True} for m in mounts])):
        assert judge.spec_problems(read, uris | {"hub": rox}, "ns") == []
        [problem] = judge.spec_problems(read, uris | {"hub": rwo}, "ns")
        assert problem.endswith("but the 2 workers all need it (ReadOnlyMany or ReadWriteMany)"), problem
    one_mount_writes = _volume_spec(workers=2, volumes=volumes, volumeMounts=mounts)
    assert judge.spec_problems(one_mount_writes, uris | {"hub": rox}, "ns")[0].startswith(f"{field}: claim 'hub'")
    # One worker: any access mode; but a missing claim, one being deleted or a raw block device, never.
    single = _volume_spec(volumes=volumes, volumeMounts=[{"name": "cache", "mountPath": "/cache"}])
    assert judge.spec_problems(single, uris | {"hub": rwop}, "ns") == []
    missing = f"{field}: the PersistentVolumeClaim 'hub' does not exist in namespace ns"
    assert judge.spec_problems(single, uris | {"hub": None}, "ns") == [missing]
    assert judge.missing_claims(single, uris | {"hub": None}, "ns") == [missing]  # waited for, as a URI's claim
    deleting = rwo | {"metadata": {"deletionTimestamp": "2026-12-06T10:00:00Z"}}
    assert judge.missing_claims(single, uris | {"hub": deleting}, "ns") == [
        f"{field}: the PersistentVolumeClaim 'hub' is being deleted"]
    block = {"spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}}
    [problem] = judge.spec_problems(single, uris | {"hub": block}, "ns")
    assert problem.startswith(f"{field}: claim 'hub' is a raw block device") and not judge.missing_claims(
        single, uris | {"hub": block}, "ns")


def test_a_claim_named_by_a_uri_and_a_volume_is_judged_for_each_field() -> None:
    """A claim the dataset's pvc:// URI reads and a volume writes needs ReadWriteMany for the volume's mount; the
    problem names the field that asks for the writes (the volume), not the URI's."""
    from finetune_operator import judge

    rox, rwx = {"spec": {"accessModes": ["ReadOnlyMany"]}}, {"spec": {"accessModes": ["ReadWriteMany"]}}
    both = _volume_spec(workers=2, volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
                        volumeMounts=[{"name": "d", "mountPath": "/scratch"}])
    assert judge.spec_problems(both, {"models": rwx, "data": rox}, "ns") == [
        "spec.runtime.volumes[0].persistentVolumeClaim.claimName: claim 'data' is ReadOnlyMany, but the 2 workers "
        "all need it (ReadWriteMany)"]
    assert judge.spec_problems(both, {"models": rwx, "data": rwx}, "ns") == []
    assert judge.missing_claims(both, {"models": rwx, "data": None}, "ns") == [
        "spec.dataset.uri: the PersistentVolumeClaim 'data' does not exist in namespace ns",
        "spec.runtime.volumes[0].persistentVolumeClaim.claimName: the PersistentVolumeClaim 'data' does not exist in "
        "namespace ns"]
    assert judge.claim_names(both) == ["models", "data"]  # each read once


class Claimed(Apiserver):
    """Apiserver that answers a claim's read with `claims`' (a 404 for one not there) and keeps the claims read."""

    def __init__(self, claims: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.claims, self.read, self.posted = claims, [], []

    def call(self, method: str, path: str, body: Any = None, **query: object) -> bytes:
        if "/persistentvolumeclaims/" in path:
            name = path.rsplit("/", 1)[1]
            self.read.append(name)
            if name not in self.claims:
                raise ApiException(status=404, reason="NotFound")
            return json.dumps(self.claims[name]).encode()
        if method == "POST":
            self.posted.append(path)
        return super().call(method, path, body, **query)


def test_a_tick_reads_the_claims_of_runtime_volumes_and_fails_a_job_whose_claim_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick read only the pvc:// URIs' claims: a job mounting a claim that was never made got its Job, and its
    pods waited in Pending for ever."""
    import kopf

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop
    rwo = {"spec": {"accessModes": ["ReadWriteOnce"]}}
    runtime = EXAMPLE["spec"]["runtime"] | {
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hub"}}],
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}
    apiserver = ticked(body(runtime=runtime), ({}, {}), apiserver=Claimed({"models": rwo, "data": rwo}))
    assert sorted(apiserver.read) == ["data", "hub", "models"] and not apiserver.posted
    [status] = apiserver.patches
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    [failed] = [c["message"] for c in status["conditions"] if c["type"] == "Failed"]
    assert "spec.runtime.volumes[0].persistentVolumeClaim.claimName: the PersistentVolumeClaim 'hub' does not " \
        "exist in namespace ns" in failed
    made = ticked(body(runtime=runtime), ({}, {}), apiserver=Claimed({"models": rwo, "data": rwo, "hub": rwo}))
    assert made.posted and made.patches[0]["phase"] != "Failed"


def test_more_processes_than_the_operators_trainer_resources_give_gpus_is_refused_before_any_pod(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The apiserver refuses it only where the spec sets runtime.resources; with the operator's trainer resources the
    trainer refused it (InvalidConfig), once every worker had been scheduled and held its GPUs."""
    import kopf

    from finetune_operator import judge
    from finetune_operator.settings import Settings

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # posting needs kopf's running loop
    rwo = {"spec": {"accessModes": ["ReadWriteOnce"]}}
    runtime = {k: v for k, v in EXAMPLE["spec"]["runtime"].items() if k != "resources"} | {"processesPerWorker": 4}
    two_gpus = Settings.model_validate({"trainer_resources": {"limits": {"memory": "64Gi", "nvidia.com/gpu": 2}}})
    apiserver = ticked(body(runtime=runtime), ({}, {}), settings=two_gpus, apiserver=Claimed({"models": rwo, "data": rwo}))
    [status] = apiserver.patches
    assert status["reason"] == "InvalidSpec" and not apiserver.posted
    [failed] = [c["message"] for c in status["conditions"] if c["type"] == "Failed"]
    assert "spec.runtime.processesPerWorker: 4 processes per worker, but each worker has 2 GPU(s) (the operator's " \
        "trainer resources nvidia.com/gpu" in failed
    # Enough GPUs, none (the CPU), or the spec's own resources (the apiserver's to judge): not the operator's to refuse.
    spec = _volume_spec(processesPerWorker=4)
    own = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"resources": None})})
    claims = {"models": rwo, "data": rwo}
    [problem] = judge.spec_problems(own, claims, "ns", trainer_gpus=3)
    assert problem.startswith("spec.runtime.processesPerWorker: 4 processes per worker, but each worker has 3 GPU(s)")
    for gpus in (0, 4, 8):
        assert judge.spec_problems(own, claims, "ns", trainer_gpus=gpus) == []
    assert judge.spec_problems(spec, claims, "ns", trainer_gpus=2) == []  # its runtime.resources have no GPUs


def test_metrics_that_cannot_be_read_turn_stale_after_a_grace_and_fresh_again() -> None:
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW,
                                    sample={"step": 3, "total_steps": 10, "loss": 1.0})))
    error = ("MetricsTimeout", "http://10.0.0.1:9090/metrics: no complete answer within 1.0 s")
    # One failed read is no news: the last numbers stay and nothing is stale yet.
    soon = after(decide(Observed(body(running), [job(ready=1)], [pod()], NOW + timedelta(seconds=3),
                                 scrape_error=error)), running)
    assert "MetricsStale" not in conditions(soon) and soon["progress"]["step"] == 3
    late = decide(Observed(body(soon), [job(ready=1)], [pod()], NOW + timedelta(seconds=11), scrape_error=error))
    stale = after(late, soon)
    assert conditions(stale)["MetricsStale"] == ("True", "MetricsTimeout")
    assert stale["phase"] == "Running" and stale["progress"]["step"] == 3
    message = next(c["message"] for c in stale["conditions"] if c["type"] == "MetricsStale")
    assert "since 2026-12-01T12:00:00Z" in message and "no complete answer" in message
    assert ("Warning", "MetricsTimeout") in [e[:2] for e in late.events]
    fresh = decide(Observed(body(stale), [job(ready=1)], [pod()], NOW + timedelta(seconds=13),
                            sample={"step": 5, "total_steps": 10, "loss": 0.9}))
    assert conditions(after(fresh, stale))["MetricsStale"] == ("False", "MetricsRead")
    assert ("Normal", "MetricsRead") in [e[:2] for e in fresh.events]
    done = after(decide(Observed(body(after(fresh, stale)), [job(complete=True, succeeded=1)],
                                 [pod(phase="Succeeded", exit_code=0, message={})], NOW + timedelta(seconds=20))))
    assert conditions(done)["MetricsStale"] == ("False", "Completed") and done["phase"] == "Succeeded"


def test_metrics_turn_stale_after_a_few_polls_however_long_a_poll_is() -> None:
    """The grace was 10 s whatever pollSeconds (up to 300): at 30 s one read that timed out, after a good one, made the
    job MetricsStale with a Warning, and the next poll's read took it back. It is 10 s or three polls, the longer."""
    sample = {"step": 400, "total_steps": 1000, "steps_per_second": 1.0, "stage": "Training"}
    error = ("MetricsTimeout", "no complete answer within 1.0 s")
    base = {"attempts": 1, "children": {"job": "ft-1"}}
    for poll, quiet, stale in ((2, 8, 10), (0.5, 8, 10), (30, 60, 90), (300, 600, 900)):
        r0 = after(decide(Observed(body(base), [job()], [pod()], NOW - timedelta(minutes=30), sample=sample,
                                   poll_seconds=poll)), base)
        read = after(decide(Observed(body(r0), [job()], [pod()], NOW, sample=sample, poll_seconds=poll)), r0)
        for seconds in (poll, quiet):  # one failed read, then those of two polls: no news
            once = decide(Observed(body(read), [job()], [pod()], NOW + timedelta(seconds=seconds), poll_seconds=poll,
                                   scrape_error=error))
            assert "MetricsStale" not in conditions(after(once, read)) and not once.events, (poll, seconds)
        late = decide(Observed(body(read), [job()], [pod()], NOW + timedelta(seconds=stale), poll_seconds=poll,
                               scrape_error=error))
        assert conditions(after(late, read))["MetricsStale"] == ("True", "MetricsTimeout"), poll
        # Before its first read a rank 0 gets its minute, or those polls where they are longer.
        started = after(decide(Observed(body(base), [job()], [pod()], NOW, scrape_error=error, poll_seconds=poll)),
                        base)
        grace = max(60, stale)
        assert reconcile.still_starting(started, NOW + timedelta(seconds=grace - 1), poll)
        assert not reconcile.still_starting(started, NOW + timedelta(seconds=grace), poll)
        for seconds, turned in ((grace - 1, False), (grace, True)):
            said = conditions(after(decide(Observed(body(started), [job()], [pod()], NOW + timedelta(seconds=seconds),
                                                    scrape_error=error, poll_seconds=poll)), started))
            assert ("MetricsStale" in said) == turned, (poll, seconds)


def test_a_rank_0_that_is_done_and_closed_its_metrics_is_not_stale_while_its_pod_exits() -> None:
    """Rank 0 stops serving once read to the end; a Job that took over 10 s more to complete (a loaded machine) left
    a successful job with a MetricsUnreachable Warning ("rank 0's metrics not read since ...")."""
    done = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW,
                                 sample={"stage": "Done", "step": 10, "total_steps": 10, "loss": 0.5})))
    error = ("MetricsUnreachable", "connection refused")
    exiting = decide(Observed(body(done), [job(ready=1)], [pod()], NOW + timedelta(seconds=30), scrape_error=error))
    assert "MetricsStale" not in conditions(after(exiting, done)) and not exiting.events


def test_a_rank_0_that_is_done_and_whose_pod_never_exits_is_flagged() -> None:
    """A pod stuck after Done (a rank in NCCL's teardown, a non-daemon thread) left the job Running at 100 % with
    no condition and no Warning, for good: after the linger and minutes to exit it is MetricsStale, NotExiting."""
    done = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW,
                                 sample={"stage": "Done", "step": 10, "total_steps": 10, "loss": 0.5})))
    error = ("MetricsUnreachable", "connection refused")
    stuck = decide(Observed(body(done), [job(ready=1)], [pod()], NOW + timedelta(minutes=10), scrape_error=error))
    assert conditions(after(stuck, done))["MetricsStale"] == ("True", "NotExiting")
    assert "rank 0 reported Done (last read at 2026-12-01T12:00:00Z); its pods have not exited" in next(
        c["message"] for c in after(stuck, done)["conditions"] if c["type"] == "MetricsStale")
    assert after(stuck, done)["phase"] == "Running" and ("Warning", "NotExiting") in [e[:2] for e in stuck.events]


def test_a_retry_after_an_attempt_that_reported_done_is_not_flagged_for_the_old_attempts_done() -> None:
    """Rank 0 reported Done, then its process died (exit 139): status.stage stays Done into the next attempt until
    that one is read. Attempt 2's rank 0, still starting, was flagged NotExiting ("rank 0 reported Done ...; its pods
    have not exited") with a Warning, and then kept that reason instead of saying it could not be read."""
    done = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW,
                                 sample={"stage": "Done", "step": 10, "total_steps": 10, "loss": 0.5})))
    died = [pod(phase="Failed", exit_code=139, message={"stage": "Done", "reason": "Succeeded", "exitCode": 0})]
    retried = decide(Observed(body(done), [job(failure={"reason": "BackoffLimitExceeded", "message": ""})], died,
                              NOW + timedelta(seconds=5)))
    restarting = after(retried, done)
    assert restarting["attempts"] == 2 and restarting["stage"] == "Done"
    error = ("MetricsUnreachable", "connection refused")
    starting = decide(Observed(body(restarting), [job(2, ready=1)], [pod(2)], NOW + timedelta(minutes=6),
                               scrape_error=error))
    assert "MetricsStale" not in conditions(after(starting, restarting)) and not [
        e for e in starting.events if e[0] == "Warning"]
    running = after(starting, restarting)
    late = decide(Observed(body(running), [job(2, ready=1)], [pod(2)], NOW + timedelta(minutes=8), scrape_error=error))
    assert conditions(after(late, running))["MetricsStale"] == ("True", "MetricsUnreachable")


def test_a_worker_that_never_exits_after_rank_0_did_is_flagged() -> None:
    """Rank 0 exited after Done while rank 1 hung in its teardown: with no Running rank 0 nothing was scraped, so
    the job stayed Running at 100 % with no condition for good. It is MetricsStale, NotExiting, all the same."""
    spec = {"runtime": EXAMPLE["spec"]["runtime"] | {"workers": 2}}
    done = after(decide(Observed(body({"attempts": 1}, **spec), [job(active=2, ready=2)], [pod(), pod(index=1)], NOW,
                                 sample={"stage": "Done", "step": 10, "total_steps": 10, "loss": 0.5})))
    pods = [pod(phase="Succeeded", exit_code=0, message={"stage": "Done", "exitCode": 0}), pod(index=1)]
    stuck = decide(Observed(body(done, **spec), [job(active=1, ready=1, succeeded=1)], pods, NOW + timedelta(hours=2)))
    assert after(stuck, done)["phase"] == "Running"
    assert conditions(after(stuck, done))["MetricsStale"] == ("True", "NotExiting")


def test_a_starting_rank_0_gets_a_minute_before_its_metrics_are_stale() -> None:
    """A trainer that has not served its metrics yet is importing torch and the model's code, which takes tens of
    seconds from a cold image: no Warning at every start; one that never answers is stale after a minute."""
    error = ("MetricsUnreachable", "connection refused")
    started = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW, scrape_error=error)))
    assert started["phase"] == "Running" and "progress" not in started
    importing = decide(Observed(body(started), [job(ready=1)], [pod()], NOW + timedelta(seconds=45),
                                scrape_error=error))
    assert "MetricsStale" not in conditions(after(importing, started)) and not importing.events
    late = decide(Observed(body(started), [job(ready=1)], [pod()], NOW + timedelta(seconds=61), scrape_error=error))
    assert conditions(after(late, started))["MetricsStale"] == ("True", "MetricsUnreachable")
    assert "not read yet: connection refused" in next(
        c["message"] for c in after(late, started)["conditions"] if c["type"] == "MetricsStale")


def test_a_job_read_at_every_poll_before_its_first_step_is_not_stale_after_one_failed_read() -> None:
    """Loading and the baseline report a stage and no step: those reads left no trace, so one read that timed out
    after the attempt's first minute made the job MetricsStale ("not read yet", a Warning) though it had been read
    every 2 s; a resumed attempt likewise. Staleness counts from the last good read, as during training."""
    error = ("MetricsTimeout", "no complete answer within 1.0 s")
    resumed = {"attempts": 2, "progress": {"percent": 40, "step": 40, "totalSteps": 100,
                                           "updatedAt": "2026-12-01T11:50:00Z"}}
    for attempt, start in ((1, {"attempts": 1}), (2, resumed)):
        jobs, pods = [job(attempt, ready=1)], [pod(attempt)]
        status = after(decide(Observed(body(start), jobs, pods, NOW, sample={"stage": "Loading"})), start)
        for seconds in range(2, 120, 2):
            status = after(decide(Observed(body(status), jobs, pods, NOW + timedelta(seconds=seconds),
                                           sample={"stage": "Baseline"})), status)
        once = decide(Observed(body(status), jobs, pods, NOW + timedelta(seconds=121), scrape_error=error))
        assert "MetricsStale" not in conditions(after(once, status)) and not once.events
        # The previous attempt's numbers stay until this one's first step.
        assert after(once, status)["progress"].get("step") == start.get("progress", {}).get("step")
        late = decide(Observed(body(status), jobs, pods, NOW + timedelta(seconds=129), scrape_error=error))
        assert conditions(after(late, status))["MetricsStale"] == ("True", "MetricsTimeout")
        assert "not read since 2026-12-01T12:01:58Z" in next(
            c["message"] for c in after(late, status)["conditions"] if c["type"] == "MetricsStale")


def test_a_retried_attempt_gets_the_same_grace_before_its_metrics_are_stale() -> None:
    error = ("MetricsUnreachable", "connection refused")
    restarting = {"attempts": 2, "failures": 1, "startTime": "2026-12-01T11:00:00Z",
                  "progress": {"percent": 40, "step": 40, "totalSteps": 100, "updatedAt": "2026-12-01T11:50:00Z"},
                  "conditions": [{"type": "Running", "status": "False", "reason": "NcclError", "message": "",
                                  "lastTransitionTime": "2026-12-01T11:50:05Z"},
                                 {"type": "Restarting", "status": "True", "reason": "NcclError", "message": "",
                                  "lastTransitionTime": "2026-12-01T11:50:05Z"}]}
    started = after(decide(Observed(body(restarting), [job(2, ready=1)], [pod(2)], NOW, scrape_error=error)), restarting)
    assert started["phase"] == "Running" and "MetricsStale" not in conditions(started)
    soon = decide(Observed(body(started), [job(2, ready=1)], [pod(2)], NOW + timedelta(seconds=45), scrape_error=error))
    assert "MetricsStale" not in conditions(after(soon, started))
    late = decide(Observed(body(started), [job(2, ready=1)], [pod(2)], NOW + timedelta(seconds=61), scrape_error=error))
    assert conditions(after(late, started))["MetricsStale"] == ("True", "MetricsUnreachable")


def test_a_container_that_cannot_start_says_why_instead_of_a_silent_pending() -> None:
    stuck = pod(phase="Pending", stuck={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope:1"'})
    decision = decide(Observed(body({"attempts": 1}), [job()], [stuck], NOW))
    status = after(decision)
    assert status["phase"] == "Pending" and status["reason"] == "ImagePullBackOff"
    assert conditions(status)["Running"] == ("False", "ImagePullBackOff")
    assert conditions(status)["Scheduled"] == ("True", "Scheduled")
    assert ("Warning", "ImagePullBackOff") in [e[:2] for e in decision.events]
    running = after(decide(Observed(body(status), [job(ready=1)], [pod()], NOW)), status)
    assert running["phase"] == "Running" and conditions(running)["Running"] == ("True", "Training")


def test_an_image_that_cannot_be_pulled_is_one_wait_though_the_kubelet_alternates_its_two_words() -> None:
    """The kubelet alternates ErrImagePull and ImagePullBackOff while it retries a pull: each was a new reason, so the
    job posted a Warning and changed status.reason every few seconds for as long as it waited."""
    def waiting(reason: str, message: str) -> dict[str, Any]:
        return outcome.pod_summary({
            "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/job-uid": "u",
                                                        "finetune.dev/attempt": "1"}},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": reason,
                                                                                      "message": message}}}]}})

    status = {"attempts": 1, "startTime": "2026-12-01T11:59:00Z", "children": {"job": "ft-1", "configMap": "ft-1"}}
    told, reasons = [], set()
    for i, (reason, message) in enumerate([("ErrImagePull", "pull access denied for x"),
                                           ("ImagePullBackOff", 'Back-off pulling image "x"')] * 2):
        decision = decide(Observed(body(status), [job()], [waiting(reason, message)], NOW + timedelta(seconds=10 * i)))
        status = after(decision, status)
        told.append([e for e in decision.events if e[1] not in ("AttemptCreated", "Scheduled")])
        reasons.add(status["reason"])
    assert reasons == {"ImagePullBackOff"} and [[e[1] for e in t] for t in told] == [["ImagePullBackOff"], [], [], []]
    assert told[0][0][0] == "Warning" and "pull access denied" in told[0][0][2]


def test_an_image_that_cannot_be_pulled_keeps_the_pull_errors_message_through_the_back_offs() -> None:
    """Running=False's message followed the kubelet's words too: the pull's error, then "Back-off pulling image", at
    every other tick, so each tick wrote the status again. The error says why; a back-off only that it waits."""
    def waiting(reason: str, message: str) -> dict[str, Any]:
        return pod(phase="Pending", stuck={"reason": outcome.SAME_WAIT.get(reason, reason), "message": message,
                                           **({"backOff": True} if reason == "ImagePullBackOff" else {})})

    def messages(words: list[tuple[str, str]]) -> list[str]:
        status: dict[str, Any] = {"attempts": 1, "startTime": "2026-12-01T11:59:00Z"}
        said = []
        for i, (reason, message) in enumerate(words):
            status = after(decide(Observed(body(status), [job()], [waiting(reason, message)],
                                           NOW + timedelta(seconds=10 * i))), status)
            said.append(next(c["message"] for c in status["conditions"] if c["type"] == "Running"))
        return said

    denied, back_off = ("ErrImagePull", "pull access denied for x"), ("ImagePullBackOff", 'Back-off pulling image "x"')
    assert set(messages([denied, back_off] * 2)) == {"pod ft-1-0-x: pull access denied for x"}
    # First seen in its back-off: the error's message once it comes, and then it stays; another error is news.
    assert messages([back_off, denied, back_off, ("ErrImagePull", "manifest unknown"), back_off]) == [
        'pod ft-1-0-x: Back-off pulling image "x"', *["pod ft-1-0-x: pull access denied for x"] * 2,
        *["pod ft-1-0-x: manifest unknown"] * 2]
    # What the summary keeps of a back-off says so.
    summary = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/attempt": "1"}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": dict(
            zip(("reason", "message"), back_off))}}]}})
    assert summary["stuck"] == {"reason": "ImagePullBackOff", "message": back_off[1], "backOff": True}
    # Since Kubernetes 1.32 a back-off gives the last pull's error: that is its message, so a new cause shows.
    summary = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/attempt": "1"}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": 'Back-off pulling image "x": ErrImagePull: manifest unknown'}}}]}})
    assert summary["stuck"] == {"reason": "ImagePullBackOff", "message": "manifest unknown"}


def test_a_back_off_keeps_only_the_same_pods_pull_error() -> None:
    """In a gang, worker 0's pull error stayed on Running=False while worker 1 waited in its back-off, after worker 0
    had pulled its image: the message named a pod that was no longer stuck."""
    status: dict[str, Any] = {"attempts": 1, "startTime": "2026-12-01T11:59:00Z"}
    pending = pod(phase="Pending")
    denied = pod(phase="Pending", stuck={"reason": "ImagePullBackOff", "message": "pull access denied for x"})
    waits = pod(index=1, phase="Pending", stuck={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"',
                                                 "backOff": True})
    said = []
    for i, pods in enumerate([[denied, waits], [pending, waits]]):
        status = after(decide(Observed(body(status, runtime=EXAMPLE["spec"]["runtime"] | {"workers": 2}),
                                       [job(workers=2)], pods,
                                       NOW + timedelta(seconds=10 * i))), status)
        said.append(next(c["message"] for c in status["conditions"] if c["type"] == "Running"))
    assert said == ["pod ft-1-0-x: pull access denied for x", 'pod ft-1-1-x: Back-off pulling image "x"']


def test_a_worker_whose_volumes_do_not_mount_waits_visibly_and_is_no_failure() -> None:
    # Scheduled at 11:59; its containers are still being created: the kubelet has yet to mount the volumes.
    creating = outcome.pod_summary({
        "metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/job-uid": "u",
                                                    "finetune.dev/attempt": "1"},
                     "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T11:59:00Z"},
            {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-12-01T11:59:00Z"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": "2026-12-01T11:59:00Z"}],
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "started": False, "image": "t:1",
                                   "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}})

    def warning(reason: str, message: str, component: str, last: str, kind: str = "Warning") -> dict[str, Any]:
        return {"metadata": {"name": f"ft-1-0-x.{reason}", "namespace": "ns", "creationTimestamp": "2026-12-01T11:59:01Z"},
                "involvedObject": {"kind": "Pod", "namespace": "ns", "name": "ft-1-0-x", "apiVersion": "v1"},
                "reason": reason, "message": message, "source": {"component": component}, "type": kind,
                "firstTimestamp": "2026-12-01T11:59:01Z", "lastTimestamp": last, "count": 3}

    multi_attach = ('Multi-Attach error for volume "pvc-3f2a" Volume is already exclusively attached to one node and '
                    "can't be attached to another")
    attach = [warning("FailedScheduling", "0/3 nodes are available: 3 Insufficient cpu.", "default-scheduler",
                      "2026-12-01T11:58:30Z"),
              warning("FailedAttachVolume", multi_attach, "attachdetach-controller", "2026-12-01T12:00:30Z"),
              warning("FailedMount", "Unable to attach or mount volumes: unmounted volumes=[finetune-pvc-0], unattached "
                      "volumes=[finetune-pvc-0 finetune-config]: timed out waiting for the condition", "kubelet",
                      "2026-12-01T12:01:01Z")]
    missing = [warning("FailedMount", 'MountVolume.SetUp failed for volume "creds" : secret "creds" not found',
                       "kubelet", "2026-12-01T12:01:00Z")]
    running = {"attempts": 1, "startTime": "2026-12-01T11:58:00Z", "failures": 0}

    def seen(events: list[dict[str, Any]], at: datetime, status: dict[str, Any]) -> Observed:
        observed = Observed(body(status, backoffLimit=0), [job()], [creating], at)
        observed.pod_warning = pod_warning(observed, lambda name: outcome.warnings_of(events, outcome.POD_EVENTS)
                                           .get(name, {}))
        return observed

    # Over: the attach went through (and nothing failed after it), or the kubelet pulls the image, which it does once
    # the volumes are mounted: minutes pulling a large image after a moment's Multi-Attach are no stuck volume.
    attached = [attach[1], warning("SuccessfulAttachVolume", 'AttachVolume.Attach succeeded for volume "pvc-3f2a"',
                                   "attachdetach-controller", "2026-12-01T12:00:40Z", "Normal")]
    pulling = [*attach, warning("Pulling", 'Pulling image "t:1"', "kubelet", "2026-12-01T12:01:05Z", "Normal")]
    for over in (attached, pulling):
        assert seen(over, NOW + timedelta(minutes=5), running).pod_warning is None

    # A minute in: pulling a large image looks the same, so its Events are not read yet.
    unread = Observed(body(running), [job()], [creating], NOW)
    assert pod_warning(unread, lambda name: pytest.fail("read Events too early")) is None
    assert pod_warning(seen(attach, NOW + timedelta(minutes=2), running), lambda name: {}) is None  # a long pull
    for events, reason, says in ((attach, "FailedAttachVolume", multi_attach),
                                 (missing, "FailedMount", 'secret "creds" not found')):
        decision = decide(seen(events, NOW + timedelta(minutes=2), running))
        status = after(decision, running)
        assert status["phase"] == "Pending" and status["reason"] == reason
        assert conditions(status)["Running"] == ("False", reason) and conditions(status)["Scheduled"][0] == "True"
        message = next(c["message"] for c in status["conditions"] if c["type"] == "Running")
        assert says in message and "ft-1-0-x" in message and "not counted as a failure" in message
        assert [e for e in decision.events if e[1] == reason] == [("Warning", reason, message)]
        # Still there a day later: it waits, says so once, and counts no failure (backoffLimit 0).
        later = decide(seen(events, NOW + timedelta(days=1), status))
        assert not [e for e in later.events if e[1] == reason] and later.create_attempt is None
        waited = after(later, status)
        assert waited["phase"] == "Pending" and waited["failures"] == 0 and "Restarting" not in conditions(waited)
    # The user created the Secret: the container starts.
    started = after(decide(Observed(body(status), [job(ready=1)], [pod()], NOW + timedelta(days=1))), status)
    assert started["phase"] == "Running"


def test_a_pod_with_init_containers_says_what_holds_it() -> None:
    """With an init container (a mesh's istio-init, vault-agent-init, a native sidecar) the kubelet says the trainer
    waits in PodInitializing, not ContainerCreating: an init container's bad image, or a volume that did not mount,
    left the job Pending with no reason, for ever."""
    def raw(init_waiting: dict[str, Any], initialized: str = "False") -> dict[str, Any]:
        return {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/job-name": "ft", "finetune.dev/job-uid": "u",
                                                            "finetune.dev/attempt": "1"},
                             "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                "status": {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T11:59:00Z"},
                    {"type": "Initialized", "status": initialized, "lastTransitionTime": "2026-12-01T11:59:00Z"}],
                    "initContainerStatuses": [{"name": "istio-init", "state": {"waiting": init_waiting}}],
                    "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}]}}

    pulled = raw({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "mesh/proxy:1": ErrImagePull: '
                  "pull access denied"})
    summary = outcome.pod_summary(pulled)
    assert summary["stuck"] == {"reason": "ImagePullBackOff", "message": "init container istio-init: pull access denied"}
    status = after(decide(Observed(body({"attempts": 1}), [job()], [summary], NOW)))
    assert status["phase"] == "Pending" and conditions(status)["Running"] == ("False", "ImagePullBackOff")
    # Its volumes not mounted, no init container has started: the wait is read as a trainer's in ContainerCreating
    mounting = outcome.pod_summary(raw({"reason": "PodInitializing"}))
    assert mounting["stuck"] is None and mounting["creating"] == "2026-12-01T11:59:00Z"
    missing = {"FailedMount": ("2026-12-01T12:01:00Z", 'MountVolume.SetUp failed for volume "creds" : secret "creds" '
                               "not found")}
    observed = Observed(body({"attempts": 1, "startTime": "2026-12-01T11:58:00Z"}), [job()], [mounting],
                        NOW + timedelta(minutes=5))
    assert pod_warning(observed, lambda name: missing) == (
        "FailedMount", 'pod ft-1-0-x waits (not counted as a failure): MountVolume.SetUp failed for volume "creds" : '
        'secret "creds" not found')
    # Initialized, the trainer's PodInitializing is a moment before it is created: nothing to wait on
    assert outcome.pod_summary(raw({}, initialized="True"))["creating"] is None
    # A native sidecar (an init container that restarts) crash-looping beside a trainer that runs holds nothing
    running = raw({"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"},
                  initialized="True")
    running["status"] |= {"phase": "Running", "podIP": "10.0.0.1",
                          "containerStatuses": [{"name": "trainer", "ready": True, "state": {"running": {}}}]}
    summary = outcome.pod_summary(running)
    assert summary["stuck"] is None
    status = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [summary], NOW)))
    assert status["phase"] == "Running"


def test_pod_summary_keeps_only_waiting_reasons_the_user_must_fix() -> None:
    def waiting(reason: str) -> dict[str, Any]:
        return {"metadata": {"name": "p", "labels": {}}, "status": {"phase": "Pending", "containerStatuses": [
            {"name": "trainer", "state": {"waiting": {"reason": reason, "message": "why"}}}]}}
    assert outcome.pod_summary(waiting("CreateContainerConfigError"))["stuck"] == {
        "reason": "CreateContainerConfigError", "message": "why"}
    assert outcome.pod_summary(waiting("ContainerCreating"))["stuck"] is None


def test_a_termination_message_nested_past_the_json_parsers_depth_is_no_message() -> None:
    """A container's termination message is its image's to write (4 KB kept by the kubelet): 1000 nested brackets
    raised RecursionError out of the pod's summary, and kopf, which never retries an indexing error, logged it and
    left the pod out of its index for good."""
    for text in ("[" * 4096, "[" * 1500 + "]" * 1500):  # cut by the kubelet, or whole
        pod = {"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}}, "status": {
            "phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 1, "reason": "Error", "message": text}}}]}}
        assert outcome.pod_summary(pod)["terminated"] | {"finishedAt": ""} == {
            "exitCode": 1, "reason": "Error", "finishedAt": "", "message": {}, "logEnd": None}


def test_the_spec_cache_keeps_the_facts_decide_reads_not_the_parsed_spec() -> None:
    from finetune_operator import api, reconcile

    first = body()
    spec, invalid = reconcile.parse_spec(first)
    facts, again = reconcile.spec_facts(first), reconcile.spec_facts(first)
    assert spec is not None and not invalid and facts == (reconcile.SpecFacts.of(spec), [])
    assert again[0] is facts[0]  # from the cache
    assert facts[0].global_batch == reconcile.global_batch(spec) and facts[0].output_uri == spec.output.uri
    assert not any(isinstance(v, api.FineTuneJobSpec) for kept in reconcile._facts.values() for v in kept)
    changed = body(backoffLimit=-1)
    same_generation = {**changed, "metadata": first["metadata"]}
    assert reconcile.spec_facts(same_generation)[0] is facts[0]  # the key is (uid, generation), not the text
    broken, errors = reconcile.spec_facts(changed)
    assert broken is None and errors == reconcile.parse_spec(changed)[1] != []


def test_a_resumed_attempt_past_its_new_total_steps_keeps_a_status_the_apiserver_takes() -> None:
    """Retuned while suspended (maxSteps 1000 to 500, or more workers: fewer steps an epoch), the resumed attempt
    reports step 800 of 500, and an ETA of -300 steps got every status patch refused whole (etaSeconds >= 0)."""
    from finetune_operator import api

    sample = {"step": 800, "total_steps": 500, "samples_per_second": 32.0, "stage": "Training"}
    status = after(decide(Observed(body({"attempts": 2}), [job(2)], [pod(2)], NOW, sample=sample)))
    assert status["progress"]["percent"] == 100 and status["progress"]["etaSeconds"] == 0
    api.FineTuneJobStatus.model_validate(status)


def test_a_running_attempt_whose_spec_this_operator_cannot_read_is_stopped_with_the_job() -> None:
    """After a rollback the operator may find a field of a later version under a running attempt: the job fails
    InvalidSpec, is never reconciled again, and its workers held their GPUs to the end, unwatched."""
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    later = body(running)
    later["spec"] = later["spec"] | {"fromTheFuture": {"x": 1}}
    decision = decide(Observed(later, [job()], [pod()], NOW + timedelta(seconds=2)))
    failed = after(decision, running)
    assert failed["reason"] == "InvalidSpec" and decision.delete_job == "ft-1" and failed["workers"]["active"] == 0
    # A Job that ended, or is going already, is left alone.
    for ended in (job(active=0, failed=1, failure={"reason": "X", "message": ""}), job(deleting="2026-12-01T12:00:30Z")):
        assert decide(Observed(later, [ended], [pod()], NOW)).delete_job is None


def test_a_spec_edited_after_the_job_finished_is_observed_once_and_the_job_ticks_no_more() -> None:
    """A GitOps repository that raised a finished job's backoffLimit (or ttlSecondsAfterFinished) raised its
    generation, and observedGeneration stayed behind for ever: Flux's health check (kstatus) called the job
    InProgress, and the Kustomization never became Ready."""
    from finetune_operator.handlers import ticks_every_poll, ticks_slowly

    done = {"observedGeneration": 3, "phase": "Succeeded", "completionTime": "2026-12-01T11:59:30Z",
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "",
                            "lastTransitionTime": "2026-12-01T11:59:00Z", "observedGeneration": 3}]}
    edited = body(done, backoffLimit=5)
    edited["metadata"]["generation"] = 1_000_004  # past done's 3, and no other test body's (spec_facts' cache key)
    assert ticks_slowly(spec=edited["spec"], status=done, meta=edited["metadata"])
    assert not ticks_every_poll(spec=edited["spec"], status=done, meta=edited["metadata"])
    decision = decide(Observed(edited, [], [], NOW))
    observed = after(decision, done)
    assert observed == done | {"observedGeneration": 1_000_004} and not decision.delete_self and not decision.events
    # Seen: a finished job without a TTL costs no reconciles again.
    assert not ticks_slowly(spec=edited["spec"], status=observed, meta=edited["metadata"])


def succeeded_once() -> tuple[dict[str, Any], dict[str, Any]]:
    """The Job (its summary) of a job whose attempt 1 succeeded, and the job's status."""
    from finetune_operator import children, reconcile

    first = body()
    made = job(active=0, succeeded=1, complete=True, generation=first["metadata"]["generation"],
               recipe=children.recipe(reconcile.parse_spec(first)[0]))
    done = {"attempts": 1, "observedGeneration": first["metadata"]["generation"], "phase": "Succeeded",
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "",
                            "lastTransitionTime": "2026-12-01T11:59:00Z"}], "completionTime": "2026-12-01T11:59:30Z"}
    return made, done


def test_a_finished_job_retuned_says_once_that_nothing_runs_it_again() -> None:
    """Refused a plain edit with "may change only while the job is suspended", a user suspends the finished job and
    retunes it: the apiserver takes it, observedGeneration follows, and nothing ran or said anything."""
    made, done = succeeded_once()
    retuned = body(done, suspend=True, training=EXAMPLE["spec"]["training"] | {"epochs": 5})
    decision = decide(Observed(retuned, [made], [], NOW))
    assert [e[:2] for e in decision.events] == [("Warning", "SpecChangeIgnored")]
    assert "succeeded" in decision.events[0][2]
    assert after(decision, done)["phase"] == "Succeeded" and decision.create_attempt is None
    seen = after(decision, done)  # observed: not said again at the next tick (a TTL keeps it ticking)
    assert not decide(Observed(body(seen, suspend=True, training=EXAMPLE["spec"]["training"] | {"epochs": 5})
                               | {"metadata": retuned["metadata"]}, [made], [], NOW)).events
    assert not decide(Observed(body(done, ttlSecondsAfterFinished=60), [made], [], NOW)).events  # a lifecycle field
    # Failed before it had a Job (a regex that does not compile): suspending it, to fix the regex, is told too.
    invalid = {"attempts": 0, "observedGeneration": 1, "phase": "Failed",
               "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": "",
                               "lastTransitionTime": "2026-12-01T11:59:00Z"}], "completionTime": "2026-12-01T11:59:00Z"}
    suspended = decide(Observed(body(invalid, suspend=True), [], [], NOW))
    assert [e[:2] for e in suspended.events] == [("Warning", "SpecChangeIgnored")]
    assert "failed" in suspended.events[0][2]


def test_a_finished_job_tells_each_ignored_change_once_not_at_every_later_edit() -> None:
    """Told by comparing the spec with its Job's, a finished job retuned once said SpecChangeIgnored again at every
    later edit of the spec (a TTL set to have it deleted), though that edit changed nothing more that was ignored."""
    made, status = succeeded_once()
    told = []
    def retuned(epochs: int, **lifecycle: Any) -> dict[str, Any]:
        return {"suspend": True, "training": EXAMPLE["spec"]["training"] | {"epochs": epochs}} | lifecycle

    for spec in (retuned(5), retuned(5, ttlSecondsAfterFinished=600), retuned(6, ttlSecondsAfterFinished=600),
                 retuned(6, ttlSecondsAfterFinished=60),
                 {"ttlSecondsAfterFinished": 60},  # undone: nothing is ignored any more
                 retuned(6, ttlSecondsAfterFinished=60)):
        decision = decide(Observed(body(status, **spec), [made], [], NOW))
        status = after(decision, status)
        told.append([e[1] for e in decision.events])
    assert told == [["SpecChangeIgnored"], [], ["SpecChangeIgnored"], [], [], ["SpecChangeIgnored"]]
    assert status["phase"] == "Succeeded"


def test_a_job_suspended_between_attempts_is_not_restarting_and_waits_quietly() -> None:
    """Suspended just after attempt 1 failed, a job kept Restarting True ("attempt 2 resumes from the latest
    checkpoint") for as long as it stayed suspended, and was reconciled every poll as a restarting job is."""
    from finetune_operator.handlers import ticks_every_poll, ticks_slowly

    crashed = ([job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
               [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])
    retrying = after(decide(Observed(body({"attempts": 1}), *crashed, NOW)))
    assert conditions(retrying)["Restarting"] == ("True", "NcclError")
    suspended_body = body(retrying, suspend=True)
    suspended = after(decide(Observed(suspended_body, *crashed, NOW)), retrying)
    assert suspended["phase"] == "Suspended" and conditions(suspended)["Restarting"] == ("False", "Suspended")
    meta = suspended_body["metadata"]
    assert ticks_slowly(spec=suspended_body["spec"], status=suspended, meta=meta)
    assert not ticks_every_poll(spec=suspended_body["spec"], status=suspended, meta=meta)
    resumed = after(decide(Observed(body(suspended), *crashed, NOW + timedelta(minutes=1))), suspended)
    assert resumed["phase"] == "Pending" and resumed["attempts"] == 2


def test_a_child_job_deleted_by_hand_ends_its_attempt_and_the_next_one_is_not_confused_by_its_pods() -> None:
    """`kubectl delete job ft-1` of a hung attempt: the operator made ft-1 again, whose first look at the attempt's
    pods found the old ones Failed (exit 143, still being deleted), counted that as its failure and left the new
    ft-1 running beside attempt 2, which waited for it to finish."""
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    stopped = pod(phase="Failed", exit_code=143, message={"exitCode": 143, "reason": "Terminated", "message": "SIGTERM"},
                  deletionTimestamp="2026-12-01T12:00:30Z")
    gone = decide(Observed(body(running), [], [stopped], NOW + timedelta(seconds=40)))
    status = after(gone, running)
    assert gone.create_attempt is None and status["attempts"] == 2 and not status.get("failures")
    assert status["phase"] == "Pending" and conditions(status)["Restarting"] == ("True", "JobDeleted")
    assert decide(Observed(body(status), [], [stopped], NOW + timedelta(seconds=42))).create_attempt == 2
    created = after(decide(Observed(body(status), [], [stopped], NOW + timedelta(seconds=42))), status)
    starting = after(decide(Observed(body(created), [job(2)], [stopped, pod(2, phase="Pending")], NOW + timedelta(
        seconds=44))), created)
    assert starting["attempts"] == 2 and not starting.get("failures") and starting["phase"] == "Pending"


def test_a_child_job_deleted_by_hand_leaving_its_pods_ends_its_attempt_and_the_next_waits_for_them_visibly() -> None:
    """`kubectl delete job ft-1 --cascade=orphan`: its pods ran on, the job stayed Running, and when they ended, ft-1
    was made again under the same number, the orphans' end dropped and two Jobs' pods labelled attempt 1."""
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    orphan = outcome.pod_summary({"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
                                  "status": {"phase": "Running"}})  # no ownerReference: the GC took the Job's away
    gone = decide(Observed(body(running), [], [orphan], NOW + timedelta(seconds=10), listed=True))
    status = after(gone, running)
    assert gone.create_attempt is None and status["attempts"] == 2 and not status.get("failures")
    assert status["phase"] == "Pending" and conditions(status)["Restarting"] == ("True", "JobDeleted")
    waiting = decide(Observed(body(status), [], [orphan], NOW + timedelta(seconds=12)))
    held = after(waiting, status)
    assert waiting.create_attempt is None and held["reason"] == "PodsStopping"
    assert "ft-1-0-x belong to no Job" in dict((c["type"], c["message"]) for c in held["conditions"])["Created"]
    assert [e[:2] for e in waiting.events] == [("Warning", "PodsStopping")]
    # Deleted by hand, the orphans take their grace period: "delete them to go on" stayed until they ended
    deleted = dict(orphan, deletionTimestamp="2026-12-01T12:00:14Z")
    deleting = decide(Observed(body(held), [], [deleted], NOW + timedelta(seconds=16)))
    told = dict((c["type"], c["message"]) for c in after(deleting, held)["conditions"])["Created"]
    assert deleting.create_attempt is None and "(ft-1-0-x)" in told and "no Job" not in told and not deleting.events
    # A pod of a Job deleted in the background keeps its ownerReference until the garbage collector deletes it: not
    # an orphan
    collected = decide(Observed(body(status), [], [pod()], NOW + timedelta(seconds=12)))
    told = dict((c["type"], c["message"]) for c in after(collected, status)["conditions"])["Created"]
    assert collected.create_attempt is None and "(ft-1-0-x)" in told and "no Job" not in told
    ended = dict(orphan, phase="Succeeded")
    assert decide(Observed(body(held), [], [ended], NOW + timedelta(seconds=20))).create_attempt == 2


def test_a_made_attempt_whose_job_is_not_indexed_waits_for_a_list_that_succeeds() -> None:
    """The apiserver's list failed (`_listed` kept the indexes'): a Job gone from the index could not be told deleted,
    so attempt 1's orphans were named as "the attempt before it" to delete by hand, with a Warning, and once they had
    ended, attempt 1 was made again under its number."""
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    orphan = outcome.pod_summary({"metadata": {"name": "ft-1-0-x", "labels": {"finetune.dev/attempt": "1"}},
                                  "status": {"phase": "Running"}})
    for pods in ([orphan], [dict(orphan, phase="Succeeded")]):
        unlisted = decide(Observed(body(running), [], pods, NOW + timedelta(seconds=10)))
        waiting = after(unlisted, running)
        assert unlisted.create_attempt is None and not unlisted.events
        assert waiting["attempts"] == 1 and waiting["conditions"] == running["conditions"]
        listed = after(decide(Observed(body(running), [], pods, NOW + timedelta(seconds=15), listed=True)), running)
        assert listed["attempts"] == 2 and conditions(listed)["Restarting"] == ("True", "JobDeleted")


def test_a_failed_list_that_a_decision_waits_for_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A made attempt whose Job the index lacks waits for a list that succeeds: a list failing on (a 429, 5xx) kept
    the job as it was with nothing said but a debug line. A list of pods alone, which nothing waits for, stays one."""
    from finetune_operator import handlers

    class Unlisting:
        def call(self, *args: object, **query: object) -> bytes:
            raise ApiException(status=429, reason="Too Many Requests")

    seen = Observed(body({"attempts": 1}), [], [], NOW)
    assert handlers._listed(Unlisting(), seen, "ns", "ft", jobs=False) is seen
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert handlers._listed(Unlisting(), seen, "ns", "ft", jobs=True) is seen
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("ns/ft: children not listed ((429)")


def test_an_end_seen_late_keeps_the_jobs_own_completion_time() -> None:
    """Seen after an operator outage (a crash loop, a `helm upgrade` pulling its new image), the end was the Job's:
    completionTime said when the operator came back, and the TTL counted from then."""
    def child(kind: str, reason: str) -> dict[str, Any]:
        return outcome.job_summary({"metadata": {"name": "ft-1", "labels": {outcome.ATTEMPT_LABEL: "1"}}, "status": {
            "conditions": [{"type": kind, "status": "True", "reason": reason,
                            "lastTransitionTime": "2026-12-01T10:00:00Z"}]}})
    message = {"stage": "Done", "exitCode": 0}
    done = after(decide(Observed(body({"attempts": 1}), [child("Complete", "")],
                                 [pod(phase="Succeeded", exit_code=0, message=message)], NOW)))
    assert done["phase"] == "Succeeded" and done["completionTime"] == "2026-12-01T10:00:00Z"
    message = {"stage": "Loading", "reason": "InvalidDataset", "message": "x", "exitCode": 1}
    failed = after(decide(Observed(body({"attempts": 1}), [child("Failed", "BackoffLimitExceeded")],
                                   [pod(phase="Failed", exit_code=1, message=message)], NOW)))
    assert failed["phase"] == "Failed" and failed["completionTime"] == "2026-12-01T10:00:00Z"


def test_the_eval_summary_keeps_three_figures_of_a_small_or_a_large_metric() -> None:
    """A detector's first mAPs (0.0004, then 0.0009) read "map 0.000→0.001" in kubectl's Eval column, and a perplexity
    of 1e30 took 35 characters."""
    result = {"evaluation": {"baseline": {"map": 0.00043, "perplexity": 1e30}, "final": {"map": 0.00092,
                                                                                          "perplexity": 16953.2}}}
    assert evaluation_of(result)["summary"] == "map 0.00043→0.00092, perplexity 1e+30→16953.200"


def test_an_attempt_whose_creation_the_status_never_recorded_is_created_when_next_seen() -> None:
    """The operator killed between making the children and patching the status: the next tick finds the Job. Created
    stayed absent (no AttemptCreated Event), or False with the quota that had held the attempt back, while it ran."""
    for before in ({}, after(decide(Observed(body(), [], [], NOW, held_back=("ExceededQuota", "exceeded quota"))))):
        seen = decide(Observed(body(before), [job(1)], [pod(1, phase="Pending", scheduled=False)], NOW))
        status = after(seen, before)
        assert conditions(status)["Created"] == ("True", "AttemptCreated") and status["reason"] != "ExceededQuota"
        assert ("Normal", "AttemptCreated", "attempt 1: 1 worker(s)") in seen.events


def test_an_admission_seen_late_starts_the_deadline_when_the_job_started() -> None:
    """Kueue admitted the attempt while the operator was down: the deadline counted from when the operator came back,
    so the job ran past activeDeadlineSeconds by the outage."""
    queued = {"attempts": 1, "startTime": None, "conditions": [{"type": "Scheduled", "status": "False",
                                                                   "reason": "Queued", "message": "",
                                                                   "lastTransitionTime": "2026-12-01T11:00:00Z"}]}
    admitted = outcome.job_summary({"metadata": {"name": "ft-1", "labels": {outcome.ATTEMPT_LABEL: "1"}},
                                    "status": {"startTime": "2026-12-01T11:30:00Z", "active": 1}})
    late = decide(Observed(body(queued, activeDeadlineSeconds=600), [admitted], [pod()], NOW))
    assert after(late, queued)["reason"] == "DeadlineExceeded" and late.delete_job == "ft-1"


def test_an_end_seen_before_its_pods_waits_for_rank_0s_termination_message() -> None:
    """The Jobs and the pods come on separate watch streams, the pods' far the busier (every status change of every
    trainer pod, a relist after a dropped stream): a Job seen Complete while its rank 0 still looked Running made the
    job Succeeded without the termination message, its evaluation and final metrics lost for good (a finished job is
    never reconciled again)."""
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW,
                                    sample={"step": 90, "total_steps": 96, "loss": 1.2})))
    complete = job(complete=True, active=0, succeeded=1, ended="2026-12-01T12:00:10Z")
    seen_early = decide(Observed(body(running), [complete], [pod()], NOW + timedelta(seconds=11)))
    assert after(seen_early, running)["phase"] == "Running" and "evaluation" not in after(seen_early, running)
    ended = pod(phase="Succeeded", exit_code=0, message=EARLY_STOPPED)
    done = after(decide(Observed(body(running), [complete], [ended], NOW + timedelta(seconds=12))), running)
    assert done["phase"] == "Succeeded" and done["evaluation"]["final"]["accuracy"] == 0.390625
    assert done["completionTime"] == "2026-12-01T12:00:10Z"
    # A pod stream that does not catch up holds the end only a while: the job succeeds without the message.
    late = after(decide(Observed(body(running), [complete], [pod()], NOW + timedelta(minutes=2))), running)
    assert late["phase"] == "Succeeded" and late["progress"]["step"] == 96
    # Rank 0 not in the index at all (the pod stream behind a short attempt): waited for as well.
    unseen = after(decide(Observed(body(running), [complete], [], NOW + timedelta(seconds=11))), running)
    assert unseen["phase"] == "Running" and "evaluation" not in unseen


def test_a_failure_seen_before_its_pods_waits_for_the_exit_that_says_why() -> None:
    """A Job seen Failed while its pods still looked Running was judged with no exit code: a trainer's exit 1 (a
    missing dataset, never retried) was counted against backoffLimit and retried as an infrastructure failure."""
    running = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z"}
    failed = job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": "Job has reached the "
                 "specified backoff limit"}, ended="2026-12-01T12:00:00Z")
    seen_early = decide(Observed(body(running), [failed], [pod()], NOW + timedelta(seconds=1)))
    status = after(seen_early, running)
    assert status["attempts"] == 1 and not status.get("failures") and "Restarting" not in conditions(status)
    user_error = pod(phase="Failed", exit_code=1, message={"exitCode": 1, "reason": "DatasetNotFound", "message": "x"})
    judged = after(decide(Observed(body(running), [failed], [user_error], NOW + timedelta(seconds=2))), running)
    assert judged["phase"] == "Failed" and judged["reason"] == "DatasetNotFound"
    # A disruption needs no exit to be told, and a pod stream that does not catch up holds the end only a while.
    disrupted = dict(failed, failure={"reason": "PodFailurePolicy", "message": "Pod ns/ft-1-0-x has condition "
                                      "DisruptionTarget matching FailJob rule at index 0"})
    freed = after(decide(Observed(body(running), [disrupted], [pod()], NOW + timedelta(seconds=1))), running)
    assert freed["attempts"] == 2 and not freed.get("failures")
    late = after(decide(Observed(body(running), [failed], [pod()], NOW + timedelta(minutes=2))), running)
    assert late["attempts"] == 2 and late["failures"] == 1
    # No pod of the attempt in the index at all (a short attempt, the pod stream behind): waited for as well, and
    # counted once the wait is over.
    unseen = after(decide(Observed(body(running), [failed], [], NOW + timedelta(seconds=1))), running)
    assert unseen["attempts"] == 1 and not unseen.get("failures")
    assert after(decide(Observed(body(running), [failed], [user_error], NOW + timedelta(seconds=2))),
                 running)["reason"] == "DatasetNotFound"
    gave_up = after(decide(Observed(body(running), [failed], [], NOW + timedelta(seconds=31))), running)
    assert gave_up["attempts"] == 2 and gave_up["failures"] == 1


def test_a_child_job_deleted_by_hand_in_the_foreground_ends_its_attempt_uncounted_too() -> None:
    """`kubectl delete job ft-1 --cascade=foreground` (or a Job another controller's finalizer holds): the Job stays,
    deleting, until its pods are gone, and their exit 143 on the SIGTERM was counted as the attempt's failure; with
    backoffLimit 0 the job failed, where a background delete of the same Job restarts it for free."""
    running = after(decide(Observed(body({"attempts": 1}), [job()], [pod()], NOW)))
    stopped = pod(phase="Failed", exit_code=143, message={"exitCode": 143, "reason": "Terminated", "message": "SIGTERM"},
                  deletionTimestamp="2026-12-01T12:00:30Z")
    # Seen before, then after, the Job controller fails the deleting Job on that exit (backoffLimit 0); under torchrun
    # (a gang, or processes per worker) the container exits 1 on the SIGTERM and the trainer's message says 143.
    backoff = {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
    deleted = {"deleting": "2026-12-01T12:00:30Z"}
    failed = job(active=0, failed=1, ended="2026-12-01T12:00:35Z", failure=backoff, **deleted)
    torchrun = pod(phase="Failed", exit_code=1, message={"exitCode": 143, "reason": "Terminated", "message": "SIGTERM"},
                   deletionTimestamp="2026-12-01T12:00:30Z")
    for deleting, stopping in ((job(**deleted), stopped), (failed, stopped), (failed, torchrun)):
        gone = decide(Observed(body(running, backoffLimit=0), [deleting], [stopping], NOW + timedelta(seconds=40)))
        status = after(gone, running)
        assert status["attempts"] == 2 and not status.get("failures") and status["phase"] == "Pending", deleting
        assert conditions(status)["Restarting"] == ("True", "JobDeleted")
    # Seen once its pods are gone (they go first) and the Job not yet: the same delete, not a worker's failure, once
    # the apiserver's list says so; until then (pods late to the index, maybe still checkpointing) nothing is judged.
    for deleting in (job(**deleted), failed):
        seen = Observed(body(running, backoffLimit=0), [deleting], [], NOW + timedelta(seconds=40))
        assert reconcile.waits_on_jobs(seen)
        unsure = after(decide(seen), running)
        assert unsure["attempts"] == 1 and not unsure.get("failures") and "Restarting" not in conditions(unsure)
        seen.listed = True
        status = after(decide(seen), running)
        assert status["attempts"] == 2 and not status.get("failures") and status["phase"] == "Pending", deleting
        assert conditions(status)["Restarting"] == ("True", "JobDeleted")
    # The next tick, its pods still late to the index: they are listed before attempt 2 is made beside them.
    later = Observed(body(status, backoffLimit=0), [job(**deleted)], [], NOW + timedelta(seconds=42))
    assert reconcile.waits_on_pods(later)
    # Deleted in the background (kubectl's default), the Job is gone at once: its pods are listed all the same.
    assert reconcile.waits_on_pods(Observed(body(status, backoffLimit=0), [], [], NOW + timedelta(seconds=42)))
    checkpointing = pod(deletionTimestamp="2026-12-01T12:05:30Z")  # as the apiserver lists it, in its grace period
    assert decide(Observed(body(status, backoffLimit=0), [job(**deleted)], [checkpointing], NOW + timedelta(seconds=42),
                           listed=True)).create_attempt is None
    # A worker that failed by itself before the delete still says why: its exit 1 is the attempt's end; and where its
    # pod, counted, went at once with the delete, leaving its peers' 143, the attempt failed all the same (counted).
    before = job(active=0, failed=1, ended="2026-12-01T12:00:20Z", failure=backoff, **deleted)
    user_error = pod(phase="Failed", exit_code=1, message={"exitCode": 1, "reason": "ConfigError", "message": "bad"},
                     deletionTimestamp="2026-12-01T12:00:30Z")
    judged = after(decide(Observed(body(running, backoffLimit=0), [before], [user_error], NOW + timedelta(seconds=40))),
                   running)
    assert judged["phase"] == "Failed" and judged["reason"] == "ConfigError"
    peers_only = after(decide(Observed(body(running, backoffLimit=0), [before], [stopped], NOW + timedelta(seconds=40))),
                       running)
    assert peers_only["phase"] == "Failed" and peers_only["failures"] == 1
    # The Job controller decides the failure at the worker's exit (FailureTarget) and adds Failed only once its peers
    # have checkpointed and exited, after a delete that came in between: the worker's own failure all the same.
    raw = {"metadata": {"name": "ft-1", "labels": {"finetune.dev/attempt": "1"},
                        "deletionTimestamp": deleted["deleting"]},
           "status": {"failed": 2, "conditions": [
               {"type": "FailureTarget", "status": "True", **backoff, "lastTransitionTime": "2026-12-01T12:00:10Z"},
               {"type": "Failed", "status": "True", **backoff, "lastTransitionTime": "2026-12-01T12:00:41Z"}]}}
    decided = outcome.job_summary(raw)
    assert decided["decided"] == "2026-12-01T12:00:10Z" and decided["ended"] == "2026-12-01T12:00:41Z"
    judged = after(decide(Observed(body(running, backoffLimit=0), [decided], [user_error, stopped | {"index": 1, "name": "ft-1-1-x"}],
                                   NOW + timedelta(seconds=45))), running)
    assert judged["phase"] == "Failed" and judged["reason"] == "ConfigError"


def test_an_attempt_whose_config_map_holds_an_earlier_spec_gives_way_to_the_next() -> None:
    """Attempt 1's ConfigMap, made before a quota held its Job back, holds the spec as it was before a suspend, a retune
    and a resume: made beside it, the Job ran the old recipe. The next number gets children of the spec, uncounted."""
    suspended = {"attempts": 1, "startTime": "2026-12-01T11:00:00Z",
                 "conditions": [{"type": "Created", "status": "False", "reason": "ExceededQuota", "message": "",
                                 "lastTransitionTime": "2026-12-01T11:00:00Z"}]}
    stale = "attempt 1's ConfigMap ft-1 was made from an earlier spec"
    decision = decide(Observed(body(suspended), [], [], NOW, stale=stale))
    status = after(decision, suspended)
    assert decision.create_attempt is None and status["attempts"] == 2 and not status.get("failures")
    assert conditions(status)["Restarting"] == ("True", "Resumed") and "children" not in status
    assert decision.delete_job == "ft-1"  # made beside that ConfigMap, unseen yet (a watch behind), it ran the old recipe
    assert decide(Observed(body(status), [], [], NOW + timedelta(seconds=2))).create_attempt == 2


def test_the_next_attempt_says_it_waits_for_the_pods_of_the_one_before_after_a_resume_or_a_free_retry() -> None:
    """Resumed, or evicted, while attempt 1's pods took a long grace period to checkpoint: the job said Pending with
    Created True "attempt 1: 1 worker(s)" beside attempts 2, and nothing said that attempt 2 waited for those pods."""
    def created(status: dict[str, Any]) -> tuple[str, str, str]:
        said = next(c for c in status["conditions"] if c["type"] == "Created")
        return said["status"], said["reason"], said["message"]

    stopping = timestamp(NOW + timedelta(minutes=10))  # a terminationGracePeriodSeconds of 10 minutes
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW)))
    suspended = after(decide(Observed(body(running, suspend=True), [job(ready=1)], [pod()], NOW)), running)
    deleting = [job(ready=1, deleting=timestamp(NOW))], [pod(deletionTimestamp=stopping)]
    resumed = after(decide(Observed(body(suspended), *deleting, NOW + timedelta(seconds=5))), suspended)
    assert resumed["attempts"] == 2
    held = after(decide(Observed(body(resumed), *deleting, NOW + timedelta(seconds=10))), resumed)
    assert created(held) == ("False", "PodsStopping", "attempt 2 waits for the pods of the attempt before it to stop "
                                                      "(ft-1-0-x): they may still write checkpoints")
    assert held["reason"] == "PodsStopping"
    # A free retry: rank 0 evicted, rank 1 still checkpointing on the Job controller's SIGTERM
    disrupted = ([job(failure=DISRUPTED_JOB)],
                 [pod(phase="Failed", exit_code=143, disrupted="EvictionByEvictionAPI"),
                  pod(index=1, deletionTimestamp=stopping)])
    retrying = after(decide(Observed(body(running), *disrupted, NOW)), running)
    assert retrying["attempts"] == 2 and not retrying.get("failures")
    held = after(decide(Observed(body(retrying), *disrupted, NOW + timedelta(seconds=5))), retrying)
    assert created(held)[:2] == ("False", "PodsStopping") and "(ft-1-1-x)" in created(held)[2]


def test_a_job_resumed_between_attempts_says_suspended_no_more() -> None:
    """Suspended after attempt 1 failed, before attempt 2 was made, then resumed: the suspend's Running=False stayed
    the job's reason, and `kubectl get` said Pending/Suspended beside Suspended=False until attempt 2's pods ran."""
    crashed = ([job(active=0, failed=1, failure={"reason": "BackoffLimitExceeded", "message": ""})],
               [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW - timedelta(minutes=1))))
    retrying = after(decide(Observed(body(running), *crashed, NOW)), running)
    suspended = after(decide(Observed(body(retrying, suspend=True), *crashed, NOW)), retrying)
    assert conditions(suspended)["Running"] == ("False", "Suspended")
    resumed = after(decide(Observed(body(suspended), *crashed, NOW + timedelta(minutes=1))), suspended)
    # A peer of attempt 1 still stopping: what the resumed attempt waits for, not "made at the next tick"
    peer = pod(index=1, deletionTimestamp=timestamp(NOW + timedelta(minutes=1)))
    held = after(decide(Observed(body(resumed), crashed[0], [*crashed[1], peer], NOW + timedelta(minutes=1, seconds=1))),
                 resumed)
    assert conditions(held)["Created"] == ("False", "PodsStopping") and held["reason"] == "PodsStopping"
    created = decide(Observed(body(resumed), *crashed, NOW + timedelta(minutes=1, seconds=2)))
    assert created.create_attempt == 2
    made = after(created, resumed)
    starting = after(decide(Observed(body(made), [job(2)], [pod(2, phase="Pending")], NOW + timedelta(minutes=2))),
                     made)
    for status in (resumed, made, starting):
        assert status["phase"] == "Pending" and status["reason"] != "Suspended", status
        assert conditions(status)["Running"] == ("False", "Resumed")


def test_an_attempt_over_counts_no_worker_through_the_back_off() -> None:
    """The Job's failure seen while its pods still stopped (active 1): WORKERS said 1 running through the back-off
    (up to 6 minutes), and while a deleted Job's orphans ran, until the next attempt's Job was seen."""
    failing = ([job(active=1, failure={"reason": "PodFailurePolicy", "message": ""})],
               [pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "NcclError", "message": "x"})])
    retrying = after(decide(Observed(body({"attempts": 1}), *failing, NOW)))
    assert retrying["attempts"] == 2 and retrying["workers"]["active"] == 0 and retrying["workers"]["ready"] == 0
    running = after(decide(Observed(body({"attempts": 1}), [job(ready=1)], [pod()], NOW)))
    assert running["workers"]["active"] == 1
    orphaned = after(decide(Observed(body(running), [], [pod()], NOW + timedelta(seconds=5), listed=True)), running)
    assert conditions(orphaned)["Restarting"] == ("True", "JobDeleted") and orphaned["workers"]["active"] == 0


def test_a_pending_reason_goes_once_its_cause_is_over() -> None:
    """A Secret made after its volume failed to mount, or a registry back after ImagePullBackOff: the job said
    Pending/FailedMount ("secret not found") while the image was pulled, minutes after the cause was over."""
    mounting = pod(phase="Pending")
    waiting = Observed(body({"attempts": 1, "startTime": "2026-12-01T11:58:00Z"}), [job()], [mounting], NOW)
    waiting.pod_warning = ("FailedMount", 'pod ft-1-0-x waits (not counted as a failure): MountVolume.SetUp failed '
                                          'for volume "creds" : secret "creds" not found')
    stuck = after(decide(waiting))
    assert stuck["phase"] == "Pending" and stuck["reason"] == "FailedMount"
    pulling = after(decide(Observed(body(stuck), [job()], [mounting], NOW + timedelta(minutes=1))), stuck)
    assert pulling["phase"] == "Pending" and conditions(pulling)["Running"] == ("False", "WorkersStarting")
    assert pulling["reason"] == "WorkersStarting"
