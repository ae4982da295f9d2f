"""Names resolve as cluster DNS would answer them: `<hostname>.<subdomain>` only once a
headless Service of that name selects the pod, from other namespaces with the namespace
added, and a ClusterIP Service's name leads a client to the pod it selects (to its cluster
IP on a real cluster, to the pod's own IP on the process node, which has no kube-proxy:
what both guarantee is the connection, not the address)."""

from __future__ import annotations

import json

import pytest

from kube import Kube, phase
from pods import field_env, finished, make_pod, terminated

pytestmark = pytest.mark.cluster

LOOKUP_SCRIPT = r"""
import json, socket, sys, time
def lookup(name):
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None
def reach(name):  # what answers on port 8080 of `name`, as a client of the Service sees it
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection((name, 8080), timeout=5) as conn:
                return conn.recv(64).decode()
        except OSError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
def awaited(name, present):  # cluster DNS caches its answers (CoreDNS's TTL): asked again until it changes
    deadline = time.monotonic() + 20
    while (lookup(name) is not None) != present and time.monotonic() < deadline:
        time.sleep(0.2)
    return lookup(name)
def answer(arg):
    if arg.startswith("tcp:"):
        return arg, reach(arg[4:])
    if arg[0] in "+-":  # one that is to resolve (+), or no more (-)
        return arg[1:], awaited(arg[1:], arg[0] == "+")
    return arg, lookup(arg)
open("/dev/termination-log", "w").write(json.dumps(dict(map(answer, sys.argv[1:]))))
"""
WEB_SCRIPT = r"""
import os, socket
server = socket.create_server((os.environ["POD_IP"], 8080))
while True:
    conn, _ = server.accept()
    conn.sendall(os.environ["POD_NAME"].encode())
    conn.close()
"""


def _lookups(kube: Kube, namespace: str, name: str, names: list[str]) -> dict[str, str | None]:
    """The answers to `names` in a pod `name`: an address, or what answers on port 8080 (tcp:), or None. A name
    marked + (or -) is asked until it resolves (or no more), as a real cluster's DNS answers a change within its
    cache's TTL, not at once."""
    kube.apply(make_pod(name, LOOKUP_SCRIPT, container={"args": names}), namespace)
    return json.loads(terminated(kube.wait_pod(namespace, name, finished, "finished"))["message"])


def _service(name: str, headless: bool) -> dict:
    spec = {"selector": {"app": "web"}, "ports": [{"port": 8080}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {**spec, "clusterIP": "None"} if headless else spec}


def test_pod_and_service_names_resolve_as_cluster_dns(kube: Kube, namespace: str, module_namespace: str) -> None:
    web = make_pod("web", WEB_SCRIPT, hostname="web-0", subdomain="peers", metadata={"labels": {"app": "web"}},
                   terminationGracePeriodSeconds=1, container={"env": [
                       {"name": "POD_IP", **field_env("status.podIP")}, {"name": "POD_NAME", **field_env("metadata.name")}]})
    kube.apply(web, namespace)
    ip = kube.wait_pod(namespace, "web", lambda p: phase(p) == "Running", "running")["status"]["podIP"]
    # No Service named like the subdomain yet: the pod's name is not in DNS.
    assert _lookups(kube, namespace, "before", ["web-0.peers", "peers"]) == {"web-0.peers": None, "peers": None}

    kube.apply([_service("peers", headless=True), _service("frontend", headless=False)], namespace)
    same = _lookups(kube, namespace, "after",
                    ["+web-0.peers", "+peers", "tcp:frontend", f"+web-0.peers.{namespace}.svc"])
    assert same == {"web-0.peers": ip, "peers": ip, "tcp:frontend": "web", f"web-0.peers.{namespace}.svc": ip}
    # From another namespace only the names with the namespace resolve.
    other = _lookups(kube, module_namespace, f"from-{namespace}"[:60],
                     ["web-0.peers", f"+web-0.peers.{namespace}", f"+peers.{namespace}.svc.cluster.local",
                      f"tcp:frontend.{namespace}"])
    assert other == {"web-0.peers": None, f"web-0.peers.{namespace}": ip,
                     f"peers.{namespace}.svc.cluster.local": ip, f"tcp:frontend.{namespace}": "web"}

    kube.kubectl("delete", "service", "peers", "-n", namespace)
    assert _lookups(kube, namespace, "gone", ["-web-0.peers"]) == {"web-0.peers": None}
