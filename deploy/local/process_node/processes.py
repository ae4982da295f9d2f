"""A container's processes, found as a runtime's cgroup would hold them: by their root folder, which each process
of a container's run inherits whatever session or process group it makes itself (torch elastic starts each worker
in a session of its own)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_PATIENCE = 1.0  # seconds; a process in uninterruptible sleep ends when it wakes


def processes_in(folder: Path) -> list[int]:
    """Processes whose root is `folder` or a folder under it."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                root = Path(os.readlink(entry / "root"))
            except OSError:
                continue  # gone (or a zombie), or not ours to look at
            if root.is_relative_to(folder):
                found.append(int(entry.name))
    return found


def kill_all(folder: Path) -> None:
    """SIGKILL every process in `folder`, and again what they forked meanwhile, until none is left (or for
    KILL_PATIENCE at most)."""
    deadline = time.monotonic() + KILL_PATIENCE
    while (pids := processes_in(folder)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended meanwhile
        time.sleep(0.01)
