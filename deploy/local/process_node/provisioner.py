"""A local-path volume provisioner: each PersistentVolumeClaim of the `local-path`
StorageClass gets a hostPath PersistentVolume at <volumes root>/<namespace>/<claim>, a
predictable folder a person can fill before a pod mounts it. A claim annotated
`local.finetune.dev/host-path: /abs/folder` gets that existing folder instead (say, the
models that `make assets` put in .data/pvc/models), so nothing big is copied.
Released volumes are deleted, with their folder only if we created it."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from .kubeapi import ApiError, KubeAPI

PROVISIONER = "finetune.dev/local-path"
HOST_PATH_ANNOTATION = "local.finetune.dev/host-path"
POLL_SECONDS = 1.0

log = logging.getLogger("process_node")


def _provision(api: KubeAPI, pvc: dict, root: Path) -> None:
    meta, spec = pvc["metadata"], pvc["spec"]
    chosen = meta.get("annotations", {}).get(HOST_PATH_ANNOTATION)
    folder = Path(chosen) if chosen else root / meta["namespace"] / meta["name"]
    folder.mkdir(parents=True, exist_ok=True)
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec["accessModes"],
            "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec.get("storageClassName"),
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            # Pre-bound: kcm's PV controller completes the binding on both sides.
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]},
        },
    }
    api.request("POST", "/api/v1/persistentvolumes", pv, missing_ok=True)
    log.info("provisioned %s for claim %s/%s", folder, meta["namespace"], meta["name"])


def _reclaim(api: KubeAPI, pv: dict, root: Path) -> None:
    folder = Path(pv["spec"]["hostPath"]["path"])
    if folder.is_relative_to(root):  # never delete anything we did not create
        shutil.rmtree(folder, ignore_errors=True)
    api.request("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", missing_ok=True)
    log.info("deleted released volume %s", folder)


def sync_once(api: KubeAPI, root: Path) -> None:
    pvs = api.request("GET", "/api/v1/persistentvolumes")["items"]
    ours = [pv for pv in pvs if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER]
    for pv in ours:
        if pv.get("status", {}).get("phase") == "Released":
            _reclaim(api, pv, root)
    claimed = {pv["spec"].get("claimRef", {}).get("uid") for pv in pvs}
    for pvc in api.request("GET", "/api/v1/persistentvolumeclaims")["items"]:
        meta = pvc["metadata"]
        # kcm's PV controller sets this annotation when the claim's class names us.
        wants_us = meta.get("annotations", {}).get("volume.kubernetes.io/storage-provisioner") == PROVISIONER
        pending = pvc.get("status", {}).get("phase") == "Pending" and not pvc["spec"].get("volumeName")
        if wants_us and pending and meta["uid"] not in claimed and "deletionTimestamp" not in meta:
            _provision(api, pvc, root)


def run(api: KubeAPI, root: Path, stopping: threading.Event) -> None:
    while not stopping.wait(POLL_SECONDS):
        try:
            sync_once(api, root)
        except (OSError, ApiError) as error:
            log.warning("provisioner: %s", error)
