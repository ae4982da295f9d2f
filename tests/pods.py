"""Pods, claims and their results, as the process node's tests write and read them."""

from __future__ import annotations

from pathlib import Path

from kube import Kube, phase

REPO = Path(__file__).resolve().parents[1]
HOST_PATH = "local.finetune.dev/host-path"  # the process node's claim annotation, see deploy/local

RESTRICTED = {  # what the restricted Pod Security Standard demands of a container, and a non-root uid
    "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}
HOLD = "finetune.dev/test-hold"  # a finalizer that keeps a deleted pod readable until the test lets go


def make_pod(name: str, script: str, **spec: object) -> dict:
    """A pod whose one container, `main`, runs a Python script; `container` and `metadata`
    are merged into theirs, the rest into the pod's spec."""
    container = {"name": "main", "image": "ignored.example/python:3.11", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def terminated(pod: dict, container: str = "main") -> dict:
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    return status["state"].get("terminated") or {}


def finished(pod: dict) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def field_env(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def make_claim(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}


def claim_volume(kube: Kube, namespace: str, claim: str) -> str:
    """The PersistentVolume's name, once the process node's provisioner bound the claim."""
    def bound() -> dict | None:
        pvc = kube.get("pvc", claim, namespace)
        return pvc if pvc and pvc["status"].get("phase") == "Bound" else None

    return kube.wait_for(f"claim {claim} bound", bound, namespace)["spec"]["volumeName"]


def claim_folder(kube: Kube, namespace: str, claim: str) -> Path:
    """The local folder behind a claim."""
    return Path(kube.get("pv", claim_volume(kube, namespace, claim))["spec"]["hostPath"]["path"])




def release(kube: Kube, namespace: str, name: str) -> None:
    """Let a pod held by the HOLD finalizer go."""
    kube.kubectl("patch", "pod", name, "-n", namespace, "--type=json",
                 "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]', check=False)


def condition_of(pod: dict, kind: str) -> dict:
    return next((c for c in pod.get("status", {}).get("conditions", []) if c["type"] == kind), {})
