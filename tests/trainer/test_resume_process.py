"""Whole trainer processes stopped the way Kubernetes stops them: SIGTERM (checkpoint, exit
143) and SIGKILL (no warning). Run again on the same output, each finishes with exactly the
weights of a run that was never interrupted (same seed, CPU, deterministic kernels)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from finetune_trainer.checkpoints import complete
from tiny import tiny_classifier_doc, trainer_command

pytestmark = pytest.mark.slow


def job(tmp_path: Path, name: str) -> tuple[Path, Path]:
    out = tmp_path / name
    doc = tiny_classifier_doc(out, batchSize=8, checkpointEverySteps=10)
    doc["dataset"]["maxTrainSamples"] = 480  # 60 steps: time to stop it in the middle
    doc["evaluation"] = {"baseline": False}
    (config := tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return config, out


def start(config: Path, out: Path) -> subprocess.Popen:
    log = (out.parent / f"{out.name}.log").open("a")
    return subprocess.Popen(trainer_command("run", str(config)), stdout=log, stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(int(p.name.split("-")[1]) >= step for p in complete(out / "checkpoints")):
        assert proc.poll() is None, f"finished before step {step}: {(out.parent / (out.name + '.log')).read_text()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    config, out = job(tmp, "reference")
    assert subprocess.run(trainer_command("run", str(config)), capture_output=True, timeout=600).returncode == 0
    return weights(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_an_interrupted_run_resumes_to_the_same_weights(sig: signal.Signals, reference: dict, tmp_path: Path) -> None:
    config, out = job(tmp_path, "interrupted")
    proc = start(config, out)
    wait_for_checkpoint(proc, out, 20)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    saved = [int(p.name.split("-")[1]) for p in complete(out / "checkpoints")]
    if sig == signal.SIGTERM:
        assert code == 143  # checkpoint written, the attempt may be resumed
        assert saved[-1] % 10 != 0 or saved[-1] > 20  # the SIGTERM checkpoint, not only the periodic ones
    else:
        assert code == -signal.SIGKILL
    assert 20 <= saved[-1] < 60 and not (out / "model.safetensors").exists()
    assert start(config, out).wait(timeout=600) == 0
    log = (out.parent / "interrupted.log").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step-{saved[-1]:08d}'}" in log
    resumed = weights(out)
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        assert (resumed[name] == value).all(), name
