"""The chart's alerting rules (`make crds` writes charts/finetune-operator/files/prometheus-rules.yaml, which
templates/prometheusrule.yaml puts in a PrometheusRule when `prometheusRule.enabled` is set).

Generated, as the RBAC rules and the dashboard are, so the PromQL is code beside the metrics it reads, checked for
drift, and its annotations' `{{ $labels.x }}` never pass through Helm's templating. The chart replaces:

- `${NAMESPACE}` and `${RELEASE}`: the release's namespace and name. The operator's series carry them as `namespace`
  (the ServiceMonitor's target, or the README's scrape config's relabelling) and `release` (both relabel it so), and
  `job="finetune-operator"` (the ServiceMonitor's relabelling, whatever the release's name): each release alerts on
  its own operator alone, by namespace and release, and says so of one with no target. By namespace alone, two
  releases in one namespace were one operator: one down hid behind the other's up, and its standbys behind the
  other's leader.
- `${POLL_SECONDS}`: `pollSeconds`, each running job's rank 0 is read once a poll.
- `${STALLED_AFTER}`: `prometheusRule.trainingStalledAfter`.

Trainer series are rank 0's as the PodMonitor labels them: `namespace`, `finetunejob`, `attempt`, `pod`; those without
`finetunejob` (a second scrape job honouring prometheus.io annotations) are no job's, as on the dashboard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART_RULES = Path("charts/finetune-operator/files/prometheus-rules.yaml")
NAMESPACE, RELEASE = "${NAMESPACE}", "${RELEASE}"
POLL_SECONDS, STALLED_AFTER = "${POLL_SECONDS}", "${STALLED_AFTER}"
OPERATOR = f'job="finetune-operator", namespace="{NAMESPACE}", release="{RELEASE}"'
TRAINER = 'finetunejob!=""'
# The alert the chart leaves out at replicas 0 (a paused operator is no operator down).
OPERATOR_DOWN = "FineTuneOperatorDown"
# How long after a job's failure FineTuneJobFailed stays firing.
FAILED_WINDOW = "15m"
JOB = "{{ $labels.namespace }}/{{ $labels.finetunejob }}"


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, description: str,
          labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"alert": alert, "expr": expr, "for": for_, "labels": {"severity": severity, **(labels or {})},
            "annotations": {"summary": summary, "description": description}}


def job_failed() -> dict[str, Any]:
    failures = f"finetune_operator_job_failures_total{{{OPERATOR}}}"
    # A reason's series starts at its first failure (the reasons are the trainer's termination messages', an open
    # set, so none is made at 0 beforehand), and increase() never counts a series' first sample: the first failure
    # of each reason since the operator started would never fire. A series that did not exist a window ago counts
    # whole (`* 1` drops its name, so that `or` keeps it, not increase()'s fraction of it, where both have a value).
    # The price: a Prometheus that starts scraping an operator that counted failures already (or after a gap of a
    # window) fires once for those.
    expr = (f"sum by (namespace, release, reason) (\n"
            f"  ({failures} unless {failures} offset {FAILED_WINDOW}) * 1\n"
            f"  or increase({failures}[{FAILED_WINDOW}])\n"
            f") > 0")
    return _rule("FineTuneJobFailed", expr, "1m", "warning",
                 "FineTuneJobs failed ({{ $labels.reason }}), run by the operator {{ $labels.release }} in namespace "
                 "{{ $labels.namespace }}",
                 "One or more FineTuneJobs failed with reason {{ $labels.reason }} in the last "
                 f"{FAILED_WINDOW} (the operator's metrics name no job). `kubectl get finetunejobs -A` lists them "
                 "with phase Failed and the reason; `kubectl describe` one for its conditions and events.")


def training_stalled() -> dict[str, Any]:
    stage = f'finetune_trainer_stage{{stage="Training", {TRAINER}}}'
    step = f"finetune_trainer_step{{{TRAINER}}}"
    # In Training now and a window ago (an attempt's stages only go forward, so all along), and no step in the window:
    # the step did not change, nor did the attempt's first step come in it (a new series: changes() is 0). Validations
    # and checkpoints keep the stage Training with no step made: the window is longer than they take. No step at all
    # for the window in Training stalls too (its gauge appears with the first step).
    expr = (f"max by (namespace, finetunejob, attempt, pod) (\n"
            f"  ({stage} == 1 and {stage} offset {STALLED_AFTER} == 1)\n"
            f"  unless on (namespace, pod) changes({step}[{STALLED_AFTER}]) > 0\n"
            f"  unless on (namespace, pod) ({step} unless {step} offset {STALLED_AFTER})\n"
            f")")
    return _rule("FineTuneJobTrainingStalled", expr, "5m", "warning",
                 f"FineTuneJob {JOB} has made no training step for {STALLED_AFTER}",
                 f"FineTuneJob {JOB} (attempt {{{{ $labels.attempt }}}}) is in its Training stage and its optimizer "
                 f"step has not advanced for {STALLED_AFTER} and more: a hung collective (NCCL), a stuck data loader, "
                 "or a validation or checkpoint longer than prometheusRule.trainingStalledAfter. "
                 "`kubectl -n {{ $labels.namespace }} logs {{ $labels.pod }}` (rank 0) shows where it is.")


def operator_down() -> dict[str, Any]:
    # No target of the release's operator answers: all down, or none at all (evicted, unschedulable), where up has no
    # series either. absent() of a comparison has no labels: the rule gives the namespace and the release (and the
    # annotations name them themselves: their $labels are the expression's).
    return _rule(OPERATOR_DOWN, f"absent(up{{{OPERATOR}}} == 1)", "5m", "critical",
                 f"The FineTune operator {RELEASE} in namespace {NAMESPACE} is down",
                 f"No replica of the FineTune operator {RELEASE} in namespace {NAMESPACE} has answered Prometheus for "
                 "5 minutes: "
                 f"no FineTuneJob it watches is started, followed or cleaned up. `kubectl -n {NAMESPACE} get "
                 "pods,events` and the operator's logs say why.",
                 labels={"namespace": NAMESPACE, "release": RELEASE})


def operator_not_leading() -> dict[str, Any]:
    # Replicas answer, and none is the active one: finetune_operator_leader is 0 on each standby and 1 on the active
    # one (a single replica elects none and is active). A hand-over takes about 20 s.
    expr = (f"count by (namespace, release) (up{{{OPERATOR}}} == 1)\n"
            f"unless on (namespace, release) finetune_operator_leader{{{OPERATOR}}} == 1")
    return _rule("FineTuneOperatorNotLeading", expr, "5m", "critical",
                 "No replica of the FineTune operator {{ $labels.release }} in namespace {{ $labels.namespace }} is "
                 "active",
                 "The replicas of the FineTune operator {{ $labels.release }} in namespace {{ $labels.namespace }} "
                 "answer, but none has been the "
                 "active one (finetune_operator_leader 1) for 5 minutes: none holds the Lease, and no FineTuneJob is "
                 "reconciled. `kubectl -n {{ $labels.namespace }} get lease` and the replicas' logs (standby: ...) "
                 "say who holds it.")


def operators_leading() -> dict[str, Any]:
    # More than one replica of a release says it leads: two operators run the same jobs at once. A leader that sees
    # another holder, or cannot renew for 10 s, exits (leader.py), and a stopped one's series go stale at its next
    # scrape, so two leading for minutes are no hand-over: replicas that elect through no Lease (the chart's single
    # replica, which elects none, scaled up by hand, by a GitOps tool or an autoscaler; an operator not of the chart).
    expr = f"sum by (namespace, release) (finetune_operator_leader{{{OPERATOR}}}) > 1"
    return _rule("FineTuneOperatorLeadingTwice", expr, "2m", "critical",
                 "More than one replica of the FineTune operator {{ $labels.release }} in namespace "
                 "{{ $labels.namespace }} is active",
                 "Replicas of the FineTune operator {{ $labels.release }} in namespace "
                 "{{ $labels.namespace }} have said they are the active one (finetune_operator_leader 1) for 2 "
                 "minutes: each writes the same FineTuneJobs' status and children. `kubectl -n "
                 "{{ $labels.namespace }} get pods -l app.kubernetes.io/instance={{ $labels.release }}` and their "
                 "environment (FINETUNE_OPERATOR_LEASE_*) say which runs without the Lease.")


def reconcile_errors() -> dict[str, Any]:
    # A reconcile that raised is retried within seconds: errors every window for the whole `for` are a fault that
    # stays (an apiserver blip raises a few, then none). Its first error of a type is no increase, which is none of
    # a sustained fault.
    expr = (f"sum by (namespace, release, error) (increase(finetune_operator_reconcile_errors_total{{{OPERATOR}}}[10m])) > 0")
    return _rule("FineTuneReconcileErrors", expr, "15m", "warning",
                 "The FineTune operator {{ $labels.release }} in namespace {{ $labels.namespace }} keeps failing "
                 "reconciles ({{ $labels.error }})",
                 "Reconciles of FineTuneJobs by the operator {{ $labels.release }} in namespace "
                 "{{ $labels.namespace }} have raised "
                 "{{ $labels.error }} for 15 minutes and more: the jobs concerned are not followed. The operator's "
                 "log has each one's traceback (reconcile failed).")


def metric_poll_errors() -> dict[str, Any]:
    errors = "finetune_operator_metric_poll_errors_total"
    # Each running job's rank 0 is read once a poll. A trainer refuses connections (MetricsUnreachable) until it
    # serves, which the operator does not count in an attempt's first starting_grace (reconcile.still_starting),
    # and once it has exited, until its pod is seen to end (a crash): refusals fire only at more than half the reads
    # of one job, all along. Other reasons come of no start or end: any, in every window for the whole `for`. A
    # rank 0 whose reads time out is read less and less often (handlers.SlowScrapes), so no rate threshold there.
    expr = (f'sum by (namespace, release, reason) (rate({errors}{{{OPERATOR}, reason="MetricsUnreachable"}}[10m]))'
            f" * {POLL_SECONDS} > 0.5\n"
            f'or sum by (namespace, release, reason) (rate({errors}{{{OPERATOR}, reason!="MetricsUnreachable"}}[10m])) > 0')
    return _rule("FineTuneMetricPollErrors", expr, "15m", "warning",
                 "The FineTune operator {{ $labels.release }} in namespace {{ $labels.namespace }} cannot read "
                 "trainers' metrics ({{ $labels.reason }})",
                 "The operator {{ $labels.release }} in namespace {{ $labels.namespace }} has failed to read rank "
                 "0's /metrics "
                 "({{ $labels.reason }}) for 15 minutes and more: those jobs' status.progress is not updated. "
                 "`kubectl get finetunejobs -A` shows the condition MetricsStale on them, with the error; a "
                 "NetworkPolicy that drops the operator's packets, or a trainer image that serves no metrics, are "
                 "the usual causes.")


def groups() -> list[dict[str, Any]]:
    return [
        {"name": "finetune-jobs", "rules": [job_failed(), training_stalled()]},
        {"name": "finetune-operator",
         "rules": [operator_down(), operator_not_leading(), operators_leading(), reconcile_errors(),
                   metric_poll_errors()]},
    ]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # A value that is the chart's placeholder alone is quoted: the chart's namespace `yes` or `123` in its place, bare,
    # would read as a boolean or a number.
    style = "|" if "\n" in value else "'" if value in (NAMESPACE, RELEASE) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    header = ("# Generated from operator/finetune_operator/alerts.py by `make crds`: do not edit. The chart replaces\n"
              "# ${NAMESPACE}, ${RELEASE}, ${POLL_SECONDS} and ${STALLED_AFTER} (templates/prometheusrule.yaml).\n")
    return header + yaml.dump(groups(), Dumper=_Dumper, sort_keys=False, width=100_000, allow_unicode=True)
