"""deploy/examples/minilm-sentiment.yaml as a user runs it: the CLI, the bundled assets, the
whole pipeline, within the 3-minute CPU budget and clearly better than the baseline."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tiny import trainer_command

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BUDGET_SECONDS = 180  # issue 4: the whole run, baseline included, on a 2-core CPU


def test_minilm_sentiment_example_beats_its_baseline(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(trainer_command("run", str(REPO / "deploy/examples/minilm-sentiment.yaml"),
                                          "--output", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    baseline, final = report["evaluation"]["baseline"], report["evaluation"]["final"]
    print(f"minilm-sentiment: {seconds:.0f} s, accuracy {baseline['accuracy']:.3f} -> {final['accuracy']:.3f}")
    assert final["accuracy"] > baseline["accuracy"] + 0.1 and final["f1"] > baseline["f1"] + 0.1
    assert report["merge_check"]["passed"]
    # A busy machine (other test suites, benchmarks) slows it down; twice the budget means a real regression.
    assert seconds < 2 * BUDGET_SECONDS, f"{seconds:.0f} s"
