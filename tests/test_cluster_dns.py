"""Names resolve as cluster DNS would answer them: `<hostname>.<subdomain>` only once a
headless Service of that name selects the pod, from other namespaces with the namespace
added, and Service names lead to the pods they select."""

from __future__ import annotations

import json

import pytest

from kube import Kube, phase
from pods import finished, make_pod, terminated

pytestmark = pytest.mark.cluster

LOOKUP_SCRIPT = r"""
import json, socket, sys
def lookup(name):
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None
open("/dev/termination-log", "w").write(json.dumps({name: lookup(name) for name in sys.argv[1:]}))
"""


def _lookups(kube: Kube, namespace: str, name: str, names: list[str]) -> dict[str, str | None]:
    kube.apply(make_pod(name, LOOKUP_SCRIPT, container={"args": names}), namespace)
    return json.loads(terminated(kube.wait_pod(namespace, name, finished, "finished"))["message"])


def _service(name: str, headless: bool) -> dict:
    spec = {"selector": {"app": "web"}, "ports": [{"port": 8080}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {**spec, "clusterIP": "None"} if headless else spec}


def test_pod_and_service_names_resolve_as_cluster_dns(kube: Kube, namespace: str, module_namespace: str) -> None:
    web = make_pod("web", "import time; time.sleep(600)", hostname="web-0", subdomain="peers",
                   metadata={"labels": {"app": "web"}}, terminationGracePeriodSeconds=1)
    kube.apply(web, namespace)
    ip = kube.wait_pod(namespace, "web", lambda p: phase(p) == "Running", "running")["status"]["podIP"]
    # No Service named like the subdomain yet: the pod's name is not in DNS.
    assert _lookups(kube, namespace, "before", ["web-0.peers", "peers"]) == {"web-0.peers": None, "peers": None}

    kube.apply([_service("peers", headless=True), _service("frontend", headless=False)], namespace)
    same = _lookups(kube, namespace, "after", ["web-0.peers", "peers", "frontend", f"web-0.peers.{namespace}.svc"])
    assert same == {"web-0.peers": ip, "peers": ip, "frontend": ip, f"web-0.peers.{namespace}.svc": ip}
    # From another namespace only the names with the namespace resolve.
    other = _lookups(kube, module_namespace, f"from-{namespace}"[:60],
                     ["web-0.peers", f"web-0.peers.{namespace}", f"peers.{namespace}.svc.cluster.local",
                      f"frontend.{namespace}"])
    assert other == {"web-0.peers": None, f"web-0.peers.{namespace}": ip,
                     f"peers.{namespace}.svc.cluster.local": ip, f"frontend.{namespace}": ip}

    kube.kubectl("delete", "service", "peers", "-n", namespace)
    assert _lookups(kube, namespace, "gone", ["web-0.peers"]) == {"web-0.peers": None}
