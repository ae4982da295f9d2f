"""The API models: examples validate, every bad manifest is refused naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bad_corpus import BadCase, load_bad_corpus
from finetune_operator.api import FineTuneJob, manifest_errors
from finetune_trainer.config import TrainerConfig

EXAMPLES = sorted((Path(__file__).parents[1] / "deploy" / "examples").glob("*.yaml"))
CORPUS = load_bad_corpus()


def test_there_are_examples_and_a_corpus() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "minilm-sentiment.yaml",
        "digits-headswap.yaml",
        "tiny-causal-lm.yaml",
        "minilm-sentiment-2workers.yaml",
    }
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert manifest_errors(doc) == []
    # The trainer reads the same manifest (its runtime fields are ignored).
    assert TrainerConfig.from_document(doc).output.uri.startswith("pvc://")


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_bad_manifest_is_refused_naming_its_field(case: BadCase) -> None:
    errors = manifest_errors(case.manifest)
    assert errors, f"{case.name} was accepted ({case.why})"
    # Each case breaks one thing, so every error must be about that field.
    stray = [e for e in errors if not case.names_field(e)]
    assert not stray, f"{case.name}: errors that do not name {case.field}: {stray}"


def test_defaults_are_what_a_user_would_pick() -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    spec = FineTuneJob.from_wire({"spec": {k: doc["spec"][k] for k in ("model", "dataset", "output")}}).spec
    assert spec.training.epochs == 1 and spec.training.batch_size == 32
    assert spec.training.precision == "auto" and spec.training.batching == "length-bucketed"
    assert spec.adjust.learning_rate == 5e-5 and spec.adjust.freeze.strategy == "none"
    assert spec.rearrange.lora is None and spec.rearrange.head.num_labels == "auto"
    assert spec.evaluation.metrics == ["accuracy", "f1"] and spec.evaluation.baseline
    assert spec.resources.workers == 1 and spec.resources.gpus_per_worker == 1
    assert spec.backoff_limit == 3 and not spec.suspend


def test_wire_round_trip_keeps_camel_case() -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    wire = FineTuneJob.from_wire(doc).spec.to_wire()
    assert wire["dataset"]["textField"] == "text"
    assert wire["resources"]["gpusPerWorker"] == 0
    assert FineTuneJob.from_wire({"spec": wire}).spec.to_wire() == wire


def test_validate_command_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_operator.__main__ import main

    bad = next(c for c in CORPUS if c.field == "spec.adjust.freeze.count")
    assert main(["validate", str(EXAMPLES[0])]) == 0
    assert main(["validate", str(Path(__file__).parent / "bad_manifests" / f"{bad.name}.yaml")]) == 1
    assert "spec.adjust.freeze.count: count is required" in capsys.readouterr().err
