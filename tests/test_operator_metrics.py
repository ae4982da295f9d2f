"""The operator's own /metrics, wired as kopf wires it, without a cluster."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta
from typing import Any

import kopf
import pytest
from kopf._cogs.structs.references import Resource
from kopf._core.engines.indexing import IndexingMemory, OperatorIndexers, index_resource
from kubernetes.client.exceptions import ApiException
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import api, handlers, metrics, outcome, reconcile
from finetune_operator.settings import Settings
from finetune_operator.status import merged
from granted import asked, granted_by_rules


def jobs_by_phase() -> dict[str, float]:
    text = generate_latest(metrics.REGISTRY).decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "finetune_operator_jobs")
    return {s.labels["phase"]: s.value for s in family.samples}


def started(monkeypatch: pytest.MonkeyPatch) -> tuple[kopf.OperatorRegistry, OperatorIndexers]:
    """The operator's handlers registered and its startup handler run, with the indexers kopf keeps for them."""
    monkeypatch.setattr(handlers, "Clients", lambda connections: None)  # no API server here
    monkeypatch.setattr(metrics.JOBS, "index", None)
    monkeypatch.setattr(metrics.JOBS, "gone", frozenset(), raising=False)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Settings(metrics_port=0))
    indexers = OperatorIndexers()
    indexers.ensure(registry._indexing.get_all_handlers())  # as kopf does before its startup handlers
    # The startup handler, with the kwargs kopf gives it (its indices among them).
    handlers.configure(settings=kopf.OperatorSettings(), memo=kopf.Memo(settings=Settings(metrics_port=0)),
                       **dict(indexers.indices))
    return registry, indexers


def listed(registry: kopf.OperatorRegistry, indexers: OperatorIndexers, name: str, phase: str | None = None,
           namespace: str = "team-a", **spec: str) -> None:
    """The FineTuneJob `name` (its uid too) handed to the index handlers, as kopf's watch hands each one."""
    raw = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": "FineTuneJob", "spec": spec,
           "status": {"phase": phase} if phase else {}, "metadata": {"namespace": namespace, "name": name, "uid": name}}
    asyncio.run(index_resource(
        indexers=indexers, registry=registry, settings=kopf.OperatorSettings(),
        resource=Resource(api.GROUP, api.VERSION, api.PLURAL), raw_event={"type": None, "object": raw},
        memory=IndexingMemory(), logger=logging.getLogger("test"), memo=kopf.Memo(), body=kopf.Body(raw)))


def test_jobs_by_phase_counts_finished_jobs_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator restarted onto finished jobs never reconciles them (no timer runs for them), and the gauge was
    given kopf's index only by a reconcile: it said 0 in every phase for as long as no job was live."""
    registry, indexers = started(monkeypatch)
    listed(registry, indexers, "done", "Succeeded")
    listed(registry, indexers, "broken", "Failed")
    assert jobs_by_phase() == {"Pending": 0, "Running": 0, "Suspended": 0, "Succeeded": 1, "Failed": 1}


def test_jobs_by_phase_leaves_out_jobs_another_controller_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FineTuneJob whose spec.managedBy names another controller is never reconciled here, so it has no phase of
    this operator's: it was counted Pending, for as long as it existed."""
    registry, indexers = started(monkeypatch)
    listed(registry, indexers, "ours")
    listed(registry, indexers, "also-ours", managedBy=api.MANAGED_BY)
    listed(registry, indexers, "kueues", managedBy="kueue.x-k8s.io/multikueue")
    assert jobs_by_phase()["Pending"] == 2


class JobList:
    """Clients whose apiserver lists the FineTuneJobs `uids` of team-a, one a page, or fails with `error` (in the
    namespace `refused` alone, where one is named); `meanwhile` runs as a list begins (a job created then is in the
    index, not in the list)."""

    def __init__(self, uids: list[str], meanwhile: Any = lambda: None, error: Exception | None = None,
                 refused: str | None = None) -> None:
        self.uids, self.meanwhile, self.error, self.refused = uids, meanwhile, error, refused
        self.asked: list[tuple[str, str, dict[str, object]]] = []

    def call(self, method: str, path: str, body: Any = None, accept: str = "", **query: str) -> bytes:
        self.asked.append((path, accept, query))
        if self.error and (self.refused is None or f"/namespaces/{self.refused}/" in path):
            raise self.error
        if "/namespaces/" in path and "/namespaces/team-a/" not in path:
            return json.dumps({"items": [], "metadata": {}}).encode()
        at = int(query.get("continue", 0))
        if not at:
            self.meanwhile()
        more = str(at + 1) if at + 1 < len(self.uids) else ""
        return json.dumps({"items": [{"metadata": {"namespace": "team-a", "uid": uid}}
                                     for uid in self.uids[at:at + 1]], "metadata": {"continue": more}}).encode()


def test_a_job_deleted_while_the_watch_was_down_is_counted_and_reconciled_no_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf drops a job from its indexes at its DELETED event only, and lists again after a watch's 410 Gone,
    reporting what exists: a job deleted in that gap (a finished one has no finalizer that waits for the operator)
    was counted in its phase for ever, and one whose finalizer was taken off by hand was still reconciled."""
    registry, indexers = started(monkeypatch)
    for name, phase in [("done", "Succeeded"), ("kept", "Succeeded"), ("lost", "Running")]:
        listed(registry, indexers, name, phase)
    assert jobs_by_phase() == {"Pending": 0, "Running": 1, "Suspended": 0, "Succeeded": 2, "Failed": 0}
    vanished, index = handlers.Vanished(), indexers.indices["phase_index"]
    apiserver = JobList(["kept"], meanwhile=lambda: listed(registry, indexers, "new"))
    vanished.check(apiserver, ("team-a", "team-b"), index)  # a namespace listed per page, and then the next
    assert jobs_by_phase() == {"Pending": 1, "Running": 0, "Suspended": 0, "Succeeded": 1, "Failed": 0}
    assert [path for path, *_ in apiserver.asked] == [f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{ns}/finetunejobs"
                                                      for ns in ("team-a", "team-b")]
    assert {(accept, query["limit"]) for _, accept, query in apiserver.asked} == {
        (handlers.PARTIAL_METADATA, str(handlers.LIST_CHUNK))}
    paged = JobList(["kept", "new", "done"])
    vanished.check(paged, (), index)  # every namespace's, in pages
    assert [(path, query.get("continue")) for path, _, query in paged.asked] == [
        (f"/apis/{api.GROUP}/{api.VERSION}/finetunejobs", None), (f"/apis/{api.GROUP}/{api.VERSION}/finetunejobs", "1"),
        (f"/apis/{api.GROUP}/{api.VERSION}/finetunejobs", "2")]
    assert vanished.jobs == {("team-a", "lost")} and jobs_by_phase()["Succeeded"] == 2
    vanished.check(JobList([], error=ApiException(status=500)), (), index)  # a failed list changes nothing
    assert vanished.jobs == {("team-a", "lost")}

    from test_operator_reconcile import body
    lost = body({"phase": "Running"})
    lost["metadata"] |= {"namespace": "team-a", "uid": "lost"}
    apiserver = JobList([], error=AssertionError("a call for a job that is gone"))
    memo = kopf.Memo(settings=Settings(), clients=apiserver, vanished=vanished)
    handlers.tick(kopf.Body(lost), memo, {}, {}, index)
    assert apiserver.asked == []


def test_a_namespace_whose_jobs_cannot_be_listed_leaves_the_others_checked(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One watched namespace whose list is refused (its Role gone with a deleted namespace's RoleBinding: a 403 at
    every check, and its watch's deletions likeliest missed) made every check fail, said at debug only: no job
    deleted unseen in any namespace was dropped. The others are checked; the refused one keeps what it had."""
    registry, indexers = started(monkeypatch)
    listed(registry, indexers, "a-gone", "Succeeded")
    listed(registry, indexers, "b-gone", "Succeeded", namespace="team-b")
    vanished, index = handlers.Vanished(), indexers.indices["phase_index"]
    vanished.check(JobList([]), ("team-a", "team-b"), index)
    assert vanished.jobs == {("team-a", "a-gone"), ("team-b", "b-gone")}
    listed(registry, indexers, "a-later-gone", "Running")
    listed(registry, indexers, "b-later", "Running", namespace="team-b")
    vanished.check(JobList([], error=ApiException(status=403), refused="team-b"), ("team-a", "team-b"), index)
    assert vanished.jobs == {("team-a", "a-gone"), ("team-a", "a-later-gone"), ("team-b", "b-gone")}
    assert jobs_by_phase() == {"Pending": 0, "Running": 1, "Suspended": 0, "Succeeded": 0, "Failed": 0}
    assert "FineTuneJobs in team-b not listed" in caplog.text


def test_time_to_running_counts_a_job_whose_image_pull_failed_before_it_ran(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A pull that failed and then succeeded (a registry's rate limit) left Running=False ErrImagePull before the
    first Running=True, which was taken for a job that had run before: the slowest starts were never observed."""
    from test_operator_reconcile import NOW, after, body, job, pod

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no kopf event poster outside kopf

    def observed() -> float:
        return metrics.REGISTRY.get_sample_value("finetune_operator_time_to_running_seconds_count") or 0.0

    def tick(status: dict[str, Any], seen_job: dict[str, Any], seen_pod: dict[str, Any], at: datetime
             ) -> dict[str, Any]:
        seen = reconcile.Observed(body(status), [seen_job], [seen_pod], at)
        decision = reconcile.decide(seen)
        handlers._record(kopf.Body(seen.body), seen, decision)
        return after(decision, status)

    pulling = pod(phase="Pending", stuck={"reason": "ErrImagePull", "message": "429 Too Many Requests"})
    status = tick({"attempts": 1}, job(), pulling, NOW)
    assert status["reason"] == "ErrImagePull"
    before = observed()
    caplog.set_level(logging.INFO, "finetune_operator")
    status = tick(status, job(ready=1), pod(), NOW + timedelta(minutes=3))
    assert status["phase"] == "Running" and observed() == before + 1
    # Each transition's Event is in the operator's log too
    assert ("INFO", "ns/ft: Training: 1 worker(s) running") in [(r.levelname, r.getMessage()) for r in caplog.records]
    # A retried attempt's start is not the job's first: its image pull failing first changes nothing.
    failed = pod(phase="Failed", exit_code=2, message={"exitCode": 2, "reason": "RuntimeError", "message": "NCCL"})
    status = tick(status, job(failure={"reason": "X", "message": ""}), failed, NOW + timedelta(minutes=4))
    status = tick(status, job(2), pod(2, phase="Pending", stuck={"reason": "ErrImagePull", "message": "429"}),
                  NOW + timedelta(minutes=5))
    status = tick(status, job(2, ready=1), pod(2), NOW + timedelta(minutes=6))
    assert status["phase"] == "Running" and status["attempts"] == 2 and observed() == before + 1


def test_time_to_running_tells_apart_waits_of_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job queued for GPUs (Kueue) waits hours before it runs; past the top bucket, 1 h, the dashboard's
    histogram_quantile reads that bucket's bound: its p95 said 1 h of waits of 3 h. Up to a day, a wait lands in a
    finite bucket, whose bound is hours from it at most."""
    from test_operator_reconcile import NOW, after, body, job, pod

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no kopf event poster outside kopf

    def buckets() -> dict[float, float]:
        text = generate_latest(metrics.REGISTRY).decode()
        family = next(f for f in text_string_to_metric_families(text)
                      if f.name == "finetune_operator_time_to_running_seconds")
        return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}

    created = after(reconcile.decide(reconcile.Observed(body(), [], [], NOW)))
    before = buckets()
    seen = reconcile.Observed(body(created), [job(ready=1)], [pod()], NOW + timedelta(hours=3))
    decision = reconcile.decide(seen)
    assert after(decision, created)["phase"] == "Running"
    handlers._record(kopf.Body(seen.body), seen, decision)
    holding = [le for le, count in buckets().items() if count > before.get(le, 0)]
    assert 3 * 3600 < min(holding) <= 5 * 3600


def test_reasons_a_trainer_image_writes_add_a_bounded_number_of_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure reason is the termination message's, which a user's own image writes: one writing a new word at
    each job (or attempt) added a series to job_failures_total for each, kept for the operator's life (1000 jobs,
    1000 series), though the labels are documented as small fixed sets. Past metrics.MAX_LABEL_VALUES, the rest
    count as Other."""
    from test_operator_reconcile import NOW, body, job, pod

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no kopf event poster outside kopf

    def series() -> dict[str, float]:
        text = generate_latest(metrics.REGISTRY).decode()
        family = next(f for f in text_string_to_metric_families(text) if f.name == "finetune_operator_job_failures")
        return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}

    before = sum(series().values())
    for i in range(1000):
        message = {"exitCode": 1, "reason": f"Tenant{i}", "message": "x"}
        seen = reconcile.Observed(body({"attempts": 1}), [job(failure={"reason": "X", "message": ""})],
                                  [pod(phase="Failed", exit_code=1, message=message)], NOW)
        decision = reconcile.decide(seen)
        assert decision.status["reason"] == f"Tenant{i}"  # the job's own status says it as written
        handlers._record(kopf.Body(seen.body), seen, decision)
    counted = series()
    assert len(counted) <= metrics.MAX_LABEL_VALUES + 1 and sum(counted.values()) == before + 1000
    assert counted["Other"] >= 1000 - metrics.MAX_LABEL_VALUES


GRANTED = granted_by_rules()


class Creating:
    """Clients whose apiserver refuses what the operator's RBAC rules do not grant, keeps the children created (a
    second create of one answers 409 AlreadyExists), has every claim, lists no Events, and refuses the first `failing`
    status patches (or, `landed`, stores them in `status` and loses their answers), or keeps the first Job created but
    loses its answer (`lost`), or refuses the first `quota` creates of the Job for a ResourceQuota."""

    def __init__(self, failing: int = 0, lost: bool = False, quota: int = 0, landed: bool = False) -> None:
        self.made: dict[str, Any] = {}  # by path
        self.status: dict[str, Any] = {}
        self.failing, self.lost, self.quota, self.landed = failing, lost, quota, landed

    def call(self, method: str, path: str, body: Any = None, **query: str) -> bytes:
        if asked(method, path) not in GRANTED:
            raise ApiException(status=403, reason="Forbidden")
        if method == "POST":
            path = f"{path}/{body['metadata']['name']}"
            if body["kind"] == "Job" and self.quota:
                self.quota -= 1
                message = f'jobs "ft-1" is forbidden: exceeded quota: q, requested: count/jobs=1, used: {self.quota}'
                raise ApiException(status=403, reason="Forbidden", body=json.dumps({"message": message}))
            if path in self.made:
                raise ApiException(status=409, reason="AlreadyExists")
            self.made[path] = body
            if self.lost and body["kind"] == "Job":
                self.lost = False
                raise ApiException(status=504, reason="Gateway Timeout")
        elif method == "PATCH" and self.failing:
            self.failing -= 1
            if self.landed:
                self.status = merged(self.status, body["status"])
                raise ApiException(status=504, reason="Gateway Timeout")
            raise ApiException(status=500, reason="Internal Server Error")
        elif method == "PATCH":
            self.status = merged(self.status, body["status"])
            return b'{"metadata":{"resourceVersion":"7","uid":"u"}}'
        elif "/persistentvolumeclaims/" in path:
            return json.dumps({"spec": {"accessModes": ["ReadWriteMany"]}}).encode()
        if path.endswith("/finetunejobs") and query.get("fieldSelector") == "metadata.name=ft":  # as stored: a
            # status write that landed is read back
            return json.dumps({"items": [{"metadata": {"resourceVersion": "8"}, "status": self.status}]}).encode()
        return json.dumps(self.made.get(path) or {"items": []}).encode()


def ticks(apiserver: Creating, n: int, monkeypatch: pytest.MonkeyPatch, watched: bool = False,
          said: list[str] | None = None) -> list[float]:
    """attempts_total{cause=Created} after each of `n` ticks of the same copy of a new FineTuneJob (no status write
    seen), from before the first; a tick that raises TemporaryError is one that failed. `watched`: the Jobs' index
    holds the Jobs made before each tick, and the copy the status stored. The Events' reasons go to `said`."""
    from test_operator_reconcile import body

    # no kopf event poster outside kopf
    monkeypatch.setattr(kopf, "event", lambda *_, reason, **__: said is not None and said.append(reason))
    monkeypatch.setattr(metrics.JOBS, "index", None)
    memo = kopf.Memo(settings=Settings(), clients=apiserver, slow_scrapes=handlers.SlowScrapes(2.0),
                     child_checks=handlers.ChildChecks(), written=handlers.Written(), counted=handlers.Once(),
                     told=handlers.Once(), vanished=handlers.Vanished(),
                     job_warnings=handlers.Warnings("Job"), pod_warnings=handlers.Warnings("Pod"),
                     claims=handlers.Claims())

    def counted() -> float:
        return metrics.REGISTRY.get_sample_value("finetune_operator_attempts_total", {"cause": "Created"}) or 0.0

    before, after = counted(), []
    copy = body()
    for _ in range(n):
        made = [outcome.job_summary(job) for path, job in apiserver.made.items() if "/jobs/" in path]
        if watched:
            copy["status"] = apiserver.status
        try:
            handlers.tick(kopf.Body(copy), memo, {("ns", "ft"): made} if watched and made else {}, {}, {})
        except kopf.TemporaryError:
            pass
        after.append(counted() - before)
    return after


@pytest.mark.parametrize("watched", [False, True], ids=["job-not-yet-watched", "job-watched"])
@pytest.mark.parametrize(("apiserver", "counts"), [
    (lambda: Creating(failing=1), [1, 1, 1]), (lambda: Creating(failing=1, landed=True), [1, 1, 1]),
    (lambda: Creating(lost=True), [0, 1, 1])], ids=["status-write-failed", "status-answer-lost", "job-answer-lost"])
def test_an_attempt_is_counted_once_when_its_tick_failed_after_making_its_children(
        monkeypatch: pytest.MonkeyPatch, apiserver: Any, counts: list[int], watched: bool) -> None:
    """A tick made the attempt's children and failed: its status patch (or the answer to it, the status stored), or
    the answer to its create of the Job. The next tick, before the watch brought the Job, made them again and took
    the 409s for its own children; or, the Job watched, saw it. Counted at the create, the attempt was counted
    twice, or never (counted where a create made the Job, and a watched Job is made by none); counted where a write
    that names the Job landed, never, where the watch brought the status before a tick wrote it again."""
    fake = apiserver()
    assert ticks(fake, 3, monkeypatch, watched) == counts
    assert "/apis/batch/v1/namespaces/ns/jobs/ft-1" in fake.made


@pytest.mark.parametrize("landed", [False, True], ids=["status-write-failed", "status-answer-lost"])
def test_a_transitions_events_are_said_once_when_its_status_write_failed(
        monkeypatch: pytest.MonkeyPatch, landed: bool) -> None:
    """Events are posted once the status holds the transition. Where the write landed and its answer was lost, the
    next tick's copy (the watch's) held it and saw no transition: its Events were never said. Where it failed, the
    next tick says them after its own write."""
    said: list[str] = []
    ticks(Creating(failing=1, landed=landed), 3, monkeypatch, watched=True, said=said)
    assert said.count("AttemptCreated") == 1, said


def test_a_jobs_end_is_said_and_counted_where_its_status_writes_answer_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished job is never reconciled again: where the write of its end landed with its answer lost, its Failed
    Warning and its failure's count were lost for good. The write is read back."""
    from test_operator_reconcile import body, job, pod

    said: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *_, reason, **__: said.append(reason))
    memo = kopf.Memo(settings=Settings(), clients=Creating(failing=1, landed=True), slow_scrapes=handlers.SlowScrapes(2.0),
                     child_checks=handlers.ChildChecks(), written=handlers.Written(), counted=handlers.Once(),
                     told=handlers.Once(), vanished=handlers.Vanished(), job_warnings=handlers.Warnings("Job"),
                     pod_warnings=handlers.Warnings("Pod"), claims=handlers.Claims())
    bad = {"exitCode": 1, "reason": "InvalidDataset", "message": "no column label", "stage": "Loading"}
    ended = job(failure={"reason": "BackoffLimitExceeded", "message": ""})

    def failures() -> float:  # of every reason: another test may have used up the reasons counted by name
        return sum(s.value for family in metrics.REGISTRY.collect() if family.name == "finetune_operator_job_failures"
                   for s in family.samples if s.name.endswith("_total"))

    before = failures()
    handlers.tick(kopf.Body(body({"attempts": 1, "children": {"job": "ft-1"}})), memo, {("ns", "ft"): [ended]},
                  {("ns", "ft"): [pod(phase="Failed", exit_code=1, message=bad)]}, {})
    assert memo.clients.status["phase"] == "Failed" and said.count("InvalidDataset") == 1, said
    assert failures() == before + 1


def test_an_attempt_held_back_by_a_quota_is_counted_once_when_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused for a ResourceQuota, the attempt waits and is tried again at each tick, its status written (Created
    False ExceededQuota, with the quota's use): counted at each such write, one attempt counted four times."""
    assert ticks(Creating(quota=3), 4, monkeypatch) == [0, 0, 0, 1]
