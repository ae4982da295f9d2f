"""A PNG of the dashboard drawn from a Prometheus's data, for the README where no Grafana runs.

Every panel of deploy/grafana/finetune.json is queried over [start, end] with the variables filled
in, and drawn with matplotlib: time series as lines, stats as their last value, bar gauges as bars.
The chart's test calls it after its job when FTO_DASHBOARD_PNG names a file.

    python deploy/grafana/preview.py URL NAMESPACE JOB START END OUT.png
"""

from __future__ import annotations

import json
import math
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent / "finetune.json"
COLUMNS = 4


def fill(expr: str, namespace: str, job: str, start: float, end: float) -> str:
    return (expr.replace("$namespace", namespace).replace("$job", job).replace("$__rate_interval", "30s")
            .replace("$__range", f"{int(end - start) + 1}s"))


def query_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": max(1.0, (end - start) / 200)})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as response:
        return json.load(response)["data"]["result"]


def legend(template: str, metric: dict[str, str]) -> str:
    for key, value in metric.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def finite(values: list[list[Any]]) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in values if math.isfinite(float(v))]


def draw(url: str, namespace: str, job: str, start: float, end: float, out: Path) -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 2.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=9)
        lines = []
        for target in panel["targets"]:
            for series in query_range(url, fill(target["expr"], namespace, job, start, end), start, end):
                points = finite(series["values"])
                if points:
                    lines.append((legend(target.get("legendFormat", ""), series["metric"]), points))
        if panel["type"] == "timeseries":
            for name, points in lines:
                ax.plot([(t - start) / 60 for t, _ in points], [v for _, v in points], label=name, linewidth=1)
            ax.set_xlabel("minutes", fontsize=7)
            if lines:
                ax.legend(fontsize=6)
        elif panel["type"] == "bargauge":
            ax.barh([name for name, _ in lines], [points[-1][1] for _, points in lines])
        elif panel["type"] == "state-timeline":
            for name, points in lines:
                ax.scatter([(t - start) / 60 for t, _ in points], [name] * len(points), s=4)
            ax.set_xlabel("minutes", fontsize=7)
        else:  # stat: the last value of each series
            text = "\n".join(f"{name}: {points[-1][1]:.3g}" for name, points in lines) or "no data"
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
            ax.set_axis_off()
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"FineTune dashboard: {namespace}/{job}", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    url, namespace, job, start, end, out = sys.argv[1:7]
    draw(url, namespace, job, float(start), float(end), Path(out))
