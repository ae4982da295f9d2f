"""Pod volumes as folders on this machine, and the bind mounts that show them to a
container at its mountPaths. Contents are written once, when the pod starts; with an
fsGroup, volumes are handed to that group as the kubelet does.

A container may put symlinks in its writable volumes (emptyDir, claims) that, followed by
the node (root, on the host), would lead to the node's own files: walking a volume never
follows one, and a subPath never leads out of the volume (as the kubelet's subpath package)."""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .downward import ConfigError, field_value, resource_value
from .launcher import LaunchError, open_beneath

# The kubelet always mounts these read-only.
READ_ONLY_KINDS = {"configMap", "secret", "projected", "downwardAPI"}


class Cluster(Protocol):
    """What volumes need from the API (implemented in agent.py)."""

    def data(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None: ...
    def token(self, pod: dict, audience: str | None, expiration_seconds: int) -> str: ...
    def claim_path(self, namespace: str, claim: str) -> Path: ...


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    sub_path: str | None = None  # in the folder `source`, symlinks resolved

    def as_dict(self) -> dict:
        return asdict(self)


def _kind(volume: dict) -> str:
    return next(k for k in volume if k != "name")


def _keys(cluster: Cluster, kind: str, namespace: str, name: str, items: list[dict] | None,
          optional: bool) -> dict[str, bytes]:
    """The files of a configMap/secret volume: all keys, or the listed items at their paths."""
    data = cluster.data(kind, namespace, name)
    if data is None:
        if optional:
            return {}
        raise ConfigError(f"{kind} {namespace}/{name} not found")
    if not items:
        return data
    missing = [i["key"] for i in items if i["key"] not in data]
    if missing and not optional:
        raise ConfigError(f"{kind} {namespace}/{name} has no key(s) {missing}")
    return {i["path"]: data[i["key"]] for i in items if i["key"] in data}


def _downward_files(pod: dict, items: list[dict], allocatable: dict[str, str]) -> dict[str, bytes]:
    files = {}
    for item in items:
        if "fieldRef" in item:
            files[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
        else:
            ref = item["resourceFieldRef"]
            container = next(c for c in pod["spec"]["containers"] if c["name"] == ref.get("containerName"))
            files[item["path"]] = resource_value(container, ref, allocatable).encode()
    return files


def _projected_files(pod: dict, sources: list[dict], cluster: Cluster, allocatable: dict[str, str]) -> dict[str, bytes]:
    namespace = pod["metadata"]["namespace"]
    files: dict[str, bytes] = {}
    for source in sources:
        if "configMap" in source or "secret" in source:
            kind = "configmap" if "configMap" in source else "secret"
            ref = source.get("configMap") or source["secret"]
            files |= _keys(cluster, kind, namespace, ref["name"], ref.get("items"), ref.get("optional", False))
        elif "downwardAPI" in source:
            files |= _downward_files(pod, source["downwardAPI"].get("items", []), allocatable)
        elif "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            files[token["path"]] = cluster.token(
                pod, token.get("audience"), token.get("expirationSeconds", 3600)).encode()
        else:
            raise ConfigError(f"unsupported projected source {sorted(source)}")
    return files


def _item_modes(sources: list[dict | None]) -> dict[str, int]:
    """The items' own `mode`s by path (configMap, secret, downwardAPI): over the defaultMode."""
    return {i["path"]: i["mode"] for source in sources for i in (source or {}).get("items") or [] if "mode" in i}


def _write_files(folder: Path, files: dict[str, bytes], mode: int, modes: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the node's own umask is 077; containers of any uid read these
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        path.write_bytes(content)
        path.chmod(modes.get(relative, mode))


def set_ownership(folder: Path, fs_group: int, read_only: bool, policy: str | None) -> None:
    """The kubelet's fsGroup handling (volume.SetVolumeOwnership): every file and folder gets
    group fs_group and group read (and write unless read-only); folders get setgid, so new
    files inherit the group. Bits are only ever added. OnRootMismatch skips a volume whose
    top folder already looks done: its group, setgid and the group bits this mount needs, as the
    kubelet's requiresPermissionChange (a folder a read-only mount handed over is not writable)."""
    mask = 0o440 if read_only else 0o660
    top = folder.stat()
    wanted = mask | 0o110
    if (policy == "OnRootMismatch" and top.st_gid == fs_group and top.st_mode & stat.S_ISGID
            and top.st_mode & wanted == wanted):
        return
    # Never into a symlink, even one swapped in meanwhile; the volume's own folder is the node's (a claim's may be one).
    for _, _, files, folder_fd in os.fwalk(os.path.realpath(folder)):
        for name in [".", *files]:  # each folder as its own "."
            _hand_over(folder_fd, name, fs_group, mask)


def _hand_over(folder_fd: int, name: str, fs_group: int, mask: int) -> None:
    """set_ownership for one entry of a folder, unless it is a symlink: it is opened without following one, and
    changed through that descriptor, so one swapped in meanwhile is not followed either."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    try:
        info = os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            return
        mode = stat.S_IMODE(info.st_mode) | mask
        if stat.S_ISDIR(info.st_mode):
            mode |= stat.S_ISGID | 0o110
        elif info.st_mode & 0o100:
            mode |= 0o110
        entry = f"/proc/self/fd/{fd}"  # an O_PATH descriptor takes no fchown/fchmod; its /proc link does
        os.chown(entry, -1, fs_group)
        os.chmod(entry, mode)
    finally:
        os.close(fd)


def materialize(pod: dict, pod_dir: Path, cluster: Cluster, allocatable: dict[str, str]) -> dict[str, Path]:
    """Create every volume of the pod; returns each one's folder by volume name."""
    namespace = pod["metadata"]["namespace"]
    security = pod["spec"].get("securityContext") or {}
    folders = {}
    for volume in pod["spec"].get("volumes", []):
        kind, source = _kind(volume), volume[_kind(volume)]
        folder = pod_dir / "volumes" / volume["name"]
        mode = source.get("defaultMode", 0o644) if isinstance(source, dict) else 0o644
        if kind == "emptyDir":
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)  # as the kubelet makes it
        elif kind == "persistentVolumeClaim":
            folder = cluster.claim_path(namespace, source["claimName"])
        elif kind == "hostPath":
            folder = Path(source["path"])
            if source.get("type") == "DirectoryOrCreate":
                folder.mkdir(parents=True, exist_ok=True)
        elif kind in ("configMap", "secret"):
            name = source["name"] if kind == "configMap" else source["secretName"]
            files = _keys(cluster, kind.lower(), namespace, name, source.get("items"), source.get("optional", False))
            _write_files(folder, files, mode, _item_modes([source]))
        elif kind == "downwardAPI":
            _write_files(folder, _downward_files(pod, source.get("items", []), allocatable), mode, _item_modes([source]))
        elif kind == "projected":
            sources = source.get("sources", [])
            _write_files(folder, _projected_files(pod, sources, cluster, allocatable), mode, _item_modes(
                [s.get("configMap") or s.get("secret") or s.get("downwardAPI") for s in sources]))
        else:
            raise ConfigError(f"volume {volume['name']}: {kind} volumes are not supported by the process node")
        # hostPath volumes are never touched, as with the kubelet; our claims count as local
        # volumes (whose ownership the kubelet does manage), though their PVs are hostPath.
        if "fsGroup" in security and kind != "hostPath":
            read_only = kind in READ_ONLY_KINDS or bool(source.get("readOnly"))
            set_ownership(folder, security["fsGroup"], read_only, security.get("fsGroupChangePolicy"))
        folders[volume["name"]] = folder
    return folders


def prepare_sub_path(volume: Path, sub_path: str) -> tuple[str, str]:
    """The volume's folder and the subPath in it, symlinks resolved, as the kubelet prepares one: a symlink on the
    way may lead elsewhere in the volume, never out of it. Missing folders are made like the volume's top, one part
    at a time and never through a symlink (nor is the subPath mounted through one: see launcher.open_beneath)."""
    top = Path(os.path.realpath(volume))
    target = Path(os.path.realpath(top / sub_path))
    if not target.is_relative_to(top):
        raise ConfigError("it leads out of the volume")
    relative = str(target.relative_to(top))
    os.close(open_beneath(str(top), relative, top.stat()))
    return str(top), relative


def _sub_path_mount(volume: Path, vm: dict, container: str, read_only: bool) -> Mount:
    try:
        top, sub_path = prepare_sub_path(volume, vm["subPath"])
    except (ConfigError, LaunchError, OSError) as error:  # CreateContainerConfigError, as the kubelet says it
        raise ConfigError(f"failed to prepare subPath {vm['subPath']!r} for volumeMount {vm['name']!r} of "
                          f"container {container!r}: {error}") from None
    return Mount(top, vm["mountPath"], read_only, sub_path)


def container_mounts(pod: dict, container: dict, folders: dict[str, Path]) -> list[Mount]:
    kinds = {v["name"]: _kind(v) for v in pod["spec"].get("volumes", [])}
    mounts = []
    for vm in container.get("volumeMounts", []):
        read_only = vm.get("readOnly", False) or kinds[vm["name"]] in READ_ONLY_KINDS
        if vm.get("subPath"):
            mounts.append(_sub_path_mount(folders[vm["name"]], vm, container["name"], read_only))
        else:
            mounts.append(Mount(str(folders[vm["name"]]), vm["mountPath"], read_only))
    return mounts
