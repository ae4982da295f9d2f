"""Runs inside fresh private mount and UTS namespaces (started under `unshare --mount --uts`)
and turns itself into one container:

1. builds the container's root in its own folder: every entry of the host's `/` is bound
   there (the host's filesystem stands in for the image), except `/tmp`, which is the
   container's own. Where a mountPath does not exist, the folder that should hold it is
   rebuilt inside the root (its entries bound one by one) and the mount point is created
   there, so nothing is ever created on the host;
2. bind-mounts the pod's volumes at their mountPaths, makes the root read-only for
   `readOnlyRootFilesystem`, takes the pod's hostname and chroots into the root;
3. drops capabilities (the bounding set), takes the pod's uid, gid and groups, sets
   no_new_privs and asks for SIGKILL when the node agent dies, then becomes the command.

Reads its spec as JSON on stdin (so env values such as secrets never touch the disk):
{"root", "mounts": [{"source", "target", "read_only", "sub_path" (in source, or null)}], "traversable": [paths],
 "software": [paths], "cwd",
 "argv", "env", "hostname", "read_only_root", "termination_log" (the host file behind
 terminationMessagePath), "cgroup" (a folder, or null where limits are not enforced),
 "user": {"uid", "gid", "groups", "capabilities": [numbers kept], "no_new_privs", "agent_pid"}}.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MNT_DETACH = 0x1, 0x20, 0x1000, 0x4000, 0x2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
# Host folders a container gets its own copy of, and those that stay writable under
# readOnlyRootFilesystem (as a runtime mounts them separately).
PRIVATE = {"tmp"}
KERNEL_FILESYSTEMS = ("dev", "proc", "sys")

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(Exception):
    """The container could not be set up (the kubelet's CreateContainerError / StartError)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(error)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode(), target.encode(), None, flags, None), f"mount {source} on {target}")


def _open_part(folder_fd: int, name: str, like: os.stat_result | None) -> int:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except FileNotFoundError:
        if like is None:
            raise
        os.mkdir(name, dir_fd=folder_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
        try:
            os.fchmod(fd, stat.S_IMODE(like.st_mode))
            os.fchown(fd, like.st_uid, like.st_gid)
        except BaseException:
            os.close(fd)  # the caller gets no descriptor to close
            raise
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise LaunchError(f"{name} is a symlink")
    return fd


def open_beneath(top: str, relative: str, like: os.stat_result | None = None) -> int:
    """A descriptor of `relative` in the folder `top`, each part opened without following a symlink: one that a
    container swapped in is refused, not followed out of its volume. Missing folders are made with the mode and
    owner of `like`, where given."""
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in Path(relative).parts:
        try:
            part = _open_part(fd, name, like)
        finally:
            os.close(fd)
        fd = part
    return fd


def _source(mount: dict) -> str:
    """What to mount: a volume's folder, or the subPath in it, reached anew here as the node checked it (its
    descriptor stays open, close-on-exec, for the mounts to be redone)."""
    if mount["sub_path"] is None:
        return mount["source"]
    return f"/proc/self/fd/{open_beneath(mount['source'], mount['sub_path'])}"


class Root:
    """A container's root folder: host entries bound in, our own folders where we need them."""

    def __init__(self, path: Path, software: list[str]) -> None:
        self.path = path
        # The host folders that stand in for the image's software (the virtualenv and the sources it
        # runs from): they stay visible even inside a private folder (a checkout under /tmp).
        self.software = [Path(s) for s in software]
        self.bound: set[str] = set()  # paths in the root (relative, no leading /) bound from the host
        self.mounts: list[tuple[str, str, bool]] = []  # volumes mounted so far: source, target, read-only
        self._populate("")

    def _populate(self, relative: str) -> None:
        """Make `relative` our own folder holding the host's entries, each bound from the host."""
        host, here = Path("/", relative), self.path / relative
        info = host.stat()
        here.mkdir(exist_ok=True)
        os.chown(here, info.st_uid, info.st_gid)
        os.chmod(here, stat.S_IMODE(info.st_mode))
        for entry in os.scandir(host):
            inside, target = f"{relative}/{entry.name}".lstrip("/"), here / entry.name
            if entry.is_symlink():
                target.symlink_to(os.readlink(entry.path))
            elif inside in PRIVATE:
                target.mkdir()
                os.chmod(target, 0o1777)
                for kept in self.software:
                    if kept.is_relative_to(entry.path):
                        inner = target / kept.relative_to(entry.path)
                        inner.mkdir(parents=True, exist_ok=True)
                        _mount(str(kept), str(inner), MS_BIND | MS_REC)
            elif entry.is_dir(follow_symlinks=False):
                target.mkdir()
                _mount(entry.path, str(target), MS_BIND | MS_REC)
                self.bound.add(inside)
            else:
                target.touch()
                _mount(entry.path, str(target), MS_BIND)
                self.bound.add(inside)

    def _own(self, relative: str) -> None:
        """Turn a host-bound folder (and each bound folder above it) into our own."""
        parts = relative.split("/") if relative else []
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if prefix in self.bound:
                _check(_libc.umount2(str(self.path / prefix).encode(), MNT_DETACH), f"unmount {prefix}")
                self.bound.discard(prefix)
                self._populate(prefix)
                for source, target, read_only in self.mounts:  # they went with the unmount
                    if target.startswith(f"{prefix}/"):
                        self._mount_volume(source, target, read_only)

    def resolve(self, path: str, create: str | None = None, hops: int = 0) -> str:
        """`path` inside the root, symlinks followed within it; missing parts are created in
        our own folders when `create` is "dir" or "file" (the last part's kind)."""
        if hops > 40:
            raise LaunchError(f"too many symlinks resolving {path}")
        parts = [p for p in path.split("/") if p and p != "."]
        current = ""
        for index, name in enumerate(parts):
            if name == "..":
                current = current.rpartition("/")[0]
                continue
            candidate = f"{current}/{name}".lstrip("/")
            full = self.path / candidate
            if full.is_symlink():
                link = os.readlink(full)
                base = "" if link.startswith("/") else current
                rest = "/".join(parts[index + 1:])
                return self.resolve(f"/{base}/{link}/{rest}", create, hops + 1)
            if not os.path.lexists(full):
                if create is None:
                    raise LaunchError(f"{path} does not exist in the container")
                self._own(current)
                if index == len(parts) - 1 and create == "file":
                    full.touch(mode=0o644)
                else:
                    full.mkdir(mode=0o755)
            current = candidate
        return current

    def make_traversable(self, path: str) -> None:
        """Let any user reach `path` (the Python the containers run): a folder on the way
        that others may not enter (pyenv under /root, mode 0700) is rebuilt with g+x and o+x
        (g too: a container with gid 0 is judged by the group bits)."""
        relative = self.resolve(path)
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            full = self.path / prefix
            if full.stat().st_mode & 0o011 != 0o011:
                self._own(prefix)
                os.chmod(full, stat.S_IMODE(full.stat().st_mode) | 0o011)

    def _mount_volume(self, source: str, target: str, read_only: bool) -> None:
        _mount(source, str(self.path / target), MS_BIND | MS_REC)
        if read_only:
            _mount("none", str(self.path / target), MS_REMOUNT | MS_BIND | MS_RDONLY)

    def bind(self, source: str, target: str, read_only: bool) -> None:
        """Mount a volume, in order, as a runtime does: a later mount point under it is made
        inside the volume."""
        inside = self.resolve(target, "dir" if Path(source).is_dir() else "file")
        self._mount_volume(source, inside, read_only)
        self.mounts.append((source, inside, read_only))
        self.bound = {b for b in self.bound if b != inside and not b.startswith(f"{inside}/")}

    def make_read_only(self) -> None:
        """readOnlyRootFilesystem, approximated: the root and every host entry in it become
        read-only mounts; volumes, /dev, /proc and /sys keep their own mode."""
        _mount(str(self.path), str(self.path), MS_BIND | MS_REC)  # the root itself as a mount
        _mount("none", str(self.path), MS_REMOUNT | MS_BIND | MS_RDONLY)
        for relative in sorted(self.bound):
            if relative.split("/")[0] not in KERNEL_FILESYSTEMS:
                _mount("none", str(self.path / relative), MS_REMOUNT | MS_BIND | MS_RDONLY)


def _become(user: dict) -> None:
    """Capabilities, groups and ids, in the order the kernel allows."""
    keep = set(user["capabilities"])
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups(user["groups"])
    os.setresgid(user["gid"], user["gid"], user["gid"])
    os.setresuid(user["uid"], user["uid"], user["uid"])
    if user["no_new_privs"]:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # After setresuid, which clears it: the container dies with the agent that started it.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    if os.getppid() != user["agent_pid"]:  # the agent died before that: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def _fail(termination_log: int, message: str, code: int) -> None:
    """Report as the kubelet would: the message in the termination log and on stderr."""
    os.write(termination_log, message.encode())
    print(message, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    os.umask(0o022)  # a container runtime's default, for the mount points made too; the node's is 077
    spec = json.load(sys.stdin)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    # The host-side file behind terminationMessagePath, opened before the chroot hides it.
    termination_log = os.open(spec["termination_log"], os.O_WRONLY | os.O_CLOEXEC)
    root_path = Path(spec["root"])
    try:
        if spec["cgroup"]:  # resource limits: from here on, this process and its children count
            Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
        root = Root(root_path, spec["software"])
        for path in spec["traversable"]:
            root.make_traversable(path)
        for mount in spec["mounts"]:
            root.bind(_source(mount), mount["target"], mount["read_only"])
        if spec["read_only_root"]:
            root.make_read_only()
    except (LaunchError, OSError) as error:
        _fail(termination_log, f"failed to create the container: {error}", 128)
    socket.sethostname(spec["hostname"])
    os.chroot(root_path)
    os.chdir("/")
    _become(spec["user"])
    try:
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as error:
        # What the kubelet would report as a StartError; exit codes follow the shell's.
        _fail(termination_log, f"failed to start {spec['argv'][0]!r}: {error.strerror}",
              127 if isinstance(error, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
