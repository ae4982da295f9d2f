"""Where matplotlib keeps its config and font cache. The trainer draws its loss curve with matplotlib, and a detector's
evaluation imports it (torchmetrics' detection metrics do): in a pod whose HOME cannot be written, as a non-root
pod's often cannot, matplotlib made a temporary folder itself and warned in every job's log ("Matplotlib created a
temporary cache directory ...") as though the job had gone wrong. Called before each of those imports."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path


@functools.cache  # once a process: a detector's every evaluation asks
def matplotlib_folder() -> None:
    """Point MPLCONFIGDIR, where the user set none, at a temporary folder (removed at exit) when matplotlib's own,
    under HOME, cannot be written."""
    if os.environ.get("MPLCONFIGDIR") or matplotlib_folders_writable():
        return
    try:
        folder = tempfile.mkdtemp(prefix="matplotlib-")
    except OSError:  # no temporary folder either: matplotlib's own error says to set MPLCONFIGDIR
        return
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = folder


def matplotlib_folders_writable() -> bool:
    """Whether matplotlib's config and cache folders can be made and written, as it tests them on Linux (where pods
    run): XDG's, under HOME by default."""
    try:
        folders = [Path(os.environ.get(xdg) or Path.home() / default, "matplotlib")
                   for xdg, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"))]
    except RuntimeError:  # no HOME, and no passwd entry for the uid (as an OpenShift pod's may have none)
        return False
    return all(map(writable_folder, folders))


def writable_folder(folder: Path) -> bool:
    """Whether `folder` is, or can be made, a folder this process may write in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return folder.is_dir() and os.access(folder, os.W_OK)
