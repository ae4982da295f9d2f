"""kopf wiring only: two indexes of the children, one timer per FineTuneJob that reconciles it.

Handlers are plain `def`s: kopf runs them in its thread pool, so the blocking Kubernetes
client never runs inside the event loop. Every decision is `reconcile.decide`'s; this module
reads what it needs, carries out the decision and records metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

import aiohttp
import kopf
import urllib3
from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException

from finetune_operator import api, children, judge, metrics, outcome, reconcile
from finetune_operator.clients import Clients, api_path, load_config
from finetune_operator.diffbase import SpecDiffBase
from finetune_operator.api import ConditionType as T
from finetune_operator.scrape import TIMEOUT_SECONDS, ScrapeError, scrape
from finetune_operator.settings import Settings
from finetune_operator.status import (composed, condition, merged, not_started, schema_checked, stale_after,
                                      status_patch)

log = logging.getLogger("finetune_operator")
PREFIX = "finetune.dev"
FINALIZER = f"{PREFIX}/finalizer"
HANDLER_THREADS = 16  # kopf runs the sync handlers in a pool of this size
API_CONNECTIONS = 32  # kopf's requests at once (patches, Events), besides its watch streams
LIST_CHUNK = 100  # objects per page of kopf's initial lists


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, phase_index: kopf.Index, **_: Any) -> None:
    # Our own names for kopf's finalizer and storage, from the first release (changing them later
    # would make every object look unhandled).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = SpecDiffBase(prefix=PREFIX)
    settings.posting.level = logging.WARNING  # Events are posted explicitly, on transitions
    settings.execution.max_workers = HANDLER_THREADS
    # A job deleted while its timer's tick runs (a metrics read, up to a second) kept its finalizer, so `kubectl
    # delete` waited, for kopf's default minute between checks that the timer has stopped.
    settings.background.instant_exit_timeout = 0.1
    settings.background.cancellation_polling = 1.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 310
    # The initial lists in pages: on a restart with a thousand live jobs, their Jobs and pods decoded at once set a
    # high-water mark of Python's heap that it never hands back.
    settings.watching.chunk_size = LIST_CHUNK
    # No watching of namespaces and CRDs: the CRD is installed before the operator starts (the chart's
    # crds/), and the watched namespaces are named or all; so no cluster-wide reads beyond our own rules.
    settings.scanning.disabled = True
    # Only our children reach the operator: the apiserver filters the Job and pod watches, so other workloads in
    # the watched namespaces cost it no decoding and no event handling.
    for group, version, plural in CHILD_WATCHES:
        settings.watching.label_selectors[group, version, plural] = children.JOB_NAME_LABEL
    memo.clients = Clients(connections=HANDLER_THREADS)
    memo.job_warnings = Warnings("Job")
    memo.pod_warnings = Warnings("Pod", outcome.POD_EVENTS, warnings_only=False)
    memo.claims = Claims()
    ours: Settings = memo.settings
    memo.slow_scrapes = SlowScrapes(ours.poll_seconds)
    memo.child_checks = ChildChecks(keep=2 * max(CHILDREN_CHECK_SECONDS, WAITING_POLLS * ours.poll_seconds))
    memo.written = Written()
    memo.counted = Once()
    memo.told = Once()
    memo.vanished = Vanished()
    # finetune_operator_jobs counts kopf's live index from the first scrape on: set by the first reconcile instead,
    # it stayed 0 in every phase after a restart onto finished jobs (they are never reconciled again).
    metrics.JOBS.index = phase_index
    log.info("finetune-operator: watching %s; trainer image %s; polling every %.1f s",
             ", ".join(ours.namespaces) or "every namespace", ours.trainer_image, ours.poll_seconds)


CHILD_WATCHES = (("batch", "v1", "jobs"), ("", "v1", "pods"))


# The indexes are async: they are pure and quick, and kopf would hand a sync one to its thread pool per event.
async def index_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[children.JOB_NAME_LABEL]): outcome.job_summary(body)}


async def index_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[children.JOB_NAME_LABEL]): outcome.pod_summary(body)}


async def index_phases(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The job's namespace and uid under its phase: they tell a job deleted unseen by the watch (`Vanished`)."""
    meta = body.get("metadata", {})
    return {body.get("status", {}).get("phase") or api.Phase.PENDING.value: (meta.get("namespace"), meta.get("uid"))}


async def slim_body(event: kopf.RawEvent, **_: Any) -> None:
    """Make the FineTuneJob that kopf keeps smaller: kopf holds each job's latest body for its timers.

    - metadata.managedFields goes (nothing here reads it): more than half of the body, about 23 KB of a ~39 KB
      body per live job.
    - The field names and short strings become shared (`_interned`): the JSON decoder gives every body strings of
      its own, so a thousand live jobs held a thousand copies of each field name. A running job of the scale
      bench kept 16.1 KB of metadata, spec and status as decoded, 7.3 KB beside others interned (~94 µs per event).

    Each part is replaced whole, not edited, so a handler thread that is reading the previous one reads it unchanged
    (see `_plain`)."""
    raw: Any = event.get("object") or {}
    metadata = raw.get("metadata")
    if isinstance(metadata, dict):
        raw["metadata"] = {sys.intern(key): _interned(value) for key, value in metadata.items()
                           if key != "managedFields"}
    for part in ("spec", "status"):
        if isinstance(raw.get(part), dict):
            raw[part] = _interned(raw[part])


INTERNED_LENGTH = 64  # longer strings are messages, paths and URIs: rarely the same in two jobs


def _interned(value: Any) -> Any:
    """A copy whose dict keys and short strings are the interpreter's shared ones (sys.intern)."""
    if isinstance(value, dict):
        return {sys.intern(key): _interned(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interned(item) for item in value]
    if isinstance(value, str) and len(value) <= INTERNED_LENGTH:
        return sys.intern(value)
    return value


def ours(spec: kopf.Spec, **_: Any) -> bool:
    """Run by this operator: spec.managedBy unset or ours. Another controller's jobs are left alone, uncounted too."""
    return spec.get("managedBy") in (None, api.MANAGED_BY)


def _live(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta) -> bool:
    """Ours, and live, waiting for ttlSecondsAfterFinished, or finished with a spec edited since (one tick records
    its observedGeneration, which GitOps health checks wait for): a finished job costs no reconciles (kopf stops its
    timers when the filters turn False), which keeps a cluster of thousands of finished jobs cheap."""
    finished = status.get("phase") in api.FINISHED
    return ours(spec) and (
        not finished or spec.get("ttlSecondsAfterFinished") is not None
        or status.get("observedGeneration") != meta.get("generation", 0))


def _busy(status: kopf.Status, meta: kopf.Meta) -> bool:
    """Running (its metrics are read every poll) or between attempts until the next one is made (it is created on
    the next tick, or at the first after its back-off, status.retryAfter). Once made, its pods wait (for GPUs, a
    queue) as a first attempt's do: Restarting stays True until they run, and a retried job waiting hours for GPUs
    was reconciled every poll."""
    if status.get("phase") == api.Phase.RUNNING:
        return True
    made = (status.get("children") or {}).get("job") == children.child_name(meta["name"], status.get("attempts") or 0)
    return condition(status.get("conditions"), T.RESTARTING).get("status") == "True" and not made


def ticks_every_poll(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    return _live(spec, status, meta) and _busy(status, meta)


def ticks_slowly(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    """Waiting jobs (queued for GPUs, suspended, pods being created) are reconciled every WAITING_POLLS polls: a
    burst of a thousand of them at every poll would cost the operator more CPU than it has."""
    return _live(spec, status, meta) and not _busy(status, meta)


WAITING_POLLS = 5


def _plain(body: kopf.Body) -> dict[str, Any]:
    """Copies of one version's metadata, spec and status (kopf swaps whole bodies, and slim_body whole
    metadata, spec and status dicts, while a handler thread reads them)."""
    raw = dict(body)
    return {part: dict(raw.get(part) or {}) for part in ("metadata", "spec", "status")}


def _sample(seen: reconcile.Observed, slow: SlowScrapes, ns: str, name: str) -> None:
    """Rank 0's metrics while it runs, or why they could not be read (counted; the last numbers stay)."""
    attempt = reconcile.current_attempt(seen.body["status"], seen.jobs)
    rank0 = next((p for p in seen.pods if p["attempt"] == attempt and p["index"] == 0
                  and p["phase"] == "Running" and p.get("ip")), None)
    if rank0 is None:
        return
    key = (ns, name, rank0["name"])
    if waiting := slow.waiting(key):  # its last error stands: MetricsStale is set, or comes when it is due
        seen.scrape_error = waiting
        return
    # Every slot taken: read at a later tick, the last numbers standing (no error). Trainers that answer just inside
    # the time bound are no failure SlowScrapes holds back, and a few dozen held every handler thread.
    if not SCRAPE_SLOTS.acquire(blocking=False):
        return
    started = time.monotonic()
    try:
        seen.sample = scrape(rank0["ip"], pod_uid=rank0.get("pod_uid"))
        slow.forget(key)
    except ScrapeError as exc:
        # Not at every job's end, nor at its start (the endpoint up once torch is imported): counted, they fired
        # the alerts on the counter for each job
        status = seen.body["status"]
        if not (reconcile.reported_done(status) or reconcile.still_starting(status, seen.now, seen.poll_seconds)):
            metrics.POLL_ERRORS.labels(reason=exc.reason).inc()
        log.debug("%s/%s: metrics not read: %s", ns, name, exc)
        seen.scrape_error = (exc.reason, str(exc))
        slow.failed(key, started, seen.scrape_error)
    finally:
        SCRAPE_SLOTS.release()


# Scrapes under way at once: half the handler threads, the other half for reconciles.
SCRAPE_SLOTS = threading.BoundedSemaphore(HANDLER_THREADS // 2)


SLOW_SCRAPE_MAX_POLLS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class _Slow:
    began: float  # when its last slow read began: a tick 2**held polls later finds it due
    first: float  # when the first of the slow reads in a row began
    held: int  # reads held back since the first (each after status.stale_after adds one)
    error: tuple[str, str]  # the last read's (reason, message)


class SlowScrapes:
    """Rank 0 endpoints whose reads run into the scrape's time bound, read less often once their job is stale.
    Each such read holds one of the HANDLER_THREADS for scrape.TIMEOUT_SECONDS, every poll: a few dozen running jobs
    whose pods drop the operator's packets (a tenant's default-deny NetworkPolicy) or whose trainers hang held them
    all, and every other job's reconcile waited. For `stale_after` (STALE_AFTER_SECONDS, or three polls where they
    are longer) it is read every poll (a blip of a few seconds makes no job stale); then n reads later the next waits
    2**n polls, at most SLOW_SCRAPE_MAX_POLLS. A read that ends fast (an answer, a refusal) is not held back."""

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self.slow: dict[tuple[str, str, str], _Slow] = {}  # by (namespace, job, rank 0's pod)

    def waiting(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        """The endpoint's last error while it is held back, else None (read it)."""
        if (entry := self.slow.get(key)) is None:
            return None
        due = entry.began + self.poll_seconds * min(2 ** entry.held, SLOW_SCRAPE_MAX_POLLS)
        return entry.error if entry.held and time.monotonic() < due else None

    def failed(self, key: tuple[str, str, str], began: float, error: tuple[str, str]) -> None:
        if time.monotonic() - began < TIMEOUT_SECONDS / 2:
            self.forget(key)
            return
        # Those of a job no longer read (finished, deleted, a new rank 0) go; a held-back one is read within this
        for expired in _expired(self.slow, 2 * SLOW_SCRAPE_MAX_POLLS * self.poll_seconds, lambda e: e.began):
            self.slow.pop(expired, None)
        entry = self.slow.get(key)  # once: another thread may forget it meanwhile
        first, held = (entry.first, entry.held) if entry else (began, 0)
        self.slow[key] = _Slow(began, first, held + (began - first >= stale_after(self.poll_seconds)), error)

    def forget(self, key: tuple[str, str, str]) -> None:
        self.slow.pop(key, None)


def _listed(clients: Clients, seen: reconcile.Observed, ns: str, name: str, jobs: bool) -> reconcile.Observed:
    """`seen` with the job's pods (and with `jobs`, its Jobs) as the apiserver lists them now. After a watch's 410
    Gone kopf lists again and reports only what exists: a child deleted in that gap stays in its index as last seen
    (a pod Running, not deleting), until the operator restarts. Asked while pods hold the next attempt back (pods
    only), while Jobs would (`reconcile.waits_on_jobs`), and now and then while a job's metrics are not read
    (`ChildChecks`)."""
    selector = f"{children.JOB_NAME_LABEL}={name}"
    try:
        pods = json.loads(clients.call("GET", api_path(ns, "pods"), labelSelector=selector))["items"]
        job_list = json.loads(clients.call("GET", api_path(ns, "jobs", group="batch"), labelSelector=selector)
                              )["items"] if jobs else None
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        # Jobs are listed where a decision may need the apiserver's word (waits_on_jobs: it then waits for one)
        (log.warning if jobs else log.debug)("%s/%s: children not listed (%s): the indexes' are used until a list "
                                             "succeeds", ns, name, exc)
        return seen
    pods = [outcome.pod_summary(p) for p in pods]
    if job_list is None:
        return dataclasses.replace(seen, pods=pods)
    found = dataclasses.replace(seen, jobs=[outcome.job_summary(j) for j in job_list], pods=pods, listed=True)
    gone = {c["name"] for c in (*seen.jobs, *seen.pods)} - {c["name"] for c in (*found.jobs, *found.pods)}
    if gone:
        log.info("%s/%s: %s deleted, though still in the operator's watch (a missed event)", ns, name,
                 ", ".join(sorted(gone)))
    return found


CHILDREN_CHECK_SECONDS = 300


class ChildChecks:
    """When each job's children were last listed from the apiserver (`_listed`), for jobs whose rank 0 metrics are
    not read: a Job and pods deleted in a watch's relist gap left the job Running (or Pending) on their index
    entries for ever. One whose metrics are read has live pods, and is not asked. At most once per `every` seconds a
    job, counted from when it was first asked about: a burst of new or queued jobs makes no burst of lists. A job
    not asked about for `keep` seconds (deleted, finished, its metrics read) is forgotten; `keep` must exceed the
    time between two ticks of a waiting job, or its clock would start again at each."""

    def __init__(self, every: float = CHILDREN_CHECK_SECONDS, keep: float = 2 * CHILDREN_CHECK_SECONDS) -> None:
        self.every, self.keep = every, keep
        # (namespace, job, uid) -> (when last listed, when last asked about)
        self.since: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.pruned = time.monotonic()

    def due(self, key: tuple[str, str, str]) -> bool:
        now = time.monotonic()
        self.pruned = _swept(self.since, self.keep, self.pruned, itemgetter(1))
        listed, _ = self.since.get(key, (now, now))
        due = now - listed >= self.every
        self.since[key] = (now if due else listed, now)
        return due


VANISHED_CHECK_SECONDS = 300


class Vanished:
    """The FineTuneJobs, by namespace and uid, that kopf's index holds and the apiserver no longer has. kopf drops a
    job from its indexes only at its DELETED event, and its relist after a watch's 410 Gone reports only what exists:
    a job deleted in that gap (a finished one has no finalizer that waits for the operator) was counted in
    finetune_operator_jobs for ever, and a live one whose finalizer was removed by hand kept its timer reconciling
    it. A uid never comes back, so one listed as gone stays gone for as long as the index holds it."""

    def __init__(self) -> None:
        self.jobs: frozenset[tuple[str, str]] = frozenset()

    def check(self, clients: Clients, namespaces: tuple[str, ...], index: kopf.Index) -> None:
        """Compare the index with the apiserver's FineTuneJobs now, a namespace at a time: one whose list fails
        (its Role gone with a deleted namespace's RoleBinding: a 403 at every check) keeps what it had, and the
        others are checked."""
        held = _indexed_jobs(index)  # before the list: a job that the list missed as it was created after it began
        listed: set[tuple[str, str]] = set()
        unlisted: set[str | None] = set()
        for ns in namespaces or (None,):
            try:
                listed.update(_listed_jobs(clients, ns))
            except (ApiException, urllib3.exceptions.HTTPError) as exc:
                log.warning("FineTuneJobs %s not listed (%s): jobs deleted there unseen are looked for at the next "
                            "check", f"in {ns}" if ns else "of the cluster", exc)
                unlisted.add(ns)
        if None in unlisted:
            return
        gone = frozenset(job for job in held - listed if job[0] not in unlisted) | {
            job for job in self.jobs & held if job[0] in unlisted}
        if gone - self.jobs:
            log.info("%d FineTuneJob(s) deleted, though still in the operator's watch (a missed event)",
                     len(gone - self.jobs))
        self.jobs = metrics.JOBS.gone = gone


def _indexed_jobs(index: kopf.Index) -> set[tuple[str, str]]:
    # tuple() copies each store in one C call, which a concurrent change by kopf's event loop cannot interrupt
    return {job for phase in tuple(index) for job in tuple(index.get(phase, ()))}


PARTIAL_METADATA = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


def _listed_jobs(clients: Clients, ns: str | None) -> Iterator[tuple[str, str]]:
    """The namespace and uid of each FineTuneJob in `ns` (None: in every namespace), their metadata only, in pages."""
    token = ""
    while True:
        page = json.loads(clients.call("GET", api_path(ns, api.PLURAL, group=api.GROUP, version=api.VERSION),
                                       accept=PARTIAL_METADATA, limit=str(LIST_CHUNK),
                                       **({"continue": token} if token else {})))
        yield from ((item["metadata"]["namespace"], item["metadata"]["uid"]) for item in page["items"])
        if not (token := page["metadata"].get("continue")):
            return


def look_for_vanished(memo: kopf.Memo, phase_index: kopf.Index, **_: Any) -> None:
    """Startup: `Vanished.check` every VANISHED_CHECK_SECONDS in a thread of its own, for the operator's life."""
    namespaces = memo.settings.namespaces

    def check_periodically() -> None:
        while True:
            time.sleep(VANISHED_CHECK_SECONDS)
            try:
                memo.vanished.check(memo.clients, namespaces, phase_index)
            except Exception:  # an answer not understood: logged, and the thread goes on to the next check
                log.exception("the check for FineTuneJobs deleted unseen failed")

    threading.Thread(target=check_periodically, name="vanished-jobs", daemon=True).start()


WRITTEN_KEEP_SECONDS = 300.0


class Written:
    """The status changes the operator wrote that kopf's watch has not brought back yet, by job uid, with the
    resourceVersion the last of them made. kopf hands a timer the latest copy its watch has, and under load a tick
    came before the watch brought back an earlier tick's write: decided on the status before it, a transition came
    again (a second Event, a moved completionTime, a failure counted twice). Until a copy of that version (or a
    later one) comes, a tick decides on its copy with the changes applied, which is what the apiserver holds: status
    has one writer. An entry goes when the watch brings its version, or after WRITTEN_KEEP_SECONDS (a deleted job's,
    or versions that are no numbers to compare)."""

    def __init__(self) -> None:
        self.by_uid: dict[str, tuple[float, str, dict[str, Any]]] = {}  # (written at, version made, changes)
        self.swept = time.monotonic()

    def status(self, body: dict[str, Any]) -> dict[str, Any]:
        self.swept = _swept(self.by_uid, WRITTEN_KEEP_SECONDS, self.swept)
        meta = body["metadata"]
        entry = self.by_uid.get(meta["uid"])
        if entry is None:
            return body["status"]
        if _not_older(meta.get("resourceVersion", ""), entry[1]):
            self.by_uid.pop(meta["uid"], None)
            return body["status"]
        log.debug("%s/%s: decided with the status changes the watch has not brought yet", meta.get("namespace"),
                  meta.get("name"))
        return merged(body["status"], entry[2])

    def wrote(self, body: dict[str, Any], changes: dict[str, Any], version: str) -> None:
        """`changes` were written onto `body`'s status as `status` gave it, making `version`."""
        entry = self.by_uid.get(body["metadata"]["uid"])
        earlier = entry[2] if entry else {}
        self.by_uid[body["metadata"]["uid"]] = (time.monotonic(), version, composed(earlier, changes))


def _not_older(version: str, than: str) -> bool:
    """Whether the object at `version` holds what was written at `than`. resourceVersions are opaque to clients, but
    etcd's are increasing integers; any others are compared for equality alone."""
    return version == than or version.isdigit() and than.isdigit() and int(version) > int(than)


def _in_doubt(seen: reconcile.Observed) -> bool:
    """A job that is not finished whose current attempt has a Job in the index, and whose metrics were not read."""
    status = seen.body["status"]
    return seen.sample is None and status.get("phase") not in api.FINISHED and \
        reconcile.current_job(status, seen.jobs)[1] is not None


PODLESS_GRACE_SECONDS = 10  # the Job controller creates pods within moments; after that, ask why not


WARNINGS_TTL_SECONDS = 5.0


class Warnings:
    """Warning Events (or all Events) of one kind of child (Job, Pod), one list per namespace shared by all its jobs
    for WARNINGS_TTL_SECONDS: asking per job and tick would cost a burst of podless jobs (kcm still creating their
    pods) one API call each, every tick. Only `reasons`, when given, are kept (a namespace's other pods'
    FailedScheduling)."""

    def __init__(self, kind: str, reasons: tuple[str, ...] | None = None, warnings_only: bool = True) -> None:
        self.reasons = reasons
        self.selector = f"involvedObject.kind={kind}" + (",type=Warning" if warnings_only else "")
        self.locks: dict[str, threading.Lock] = {}  # one per namespace: a list call holds up only its own namespace
        self.by_namespace: dict[str, tuple[float, dict[str, dict[str, tuple[str, str]]]]] = {}
        self.failed = False  # a list failed since the last that did not: its failures are logged at debug

    def of(self, clients: Clients, ns: str, name: str) -> dict[str, tuple[str, str]]:
        """The object's latest (time, message) of each reason (`outcome.warnings_of`)."""
        with self.locks.setdefault(ns, threading.Lock()):
            read_at, found = self.by_namespace.get(ns, (0.0, {}))
            if time.monotonic() - read_at > WARNINGS_TTL_SECONDS:
                found = self._listed(clients, ns)
                self.by_namespace[ns] = (time.monotonic(), found)
                for expired in _expired(self.by_namespace, WARNINGS_TTL_SECONDS):
                    self.by_namespace.pop(expired, None)
                    self.locks.pop(expired, None)  # at worst a namespace is listed twice at once
        return found.get(name, {})

    def _listed(self, clients: Clients, ns: str) -> dict[str, dict[str, tuple[str, str]]]:
        """The namespace's warnings by object; none where the list fails (a 429, a 500, a Role without list on
        events), for WARNINGS_TTL_SECONDS like a list's: Events only add detail, and the error escaped the reconcile
        before its status write, so a job had no status at all while it lasted."""
        try:  # a 200 that is no list (a proxy's page) too
            items = json.loads(clients.call("GET", api_path(ns, "events"), fieldSelector=self.selector))["items"]
        except (ApiException, urllib3.exceptions.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.log(logging.DEBUG if self.failed else logging.WARNING,
                    "%s: Events (%s) not listed, so read as none: %s", ns, self.selector, exc)
            self.failed = True
            return {}
        self.failed = False  # a later outage (its Role's rule removed) is told again
        return outcome.warnings_of(items, self.reasons)


def _expired(entries: dict[Any, Any], ttl: float, when: Callable[[Any], float] = itemgetter(0)) -> list[Any]:
    """The keys of the entries read (`when`, by default a (read at, value) pair's first) longer than `ttl` ago, to
    drop: the next read replaces them anyway, and kept, a deleted namespace's stayed for good, so an operator
    watching namespaces made and deleted by the thousand (CI's) grew without end."""
    now = time.monotonic()
    return [key for key, entry in list(entries.items()) if now - when(entry) > ttl]


def _swept(entries: dict[Any, Any], ttl: float, last: float, when: Callable[[Any], float] = itemgetter(0)) -> float:
    """Drop the `_expired` entries, at most twice per `ttl` (`last`: when the previous sweep was); returns when the
    latest sweep was. A scan of every entry at every tick would cost the square of the jobs a poll."""
    now = time.monotonic()
    if now - last <= ttl / 2:
        return last
    for expired in _expired(entries, ttl, when):
        entries.pop(expired, None)
    return now


def _job_warning(clients: Clients, warnings: Warnings, seen: reconcile.Observed, ns: str) -> tuple[str, str] | None:
    """The latest Warning Event of the current attempt's Job while it lacks some of its pods (one per worker)."""
    attempt, job = reconcile.current_job(seen.body["status"], seen.jobs)
    if job is None or job["complete"] or job["failure"] or sum(
            p["attempt"] == attempt for p in seen.pods) >= job.get("workers", 1):
        return None
    created = outcome.parse_time(job["created"]) if job["created"] else seen.now
    if (seen.now - created).total_seconds() < PODLESS_GRACE_SECONDS:
        return None
    return outcome.latest_warning(warnings.of(clients, ns, job["name"]), since=job["created"])


CLAIMS_TTL_SECONDS = 5.0


class Claims:
    """The claims that exist (what the judge reads of them), each kept CLAIMS_TTL_SECONDS: a burst of jobs that
    write to one claim reads it once, not once per job before each child Job. A missing claim is read every time:
    it may be created at any moment, and a job judged without it fails for good. A claim being deleted is kept
    CLAIMS_TTL_SECONDS as a present one is (the judge waits for it as a missing one): its re-creation is seen within
    them."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    def get(self, clients: Clients, ns: str, name: str) -> dict[str, Any] | None:
        read_at, claim = self.found.get((ns, name), (0.0, None))
        if claim is not None and time.monotonic() - read_at <= CLAIMS_TTL_SECONDS:
            return claim
        try:
            body = json.loads(clients.call("GET", api_path(ns, "persistentvolumeclaims", name)))
        except ApiException as exc:
            self.found.pop((ns, name), None)
            if exc.status != 404:  # the operator's Role, a 429: the job says so, as for a create that failed
                raise HeldBack(CREATE_FAILED, f"the claim {name} could not be read: {_api_message(exc)}",
                               CREATE_RETRY_SECONDS) from exc
            return None
        except (urllib3.exceptions.HTTPError, ValueError) as exc:  # no answer, or not the apiserver's (a proxy's page)
            self.found.pop((ns, name), None)
            raise HeldBack(CREATE_FAILED, f"the claim {name} could not be read: {_unanswered(exc)}",
                           CREATE_RETRY_SECONDS) from exc
        found = body.get("spec") or {}
        claim = {"metadata": {"deletionTimestamp": (body.get("metadata") or {}).get("deletionTimestamp")},
                 "spec": {"accessModes": found.get("accessModes") or [], "volumeMode": found.get("volumeMode")}}
        for expired in _expired(self.found, CLAIMS_TTL_SECONDS):
            self.found.pop(expired, None)
        self.found[(ns, name)] = (time.monotonic(), claim)
        return claim


def _claims(clients: Clients, claims: Claims, spec: api.FineTuneJobSpec, ns: str) -> dict[str, dict[str, Any] | None]:
    return {claim: claims.get(clients, ns, claim) for claim in judge.claim_names(spec)}


def _create(clients: Clients, obj: dict[str, Any]) -> None:
    meta, kind = obj["metadata"], obj["kind"]
    plural, group = {"ConfigMap": ("configmaps", ""), "Service": ("services", ""), "Job": ("jobs", "batch")}[kind]
    try:
        # the answer is not read: deserializing it cost more than the call
        clients.call("POST", api_path(meta["namespace"], plural, group=group), obj)
    except ApiException as exc:
        if exc.status != 409:
            raise
        # AlreadyExists: a previous tick (or operator) made it, or an earlier FineTuneJob of this name did, and the
        # garbage collector has yet to delete it (or never will: `kubectl delete --cascade=orphan` left it ownerless)
        existing = json.loads(clients.call("GET", api_path(meta["namespace"], plural, meta["name"], group=group)))
        owners = [r.get("uid") for r in existing["metadata"].get("ownerReferences") or []]
        if existing["metadata"].get("deletionTimestamp"):
            raise HeldBack("NameTaken", f"the {kind} {meta['name']} is being deleted: waiting for it to go",
                           NAME_TAKEN_RETRY_SECONDS) from exc
        if meta["ownerReferences"][0]["uid"] not in owners:
            raise HeldBack("NameTaken", f"a {kind} named {meta['name']} exists and is not this FineTuneJob's (an "
                           "earlier one's of this name?): waiting for it to be deleted", NAME_TAKEN_RETRY_SECONDS) from exc
        # Made by a try of this attempt cut short before its Job (a quota, the operator killed) from the spec as it
        # was before a suspend, a retune and a resume: beside it, the Job of the new spec ran the old trainer config.
        # By the recipe, not the data: an operator of a later version writes an unchanged spec's defaults anew. One
        # made before the annotation is taken, as then.
        made = (existing["metadata"].get("annotations") or {}).get(children.RECIPE_ANNOTATION)
        if kind == "ConfigMap" and made and made != meta["annotations"][children.RECIPE_ANNOTATION]:
            raise Stale(f"the ConfigMap {meta['name']} was made from an earlier spec, before its Job") from exc


class HeldBack(Exception):
    """The attempt cannot be made yet and waits, trying again after `delay` seconds: a child's name is held by an
    object that is not this job's or that is being deleted (NameTaken), a ResourceQuota refused a child
    (ExceededQuota) until the namespace has room, or the apiserver failed a create or a claim's read otherwise
    (CreateFailed: a mutating webhook down, the operator's own permissions, a 429). `reason` is the Created
    condition's."""

    def __init__(self, reason: str, message: str, delay: float) -> None:
        super().__init__(message)
        self.reason, self.delay = reason, delay


class Stale(Exception):
    """The attempt's ConfigMap exists, this job's, but holds another spec's trainer config: the attempt gives way to
    the next (reconcile), as the operator may not change it."""


NAME_TAKEN_RETRY_SECONDS = 5
CREATE_FAILED, CREATE_RETRY_SECONDS = "CreateFailed", 5
QUOTA_RETRY_SECONDS = 30


class Refused(Exception):
    """The apiserver refused a child built from an accepted spec: the spec cannot run."""


def _create_attempt(clients: Clients, body: dict[str, Any], spec: api.FineTuneJobSpec, attempt: int,
                    settings: Settings) -> None:
    for obj in children.attempt_children(body, spec, attempt, settings):
        try:
            _create(clients, obj)
        except ApiException as exc:
            message = _api_message(exc)
            if exc.status == 403 and "exceeded quota" in message:
                raise HeldBack("ExceededQuota", f"the {obj['kind']} {obj['metadata']['name']} waits for quota: "
                               f"{message}", QUOTA_RETRY_SECONDS) from exc
            if exc.status in (400, 422) or exc.status == 403 and _denied(message):
                raise Refused(f"the apiserver refused the {obj['kind']} {obj['metadata']['name']}: {message}") from exc
            # Said in the status with the apiserver's words: as a kopf error, a new job had no status at all
            raise HeldBack(CREATE_FAILED, f"the {obj['kind']} {obj['metadata']['name']} could not be created: "
                           f"{message}", CREATE_RETRY_SECONDS) from exc
        except (urllib3.exceptions.HTTPError, ValueError) as exc:  # a create that timed out may have landed: a 409 next
            raise HeldBack(CREATE_FAILED, f"the {obj['kind']} {obj['metadata']['name']} could not be created: "
                           f"{_unanswered(exc)}", CREATE_RETRY_SECONDS) from exc


def _unanswered(exc: Exception) -> str:
    return f"the apiserver did not answer ({type(exc).__name__}: {exc})" if isinstance(
        exc, urllib3.exceptions.HTTPError) else f"its answer was not the apiserver's ({exc})"


def _denied(message: str) -> bool:
    """Whether an admission policy refused the request: a webhook's denial is 400 unless the webhook set a code
    (controller-runtime's, so Gatekeeper's and Kueue's, is 403), a ValidatingAdmissionPolicy's 403 or 422 as its
    reason says; final all the same."""
    return "admission webhook" in message and "denied the request" in message or (
        "ValidatingAdmissionPolicy" in message and "denied request" in message)


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


def _end_pod(clients: Clients, told: Once, body: kopf.Body, ns: str, pod: str, why: str) -> bool:
    """Gives `pod` a deadline already past, which its kubelet enforces by killing it (reconcile._stop_outlived), and
    says so in a Warning once it is given. The next ticks, until the pod watch brings the patched spec, patch it
    again, unsaid. A lasting refusal (a ResourceQuota scoped Terminating, a policy engine) is told once too: the
    status is still written, and the next tick tries again. False where the patch may go through at the next try
    (no answer, a 5xx, a 429)."""
    name = body.metadata.name
    try:
        clients.call("PATCH", api_path(ns, "pods", pod), {"spec": {"activeDeadlineSeconds": outcome.ENDING_DEADLINE_SECONDS}},
                     content_type="application/merge-patch+json")
    except ApiException as exc:
        if exc.status == 404:  # gone: ended
            return True
        if exc.status not in (403, 422):  # not a refusal that lasts (a 5xx, a 429): the next tick's
            log.info("%s/%s: pod %s not ended yet: %s", ns, name, pod, _api_message(exc))
            return False
        if told.first((ns, pod, "refused")):
            log.warning("%s/%s: %s; it could not be ended: %s", ns, name, why, _api_message(exc))
            kopf.event(body, type="Warning", reason=reconcile.OUTLIVED, message=f"{why}; it could not be ended "
                       f"(spec.activeDeadlineSeconds): {_api_message(exc)}; delete it")
        return True
    except urllib3.exceptions.HTTPError as exc:
        log.info("%s/%s: pod %s not ended yet: %s", ns, name, pod, _unanswered(exc))
        return False
    if told.first((ns, pod, "ended")):
        log.warning("%s/%s: %s: ending it", ns, name, why)
        kopf.event(body, type="Warning", reason=reconcile.OUTLIVED, message=(
            f"{why}: ending it (spec.activeDeadlineSeconds) so that its Job sees the trainer's end (sidecars injected "
            "as plain containers, by a service mesh or a secrets agent: inject them as native sidecars, Kubernetes "
            "1.29+, or not into trainer pods)"))
    return True


EARLIER_JOBS_KEPT = 3  # the attempts before the current one whose Jobs (and their pods' logs) stay


def _drop_earlier(clients: Clients, ns: str, name: str, uid: str, attempt: int) -> None:
    """Deletes the ConfigMaps and Services of the attempts before `attempt`, of no use once their pods have stopped
    (the next attempt is made only then), before its own are made, and the Jobs of all but the last
    EARLIER_JOBS_KEPT of them. Kept until the job's deletion, a job preempted or retried many times filled a
    ResourceQuota's count of them (`services: 10`, `count/jobs.batch: 20`) and its next attempt waited for quota for
    ever. The Jobs kept are the latest, for their pods' logs. Each is read by its name and deleted only if it is this
    job's (by its uid, as read): no `list`, which would grant reading every ConfigMap of the cluster. One left by a
    failed call goes at the next try, or with the job."""
    dropped = []
    for earlier in range(attempt - 1, 0, -1):
        child = children.child_name(name, earlier)
        kinds = [("configmaps", ""), ("services", "")]
        if earlier < attempt - EARLIER_JOBS_KEPT:
            kinds.append(("jobs", "batch"))
        for plural, group in kinds:
            path = api_path(ns, plural, child, group=group)
            try:
                meta = json.loads(clients.call("GET", path))["metadata"]
                if (meta.get("labels") or {}).get(children.JOB_UID_LABEL) != uid:
                    continue  # an earlier FineTuneJob's of this name, orphaned: not this one's to delete
                # Background: a Job's pods go with it, as they do when the FineTuneJob goes.
                clients.call("DELETE", path, {"preconditions": {"uid": meta["uid"]},
                                              "propagationPolicy": "Background"})
                dropped.append(f"{plural[:-1]} {child}")
            except ApiException as exc:
                if exc.status not in (404, 409):  # gone; replaced since it was read
                    log.info("%s/%s: the %s %s of an earlier attempt is left for now: %s", ns, name, plural[:-1], child,
                             _api_message(exc))
            except (urllib3.exceptions.HTTPError, ValueError) as exc:
                log.info("%s/%s: the %s %s of an earlier attempt is left for now: %s", ns, name, plural[:-1], child,
                         _unanswered(exc))
    if dropped:
        log.info("%s/%s: deleted the earlier attempts' %s", ns, name, ", ".join(dropped))


def _delete(clients: Clients, path: str, what: str) -> None:
    """Deletes the object at `path`, its dependents in the background; one already gone (404) counts as deleted."""
    try:
        clients.call("DELETE", path, propagationPolicy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise kopf.TemporaryError(f"deleting {what}: {exc.reason}", delay=5) from exc


def tick(body: kopf.Body, memo: kopf.Memo, job_index: kopf.Index, pod_index: kopf.Index,
         phase_index: kopf.Index, **_: Any) -> None:
    started = time.perf_counter()
    try:
        _reconcile(body, memo, job_index, pod_index)
    except kopf.TemporaryError:
        raise
    except Exception as exc:
        metrics.RECONCILE_ERRORS.labels(error=type(exc).__name__).inc()
        log.exception("%s/%s: reconcile failed", body.metadata.namespace, body.metadata.name)
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    finally:
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        metrics.JOBS.index = phase_index


def _reconcile(body: kopf.Body, memo: kopf.Memo, job_index: kopf.Index, pod_index: kopf.Index) -> None:
    ns, name = body.metadata.namespace, body.metadata.name
    settings: Settings = memo.settings
    clients: Clients = memo.clients
    if body.metadata.get("deletionTimestamp") or (ns, body.metadata.uid) in memo.vanished.jobs:
        return
    key = (ns, name)
    plain = _plain(body)
    plain["status"] = memo.written.status(plain)
    seen = reconcile.Observed(plain, list(job_index.get(key, [])), list(pod_index.get(key, [])),
                              datetime.now(timezone.utc).replace(tzinfo=None),
                              trainer_gpus=children.gpus(settings.trainer_resources),
                              poll_seconds=settings.poll_seconds)
    if (jobs := reconcile.waits_on_jobs(seen)) or reconcile.waits_on_pods(seen):
        seen = _listed(clients, seen, ns, name, jobs=jobs)
    _sample(seen, memo.slow_scrapes, ns, name)
    if not seen.listed and _in_doubt(seen) and memo.child_checks.due((ns, name, seen.body["metadata"]["uid"])):
        seen = _listed(clients, seen, ns, name, jobs=True)
    seen.job_warning = _job_warning(clients, memo.job_warnings, seen, ns)
    seen.pod_warning = reconcile.pod_warning(seen, lambda pod: memo.pod_warnings.of(clients, ns, pod))
    decision = reconcile.decide(seen)
    if decision is None:
        return
    held: HeldBack | None = None
    if decision.create_attempt:
        spec, _ = reconcile.parse_spec(seen.body)
        assert spec is not None
        try:
            claims = _claims(clients, memo.claims, spec, ns)
            seen.problems = judge.spec_problems(spec, claims, ns, trainer_gpus=seen.trainer_gpus)
            seen.claims_missing = judge.missing_claims(spec, claims, ns)
            if not seen.problems:
                _drop_earlier(clients, ns, name, seen.body["metadata"]["uid"], decision.create_attempt)
                _create_attempt(clients, seen.body, spec, decision.create_attempt, settings)
        except Refused as exc:
            seen.problems = [str(exc)]
        except HeldBack as exc:
            held, seen.held_back = exc, (exc.reason, str(exc))
        except Stale as exc:
            seen.stale = str(exc)
        if seen.problems or held or seen.stale:
            decision = reconcile.decide(seen)
            assert decision is not None
        else:
            log.info("%s/%s: attempt %d created", ns, name, decision.create_attempt)
    if decision.delete_job:
        log.info("%s/%s: deleting Job %s (%s)", ns, name, decision.delete_job, decision.delete_job_reason)
        _delete(clients, api_path(ns, "jobs", decision.delete_job, group="batch"), f"Job {decision.delete_job}")
    unended = [pod for pod, why in decision.end_pods if not _end_pod(clients, memo.told, body, ns, pod, why)]
    finishing = decision.status.get("phase") in api.FINISHED and seen.body["status"].get("phase") not in api.FINISHED
    if unended and finishing:
        # Written finished, the job has no next tick (`_live`) to end them: their Job stayed active on its GPUs. Held
        # for a while, not for ever: a webhook on pods that is down fails every patch, and the end went unwritten.
        if memo.told.repeated((ns, name, body.metadata.uid, "unended")) < END_HOLD_SECONDS:
            raise kopf.TemporaryError(f"pods {', '.join(unended)} not ended yet; the job's end is written once they "
                                      "are", delay=5)
        if memo.told.first((ns, name, body.metadata.uid, "unended told")):
            log.warning("%s/%s: pods %s could not be ended for %d s: writing the job's end", ns, name, unended,
                        END_HOLD_SECONDS)
            kopf.event(body, type="Warning", reason=reconcile.OUTLIVED, message=(
                f"pods {', '.join(unended)} could not be ended for {END_HOLD_SECONDS} s (their patch failed: the "
                "operator's log says why): delete them, their Job holds their GPUs"))
    if decision.delete_self:
        log.info("%s/%s: ttlSecondsAfterFinished has passed: deleting it", ns, name)
        _delete(clients, api_path(ns, api.PLURAL, name, group=api.GROUP, version=api.VERSION), name)
        return
    patch = status_patch(seen.body["status"], decision.status)
    changes, refused = schema_checked(patch)
    for line in refused:  # the rest is written: the conditions and the phase above all
        log.error("%s/%s: not written, the status schema refuses it: %s", ns, name, line)
    # Counted as the write goes out, once: a write that failed, or landed with its answer lost, is made again.
    if (job := _named_job(seen.body["status"], changes)) and memo.counted.first((seen.body["metadata"]["uid"], job)):
        _count_attempt(seen.body)
    try:
        version = _patch_status(clients, ns, name, changes)
    except Exception:
        # Landed with its answer lost (a timeout after the commit)? Read back: the next tick's copy would hold the
        # transition and see none to say, and a finished job has no next tick; its Events and count were lost.
        if "conditions" not in changes or not (version := _stored(clients, ns, name, changes["conditions"])):
            raise
        log.info("%s/%s: the status write's answer was lost, but it was stored", ns, name)
    if version:
        memo.written.wrote(seen.body, changes, version)
    # The transitions' Events once the status holds them: with its conditions left out, they came at every tick.
    if "conditions" in changes or "conditions" not in patch:
        _record(body, seen, decision)
    if held:  # the status says why; kopf tries again after the delay
        raise kopf.TemporaryError(str(held), delay=held.delay)


def _stored(clients: Clients, ns: str, name: str, conditions: list[dict[str, Any]]) -> str | None:
    """The job's resourceVersion where its stored conditions are `conditions` (a write of them landed), else None.
    Read by a list of its one name, which kopf's watch has the operator granted, not a get, which nothing else needs."""
    try:
        listed = json.loads(clients.call("GET", api_path(ns, api.PLURAL, group=api.GROUP, version=api.VERSION),
                                         fieldSelector=f"metadata.name={name}"))
    except (ApiException, urllib3.exceptions.HTTPError, ValueError) as exc:
        log.info("%s/%s: the status write's answer was lost, and reading it back failed: %s", ns, name, exc)
        return None
    job = next(iter(listed.get("items") or []), {})
    same = (job.get("status") or {}).get("conditions") == conditions
    return job.get("metadata", {}).get("resourceVersion") if same else None


def _patch_status(clients: Clients, ns: str, name: str, changes: dict[str, Any]) -> str | None:
    """The status merge patch, sent here and not through kopf's `patch`: kopf sends a timer's patch after the
    handler returns, and one that failed there (a 422, or an apiserver down for longer than kopf's ~54 s of retries)
    ended the timer for good, so the job was never reconciled again until the operator restarted. A failure here is
    the tick's (`tick` makes it a TemporaryError), and the timer ticks again. Returns the resourceVersion the write
    made (None: nothing written)."""
    if not changes:
        return None
    try:
        answer = clients.call("PATCH", api_path(ns, api.PLURAL, name, group=api.GROUP, version=api.VERSION) + "/status",
                              {"status": changes}, content_type="application/merge-patch+json")
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to write
            raise
        return None
    found = RESOURCE_VERSION.search(answer)  # the whole answer is not worth decoding at every write of every job
    return found[1].decode() if found else None


def _named_job(old: dict[str, Any], changes: dict[str, Any]) -> str | None:
    """The attempt's Job a status write names first (children.job), made: at the tick that made it, or, where that
    tick's create of the Job lost its answer, or its write failed, at a later one, which makes it again (a 409, its
    own) or sees it. Counted at the create, an attempt was counted twice, or none at all, or at each tick it was
    held back (a quota)."""
    job = (changes.get("children") or {}).get("job")
    return job if job is not None and job != (old.get("children") or {}).get("job") else None


ONCE_KEEP_SECONDS = 600.0
END_HOLD_SECONDS = 60  # how long a job's end waits for the pods its trainers' sidecars outlive to be ended


class Once:
    """What was done lately, done once each though the ticks repeat it: an attempt counted, by (job uid, Job name)
    (the status write that first names an attempt's Job may fail, or land with its answer lost, the watch then
    bringing the Job named, never written again, and the next tick's names it again); a pod's end told, by (namespace,
    pod, ended or refused); how long a job's end has waited for pods to be ended. Forgotten ONCE_KEEP_SECONDS after
    it was last repeated, long past such a retry."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, ...], tuple[float, float]] = {}  # when first done, when last repeated
        self.swept = time.monotonic()

    def first(self, key: tuple[str, ...]) -> bool:
        return self.began(key) is None

    def repeated(self, key: tuple[str, ...]) -> float:
        """Seconds since `key` was first done, of its run of repeats (0 the first time)."""
        began = self.began(key)
        return 0.0 if began is None else time.monotonic() - began

    def began(self, key: tuple[str, ...]) -> float | None:
        """When `key` was first done, of its run of repeats (None: it is now); notes it done now."""
        self.swept = _swept(self.at, ONCE_KEEP_SECONDS, self.swept, itemgetter(1))
        now = time.monotonic()
        began = self.at[key][0] if key in self.at else None
        self.at[key] = (now if began is None else began, now)
        return began


def _count_attempt(body: kopf.Body) -> None:
    """attempts_total, by the cause of the attempt: the Restarting reason that decided it."""
    restarting = condition(body["status"].get("conditions"), T.RESTARTING)
    cause = restarting["reason"] if restarting.get("status") == "True" else "Created"
    metrics.bounded(metrics.ATTEMPTS, cause).inc()


# metadata's: the apiserver writes a custom resource's keys sorted, so uid follows it (a label or an annotation keyed
# resourceVersion comes before it, in labels' or annotations' object)
RESOURCE_VERSION = re.compile(rb'"resourceVersion":"([0-9]+)","uid":"')


def _record(body: kopf.Body, seen: reconcile.Observed, decision: reconcile.Decision) -> None:
    """Events for the transitions, each in the log too (the operator's log said only "attempt 1 created" of a job
    that ran and succeeded), and the metrics that count them."""
    before = {c["type"] for c in seen.body["status"].get("conditions") or [] if c["status"] == "True"}
    for kind, reason, message in decision.events:
        kopf.event(body, type=kind, reason=reason, message=message)
        log.log(logging.WARNING if kind == "Warning" else logging.INFO, "%s/%s: %s: %s", body.metadata.namespace,
                body.metadata.name, reason, message)
    after = {c["type"]: c for c in decision.status.get("conditions") or [] if c["status"] == "True"}
    # The job's first run: no Running condition yet, or only the one saying why attempt 1's containers did not start
    # (an image pull that failed before one succeeded): left out, the slowest starts were never observed.
    old = seen.body["status"]
    running = condition(old.get("conditions"), T.RUNNING)
    if T.RUNNING in after and (not running or not_started(running) and old.get("attempts") == 1):
        created = outcome.parse_time(body.metadata["creationTimestamp"])
        metrics.TIME_TO_RUNNING.observe((seen.now - created).total_seconds())
    if T.FAILED in after and T.FAILED not in before:
        metrics.bounded(metrics.FAILURES, after[T.FAILED]["reason"]).inc()


def _connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """What `load_config` found, as kopf's login_via_client reads it from the kubernetes client (which would
    find the ServiceAccount before $KUBECONFIG). The token is read at each login: kopf logs in again on a 401, and
    the client's in-cluster loader re-reads a projected token that was rotated."""
    try:
        load_config()
    except ConfigException as exc:  # as kopf's: the operator stops, saying why
        raise kopf.LoginError(f"no Kubernetes credentials: neither $KUBECONFIG nor a ServiceAccount ({exc})") from exc
    conf = Configuration.get_default_copy()
    header = conf.get_api_key_with_prefix("BearerToken") or conf.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=conf.host, ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl, username=conf.username or None,
        password=conf.password or None, scheme=scheme or None, token=token or None, certificate_path=conf.cert_file,
        private_key_path=conf.key_file, trust_env=settings.networking.trust_env, priority=LOGIN_PRIORITY)


LOGIN_PRIORITY = 10  # kopf's own for login_via_client
# A login that fails (an exec plugin's network blip) is tried this often, this long apart, before the operator stops.
LOGIN_TRIES, LOGIN_BACKOFF_SECONDS = 3, 5.0
# Logins with unchanged credentials: each waits 1, 2, 4, ... s, and past this many in UNCHANGED_WINDOW_SECONDS the
# credentials count as refused (a revoked token) and the operator stops.
UNCHANGED_LOGINS, UNCHANGED_WINDOW_SECONDS, UNCHANGED_BACKOFF_SECONDS = 5, 300.0, 1.0


@dataclasses.dataclass
class Login:
    info: kopf.ConnectionInfo
    session: kopf.AiohttpSession
    unchanged: list[float]  # when logins found these credentials again (monotonic), within the window


async def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
    """$KUBECONFIG when set, else the pod's ServiceAccount, else ~/.kube/config (`load_config`), as the
    handlers' own calls find it.

    Through a session of our own, for its bounded connection pool: kopf's own allows any number of connections,
    and a burst of status patches and Events opened hundreds of TLS connections at once (about 0.4 MB each: most
    of the operator's memory with a thousand jobs). The watch streams hold one connection each, so they count.

    kopf logs in again after a 401, and after a TLS hiccup that closed the session. Unchanged credentials get a new
    session a few times, more slowly each time (an authenticator restarting with the apiserver); then the old one,
    which kopf refuses as it refuses equal credentials, and stops. A new session is never equal to an old one: given
    one each time, kopf logged in again at the speed of its requests for ever (a revoked token)."""
    # In a thread: a kubeconfig's exec plugin (a cloud's token command) takes seconds, and held up the event loop
    info = await asyncio.to_thread(_connection, settings)
    last: Login | None = memo.get("login")
    unchanged: list[float] = []
    if last is not None and last.info == info:
        now = time.monotonic()
        unchanged = [t for t in last.unchanged if now - t < UNCHANGED_WINDOW_SECONDS] + [now]
        if len(unchanged) > UNCHANGED_LOGINS:
            log.error("finetune-operator: the apiserver refused the same credentials %d times in %.0f s: stopping",
                      len(unchanged), UNCHANGED_WINDOW_SECONDS)
            return last.session
        await asyncio.sleep(UNCHANGED_BACKOFF_SECONDS * 2 ** (len(unchanged) - 1))
        info = await asyncio.to_thread(_connection, settings)  # a token rotated meanwhile: one 401 fewer
        unchanged = unchanged if info == last.info else []
    ours: Settings = memo.settings
    watches = 3 * max(1, len(ours.namespaces))  # FineTuneJobs, Jobs and pods in each watched namespace
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=watches + API_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), trust_env=info.trust_env)  # basic auth, if any, is in the headers
    memo.login = Login(info, kopf.AiohttpSession(
        aiohttp_session=session, server=info.server, default_namespace=info.default_namespace, priority=info.priority,
        expiration=info.expiration), unchanged)
    return memo.login.session


FORBIDDEN_RETRIES = (1.0, 2.0)  # seconds: RBAC applied with the operator (a helm upgrade) may take a moment
# Each probe's one try: /healthz waits for them (the chart's liveness probe kills the operator ~50 s into its start).
PROBE_TIMEOUT_SECONDS = 5.0


def watchable(namespaces: tuple[str, ...]) -> tuple[str, ...]:
    """The watched namespaces this operator may read. kopf runs no handler until every watch has listed once, so one
    namespace whose Role is gone (deleted with it, or recreated without it) held up the jobs of all the others, and
    the operator's /healthz, at every start until watchNamespaces was changed. Those are left out, and said so; where
    none is left, all are kept (kopf retries them)."""
    if not namespaces:
        return namespaces
    clients = Clients(connections=1, timeout=PROBE_TIMEOUT_SECONDS, retries=False)
    forbidden = _forbidden(clients, namespaces)
    for wait in FORBIDDEN_RETRIES:  # in rounds: each namespace's Role may lag, but the waits are paid once
        if not forbidden:
            break
        time.sleep(wait)
        forbidden = _forbidden(clients, forbidden)
    readable = tuple(ns for ns in namespaces if ns not in forbidden)
    if readable and forbidden:
        log.warning("finetune-operator: not watching %s: forbidden to list FineTuneJobs there (its Role is missing: "
                    "the namespace was deleted?); the operator restarts once it may list them", ", ".join(forbidden))
    return readable or namespaces


CRD_WAIT_SECONDS = 30.0


def crd_served(clients: Clients) -> bool | None:
    """Whether the apiserver serves FineTuneJobs (its discovery of the group's version lists them); None where it did
    not say (no answer, another error)."""
    try:
        found = json.loads(clients.call("GET", f"/apis/{api.GROUP}/{api.VERSION}"))
    except ApiException as exc:
        return False if exc.status == 404 else None
    except (urllib3.exceptions.HTTPError, ValueError):
        return None
    return any(r.get("name") == api.PLURAL for r in found.get("resources") or [])


def wait_for_crd() -> bool:
    """kopf finds the resources it watches once, as it starts (its watch of CRDs is off: it needs cluster-wide
    rights). Started before the CRD was served (`helm install --skip-crds` and the CRD applied later, a GitOps sync
    out of order), or by a restart after the CRD's deletion, the operator watched Jobs and pods and never a
    FineTuneJob, for good, with /healthz answering and the Lease held. Waits up to CRD_WAIT_SECONDS for it; False
    where the apiserver still says it is not served (the caller exits, and its restart looks again). An apiserver
    that does not say is kopf's to retry."""
    clients = Clients(connections=1, timeout=PROBE_TIMEOUT_SECONDS, retries=False)
    deadline = time.monotonic() + CRD_WAIT_SECONDS
    while (served := crd_served(clients)) is False and time.monotonic() < deadline:
        time.sleep(1)
    return served is not False


READABLE_CHECK_SECONDS = 60.0


def stop_once_readable(namespaces: tuple[str, ...], stop: Callable[[], None]) -> None:
    """Calls `stop` once one of `namespaces`, left out by `watchable`, may be read: its Role came back (`helm upgrade`
    after the namespace was made again, a GitOps sync), and kopf cannot add a namespace to its watches, so its jobs
    went unobserved until someone restarted the operator. Started again, it watches it. Tried every
    READABLE_CHECK_SECONDS on a thread of its own."""
    def probe() -> None:
        clients = Clients(connections=1, timeout=PROBE_TIMEOUT_SECONDS, retries=False)
        while True:
            time.sleep(READABLE_CHECK_SECONDS)
            if readable := [ns for ns in namespaces if _listable(clients, ns)]:
                log.warning("finetune-operator: %s may be read now: stopping, to be started again watching it",
                            ", ".join(readable))
                stop()
                return

    threading.Thread(target=probe, name="readable-namespaces", daemon=True).start()


def _listable(clients: Clients, ns: str) -> bool:
    try:
        _list_one(clients, ns)
    except (ApiException, urllib3.exceptions.HTTPError):
        return False
    return True


def _list_one(clients: Clients, ns: str) -> None:
    """Lists one FineTuneJob in `ns`: whether the operator may read them there."""
    clients.call("GET", api_path(ns, api.PLURAL, group=api.GROUP, version=api.VERSION), limit="1")


def _forbidden(clients: Clients, namespaces: tuple[str, ...]) -> tuple[str, ...]:
    """Those where the apiserver forbids listing FineTuneJobs. Any other failure is kopf's to retry: it ends the
    probing, the rest taken as readable, since an apiserver that does not answer would cost each a timeout. The
    trade-off: with retries off, one transient error (a 500 or 429 while the apiserver rolls) keeps every namespace
    not yet probed, a forbidden one too, whose watch then holds kopf up again until the next start."""
    forbidden: list[str] = []
    for ns in namespaces:
        try:
            _list_one(clients, ns)
        except ApiException as exc:
            if exc.status != 403:
                break
            forbidden.append(ns)
        except urllib3.exceptions.HTTPError:  # the apiserver not answering
            break
    return tuple(forbidden)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    # Tried LOGIN_TRIES times, then the operator stops saying why: retried without end, it tried every minute for ever.
    kopf.on.login(registry=registry, retries=LOGIN_TRIES, backoff=LOGIN_BACKOFF_SECONDS)(login)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.startup(registry=registry)(look_for_vanished)
    selector = {children.JOB_NAME_LABEL: kopf.PRESENT}  # also filtered by the apiserver, see configure
    (jobs, pods) = CHILD_WATCHES
    kopf.index(*jobs, labels=selector, registry=registry, id="job_index")(index_jobs)
    kopf.index(*pods, labels=selector, registry=registry, id="pod_index")(index_pods)
    # Only ours: another controller's jobs (never reconciled here) were counted Pending for ever.
    kopf.index(api.GROUP, api.VERSION, api.PLURAL, when=ours, registry=registry, id="phase_index")(index_phases)
    kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry, id="slim_body")(slim_body)
    # One of the two runs for each live job; kopf swaps them when the job's phase changes (the new one ticks at once).
    kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=settings.poll_seconds, when=ticks_every_poll,
               registry=registry, id="reconcile")(tick)
    kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=settings.poll_seconds * WAITING_POLLS, when=ticks_slowly,
               registry=registry, id="reconcile-waiting")(tick)
