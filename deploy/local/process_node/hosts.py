"""/etc/hosts in place of cluster DNS: one live file per namespace, bind-mounted read-only
into every pod of that namespace, naming each running pod the way cluster DNS would
(`<hostname>.<subdomain>.<namespace>.svc.cluster.local`, shorter forms too). So an Indexed
Job's worker reaches `<job>-0.<service>`, as torchrun's rendezvous does. Service names
themselves are not resolved."""

from __future__ import annotations

import threading
from pathlib import Path

HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def pod_names(pod: dict) -> list[str]:
    meta, spec = pod["metadata"], pod["spec"]
    hostname = spec.get("hostname") or meta["name"]
    subdomain = spec.get("subdomain")
    if not subdomain:
        return [hostname]
    fqdn = f"{hostname}.{subdomain}.{meta['namespace']}.svc.cluster.local"
    return [fqdn, f"{hostname}.{subdomain}.{meta['namespace']}.svc", f"{hostname}.{subdomain}", hostname]


class HostsFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, dict[str, str]] = {}  # namespace -> pod uid -> hosts line
        self._lock = threading.Lock()

    def path(self, namespace: str) -> Path:
        return self.folder / namespace

    def _write(self, namespace: str) -> None:
        path = self.path(namespace)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = HEADER + "".join(self._entries.get(namespace, {}).values())
        # Rewrite in place: pods see this inode through their bind mounts, so never replace it.
        with path.open("a+") as f:
            f.seek(0)
            f.truncate()
            f.write(text)

    def add(self, pod: dict, ip: str) -> Path:
        namespace = pod["metadata"]["namespace"]
        with self._lock:
            self._entries.setdefault(namespace, {})[pod["metadata"]["uid"]] = f"{ip}\t{' '.join(pod_names(pod))}\n"
            self._write(namespace)
        return self.path(namespace)

    def remove(self, pod: dict) -> None:
        namespace = pod["metadata"]["namespace"]
        with self._lock:
            if self._entries.get(namespace, {}).pop(pod["metadata"]["uid"], None) is not None:
                self._write(namespace)
