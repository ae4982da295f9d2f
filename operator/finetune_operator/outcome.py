"""Why an attempt is where it is: child Job and pods in, an `Outcome` out (pure).

The summaries below are what the operator's indexes keep of each Job and pod: small, so a
thousand jobs stay cheap, and enough to decide. The cause of a failure is read, in order of
trust, from: a kubelet's eviction of a pod for going past a limit of its own (ephemeral
storage, an emptyDir's sizeLimit) or, its node short of memory or disk, for the trainer
using more than it requests (counted, never a disruption), the Job's pod-failure policy
(a disruption fails the Job with a rule that says so, even after the pod is gone), the pods'
DisruptionTarget condition, the trainer's own `exitCode` in the termination message (under
torchrun the container exits 1 for any failure), then the container's exit code. Peers of a
failed worker end with 143; the cause is the earliest failure that is not 143.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from finetune_operator import api
from finetune_operator.children import (ATTEMPT_LABEL, GENERATION_ANNOTATION, JOB_UID_LABEL, RECIPE_ANNOTATION,
                                        SHM_VOLUME, TRAINER)
from finetune_trainer.errors import (DISTRIBUTED_FAILURE, EXIT_INFRASTRUCTURE, EXIT_OK, EXIT_TERMINATED,
                                     EXIT_USER_ERROR)

DISRUPTION_RULE = 0  # index of the podFailurePolicy rule that fails the Job on a DisruptionTarget condition
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


class Retry(StrEnum):
    NEVER = "Never"  # the job cannot succeed as written
    COUNTED = "Counted"  # infrastructure: counted against backoffLimit
    FREE = "Free"  # a disruption (eviction, preemption, node loss): not counted


class State(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Outcome:
    state: State
    reason: str = ""
    message: str = ""
    retry: Retry = Retry.NEVER
    result: dict[str, Any] = field(default_factory=dict)  # rank 0's termination message
    unschedulable: str | None = None  # the scheduler's message, or what holds the pods back from it (`reason` says)
    not_created: str | None = None  # why the Job controller could not create the pods
    stuck: bool = False  # a worker's container waits for something only the user can fix (an image, a volume)
    back_off: bool = False  # and its message says only that the kubelet waits to retry (BACK_OFF)
    queued: bool = False  # the Job is suspended by its queue (Kueue): not admitted yet, or preempted


# The kubelet evicts a pod that goes past a limit of its own (pkg/kubelet/eviction, localStorageEviction): the pod
# ends Failed with status.reason Evicted and one of these messages (helpers.go's containerEphemeralStorageMessageFmt,
# podEphemeralStorageMessageFmt, emptyDirMessageFmt), and without the DisruptionTarget condition, which KEP-3329 leaves
# to evictions the pod did not cause (a node-pressure eviction, "The node was low on resource: memory. ...", has it,
# reason TerminationByKubelet, and is a free retry unless it names the trainer: NODE_LOW). Only these exact messages
# are read: a node-pressure eviction with no condition (a kubelet before 1.26, or its PodDisruptionConditions off) that
# does not name the trainer is an ordinary failure, as before.
EVICTED = "Evicted"
SCHEDULING_GATED = "SchedulingGated"  # PodScheduled's reason while spec.schedulingGates holds a pod
DEFAULT_SCHEDULER = "default-scheduler"  # the scheduler of a pod that names none (the apiserver's default)
NO_SCHEDULER = "NoScheduler"  # no scheduler has spoken of a pod: the one it names is not running
QUEUED = "Queued"  # a Job its queue (Kueue) holds suspended until it admits it
ADMITTED = "Admitted"  # Running False once the queue admitted the Job, until its pods run
OWN_LIMIT_EVICTION = re.compile(
    r'Container (?P<container>\S+) exceeded its local ephemeral storage limit "(?P<limit>[^"]*)"\.'
    r'|Pod ephemeral local storage usage exceeds the total limit of containers (?P<total>\S+)\.'
    r'|Usage of EmptyDir volume "(?P<volume>[^"]*)" exceeds the limit "(?P<size>[^"]*)"\.')
STORAGE_LIMIT_EXCEEDED = "StorageLimitExceeded"
# A node-pressure eviction's message (helpers.go's evictionMessage): the resource the node is short of, then each
# container that uses more of it than it requests (its writable layer and logs, for ephemeral-storage; its working set,
# for memory), in the words of 1.27 on or of the kubelets before ("which exceeds its request of"). The kubelet evicts
# pods over their request first, and the pressure lifts once the pod is gone: the next attempt, on the same node, does
# the same (the model downloaded again, memory grown again), for ever as a free retry. One naming the trainer counts.
NODE_LOW = re.compile(r"The node was low on resource: (?P<resource>\S+)\. ")
CONTAINER_OVER_REQUEST = re.compile(
    r"Container (?P<container>\S+) was using (?P<usage>\S+), "
    r"(?:request is (?P<request>\S+), has larger consumption of \S+|which exceeds its request of (?P<was>\S+))\.")
EVICTED_OVER_REQUEST = "EvictedOverRequest"
# A pod the kubelet refused to admit (kubelet.go's rejectPod): Failed, status.reason the admit handler's word and
# status.message this prefix and its why, no container ever ran and no DisruptionTarget (the Job's pod-failure policy
# does not see it). Refused for a state the node leaves and the scheduler then avoids, it is a free retry: its pressure
# (the eviction manager's Admit: Evicted, "The node had condition: [DiskPressure]"; the node's pressure taint keeps the
# next pod off) or its shutdown (the shutdown manager's NodeShutdown; the node goes NotReady). Any other refusal is
# counted, with the kubelet's words: the scheduler does not see what the kubelet refused for (a device plugin that could
# not allocate, UnexpectedAdmissionError; a resource it counts short, OutOf<resource>; a topology manager's
# TopologyAffinityError), so it may place every attempt on the same node, and free retries have no cap.
REJECTED = "Pod was rejected: "
NODE_NOT_READY = "NodeNotReady"  # the node controller's Event on a pod it marks not ready
NODE_STATE_REJECTIONS = frozenset({EVICTED, "NodeShutdown"})


def own_limit_field(message: str | None) -> str | None:
    """The spec field that sets the limit a kubelet's eviction `message` says the pod went past, or None when the
    message is none of OWN_LIMIT_EVICTION's. The trainer's is the pod's one container: its ephemeral-storage limit is
    the pod's total too. /dev/shm's sizeLimit is a tmpfs's size on a kubelet that sizes memory-backed volumes (1.29's
    default), so it fills (ENOSPC) rather than being evicted; an older one evicts it."""
    said = OWN_LIMIT_EVICTION.fullmatch((message or "").strip())
    if said is None:
        return None
    volume, container = said.group("volume"), said.group("container")
    if container not in (None, TRAINER):  # a sidecar a webhook added, with a LimitRange's default: not the spec's
        return f"the ephemeral-storage limit of container {container}, which is not the trainer (another controller " \
               "adds it)"
    if volume is None:
        return "spec.runtime.resources.limits.ephemeral-storage"
    if volume == SHM_VOLUME:
        return "spec.runtime.shmSize"
    return f"the emptyDir.sizeLimit of volume {volume} in spec.runtime.volumes"


def over_request(message: str | None) -> tuple[str, str, str] | None:
    """The resource its node was short of, and the trainer's use and request of it, where a kubelet's node-pressure
    eviction `message` says the trainer used more than it requests; None where it names another container or none (the
    pod was evicted for others' use: a free retry)."""
    text = message or ""
    if (low := NODE_LOW.match(text)) is None:
        return None
    for said in CONTAINER_OVER_REQUEST.finditer(text, low.end()):
        if said.group("container") == TRAINER:
            return low.group("resource"), said.group("usage"), said.group("request") or said.group("was")
    return None


def _evicted_by_itself(pod: dict[str, Any]) -> tuple[str, str] | None:
    """The reason and message of a kubelet's eviction that the pod caused, and that the next attempt is likely to cause
    again: past a limit of its own, or its node short of what the trainer used past its request. Each names the field
    to raise."""
    evicted = (pod.get("evicted") or "").strip()
    if field := own_limit_field(evicted):
        return STORAGE_LIMIT_EXCEEDED, f"pod {pod['name']} was evicted by its kubelet: {evicted} Raise {field}, " \
                                       "or the next attempt may go past it again"
    if over := over_request(evicted):
        resource, usage, request = over
        # The kubelet ranks a pod by its use with its emptyDirs, the hub cache's too, though it names a container's.
        cache = " to what a worker writes to its node's disk, the hub cache (an emptyDir at HF_HOME) included" \
            if resource == "ephemeral-storage" else ""
        return EVICTED_OVER_REQUEST, f"pod {pod['name']} was evicted by its kubelet, its node short of {resource}, " \
            f"where the trainer used {usage} and requests {request}: the kubelet evicts pods over their request " \
            f"first. Raise spec.runtime.resources.requests.{resource}{cache}, or the next attempt may be evicted again"
    return None


def _termination(pod: dict[str, Any]) -> dict[str, Any] | None:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == TRAINER:
            state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
            if state:
                return state
    return None


# The pod deadline that ends a pod whose trainer exited while injected containers run on (handlers._end_pod).
ENDING_DEADLINE_SECONDS = 1


def _outlived_by(pod: dict[str, Any]) -> str | None:
    """The containers that have not ended after the trainer's own exit, which is final (restartPolicy Never): sidecars
    a webhook injected as plain containers (a service mesh's proxy, a secrets agent; native sidecars, init containers
    that always restart, end with the pod). Until they end the pod runs on, so its Job neither fails nor completes:
    the attempt waited for ever on a trainer that had exited, and held its GPUs (reconcile ends such a pod by its
    deadline). None for a pod already ending: deleted, or given that deadline (a deadline of its own, such as a
    policy engine's, ends it no sooner)."""
    status = pod.get("status", {})
    statuses = status.get("containerStatuses") or []
    ending = pod["metadata"].get("deletionTimestamp") or \
        (pod.get("spec") or {}).get("activeDeadlineSeconds") == ENDING_DEADLINE_SECONDS
    if ending or status.get("phase") not in ("Pending", "Running") or not any(
            s.get("name") == TRAINER and (s.get("state") or {}).get("terminated") for s in statuses):
        return None
    return ", ".join(s["name"] for s in statuses if s.get("name") != TRAINER
                     and not (s.get("state") or {}).get("terminated")) or None


# A container waiting for these reasons is not about to start by itself: the user must act (fix the image, a
# missing ConfigMap key or Secret, a command that crashes). ContainerCreating and PodInitializing are progress.
STUCK_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                 "CreateContainerError", "RunContainerError", "CrashLoopBackOff"}


# The kubelet's two words for one wait, which it alternates (a pull that fails, then its back-off): each was a new
# reason, so a job waiting on a bad image posted a Warning and changed status.reason every few seconds.
SAME_WAIT = {"ErrImagePull": "ImagePullBackOff"}
# Of those, the word whose message says only that the kubelet waits to try again ('Back-off pulling image "x"'): the
# error's own message, said before it, stays (reconcile), else Running's message changed at every other tick. Since
# Kubernetes 1.32 the back-off also gives the last pull's error ('Back-off pulling image "x": ErrImagePull: <error>'):
# that error is the message then, the pull error's own, so that a new cause (a secret added, another error) shows.
BACK_OFF = "ImagePullBackOff"
BACK_OFF_WITH_ERROR = re.compile(r'Back-off pulling image "[^"]*": (?:\w+: )?(.+)', re.DOTALL)


def _stuck(pod: dict[str, Any]) -> dict[str, Any] | None:
    """Why a container waits for the user, init containers first: while one waits (a webhook's istio-init or
    vault-agent-init, a native sidecar) the trainer only says PodInitializing. Once the pod is initialized they are
    read no more: a native sidecar that crash-loops beside a training trainer does not hold the run. Another
    container than the trainer is named."""
    pod_status = pod.get("status", {})
    init = [] if _initialized(pod) else pod_status.get("initContainerStatuses")
    for kind, statuses in (("init container", init), ("container", pod_status.get("containerStatuses"))):
        for status in statuses or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if (reason := waiting.get("reason")) not in STUCK_WAITING:
                continue
            message = waiting.get("message") or ""
            stuck: dict[str, Any] = {"reason": SAME_WAIT.get(reason, reason), "message": message}
            if reason == BACK_OFF:
                if said := BACK_OFF_WITH_ERROR.fullmatch(message):
                    stuck["message"] = said.group(1)
                else:
                    stuck["backOff"] = True
            if (name := status.get("name")) != TRAINER:
                stuck["message"] = f"{kind} {name}: {stuck['message']}"
            return stuck
    return None


# Warning Events that say why a scheduled pod's containers are not created, cause first: a volume that is not
# attached (Multi-Attach: another node holds a ReadWriteOnce claim) also times out the kubelet's FailedMount.
NOT_CREATED = ("FailedAttachVolume", "FailedMapVolume", "FailedMount", "FailedCreatePodSandBox")
# Normal Events that say such a warning is over: the kubelet pulls images once the volumes are mounted and the sandbox
# made (a transient Multi-Attach, then minutes pulling a large image, is no stuck volume), and an attach that succeeded.
PULLING = ("Pulling", "Pulled")
POD_EVENTS = (*NOT_CREATED, *PULLING, "SuccessfulAttachVolume")


def _creating_since(pod: dict[str, Any], scheduled: dict[str, Any]) -> str | None:
    """When the pod was scheduled, while its containers are still being created (volumes, image pull). A pod with
    init containers says PodInitializing for that wait until they have run (the kubelet mounts every volume first)."""
    waiting = [(s.get("state") or {}).get("waiting") or {} for s in pod.get("status", {}).get("containerStatuses") or []]
    if scheduled.get("status") == "True" and any(
            w.get("reason") == "ContainerCreating" or w.get("reason") == "PodInitializing" and not _initialized(pod)
            for w in waiting):
        return scheduled.get("lastTransitionTime")
    return None


def _initialized(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Initialized" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def warnings_of(events: list[dict[str, Any]], reasons: tuple[str, ...] | None = None
                ) -> dict[str, dict[str, tuple[str, str]]]:
    """Of a list of Events (of `reasons`, or all), the latest (time, message) of each reason, by the name of the
    object they are about."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for event in events:
        reason = event.get("reason") or ""
        if reasons is not None and reason not in reasons:
            continue
        when = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"]["creationTimestamp"]
        latest = found.setdefault(event["involvedObject"].get("name", ""), {})
        if reason not in latest or when >= latest[reason][0]:
            latest[reason] = (when, event.get("message") or "")
    return found


def latest_warning(warnings: dict[str, tuple[str, str]], since: str | None = None) -> tuple[str, str] | None:
    """The reason and message of the latest of one object's warnings (`warnings_of`), of those no older than the
    object (`since`, its creationTimestamp): Events are about a name, and a job deleted and made again under its
    name makes a Job of the old one's name, whose hour-long Events (a quota since raised) are not the new one's."""
    # To the second: creationTimestamp has no fraction, an eventTime has one.
    recent = {r: w for r, w in warnings.items() if since is None or w[0][:19] >= since[:19]}
    if not recent:
        return None
    reason, (_, message) = max(recent.items(), key=lambda item: item[1][0])
    # Any controller or webhook may post on the Job: a reason the status schema refuses would get every status patch
    # refused for as long as it is the latest.
    return api.reason_or(reason, "FailedCreate"), message


def creation_problem(events: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """The reason and message of what keeps a pod's containers from being created, of its Events (`warnings_of`
    of POD_EVENTS): a warning that a later Pulling or Pulled (or, for an attach, SuccessfulAttachVolume) ended is
    none."""
    pulled = max((events[r][0] for r in PULLING if r in events), default="")
    for reason in NOT_CREATED:
        over = max(pulled, events.get("SuccessfulAttachVolume", ("",))[0]) if reason == "FailedAttachVolume" else pulled
        if reason in events and events[reason][0] > over:
            return reason, events[reason][1]
    return None


def _finite(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def parse_message(text: str | None) -> dict[str, Any]:
    """The trainer's JSON termination message; a log tail (FallbackToLogsOnError) or nothing gives {}. NaN and
    Infinity (Python's json writes them: a broken checkpoint's layer scores), and a number past a float's range (1e400
    reads as infinity), read as null: JSON has no such numbers, and the apiserver refuses a status patch holding one
    whole. The message is the image's to write: nested past the parser's depth (1000 brackets) it is none either."""
    try:
        message = json.loads(text or "", parse_constant=lambda _: None, parse_float=_finite)
        if not isinstance(message, dict):
            return {}
        return _whole_characters(message) if SURROGATE_ESCAPE.search(text or "") else message
    except (ValueError, RecursionError):  # _whole_characters' too: it nests a frame or two deeper
        return {}


# JSON's way to write a surrogate, the only one: valid UTF-8 text holds none (a pair too, which reads whole)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _whole_characters(message: dict[str, Any]) -> dict[str, Any]:
    """The message with a lone surrogate (`"\\udce9"`: json.dumps writes a file name os.listdir decoded with
    surrogateescape so) as U+FFFD, as the apiserver's JSON decoder reads it: the status schema's check refused it, and
    left the conditions holding it out of the status."""
    text = json.dumps(message, ensure_ascii=False)
    whole = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return message if whole == text else json.loads(whole)


def trainer_line(message: dict[str, Any]) -> str | None:
    """The trainer's line for people in its termination message, when it is text: the image may write any JSON there
    (a number crashed the reconcile, a list got the status patch refused, for good)."""
    line = message.get("message")
    return line if isinstance(line, str) and line else None


LOG_END_MAX = 256


def log_end(text: str | None) -> str | None:
    """The last line that says something (it has a letter) of a log tail that the kubelet put in place of a message
    the container did not write (FallbackToLogsOnError): torchrun's summary of a killed worker, an import's error."""
    line = next((line.strip() for line in reversed((text or "").splitlines()) if any(c.isalpha() for c in line)), "")
    return line[:LOG_END_MAX] or None


def created_workers(pods: list[dict[str, Any]]) -> int:
    """How many workers have a pod: its completion indexes, once each (the Job controller's replacement of a pod,
    listed beside the one it replaces, is one worker)."""
    return len({p["index"] for p in pods})


def pod_summary(pod: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps of a trainer pod."""
    meta, status = pod["metadata"], pod.get("status", {})
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled", {})
    disruption = conditions.get("DisruptionTarget", {})
    terminated = _termination(pod)
    rejected = status.get("phase") == "Failed" and (status.get("message") or "").startswith(REJECTED)
    summary: dict[str, Any] = {
        "name": meta["name"],
        "uid": meta.get("labels", {}).get(JOB_UID_LABEL),  # None for pods made by an operator before the label
        "pod_uid": meta.get("uid"),  # who should answer on its IP (scrape.parse)
        "attempt": int(meta.get("labels", {}).get(ATTEMPT_LABEL, 0)),
        "index": int(meta.get("labels", {}).get(COMPLETION_INDEX_LABEL,
                                                meta.get("annotations", {}).get(COMPLETION_INDEX_LABEL, 0))),
        "phase": status.get("phase", "Pending"),
        "ip": status.get("podIP"),
        "ready": conditions.get("Ready", {}).get("status") == "True",
        "scheduled": scheduled.get("status") == "True",
        "unschedulable": _scheduler_refusal(scheduled),
        "gated": _gated(pod, scheduled),
        "disrupted": api.reason_or(disruption.get("reason"), "Disrupted") if disruption.get("status") == "True" else (
            "RejectedByNode" if rejected and status.get("reason") in NODE_STATE_REJECTIONS else None),
        "rejected": f"{status.get('reason') or 'Rejected'}: {status['message']}" if rejected else None,  # and why
        "evicted": status.get("message") or "" if status.get("reason") == EVICTED else None,  # the kubelet's why
        # The node lifecycle controller's mark (MarkPodsNotReady) on the pods of a node whose kubelet stopped reporting:
        # Ready turned False keeping the reason it had while True, none; a kubelet's False always says why.
        "node_unready": status.get("phase") in ("Pending", "Running") and conditions.get("Ready", {}).get("status")
        == "False" and not conditions["Ready"].get("reason"),
        "stuck": _stuck(pod),
        "creating": _creating_since(pod, scheduled),  # scheduled at, while its containers are still being created
        "deletionTimestamp": meta.get("deletionTimestamp"),  # the time by which its containers are killed
        # Its Job deleted with --cascade=orphan: the garbage collector took the Job's ownerReference away, and nothing
        # stops it (a background delete keeps the reference until the pod is deleted)
        "orphaned": not any(r.get("kind") == "Job" for r in meta.get("ownerReferences") or []),
        "created": meta.get("creationTimestamp") or "",
    }
    if not scheduled and status.get("phase", "Pending") == "Pending":  # no scheduler has spoken of it yet
        summary["unheard"] = (pod.get("spec") or {}).get("schedulerName") or DEFAULT_SCHEDULER
    if outlived_by := _outlived_by(pod):  # rare: kept only where set, as a summary of every pod lives in the index
        summary["outlived_by"] = outlived_by
    if terminated:
        message = parse_message(terminated.get("message"))
        summary["terminated"] = {
            "exitCode": terminated.get("exitCode"),
            "reason": terminated.get("reason", ""),
            "finishedAt": terminated.get("finishedAt") or "",
            "message": message,
            "logEnd": None if message else log_end(terminated.get("message")),
        }
    return summary


def _scheduler_refusal(scheduled: dict[str, Any]) -> str | None:
    """Why the scheduler has not placed a pod (PodScheduled False), None while it has not said: its message where it
    found no node (Unschedulable), else led by its reason (SchedulerError, such as a volume's PreBind timing out), which
    it retries as it does an Unschedulable pod. Not a pod its scheduling gates hold (`_gated`)."""
    reason = scheduled.get("reason")
    if scheduled.get("status") != "False" or reason in (None, SCHEDULING_GATED):
        return None
    message = scheduled.get("message") or ""
    if reason == "Unschedulable":
        return message
    return f"{reason}: {message}" if message else reason


def _gated(pod: dict[str, Any], scheduled: dict[str, Any]) -> dict[str, str] | None:
    """The scheduling gates (spec.schedulingGates) that keep an unscheduled pod from the scheduler, and since when."""
    gates = [str(g.get("name")) for g in (pod.get("spec") or {}).get("schedulingGates") or []]
    if not gates or scheduled.get("status") == "True":
        return None
    return {"gates": ", ".join(gates),
            "since": scheduled.get("lastTransitionTime") or pod["metadata"].get("creationTimestamp") or ""}


def _owner_uid(meta: dict[str, Any]) -> str | None:
    """The uid of the FineTuneJob that owns a child: its label, else its ownerReference (older children)."""
    return meta.get("labels", {}).get(JOB_UID_LABEL) or next(
        (r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("kind") == api.KIND), None)


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps of a child Job."""
    status = job.get("status", {})
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    ended = conditions.get("SuccessCriteriaMet") or conditions.get("Complete") or failed
    return {
        "name": job["metadata"]["name"],
        "uid": _owner_uid(job["metadata"]),
        "attempt": int(job["metadata"].get("labels", {}).get(ATTEMPT_LABEL, 0)),
        "workers": (job.get("spec") or {}).get("parallelism", 1),  # the pods it runs at once: one per worker
        "active": status.get("active", 0),
        "ready": status.get("ready", 0),
        "succeeded": status.get("succeeded", 0),
        "failed": status.get("failed", 0),
        "complete": "Complete" in conditions or "SuccessCriteriaMet" in conditions,
        "failure": {"reason": failed.get("reason", ""), "message": failed.get("message", "")} if failed else None,
        "ended": (ended or {}).get("lastTransitionTime"),  # when it succeeded or failed
        # When the Job controller decided that it failed: FailureTarget comes at once, Failed only when its last pod
        # is gone, which can be a grace period later (Kubernetes 1.31 on).
        "decided": (conditions.get("FailureTarget") or ended or {}).get("lastTransitionTime"),
        "started": status.get("startTime"),  # set again when its queue admits it
        "deleting": job["metadata"].get("deletionTimestamp"),  # since when (an end after it is the delete's), or None
        "suspended": bool((job.get("spec") or {}).get("suspend")) or "Suspended" in conditions,
        "created": job["metadata"].get("creationTimestamp") or "",
        # what it was made from (None for a Job an operator made before these annotations)
        "generation": _int_or_none(job["metadata"].get("annotations", {}).get(GENERATION_ANNOTATION)),
        "recipe": job["metadata"].get("annotations", {}).get(RECIPE_ANNOTATION),
    }


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _disrupted_by_policy(job: dict[str, Any]) -> bool:
    failure = job.get("failure") or {}
    return failure.get("reason") == "PodFailurePolicy" and f"rule at index {DISRUPTION_RULE}" in failure.get("message", "")


def exit_of(pod: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
    """A terminated pod's exit code as the trainer gave it, its termination message, and whether that message
    reported success."""
    term = pod["terminated"]
    said = term["message"].get("exitCode")
    # An exit code the message says is an integer; anything else (true, "1": the image's to write) is none said.
    said = said if isinstance(said, int) and not isinstance(said, bool) else None
    # A success the trainer wrote before its process died (a crash in its teardown) says nothing of the failure.
    reported_success = said == EXIT_OK
    message = {} if reported_success else term["message"]
    if said is not None and not reported_success:
        return said, message, False
    # No message (a crash before the trainer ran, a SIGKILL, torchrun's flattened 1) means infrastructure.
    return EXIT_INFRASTRUCTURE if term["exitCode"] == EXIT_USER_ERROR else term["exitCode"], message, reported_success


def knock_on(pod: dict[str, Any]) -> bool:
    """Whether a terminated pod failed because another worker did: a rank whose peer died (DistributedFailure), or one
    stopped by a signal (143, torchrun tearing the gang down)."""
    code, message, _ = exit_of(pod)
    return code == EXIT_TERMINATED or message.get("reason") == DISTRIBUTED_FAILURE


def _cause_to_come(failed: list[dict[str, Any]], pods: list[dict[str, Any]]) -> bool:
    """Whether the failed pods of a Job not failed yet are only knock-ons while a peer has not ended: that peer's own
    exit, the cause, is still to come (a rank whose peer died can end first). Judged then, a user error's knock-on was
    counted and retried. It waits no longer than the Job's verdict: with backoffLimit 0 its controller fails it on the
    first failed pod (after its 1 s batch), and _pods_behind takes over. A disruption or an eviction is its own
    cause."""
    return all(p.get("terminated") and not p.get("disrupted") and p.get("evicted") is None and knock_on(p)
               for p in failed) and any(not p.get("terminated") and p["phase"] not in ("Succeeded", "Failed")
                                        for p in pods)


def _refused(pod: dict[str, Any]) -> str:
    return f"pod {pod['name']} was refused by its node's kubelet ({pod['rejected']})"


def failure_cause(job: dict[str, Any], pods: list[dict[str, Any]]) -> Outcome:
    """Why a failed attempt failed, and whether another attempt may help."""
    # Evicted for its own use (past its limit, or past its request on a node short of it): the next attempt does the
    # same unless the spec changes, so it is counted (as an OOM kill is), not free, though it carries DisruptionTarget
    # in the second case; not failed outright, since usage that grows with the run (its logs, a cache) may stay under
    # the limit when resumed from a checkpoint. A counted attempt's message says what to raise.
    over = next(((p, said) for p in pods if (said := _evicted_by_itself(p))), None)
    if over:
        pod, (reason, text) = over
        return Outcome(State.FAILED, reason, text, Retry.COUNTED,
                       result=exit_of(pod)[1] if pod.get("terminated") else {})  # where it stopped, if it said
    disrupted = [p for p in pods if p.get("disrupted")]
    if disrupted or _disrupted_by_policy(job):
        reason = disrupted[0]["disrupted"] if disrupted else "Disrupted"
        who = f"pod {disrupted[0]['name']}" if disrupted else "a worker"
        told = _refused(disrupted[0]) if disrupted and disrupted[0].get("rejected") else \
            f"{who} was disrupted ({reason})"
        return Outcome(State.FAILED, reason, f"{told}; the gang restarts from its checkpoint", Retry.FREE)
    ended = [p for p in pods if (p.get("terminated") or {}).get("exitCode") not in (None, EXIT_OK)]
    # The cause first: not a knock-on (which can end before the failure that caused it); then the earliest; within a
    # second, a user error (never retried) first, then the lower index.
    causes = sorted(ended, key=lambda p: (knock_on(p), p["terminated"]["finishedAt"],
                                          exit_of(p)[0] != EXIT_USER_ERROR, p["index"]))
    rejected = next((p for p in pods if p.get("rejected")), None)
    if rejected and (not causes or knock_on(causes[0])):  # its peers, stopped with the Job, are its knock-ons
        return Outcome(State.FAILED, "RejectedByNode", _refused(rejected), Retry.COUNTED)
    # A worker on a lost node never ends (no kubelet reports it) and its peers fail for it: a disruption, as the taint
    # manager's eviction says of it only minutes later (tolerationSeconds, 300 by default), after the count was made.
    stranded = next((p for p in pods if p.get("node_unready") and "terminated" not in p), None)
    if stranded and (not causes or knock_on(causes[0])):
        return Outcome(State.FAILED, NODE_NOT_READY, f"pod {stranded['name']}'s node is not ready (lost, or its "
                       "kubelet said so: the node controller marked the pod not ready); the gang restarts from its "
                       "checkpoint", Retry.FREE)
    if not causes:
        failure = job.get("failure") or {}
        return Outcome(State.FAILED, "WorkerFailed",
                       failure.get("message") or "a worker failed and left no exit code", Retry.COUNTED)
    pod = causes[0]
    code, message, reported_success = exit_of(pod)
    term = pod["terminated"]
    if code == EXIT_USER_ERROR:
        reason = api.reason_or(message.get("reason"), "TrainerError")
        text = trainer_line(message) or f"the trainer exited {code} (see `kubectl logs {pod['name']}`)"
        return Outcome(State.FAILED, reason, text, Retry.NEVER, result=message)
    if term.get("reason") == "OOMKilled":
        return Outcome(State.FAILED, "OOMKilled", f"pod {pod['name']} ran out of memory (exit {term['exitCode']})",
                       Retry.COUNTED, result=message)
    reason = api.reason_or(message.get("reason"), "WorkerFailed")
    finished = " after the trainer reported success" if reported_success else ""
    said = f"; its log ends: {term['logEnd']}" if term.get("logEnd") else ""
    text = trainer_line(message) or f"pod {pod['name']} exited {term['exitCode']}{finished}{said}"
    return Outcome(State.FAILED, reason, text, Retry.COUNTED, result=message)


# The Job controller sets startTime again at a resume after it has made the new pods (to the second, and a large
# Job's in batches): a pod older than this is of an earlier admission.
ADMISSION_SLACK = timedelta(seconds=10)


def _stopped_before_this_admission(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    """A pod the Job's suspend stopped, still being removed when its queue (Kueue) admitted the Job again: seen
    Failed (exit 143) in that moment, it counted as the new admission's failure (for good at backoffLimit 0)."""
    if not (pod.get("deletionTimestamp") and pod.get("created") and job.get("started")):
        return False
    return parse_time(job["started"]) - parse_time(pod["created"]) > ADMISSION_SLACK


def parse_time(text: str) -> datetime:
    """An apiserver timestamp (RFC 3339, to the second, UTC) as a naive UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


def attempt_outcome(job: dict[str, Any] | None, pods: list[dict[str, Any]],
                    job_warning: tuple[str, str] | None = None, pod_warning: tuple[str, str] | None = None,
                    held: tuple[str, str] | None = None) -> Outcome:
    """Where the current attempt stands, from its Job and pods (either may lag the other).

    `job_warning` is the latest Warning Event of a Job that lacks some of its pods (e.g. FailedCreate:
    a missing ServiceAccount, a quota, Pod Security), `pod_warning` the Warning Event of a pod
    whose containers are long in being created (a volume that does not mount), and `held` the reason and message
    of a pod long kept from a node before any scheduler looked at it (its gates, a scheduler not running), so that
    none is a silent Pending."""
    if job is None:
        return Outcome(State.PENDING, "Creating", "creating the attempt's objects")
    rank0 = next((p for p in pods if p["index"] == 0), None)
    ended = (rank0 or {}).get("terminated") or {}
    result = ended.get("message", {})
    if job["complete"]:
        return Outcome(State.SUCCEEDED, "Completed", "every worker finished", result=result)
    # Rank 0 exported the model and exited 0, and a peer failed in its teardown after it, failing the Job: the run
    # succeeded. (A Job made with rank 0's success policy is complete by then, unless its controller saw the peer's
    # failure first, which it checks before the policy; one an apiserver before 1.31 made is not. A peer that hangs
    # instead is NotExiting, as before the policy.) Every rank passed the barrier after the export before rank 0 wrote
    # Done (pipeline.stages), so a peer's failure, whatever its exit, is its teardown's: the run succeeded once one
    # has failed (before the Job controller's verdict, in its 1 s batch, too), or the Job has failed, with no peer left
    # to wait for: its controller deletes every pod still active, which may checkpoint on the SIGTERM for its whole
    # grace period, Running across many ticks (with 3 workers or more, the failed peer was judged meanwhile: counted,
    # or at backoffLimit 0 the job failed with its evaluation lost). Failed without an exit: a peer on a lost node.
    if ended.get("exitCode") == EXIT_OK and result.get("exitCode") == EXIT_OK and result.get("stage") == "Done" and (
            job["failure"] or any(p["phase"] == "Failed" for p in pods) or all(p.get("terminated") for p in pods)):
        return Outcome(State.SUCCEEDED, "Completed", "rank 0 finished; a worker failed after it", result=result)
    if job.get("suspended"):  # its pods, stopped by the Job controller, did not fail
        return Outcome(State.PENDING, QUEUED, f"the Job {job['name']} is suspended by its queue (Kueue): it waits "
                                                "to be admitted", queued=True)
    pods = [p for p in pods if not _stopped_before_this_admission(p, job)]
    failed = [p for p in pods if p["phase"] == "Failed"]
    if job["failure"] or failed and not _cause_to_come(failed, pods):
        return failure_cause(job, pods)
    workers = job.get("workers", 1)
    if created_workers(pods) < workers and job_warning:  # a pod the Job controller could not create (a quota, ...)
        reason, message = job_warning
        return Outcome(State.PENDING, reason, message, not_created=message)
    unschedulable = next((p["unschedulable"] for p in pods if p["unschedulable"]), None)
    if unschedulable:
        return Outcome(State.PENDING, "Unschedulable", unschedulable, unschedulable=unschedulable)
    if held:
        return Outcome(State.PENDING, *held, unschedulable=held[1])
    stuck = next((p for p in pods if p.get("stuck")), None)
    if stuck:
        waiting = stuck["stuck"]
        return Outcome(State.PENDING, waiting["reason"], f"pod {stuck['name']}: {waiting['message'] or waiting['reason']}",
                       stuck=True, back_off=bool(waiting.get("backOff")))
    if pod_warning:  # not a failure: the user can still create the Secret, or free the claim
        return Outcome(State.PENDING, *pod_warning, stuck=True)
    # Every worker's pod, not only those that exist (`active`): a gang with a pod missing cannot train.
    running = [p for p in pods if p["phase"] == "Running"]
    if running and len(running) + sum(p["phase"] == "Succeeded" for p in pods) >= max(job["active"], workers):
        return Outcome(State.RUNNING, "WorkersRunning", f"{len(running)} worker(s) running")
    return Outcome(State.PENDING, "WorkersStarting",
                   f"{len(running)} of {max(job['active'], len(pods), workers)} worker(s) running")
