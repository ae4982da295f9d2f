"""A container's processes, found as a runtime's cgroup would hold them: by their root folder, which each process
of a container's run inherits whatever session or process group it makes itself (torch elastic starts each worker
in a session of its own)."""

from __future__ import annotations

import os
import resource
import select
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


def _signal_if_inside(pid: int, folder: Path, signum: signal.Signals) -> int | None:
    """Send `signum` to the process, unless its pid is another's by now: a pidfd holds the process, whose root is then
    checked again; a signal through the pidfd reaches that process or none. The pidfd, left open for the caller, or
    None where the process was gone or outside."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None  # it ended meanwhile
    try:
        if _inside(pid, folder):
            signal.pidfd_send_signal(pidfd, signum)
            return pidfd
    except ProcessLookupError:
        pass  # it ended after the check: the root read may have been another's, the signal went nowhere
    os.close(pidfd)
    return None


def _signal_all(folder: Path, signum: signal.Signals, held: list[int] | None = None) -> int:
    """Send `signum` to every process in `folder` (resolved); how many it reached. Their pidfds go to `held`, for the
    caller to close (also where this raised midway), else are closed at once: one held per process ran out of file
    descriptors past about a thousand."""
    reached = 0
    for pid in processes_in(folder):
        if (pidfd := _signal_if_inside(pid, folder, signum)) is None:
            continue
        reached += 1
        if held is None:
            os.close(pidfd)
        else:
            held.append(pidfd)
    return reached


def _close_all(pidfds: list[int]) -> None:
    for pidfd in pidfds:
        os.close(pidfd)


def kill_all(folder: Path) -> None:
    """SIGKILL every process in `folder`, and again what they forked meanwhile, until none is left (or for
    KILL_PATIENCE at most)."""
    folder = folder.resolve()
    deadline = time.monotonic() + KILL_PATIENCE
    while time.monotonic() < deadline and _signal_all(folder, signal.SIGKILL):
        time.sleep(0.01)


def _wait_ended(pidfds: list[int], timeout: float) -> None:
    """Wait until every pidfd's process has ended (a pidfd turns readable then), or for `timeout`."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    deadline, left = time.monotonic() + timeout, len(pidfds)
    while left and (remaining := deadline - time.monotonic()) > 0:
        for pidfd, _ in poller.poll(remaining * 1000):
            poller.unregister(pidfd)
            left -= 1


def terminate_all(folder: Path, grace: float) -> None:
    """SIGTERM every process in `folder`, wait up to `grace` for them to end, then kill_all what is left or was
    forked meanwhile (also where the wait failed). /proc is scanned once for the wait, which then sleeps on the
    processes' pidfds: one each, so the soft limit on open files is raised to the hard one first, as Go's runtime
    does at start."""
    folder = folder.resolve()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pidfds: list[int] = []
    try:
        _signal_all(folder, signal.SIGTERM, pidfds)
        _wait_ended(pidfds, grace)
    finally:
        _close_all(pidfds)
        kill_all(folder)
