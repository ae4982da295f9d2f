"""Cheap checks of what cannot run here: the trainer image's invariants and the GPU benchmark's CPU paths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_trainer_image_is_pinned_python_non_root_with_the_cli_entrypoint() -> None:
    steps = _instructions(REPO / "trainer" / "Dockerfile")
    args = {k: v for k, v in (s.split("=", 1) for kind, s in steps if kind == "ARG" and "=" in s)}
    base = next(v for kind, v in steps if kind == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    # CUDA comes with the pinned torch wheels (tests/trainer/test_pins.py), the driver from the host.
    assert re.fullmatch(r"python:\d+\.\d+-slim-\w+", base), base

    users = [v for kind, v in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0].isdigit(), "a numeric UID lets runAsNonRoot verify it"

    installs = " ".join(v for kind, v in steps if kind == "RUN" and "pip install" in v)
    assert ".[trainer]" in installs

    entrypoint = json.loads(next(v for kind, v in steps if kind == "ENTRYPOINT"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["finetune-trainer"] and "finetune-trainer" in scripts
    # Everything the image COPYs must exist (a missing path fails `docker build`).
    for kind, value in steps:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source


def _gpu_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_gpu_bench_says_no_gpu_and_exits_0_on_a_cpu_machine() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run for real")
    done = _gpu_bench()
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU" in done.stdout


@pytest.mark.slow
def test_gpu_bench_dry_run_exercises_both_sides_and_modes_on_a_tiny_model(tmp_path: Path) -> None:
    done = _gpu_bench("--cpu-dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    measured = {(r["side"], r["mode"]) for r in results if r["tokens_per_second"]}
    assert measured == {("hf", "full"), ("ours", "full"), ("hf", "lora"), ("ours", "lora")}
