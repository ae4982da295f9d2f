"""Values a pod sees of itself: env (valueFrom, envFrom, $(VAR) expansion) and the
downward API, resolved the way the kubelet resolves them."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable

from kubernetes.utils import parse_quantity

# (kind, namespace, name) -> the object's `data` as bytes, or None when it does not exist.
Lookup = Callable[[str, str, str], "dict[str, bytes] | None"]


class ConfigError(Exception):
    """The pod references something that is missing; the kubelet's CreateContainerConfigError."""


def field_value(pod: dict, path: str) -> str:
    """A fieldRef: metadata.name, metadata.labels['k'], status.podIP, ..."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return meta.get(match[1], {}).get(match[2], "")
    if path in ("metadata.labels", "metadata.annotations"):  # whole maps: downward API volumes only
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs", [])),
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return values[path]


def resource_value(container: dict, ref: dict, allocatable: dict[str, str]) -> str:
    """A resourceFieldRef such as limits.cpu; an unset limit falls back to the node's allocatable."""
    kind, name = ref["resource"].split(".", 1)
    resources = container.get("resources", {})
    quantity = resources.get(kind, {}).get(name) or (allocatable.get(name, "0") if kind == "limits" else "0")
    divisor = parse_quantity(ref.get("divisor") or "1") or 1  # the API defaults an unset divisor to "0"
    return str(math.ceil(parse_quantity(quantity) / divisor))


def key_value(lookup: Lookup, kind: str, namespace: str, ref: dict) -> str | None:
    """configMapKeyRef / secretKeyRef; None when optional and missing."""
    data = lookup(kind, namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"{kind} {namespace}/{ref['name']} (key {ref['key']!r}) not found")
    return data[ref["key"]].decode()


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined vars are replaced, `$$` escapes, the rest stay."""
    return _VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def container_env(pod: dict, container: dict, lookup: Lookup, allocatable: dict[str, str],
                  services: dict[str, str]) -> dict[str, str]:
    """The environment the kubelet gives the container: the service variables, then envFrom,
    then env (later wins). $(VAR) sees only these, never the image's or the runtime's (PATH, HOME)."""
    namespace = pod["metadata"]["namespace"]
    env = dict(services)
    for source in container.get("envFrom", []):
        kind = "configmap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source["secretRef"]
        data = lookup(kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind} {namespace}/{ref['name']} not found")
        env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
    for var in container.get("env", []):
        value_from = var.get("valueFrom")
        if value_from is None:
            value: str | None = expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            value = field_value(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            value = resource_value(container, value_from["resourceFieldRef"], allocatable)
        elif "configMapKeyRef" in value_from:
            value = key_value(lookup, "configmap", namespace, value_from["configMapKeyRef"])
        elif "secretKeyRef" in value_from:
            value = key_value(lookup, "secret", namespace, value_from["secretKeyRef"])
        else:
            raise ConfigError(f"unsupported valueFrom for env {var['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


def object_data(kind: str, obj: dict) -> dict[str, bytes]:
    """A ConfigMap's data and binaryData, or a Secret's (base64) data, as bytes."""
    if kind == "secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data
