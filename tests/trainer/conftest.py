"""Fixtures of the trainer tests: the bundled assets under a temporary pvc:// root, and tiny configs."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.assets import link_minilm, write_digits, write_sentiment, write_shapes
from finetune_trainer.config import TrainerConfig
from finetune_trainer.uris import PVC_ROOT_ENV
from tiny import tiny_classifier_doc


@pytest.fixture(autouse=True)
def jpeg_memory() -> Iterator[None]:
    """A run sets JPEGMEM for its process (cap_jpeg_memory), from Pillow's limit as it is then: set under a test's
    lowered limit, it stayed for every test after (1M: their progressive JPEGs failed, by the tests' order)."""
    before = os.environ.get("JPEGMEM")
    yield
    if before is None:
        os.environ.pop("JPEGMEM", None)
    else:
        os.environ["JPEGMEM"] = before


@pytest.fixture(scope="session", autouse=True)
def pvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pvc://models/all-MiniLM-L6-v2, pvc://data/sentiment/sentiment.csv, pvc://data/digits and pvc://data/shapes,
    as `make assets` makes them."""
    root = tmp_path_factory.mktemp("pvc")
    link_minilm(root)
    write_sentiment(root)
    write_digits(root)
    write_shapes(root)
    previous = {name: os.environ.get(name) for name in (PVC_ROOT_ENV, "FINETUNE_METRICS_PORT")}
    os.environ[PVC_ROOT_ENV] = str(root)  # subprocesses (CLI, torchrun) inherit it
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
    yield root
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def tiny_doc(tmp_path: Path) -> dict[str, Any]:
    return tiny_classifier_doc(tmp_path / "out")


@pytest.fixture
def tiny_cfg(tiny_doc: dict[str, Any]) -> TrainerConfig:
    return TrainerConfig.model_validate(copy.deepcopy(tiny_doc))


@pytest.fixture
def gauged(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[Any]], list[Any]]:
    """What the pipeline's analyses probe (a list of batches each) and the step FLOPs each step gives the MFU gauge."""
    from finetune_trainer import analyze
    from finetune_trainer.telemetry import Metrics

    probes: list[list[Any]] = []
    flops: list[Any] = []
    real_analyze, real_throughput = analyze.analyze, Metrics.set_throughput
    monkeypatch.setattr(analyze, "analyze", lambda model, batches, *a, **kw: probes.append(batches)
                        or real_analyze(model, batches, *a, **kw))
    monkeypatch.setattr(Metrics, "set_throughput", lambda self, totals, step: flops.append(step)
                        or real_throughput(self, totals, step))
    return probes, flops
