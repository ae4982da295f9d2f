"""A container's securityContext (over the pod's), as the process node applies it: the
uid, gid and groups its processes run as, the capabilities they keep, no_new_privs and a
read-only root. The kubelet's own checks (runAsNonRoot) refuse to start a container."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from .downward import ConfigError

CAPABILITIES = [  # bit number = position, as in linux/capability.h
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
]
# What containerd and CRI-O give a container unless told otherwise.
RUNTIME_DEFAULT = {
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
}


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: list[int]
    capabilities: list[int]  # bit numbers kept in the bounding set
    no_new_privs: bool
    read_only_root: bool

    @property
    def home(self) -> str:
        """HOME as a runtime sets it: the user's home in the image's passwd, else /."""
        try:
            return pwd.getpwuid(self.uid).pw_dir
        except KeyError:
            return "/"

    def launcher_user(self) -> dict:
        return {"uid": self.uid, "gid": self.gid, "groups": self.groups, "capabilities": self.capabilities,
                "no_new_privs": self.no_new_privs, "agent_pid": os.getpid()}


def _capability_names(container: str, field: str, names: list[str]) -> set[str]:
    found = {n.upper().removeprefix("CAP_") for n in names}
    unknown = sorted(found - set(CAPABILITIES) - {"ALL"})
    if unknown:
        raise ConfigError(f"container {container}: securityContext.capabilities.{field}: unknown {unknown}")
    return set(CAPABILITIES) if "ALL" in found else found


def identity(pod: dict, container: dict) -> Identity:
    """Who the container runs as; ConfigError (CreateContainerConfigError) when the kubelet refuses."""
    pod_context = pod["spec"].get("securityContext") or {}
    context = container.get("securityContext") or {}

    def setting(key: str, default: object) -> object:
        return context.get(key, pod_context.get(key, default))

    name = container["name"]
    uid, gid = setting("runAsUser", None), setting("runAsGroup", 0)
    if setting("runAsNonRoot", False):  # the kubelet's messages, word for word
        if uid is None:
            raise ConfigError(f"container has runAsNonRoot and image will run as root "
                              f"(pod: {pod['metadata']['name']!r}, container: {name})")
        if uid == 0:
            raise ConfigError(f"container's runAsUser breaks non-root policy "
                              f"(pod: {pod['metadata']['name']!r}, container: {name})")
    groups = set(pod_context.get("supplementalGroups", []))
    if "fsGroup" in pod_context:
        groups.add(pod_context["fsGroup"])
    capabilities = context.get("capabilities") or {}
    if context.get("privileged"):
        kept = set(CAPABILITIES)
    else:
        kept = RUNTIME_DEFAULT - _capability_names(name, "drop", capabilities.get("drop", []))
        kept |= _capability_names(name, "add", capabilities.get("add", []))
    return Identity(
        uid=uid or 0, gid=int(gid), groups=sorted(groups),
        capabilities=sorted(CAPABILITIES.index(c) for c in kept),
        no_new_privs=context.get("allowPrivilegeEscalation") is False,
        read_only_root=bool(context.get("readOnlyRootFilesystem", False)),
    )
