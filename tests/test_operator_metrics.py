"""The operator's own /metrics, wired as kopf wires it, without a cluster."""

from __future__ import annotations

import kopf
import pytest
from kopf._core.engines.indexing import OperatorIndexers
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import handlers, metrics
from finetune_operator.settings import Settings


def jobs_by_phase() -> dict[str, float]:
    text = generate_latest(metrics.REGISTRY).decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "finetune_operator_jobs")
    return {s.labels["phase"]: s.value for s in family.samples}


def test_jobs_by_phase_counts_finished_jobs_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator restarted onto finished jobs never reconciles them (no timer runs for them), and the gauge was
    given kopf's index only by a reconcile: it said 0 in every phase for as long as no job was live."""
    monkeypatch.setattr(handlers, "Clients", lambda connections: None)  # no API server here
    monkeypatch.setattr(metrics.JOBS, "index", None)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Settings(metrics_port=0))
    indexers = OperatorIndexers()
    indexers.ensure(registry._indexing.get_all_handlers())  # as kopf does before its startup handlers
    # The startup handler, with the kwargs kopf gives it (its indices among them); then kopf's first list.
    handlers.configure(settings=kopf.OperatorSettings(), memo=kopf.Memo(settings=Settings(metrics_port=0)),
                       **dict(indexers.indices))
    indexers["phase_index"].replace(("team-a", "done"), {"Succeeded": None})
    indexers["phase_index"].replace(("team-a", "broken"), {"Failed": None})
    assert jobs_by_phase() == {"Pending": 0, "Running": 0, "Suspended": 0, "Succeeded": 1, "Failed": 1}
