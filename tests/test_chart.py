"""The chart's generated parts without a cluster: the plain manifests, the dashboard and the monitors' relabelings.

(The CRD, the RBAC rules and the dashboard's two copies are checked for drift with the CRD, in
test_crd.py, through `finetune_operator.generate`.)
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

import prometheus_server
from finetune_operator import coretypes as core
from finetune_operator import dashboard, rbac, settings
from operator_fixture import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "manifests"))
import render  # noqa: E402 (deploy/manifests/render.py)

METRICS = {"finetune_trainer_" + n for n in ("loss", "learning_rate", "step", "total_steps", "samples_per_second",
                                             "tokens_per_second", "stage", "eval_metric", "gpu_memory_bytes", "mfu")}


def helm() -> str:
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    import cluster  # deploy/local/cluster.py

    path = cluster.bin_dir() / "helm"
    if not path.exists():
        pytest.skip("helm is not built yet (`make k8s-binaries`)")
    return str(path)


def test_plain_manifests_are_the_chart_rendered() -> None:
    assert render.main(["--check", "--helm", helm()]) == 0, "run `make manifests`"
    docs = [d for d in yaml.safe_load_all(render.OUT.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "CustomResourceDefinition" in kinds
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"} <= set(kinds)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_watching_namespaces_grants_a_role_in_each_and_cluster_wide_only_the_finalizer_s_patch() -> None:
    """A watched namespace deleted with a FineTuneJob in it could lose its RoleBinding before the operator released
    the job's finalizer: the job and the namespace stayed Terminating for ever (test_cluster_chart.py shows it)."""
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-n", "ops",
                          "--set", "watchNamespaces={a,b}", "--show-only", "templates/rbac.yaml"],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    roles = {(d["kind"], d["metadata"].get("namespace")): d for d in docs}
    assert sorted(roles, key=str) == sorted([("Role", "a"), ("Role", "b"), ("RoleBinding", "a"), ("RoleBinding", "b"),
                                             ("ClusterRole", None), ("ClusterRoleBinding", None)], key=str)
    assert roles["Role", "a"]["rules"] == roles["Role", "b"]["rules"] == rbac.RULES
    assert roles["ClusterRole", None]["rules"] == [
        {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": ["patch"]}]
    # Named after the release's namespace: two releases `fto` watching other namespaces do not share it.
    binding, name = roles["ClusterRoleBinding", None], "ops-fto-finetune-operator-finalizers"
    assert binding["roleRef"]["name"] == roles["ClusterRole", None]["metadata"]["name"] == name
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fto-finetune-operator", "namespace": "ops"}]


def test_a_service_account_made_beforehand_must_be_named_and_gets_the_roles() -> None:
    """serviceAccount.create=false without a name bound the operator's roles (Jobs created and deleted, pods listed
    in every namespace) to the namespace's `default` ServiceAccount, which every pod there without its own runs as;
    so did naming it."""
    chart = str(REPO / "charts" / "finetune-operator")
    unnamed = subprocess.run([helm(), "template", "fto", chart, "-n", "ops", "--set", "serviceAccount.create=false"],
                             capture_output=True, text=True)
    assert unnamed.returncode != 0 and "serviceAccount.name: the ServiceAccount to run as" in unnamed.stderr
    # Named `default`, made or not, it bound them to that account just the same.
    for create in ("false", "true"):
        default = subprocess.run([helm(), "template", "fto", chart, "-n", "ops", "--set", f"serviceAccount.create={create}",
                                  "--set", "serviceAccount.name=default"], capture_output=True, text=True)
        assert default.returncode != 0 and "serviceAccount.name: not default" in default.stderr, create
    out = subprocess.run([helm(), "template", "fto", chart, "-n", "ops", "--set", "serviceAccount.create=false",
                          "--set", "serviceAccount.name=ops-operator"], check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert "ServiceAccount" not in {d["kind"] for d in docs}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops-operator"
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert bindings and all(b["subjects"] == [{"kind": "ServiceAccount", "name": "ops-operator", "namespace": "ops"}]
                            for b in bindings)


def test_the_dashboard_has_the_four_rows_and_reads_only_shared_metric_names() -> None:
    board = json.loads(dashboard.render())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Job: $namespace/$job", "Evaluation: $namespace/$job", "Operator"]
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "job"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(?:finetune|process)_\w+", e)}
    assert METRICS <= {re.sub(r"_(bucket|count)$", "", m) for m in used}
    assert used <= exported_names(), "every metric the dashboard reads is one the trainer or the operator exports"
    trainer = [e for e in exprs if "finetune_trainer_" in e and 'gpu_memory_bytes{finetunejob!=""} > bool' not in e]
    assert all('finetunejob="$job"' in e for e in trainer), "every per-job panel selects the job"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")


def exported_names() -> set[str]:
    """The names of the series the trainer (every gauge set) and the operator (the active one) export. A counter is
    named by its family too: one with a label has no series before its first increment (job failures)."""
    import torch
    from prometheus_client import ProcessCollector

    from finetune_operator import metrics
    from finetune_trainer.config import Stage
    from finetune_trainer.telemetry import Metrics

    trainer = Metrics(torch.device("cpu"))
    for gauge in (trainer.loss, trainer.learning_rate, trainer.grad_norm, trainer.step, trainer.total_steps,
                  trainer.epoch, trainer.samples_per_second, trainer.tokens_per_second, trainer.steps_per_second):
        gauge.set(1)
    trainer.set_stage(Stage.TRAINING)
    trainer.set_eval("final", {"accuracy": 1})
    # What metrics.lead() adds, without registering it in the process's registry a second time
    families = [*trainer.registry.collect(), *metrics.REGISTRY.collect(), *ProcessCollector(registry=None).collect()]
    return ({s.name for f in families for s in f.samples}
            | {f"{f.name}_total" for f in families if f.type == "counter"})


def pod_target(port: int, index: int, job: str = "ddp", attempt: int = 1) -> dict[str, Any]:
    """One trainer pod as Prometheus's Kubernetes discovery describes it (the labels the Job controller and the
    operator put on it), for a file_sd file."""
    return {"targets": [f"127.0.0.1:{port}"], "labels": {
        "__meta_kubernetes_namespace": "team-a", "__meta_kubernetes_pod_name": f"{job}-{attempt}-{index}-abcde",
        "__meta_kubernetes_pod_phase": "Running", "__meta_kubernetes_pod_container_port_name": "metrics",
        "__meta_kubernetes_pod_label_finetune_dev_job_name": job,
        "__meta_kubernetes_pod_labelpresent_finetune_dev_job_name": "true",
        "__meta_kubernetes_pod_label_finetune_dev_job_uid": f"uid-{job}",
        "__meta_kubernetes_pod_label_finetune_dev_attempt": str(attempt),
        "__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index": str(index),
        "__meta_kubernetes_pod_annotationpresent_batch_kubernetes_io_job_completion_index": "true"}}


class _Rank0(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"# TYPE finetune_trainer_step gauge\nfinetune_trainer_step 3.0\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@contextmanager
def _rank0() -> Iterator[int]:
    """A stand-in for rank 0's /metrics on a free loopback port (yielded), stopped and its socket closed after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Rank0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("interval", "taken"), [("15s", True), ("60s", True), ("1m", True), ("500ms", True),
                                                 ("60000ms", True), ("61s", False), ("2m", False), ("1m30s", False),
                                                 ("1h", False), ("60001ms", False), ("90000ms", False)])
def test_the_pod_monitor_scrapes_at_least_once_a_minute(interval: str, taken: bool) -> None:
    """A trainer waits for one last scrape after its end for at most a minute: with `interval: 2m` its final
    evaluation was stored about half the time, and the dashboard's baseline-against-fine-tuned panels stayed empty."""
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "--set",
                             "podMonitor.enabled=true", "--set", f"podMonitor.interval={interval}", "--show-only",
                             "templates/podmonitor.yaml"], capture_output=True, text=True)
    assert (result.returncode == 0) == taken and (taken or "podMonitor.interval" in result.stderr), result.stderr


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_pod_monitor_scrapes_rank_0_alone_of_a_two_worker_job(tmp_path: Path) -> None:
    """Only rank 0 serves /metrics, yet every worker pod has the `metrics` port: the PodMonitor made a target of
    each, and rank 1's was down all the time (kube-prometheus-stack's TargetDown fired for every multi-worker job). A
    pending pod (its image being pulled) has its IP, and was a target down too."""
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "--set",
                          "podMonitor.enabled=true", "--show-only", "templates/podmonitor.yaml"],
                         check=True, capture_output=True, text=True).stdout
    monitor = yaml.safe_load(out)
    with _rank0() as port:
        targets = tmp_path / "targets.json"
        pulling = pod_target(free_port(), 0, job="pulling")  # its image being pulled, its IP given
        pulling["labels"]["__meta_kubernetes_pod_phase"] = "Pending"
        targets.write_text(json.dumps([pod_target(port, 0), pod_target(free_port(), 1), pulling]))
        prometheus = prometheus_server.start(tmp_path / "prometheus",
                                             [prometheus_server.file_pod_monitor_config(monitor, targets)], free_port())
        try:
            deadline = time.monotonic() + 30
            while not prometheus.query('up{pod="ddp-1-0-abcde"} == 1'):
                assert time.monotonic() < deadline, "rank 0 not scraped"
                time.sleep(0.5)
            time.sleep(3)  # three scrape intervals: rank 1 would be a target by now
            up = prometheus.query("max_over_time(up[5s])")  # one scrape slower than its 1 s timeout is no fault here
            labels = ("pod", "finetunejob", "finetunejob_uid", "attempt")
            assert [(*(s["metric"][k] for k in labels), s["value"][1]) for s in up] == [
                ("ddp-1-0-abcde", "ddp", "uid-ddp", "1", "1")]
        finally:
            prometheus.stop()


def dashboard_exprs() -> dict[str, list[str]]:
    board = json.loads(dashboard.render())
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in board["panels"]}


def test_the_stats_colour_nothing_as_good_or_bad_but_whether_the_operator_is_up() -> None:
    """Grafana's own steps (green, red from 80) coloured an operator up 0 green and 80 s to Running red."""
    board = json.loads(dashboard.render())
    steps = {p["title"]: [(s["value"], s["color"]) for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
             for p in board["panels"] if p["type"] == "stat"}
    assert steps.pop("Operator up") == [(None, "red"), (1, "green")]
    assert steps and all(found == [(None, "text")] for found in steps.values()), steps


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_job_stats_are_the_jobs_across_attempts_and_say_nothing_false(tmp_path: Path) -> None:
    """Recorded series, as the PodMonitor labels them: job `j` on a GPU, whose attempt 1 stopped at step 400 of 1000
    and attempt 2 resumed at 300 and finished; job `stuck`, whose step stays at 100."""
    t0 = int(time.time()) - 3600
    lines = [f"# TYPE finetune_trainer_{m} gauge" for m in ("step", "total_steps", "gpu_memory_bytes", "stage")]

    def record(job: str, attempt: int, start: int, stop: int, step: Any) -> None:
        labels = f'namespace="a",finetunejob="{job}",attempt="{attempt}",pod="{job}-{attempt}-0-x"'
        for t in range(t0 + start, t0 + stop, 15):
            lines.append(f"finetune_trainer_step{{{labels}}} {step(t - t0 - start)} {t}")
            lines.append(f"finetune_trainer_total_steps{{{labels}}} 1000 {t}")
            lines.append(f"finetune_trainer_gpu_memory_bytes{{{labels}}} {2e9 if job == 'j' else 0} {t}")
            lines.append(f'finetune_trainer_stage{{{labels},stage="Training"}} 1 {t}')

    record("j", 1, 0, 600, lambda s: s * 400 // 600)
    record("j", 2, 660, 1200, lambda s: 300 + s * 700 // 540)
    record("stuck", 1, 0, 3000, lambda s: min(100, s // 3))
    # j's rank 0 scraped a second time by a job that honours the pods' prometheus.io annotations: no job's name
    lines.extend(f'finetune_trainer_gpu_memory_bytes{{namespace="a",pod="j-1-0-x",job="kubernetes-pods"}} 2e9 {t}'
                 for t in range(t0, t0 + 600, 15))
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    exprs = dashboard_exprs()

    def values(title: str, job: str, start: int, stop: int) -> list[list[float]]:
        expr = exprs[title][0].replace("$namespace", "a").replace("$job", job).replace("$__rate_interval", "1m")
        return [[float(v) for _, v in s["values"]] for s in prometheus.query_range(expr, t0 + start, t0 + stop, 15)]

    try:
        # One value per stat, not one per attempt (a stat showed 39% beside 98%), and one row per stage. Progress is
        # the range's last (an instant query at its end, over it): the finished job's stays.
        assert progress_shown(prometheus, "j", t0, 1500) == [pytest.approx(0.98, abs=0.01)]
        assert len(values("ETA", "j", 0, 1500)) == 1 and len(values("Stage", "j", 0, 1500)) == 1
        # A stalled job has no ETA (it was +Inf).
        assert values("ETA", "stuck", 2000, 3000) == []
        # No GPU job runs at the end: the count ends at 0 (the stat's last non-null value was 1). While j ran it was
        # one, not two: the unnamed series are no job of their own.
        gpu_jobs = values("Running GPU jobs", "", 0, 3000)[0]
        assert gpu_jobs[-1] == 0 and max(gpu_jobs) == 1
    finally:
        prometheus.stop()


def progress_shown(prometheus: Any, job: str, t0: int, end: int) -> list[float]:
    """The Progress stat over the range from t0 to t0 + `end`, as Grafana reduces it (each series' last non-null
    value of the range's points; an instant query has one, at the range's end)."""
    panel = next(p for p in json.loads(dashboard.render())["panels"] if p["title"] == "Progress")
    assert panel["options"]["reduceOptions"]["calcs"] == ["lastNotNull"]
    found = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$namespace", "a").replace("$job", job).replace("$__range", f"{end}s")
        start = t0 + end if target.get("instant") else t0
        found += [float(s["values"][-1][1]) for s in prometheus.query_range(expr, start, t0 + end, 15)]
    return found


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_progress_is_the_newest_run_s_and_its_newest_attempt_s(tmp_path: Path) -> None:
    """Job `j` trained to 1000 of 1000 and was deleted and made again under its name (another recipe): grouped by the
    job's name, the stat's last non-null value was the first run's 100 % all through the second run's loading and
    baseline. Job `r`'s attempt 1 stopped at step 400; attempt 2 resumed from its checkpoint at step 300: it showed
    40 % until attempt 2 passed step 400. Job `s` runs a trainer image from before process_start_time_seconds."""
    t0 = int(time.time()) - 3600
    lines = [f"# TYPE {m} gauge" for m in ("finetune_trainer_step", "finetune_trainer_total_steps",
                                           "finetune_trainer_stage", STARTED)]

    def run(job: str, uid: str, attempt: int, start: int, stop: int, steps: Any = None, started: bool = True) -> None:
        """Rank 0 of one attempt scraped every 15 s from `start` to `stop`: its stage, its start, and from the
        first step (`steps(seconds since start)`, None before it) its step and total."""
        labels = (f'namespace="a",finetunejob="{job}",finetunejob_uid="{uid}",attempt="{attempt}",'
                  f'pod="{job}-{attempt}-0-{uid}"')
        lines.extend(trainer_lived(labels, t0 + start, t0 + stop, started))
        for t in range(start, stop, 15):
            if steps and (step := steps(t - start)) is not None:
                lines.append(f"finetune_trainer_step{{{labels}}} {step} {t0 + t}")
                lines.append(f"finetune_trainer_total_steps{{{labels}}} 1000 {t0 + t}")

    for job, started in (("j", True), ("s", False)):
        run(job, "u1", 1, 0, 600, lambda s: min(1000, s * 1000 // 585), started)
        run(job, "u2", 1, 900, 1800, None, started)  # loads, then measures its baseline: no step yet
    run("r", "r", 1, 0, 600, lambda s: s * 400 // 585)
    run("r", "r", 2, 900, 1800, lambda s: None if s < 300 else 300 + (s - 300) // 10)
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    try:
        for job in ("j", "s"):
            assert progress_shown(prometheus, job, t0, 300) == [pytest.approx(0.51, abs=0.01)], job
            assert progress_shown(prometheus, job, t0, 800) == [1.0], job  # finished: its 100 % stays
            assert progress_shown(prometheus, job, t0, 1790) == [], job  # the new run has made no step
        assert progress_shown(prometheus, "r", t0, 1000) == [pytest.approx(0.4)]  # attempt 2 loads
        assert progress_shown(prometheus, "r", t0, 1790) == [pytest.approx(0.359, abs=0.005)]  # its own, not 40 %
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_a_job_that_stopped_running_has_no_eta(tmp_path: Path) -> None:
    """Job `f` trained to step 400 of 1000 and failed (its pod gone, its series ended there): the stat showed the
    last non-null ETA of the dashboard's range, still an hour after."""
    t0 = int(time.time()) - 3600
    labels = 'namespace="a",finetunejob="f",attempt="1",pod="f-1-0-x"'
    lines = ["# TYPE finetune_trainer_step gauge"]
    lines += [f"finetune_trainer_step{{{labels}}} {t * 400 // 600} {t0 + t}" for t in range(0, 600, 15)]
    lines += ["# TYPE finetune_trainer_total_steps gauge"]
    lines += [f"finetune_trainer_total_steps{{{labels}}} 1000 {t0 + t}" for t in range(0, 600, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    panel = next(p for p in json.loads(dashboard.render())["panels"] if p["title"] == "ETA")

    def shown(end: int) -> list[float]:
        """The stat over the range from t0 to `end`, as Grafana reduces it: each series' last value, of the range's
        points (an instant query has one, at the end)."""
        found = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", "a").replace("$job", "f").replace("$__rate_interval", "1m")
            start = t0 + end if target.get("instant") else t0
            found += [float(s["values"][-1][1]) for s in prometheus.query_range(expr, start, t0 + end, 15)]
        return found

    try:
        assert shown(500) == [pytest.approx(1000, rel=0.05)]  # 670 steps left at 2 steps every 3 s
        assert shown(3000) == []
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_eta_is_the_steps_left_over_the_trainers_steps_per_second(tmp_path: Path) -> None:
    """Job `v` makes 10 steps/s for 20 s, then validates for 60 s, over and over: 2.5 steps/s in all, which the
    trainer's steps/s says (status.progress.etaSeconds' rate). The step's slope over the window swung the stat from
    half to more than twice the time left, or to nothing, with the validations."""
    t0 = int(time.time()) - 3600
    labels = 'namespace="a",finetunejob="v",attempt="1",pod="v-1-0-x"'
    lines = []
    for metric, value in (("step", lambda t: (t // 80) * 200 + min(t % 80, 20) * 10), ("total_steps", lambda t: 100000),
                          ("steps_per_second", lambda t: 2.5)):
        lines += [f"# TYPE finetune_trainer_{metric} gauge"]
        lines += [f"finetune_trainer_{metric}{{{labels}}} {value(t)} {t0 + t}" for t in range(0, 1200, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    expr = dashboard_exprs()["ETA"][0].replace("$namespace", "a").replace("$job", "v").replace("$__rate_interval", "1m")
    try:
        for t in range(400, 1200, 30):
            step = (t // 80) * 200 + min(t % 80, 20) * 10
            shown = [float(s["values"][-1][1]) for s in prometheus.query_range(expr, t0 + t, t0 + t, 15)]
            assert shown == [pytest.approx((100000 - step) / 2.5, rel=0.01)], t
    finally:
        prometheus.stop()


STARTED = "process_start_time_seconds"


def trainer_lived(labels: str, start: int, stop: int, started: bool = True) -> list[str]:
    """The series of a rank 0 scraped every 15 s from `start` to `stop` (its stage and, but for a trainer image from
    before it, its process's start), for a backfill."""
    lines = [f'finetune_trainer_stage{{{labels},stage="Training"}} 1 {t}' for t in range(start, stop, 15)]
    return lines + [f"{STARTED}{{{labels}}} {start} {t}" for t in range(start, stop, 15) if started]


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_evaluation_is_the_latest_run_s_of_a_job_made_again_under_its_name(tmp_path: Path) -> None:
    """Job `j` ran (accuracy 0.5 -> 0.9), was deleted and made again with another recipe (0.55 -> 0.6): the bars took
    the larger value of either run, so they showed the first run's 0.9 beside the second's baseline, before and
    after the second run's final evaluation. Each run distilled from a teacher (0.95, then 0.7), whose bar is the
    latest run's too."""
    t0 = int(time.time()) - 3600
    lines = [f"# TYPE {m} gauge" for m in ("finetune_trainer_stage", "finetune_trainer_eval_metric", STARTED)]
    for uid, start, stop, baseline, final, teacher in (("u1", 0, 600, 0.5, 0.9, 0.95),
                                                       ("u2", 900, 1500, 0.55, 0.6, 0.7)):
        labels = f'namespace="a",finetunejob="j",finetunejob_uid="{uid}",attempt="1",pod="j-1-0-{uid}"'
        lines += trainer_lived(labels, t0 + start, t0 + stop)
        for phase, value, since in (("baseline", baseline, 100), ("teacher", teacher, 110), ("final", final, 550)):
            lines += [f'finetune_trainer_eval_metric{{{labels},phase="{phase}",metric="accuracy"}} {value} {t}'
                      for t in range(t0 + start + since, t0 + stop, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    exprs = dashboard_exprs()

    def values(title: str, at: int) -> list[tuple[str, float]]:
        found = []
        for expr in exprs[title]:
            expr = expr.replace("$namespace", "a").replace("$job", "j").replace("$__range", "1h")
            found += [(s["metric"]["metric"], float(s["values"][-1][1]))
                      for s in prometheus.query_range(expr, t0 + at, t0 + at, 15)]
        return found

    try:
        # The second run has its baseline and its teacher's only: no fine-tuned bar and no change yet.
        assert values("Baseline vs fine-tuned", 1200) == [("accuracy", 0.55), ("accuracy", 0.7)]
        assert values("Change (fine-tuned - baseline)", 1200) == []
        assert values("Baseline vs fine-tuned", 1600) == [("accuracy", 0.55), ("accuracy", 0.6), ("accuracy", 0.7)]
        assert values("Change (fine-tuned - baseline)", 1600) == [("accuracy", pytest.approx(0.05))]
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_evaluation_is_the_latest_attempt_s_of_a_run(tmp_path: Path) -> None:
    """Attempt 1 of job `j` evaluated its fine-tuned model (accuracy 0.5 -> 0.9) and was preempted in its export;
    retuned while suspended, attempt 2 trained again to 0.7: the bar took the larger final of either attempt. Until
    attempt 2 scores its baseline (loading its model) it is attempt 1's, and so for good had attempt 2 failed then.
    Job `k` (no baseline) has attempt 1's final 0.8; its attempt 2 validated during training (phase training), then
    failed: a validation is no score of the attempt's, and the fine-tuned bar stays attempt 1's. Job `m`'s attempt 2
    ran a trainer image from before process_start_time_seconds (0.5 -> 0.6): it is still the newest."""
    t0 = int(time.time()) - 3600
    lines = [f"# TYPE {m} gauge" for m in ("finetune_trainer_stage", "finetune_trainer_eval_metric", STARTED)]
    for job, attempt, start, stop, phases in (
            ("j", "1", 0, 600, (("baseline", 0.5, 100), ("final", 0.9, 550))),
            ("j", "2", 900, 1500, (("baseline", 0.5, 100), ("final", 0.7, 550))),
            ("k", "1", 0, 600, (("final", 0.8, 550),)), ("k", "2", 900, 1500, (("training", 0.6, 200),)),
            ("m", "1", 0, 600, (("baseline", 0.5, 100), ("final", 0.9, 550))),
            ("m", "2", 900, 1500, (("baseline", 0.5, 100), ("final", 0.6, 550)))):
        labels = (f'namespace="a",finetunejob="{job}",finetunejob_uid="{job}",attempt="{attempt}",'
                  f'pod="{job}-{attempt}-0-x"')
        lines += trainer_lived(labels, t0 + start, t0 + stop, started=(job, attempt) != ("m", "2"))
        for phase, value, since in phases:
            lines += [f'finetune_trainer_eval_metric{{{labels},phase="{phase}",metric="accuracy"}} {value} {t}'
                      for t in range(t0 + start + since, t0 + stop, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    exprs = dashboard_exprs()

    def values(title: str, target: int, job: str, at: int) -> list[float]:
        expr = exprs[title][target].replace("$namespace", "a").replace("$job", job).replace("$__range", "1h")
        return [float(s["values"][-1][1]) for s in prometheus.query_range(expr, t0 + at, t0 + at, 15)]

    try:
        assert values("Change (fine-tuned - baseline)", 0, "j", 1600) == [pytest.approx(0.2)]
        # attempt 2 loads its model: no score of its own yet
        assert values("Change (fine-tuned - baseline)", 0, "j", 950) == [pytest.approx(0.4)]
        assert values("Baseline vs fine-tuned", 1, "k", 1600) == [pytest.approx(0.8)]
        assert values("Change (fine-tuned - baseline)", 0, "m", 1600) == [pytest.approx(0.1)]
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_evaluation_of_a_trainer_scraped_for_seconds_is_shown(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A small job's rank 0 may be scraped for a few seconds only (found late, gone once done): the panels chose the
    run and the attempt by a subquery of their series' timestamps, at the evaluation interval's resolution (5 s
    here, a minute by default), and a trainer scraped between two of its points was none: the chart test found the
    evaluation panels empty, one run in four. A real trainer's endpoint, scraped for under 3 s between two points."""
    import torch

    from finetune_trainer import telemetry
    from finetune_trainer.config import Stage

    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "--set",
                          "podMonitor.enabled=true", "--set", "podMonitor.interval=1s", "--show-only",
                          "templates/podmonitor.yaml"], check=True, capture_output=True, text=True).stdout
    port = free_port()
    (targets := tmp_path / "targets.json").write_text(json.dumps([pod_target(port, 0)]))
    prometheus = prometheus_server.start(tmp_path / "prometheus", [
        prometheus_server.file_pod_monitor_config(yaml.safe_load(out), targets)], free_port())
    for name, value in ((telemetry.PORT_ENV, str(port)), (telemetry.ADDR_ENV, "127.0.0.1"),
                        (telemetry.LINGER_ENV, "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(telemetry, "_last_exit_code", [None])

    def scraped(up: int) -> None:
        deadline = time.monotonic() + 30
        while not prometheus.query(f'up{{pod="ddp-1-0-abcde"}} == {up}'):
            assert time.monotonic() < deadline, f"no scrape with up {up}"
            time.sleep(0.1)

    try:
        scraped(0)  # a target, down: nothing serves yet
        time.sleep(5.3 - time.time() % 5)  # just past a point of the 5 s grid
        start = time.time()
        trainer = telemetry.Metrics(torch.device("cpu"))
        trainer.set_stage(Stage.DONE)
        trainer.set_eval("baseline", {"accuracy": 0.5})
        trainer.set_eval("final", {"accuracy": 0.75})
        trainer.serve()
        scraped(1)
        time.sleep(max(0.0, start + 2.7 - time.time()))
        trainer.close()  # the next scrape fails, before the grid's next point: the series are stale there
        scraped(0)
        end = time.time()
        expr = dashboard_exprs()["Change (fine-tuned - baseline)"][0].replace("$namespace", "team-a").replace(
            "$job", "ddp").replace("$__range", f"{int(end - start) + 1}s")
        assert [float(s["values"][-1][1]) for s in prometheus.query_range(expr, end, end)] == [pytest.approx(0.25)]
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_operator_is_scraped_as_job_finetune_operator_whatever_the_name_override(tmp_path: Path) -> None:
    """The dashboard's operator panels select job="finetune-operator"; the ServiceMonitor's jobLabel made the job
    the Service's app.kubernetes.io/name, which is nameOverride. Both the ServiceMonitor and the README's scrape
    config label it with the release's name too, which the alerts select by: by namespace alone, two releases in one
    namespace were one operator to them, one's down hidden by the other's up."""
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-n", "ops",
                          "--set", "serviceMonitor.enabled=true", "--set", "nameOverride=ft",
                          "--show-only", "templates/servicemonitor.yaml", "--show-only", "templates/service.yaml"],
                         check=True, capture_output=True, text=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    with _rank0() as port:
        pod_labels = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                      for k, v in docs["Service"]["spec"]["selector"].items()}
        targets = tmp_path / "targets.json"
        targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {
            "__meta_kubernetes_namespace": "ops", "__meta_kubernetes_pod_name": "fto-abc",
            "__meta_kubernetes_pod_container_port_name": "metrics", **pod_labels,
            **{k.replace("_label_", "_labelpresent_"): "true" for k in pod_labels}}}]))
        config = prometheus_server.service_monitor_config(docs["ServiceMonitor"], docs["Service"], targets)
        # The README's job discovers the Service's EndpointSlices: the Service's labels, the slice's port name.
        slices = tmp_path / "slices.json"
        slices.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {
            "__meta_kubernetes_namespace": "ops", "__meta_kubernetes_pod_name": "fto-abc",
            "__meta_kubernetes_endpointslice_port_name": "metrics",
            **{f"__meta_kubernetes_service_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
               for k, v in docs["Service"]["metadata"]["labels"].items()}}}]))
        readme = readme_scrape_configs()["finetune-operator"]
        named = "__meta_kubernetes_service_label_app_kubernetes_io_name"
        readme["relabel_configs"] = [r | {"regex": "ft"} if r.get("source_labels") == [named] else r  # as it says
                                     for r in readme["relabel_configs"]]
        prometheus = prometheus_server.start(tmp_path / "prometheus", [prometheus_server.from_file(config, targets),
                                                                       prometheus_server.from_file(readme, slices)],
                                             free_port())
        try:
            deadline = time.monotonic() + 30
            while len(up := prometheus.query("up == 1")) < 2:
                assert time.monotonic() < deadline, "the operator not scraped by both"
                time.sleep(0.5)
            assert [(s["metric"]["job"], s["metric"]["namespace"], s["metric"]["release"]) for s in up] == \
                [("finetune-operator", "ops", "fto")] * 2
            assert dashboard.OPERATOR == 'job="finetune-operator"'
        finally:
            prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_operator_panels_count_the_operator_once_where_a_second_scrape_job_reads_it(tmp_path: Path) -> None:
    """A Prometheus that also honours the pods' prometheus.io annotations scrapes the operator a second time, as
    job="kubernetes-pods": the jobs by phase, the failures and the reconciles were summed over both, twice the
    operator's."""
    t0 = int(time.time()) - 600
    lines = ["# TYPE finetune_operator_jobs gauge", "# TYPE finetune_operator_job_failures counter",
             "# TYPE finetune_operator_reconcile_duration_seconds histogram"]
    for job in ("finetune-operator", "kubernetes-pods"):
        for t in range(t0, t0 + 600, 15):
            labels = f'job="{job}",namespace="ops",pod="fto-abc"'
            lines += [f'finetune_operator_jobs{{{labels},phase="Running"}} 3 {t}',
                      f'finetune_operator_job_failures_total{{{labels},reason="OOMKilled"}} 2 {t}',
                      f'finetune_operator_reconcile_duration_seconds_bucket{{{labels},le="0.1"}} {t - t0} {t}',
                      f'finetune_operator_reconcile_duration_seconds_bucket{{{labels},le="+Inf"}} {t - t0} {t}',
                      f"finetune_operator_reconcile_duration_seconds_count{{{labels}}} {t - t0} {t}"]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    exprs = dashboard_exprs()

    def last(title: str) -> list[float]:
        expr = exprs[title][0].replace("$__rate_interval", "1m")
        return [float(s["values"][-1][1]) for s in prometheus.query_range(expr, t0 + 300, t0 + 300, 15)]

    try:
        assert last("Jobs by phase") == [3]
        assert last("Failed jobs by reason (since the operator started)") == [2]
        assert last("Reconciles per second") == [pytest.approx(1)]
    finally:
        prometheus.stop()


def notes(tmp_path: Path, *values: str) -> str:
    """NOTES.txt as `helm install` prints it (helm template leaves it out): rendered here through a copy of the
    chart where it is a named template inside a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(REPO / "charts" / "finetune-operator", chart)
    text = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" }}' + text + "{{- end }}")
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include "notes" . | toJson }}\n')
    out = subprocess.run([helm(), "template", "fto", str(chart), "-n", "ops", "--show-only", "templates/notes.yaml",
                          *[a for v in values for a in ("--set", v)]], check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(out)["data"]["notes"]


def test_the_notes_name_where_the_dashboard_is_and_how_the_crd_is_upgraded(tmp_path: Path) -> None:
    plain = notes(tmp_path / "a")
    assert "kubectl apply --server-side --force-conflicts -f finetune-operator/crds/" in plain
    templated = notes(tmp_path / "b", "crds.templated=true", "dashboards.enabled=true", "dashboards.namespace=monitoring")
    # With the CRD templated, no hand-applied CRD before an upgrade (it was still asked for).
    assert "kubectl apply" not in templated.split("Upgrading:")[1]
    assert "ConfigMap monitoring/fto-finetune-operator-dashboard" in templated


def test_the_notes_put_the_dashboard_in_its_folder_only_where_the_sidecar_reads_the_folder(tmp_path: Path) -> None:
    """The NOTES and the README said the sidecar loads the dashboard into the folder FineTune; the Grafana chart's
    sidecar reads no folder annotation unless told which (sidecar.dashboards.folderAnnotation, with the provider's
    foldersFromFilesStructure), and the dashboard landed in its default folder."""
    said = " ".join(notes(tmp_path, "dashboards.enabled=true", "dashboards.folderAnnotation=team_folder").split())
    assert ("into the folder FineTune where its sidecar.dashboards.folderAnnotation is team_folder and "
            "provider.foldersFromFilesStructure is on") in said


@pytest.mark.parametrize("values", [(), ("prometheusScrapeAnnotations.enabled=true",)])
def test_the_notes_send_a_prometheus_without_the_pod_monitor_to_the_readmes_scrape_config(
        tmp_path: Path, values: tuple[str, ...]) -> None:
    """They said the annotations were enough for "a Prometheus that honours prometheus.io/* annotations". One that
    honours them alone (the prometheus chart's kubernetes-pods job, run on this chart's pods in a real Prometheus)
    labels a job finetune_dev_job_name, never finetunejob, which every per-job panel selects, and scrapes every
    worker: the dashboard's job rows stayed empty, and with the annotations on the NOTES said nothing at all."""
    said = " ".join(notes(tmp_path, *values).split())
    section = re.search(r'README\'s scrape config(?: too)? \("(.+?)"\)', said)
    assert section and f"**{section[1]}**" in (REPO / "README.md").read_text(), said
    assert "finetunejob" in said or not values, said


@pytest.mark.parametrize("values", [(), ("watchNamespaces={a,b}",), ("networkPolicy.namespaces={team-a}",)])
def test_the_notes_name_the_namespaces_the_network_policy_guards(tmp_path: Path, values: tuple[str, ...]) -> None:
    """Watching every namespace, the NetworkPolicy went to the release's namespace alone while the README said each
    watched namespace had one: the teams' trainers went unguarded, and neither the NOTES nor the README said so."""
    said = notes(tmp_path, "networkPolicy.enabled=true", *values)
    found = re.search(r"reach the trainers in (.+)\.\n", said)
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-n", "ops",
                          "--set", "networkPolicy.enabled=true", *[a for v in values for a in ("--set", v)],
                          "--show-only", "templates/networkpolicy.yaml"], check=True, capture_output=True, text=True)
    guarded = [d["metadata"]["namespace"] for d in yaml.safe_load_all(out.stdout) if d]
    assert found and found[1].split(", ") == guarded, said
    assert ("are not guarded" in said) == (not values), said


def test_a_trainer_uid_of_openshift_s_range_in_a_values_file_reaches_the_operator_as_that_number(tmp_path: Path) -> None:
    """Helm reads a values file's numbers as floats, and `quote` printed 1000680000 (a uid of an OpenShift
    namespace's range) as "1.00068e+09", which the operator refused at start: it never ran."""
    values = tmp_path / "values.yaml"
    values.write_text("trainer:\n  uid: 1000680000\n")
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-f", str(values),
                          "--show-only", "templates/deployment.yaml"], check=True, capture_output=True, text=True).stdout
    env = {e["name"]: e.get("value") for e in yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_OPERATOR_TRAINER_UID"] == "1000680000"


def test_a_trainer_uid_the_apiserver_would_refuse_is_refused_at_install() -> None:
    """The schema took any uid from 1 on; the apiserver takes runAsUser and fsGroup up to 2147483647 only, so the
    operator started and failed every job's Job create (InvalidSpec, blamed on the job's spec)."""
    schema = json.loads((REPO / "charts" / "finetune-operator" / "values.schema.json").read_text())
    assert schema["properties"]["trainer"]["properties"]["uid"]["maximum"] == settings.MAX_UID
    chart = str(REPO / "charts" / "finetune-operator")
    for uid, taken in ((settings.MAX_UID, True), (settings.MAX_UID + 1, False), (0, True), (-1, False)):
        result = subprocess.run([helm(), "template", "fto", chart, "--set", f"trainer.uid={uid}"],
                                capture_output=True, text=True)
        assert (result.returncode == 0) == taken and (taken or "/trainer/uid" in result.stderr), result.stderr


def test_one_port_for_metrics_and_liveness_is_refused_at_install(tmp_path: Path) -> None:
    """The schema took livenessPort equal to metrics.port: helm install succeeded, and the operator exited at start
    on the second endpoint's bind ("address already in use"), again at every restart."""
    values = tmp_path / "values.yaml"
    values.write_text("livenessPort: 8000\n")  # a values file's number (a float) against the default's
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-f", str(values)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "livenessPort and metrics.port are both 8000" in result.stderr, result.stderr


@pytest.mark.parametrize(("value", "path"), [("livenessProbe.httpGet.port=9999", "/livenessProbe"),
                                           ("livenessProbe.exec.command={true}", "/livenessProbe"),
                                           ("livenessProbe.initialDelaySeconds=soon", "/livenessProbe/initialDelaySeconds")])
def test_liveness_probe_values_other_than_its_timings_are_refused_at_install(value: str, path: str) -> None:
    """livenessProbe took any object: a handler of its own (httpGet.port, as other charts' values have it) was rendered
    beside the chart's, and the last httpGet won: GET / on port 9999, where nothing listens, so the operator was
    restarted for ever; a timing that is no number was refused only by the apiserver."""
    chart = str(REPO / "charts" / "finetune-operator")
    result = subprocess.run([helm(), "template", "fto", chart, "--set", value], capture_output=True, text=True)
    assert result.returncode != 0 and f"at '{path}'" in result.stderr, result.stderr
    out = subprocess.run([helm(), "template", "fto", chart, "--set", "livenessProbe.initialDelaySeconds=30",
                          "--show-only", "templates/deployment.yaml"], check=True, capture_output=True, text=True).stdout
    probe = yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"} and probe["initialDelaySeconds"] == 30


@pytest.mark.parametrize(("value", "path"), [("serviceMonitor.interval=30s30s", "/serviceMonitor/interval"),
                                           ("podMonitor.interval=", "/podMonitor/interval"),
                                           ("networkPolicy.prometheus.podSelector=null", "/networkPolicy/prometheus")])
def test_monitor_and_network_policy_values_that_would_break_them_are_refused_at_install(value: str, path: str) -> None:
    """An interval such as 30s30s passed the schema, and prometheus-operator refused the ServiceMonitor at apply, while
    1d, which it takes, was refused; podSelector=null rendered `podSelector: null` beside `namespaceSelector: {}`: every
    pod of every namespace reached the trainers' metrics."""
    chart = str(REPO / "charts" / "finetune-operator")
    result = subprocess.run([helm(), "template", "fto", chart, "--set", "networkPolicy.enabled=true",
                             "--set", "serviceMonitor.enabled=true", "--set", value], capture_output=True, text=True)
    assert result.returncode != 0 and f"at '{path}'" in result.stderr, result.stderr
    subprocess.run([helm(), "template", "fto", chart, "--set", "serviceMonitor.enabled=true",
                    "--set", "serviceMonitor.interval=1d"], check=True, capture_output=True)


def test_trainers_reach_each_other_on_every_port_without_port_ranges() -> None:
    """The trainers' rule opened TCP 1-9089, 9091-65535 and UDP by endPort: a network plugin without endPort (Cilium
    before 1.16, Azure NPM) opens only each range's first port, so a gang's rendezvous (29500) never met."""
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "--set",
                          "networkPolicy.enabled=true", "--show-only", "templates/networkpolicy.yaml"],
                         check=True, capture_output=True, text=True).stdout
    [policy] = [d for d in yaml.safe_load_all(out) if d]
    peers = [rule for rule in policy["spec"]["ingress"] if "namespaceSelector" not in rule["from"][0]]
    assert peers == [{"from": [{"podSelector": {"matchExpressions": [
        {"key": "finetune.dev/job-name", "operator": "Exists"}]}}]}], peers


@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1", True), ("127.3.0.2", True), ("localhost", True), ("localhost.", True), ("::1", True),
    ("[::1]", True), ("0:0:0:0:0:0:0:1", True), ("::0001", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("$(POD_IP)", False), ("::", False), ("10.0.0.7", False), ("fe80::1", False)])
def test_a_loopback_bind_address_is_refused_at_install(address: str, refused: bool) -> None:
    """bindAddress=127.0.0.1 (to keep /metrics private, say) passed the schema; the kubelet's liveness probe reaches
    /healthz on the pod's IP, where nothing then listens, so the operator was killed and restarted for ever. The
    template's check let [::1], localhost. and ::1 written out in full through."""
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"),
                             "--set", f"bindAddress={address}"], capture_output=True, text=True)
    assert (result.returncode != 0 and "at '/bindAddress'" in result.stderr) == refused, result.stderr


def test_extra_env_that_the_operator_s_env_has_already_is_refused_at_install() -> None:
    """extraEnv took a name the chart sets (or one twice): the API takes it, the last winning, but helm upgrade's patch
    is keyed by name: adding one failed ("The order in patch list ... doesn't match $setElementOrder list"), and
    removing extraEnv FINETUNE_OPERATOR_NAMESPACES dropped the chart's too, so the operator ran cluster-wide with only
    the watched namespaces' Roles, forbidden everywhere, after an upgrade Helm called a success."""
    chart = str(REPO / "charts" / "finetune-operator")
    out = subprocess.run([helm(), "template", "fto", chart, "--set-json", 'trainer.resources={"limits": {"cpu": 1}}',
                          "--show-only", "templates/deployment.yaml"], check=True, capture_output=True, text=True).stdout
    ours = [e["name"] for e in yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["env"]]
    for extra in [[{"name": name, "value": "x"}] for name in ours] + [[{"name": "HTTPS_PROXY", "value": "x"}] * 2]:
        result = subprocess.run([helm(), "template", "fto", chart, "--set-json", "extraEnv=" + json.dumps(extra)],
                                capture_output=True, text=True)
        assert result.returncode != 0 and f"{extra[-1]['name']} is in the operator's env already" in result.stderr, extra
    proxy = [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]
    out = subprocess.run([helm(), "template", "fto", chart, "--set-json", "extraEnv=" + json.dumps(proxy),
                          "--show-only", "templates/deployment.yaml"], check=True, capture_output=True, text=True).stdout
    assert yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["env"][-1] == proxy[0]


def test_pod_labels_go_over_the_charts_once_and_never_over_a_selectors() -> None:
    """podLabels with a key of the chart's labels rendered it twice in the pod's: a duplicate YAML key, or the last
    value winning, over the one the Deployment and the Service select by too."""
    chart = str(REPO / "charts" / "finetune-operator")

    def labels(pod_labels: dict[str, str]) -> dict[str, str]:
        out = subprocess.run([helm(), "template", "fto", chart, "--set-json", f"podLabels={json.dumps(pod_labels)}",
                              "--show-only", "templates/deployment.yaml"], check=True, capture_output=True, text=True)
        assert out.stdout.count("app.kubernetes.io/version:") == 2  # once in the Deployment's labels, once in the pod's
        return yaml.safe_load(out.stdout)["spec"]["template"]["metadata"]["labels"]

    assert labels({"team": "a"})["team"] == "a"
    assert labels({"app.kubernetes.io/version": "pinned"})["app.kubernetes.io/version"] == "pinned"
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance"):
        result = subprocess.run([helm(), "template", "fto", chart, "--set-json", f'podLabels={{"{key}": "x"}}'],
                                capture_output=True, text=True)
        assert result.returncode != 0 and f"podLabels.{key}: the operator's Deployment" in result.stderr, key


@pytest.mark.parametrize(("resources", "field"), [
    ({"limits": {"cpu": 0.5}}, "/trainer/resources/limits/cpu"),
    ({"requests": {"memory": "four"}}, "/trainer/resources/requests/memory"),
    ({"claims": [{"name": "gpu"}]}, "/trainer/resources"),
    ({"requests": {"cpu": "-1"}}, "/trainer/resources/requests/cpu"),
    ({"requests": {"cpu": -1}}, "/trainer/resources/requests/cpu"),
    ({"limits": {"gpu per worker": 1}}, "invalid propertyName 'gpu per worker'"),  # Helm's names no key's path
    ({"requests": {"nvidia.com/gpu": 1}}, "trainer.resources.requests.nvidia.com/gpu"),
    ({"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}, "trainer.resources.requests.nvidia.com/gpu"),
    ({"limits": {"nvidia.com/gpu": "0.5"}}, "trainer.resources.limits.nvidia.com/gpu"),
    ({"limits": {"nvidia.com/gpu": 1.5}}, "/trainer/resources/limits/nvidia.com~1gpu"),
    ({"limits": {"nvidia.com/gpu": "500m"}}, "trainer.resources.limits.nvidia.com/gpu"),
    ({"requests": {"nvidia.com/gpu": "1001m"}, "limits": {"nvidia.com/gpu": 1}},
     "trainer.resources.requests.nvidia.com/gpu"),
    ({"limits": {"example.com/foo": "9223372036854775808"}}, "trainer.resources.limits.example.com/foo"),
    ({"limits": {"example.com/foo": 9223372036854775808}}, "trainer.resources.limits.example.com/foo"),
    ({"limits": {"example.com/foo": "8Ei"}}, "trainer.resources.limits.example.com/foo"),
    ({"limits": {"example.com/foo": "1e19"}}, "trainer.resources.limits.example.com/foo"),
    ({"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}, "trainer.resources.requests.cpu"),
    ({"requests": {"cpu": "1.0001"}, "limits": {"cpu": 1}}, "trainer.resources.requests.cpu"),
    ({"requests": {"memory": "16Gi"}, "limits": {"memory": "16G"}}, "trainer.resources.requests.memory"),
    ({"requests": {"memory": "1e10"}, "limits": {"memory": "9Gi"}}, "trainer.resources.requests.memory"),
    ({"requests": {"memory": "1Ei"}, "limits": {"memory": "1152921504606846975"}}, "trainer.resources.requests.memory"),
    ({"requests": {"ephemeral-storage": "1Ti"}, "limits": {"ephemeral-storage": "1T"}},
     "trainer.resources.requests.ephemeral-storage"),
    ({"requests": {"cpu": 1e21}}, "trainer.resources.requests.cpu"),
    ({"requests": {"hugepages-2Mi": "1Gi", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
     "trainer.resources.requests.hugepages-2Mi"),
    ({"requests": {"hugepages-1Gi": "1Gi", "memory": "1Gi"}, "limits": {"hugepages-1Gi": "2Gi", "memory": "1Gi"}},
     "trainer.resources.requests.hugepages-1Gi"),
    ({"limits": {"hugepages-2Mi": "3Mi", "memory": "1Gi"}}, "trainer.resources.limits.hugepages-2Mi"),
    ({"limits": {"hugepages-2Mi": "100m", "memory": "1Gi"}}, "trainer.resources.limits.hugepages-2Mi"),
    ({"limits": {"hugepages-2Mi": "2097152.5", "memory": "1Gi"}}, "trainer.resources.limits.hugepages-2Mi"),
    ({"limits": {"hugepages-1": "4503599627370496.5", "memory": "1Gi"}}, "trainer.resources.limits.hugepages-1"),
    ({"limits": {"hugepages-1": "4503599627370495.9999999991", "memory": "1Gi"}},
     "trainer.resources.limits.hugepages-1"),
    ({"limits": {"hugepages-abc": "2Mi", "memory": "1Gi"}}, "trainer.resources.limits.hugepages-abc"),
    ({"limits": {"hugepages-0": 0, "memory": "1Gi"}}, "trainer.resources.limits.hugepages-0"),
    ({"limits": {"hugepages-2Mi": "4Mi"}}, "trainer.resources: huge pages require a cpu or memory"),
    ({"limits": {"gpu": 1}}, "trainer.resources.limits.gpu"),
    ({"limits": {"requests.example.com/gpu": 1}}, "trainer.resources.limits.requests.example.com/gpu"),
    ({"requests": {"memory": "0." + "0" * 61 + "1Gi"}}, "/trainer/resources/requests/memory"),  # 66 characters
])
def test_trainer_resources_the_operator_would_refuse_are_refused_at_install(resources: dict[str, Any],
                                                                           field: str) -> None:
    """The schema took any number, string or claim in trainer.resources; the operator refuses what a FineTuneJob's
    spec.runtime.resources refuses (a fractional number, a string that is no quantity, claims, a negative quantity,
    no resource name, a GPU requested and not limited, or not whole), so helm install went ahead and it never ran.
    Then the chart took a request above its limit, and an extended resource beyond int64 (or 500m of one), and a
    quantity string of more than the 64 characters the operator (and the CRD) take. And huge pages requested without
    an equal limit, which the apiserver refuses as it does an extended resource's, so every job failed; and huge pages
    that are no whole number of pages of the size their name says, or beside no cpu or memory, as the apiserver
    refuses them; and a resource no container may ask for (gpu, for nvidia.com/gpu)."""
    with pytest.raises(ValidationError):  # the operator refuses it (settings.trainer_resources), so the chart must
        core.ResourceRequirements.model_validate(resources)
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"),
                             "--set-json", "trainer.resources=" + json.dumps(resources)], capture_output=True, text=True)
    assert result.returncode != 0 and field in result.stderr, result.stderr


@pytest.mark.parametrize("resources", [
    {"limits": {"example.com/foo": 1000000}}, {"requests": {"nvidia.com/gpu": 0}, "limits": {"nvidia.com/gpu": 0}},
    {"requests": {"nvidia.com/gpu": "+1"}, "limits": {"nvidia.com/gpu": 1}},
    {"requests": {"nvidia.com/gpu": "01"}, "limits": {"nvidia.com/gpu": "1"}}, {"limits": {"nvidia.com/gpu": "2000m"}},
    {"requests": {"hugepages-2Mi": "1Gi"}, "limits": {"hugepages-2Mi": "1Gi", "memory": "8Gi"}},
    {"limits": {"hugepages-2Mi": "6291456", "cpu": 1}}, {"limits": {"hugepages-1Gi": 0, "memory": "1Gi"}},
    {"limits": {"hugepages-2Mi": "2097151.5", "cpu": 1}}, {"limits": {"hugepages-2Mi": "2047.9999Ki", "cpu": 1}},
    {"limits": {"hugepages-1": "4503599627370495.5", "cpu": 1}},
    {"limits": {"hugepages-1": "4503599627370495.999999999", "cpu": 1}},
    {"requests": {"nvidia.com/gpu": "1000m"}, "limits": {"nvidia.com/gpu": "1"}},
    {"limits": {"example.com/foo": "9223372036854775807"}}, {"limits": {"example.com/foo": "7Ei"}},
    {"limits": {"example.com/foo": "0.5Ki"}},
    {"requests": {"cpu": "1500m", "memory": "16G"}, "limits": {"cpu": "1.5", "memory": "16Gi"}},
    {"requests": {"cpu": 1000000, "memory": "1e9"}, "limits": {"cpu": "1M", "memory": "1G"}},
    {"requests": {"cpu": "0.5", "memory": "1Gi"}, "limits": {"cpu": "500000u", "memory": "1073741824"}},
    {"requests": {"memory": "1Ei"}, "limits": {"memory": "1152921504606846976"}},
    {"requests": {"cpu": "+.5", "memory": "0"}, "limits": {"cpu": "5e-1", "memory": "0.0"}},
    {"requests": {"cpu": 10000000000000000000}}, {"limits": {"example.kubernetes.io/foo": 1}}])
def test_trainer_resources_the_operator_takes_are_taken_at_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  resources: dict[str, Any]) -> None:
    """The chart's own checks of extended resources refused what the operator takes: a values file's 1000000 (a
    float to Helm, 1e+06 as text), a request of 0 (empty to `default`), "+1" beside 1; and hugepages-2Mi, and then
    huge pages of a fraction of a byte that rounds up to whole pages, as the apiserver rounds it. Its comparisons of
    quantities must take each spelling of an equal or larger limit."""
    core.ResourceRequirements.model_validate(resources)
    # JSON, a YAML that quotes each string: PyYAML leaves "5e-1" bare, which Helm reads as a float
    (values := tmp_path / "values.yaml").write_text(json.dumps({"trainer": {"resources": resources}}))
    subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-f", str(values)],
                   check=True, capture_output=True, text=True)
    ours = operator_settings(monkeypatch, "trainer.resources=" + json.dumps(resources))
    assert {side: {k: str(v) for k, v in found.items()} for side, found in ours.trainer_resources.to_wire().items()
            if found} == {side: {k: str(v) for k, v in found.items()} for side, found in resources.items()}


def test_the_chart_orders_quantities_as_the_operator_does(tmp_path: Path) -> None:
    """The chart's checks of trainer.resources compare quantities as text (finetune-operator.quantity): that order
    must be the operator's for every spelling, at any size (no float rounds it), and so must what is whole."""
    helpers = (REPO / "charts" / "finetune-operator" / "templates" / "_helpers.tpl").read_text()
    assert f"regexMatch `{core.QUANTITY.replace('^[+-]?', '^[+]?', 1)}`" in helpers  # no minus: the schema's to refuse
    spellings: list[Any] = [
        "0", "+0", "0.0", ".0", "0e5", "1", "01", "+1", "1.", "1.0", "1000m", "999m", "1001m", ".5", "0.5", "500m",
        "500000u", "500000000n", "5e-1", "1k", "1000", "1e3", "1E3", "1e+3", "1e-3", "1m", "1n", "1u", "1Ki", "1024",
        "1.5Ki", "1536", "0.001Ki", "1.024", "16Gi", "16G", "17179869184", "17179869184000m", "8Ei", "7Ei",
        "9223372036854775807", "9223372036854775808", "9223372036854775806", "10E", "1E", "1Ei", "1e18", "1P",
        "1Pi", "1T", "1Ti", "1M", "1Mi", "1e999", "9e998", "1e-999", "123456789012345678901234567890.123456789",
        "123456789012345678901234567890.12345679", 0, 7, 1024, 1000000, 9223372036854775807, 10000000000000000000]
    chart = tmp_path / "chart"
    shutil.copytree(REPO / "charts" / "finetune-operator", chart)
    (chart / "templates" / "orders.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: orders}\ndata:\n{{- range $i, $q := .Values.spellings }}\n"
        '  "{{ $i }}": {{ include "finetune-operator.quantity" $q | quote }}\n{{- end }}\n')
    (values := tmp_path / "values.yaml").write_text(json.dumps({"spellings": spellings}))  # numbers: floats to Helm
    out = subprocess.run([helm(), "template", "fto", str(chart), "-f", str(values), "--skip-schema-validation",
                          "--show-only", "templates/orders.yaml"], check=True, capture_output=True, text=True).stdout
    ours = [json.loads(v) for _, v in sorted(yaml.safe_load(out)["data"].items(), key=lambda kv: int(kv[0]))]
    # The operator reads a float as Helm's toJson writes it, its shortest digits: 9223372036854775807 as ...6000
    theirs = [Decimal(repr(float(v))) if isinstance(v, int) else core.quantity_value(v) for v in spellings]
    for a, (ours_a, theirs_a) in enumerate(zip(ours, theirs, strict=True)):
        assert ours_a["whole"] == (theirs_a == theirs_a.to_integral_value()), spellings[a]
        for b, (ours_b, theirs_b) in enumerate(zip(ours, theirs, strict=True)):
            assert (ours_a["order"] < ours_b["order"]) == (theirs_a < theirs_b), (spellings[a], spellings[b])
            assert (ours_a["order"] == ours_b["order"]) == (theirs_a == theirs_b), (spellings[a], spellings[b])


@pytest.mark.parametrize(("value", "path"), [
    ("trainer.imagePullSecrets=" + json.dumps(["RegCred"]), "/trainer/imagePullSecrets"),
    ("trainer.imagePullSecrets=" + json.dumps(["reg_cred"]), "/trainer/imagePullSecrets"),
    ("trainer.podAnnotations=" + json.dumps({"team owner": "a"}), "/trainer/podAnnotations"),
    ("trainer.podAnnotations=" + json.dumps({"finetune.dev/team": "a"}), "/trainer/podAnnotations"),
    ("trainer.podAnnotations=" + json.dumps({"FineTune.dev/team": "a"}), "/trainer/podAnnotations"),
    ("trainer.podAnnotations=" + json.dumps({"Batch.Kubernetes.IO/x": "a"}), "/trainer/podAnnotations"),
    ("trainer.podAnnotations=" + json.dumps({"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}),
     "/trainer/podAnnotations"),
    ("trainer.image=" + json.dumps("ghcr.io/x/trainer:1\n"), "/trainer/image"),
    ("trainer.image=" + json.dumps("ghcr.io/x/trainer:1\v"), "/trainer/image"),
    ("trainer.image=" + json.dumps("ghcr.io/x/trainer\x01:1"), "/trainer/image"),
    ("trainer.image=" + json.dumps("x" * 513), "/trainer/image"),
])
def test_trainer_pod_settings_the_operator_would_refuse_are_refused_at_install(
        monkeypatch: pytest.MonkeyPatch, value: str, path: str) -> None:
    """The schema took any non-empty pull secret name and any annotation key; the operator refuses what is no Secret
    name and what a FineTuneJob's spec.pod.annotations refuses, so helm install succeeded and the operator exited at
    start ("invalid settings"). Then a reserved prefix in capitals (FineTune.dev/), which the operator refuses too.
    Then a trainer image with whitespace or a control character, which the apiserver refuses in a Job: the operator
    took a trailing newline and failed every job (InvalidSpec), the schema's \\s (Go's: no \\v) a vertical tab."""
    with pytest.raises(SystemExit, match="invalid settings"):  # the operator refuses it, so the chart must
        operator_settings(monkeypatch, value, schema=False)
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "--set-json", value],
                            capture_output=True, text=True)
    assert result.returncode != 0 and path in result.stderr, result.stderr


SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics"}


@pytest.mark.parametrize(("annotations", "taken"), [
    ({f"example.com/a{i}": "x" for i in range(61)}, True), ({f"example.com/a{i}": "x" for i in range(62)}, False),
    ({f"example.com/a{i}": "x" for i in range(62)} | {"prometheus.io/port": "9091", "prometheus.io/path": "/m"}, False),
    ({f"example.com/a{i}": "x" for i in range(61)} | dict.fromkeys(SCRAPE, "false"), True)])  # 64 with the user's
def test_trainer_pod_annotations_and_the_scrape_annotations_are_at_most_the_operator_s_64(
        monkeypatch: pytest.MonkeyPatch, annotations: dict[str, str], taken: bool) -> None:
    """The schema takes 64 trainer.podAnnotations, and the operator at most 64 in all: with the scrape toggle's 3
    (where the user's do not set them), 62 to 64 passed helm install and the operator exited at start."""
    values = ("prometheusScrapeAnnotations.enabled=true", "trainer.podAnnotations=" + json.dumps(annotations))
    if taken:
        assert operator_settings(monkeypatch, *values).trainer_pod_annotations == SCRAPE | annotations
        return
    with pytest.raises(ValidationError):  # the operator refuses it, so the chart must
        settings.Settings(trainer_pod_annotations=SCRAPE | annotations)
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"),
                             *[a for v in values for a in ("--set-json", v)]], capture_output=True, text=True)
    assert result.returncode != 0 and "trainer.podAnnotations" in result.stderr, result.stderr


def test_trainer_pod_annotations_beyond_the_operator_s_bytes_are_refused_at_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator takes at most core.POD_ANNOTATIONS_MAX_BYTES of trainer pod annotations (room for a job's own and
    the Job controller's in the apiserver's 262144 bytes); the chart must refuse more, or the operator exits at start."""
    assert core.POD_ANNOTATIONS_MAX_BYTES == 122880  # as the chart's check says it
    big = {f"example.com/a{i:02}": "x" * 4096 for i in range(30)}
    with pytest.raises(ValidationError):
        settings.Settings(trainer_pod_annotations=big)
    result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"),
                             "--set-json", "trainer.podAnnotations=" + json.dumps(big)], capture_output=True, text=True)
    assert result.returncode != 0 and "trainer.podAnnotations: " in result.stderr and "122880" in result.stderr
    fits = dict(list(big.items())[:29])
    assert operator_settings(monkeypatch, "trainer.podAnnotations=" + json.dumps(fits)).trainer_pod_annotations == fits


def test_trainer_pod_annotations_beyond_one_environment_string_are_refused_at_install(tmp_path: Path) -> None:
    """The operator reads trainer.podAnnotations as JSON from one environment variable, and Linux refuses a process an
    environment string of more than 131071 bytes (MAX_ARG_STRLEN): JSON writes a '"' in two bytes and a '<' in six, so
    30 values of 4000 '"', within the operator's bytes, rendered 240313 and the operator's pod never started."""
    values = tmp_path / "values.json"  # a file: a --set-json of them is itself past the limit

    def render(annotations: dict[str, str]) -> subprocess.CompletedProcess[str]:
        values.write_text(json.dumps({"trainer": {"podAnnotations": annotations}}))
        return subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), "-f", str(values),
                               "--show-only", "templates/deployment.yaml"], capture_output=True, text=True)

    for char in '"<':
        escaped = {f"a{i:02}": char * 4000 for i in range(30)}
        settings.Settings(trainer_pod_annotations=escaped)  # within the operator's bytes
        result = render(escaped)
        assert result.returncode != 0 and "trainer.podAnnotations: " in result.stderr and "131071" in result.stderr
    name = f"{settings.ENV_PREFIX}TRAINER_POD_ANNOTATIONS"
    quotes = {f"a{i:02}": '"' * 4000 for i in range(16)}
    room = 131071 - len(f"{name}=" + json.dumps(quotes | {"b": ""}, separators=(",", ":")))
    rendered = yaml.safe_load(render(quotes | {"b": "x" * room}).stdout)["spec"]["template"]["spec"]["containers"][0]
    assert len(f"{name}=" + next(e["value"] for e in rendered["env"] if e["name"] == name)) == 131071
    assert "131071" in render(quotes | {"b": "x" * (room + 1)}).stderr


def test_trainer_pod_settings_the_schema_takes_reach_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    annotations = {"example.com/team": "a", "owner": "b", "Example.COM/Owner": "c"}  # the apiserver's case of prefix
    image = "registry.example.com:5000/team/trainer@sha256:" + "a" * 64
    ours = operator_settings(monkeypatch, "trainer.imagePullSecrets=" + json.dumps(["regcred", "ghcr.io-pull"]),
                             "trainer.podAnnotations=" + json.dumps(annotations), "trainer.image=" + json.dumps(image))
    assert ours.trainer_pull_secrets == ("regcred", "ghcr.io-pull") and ours.trainer_pod_annotations == annotations
    assert ours.trainer_image == image
    trainer = json.loads((REPO / "charts" / "finetune-operator" / "values.schema.json").read_text())["properties"][
        "trainer"]["properties"]
    assert trainer["image"]["pattern"] == core.IMAGE.replace("+$", "*$")  # empty: the chart's default
    schema = json.loads((REPO / "charts" / "finetune-operator" / "values.schema.json").read_text())["definitions"]
    assert schema["trainerPullSecrets"]["items"]["pattern"] == core.DNS_SUBDOMAIN
    reserved = "^(" + "|".join("".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in prefix)
                               for prefix in core.RESERVED_PREFIXES + core.PROFILE_PREFIXES) + ")"  # in any case
    assert schema["trainerAnnotations"]["patternProperties"].keys() == {core.ANNOTATION_KEY, reserved}


def test_trainer_resources_the_schema_takes_reach_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = {"requests": {"cpu": "500m", "memory": 17179869184}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    ours = operator_settings(monkeypatch, "trainer.resources=" + json.dumps(wanted))
    assert ours.trainer_resources.to_wire() == wanted
    schema = json.loads((REPO / "charts" / "finetune-operator" / "values.schema.json").read_text())
    assert schema["definitions"]["trainerQuantities"]["additionalProperties"]["pattern"] == core.QUANTITY
    assert schema["definitions"]["trainerQuantities"]["propertyNames"]["pattern"] == core.RESOURCE_NAME


def test_the_chart_installs_only_where_the_apiserver_takes_its_crd() -> None:
    """The CRD's rules call CEL's quantity library, which an apiserver takes in a new rule only from 1.29 (1.28 has it
    for a rollback's sake only): the chart allowed 1.27, so on 1.27 and 1.28 Helm went ahead and the CRD was refused."""
    assert "isQuantity(" in (REPO / "charts" / "finetune-operator" / "crds" / "finetune.dev_finetunejobs.yaml").read_text()
    for version, takes in (("1.28.15", False), ("1.29.0", True)):
        result = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"),
                                 "--kube-version", version], capture_output=True, text=True)
        assert (result.returncode == 0) == takes, (version, result.stderr)


def operator_settings(monkeypatch: pytest.MonkeyPatch, *values: str, schema: bool = True) -> settings.Settings:
    """The settings the operator of the chart rendered with these `--set-json` values starts with (`schema=False`:
    rendered past the chart's schema, for values it refuses)."""
    unchecked = [] if schema else ["--skip-schema-validation"]
    out = subprocess.run([helm(), "template", "fto", str(REPO / "charts" / "finetune-operator"), *unchecked,
                          *[a for v in values for a in ("--set-json", v)], "--show-only", "templates/deployment.yaml"],
                         check=True, capture_output=True, text=True).stdout
    for name in settings.Settings.model_fields:
        monkeypatch.delenv(settings.ENV_PREFIX + name.upper(), raising=False)
    for env in yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["env"]:
        if env["name"].startswith(settings.ENV_PREFIX):
            monkeypatch.setenv(env["name"], env["value"])
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.from_arguments(parser.parse_args([]))


def test_trainer_resources_set_at_install_are_the_trainers_whole_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm merges a value into the chart's default: trainer.resources={"requests": {"cpu": "8", "memory": "32Gi"}}
    kept the default's limit of 16Gi, and the operator refused a request above its limit at start: it never ran."""
    wanted = {"requests": {"cpu": "8", "memory": "32Gi"}}
    ours = operator_settings(monkeypatch, "trainer.resources=" + json.dumps(wanted))
    assert ours.trainer_resources.requests == wanted["requests"] and not ours.trainer_resources.limits
    assert operator_settings(monkeypatch).trainer_resources.to_wire() == settings.DEFAULT_TRAINER_RESOURCES


def test_replicas_beyond_one_elect_through_a_lease_of_the_release_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas beyond one stand by (leader.py), on other nodes where there are: the Lease is the release's (two
    releases never share one), and its Role reaches that Lease alone. One replica elects none: an apiserver outage
    longer than the renewal deadline would stop it for nothing."""
    assert operator_settings(monkeypatch).lease_namespace == ""
    ours = operator_settings(monkeypatch, "replicas=2")
    assert (ours.lease_namespace, ours.lease_name) == ("default", "fto-finetune-operator")
    chart = str(REPO / "charts" / "finetune-operator")
    out = subprocess.run([helm(), "template", "fto", chart, "-n", "ops", "--set", "replicas=2"], check=True,
                         capture_output=True, text=True).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    role = docs["Role", "fto-finetune-operator-lease"]
    assert role["metadata"]["namespace"] == "ops" and role["rules"] == rbac.lease_rules("fto-finetune-operator")
    assert docs["RoleBinding", "fto-finetune-operator-lease"]["roleRef"]["name"] == "fto-finetune-operator-lease"
    spread = docs["Deployment", "fto-finetune-operator"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == \
        "kubernetes.io/hostname"
    single = subprocess.run([helm(), "template", "fto", chart, "-n", "ops"], check=True, capture_output=True,
                            text=True).stdout
    assert "fto-finetune-operator-lease" not in single and "podAntiAffinity" not in single
    refused = subprocess.run([helm(), "template", "fto", chart, "--set", "replicas=4"], capture_output=True, text=True)
    assert refused.returncode != 0 and "replicas" in refused.stderr


def test_names_and_labels_of_a_user_s_values_are_strings_whatever_yaml_would_read_bare() -> None:
    """fullnameOverride=on rendered `name: on`, a boolean to YAML; nameOverride=no `app.kubernetes.io/name: false`,
    priorityClassName=yes `priorityClassName: true`: the apiserver refused them, or Helm wrote `true` where `yes` was
    asked. So did a release `on`, a namespace `yes` or `123` and such watched namespaces, and such a dashboard label."""
    values = {"fullnameOverride": "on", "nameOverride": "no", "priorityClassName": "yes", "replicas": 2,
              "watchNamespaces": ["true", "123"], "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
              "prometheusRule": {"enabled": True}, "networkPolicy": {"enabled": True},
              "dashboards": {"enabled": True, "label": "on", "folderAnnotation": "off", "namespace": "null"}}
    out = subprocess.run([helm(), "template", "on", str(REPO / "charts" / "finetune-operator"), "-n", "yes",
                          *[a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] != "CustomResourceDefinition"]
    named = ("name", "namespace", "priorityClassName", "serviceAccountName", "app.kubernetes.io/name",
             "app.kubernetes.io/instance", "kubernetes.io/metadata.name", "resourceNames", "matchNames")
    found: list[tuple[str, Any]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            assert all(isinstance(k, str) for k in node), node
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif key in named:
            found.append((key, node))

    for doc in docs:
        walk(doc, "")
    assert found and [f for f in found if not isinstance(f[1], str)] == []
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by["Deployment", "on"]
    assert deployment["metadata"]["namespace"] == "yes"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "no"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/instance"] == "on"
    assert deployment["spec"]["template"]["spec"]["priorityClassName"] == "yes"
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "NetworkPolicy"} == {"true", "123"}
    assert by["Role", "on-lease"]["rules"] == rbac.lease_rules("on")
    dashboard_map = by["ConfigMap", "on-dashboard"]["metadata"]
    assert dashboard_map["namespace"] == "null" and dashboard_map["labels"]["on"] == "1"
    assert dashboard_map["annotations"]["off"] == "FineTune"
    down = next(r for g in by["PrometheusRule", "on"]["spec"]["groups"] for r in g["rules"]
                if r["alert"] == "FineTuneOperatorDown")
    assert down["labels"]["namespace"] == "yes"


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_operator_restarts_count_a_new_pod_as_well_as_a_restarted_container(tmp_path: Path) -> None:
    """Recorded series, as the ServiceMonitor labels them: pod `a`'s container restarts once in place (OOMKilled),
    then `a` is evicted and the Deployment makes pod `b`: two restarts. Each pod is a series of its own, and
    changes() of each counted only the restart in place."""
    t0 = int(time.time()) - 3600
    lines = ["# TYPE process_start_time_seconds gauge"]
    for pod, start, stop, started in (("a", 0, 600, t0), ("a", 600, 1200, t0 + 600), ("b", 1260, 2400, t0 + 1260)):
        labels = f'job="finetune-operator",namespace="ops",pod="fto-{pod}",instance="10.0.0.{ord(pod)}:8000"'
        lines += [f"process_start_time_seconds{{{labels}}} {started} {t}" for t in range(t0 + start, t0 + stop, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    try:
        expr = dashboard_exprs()["Operator restarts"][0].replace("$__range", "1h")
        restarts = prometheus.query_range(expr, t0 + 2385, t0 + 2385, 15)
        assert [float(v) for _, v in restarts[0]["values"]] == [2]
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_operator_restarts_count_none_for_a_second_release(tmp_path: Path) -> None:
    """Releases fto and fto2 in ops-a and fto in ops-b, each watching its teams' namespaces, one pod each: each
    release's pod after the first was counted as a restart (of another namespace, and, counted by namespace, fto2's
    beside fto), so the stat said 1 or 2 before any restart."""
    t0 = int(time.time()) - 3600
    lines = ["# TYPE process_start_time_seconds gauge"]
    # ops-b's container restarts in place at t0 + 1200
    for ns, release, restart in (("ops-a", "fto", 9999), ("ops-a", "fto2", 9999), ("ops-b", "fto", 1200)):
        labels = (f'job="finetune-operator",namespace="{ns}",release="{release}",pod="{release}-{ns}",'
                  f'instance="{release}.{ns}:8000"')
        lines += [f"process_start_time_seconds{{{labels}}} {t0 + restart if t >= t0 + restart else t0} {t}"
                  for t in range(t0, t0 + 2400, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    try:
        expr = dashboard_exprs()["Operator restarts"][0].replace("$__range", "1h")
        for at, restarts in ((1185, 0), (2385, 1)):
            values = prometheus.query_range(expr, t0 + at, t0 + at, 15)[0]["values"]
            assert [float(v) for _, v in values] == [restarts], at
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_operator_up_says_0_once_the_operator_pod_is_gone(tmp_path: Path) -> None:
    """The operator's pod was evicted and its replacement waits unscheduled: with no pod the Service has no endpoint,
    so no target and no sample at all, and the stat's last non-null value was the 1 from before the eviction. A
    standby replica beside the active one is no second operator up."""
    t0 = int(time.time()) - 3600
    lines = ["# TYPE finetune_operator_leader gauge"]
    for pod, leading in (("a", 1), ("b", 0)):
        labels = f'job="finetune-operator",namespace="ops",pod="fto-{pod}",instance="10.0.0.{ord(pod)}:8000"'
        lines += [f"finetune_operator_leader{{{labels}}} {leading} {t}" for t in range(t0, t0 + 600, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    try:
        up = [float(v) for _, v in prometheus.query_range(dashboard_exprs()["Operator up"][0], t0, t0 + 1800, 15)[0]
              ["values"]]
        assert up[0] == 1 and up[-1] == 0
    finally:
        prometheus.stop()


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_time_to_running_shows_the_quantiles_of_the_jobs_started_in_the_range(tmp_path: Path) -> None:
    """Four jobs started in the range, after waits of 30 s, 50 s, 500 s and 5000 s: one observation each, so a rate
    over $__rate_interval was NaN but for a minute after each start, and the panel was empty nearly all the time."""
    t0 = int(time.time()) - 3600
    waits = {t0 + 300: 30, t0 + 900: 50, t0 + 1500: 500, t0 + 2100: 5000}  # when each job ran, after how long
    lines = ["# TYPE finetune_operator_time_to_running_seconds_bucket gauge"]
    for le in ("30", "60", "600", "7200", "+Inf"):
        labels = f'job="finetune-operator",namespace="ops",pod="fto-a",le="{le}"'
        lines += [f"finetune_operator_time_to_running_seconds_bucket{{{labels}}} "
                  f"{sum(1 for at, wait in waits.items() if at <= t and wait <= float(le))} {t}"
                  for t in range(t0, t0 + 3000, 15)]
    lines += ["# TYPE finetune_operator_time_to_running_seconds_count gauge"]
    lines += [f'finetune_operator_time_to_running_seconds_count{{job="finetune-operator",namespace="ops",pod="fto-a"}} '
              f"{sum(1 for at in waits if at <= t)} {t}" for t in range(t0, t0 + 3000, 15)]
    prometheus_server.backfill(tmp_path, "\n".join(lines) + "\n# EOF\n")
    prometheus = prometheus_server.start(tmp_path, [], free_port())
    panel = next(p for p in json.loads(dashboard.render())["panels"] if p["title"] == "Time from creation to Running")

    def shown(start: int, end: int) -> dict[str, float]:
        """The stat over the range from `start` to `end`: each target's value at the range's end."""
        found = {}
        for target in panel["targets"]:
            assert target["instant"], "one value for the range, not a line of rates"
            expr = target["expr"].replace("$__range", f"{end - start}s")
            found |= {target["legendFormat"]: float(s["values"][-1][1])
                      for s in prometheus.query_range(expr, t0 + end, t0 + end, 15)}
        return found

    try:
        # p50 in the 30-60 s bucket (its top, the second of four), p95 in 600-7200 s (linear in the bucket)
        assert shown(0, 2985) == {"p50": pytest.approx(60), "p95": pytest.approx(600 + 6600 * 0.8)}
        # No job started in the range (a quiet cluster's 3 h): nothing, where the stat showed "NaN"
        assert shown(0, 285) == {} and shown(2400, 2985) == {}
    finally:
        prometheus.stop()


def readme_scrape_configs() -> dict[str, dict[str, Any]]:
    """The README's scrape configs for a Prometheus without the operator, by job name."""
    block = re.search(r"```yaml\n(scrape_configs:\n.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "the README's plain-Prometheus scrape configs"
    return {c["job_name"]: c for c in yaml.safe_load(block.group(1))["scrape_configs"]}


def test_the_readmes_plain_prometheus_config_scrapes_the_trainers_as_often_as_the_podmonitor() -> None:
    """The README's trainer job took the global scrape interval (1m by default, often 2m): a trainer waits a minute
    after its end for the scrape of its final evaluation, which was then lost about half the time."""
    chart = yaml.safe_load((REPO / "charts" / "finetune-operator" / "values.yaml").read_text())
    assert readme_scrape_configs()["finetune-trainer"].get("scrape_interval") == chart["podMonitor"]["interval"]


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_the_readmes_plain_prometheus_config_scrapes_no_finished_or_pending_pod(tmp_path: Path) -> None:
    """A finished job keeps its pods (Succeeded, their IPs still in their status) until it is deleted: with the
    README's config each was a target down for ever, and its IP, once another pod's, scraped under its job's name. A
    pending pod pulling its image has its IP, and was a target down too.
    The trainers are found by their label, without the prometheus.io annotations: with them, the prometheus-community
    chart's kubernetes-pods job scraped each trainer again, without the dashboard's labels."""
    with _rank0() as port:
        running = pod_target(port, 0)
        done = pod_target(free_port(), 0, job="done")
        done["labels"]["__meta_kubernetes_pod_phase"] = "Succeeded"
        pulling = pod_target(free_port(), 0, job="pulling")  # its image being pulled, its IP given
        pulling["labels"]["__meta_kubernetes_pod_phase"] = "Pending"
        targets = tmp_path / "targets.json"
        targets.write_text(json.dumps([running, done, pulling]))
        config = prometheus_server.from_file(readme_scrape_configs()["finetune-trainer"] | {"scrape_interval": "1s"},
                                             targets)
        prometheus = prometheus_server.start(tmp_path / "prometheus", [config], free_port())
        try:
            deadline = time.monotonic() + 30
            while not prometheus.query('up{finetunejob="ddp"} == 1'):
                assert time.monotonic() < deadline, "rank 0 of the running job not scraped"
                time.sleep(0.5)
            time.sleep(3)
            assert [s["metric"]["finetunejob"] for s in prometheus.query("up")] == ["ddp"]
        finally:
            prometheus.stop()


def test_the_readme_s_and_the_values_upgrades_take_the_new_chart_s_defaults() -> None:
    """The switch to a templated CRD said `helm upgrade --reuse-values`, which keeps the installed chart's values
    alone: a key the new chart's schema requires (prometheusRule.trainingStalledAfter) was missing, and the schema
    refused the upgrade."""
    texts = [(REPO / "README.md").read_text(), (REPO / "charts" / "finetune-operator" / "values.yaml").read_text()]
    commands = [shlex.split(found) for text in texts
                for found in re.findall(r"helm upgrade [^`\n]*", text.replace("\\\n", " "))]
    with_values = [c for c in commands if "--set" in c]
    assert sum("crds.templated=true" in c for c in with_values) == 2, with_values
    assert all("--reset-then-reuse-values" in c and "--reuse-values" not in c for c in with_values), with_values
