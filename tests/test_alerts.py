"""The chart's alerting rules (operator/finetune_operator/alerts.py, rendered by templates/prometheusrule.yaml): checked
by `promtool check rules`, and run by `promtool test rules` on series as the ServiceMonitor and the PodMonitor label
them, each alert firing where it should and not where it should not."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import prometheus_server
from finetune_operator import alerts
from test_chart import REPO, exported_names, helm

CHART = str(REPO / "charts" / "finetune-operator")
NEEDS_PROMTOOL = pytest.mark.skipif(not prometheus_server.installed(),
                                    reason="Prometheus is not built (`make prometheus`)")
OPERATOR = ('job="finetune-operator",namespace="ops",release="fto",pod="fto-a",instance="10.0.0.1:8000",'
            'endpoint="metrics"')
STANDBY = ('job="finetune-operator",namespace="ops",release="fto",pod="fto-b",instance="10.0.0.2:8000",'
           'endpoint="metrics"')
TRAINER = ('job="finetune-trainer",namespace="team-a",finetunejob="llm",finetunejob_uid="u1",attempt="1",'
           'pod="llm-1-0-x7k2p",instance="10.1.0.1:9090"')
TRAINER_LABELS = {"namespace": "team-a", "finetunejob": "llm", "attempt": "1", "pod": "llm-1-0-x7k2p"}


def rendered(*values: str) -> dict[str, Any] | None:
    out = subprocess.run([helm(), "template", "fto", CHART, "-n", "ops", "--show-only", "templates/prometheusrule.yaml",
                          *values], capture_output=True, text=True)
    if "could not find template" in out.stderr:
        return None
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def rules(*values: str) -> dict[str, dict[str, Any]]:
    rule = rendered("--set", "prometheusRule.enabled=true", *values)
    assert rule is not None
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def rules_file(tmp_path: Path, *values: str) -> Path:
    rule = rendered("--set", "prometheusRule.enabled=true", *values)
    assert rule is not None
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(prometheus_server.bin_dir() / "promtool"), *args], capture_output=True, text=True)


def expected(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """One firing alert of `rule` with the expression's `labels`: its own labels added, its annotations expanded."""
    def expand(text: str) -> str:
        out = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], text)
        assert "{{" not in out, text
        return out

    return {"exp_labels": labels | rule["labels"],
            "exp_annotations": {k: expand(v) for k, v in rule["annotations"].items()}}


def run_tests(tmp_path: Path, rules_path: Path, interval: str, series: dict[str, str],
              evals: list[tuple[str, str, list[dict[str, str]]]]) -> None:
    """`promtool test rules` on `series` (selector: promtool's values) scraped every `interval`; each eval is (time,
    alert, the expression's labels of each alert firing then: [] for none)."""
    by_name = yaml.safe_load(rules_path.read_text())["groups"]
    named = {r["alert"]: r for g in by_name for r in g["rules"]}
    test = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": interval,
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": name,
                                 "exp_alerts": [expected(named[name], labels) for labels in firing]}
                                for at, name, firing in evals],
        }],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


def test_the_rule_is_off_by_default_and_reads_only_exported_series() -> None:
    assert rendered() is None
    found = rules()
    assert set(found) == {"FineTuneJobFailed", "FineTuneJobTrainingStalled", "FineTuneOperatorDown",
                          "FineTuneOperatorNotLeading", "FineTuneOperatorLeadingTwice", "FineTuneReconcileErrors",
                          "FineTuneMetricPollErrors"}
    used = {m for r in found.values() for m in re.findall(r"\bfinetune_\w+", r["expr"])}
    assert used <= exported_names(), "every metric an alert reads is one the trainer or the operator exports"
    assert all(r["for"] and r["labels"]["severity"] in ("warning", "critical") and
               {"summary", "description"} <= set(r["annotations"]) for r in found.values())
    assert all("${" not in yaml.safe_dump(r) for r in found.values()), "every placeholder is replaced"
    operator = [r["expr"] for name, r in found.items() if "Operator" in name or "Errors" in name]
    assert all('job="finetune-operator", namespace="ops", release="fto"' in e for e in operator), \
        "the release's operator alone"


def test_the_rule_carries_its_labels_and_a_paused_operator_is_no_operator_down() -> None:
    rule = rendered("--set", "prometheusRule.enabled=true", "--set", "prometheusRule.labels.release=kps")
    assert rule is not None and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["metadata"]["namespace"] == "ops"
    assert "FineTuneOperatorDown" not in rules("--set", "replicas=0")
    stalled = rules("--set", "prometheusRule.trainingStalledAfter=2h")["FineTuneJobTrainingStalled"]
    assert "[2h]" in stalled["expr"] and "offset 2h" in stalled["expr"] and "2h" in stalled["annotations"]["summary"]


@pytest.mark.parametrize("value", ["0m", "30", "1h30m", "", "30s"])
def test_a_stall_window_promql_would_refuse_or_a_scrape_could_not_tell_is_refused_at_install(value: str) -> None:
    result = subprocess.run([helm(), "template", "fto", CHART, "--set", "prometheusRule.enabled=true",
                             "--set", f"prometheusRule.trainingStalledAfter={value}"], capture_output=True, text=True)
    assert result.returncode != 0 and "trainingStalledAfter" in result.stderr, result.stderr


@NEEDS_PROMTOOL
@pytest.mark.parametrize("values", [(), ("--set-json", "pollSeconds=0.5",
                                        "--set", "prometheusRule.trainingStalledAfter=2h")])
def test_promtool_checks_the_rules(tmp_path: Path, values: tuple[str, ...]) -> None:
    result = promtool("check", "rules", str(rules_file(tmp_path, *values)))
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"
    assert "SUCCESS: 7 rules found" in result.stdout


@NEEDS_PROMTOOL
def test_a_failed_job_fires_from_its_reasons_first_failure(tmp_path: Path) -> None:
    """OOMKilled's series starts at 1 (its first failure since the operator started), which increase() never counts;
    InvalidSpec's counted once long ago, then again at 30m; another release's operator's failures are its own."""
    other = OPERATOR.replace('namespace="ops"', 'namespace="other"')
    labels = {"namespace": "ops", "release": "fto", "reason": "OOMKilled"}
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f'finetune_operator_job_failures_total{{{OPERATOR},reason="OOMKilled"}}': "_x10 1x120",
        f'finetune_operator_job_failures_total{{{OPERATOR},reason="InvalidSpec"}}': "1x60 2x60",
        f'finetune_operator_job_failures_total{{{other},reason="WorkerFailed"}}': "_x10 1x120",
    }, [
        ("4m", "FineTuneJobFailed", [{"namespace": "ops", "release": "fto", "reason": "InvalidSpec"}]),  # new too, though long ago
        ("20m", "FineTuneJobFailed", []),
        ("7m", "FineTuneJobFailed", [{"namespace": "ops", "release": "fto", "reason": "InvalidSpec"}, labels]),
        ("33m", "FineTuneJobFailed", [{"namespace": "ops", "release": "fto", "reason": "InvalidSpec"}]),
        ("50m", "FineTuneJobFailed", []),
    ])


@NEEDS_PROMTOOL
def test_a_training_step_that_stalls_fires_and_a_validation_does_not(tmp_path: Path) -> None:
    """trainingStalledAfter 30m. Job llm steps for 40 minutes then stalls in Training; val validates for 10 minutes
    between steps; eval's step stops as it leaves Training; new enters Training at 30m and makes no step; nostep is in
    Training from 10m and makes none (fires); late makes its first step at 30m and none since (in the window)."""
    def trainer(job: str) -> str:
        return TRAINER.replace('"llm', f'"{job}')

    def labels(job: str) -> dict[str, str]:
        return {k: v.replace("llm", job) for k, v in TRAINER_LABELS.items()}

    series = {
        f'finetune_trainer_stage{{{TRAINER},stage="Training"}}': "1x120",
        f"finetune_trainer_step{{{TRAINER}}}": "1+1x40 41x80",
        f'finetune_trainer_stage{{{trainer("val")},stage="Training"}}': "1x120",
        f'finetune_trainer_step{{{trainer("val")}}}': "1+1x30 31x10 32+1x80",
        f'finetune_trainer_stage{{{trainer("eval")},stage="Training"}}': "1x40 0x80",
        f'finetune_trainer_stage{{{trainer("eval")},stage="Evaluating"}}': "0x40 1x80",
        f'finetune_trainer_step{{{trainer("eval")}}}': "1+1x40 41x80",
        f'finetune_trainer_stage{{{trainer("new")},stage="Training"}}': "_x30 1x20",
        f'finetune_trainer_stage{{{trainer("nostep")},stage="Training"}}': "_x10 1x40",
        f'finetune_trainer_stage{{{trainer("late")},stage="Training"}}': "1x50",
        f'finetune_trainer_step{{{trainer("late")}}}': "_x30 1x20",  # its first step, at 30m, and none since
        # no finetunejob: another scrape job's (prometheus.io annotations), no job's
        'finetune_trainer_stage{job="kubernetes-pods",namespace="team-a",pod="p",stage="Training"}': "1x120",
    }
    run_tests(tmp_path, rules_file(tmp_path), "1m", series, [
        ("46m", "FineTuneJobTrainingStalled", [labels("nostep")]),  # Training from 10m, no step: from 40m, fires 45m
        ("48m", "FineTuneJobTrainingStalled", [labels("nostep")]),
        ("72m", "FineTuneJobTrainingStalled", []),  # llm: stalled from 70m, pending
        ("76m", "FineTuneJobTrainingStalled", [labels("llm")]),
        ("110m", "FineTuneJobTrainingStalled", [labels("llm")]),
    ])


@NEEDS_PROMTOOL
def test_the_stall_window_is_the_values(tmp_path: Path) -> None:
    """A validation of 40 minutes, with trainingStalledAfter=1h: no alert; a stall of 70 minutes: one."""
    series = {
        f'finetune_trainer_stage{{{TRAINER},stage="Training"}}': "1x200",
        f"finetune_trainer_step{{{TRAINER}}}": "1+1x30 31x40 32+1x30 62x100",
    }
    run_tests(tmp_path, rules_file(tmp_path, "--set", "prometheusRule.trainingStalledAfter=1h"), "1m", series, [
        ("71m", "FineTuneJobTrainingStalled", []),
        ("100m", "FineTuneJobTrainingStalled", []),
        ("165m", "FineTuneJobTrainingStalled", []),  # stalled from 161m: pending
        ("170m", "FineTuneJobTrainingStalled", [TRAINER_LABELS]),
    ])


@pytest.mark.parametrize(("interval", "window", "refused"), [
    ("60s", "1m", True), ("1m", "1m", True), ("60000ms", "1m", True), ("31s", "1m", True),
    ("30s", "1m", False), ("60s", "2m", False), ("60s", "1h", False), ("500ms", "1m", False)])
def test_a_stall_window_of_fewer_than_two_trainer_scrapes_is_refused(interval: str, window: str, refused: bool) -> None:
    """changes() of the step over the window takes two samples of it: over one, no change, and every healthy job
    stalled (test_a_stall_window_of_one_scrape_fires_on_a_healthy_job)."""
    def template(*values: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([helm(), "template", "fto", CHART, "--set", "prometheusRule.enabled=true",
                               "--set", f"podMonitor.interval={interval}",
                               "--set", f"prometheusRule.trainingStalledAfter={window}", *values],
                              capture_output=True, text=True)

    result = template("--set", "podMonitor.enabled=true")
    assert (result.returncode != 0) == refused, result.stderr
    if refused:
        assert f"prometheusRule.trainingStalledAfter: {window} is less than twice podMonitor.interval ({interval})" \
            in result.stderr and "at least 2m" in result.stderr
    assert template().returncode == 0, "without the PodMonitor its interval is none of the trainers'"


@NEEDS_PROMTOOL
def test_a_stall_window_of_one_scrape_fires_on_a_healthy_job(tmp_path: Path) -> None:
    """A job that makes a step at every scrape of 60 s: over a window of 1m (one sample) it stalls, over 2m not."""
    series = {
        f'finetune_trainer_stage{{{TRAINER},stage="Training"}}': "1x60",
        f"finetune_trainer_step{{{TRAINER}}}": "1+1x60",
    }
    one = tmp_path / "one"
    one.mkdir()
    run_tests(one, rules_file(one, "--set", "prometheusRule.trainingStalledAfter=1m"), "1m", series, [
        ("30m", "FineTuneJobTrainingStalled", [TRAINER_LABELS])])
    run_tests(tmp_path, rules_file(tmp_path, "--set", "prometheusRule.trainingStalledAfter=2m"), "1m", series, [
        ("10m", "FineTuneJobTrainingStalled", []), ("30m", "FineTuneJobTrainingStalled", []),
        ("50m", "FineTuneJobTrainingStalled", [])])


@pytest.mark.parametrize(("interval", "refused"), [
    ("4m59s", False), ("299999ms", False), ("4m", False), ("30s", False),
    ("5m", True), ("300s", True), ("4m60s", True), ("10m", True), ("1h", True), ("1d", True)])
def test_an_operator_scrape_interval_its_alerts_cannot_read_is_refused(interval: str, refused: bool) -> None:
    """At `serviceMonitor.interval: 10m` the operator's error alerts never fired, and from about 10m its down alert
    fired on a healthy operator (test_the_operator_s_alerts_hold_at_the_longest_scrape_interval_the_chart_takes)."""
    def template(*values: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([helm(), "template", "fto", CHART, "--set", "serviceMonitor.enabled=true",
                               "--set", f"serviceMonitor.interval={interval}", *values], capture_output=True, text=True)

    result = template("--set", "prometheusRule.enabled=true", "--show-only", "templates/servicemonitor.yaml")
    assert (result.returncode != 0) == refused, result.stderr
    if refused:
        assert f"serviceMonitor.interval: {interval}; the operator's alerts need it under 5m" in result.stderr
    else:
        assert yaml.safe_load(result.stdout)["spec"]["endpoints"][0]["interval"] == interval
    assert template().returncode == 0, "without the alerts the operator may be scraped as seldom as one likes"


@NEEDS_PROMTOOL
def test_the_operator_s_alerts_hold_at_the_longest_scrape_interval_the_chart_takes(tmp_path: Path) -> None:
    """A healthy operator whose reconciles of one job raise KeyError at every scrape from the fifth on. Scraped every
    4m59s, the errors fire and the operator is never down; every 15m (refused), the errors' 10m window holds one
    sample, no increase, and the operator is down 5m after each scrape (its up found at most 5m back)."""
    series = {f"up{{{OPERATOR}}}": "1x40", f"finetune_operator_leader{{{OPERATOR}}}": "1x40",
              f'finetune_operator_reconcile_errors_total{{{OPERATOR},error="KeyError"}}': "_x4 1+1x36"}
    errors = {"namespace": "ops", "release": "fto", "error": "KeyError"}
    longest = tmp_path / "longest"
    longest.mkdir()
    # The errors' increase is above 0 from their second sample (about 25m), and fires 15m later.
    run_tests(longest, rules_file(longest), "4m59s", series, [
        (f"{at}m", name, [errors] if name == "FineTuneReconcileErrors" and at > 40 else [])
        for at in range(30, 120, 7) for name in ("FineTuneReconcileErrors", "FineTuneOperatorDown")])
    run_tests(tmp_path, rules_file(tmp_path), "15m", series, [
        ("57m", "FineTuneOperatorDown", [{}]), ("61m", "FineTuneOperatorDown", []),
        *((f"{at}m", "FineTuneReconcileErrors", []) for at in range(30, 300, 13))])


@NEEDS_PROMTOOL
def test_the_operator_down_fires_once_no_replica_answers(tmp_path: Path) -> None:
    """The single replica answers for 10 minutes, its pod is then evicted and none replaces it (no target, no
    series); another release's operator, in namespace other, answers all along."""
    other = OPERATOR.replace('namespace="ops"', 'namespace="other"')
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f"up{{{OPERATOR}}}": "1x20 stale",
        f"up{{{other}}}": "1x80",
        f"finetune_operator_leader{{{OPERATOR}}}": "1x20 stale",
        f"finetune_operator_leader{{{other}}}": "1x80",
    }, [
        ("9m", "FineTuneOperatorDown", []),
        ("13m", "FineTuneOperatorDown", []),
        ("17m", "FineTuneOperatorDown", [{}]),
        ("17m", "FineTuneOperatorNotLeading", []),
    ])


@NEEDS_PROMTOOL
def test_the_operator_down_fires_for_a_target_down_and_not_for_a_standby_down(tmp_path: Path) -> None:
    """Two replicas: the standby crash-loops from 5m (its target down): the active one still answers. From 20m the
    active one is down too."""
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f"up{{{OPERATOR}}}": "1x40 0x40",
        f"up{{{STANDBY}}}": "1x10 0x70",
        f"finetune_operator_leader{{{OPERATOR}}}": "1x40 stale",
        f"finetune_operator_leader{{{STANDBY}}}": "0x10 stale",
    }, [
        ("15m", "FineTuneOperatorDown", []),
        ("15m", "FineTuneOperatorNotLeading", []),
        ("22m", "FineTuneOperatorDown", []),
        ("27m", "FineTuneOperatorDown", [{}]),
        ("30m", "FineTuneOperatorNotLeading", []),  # none answers: down, not "none leads"
    ])


@NEEDS_PROMTOOL
def test_no_replica_leading_fires_and_a_standby_beside_the_leader_does_not(tmp_path: Path) -> None:
    """Replicas a (leader) and b (standby) for 20 minutes; then a's pod goes and b takes the Lease within 30 s; from
    40m, b answers and stands by, and no replica leads."""
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f"up{{{OPERATOR}}}": "1x40 stale",
        f"finetune_operator_leader{{{OPERATOR}}}": "1x40 stale",
        f"up{{{STANDBY}}}": "1x120",
        f"finetune_operator_leader{{{STANDBY}}}": "0x40 1x40 0x40",
    }, [
        ("19m", "FineTuneOperatorNotLeading", []),
        ("21m", "FineTuneOperatorNotLeading", []),
        ("35m", "FineTuneOperatorNotLeading", []),
        ("43m", "FineTuneOperatorNotLeading", []),  # pending
        ("47m", "FineTuneOperatorNotLeading", [{"namespace": "ops", "release": "fto"}]),
        ("47m", "FineTuneOperatorDown", []),
    ])


@NEEDS_PROMTOOL
def test_two_releases_in_one_namespace_alert_each_on_its_own_operator(tmp_path: Path) -> None:
    """Releases fto and fto2 in namespace ops: selected and grouped by namespace alone, fto2's operator up hid fto's
    down, and fto2's leader fto's replica that stood by for ever. fto's pod answers for 10 minutes, then stands by
    (none of fto leads) until 30m, then is gone; fto2 answers and leads all along; fto's failures are its own."""
    fto2 = OPERATOR.replace('release="fto"', 'release="fto2"').replace("fto-a", "fto2-a")
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f"up{{{OPERATOR}}}": "1x60 stale",
        f"finetune_operator_leader{{{OPERATOR}}}": "1x20 0x40 stale",
        f"up{{{fto2}}}": "1x120",
        f"finetune_operator_leader{{{fto2}}}": "1x120",
        f'finetune_operator_job_failures_total{{{fto2},reason="OOMKilled"}}': "_x10 1x110",
    }, [
        ("8m", "FineTuneJobFailed", []),  # fto2's failure is fto2's rules' to tell
        ("17m", "FineTuneOperatorNotLeading", [{"namespace": "ops", "release": "fto"}]),
        ("17m", "FineTuneOperatorLeadingTwice", []),  # one leader in each release
        ("33m", "FineTuneOperatorDown", []),  # pending
        ("37m", "FineTuneOperatorDown", [{}]),
    ])
    named = {r["alert"]: r for g in yaml.safe_load(rules_file(tmp_path).read_text())["groups"] for r in g["rules"]}
    assert named["FineTuneOperatorDown"]["labels"] == {"severity": "critical", "namespace": "ops", "release": "fto"}


@NEEDS_PROMTOOL
def test_two_replicas_leading_at_once_fire(tmp_path: Path) -> None:
    """Two replicas of fto both say they lead from 10m (its single replica, which elects none, scaled to two); a
    hand-over's overlap of one scrape at 5m does not fire."""
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f"up{{{OPERATOR}}}": "1x60",
        f"up{{{STANDBY}}}": "1x60",
        f"finetune_operator_leader{{{OPERATOR}}}": "1x10 0x10 1x40",
        f"finetune_operator_leader{{{STANDBY}}}": "0x9 1x50",
    }, [
        ("5m", "FineTuneOperatorLeadingTwice", []),  # the hand-over's one scrape of two: pending, not firing
        ("8m", "FineTuneOperatorLeadingTwice", []),
        ("11m", "FineTuneOperatorLeadingTwice", []),  # pending
        ("14m", "FineTuneOperatorLeadingTwice", [{"namespace": "ops", "release": "fto"}]),
    ])


@NEEDS_PROMTOOL
def test_reconcile_errors_that_go_on_fire_and_a_blip_does_not(tmp_path: Path) -> None:
    """ApiException: three errors at 5m (an apiserver blip), then none; KeyError: one every 30 s from 10m (each retry
    of a job's reconcile raises)."""
    run_tests(tmp_path, rules_file(tmp_path), "30s", {
        f'finetune_operator_reconcile_errors_total{{{OPERATOR},error="ApiException"}}': "_x10 1 3x100",
        f'finetune_operator_reconcile_errors_total{{{OPERATOR},error="KeyError"}}': "_x20 1+1x80",
    }, [
        ("18m", "FineTuneReconcileErrors", []),
        ("24m", "FineTuneReconcileErrors", []),  # KeyError pending since ~11m
        ("28m", "FineTuneReconcileErrors", [{"namespace": "ops", "release": "fto", "error": "KeyError"}]),
    ])


@NEEDS_PROMTOOL
def test_poll_errors_that_go_on_fire_and_job_starts_refusals_do_not(tmp_path: Path) -> None:
    """pollSeconds 2 (each running job's rank 0 read every 2 s). In ops: a job's trainer starts every 5 minutes and
    refuses 30 reads (a minute) each time; one rank 0's reads time out from 10m on (read less often: one error every
    30 s). In ops2 (another release, pollSeconds 2 too): one job whose trainer serves no metrics, refused at every read
    from 10m."""
    ops2 = OPERATOR.replace('namespace="ops"', 'namespace="ops2"')
    errors = "finetune_operator_metric_poll_errors_total"
    starts = " ".join(f"{30 * i}x8 {30 * (i + 1)}" for i in range(12))  # 30 more within a minute, every 5 minutes
    series = {
        f'{errors}{{{OPERATOR},reason="MetricsUnreachable"}}': starts,
        f'{errors}{{{OPERATOR},reason="MetricsTimeout"}}': "0x20 1+1x100",
        f'{errors}{{{OPERATOR},reason="MetricsBadResponse"}}': "0x30 1x90",  # one, once
    }
    run_tests(tmp_path, rules_file(tmp_path), "30s", series, [
        ("20m", "FineTuneMetricPollErrors", []),
        ("40m", "FineTuneMetricPollErrors", [{"namespace": "ops", "release": "fto", "reason": "MetricsTimeout"}]),
        ("55m", "FineTuneMetricPollErrors", [{"namespace": "ops", "release": "fto", "reason": "MetricsTimeout"}]),
    ])
    rules2 = tmp_path / "ops2"
    rules2.mkdir()
    run_tests(rules2, rules_file(rules2, "--namespace", "ops2"), "30s", {
        f'{errors}{{{ops2},reason="MetricsUnreachable"}}': "0x20 15+15x100",
    }, [
        ("20m", "FineTuneMetricPollErrors", []),
        ("25m", "FineTuneMetricPollErrors", []),  # over half the reads failed from about 15m: pending
        ("33m", "FineTuneMetricPollErrors", [{"namespace": "ops2", "release": "fto", "reason": "MetricsUnreachable"}]),
    ])


def test_the_notes_name_the_rule_and_the_monitors_it_reads(tmp_path: Path) -> None:
    from test_chart import notes

    said = " ".join(notes(tmp_path / "a", "prometheusRule.enabled=true").split())
    assert "the PrometheusRule ops/fto-finetune-operator" in said and "serviceMonitor.enabled=true" in said
    both = " ".join(notes(tmp_path / "b", "prometheusRule.enabled=true", "serviceMonitor.enabled=true",
                          "podMonitor.enabled=true").split())
    assert "the PrometheusRule ops/fto-finetune-operator" in both and "They read the series" not in both
    assert "PrometheusRule" not in notes(tmp_path / "c")


def test_the_readme_lists_every_alert() -> None:
    readme = (REPO / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in rules())
    assert "--set prometheusRule.enabled=true" in readme
