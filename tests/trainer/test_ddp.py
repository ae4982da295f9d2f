"""Two workers under torchrun (gloo on the CPU): the same pipeline, the data split between
them, one report from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import free_port, tiny_classifier_doc

pytestmark = pytest.mark.slow


def test_two_process_ddp_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = tiny_classifier_doc(out, batchSize=8, checkpointEverySteps=4)
    doc["rearrange"] = {"lora": {"rank": 4}}
    (config := tmp_path / "job.json").write_text(json.dumps(doc))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "finetune_trainer.cli", "run", str(config)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two ranks on two cores
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[rank 1]" in done.stderr and "[rank 0]" in done.stderr
    report = json.loads((out / "report.json").read_text())
    training = report["training"]
    assert training["workers"] == 2
    assert training["steps"] == 8  # 128 samples / (8 per rank x 2 ranks)
    assert training["samples_per_second"] > 0 and len(training["history"]) == 8
    assert report["merge_check"]["passed"]
    (saved,) = (out / "checkpoints").iterdir()  # one config, one folder
    assert [p.name for p in sorted(saved.iterdir())] == ["step-00000004", "step-00000008"]
    assert {"accuracy", "f1"} == set(report["evaluation"]["final"])
