"""Runs inside fresh private mount and UTS namespaces (started under `unshare --mount --uts`):
bind-mounts the pod's volumes at their mountPaths, takes the pod's hostname, then becomes
the container's command.

Reads its spec as JSON on stdin (so env values such as secrets never touch the disk):
{"mounts": [{"source", "target", "read_only"}], "cwd", "argv", "env", "hostname", "termination_log"}.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _bind(source: str, target: str, read_only: bool) -> None:
    # Mount points must exist; outside the namespace they are just empty dirs/files.
    target_path = Path(target)
    if Path(source).is_dir():
        target_path.mkdir(parents=True, exist_ok=True)
    else:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target_path.touch(exist_ok=True)
    subprocess.run(["mount", "--bind", source, target], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def main() -> None:
    spec = json.load(sys.stdin)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for mount in spec["mounts"]:
        _bind(mount["source"], mount["target"], mount["read_only"])
    socket.sethostname(spec["hostname"])
    os.chdir(spec["cwd"])
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as error:
        # What the kubelet would report as a StartError; exit codes follow the shell's.
        message = f"failed to start {spec['argv'][0]!r}: {error.strerror}"
        Path(spec["termination_log"]).write_text(message)
        print(message, file=sys.stderr)
        sys.exit(127 if isinstance(error, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
