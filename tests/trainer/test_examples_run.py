"""The manifests in deploy/examples/ as a user runs them: the CLI, the bundled assets, the
whole pipeline. Every example runs on a small budget (torchrun for the multi-process one);
minilm-sentiment.yaml runs in full, within the 3-minute CPU budget and clearly better than
its baseline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune_trainer.lora_fused import FORMS
from tiny import free_port, trainer_command

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
BUDGET_SECONDS = 180  # issue 4: the whole run, baseline included, on a 2-core CPU
DETECTION_BUDGET_SECONDS = 600  # measured 590 s at a load of 15 (README); a detector from random weights is slow
MAP50_GAIN = 0.05  # measured 0.0004 -> 0.100


def run_in_full(example: str, tmp_path: Path, timeout: int) -> tuple[float, dict, dict, dict]:
    """Run deploy/examples/<example>.yaml as written; returns the seconds, the report, its baseline and final."""
    started = time.monotonic()
    done = subprocess.run(trainer_command("run", str(REPO / "deploy/examples" / f"{example}.yaml"),
                                          "--output", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    return seconds, report, report["evaluation"]["baseline"], report["evaluation"]["final"]


def test_minilm_sentiment_example_beats_its_baseline(tmp_path: Path) -> None:
    seconds, report, baseline, final = run_in_full("minilm-sentiment", tmp_path, 600)
    print(f"minilm-sentiment: {seconds:.0f} s, accuracy {baseline['accuracy']:.3f} -> {final['accuracy']:.3f}")
    assert final["accuracy"] > baseline["accuracy"] + 0.1 and final["f1"] > baseline["f1"] + 0.1
    assert report["merge_check"]["passed"]
    # A busy machine (other test suites, benchmarks) slows it down; twice the budget means a real regression.
    assert seconds < 2 * BUDGET_SECONDS, f"{seconds:.0f} s"


@pytest.mark.timeout(1300)  # its own 1200 s bound applies, not the suite's 900 s
def test_shapes_detection_example_beats_its_baseline(tmp_path: Path) -> None:
    """The detection example in full: a detector from random weights finds the rendered shapes."""
    seconds, _, baseline, final = run_in_full("shapes-fasterrcnn", tmp_path, 1200)
    print(f"shapes-fasterrcnn: {seconds:.0f} s, map50 {baseline['map50']:.3f} -> {final['map50']:.3f}, "
          f"map {baseline['map']:.3f} -> {final['map']:.3f}")
    assert final["map50"] > baseline["map50"] + MAP50_GAIN and final["map"] > baseline["map"]
    assert seconds < 2 * DETECTION_BUDGET_SECONDS, f"{seconds:.0f} s"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_runs_on_a_small_budget(example: Path, tmp_path: Path) -> None:
    """The manifest as written, but a few rows and steps: what it configures (model, data, task, adapters,
    workers) must run end to end and export."""
    run_on_a_small_budget(yaml.safe_load(example.read_text()), example.name, tmp_path)


@pytest.mark.parametrize(("example", "augment"), [("digits-resnet18-from-scratch", ["random-resized-crop"]),
                                                  ("shapes-fasterrcnn", ["horizontal-flip"])])
def test_an_example_with_augmented_images_runs_on_a_small_budget(example: str, augment: list[str],
                                                                 tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "deploy/examples" / f"{example}.yaml").read_text())
    doc["spec"]["dataset"]["augment"] = augment
    run_on_a_small_budget(doc, f"{example}.yaml", tmp_path)


def run_on_a_small_budget(doc: dict, name: str, tmp_path: Path) -> None:
    spec = doc["spec"]
    spec["dataset"] |= {"maxTrainSamples": 64, "maxEvalSamples": 16}
    spec["training"] |= {"maxSteps": 2}
    (manifest := tmp_path / name).write_text(yaml.safe_dump(doc))
    runtime = spec.get("runtime", {})
    processes = runtime.get("workers", 1) * runtime.get("processesPerWorker", 1)
    command = trainer_command("run", str(manifest), "--output", str(tmp_path / "out"))
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", *command[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=os.environ | {"OMP_NUM_THREADS": str(max(1, 2 // processes))})
    assert done.returncode == 0, done.stderr[-4000:]
    lora = doc["spec"].get("rearrange", {}).get("lora")
    device = re.search(r"precision \S+: .* on (\w+)", done.stderr)  # the trainer takes a GPU where there is one
    if lora and lora.get("dropout") == 0:  # such adapters train through the device's fused form
        assert device, done.stderr[-4000:]
        if form := FORMS.get(device.group(1)):  # other devices keep peft's path
            assert re.search(rf"LoRA computed as {form.__name__} on [1-9]", done.stderr), done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["training"]["steps"] == 2 and report["training"]["workers"] == processes
    assert set(report["evaluation"]["final"]) == set(spec.get("evaluation", {}).get("metrics", ["accuracy", "f1"]))
    assert "model.safetensors" in report["files"]  # adapters, where there are any, merged on export
    # What the export is, not the run's checkpoints beside it.
    assert (tmp_path / "out" / "checkpoints").is_dir() and not [f for f in report["files"] if "checkpoint" in f]
