"""Cluster DNS, approximated with one /etc/hosts per pod (bind-mounted read-only, rewritten
in place when a change of Services or pods changes its text). It holds what cluster DNS would answer:

- the pod's own name, as the kubelet writes it (`<hostname>.<subdomain>.<ns>.svc.cluster.local`);
- for each Service with a selector, in any namespace, the pods of this node it selects that
  are ready (a terminating pod is not), or all of them, with `publishNotReadyAddresses`:
  `<service>.<ns>.svc.cluster.local`, `<service>.<ns>.svc` and `<service>.<ns>` (plain
  `<service>` within its own namespace) name them; and for a headless Service, a pod with
  `hostname` whose `subdomain` is that Service is also `<hostname>.<service>[.<ns>...]`.

Without kube-proxy a ClusterIP is unreachable, so a Service name leads straight to one of
its pods: a client must use the pod's port (targetPort). Search domains do not apply to
/etc/hosts, so each short form is listed explicitly.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
DOMAIN = "svc.cluster.local"


@dataclass
class _Pod:
    pod: dict
    ip: str
    hosts_file: Path
    ready: bool = False
    written: bytes | None = None  # the file's text as last written here

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]


def _forms(name: str, namespace: str, own_namespace: str) -> list[str]:
    """The names by which a pod in `own_namespace` may ask for `name` of `namespace`."""
    forms = [f"{name}.{namespace}.{DOMAIN}", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
    return forms + [name] if namespace == own_namespace else forms


def _selects(service: dict, pod: dict) -> bool:
    selector = service["spec"].get("selector")
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_hostname(pod: dict) -> str:
    """The pod's hostname as the kubelet gives it: a pod's name can be longer than a hostname's 63 characters, and is
    cut (truncatePodHostnameIfNeeded)."""
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")


def own_names(pod: dict) -> list[str]:
    """The kubelet's /etc/hosts line for the pod itself."""
    meta, spec = pod["metadata"], pod["spec"]
    hostname = pod_hostname(pod)
    if not spec.get("subdomain"):
        return [hostname]
    return [f"{hostname}.{spec['subdomain']}.{meta['namespace']}.{DOMAIN}", hostname]


class Dns:
    def __init__(self) -> None:
        self._pods: dict[str, _Pod] = {}  # by uid
        self._services: dict[tuple[str, str], dict] = {}  # by (namespace, name)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ changes

    def add_pod(self, pod: dict, ip: str, hosts_file: Path) -> None:
        with self._lock:
            self._pods[pod["metadata"]["uid"]] = _Pod(pod, ip, hosts_file)
            self._write_all()

    def set_ready(self, pod: dict, ready: bool) -> None:
        with self._lock:
            record = self._pods.get(pod["metadata"]["uid"])
            if record is not None and record.ready != ready:
                record.ready = ready
                self._write_all()

    def remove_pod(self, pod: dict) -> None:
        with self._lock:
            if self._pods.pop(pod["metadata"]["uid"], None) is not None:
                self._write_all()

    def set_services(self, services: list[dict]) -> None:
        """The whole list (after a relist)."""
        with self._lock:
            self._services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
            self._write_all()

    def service_event(self, kind: str, service: dict) -> None:
        key = (service["metadata"]["namespace"], service["metadata"]["name"])
        with self._lock:
            if kind == "DELETED":
                self._services.pop(key, None)
            else:
                self._services[key] = service
            self._write_all()

    # ------------------------------------------------------------ the files

    def _answers(self, own_namespace: str) -> list[tuple[str, list[str]]]:
        """(ip, names) that cluster DNS gives a pod of `own_namespace`."""
        lines = []
        for (namespace, name), service in sorted(self._services.items()):
            publish_not_ready = service["spec"].get("publishNotReadyAddresses", False)
            headless = service["spec"].get("clusterIP") == "None"
            endpoints = [p for p in self._pods.values()
                         if p.namespace == namespace and _selects(service, p.pod)
                         and (p.ready or publish_not_ready)]
            for endpoint in endpoints if headless else endpoints[:1]:
                names = _forms(name, namespace, own_namespace)
                spec = endpoint.pod["spec"]
                if headless and spec.get("hostname") and spec.get("subdomain") == name:
                    names = _forms(f"{spec['hostname']}.{name}", namespace, own_namespace) + names
                lines.append((endpoint.ip, names))
        return lines

    def _write_all(self) -> None:
        """Write each pod's file whose text changed: many changes (a pod turning ready that no Service selects, a
        Service that selects none of this node's pods) change none, and each write is a moment a lookup may read torn.
        The answers depend on the asker's namespace only, so they are made once a namespace."""
        answers = {namespace: self._answers(namespace) for namespace in {p.namespace for p in self._pods.values()}}
        for record in self._pods.values():
            lines = [(record.ip, own_names(record.pod)), *answers[record.namespace]]
            text = (HEADER + "".join(f"{ip}\t{' '.join(names)}\n" for ip, names in lines)).encode()
            if text != record.written:
                _write_in_place(record.hosts_file, text)
                record.written = text


def _write_in_place(path: Path, text: bytes) -> None:
    # In place, as containers see this inode through their bind mounts (a file renamed over it would not show): over
    # the old text, then cut to length, never emptied first, so a lookup meanwhile finds the pod's own name (its line
    # never changes) and, but for a read torn by the write itself, any other that stays. A shorter text is padded
    # with blank lines (which resolvers skip) to the old one's length: the old text's tail, cut mid-line, would read
    # as a wrong address until the cut.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644), "wb") as f:
        f.write(text.ljust(os.fstat(f.fileno()).st_size, b"\n"))
        f.truncate(len(text))
    path.chmod(0o644)
