"""Cluster DNS, approximated with one /etc/hosts per pod (bind-mounted read-only, rewritten
in place whenever Services or pods change). It holds what CoreDNS would answer, cluster-wide
(pods of every node, not only of this one):

- the pod's own name, as the kubelet writes it (`<hostname>.<subdomain>.<ns>.svc.cluster.local`);
- for each Service with a selector, in any namespace, its ready endpoints: the pods it selects
  that have an IP, are not finished, and are ready and not terminating (or any of them, with
  `publishNotReadyAddresses`): `<service>.<ns>.svc.cluster.local`, `<service>.<ns>.svc` and
  `<service>.<ns>` (plain `<service>` within its own namespace) name them; and for a headless
  Service, a pod with `hostname` whose `subdomain` is that Service is also
  `<hostname>.<service>[.<ns>...]`.

CoreDNS reads those endpoints from the EndpointSlices that kube-controller-manager writes, but
here there are none: the apiserver refuses endpoint addresses in 127.0.0.0/8, and every pod IP
here is one (kcm logs "may not be in the loopback range" for each Service). So this applies the
EndpointSlice controller's rules (podToEndpoint) to the pods themselves. The node's own identity
may list only its own pods, so the agent reads Services and pods as the DNS's own user, as
CoreDNS has its own service account (manifests/cluster-dns-rbac.yaml).

Without kube-proxy a ClusterIP is unreachable, so a Service name leads straight to one of
its pods: a client must use the pod's port (targetPort). Search domains do not apply to
/etc/hosts, so each short form is listed explicitly.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
DOMAIN = "svc.cluster.local"
KINDS = ("services", "pods")  # what the answers are made of, cluster-wide


@dataclass
class _Pod:
    pod: dict
    ip: str
    hosts_file: Path
    written: str = ""

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


def _endpoint(service: dict, pod: dict) -> tuple[str, str | None] | None:
    """(ip, hostname) of a pod of the Service's namespace if it is a ready endpoint of the Service, as the
    EndpointSlice controller writes it (podToEndpoint), else None."""
    spec, status = pod["spec"], pod.get("status", {})
    if not _selects(service, pod) or not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    if not (service["spec"].get("publishNotReadyAddresses") or (ready and "deletionTimestamp" not in pod["metadata"])):
        return None
    # The controller gives an endpoint a hostname only for a pod whose subdomain is the Service.
    return status["podIP"], (spec.get("hostname") if spec.get("subdomain") == service["metadata"]["name"] else None)


def own_names(pod: dict) -> list[str]:
    """The kubelet's /etc/hosts line for the pod itself."""
    meta, spec = pod["metadata"], pod["spec"]
    hostname = spec.get("hostname") or meta["name"]
    if not spec.get("subdomain"):
        return [hostname]
    return [f"{hostname}.{spec['subdomain']}.{meta['namespace']}.{DOMAIN}", hostname]


class Dns:
    def __init__(self) -> None:
        self._pods: dict[str, _Pod] = {}  # this node's, by uid: the files to write
        # Every Service and pod of the cluster, by kind, then (namespace, name).
        self._objects: dict[str, dict[tuple[str, str], dict]] = {kind: {} for kind in KINDS}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ changes

    def add_pod(self, pod: dict, ip: str, hosts_file: Path) -> None:
        with self._lock:
            self._pods[pod["metadata"]["uid"]] = _Pod(pod, ip, hosts_file)
            self._write_all()

    def remove_pod(self, pod: dict) -> None:
        with self._lock:
            if self._pods.pop(pod["metadata"]["uid"], None) is not None:
                self._write_all()

    def set_objects(self, kind: str, objects: list[dict]) -> None:
        """The whole list of `kind` (after a relist)."""
        with self._lock:
            self._objects[kind] = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
            self._write_all()

    def object_event(self, kind: str, event: str, obj: dict) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            if event == "DELETED":
                self._objects[kind].pop(key, None)
            else:
                self._objects[kind][key] = obj
            self._write_all()

    # ------------------------------------------------------------ the files

    def _ready_endpoints(self) -> dict[tuple[str, str], list[tuple[str, str | None]]]:
        """(ip, hostname) of each Service's ready endpoints, by (namespace, service)."""
        pods: dict[str, list[dict]] = defaultdict(list)
        for (namespace, _), pod in sorted(self._objects["pods"].items()):
            pods[namespace].append(pod)
        return {(namespace, name): [e for pod in pods[namespace] if (e := _endpoint(service, pod))]
                for (namespace, name), service in self._objects["services"].items()}

    def _answers(self, own_namespace: str, ready: dict) -> list[tuple[str, list[str]]]:
        """(ip, names) that cluster DNS gives a pod of `own_namespace`."""
        lines = []
        for (namespace, name), service in sorted(self._objects["services"].items()):
            headless = service["spec"].get("clusterIP") == "None"
            endpoints = ready.get((namespace, name), [])
            for ip, hostname in endpoints if headless else endpoints[:1]:
                names = _forms(name, namespace, own_namespace)
                if headless and hostname:
                    names = _forms(f"{hostname}.{name}", namespace, own_namespace) + names
                lines.append((ip, names))
        return lines

    def _write_all(self) -> None:
        ready = self._ready_endpoints()
        for record in self._pods.values():
            lines = [(record.ip, own_names(record.pod)), *self._answers(record.namespace, ready)]
            text = HEADER + "".join(f"{ip}\t{' '.join(names)}\n" for ip, names in lines)
            if text == record.written:
                continue  # pods of the whole cluster change often: a reader should not catch a needless rewrite
            record.written = text
            # Rewrite in place: containers see this inode through their bind mounts.
            with record.hosts_file.open("a+") as f:
                f.seek(0)
                f.truncate()
                f.write(text)
            record.hosts_file.chmod(0o644)
