"""A container's processes, found as a runtime's cgroup would hold them: by their root folder, which each process
of a container's run inherits whatever session or process group it makes itself (torch elastic starts each worker
in a session of its own)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_PATIENCE = 1.0  # seconds; a process in uninterruptible sleep ends when it wakes


def _inside(pid: int, folder: Path) -> bool:
    """Whether the process's root is `folder` or a folder under it (`folder` resolved)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/root")).is_relative_to(folder)
    except OSError:
        return False  # gone (or a zombie), or not ours to look at


def processes_in(folder: Path) -> list[int]:
    """Processes whose root is `folder` or a folder under it."""
    folder = folder.resolve()
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if _inside(pid, folder)]


def _kill_if_inside(pid: int, folder: Path) -> None:
    """SIGKILL the process, unless its pid is another's by now: a pidfd holds the process, whose root is then checked
    again; a signal through the pidfd reaches that process or none."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # it ended meanwhile
    try:
        if _inside(pid, folder):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended after the check: the root read may have been another's, the signal went nowhere
    finally:
        os.close(pidfd)


def kill_all(folder: Path) -> None:
    """SIGKILL every process in `folder`, and again what they forked meanwhile, until none is left (or for
    KILL_PATIENCE at most)."""
    folder = folder.resolve()
    deadline = time.monotonic() + KILL_PATIENCE
    while (pids := processes_in(folder)) and time.monotonic() < deadline:
        for pid in pids:
            _kill_if_inside(pid, folder)
        time.sleep(0.01)
