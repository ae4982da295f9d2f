"""The node agent: registers the Node, keeps its Lease fresh, and runs the pods bound to it."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from . import downward, kubelet_api
from .cgroups import Cgroups
from .dns import Dns
from .kubeapi import MERGE, STRATEGIC, ApiError, KubeAPI, warning_event
from .network import pod_network
from .provisioner import Provisioner
from .runner import TERMINAL, PodRunner, ended, remove_pod_folders

LEASE_SECONDS = 40  # the kubelet's default
# kcm's --node-monitor-grace-period is 20 s here (cluster.py), so a lost node shows soon:
# renewing every 5 s leaves room for three late renewals.
RENEW_EVERY = 5
STATUS_EVERY = 60
# Says on the Node whether containers' resource limits are enforced here, and if not why.
LIMITS_ANNOTATION = "finetune.dev/resource-limits"
# The kubelet's minimumGracePeriodInSeconds: however a pod is deleted, SIGTERM comes this long before SIGKILL.
MINIMUM_GRACE_SECONDS = 2

log = logging.getLogger("process_node")


def _grace_seconds(pod: dict) -> int:
    """The grace period of a deleted pod's kill, as the kubelet's pod worker and killContainer compute it: the
    deletion's, or where that is 0 or unknown (a force delete) the spec's, and never under MINIMUM_GRACE_SECONDS."""
    deletion = pod["metadata"].get("deletionGracePeriodSeconds")
    return max(MINIMUM_GRACE_SECONDS, deletion or pod["spec"].get("terminationGracePeriodSeconds", 30))


def _may_pass(error: OSError | ApiError) -> bool:
    """Whether a failed request may succeed when sent again: no answer, a 5xx, 408 or 429; another 4xx is for good."""
    return not (isinstance(error, ApiError) and 400 <= error.status < 500 and error.status not in (408, 429))


def _micro_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiCluster:
    """The API reads that volumes and env need (volumes.Cluster)."""

    def __init__(self, api: KubeAPI) -> None:
        self.api = api

    def data(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.api.get(f"/api/v1/namespaces/{namespace}/{kind}s/{name}")
        return None if obj is None else downward.object_data(kind, obj)

    def token(self, pod: dict, audience: str | None, expiration_seconds: int) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName", "default")
        request = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience] if audience else [], "expirationSeconds": expiration_seconds,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}},
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        return self.api.request("POST", path, request)["status"]["token"]

    def claim_path(self, namespace: str, claim: str) -> Path:
        pvc = self.api.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        volume = (pvc or {}).get("spec", {}).get("volumeName")
        pv = self.api.get(f"/api/v1/persistentvolumes/{volume}") if volume else None
        if pv is None or "hostPath" not in pv["spec"]:
            raise downward.ConfigError(f"persistentvolumeclaim {namespace}/{claim} is not bound to a local volume")
        return Path(pv["spec"]["hostPath"]["path"])


class Agent:
    def __init__(self, api: KubeAPI, name: str, state_dir: Path, capacity: dict[str, str],
                 tls: tuple[Path, Path, Path], provisioner: Provisioner | None, taints: list[dict]) -> None:
        self.api, self.name, self.tls = api, name, tls  # tls: serving cert, its key, the client CA
        self.taints = taints
        self.cgroups, self.limits = Cgroups.detect(name)  # limits: how they are enforced, or why not
        self.pods_dir = state_dir / "pods"
        self.allocatable = capacity
        self.cluster = ApiCluster(api)
        self.dns = Dns()
        self.provisioner = provisioner
        venv = Path(sys.prefix)
        self.image_env = {
            # Images are ignored: every container runs from the agent's virtualenv.
            "PATH": f"{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "VIRTUAL_ENV": str(venv),
            "LANG": "C.UTF-8",
        }
        self.service_env = {
            # What in-cluster clients read; the apiserver's cert covers 127.0.0.1.
            "KUBERNETES_SERVICE_HOST": api.host,
            "KUBERNETES_SERVICE_PORT": str(api.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(api.port),
        }
        self.runners: dict[str, PodRunner] = {}  # by pod uid; the kubelet API's threads read it too
        self._runners_lock = threading.Lock()
        # gone pods' runners still stopping (force-deleted: out of self.runners), and their folders' removals: shutdown
        # stops and waits for them
        self._leaving: list[threading.Thread] = []
        self._leaving_lock = threading.Lock()
        self._ips = (pod_network(state_dir) + n for n in itertools.count(1))
        self.stopping = threading.Event()  # set when the agent exits
        self._kubelet_port = 0

    # ------------------------------------------------------------ node and lease

    def _node_status(self) -> dict:
        now = _micro_now().split(".")[0] + "Z"

        def condition(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._started}

        return {"status": {
            "capacity": self.allocatable, "allocatable": self.allocatable,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "process node is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "not measured"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._kubelet_port}},
            "nodeInfo": {"operatingSystem": "linux", "architecture": "amd64", "kubeletVersion": "process-node",
                         "containerRuntimeVersion": "process://local", "kernelVersion": os.uname().release,
                         "osImage": "host processes", "machineID": "", "systemUUID": "", "bootID": "",
                         "kubeProxyVersion": ""},
        }}

    def register(self) -> None:
        self._started = _micro_now().split(".")[0] + "Z"
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "finetune.dev/node-kind": "process"}
        annotations = {LIMITS_ANNOTATION: self.limits if self.cgroups else f"not enforced: {self.limits}"}
        self.api.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "spec": {"taints": self.taints},
                         "metadata": {"name": self.name, "labels": labels, "annotations": annotations}},
                         missing_ok=True)
        node = self.api.request("PATCH", f"/api/v1/nodes/{self.name}/status", self._node_status(), STRATEGIC)
        lease = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}]},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro_now()},
        }
        self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease, missing_ok=True)
        log.info("registered node %s with %s; resource limits: %s", self.name, self.allocatable,
                 annotations[LIMITS_ANNOTATION])

    def _heartbeat(self) -> None:
        """Renew the Lease often and re-post the Ready status now and then, as the kubelet does."""
        last_status = time.monotonic()
        while not self.stopping.wait(RENEW_EVERY):
            try:
                self.api.request("PATCH", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}",
                                 {"spec": {"renewTime": _micro_now()}}, MERGE)
                if time.monotonic() - last_status > STATUS_EVERY:
                    self.api.request("PATCH", f"/api/v1/nodes/{self.name}/status", self._node_status(), STRATEGIC)
                    last_status = time.monotonic()
            except (OSError, ApiError) as error:
                log.warning("heartbeat failed: %s", error)

    # ------------------------------------------------------------ pods

    def _patch_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        body = {"metadata": {"uid": meta["uid"]}, "status": status}  # the uid is a precondition
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        self.api.request("PATCH", path, body, STRATEGIC, missing_ok=True)

    def publish_status(self, pod: dict, status: dict) -> bool:
        """Whether the API needs it no more: it has it, the pod is gone (404), or the API refuses it for good (another
        4xx: a pod deleted by force and made again under its name refuses the old one's uid, 422), where a retry
        would be refused for ever. Only a failure that may pass (no answer, a 5xx, 408, 429) is False."""
        try:
            self._patch_status(pod, status)
            return True
        except (OSError, ApiError) as error:
            meta = pod["metadata"]
            log.warning("pod %s/%s: status update failed: %s", meta["namespace"], meta["name"], error)
            return not _may_pass(error)

    def warn(self, pod: dict, reason: str, message: str) -> None:
        """A Warning Event about the pod, as the kubelet records one (FailedMount, ...); lost if the API refuses."""
        try:
            self.api.request("POST", f"/api/v1/namespaces/{pod['metadata']['namespace']}/events",
                             warning_event(pod, "Pod", reason, message, "kubelet"))
        except (ApiError, OSError) as error:
            log.warning("pod %s: event %s not recorded: %s", pod["metadata"]["name"], reason, error)

    def delete_pod(self, pod: dict) -> None:
        """The kubelet's final delete, once the containers are gone."""
        if self.stopping.is_set():
            return  # the agent is exiting: like a stopped kubelet, leave pod objects alone
        meta = pod["metadata"]
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                   "preconditions": {"uid": meta["uid"]}}
        self.api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", options,
                         missing_ok=True)

    def _finish_deletion(self, pod: dict, known: dict | None = None) -> None:
        """The final delete of a pod no runner ends (first seen deleting, or its runner ended), its end sent first as
        the kubelet sends it: a Job counts a deleted pod only once it is terminal. From `known`, the status its ended
        runner last sent, where there is one: the event's may be older (a delete seen after the runner's Succeeded
        carried Running, and the pod was ended Failed, 137, over its success). Raises where either failed in a way
        that may pass: the watch then lists the pods again, and this is tried anew (an end refused for good would
        stop the relist there at every try)."""
        status = known or pod.get("status", {})
        if status.get("phase") not in TERMINAL and not self.stopping.is_set():
            try:
                self._patch_status(pod, ended(pod, status))
            except ApiError as error:
                if _may_pass(error):
                    raise
                log.warning("pod %s: its end was refused: %s", pod["metadata"]["name"], error)
        self.delete_pod(pod)

    def _sync(self, pod: dict) -> None:
        meta = pod["metadata"]
        with self._runners_lock:
            runner = self.runners.get(meta["uid"])
        deleting = "deletionTimestamp" in meta
        terminal = pod.get("status", {}).get("phase") in TERMINAL
        if deleting:
            if runner is None or not runner.stop(_grace_seconds(pod)):  # nothing runs (any more): finish it at once
                self._finish_deletion(pod, runner.published() if runner else None)
        elif runner is None and not terminal:
            runner = PodRunner(self, pod, str(next(self._ips)), self.pods_dir)
            with self._runners_lock:
                self.runners[meta["uid"]] = runner
            runner.start()

    def _synced(self, pod: dict) -> ApiError | OSError | None:
        """_sync, its failure returned (one that may pass: a status the API cannot take now)."""
        try:
            self._sync(pod)
        except (ApiError, OSError) as error:
            return error
        return None

    def _find_log(self, namespace: str, pod: str, container: str,
                  previous: bool) -> tuple[Path, Callable[[], bool]] | None:
        with self._runners_lock:
            runners = [r for r in self.runners.values()
                       if (r.pod["metadata"]["namespace"], r.pod["metadata"]["name"]) == (namespace, pod)]
        return runners[-1].log_of(container, previous) if runners else None  # the newest pod of that name

    def _forget(self, pod: dict) -> None:
        """The pod object is gone (force-deleted, or our final delete): stop what still runs, within the grace period a
        kubelet gives it, and remove what the pod left (its runner does once it ends, if it still runs). Its DNS entry
        goes at once, still running or not, before the watch's next event: a pod made again under its hostname (the
        next attempt's rank 0) must not resolve to this one's address, as a real cluster drops a gone pod's endpoint.
        Its folders go on a thread of their own: on the watch's, a large folder held up every other pod's events; a
        pod made again has another uid, so another folder."""
        meta = pod["metadata"]
        with self._runners_lock:
            runner = self.runners.pop(meta["uid"], None)
        # stopped before its entry goes, so that a runner making the pod's volumes adds it back no more
        stopping = runner is not None and runner.stop(_grace_seconds(pod))
        self.dns.remove_pod(pod)  # before the folders: a later rewrite of the node's hosts files made its file again
        if stopping:
            self._leave(runner)
        else:
            self._remove_folders([self.pods_dir / meta["uid"]], f"clean-up {meta['namespace']}/{meta['name']}")

    def _leave(self, thread: threading.Thread) -> None:
        with self._leaving_lock:
            self._leaving = [t for t in self._leaving if t.is_alive()] + [thread]

    def _remove_folders(self, folders: list[Path], name: str) -> None:
        """remove_pod_folders on a thread of its own, which shutdown waits for: a node that exited midway left a
        folder half removed."""
        def remove() -> None:
            for folder in folders:
                remove_pod_folders(folder)

        removal = threading.Thread(target=remove, name=name, daemon=True)
        self._leave(removal)
        removal.start()

    def _sweep(self, listed: set[str]) -> None:
        """Remove the folders of pods no longer bound here, left by a node that exited (or was killed) before it
        removed them: every folder but those of the pods listed, which live on (the node restarted: each runs again
        in its folder, or waits, ended, for its deletion)."""
        try:
            stale = [folder for folder in self.pods_dir.iterdir() if folder.name not in listed]
        except FileNotFoundError:
            return  # no pod ever ran here
        except OSError as error:  # raised on the watch's thread, it held every pod back, for good, unsaid in them
            log.warning("pod folders not swept: %s", error)
            return
        if stale:
            self._remove_folders(stale, "clean-up of pod folders left behind")

    def clean_up(self, pod: dict) -> None:
        """Remove what a gone pod left on the node: its DNS entry, then its folders (the other way round, a rewrite of
        the node's hosts files in between made its folder's hosts file again)."""
        self.dns.remove_pod(pod)
        remove_pod_folders(self.pods_dir / pod["metadata"]["uid"])

    def _watch_pods(self) -> None:
        pods = f"/api/v1/pods?fieldSelector={quote(f'spec.nodeName={self.name}')}"
        swept = False
        while not self.stopping.is_set():
            try:
                listing = self.api.request("GET", pods)
                listed = {pod["metadata"]["uid"] for pod in listing["items"]}
                if not swept:  # at the first list alone: after it, gone pods' folders are _forget's to remove
                    self._sweep(listed)
                    swept = True
                failed = [error for pod in listing["items"] if (error := self._synced(pod))]
                if failed:  # tried again at the next list, once the others are: one pod held up every pod after it
                    raise failed[0]
                with self._runners_lock:
                    gone = [r.pod for uid, r in self.runners.items() if uid not in listed]
                for pod in gone:  # deleted while we relisted
                    self._forget(pod)
                for event in self.api.watch(f"{pods}&resourceVersion={listing['metadata']['resourceVersion']}"):
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if event["type"] == "DELETED":
                        self._forget(event["object"])
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._sync(event["object"])
            except (OSError, ApiError) as error:
                log.warning("pod watch failed, retrying: %s", error)
                time.sleep(1)

    def _watch_services(self) -> None:
        """Every Service, for the DNS names of this node's pods."""
        while not self.stopping.is_set():
            try:
                listing = self.api.request("GET", "/api/v1/services")
                self.dns.set_services(listing["items"])
                for event in self.api.watch(f"/api/v1/services?resourceVersion={listing['metadata']['resourceVersion']}"):
                    if event["type"] == "ERROR":
                        break
                    self.dns.service_event(event["type"], event["object"])
            except (OSError, ApiError) as error:
                log.warning("service watch failed, retrying: %s", error)
                time.sleep(1)

    def shutdown(self, grace_seconds: float = 5.0) -> None:
        """Stop every pod's processes (SIGTERM, then SIGKILL) before the agent exits, force-deleted pods' still
        stopping too (their processes outlived the node), and let the removals of gone pods' folders under way end,
        within the grace period (what is left then, the next start sweeps)."""
        self.stopping.set()
        # one deadline for it all: the runners' joins, then the removals', took up to twice the grace, past the 10 s
        # that `cluster.py down` gives the node before its SIGKILL
        deadline = time.monotonic() + grace_seconds + 2
        with self._runners_lock, self._leaving_lock:
            runners = [*self.runners.values(), *(t for t in self._leaving if isinstance(t, PodRunner))]
            removals = [t for t in self._leaving if not isinstance(t, PodRunner)]
        for runner in runners:
            if runner.is_alive():
                runner.stop(grace_seconds)
        for thread in (*runners, *removals):
            thread.join(max(0.0, deadline - time.monotonic()))

    def run(self) -> None:
        """Serve until stopped; whatever ends it (an error, a signal), the pods end first."""
        try:
            self._kubelet_port = kubelet_api.serve(self._find_log, *self.tls)
            self.register()
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
            threading.Thread(target=self._watch_services, name="services", daemon=True).start()
            if self.provisioner is not None:
                threading.Thread(target=self.provisioner.run, args=(self.stopping,),
                                 name="local-path provisioner", daemon=True).start()
            self._watch_pods()
        finally:
            self.shutdown()
