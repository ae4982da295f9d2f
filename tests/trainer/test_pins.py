"""The trainer image runs the stack the tests ran on: trainer/constraints.txt pins the `trainer`
extra's whole dependency closure at the versions installed here, and the Dockerfile installs
with it on the same Python."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "trainer" / "constraints.txt"


def pins() -> dict[str, str]:
    return dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if not line.startswith("#"))


def test_the_pins_are_the_tested_environment() -> None:
    """Every package the trainer extra needs, transitively, is pinned at the version these tests import."""
    done = subprocess.run([sys.executable, str(REPO / "trainer" / "pins.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    import torch
    import transformers

    assert {"torch", "transformers", "peft", "nvidia-cudnn-cu13", "triton"} <= set(pins())
    assert pins()["torch"] == torch.__version__.split("+")[0] and pins()["transformers"] == transformers.__version__


def test_the_image_installs_the_pins_on_the_tested_python() -> None:
    dockerfile = (REPO / "trainer" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)-slim", dockerfile, re.M)
    assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"  # the wheels' tag
    assert "COPY trainer/constraints.txt trainer/constraints.txt" in dockerfile
    assert re.search(r"^RUN pip install -c trainer/constraints.txt '\.\[trainer\]'", dockerfile, re.M)
    assert "!trainer/constraints.txt" in (REPO / "trainer" / "Dockerfile.dockerignore").read_text()


@pytest.mark.slow
def test_pip_resolves_the_image_install_to_the_pins(tmp_path: Path) -> None:
    """The Dockerfile's install, resolved by pip from the package index without installing (minutes: it reads
    the metadata of every wheel)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-c", str(CONSTRAINTS), ".[trainer]"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    resolved = {item["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    resolved.pop("finetune-operator")
    assert resolved == pins()
