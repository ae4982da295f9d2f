"""A local-path volume provisioner: each PersistentVolumeClaim of the `local-path`
StorageClass gets a hostPath PersistentVolume at <volumes root>/<namespace>/<claim>, a
predictable folder a person can fill before a pod mounts it. A claim annotated
`local.finetune.dev/host-path: /abs/folder` gets that existing folder instead (say, the
models that `make assets` put in .data/pvc/models), so nothing big is copied; only folders
inside the volumes root or one of the allowed host-path roots are honoured. Released
volumes are deleted, with their folder only if it lies in the volumes root.

It acts as its own user (a real provisioner's service account), not as the node: the Node
authorizer lets a node read only the claims of its pods, and create no volumes."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from .kubeapi import ApiError, KubeAPI, warning_event

PROVISIONER = "finetune.dev/local-path"
HOST_PATH_ANNOTATION = "local.finetune.dev/host-path"
POLL_SECONDS = 1.0

log = logging.getLogger("process_node")


class Provisioner:
    def __init__(self, api: KubeAPI, root: Path, host_path_roots: list[Path]) -> None:
        self.api, self.root = api, root.resolve()
        self.allowed = [self.root, *(r.resolve() for r in host_path_roots)]
        self._refused: set[str] = set()  # claim uids already told why not (once is enough)

    def _folder(self, pvc: dict) -> Path | None:
        """Where the claim's volume lives; None (and an event) for a refused annotation."""
        meta = pvc["metadata"]
        chosen = meta.get("annotations", {}).get(HOST_PATH_ANNOTATION)
        if not chosen:
            return self.root / meta["namespace"] / meta["name"]
        folder = Path(chosen).resolve()  # symlinks and .. cannot lead outside
        if Path(chosen).is_absolute() and any(folder.is_relative_to(r) for r in self.allowed):
            return folder
        self._event(pvc, "ProvisioningFailed",
                    f"annotation {HOST_PATH_ANNOTATION}: {chosen} is not inside an allowed root "
                    f"({', '.join(map(str, self.allowed))})")
        return None

    def _event(self, pvc: dict, reason: str, message: str) -> None:
        meta = pvc["metadata"]
        self._refused.add(meta["uid"])
        event = warning_event(pvc, "PersistentVolumeClaim", reason, message, PROVISIONER)
        self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        log.warning("claim %s/%s: %s", meta["namespace"], meta["name"], message)

    def _provision(self, pvc: dict) -> None:
        meta, spec = pvc["metadata"], pvc["spec"]
        folder = self._folder(pvc)
        if folder is None:
            return
        if folder.is_relative_to(self.root):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)  # as rancher's local-path-provisioner: any pod user may write
        elif not folder.is_dir():
            self._event(pvc, "ProvisioningFailed", f"{folder} is not an existing folder")
            return
        pv = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec["accessModes"],
                "hostPath": {"path": str(folder), "type": "Directory"},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.get("storageClassName"),
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                # Pre-bound: kcm's PV controller completes the binding on both sides.
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                             "name": meta["name"], "uid": meta["uid"]},
            },
        }
        self.api.request("POST", "/api/v1/persistentvolumes", pv, missing_ok=True)
        log.info("provisioned %s for claim %s/%s", folder, meta["namespace"], meta["name"])

    def _reclaim(self, pv: dict) -> None:
        folder = Path(pv["spec"]["hostPath"]["path"]).resolve()
        if folder.is_relative_to(self.root) and folder != self.root:  # never delete anything we did not create
            shutil.rmtree(folder, ignore_errors=True)
        self.api.request("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", missing_ok=True)
        log.info("deleted released volume %s", folder)

    def sync_once(self) -> None:
        pvs = self.api.request("GET", "/api/v1/persistentvolumes")["items"]
        ours = [pv for pv in pvs
                if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER]
        for pv in ours:
            if pv.get("status", {}).get("phase") == "Released":
                self._reclaim(pv)
        claimed = {pv["spec"].get("claimRef", {}).get("uid") for pv in pvs}
        for pvc in self.api.request("GET", "/api/v1/persistentvolumeclaims")["items"]:
            meta = pvc["metadata"]
            # kcm's PV controller sets this annotation when the claim's class names us.
            wants_us = meta.get("annotations", {}).get("volume.kubernetes.io/storage-provisioner") == PROVISIONER
            pending = pvc.get("status", {}).get("phase") == "Pending" and not pvc["spec"].get("volumeName")
            refused = meta["uid"] in self._refused
            if wants_us and pending and not refused and meta["uid"] not in claimed and "deletionTimestamp" not in meta:
                self._provision(pvc)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(POLL_SECONDS):
            try:
                self.sync_once()
            except (OSError, ApiError) as error:
                log.warning("provisioner: %s", error)
