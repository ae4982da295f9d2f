"""(e) The operator at scale, on a local control plane of its own (deploy/local, state in .cluster-bench/).

- Burst: N FineTuneJobs created at once (a pool of --clients threads) against the same N batch/v1 Jobs created
  directly, side by side in one run, on the same cluster, in an order that rotates between rounds. kwok's GPU
  nodes run the pods (ready at once, complete 1–5 s later), so the operator and the control plane are what is
  measured. One watch observes both sides' Jobs, so both clocks stop the same way.
- --ideal: a third side, the floor of any operator: each FineTuneJob created where no operator watches, and right
  after it (same client thread) its Job. Each side also counts the apiserver's writes per job (its /metrics, every
  client's), until every child Job exists and until all have finished.
- Creates alone: the same N FineTuneJobs created in a namespace no operator watches, before each round's pair: the
  apiserver's own share of the operator side's time (its schema and CEL validation), which no operator can remove.
- Memory: the operator's RSS, sampled every 0.5 s, and its CPU seconds; and with --live-jobs FineTuneJobs held live
  (pods that run for an hour), its RSS and CPU once every one has its child Job.
- Freshness: real trainer pods on the process node; the bench reads each rank 0's /metrics every 0.1 s and the
  FineTuneJob's status, and times each status step from the moment the pod first reported it.
- --profile: py-spy samples the operator during the largest burst (its top functions go into the report).
- Write costs (--write-costs N, before the operator starts): the control plane's CPU per write of each kind the two
  sides make (N of each at once, in the unwatched namespace): what a FineTuneJob's create, status patch and finalizer
  patch cost the apiserver against a Job's, a ConfigMap's and an Event's.

    python -m bench.operator_scale                      # N = 100 (2 rounds) and 1000 (1 round), freshness
    python -m bench.operator_scale --jobs 50 --rounds 1 --freshness-jobs 0 --out /tmp/scale   # a trial
    python -m bench.operator_scale --jobs 100 --live-jobs 0 --freshness-jobs 0 --children-only --ideal --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO, RESULTS, command_line, fmt, machine, refuse_dirty_tree, result_stem, write_results
from finetune_operator import api, children
from finetune_operator.handlers import FINALIZER
from finetune_operator.outcome import STUCK_WAITING
from finetune_operator.scrape import ScrapeError, scrape
from finetune_operator.settings import Settings

sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "tests"))
import cluster as local  # noqa: E402  deploy/local/cluster.py
from kube import Kube  # noqa: E402  tests/kube.py: kubectl with the cluster's kubeconfig
from operator_fixture import ASSETS, claim, free_port, install_crd, kwok_claim, kwok_job  # noqa: E402

STATE = REPO / ".cluster-bench"
NAMESPACE = "scale"
UNWATCHED = "scale-unwatched"  # FineTuneJobs no operator sees: what their creates cost the apiserver alone
GPU_NODES, GPUS_PER_NODE = 10, 64  # room for 640 pods at once besides kwok-gpu-0/1
POLL_SECONDS = Settings.model_fields["poll_seconds"].default
TRAINER_IMAGE = "finetune-trainer:local"  # the operator's --trainer-image here; kwok runs no image


def gpu_nodes() -> list[dict[str, Any]]:
    """More kwok GPU nodes, shaped as deploy/local's: a burst is limited by the operator, not by 16 GPUs."""
    shape = yaml.safe_load((REPO / "deploy" / "local" / "manifests" / "kwok-gpu-nodes.yaml").read_text())["items"][0]
    capacity = shape["status"]["capacity"] | {"nvidia.com/gpu": str(GPUS_PER_NODE)}
    return [shape | {"metadata": shape["metadata"] | {"name": f"kwok-bench-{i}"},
                     "status": {"capacity": capacity, "allocatable": capacity}} for i in range(GPU_NODES)]


def gpu_job(name: str, runs_for: str = "1s", up_to: str = "5s") -> dict[str, Any]:
    """A FineTuneJob as a GPU cluster runs it: hub model and data, a results claim, one GPU per worker; kwok's
    pod completes 1–5 s after it is ready (kwok's default for its stage)."""
    doc = kwok_job(name, f"pvc://results/{name}", runs_for=runs_for, up_to=up_to)
    doc["metadata"]["namespace"] = NAMESPACE
    return doc


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        self.api = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)


class Watch(threading.Thread):
    """Records when each object of a list call is first seen, and when `done(obj)` first holds for it."""

    def __init__(self, lister: Callable[..., Any], done: Callable[[dict[str, Any]], bool], **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.lister, self.done, self.kwargs = lister, done, kwargs
        self.seen: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        version = None
        while not self.stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.lister, resource_version=version, timeout_seconds=5,
                                           _request_timeout=10, **self.kwargs):
                    obj = event["object"]
                    obj = obj if isinstance(obj, dict) else obj.to_dict()
                    meta = obj["metadata"]
                    version = meta.get("resourceVersion") or meta.get("resource_version")
                    now = time.monotonic()
                    name = meta["name"]
                    self.seen.setdefault(name, now)
                    if name not in self.finished and self.done(obj):
                        self.finished[name] = now
                    if self.stop.is_set():
                        break
            except Exception:  # noqa: BLE001 (a watch that expired or broke is simply reopened)
                version = None
                time.sleep(0.2)


def _job_complete(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _ftj_finished(ftj: dict[str, Any]) -> bool:
    return (ftj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The operator's RSS (MB) and CPU seconds every 0.5 s, from /proc."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, rss MB, cpu s)
        self.stop = threading.Event()

    def read(self) -> tuple[float, float, float]:
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        return time.monotonic(), rss, cpu_seconds(self.pid)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append(self.read())
            except (OSError, StopIteration):
                return


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _create_all(objects: list[dict[str, Any]], create: Callable[[dict[str, Any]], Any], clients: int) -> dict[str, float]:
    """Create every object from a pool of `clients` threads; the moment each create call returned."""
    returned: dict[str, float] = {}

    def one(obj: dict[str, Any]) -> None:
        create(obj)
        returned[obj["metadata"]["name"]] = time.monotonic()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, objects))
    return returned


def _wait(what: str, check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            print(f"  timed out after {timeout:.0f} s waiting for {what}", flush=True)
            return False
        time.sleep(0.25)
    return True


def _delete_finetunejobs(c: Cluster, clients: int = 8) -> None:
    """One call per object: a collection delete of 1,000 FineTuneJobs outlasts the apiserver's 60 s request limit."""
    names = [o["metadata"]["name"] for o in c.custom.list_namespaced_custom_object(
        api.GROUP, api.VERSION, NAMESPACE, api.PLURAL)["items"]]

    def delete(name: str) -> None:
        try:
            c.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(delete, names))


def _clean(c: Cluster) -> None:
    """Delete both sides' objects and wait until no Job or pod is left (kwok frees the GPUs)."""
    _delete_finetunejobs(c)
    c.custom.delete_collection_namespaced_custom_object(api.GROUP, api.VERSION, UNWATCHED, api.PLURAL)  # the ideal side's
    c.batch.delete_collection_namespaced_job(NAMESPACE, propagation_policy="Background")
    _wait("the namespace to empty", lambda: not c.custom.list_namespaced_custom_object(
        api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, limit=1)["items"]
        and not c.batch.list_namespaced_job(NAMESPACE, limit=1).items
        and not c.core.list_namespaced_pod(NAMESPACE, limit=1).items, 900)


def apiserver_writes(c: Cluster) -> dict[str, float]:
    """The apiserver's count of writes so far (every client's), by verb and resource[/subresource]."""
    request = c.api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = c.api.call_api(*request)
    response.read()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "apiserver_request_total" and labels.get("verb") in WRITES:
                key = f"{labels['verb']} {labels['resource']}" + (f"/{labels['subresource']}" if labels.get("subresource") else "")
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


WRITES = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


def _per_job(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((v - before.get(k, 0.0)) / n, 2) for k, v in sorted(after.items()) if v > before.get(k, 0.0)}


def _ideal(c: Cluster, ftj: dict[str, Any], job: dict[str, Any]) -> None:
    """What any operator adds at least: the FineTuneJob's create, then its Job's (the FineTuneJob where no
    operator sees it)."""
    c.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, UNWATCHED, api.PLURAL, ftj)
    c.batch.create_namespaced_job(NAMESPACE, job)


def unowned_children(name: str, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap and Job the operator makes for the attempt 1 of `gpu_job(name)`, less their owner: created
    directly, as the other sides and the write costs do."""
    spec = api.FineTuneJobSpec.model_validate(gpu_job(name)["spec"])
    owner = {"metadata": {"name": name, "namespace": namespace, "uid": "none"}}
    made = (children.config_map(owner, spec, 1), children.job(owner, spec, 1, Settings(trainer_image=TRAINER_IMAGE)))
    for obj in made:
        del obj["metadata"]["ownerReferences"]
    return made


def burst(c: Cluster, side: str, n: int, clients: int, tag: str, sampler: Sampler | None,
          limit: float, plane: list[int], finish: bool = True) -> dict[str, Any]:
    """One side of one round: N objects at once, until every child Job exists and (with `finish`) every one has
    finished, each within `limit` seconds of the start (past it, the side's figure is recorded as not reached).
    Sides: `operator` (FineTuneJobs), `direct` (their Jobs), `ideal` (each FineTuneJob, no operator, then its Job).
    `plane`: the control plane's processes, whose CPU each side costs (steadier than its seconds on a busy machine)."""
    names = [f"{tag}-{i:04d}" for i in range(n)]
    jobs = Watch(c.batch.list_namespaced_job, _job_complete, namespace=NAMESPACE)
    ftjs = Watch(c.custom.list_namespaced_custom_object, _ftj_finished, group=api.GROUP, version=api.VERSION,
                 namespace=NAMESPACE, plural=api.PLURAL)
    for w in (jobs, ftjs):
        w.start()
    time.sleep(1)  # both watches open
    child = {name: children.child_name(name, 1) for name in names}
    if side == "operator":
        objects = [gpu_job(name) for name in names]
        create = lambda o: c.custom.create_namespaced_custom_object(  # noqa: E731
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, o)
    else:  # the Job the operator would make for the same spec, created directly
        objects = [unowned_children(name, NAMESPACE)[1] for name in names]
        create = lambda o: c.batch.create_namespaced_job(NAMESPACE, o)  # noqa: E731
    if side == "ideal":  # keyed by the FineTuneJob's name
        job_of = dict(zip(names, objects))
        objects = [gpu_job(m) | {"metadata": {"name": m, "namespace": UNWATCHED}} for m in names]
        create = lambda o: _ideal(c, o, job_of[o["metadata"]["name"]])  # noqa: E731
    writes_before = apiserver_writes(c)
    plane_before = sum(map(cpu_seconds, plane))
    cpu_before = sampler.read()[2] if sampler else 0.0
    started = time.monotonic()
    returned = _create_all(objects, create, clients)
    if side == "direct":  # keyed by the Job's name there
        returned = {m: returned[child[m]] for m in names}
    created_all = time.monotonic() - started
    all_children = _wait(f"{n} child Jobs", lambda: all(child[m] in jobs.seen for m in names),
                         limit - (time.monotonic() - started))
    children_s = max((jobs.seen[child[m]] for m in names if child[m] in jobs.seen), default=started) - started
    live_rss = sampler.read()[1] if sampler else None
    cpu_at_children = sampler.read()[2] - cpu_before if sampler else None
    writes_to_children = _per_job(writes_before, apiserver_writes(c), n)
    plane_to_children = sum(map(cpu_seconds, plane)) - plane_before

    def finished() -> dict[str, float]:
        if side == "operator":
            return ftjs.finished
        return {m: jobs.finished[child[m]] for m in names if child[m] in jobs.finished}
    all_done = finish and _wait(f"{n} finished", lambda: len(finished()) >= n, limit - (time.monotonic() - started))
    done_s = (max(finished().values()) - started) if finished() else None
    for w in (jobs, ftjs):
        w.stop.set()
    latencies = [jobs.seen[child[m]] - returned[m] for m in names if child[m] in jobs.seen]
    result = {
        "side": side, "n": n, "clients": clients, "load_before": os.getloadavg()[0], "limit_s": limit,
        "children": sum(1 for m in names if child[m] in jobs.seen),
        "create_calls_s": created_all, "all_children_s": children_s if all_children else None,
        "child_latency_p50_s": _percentile(latencies, 0.5), "child_latency_p99_s": _percentile(latencies, 0.99),
        "all_finished_s": done_s if all_done else None, "finished": len(finished()), "succeeded": _succeeded(c, side),
        "writes_per_job_to_children": writes_to_children, "control_plane_cpu_to_children_s": plane_to_children,
        "writes_per_job_to_finished": _per_job(writes_before, apiserver_writes(c), n) if all_done else None,
    }
    if sampler:
        window = [s for s in sampler.samples if s[0] >= started]
        result |= {"operator_rss_at_all_children_mb": live_rss,
                   "operator_rss_peak_mb": max((s[1] for s in window), default=None),
                   "operator_cpu_at_children_s": cpu_at_children,
                   "operator_cpu_s": sampler.read()[2] - cpu_before}
    return result


def creates_alone(c: Cluster, n: int, clients: int, tag: str) -> dict[str, Any]:
    """N FineTuneJobs created as the operator side creates them, in a namespace no operator watches: the part of
    that side's time that is the apiserver's (schema and CEL validation, storage), whatever the operator does."""
    objects = [gpu_job(f"{tag}-{i:04d}") | {"metadata": {"name": f"{tag}-{i:04d}", "namespace": UNWATCHED}}
               for i in range(n)]
    load = os.getloadavg()[0]
    started = time.monotonic()
    _create_all(objects, lambda o: c.custom.create_namespaced_custom_object(
        api.GROUP, api.VERSION, UNWATCHED, api.PLURAL, o), clients)
    seconds = time.monotonic() - started
    c.custom.delete_collection_namespaced_custom_object(api.GROUP, api.VERSION, UNWATCHED, api.PLURAL)
    return {"n": n, "load_before": load, "create_calls_s": seconds}


def write_costs(c: Cluster, n: int, clients: int, plane: list[int]) -> list[dict[str, Any]]:
    """The control plane's CPU milliseconds per write, for each kind of write the two sides make: N of a kind at once from
    `clients` threads, in the namespace no operator watches, one kind after the other on a quiet cluster. A
    FineTuneJob is a custom resource: the apiserver handles it as unstructured JSON, checks it against the CRD's
    schema and CEL rules (the transition rules compare the spec's parts with the old object's on every update,
    status patches included) and tracks its managed fields through that schema."""
    ns = UNWATCHED
    names = [f"w-{i:04d}" for i in range(n)]
    config_map, job = unowned_children("x", ns)
    job["spec"]["suspend"] = True  # no pods: the write alone

    def named(obj: dict[str, Any], name: str) -> dict[str, Any]:
        return obj | {"metadata": obj["metadata"] | {"name": name, "namespace": ns}}

    def status_patch(name: str) -> None:  # what the operator's first reconcile writes, in size and kind
        c.custom.patch_namespaced_custom_object_status(api.GROUP, api.VERSION, ns, api.PLURAL, name, {"status": {
            "phase": "Pending", "observedGeneration": 1, "attempts": 1, "startTime": "2026-01-01T00:00:00Z",
            "children": {"configMap": name, "job": name}, "conditions": [{
                "type": "Created", "status": "True", "reason": "AttemptCreated", "message": "attempt 1: 1 worker(s)",
                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}})

    writes: list[tuple[str, Callable[[str], Any]]] = [
        ("ConfigMap create (the trainer's config)", lambda m: c.core.create_namespaced_config_map(ns, named(config_map, m))),
        ("Job create (suspended)", lambda m: c.batch.create_namespaced_job(ns, named(job, m))),
        ("Event create", lambda m: c.core.create_namespaced_event(ns, {
            "metadata": {"name": m}, "involvedObject": {"kind": api.KIND, "name": m, "namespace": ns},
            "reason": "AttemptCreated", "message": "attempt 1: 1 worker(s)", "type": "Normal"})),
        ("FineTuneJob create", lambda m: c.custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.PLURAL, named(gpu_job(m), m))),
        ("FineTuneJob status patch", status_patch),
        ("FineTuneJob finalizer patch", lambda m: c.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.PLURAL, m, {"metadata": {"finalizers": [FINALIZER]}})),
    ]
    rows = []
    for kind, write in writes:
        load = os.getloadavg()[0]
        before, started = sum(map(cpu_seconds, plane)), time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(write, names))
        rows.append({"write": kind, "n": n, "load_before": load, "seconds": time.monotonic() - started,
                     "plane_cpu_ms_per_write": 1000 * (sum(map(cpu_seconds, plane)) - before) / n})
        print("  write cost: " + json.dumps(rows[-1]), flush=True)
    for name in names:  # the finalizer would hold the FineTuneJobs: take it off before the collection delete
        c.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, name, {"metadata": {"finalizers": None}})
    c.custom.delete_collection_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)
    c.batch.delete_collection_namespaced_job(ns, propagation_policy="Background")
    c.core.delete_collection_namespaced_config_map(ns)
    c.core.delete_collection_namespaced_event(ns)
    return rows


def live(c: Cluster, n: int, clients: int, sampler: Sampler, settle: float) -> dict[str, Any]:
    """N FineTuneJobs whose pods run for an hour: once each has its child Job, the operator's RSS and CPU while it
    keeps them all (those beyond the GPUs wait, unschedulable), over `settle` seconds."""
    names = [f"live-{i:04d}" for i in range(n)]
    jobs = Watch(c.batch.list_namespaced_job, _job_complete, namespace=NAMESPACE)
    jobs.start()
    started = time.monotonic()
    _create_all([gpu_job(name, runs_for="3600s", up_to="3600s") for name in names],
                lambda o: c.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, o),
                clients)
    wanted = [children.child_name(m, 1) for m in names]
    ready = _wait(f"{n} child Jobs", lambda: all(w in jobs.seen for w in wanted), 900)
    jobs.stop.set()
    settled = time.monotonic()
    time.sleep(settle)
    window = [s for s in sampler.samples if s[0] >= settled]
    rss = [s[1] for s in window]
    return {"n": n, "all_children": ready, "all_children_s": settled - started, "settle_s": settle,
            "load": os.getloadavg()[0], "rss_median_mb": statistics.median(rss) if rss else None,
            "rss_max_mb": max(rss, default=None),
            "cpu_per_s": (window[-1][2] - window[0][2]) / (window[-1][0] - window[0][0]) if len(window) > 1 else None}


def _succeeded(c: Cluster, side: str) -> int:
    if side == "operator":
        items = c.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL)["items"]
        return sum(1 for o in items if (o.get("status") or {}).get("phase") == "Succeeded")
    return sum(1 for j in c.batch.list_namespaced_job(NAMESPACE).items if (j.status.succeeded or 0) >= 1)


def freshness(c: Cluster, jobs: int, seconds: float) -> dict[str, Any]:
    """Real trainers on the process node: how old the step in status is when it appears there."""
    names = [f"fresh-{i}" for i in range(jobs)]
    for name in names:
        doc = yaml.safe_load((REPO / "deploy" / "examples" / "tiny-causal-lm.yaml").read_text())
        doc["metadata"] = {"name": name, "namespace": NAMESPACE}
        doc["spec"]["output"]["uri"] = f"pvc://trained/{name}"
        doc["spec"]["training"] = doc["spec"]["training"] | {"epochs": 50}  # long enough to watch
        doc["spec"]["runtime"]["resources"] = {"requests": {"cpu": "100m", "memory": "1Gi"}}
        c.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, doc)
    pod_steps: dict[str, dict[int, float]] = {m: {} for m in names}  # step -> first moment rank 0 reported it
    status_steps: dict[str, dict[int, float]] = {m: {} for m in names}
    deadline = time.monotonic() + seconds + 600
    watching_since: float | None = None
    while time.monotonic() < deadline and (watching_since is None or time.monotonic() < watching_since + seconds):
        for name in names:
            pods = c.core.list_namespaced_pod(NAMESPACE, label_selector=f"{children.JOB_NAME_LABEL}={name}").items
            rank0 = next((p for p in pods if p.status.phase == "Running" and p.status.pod_ip
                          and p.metadata.labels.get("batch.kubernetes.io/job-completion-index") == "0"), None)
            if rank0 is not None:
                try:
                    step = int(scrape(rank0.status.pod_ip).get("step", 0))
                    pod_steps[name].setdefault(step, time.monotonic())
                    watching_since = watching_since or time.monotonic()
                except ScrapeError:
                    pass
            status = _status(c, name)
            if status.get("phase") == "Failed" or (status.get("phase") == "Pending" and status.get("reason") in STUCK_WAITING):
                raise SystemExit(f"freshness: {name} cannot run: {status.get('reason')}: {[c['message'] for c in status.get('conditions', [])]}")
            progress = status.get("progress") or {}
            if progress.get("step") is not None:
                status_steps[name].setdefault(int(progress["step"]), time.monotonic())
        time.sleep(0.1)
    lags = [status_steps[m][s] - pod_steps[m][s] for m in names for s in status_steps[m]
            if s in pod_steps[m] and s > 0]
    return {"jobs": jobs, "watched_s": seconds, "samples": len(lags), "p50_s": _percentile(lags, 0.5),
            "p99_s": _percentile(lags, 0.99), "max_s": max(lags, default=None), "poll_seconds": POLL_SECONDS}


def _status(c: Cluster, name: str) -> dict[str, Any]:
    return c.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name).get("status") or {}


def start_operator(kubeconfig: Path, log: Path, metrics_port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "finetune_operator", "run", "--namespace", NAMESPACE,
               "--metrics-port", str(metrics_port), "--liveness-port", str(free_port()),
               "--bind-address", "127.0.0.1", "--trainer-image", TRAINER_IMAGE]
    env = os.environ | {"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def profile(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy, sampling whichever thread holds the GIL (the CPU the operator spends), without pausing it."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("  py-spy is not installed: no profile", flush=True)
        return None
    # Until SIGINT at the end of the burst, when py-spy writes what it sampled.
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--gil",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: where the samples were (self) and which of our functions they were under."""
    self_counts: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in {f for f in frames if "finetune_operator" in f}:
            ours[frame] = ours.get(frame, 0) + n

    def share(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 3)) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]
    return {"samples": [("all", total)], "self": share(self_counts), "under_ours": share(ours)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = local.up(STATE, timeout=180)
    kube = Kube(cluster.kubeconfig, cluster.bin_dir, cluster.state)
    c = Cluster(cluster.kubeconfig)
    kube.kubectl("create", "namespace", NAMESPACE)
    kube.kubectl("create", "namespace", UNWATCHED)
    kube.apply(gpu_nodes(), NAMESPACE)
    # `results` for the kwok jobs (no node to write); the process node's provisioner makes `trained` for real ones.
    kube.apply(kwok_claim(NAMESPACE, "results") + [claim("models", ["ReadOnlyMany"], ASSETS / "models"),
                                  claim("data", ["ReadOnlyMany"], ASSETS / "data"),
                                  claim("trained", ["ReadWriteMany"])], NAMESPACE)
    install_crd(kube)
    plane = [pid for pid in local.running(cluster).values() if pid]
    costs = write_costs(c, args.write_costs, args.clients, plane) if args.write_costs else None
    log = STATE / "operator.log"
    metrics_port = free_port()
    operator = start_operator(cluster.kubeconfig, log, metrics_port)
    time.sleep(5)
    sampler = Sampler(operator.pid)
    idle_rss = sampler.read()[1]
    sampler.start()
    rounds: list[dict[str, Any]] = []
    order = ["direct", "operator"] + (["ideal"] if args.ideal else [])
    sides = [(n, r, side) for n in args.jobs for r in range(args.rounds if n < 1000 else 1)
             for side in order[r % len(order):] + order[:r % len(order)]]
    profile_out: dict[str, Any] | None = None
    alone: list[dict[str, Any]] = []
    try:
        # First, on a quiet cluster: the freshness of real trainers' status (then the bursts, the last of which
        # may leave the cluster too busy to clean up).
        fresh = None
        if args.freshness_jobs:
            before, cpu_before = reconcile_stats(metrics_port), sampler.read()[2]
            fresh = freshness(c, args.freshness_jobs, args.freshness_seconds)
            after, cpu_after = reconcile_stats(metrics_port), sampler.read()[2]
            fresh |= {"reconciles": after["count"] - before["count"],
                      "reconcile_seconds": after["seconds"] - before["seconds"],
                      "operator_cpu_s": cpu_after - cpu_before}
            _clean(c)
        # Then the memory of many live jobs, before the bursts have grown the heap.
        held = None
        if args.live_jobs:
            held = live(c, args.live_jobs, args.clients, sampler, args.live_seconds)
            print("  live: " + json.dumps(held), flush=True)
            _clean(c)
        for i, (n, r, side) in enumerate(sides):
            if not any(a["n"] == n and a["round"] == r + 1 for a in alone):  # before each round's pair
                alone.append(creates_alone(c, n, args.clients, f"u{r}-{n}") | {"round": r + 1})
                print("  alone: " + json.dumps(alone[-1]), flush=True)
            spy = None
            if args.profile and side == "operator" and n == max(args.jobs) and profile_out is None:
                raw = STATE / f"profile-{n}.txt"
                spy = profile(operator.pid, raw)
            print(f"burst N={n} round {r + 1}: {side}", flush=True)
            result = burst(c, side, n, args.clients, f"{side[0]}{r}-{n}", sampler if side == "operator" else None,
                           args.side_limit, plane, finish=not args.children_only)
            result["round"] = r + 1
            rounds.append(result)
            print("  " + json.dumps(result), flush=True)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                profile_out = top_frames(raw) if raw.exists() else None
            if i + 1 < len(sides):
                _clean(c)
        reconcile = reconcile_stats(metrics_port)
    finally:
        sampler.stop.set()
        operator.terminate()
        operator.wait(30)
        local.down(STATE)
    return {"rounds": rounds, "alone": alone, "write_costs": costs, "live": held, "idle_rss_mb": idle_rss, "freshness": fresh, "profile": profile_out,
            "operator_reconciles": reconcile, "operator_log_tail": log.read_text()[-3000:]}


def reconcile_stats(port: int) -> dict[str, float]:
    """The operator's own reconcile histogram so far: how many reconciles, and the seconds they took."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()  # noqa: S310
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name.startswith("finetune_operator_reconcile_duration_seconds_")}
    return {"count": found.get("finetune_operator_reconcile_duration_seconds_count", 0.0),
            "seconds": found.get("finetune_operator_reconcile_duration_seconds_sum", 0.0)}


SIDES = ("direct", "operator", "ideal")


def summary(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per N: each side's medians over rounds, and the ratios (direct / operator: above 1 the operator is faster)."""
    rows = []
    for n in sorted({r["n"] for r in rounds}):
        side = {s: [r for r in rounds if r["n"] == n and r["side"] == s] for s in SIDES}

        def median(s: str, key: str) -> float | None:
            values = [r[key] for r in side[s] if r.get(key) is not None]
            return statistics.median(values) if values else None
        row: dict[str, Any] = {"n": n, "rounds": len(side["operator"])}
        row["plane_cpu_s"] = {s: median(s, "control_plane_cpu_to_children_s") for s in side}
        for key in ("all_children_s", "all_finished_s", "child_latency_p50_s", "child_latency_p99_s", "create_calls_s"):
            row[key] = {s: median(s, key) for s in side}
        ratios = [d["all_children_s"] / o["all_children_s"] for d, o in zip(side["direct"], side["operator"])
                  if d.get("all_children_s") and o.get("all_children_s")]
        row["ratio_children"] = ratios
        row["ratio_ideal"] = [d["all_children_s"] / i["all_children_s"] for d, i in zip(side["direct"], side["ideal"])
                              if d.get("all_children_s") and i.get("all_children_s")]
        row["writes"] = {s: (side[s][0]["writes_per_job_to_children"], side[s][0]["writes_per_job_to_finished"])
                         for s in SIDES if side[s]}
        row["operator_rss_peak_mb"] = median("operator", "operator_rss_peak_mb")
        row["operator_cpu_s"] = median("operator", "operator_cpu_s")
        rows.append(row)
    return rows


def _floor_and_writes(rounds: list[dict[str, Any]]) -> list[str]:
    """The ideal side (when run), and each side's apiserver writes per job until every child Job exists."""
    lines = []
    for row in summary(rounds):
        c, p50, p99 = row["all_children_s"], row["child_latency_p50_s"], row["child_latency_p99_s"]
        if row["ratio_ideal"]:
            lines += ["", f"**Floor, N={row['n']}.** Each FineTuneJob created where no operator watches and right "
                      f"after it its Job (the apiserver work any operator adds at least): every Job after "
                      f"{fmt(c['ideal'], 1)} s (p50 / p99 {fmt(p50['ideal'])} / {fmt(p99['ideal'])} s), ratio "
                      f"direct/ideal **{', '.join(f'{r:.2f}' for r in row['ratio_ideal'])}** (each side's load in the "
                      "last table)."]
        for side, (writes, whole) in row["writes"].items():
            lines += ["", f"Control plane CPU (etcd, apiserver, kcm, scheduler, kwok) per job until every child Job exists, "
                      f"N={row['n']}, {side}: {fmt(1000 * row['plane_cpu_s'][side] / row['n'], 1)} ms (median over rounds)."]
            lines += ["", f"Apiserver writes per job until every child Job exists, N={row['n']}, {side} (round 1; every "
                      f"client's, kcm's, the scheduler's and kwok's included): **{sum(writes.values()):.1f}**: "
                      + ", ".join(f"{k} {v:g}" for k, v in writes.items())
                      + (f"; until all finished {sum(whole.values()):.1f}: " + ", ".join(f"{k} {v:g}" for k, v in whole.items())
                         if whole else "") + "."]
    return lines


def markdown(payload: dict[str, Any]) -> str:
    m, out = payload["machine"], payload["result"]
    lines = [
        "# (e) The operator at scale: a burst of FineTuneJobs vs the same Jobs created directly",
        "",
        f"Command (from the repository root): `{payload['command']}` at commit `{m['git_commit']}`.",
        f"Machine: {m['nproc']} cores ({m['cpu']}); 1-minute load {m['loadavg_at_start'][0]:.1f} at the start, "
        f"{payload['loadavg_at_end'][0]:.1f} at the end (each side's start is in the last table). The control plane "
        "(etcd, kube-apiserver, kcm, scheduler, kwok), the operator and this client share those cores.",
        f"Setup: {GPU_NODES} extra kwok GPU nodes of {GPUS_PER_NODE} GPUs (plus kwok-gpu-0/1); each job one worker "
        f"with one GPU; kwok completes a pod 1–5 s after it is ready. Objects are created by {payload['clients']} "
        "client threads at once; one watch sees both sides' Jobs. The operator runs with its defaults "
        f"(poll {POLL_SECONDS:g} s, 16 handler threads) as the cluster admin, watching one namespace.",
        "",
        "## Burst (medians over rounds)",
        "",
        "| N | rounds | every child Job exists: direct / operator (s) | ratio direct/operator (each round) | goal | "
        "child Job after create p50 / p99: direct, operator (s) | all finished: direct / operator (s) | "
        "operator RSS peak (MB) | operator CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary(out["rounds"]):
        c, f = row["all_children_s"], row["all_finished_s"]
        p50, p99 = row["child_latency_p50_s"], row["child_latency_p99_s"]
        ratios = ", ".join(f"{r:.2f}" for r in row["ratio_children"]) or "—"
        lines.append(f"| {row['n']} | {row['rounds']} | {fmt(c['direct'], 1)} / {fmt(c['operator'], 1)} | **{ratios}** "
                     f"| ≥0.8 | {fmt(p50['direct'])} / {fmt(p99['direct'])}, {fmt(p50['operator'])} / "
                     f"{fmt(p99['operator'])} | {fmt(f['direct'], 1)} / {fmt(f['operator'], 1)} | "
                     f"{fmt(row['operator_rss_peak_mb'], 0)} | {fmt(row['operator_cpu_s'], 1)} |")
    lines += _floor_and_writes(out["rounds"])
    lines += ["", "Creating the FineTuneJobs alone, in a namespace no operator watches (before each round's pair; "
              "the apiserver's own cost of the operator side's creates): "
              + "; ".join(f"N={a['n']} round {a['round']}: {a['create_calls_s']:.1f} s at load {a['load_before']:.1f}"
                          for a in out.get("alone", [])) + "."]
    costs = out.get("write_costs")
    if costs:
        lines += ["", f"**What each write costs the control plane** (etcd, apiserver, kcm, scheduler, kwok; {costs[0]['n']} "
                  "of a kind at once, in the unwatched namespace, before the operator starts):", "",
                  "| write | CPU ms per write | seconds | load at start |", "|---|---|---|---|"]
        lines += [f"| {w['write']} | {w['plane_cpu_ms_per_write']:.2f} | {w['seconds']:.2f} | {w['load_before']:.1f} |"
                  for w in costs]
    lines += ["", f"Operator RSS at rest before the bursts: {out['idle_rss_mb']:.0f} MB. Goal at 1,000 live jobs: ≤150 MB."]
    held = out.get("live")
    if held:
        lines += ["", f"**Live jobs.** {held['n']} FineTuneJobs whose pods run for an hour (those beyond the GPUs wait "
                  f"unschedulable), created before the bursts; every child Job existed after {held['all_children_s']:.0f} s "
                  f"({'all' if held['all_children'] else 'not all'}). Then, over {held['settle_s']:.0f} s at load "
                  f"{held['load']:.1f}: operator RSS median **{fmt(held['rss_median_mb'], 0)} MB** (max "
                  f"{fmt(held['rss_max_mb'], 0)} MB), CPU {fmt(held['cpu_per_s'])} s per second."]
    lines += ["", "## Freshness: a trainer's step, then the same step in the FineTuneJob's status", ""]
    fresh = out.get("freshness")
    if fresh:
        lines += [f"{fresh['jobs']} real trainer pods (tiny-causal-lm) on the process node, watched {fresh['watched_s']:.0f} s; "
                  f"{fresh['samples']} steps seen in status. Lag p50 {fmt(fresh['p50_s'])} s, **p99 {fmt(fresh['p99_s'])} s**, "
                  f"max {fmt(fresh['max_s'])} s (goal p99 ≤3 s at the default poll of {fresh['poll_seconds']:g} s).",
                  f"The poll's cost meanwhile: {fresh['reconciles']:.0f} reconciles taking {fresh['reconcile_seconds']:.1f} s "
                  f"in all ({1000 * fresh['reconcile_seconds'] / max(fresh['reconciles'], 1):.1f} ms each, a metrics read "
                  f"included), and {fresh['operator_cpu_s']:.1f} CPU seconds of the operator in {fresh['watched_s']:.0f} s."]
    else:
        lines.append("Not measured in this run.")
    prof = out.get("profile")
    if prof:
        lines += ["", f"## Where the operator's time goes (py-spy, {prof['samples'][0][1]} samples in the largest burst)",
                  "", "| under our function | share of samples |", "|---|---|"]
        lines += [f"| `{frame}` | {share:.1%} |" for frame, share in prof["under_ours"]]
        lines += ["", "| innermost frame | share of samples |", "|---|---|"]
        lines += [f"| `{frame}` | {share:.1%} |" for frame, share in prof["self"]]
    lines += ["", "## Every side of every round", "",
              "| N | round | side | load at start | create calls (s) | child Jobs | every child (s) | p50 (s) | p99 (s) | all finished (s) | finished | limit (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rounds"]:
        lines.append(f"| {r['n']} | {r['round']} | {r['side']} | {r['load_before']:.1f} | {fmt(r['create_calls_s'], 1)} | "
                     f"{r['children']} | {fmt(r['all_children_s'], 1)} | {fmt(r['child_latency_p50_s'])} | "
                     f"{fmt(r['child_latency_p99_s'])} | {fmt(r['all_finished_s'], 1)} | {r['finished']} | {r['limit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=lambda t: [int(x) for x in t.split(",")], default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=2, help="rounds for N < 1000 (N ≥ 1000 runs one)")
    parser.add_argument("--clients", type=int, default=8, help="client threads creating the objects")
    parser.add_argument("--side-limit", type=float, default=600, help="seconds one side of a burst may take")
    parser.add_argument("--freshness-jobs", type=int, default=2)
    parser.add_argument("--freshness-seconds", type=float, default=90)
    parser.add_argument("--live-jobs", type=int, default=1000, help="FineTuneJobs kept live for the RSS figure")
    parser.add_argument("--live-seconds", type=float, default=60, help="seconds the RSS is sampled once all are live")
    parser.add_argument("--profile", action="store_true", help="py-spy the operator during the largest burst")
    parser.add_argument("--write-costs", type=int, default=300,
                        help="writes of each kind whose control plane CPU is measured before the operator starts (0: none)")
    parser.add_argument("--ideal", action="store_true",
                        help="a third side per round: each FineTuneJob (no operator watching) and then its Job")
    parser.add_argument("--children-only", action="store_true",
                        help="end each side once every child Job exists (a quicker trial: no all-finished figure)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="another folder: a trial run on any tree")
    args = parser.parse_args()
    refuse_dirty_tree(args.out)
    info = machine()
    payload = {"machine": info, "command": command_line(), "clients": args.clients, "result": run(args)}
    payload["loadavg_at_end"] = list(os.getloadavg())
    path = write_results(result_stem("operator-scale", info), payload, markdown(payload), args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
