"""The Grafana dashboard (`make crds` writes deploy/grafana/finetune.json and the chart's copy).

Built with grafana-foundation-sdk (the dev extra) so it is code, not hand-edited JSON. Its queries
use only the shared metric names (the README's trainer contract) and the labels the chart's PodMonitor adds to trainer
series: `namespace`, `finetunejob` (from the pod label `finetune.dev/job-name`), `finetunejob_uid`
(`finetune.dev/job-uid`: a job made again under its name is another run) and `attempt` (`finetune.dev/attempt`, which
the evaluation panels join on). Operator
series carry `job="finetune-operator"` (the ServiceMonitor's relabelling, whatever the release's name), and every
operator query selects it: a second scrape of the operator's pod (a Prometheus that also honours prometheus.io
annotations) doubled the sums.

Rows: the fleet; one job (variables datasource, namespace, job: from the stage, which rank 0 reports from
its start, where the training gauges wait for the first step); its evaluation, baseline against
fine-tuned (and a distilled job's teacher); the operator's health.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BarGaugeDisplayMode, GraphDrawStyle, StackingMode, VizOrientation
from grafana_foundation_sdk.models.dashboard import (DataSourceRef, Threshold, ThresholdsMode, VariableRefresh,
                                                     VariableSort)

PATHS = [Path("deploy/grafana/finetune.json"), Path("charts/finetune-operator/dashboards/finetune.json")]
UID = "finetune-operator"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'namespace="$namespace", finetunejob="$job"'  # one job's rank 0 series
OPERATOR = 'job="finetune-operator"'

Panel = timeseries.Panel | stat.Panel | bargauge.Panel | statetimeline.Panel


def query(expr: str, legend: str = "", instant: bool = False) -> Dataquery:
    q = Dataquery().expr(expr).legend_format(legend or "__auto")
    return q.instant() if instant else q.range()


def series(title: str, unit: str, *queries: Dataquery, width: int = 8) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).span(width).height(8)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def single(title: str, unit: str, *queries: Dataquery, width: int = 4,
           colours: tuple[tuple[float | None, str], ...] = ((None, "text"),)) -> stat.Panel:
    """A stat; `colours`: (from value, colour) steps. One neutral colour by default: Grafana's own steps (green, red
    from 80) made 80 s to Running red and an operator up 0 green."""
    panel = stat.Panel().title(title).unit(unit).datasource(DATASOURCE).span(width).height(8)
    for q in queries:
        panel = panel.with_target(q)
    steps = [Threshold(value=value, color=colour) for value, colour in colours]
    return (panel.reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
            .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)))


def quantile(q: float, histogram: str, function: str, window: str) -> str:
    """The `q` quantile of the operator's `histogram`'s observations counted by `function` (rate, increase) over
    `window`; none without observations (the quantile of empty buckets is NaN, which a stat showed as a value)."""
    return (f"histogram_quantile({q}, sum by (le) ({function}({histogram}_bucket{{{OPERATOR}}}[{window}])))"
            f" and on () sum({function}({histogram}_count{{{OPERATOR}}}[{window}])) > 0")


def fleet() -> list[Panel]:
    return [
        series("Jobs by phase", "short", query(f"sum by (phase) (finetune_operator_jobs{{{OPERATOR}}})", "{{phase}}"),
               width=8)
        .stacking(StackingConfig().mode(StackingMode.NORMAL)),
        # A job is on GPUs when its rank 0 reports GPU memory (CPU jobs report 0). `or vector(0)`: with none left
        # the sum has no points, and the stat's last non-null value was the count before the last one ended. Series
        # without a job's name (a second scrape job that honours the pods' prometheus.io annotations) are no job.
        single("Running GPU jobs", "short", query(
            'sum(max by (namespace, finetunejob) (finetune_trainer_gpu_memory_bytes{finetunejob!=""} > bool 0))'
            " or vector(0)",
            "GPU jobs")),
        series("Failed jobs by reason (since the operator started)", "short",
               query(f"sum by (reason) (finetune_operator_job_failures_total{{{OPERATOR}}})", "{{reason}}"), width=6)
        .draw_style(GraphDrawStyle.BARS),
        # Of the jobs that started in the dashboard's range, at its end: one observation per job, so a rate over
        # $__rate_interval had points only just after a start and the panel was empty nearly all the time.
        single("Time from creation to Running", "s", *(
            query(quantile(q, "finetune_operator_time_to_running_seconds", "increase", "$__range"), f"p{q * 100:g}",
                  instant=True) for q in (0.5, 0.95)), width=6)
        .description("p50 and p95 of the jobs that started in the dashboard's time range"),
    ]


def one(metric: str, function: str = "", window: str = "") -> str:
    """The job's `metric` (or `function(metric[window])`), its attempts' series joined: one attempt runs at a time."""
    selected = f"{metric}{{{JOB}}}"
    return f"max by (namespace, finetunejob) ({f'{function}({selected}[{window}])' if function else selected})"


# The newest run, and in it each attempt, by when their trainers started (rank 0's process_start_time_seconds): a job
# deleted and made again under its name (another recipe) is a run of its own (`evaluation`, `progress`). A subquery of
# the series' timestamps chose them at the evaluation interval's resolution (a minute by default), and missed a trainer
# scraped between two of its points: a short job's panels were empty. A trainer image from before process_* is ordered
# by when it was last seen, so: attempts and runs never overlap (each waits for the one before to stop), so either time
# orders them alike.
BY_ATTEMPT = "max by (finetunejob_uid, attempt)"
STARTED = (f"{BY_ATTEMPT} (last_over_time(process_start_time_seconds{{{JOB}}}[$__range])) or on (finetunejob_uid, "
           f"attempt) {BY_ATTEMPT} (max_over_time(timestamp(finetune_trainer_stage{{{JOB}}})[$__range:]))")
NEWEST_RUN = f"topk(1, max by (finetunejob_uid) ({STARTED}))"


def progress() -> str:
    """The step over the total of the newest run's newest attempt that made a step, as they were last in the range:
    grouped by the job's name alone, the stat's last non-null value of a range query was the run before's (100 %) all
    through a run made again under the name, and a resumed attempt's step under the one before's. A finished run keeps
    its 100 %; a retry that loads shows how far the attempt before got (status.progress says so too); a new run shows
    nothing before its first step."""
    stepped = (f"topk(1, ({STARTED}) and on (finetunejob_uid, attempt) "
               f"last_over_time(finetune_trainer_step{{{JOB}}}[$__range]) and on (finetunejob_uid) {NEWEST_RUN})")

    def last(metric: str) -> str:
        return (f"max by (namespace, finetunejob) (last_over_time({metric}{{{JOB}}}[$__range])"
                f" and on (finetunejob_uid, attempt) {stepped})")

    return f"{last('finetune_trainer_step')} / {last('finetune_trainer_total_steps')}"


def one_job() -> list[Panel]:
    return [
        series("Loss", "short", query(f"finetune_trainer_loss{{{JOB}}}", "loss")),
        series("Learning rate", "short", query(f"finetune_trainer_learning_rate{{{JOB}}}", "learning rate")),
        series("Throughput", "short",
               query(f"finetune_trainer_samples_per_second{{{JOB}}}", "samples/s"),
               query(f"finetune_trainer_tokens_per_second{{{JOB}}}", "tokens/s")),
        # The stats and the stages are the job's, not an attempt's: each attempt is a series of its own (its pod's
        # labels), and a stat showed one value per attempt, the failed one's beside the current one's.
        single("Progress", "percentunit", query(progress(), "progress", instant=True), width=4),
        # Steps left over the trainer's steps/s, status.progress.etaSeconds' rate: it counts the time validations
        # and checkpoints take. The step's slope over $__rate_interval swung from half to two and a half times the
        # time left, or nothing, with the validations; it stays for a trainer image without the gauge (deriv(): the
        # step count is a gauge). No value while no step is made (a stall), where the division gave +Inf. At the
        # range's end only: over the range, the stat's last non-null value was the ETA of a job that had failed since.
        single("ETA", "s", query(
            f"({one('finetune_trainer_total_steps')} - {one('finetune_trainer_step')})"
            f" / (({one('finetune_trainer_steps_per_second')} > 0) or ("
            f"{one('finetune_trainer_step', 'deriv', '$__rate_interval')} > 0 unless "
            f"{one('finetune_trainer_steps_per_second')}))", "ETA", instant=True), width=4),
        statetimeline.Panel().title("Stage").datasource(DATASOURCE).span(8).height(8)
        .with_target(query(f"max by (stage) (finetune_trainer_stage{{{JOB}}}) == 1", "{{stage}}")),
        series("GPU memory (peak, rank 0)", "bytes", query(f"finetune_trainer_gpu_memory_bytes{{{JOB}}}", "GPU memory"),
               width=4),
        series("MFU", "percentunit", query(f"finetune_trainer_mfu{{{JOB}}}", "MFU"), width=4),
    ]


def evaluation() -> list[Panel]:
    # The newest run (NEWEST_RUN), and in it the newest attempt that scored: the larger value of either run showed one
    # run's fine-tuned result beside the other's baseline; so did two attempts of a run retuned between them (each
    # attempt reports its baseline again). The newest attempt alone left the panel empty while it loaded, and for good
    # where it failed there. Scored on the test split: a validation during training (phase "training") is none.
    scored = (f"topk(1, ({STARTED}) and on (finetunejob_uid, attempt) "
              f'last_over_time(finetune_trainer_eval_metric{{{JOB}, phase!="training"}}[$__range]) '
              f"and on (finetunejob_uid) {NEWEST_RUN})")

    def last(phase: str) -> str:
        return (f'max by (metric) (last_over_time(finetune_trainer_eval_metric{{{JOB}, phase="{phase}"}}[$__range])'
                f" and on (finetunejob_uid, attempt) {scored})")

    return [
        bargauge.Panel().title("Baseline vs fine-tuned").datasource(DATASOURCE).span(16).height(8)
        .display_mode(BarGaugeDisplayMode.BASIC).orientation(VizOrientation.HORIZONTAL)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(query(last("baseline"), "{{metric}} baseline", instant=True))
        .with_target(query(last("final"), "{{metric}} fine-tuned", instant=True))
        .with_target(query(last("teacher"), "{{metric}} teacher", instant=True)),  # a distilled job's
        single("Change (fine-tuned - baseline)", "short",
               query(f"{last('final')} - {last('baseline')}", "{{metric}}", instant=True), width=8)
        .description("The test split's score after fine-tuning less before: better is up for accuracy, F1 and mAP, "
                     "down for loss and perplexity"),
    ]


def operator_health() -> list[Panel]:
    started = f"process_start_time_seconds{{{OPERATOR}}}"

    return [
        series("Reconciles per second", "ops",
               query(f"sum(rate(finetune_operator_reconcile_duration_seconds_count{{{OPERATOR}}}[$__rate_interval]))",
                     "reconciles"),
               width=6),
        series("Reconcile latency", "s", *(
            query(quantile(q, "finetune_operator_reconcile_duration_seconds", "rate", "$__rate_interval"),
                  f"p{q * 100:g}") for q in (0.5, 0.99)), width=6),
        series("Metric poll errors", "ops", query(
            f"sum by (reason) (rate(finetune_operator_metric_poll_errors_total{{{OPERATOR}}}[$__rate_interval]))",
            "{{reason}}"),
               width=6),
        # process_start_time_seconds changes on every start: restarts without kube-state-metrics. A new pod (an
        # eviction, an upgrade) is a new series, not a change: each series after a release's first is a restart too.
        # A release is its namespace and name (`release`, the scrape's relabelling): another release, beside it or
        # elsewhere, is no restart. Only the active
        # replica has it (metrics.lead): a standby is no restart, a standby taking over is one.
        single("Operator restarts", "short", query(
            f"sum(changes({started}[$__range])) + count(last_over_time({started}[$__range]))"
            f" - count(count by (namespace, release) (last_over_time({started}[$__range])))", "restarts"), width=3),
        # The active operator (a standby replica says 0). `or vector(0)`: with no operator pod (evicted, its
        # replacement unscheduled) there is no target and no sample, and the stat's last non-null value was the 1
        # from before.
        single("Operator up", "short", query(f"sum(finetune_operator_leader{{{OPERATOR}}}) or vector(0)", "up"),
               width=3, colours=((None, "red"), (1, "green"))),
    ]


def build() -> Dashboard:
    board = (
        Dashboard("FineTune").uid(UID).tags(["finetune", "kubernetes", "training"])
        .description("FineTuneJobs: the fleet, one job's training and evaluation, and the operator's health.")
        .refresh("30s").time("now-3h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
                       .query("label_values(finetune_trainer_stage, namespace)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
        .with_variable(QueryVariable("job").label("FineTuneJob").datasource(DATASOURCE)
                       .query('label_values(finetune_trainer_stage{namespace="$namespace"}, finetunejob)')
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    )
    for title, panels in (("Fleet", fleet()), ("Job: $namespace/$job", one_job()),
                          ("Evaluation: $namespace/$job", evaluation()), ("Operator", operator_health())):
        board = board.with_row(Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return board


def render() -> str:
    return json.dumps(json.loads(JSONEncoder().encode(build().build())), indent=2, sort_keys=True) + "\n"
