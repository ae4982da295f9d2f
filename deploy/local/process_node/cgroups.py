"""Resource limits with cgroup v2, as the kubelet and runtime enforce them: each run of a
container gets its own cgroup with `memory.max` (and no swap) from `limits.memory` and
`cpu.max` from `limits.cpu`; a container the kernel OOM-kills there is reported as
`OOMKilled`. Like the kubelet's `kubepods`, the node's cgroups sit under one folder at the
root of the cgroup v2 hierarchy, which must offer the memory and cpu controllers. Where it
does not (cgroup v1 machines, or v2 with the controllers bound elsewhere), limits are not
enforced and `detect` says why."""

from __future__ import annotations

import math
import time
from pathlib import Path

from kubernetes.utils import parse_quantity

CONTROLLERS = {"memory", "cpu"}
CPU_PERIOD_US = 100_000


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount_point, fs_type, *_ = line.split()
        if fs_type == "cgroup2":
            return Path(mount_point)
    return None


class Cgroups:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def detect(cls, node_name: str) -> tuple[Cgroups | None, str]:
        """The node's cgroups, or None and the reason limits cannot be enforced here."""
        mount = _cgroup2_mount()
        if mount is None:
            return None, "no cgroup v2 filesystem is mounted"
        available = set((mount / "cgroup.subtree_control").read_text().split())
        if not CONTROLLERS <= available:
            return None, (f"the cgroup v2 hierarchy at {mount} offers {sorted(available) or 'no controllers'}, "
                          f"not {sorted(CONTROLLERS)} (they are bound to cgroup v1 here, or not delegated)")
        folder = mount / f"finetune-{node_name}"
        try:
            folder.mkdir(exist_ok=True)
            (folder / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(CONTROLLERS)))
        except OSError as error:
            return None, f"cannot set up {folder}: {error}"
        return cls(folder), f"enforced with cgroup v2 at {folder}"

    def create(self, name: str, resources: dict) -> Path:
        """A cgroup for one run of a container, limited as its `resources.limits` say."""
        path = self.folder / name
        path.mkdir()
        limits = resources.get("limits") or {}
        if "memory" in limits:
            (path / "memory.max").write_text(str(int(parse_quantity(limits["memory"]))))
            if (path / "memory.swap.max").exists():  # only with swap accounting
                (path / "memory.swap.max").write_text("0")  # the kubelet runs without swap
        if "cpu" in limits:
            quota = max(1000, math.ceil(parse_quantity(limits["cpu"]) * CPU_PERIOD_US))
            (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        return path

    @staticmethod
    def oom_killed(path: Path) -> bool:
        events = dict(line.split() for line in (path / "memory.events").read_text().splitlines())
        return int(events.get("oom_kill", "0")) > 0

    @staticmethod
    def remove(path: Path) -> None:
        """Kill what is left in it and remove it."""
        (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 5
        while (path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        path.rmdir()
