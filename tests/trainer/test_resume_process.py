"""Whole trainer processes stopped the way Kubernetes stops them: SIGTERM (checkpoint, exit
143) and SIGKILL (no warning). Run again on the same output, each finishes with exactly the
weights of a run that was never interrupted (same seed, CPU, deterministic kernels)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune_trainer.checkpoints import complete, folder_name
from finetune_trainer.config import TrainerConfig
from finetune_trainer.pipeline import fingerprinted
from tiny import EVALUATING, seconds_between, tiny_classifier_doc, trainer_command

pytestmark = pytest.mark.slow


def job(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The config file and the folder its checkpoints go to."""
    out = tmp_path / name
    doc = tiny_classifier_doc(out, batchSize=8, checkpointEverySteps=10)
    # 200 steps: after step 20, seconds to stop it in the middle (with 60, the rest took under one on two cores,
    # and a loaded machine's delay in sending the signal let it finish first)
    doc["dataset"]["maxTrainSamples"] = 1600
    doc["evaluation"] = {"baseline": False}
    (config := tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return config, out / "checkpoints" / folder_name(fingerprinted(TrainerConfig.model_validate(doc), 1, defaults=True))


def start(config: Path) -> subprocess.Popen:
    log = config.with_suffix(".log").open("a")
    return subprocess.Popen(trainer_command("run", str(config)), stdout=log, stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, saved: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(int(p.name.split("-")[1]) >= step for p in complete(saved)):
        assert proc.poll() is None, f"finished before step {step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def weights(saved: Path) -> dict:
    return load_file(saved.parent.parent / "model.safetensors")


def report(saved: Path) -> dict:
    return json.loads((saved.parent.parent / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    config, saved = job(tmp, "reference")
    assert subprocess.run(trainer_command("run", str(config)), capture_output=True, timeout=600).returncode == 0
    return weights(saved)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "ctrl-c", "sigkill"])
def test_an_interrupted_run_resumes_to_the_same_weights(sig: signal.Signals, reference: dict, tmp_path: Path) -> None:
    config, saved_dir = job(tmp_path, "interrupted")
    proc = start(config)
    wait_for_checkpoint(proc, saved_dir, 20)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    saved = [int(p.name.split("-")[1]) for p in complete(saved_dir)]
    if sig != signal.SIGKILL:
        assert code == 143  # checkpoint written, the attempt may be resumed
        log = config.with_suffix(".log").read_text()
        # The checkpoint holds the step it stopped at: the one SIGTERM (or Ctrl-C) wrote, or step 20's where the
        # signal came while that one was still being written (then it stops right after it, writing none more)
        stopped = re.search(r"stopped by SIGTERM at step (\d+); a checkpoint holds it", log)
        assert stopped and saved[-1] == int(stopped[1]) >= 20, log[-2000:]
        assert "Traceback" not in log
    else:
        assert code == -signal.SIGKILL
    assert 20 <= saved[-1] < 200 and not (saved_dir.parent.parent / "model.safetensors").exists()
    assert start(config).wait(timeout=600) == 0
    assert f"resumed from {saved_dir / f'step-{saved[-1]:08d}'}" in config.with_suffix(".log").read_text()
    resumed = weights(saved_dir)
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        assert (resumed[name] == value).all(), name


def long_validation_job(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """6 steps, validated at steps 3 and 6 one row at a time on 2,461 rows: an evaluation takes many times as long
    as the steps and the checkpoint (10 s on two shared cores), as a large validation split does."""
    out = tmp_path / name
    doc = tiny_classifier_doc(out, batchSize=8, evalEverySteps=3, checkpointEverySteps=3)
    doc["dataset"] |= {"maxTrainSamples": 48, "maxEvalSamples": None, "validationSplit": 0.05, "testSplit": 0.005}
    doc["evaluation"] = {"baseline": False, "batchSize": 1}
    (config := tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return config, out / "checkpoints" / folder_name(fingerprinted(TrainerConfig.model_validate(doc), 1, defaults=True))


def evals(run: dict) -> list[tuple[int, dict]]:
    return [(e["step"], e["metrics"]) for e in run["training"]["evals"]]


def test_sigterm_during_a_long_evaluation_stops_it_and_the_resumed_run_evaluates(tmp_path: Path) -> None:
    """The kubelet's SIGKILL comes 30 s after its SIGTERM: an evaluation under way stops at its next batch, the
    checkpoint is written as if SIGTERM had come before it, and the resumed run evaluates and ends as one never
    stopped (the evaluations, the test score, the weights)."""
    config, reference_saved = long_validation_job(tmp_path, "reference")
    assert start(config).wait(timeout=600) == 0
    log = config.with_suffix(".log").read_text()
    evaluating = seconds_between(log, EVALUATING, "validation at step 3")  # step 3's evaluation alone
    reference = report(reference_saved)
    assert [step for step, _ in evals(reference)] == [3, 6]

    config, saved = long_validation_job(tmp_path, "stopped")
    proc = start(config)
    while EVALUATING not in config.with_suffix(".log").read_text():  # step 3's evaluation has begun
        assert proc.poll() is None
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Step 3's checkpoint comes after its evaluation, unless SIGTERM cut that short: the log's line and the
    # checkpoint's empty evals below tell which (a time bound against the reference run's was load's to pass)
    while not complete(saved):
        assert time.monotonic() - sent < 300, "no checkpoint"
        time.sleep(0.02)
    took = time.monotonic() - sent
    code = proc.wait(timeout=600)
    print(f"an evaluation takes {evaluating:.1f} s; checkpoint {took:.1f} s after SIGTERM")
    assert code == 143
    (checkpoint,) = complete(saved)
    assert checkpoint.name == "step-00000003" and json.loads((checkpoint / "state.json").read_text())["evals"] == []
    assert "left the evaluation at step 3 unfinished" in config.with_suffix(".log").read_text()

    assert start(config).wait(timeout=600) == 0
    assert f"resumed from {checkpoint}" in config.with_suffix(".log").read_text()
    resumed = report(saved)
    assert evals(resumed) == evals(reference)
    assert resumed["evaluation"]["final"] == reference["evaluation"]["final"]
    resumed_weights, reference_weights = weights(saved), weights(reference_saved)
    assert resumed_weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert (resumed_weights[name] == value).all(), name
