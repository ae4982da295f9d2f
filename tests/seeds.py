"""Valid FineTuneJob manifests to start from: the examples, the README's, and one that sets every
field a user may pass through to the trainer pods (the fuzzer mutates them; the security tests
put hostile values into each pass-through field)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from bad_corpus import readme_manifests

EXAMPLES = sorted((Path(__file__).parents[1] / "deploy" / "examples").glob("*.yaml"))

# Every field of runtime and pod, each with a value the apiserver accepts.
EVERY_PASS_THROUGH: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "every-field", "labels": {"team": "a"}, "annotations": {"note": "seed"}},
    "spec": {
        "model": {"uri": "pvc://models/all-MiniLM-L6-v2", "task": "sequence-classification", "revision": "main"},
        "dataset": {"uri": "pvc://data/sentiment/sentiment.csv", "labelField": "sentiment", "maxTrainSamples": 64},
        "output": {"uri": "pvc://results/every-field"},
        "runtime": {
            "workers": 1,
            "processesPerWorker": 1,
            "image": "registry.example/trainer:1",
            "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "2Gi"}},
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token", "optional": True}}},
                    {"name": "MODE", "value": "fast"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "SETTING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}],
            "envFrom": [{"prefix": "HUB_", "secretRef": {"name": "hub", "optional": True}},
                        {"configMapRef": {"name": "settings"}}],
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
                        {"name": "extra", "persistentVolumeClaim": {"claimName": "extra", "readOnly": True}},
                        {"name": "conf", "configMap": {"name": "settings", "optional": True}},
                        {"name": "keys", "secret": {"secretName": "hub", "optional": True}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                             {"name": "extra", "mountPath": "/extra", "readOnly": True, "subPath": "part"},
                             {"name": "conf", "mountPath": "/etc/settings", "readOnly": True},
                             {"name": "keys", "mountPath": "/etc/keys", "readOnly": True}],
            "shmSize": "2Gi",
        },
        "pod": {
            "labels": {"app.kubernetes.io/part-of": "research"},
            "annotations": {"example.com/owner": "team a"},
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "schedulerName": "default-scheduler",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                             "tolerationSeconds": 60},
                            {"key": "", "operator": "Exists", "effect": ""}],  # every taint, as core/v1 spells it too
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu-mem", "operator": "Gt", "values": ["40"]}]}]},
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 10, "preference": {"matchExpressions": [
                            {"key": "zone", "operator": "In", "values": ["a", "b"]}]}}]},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 50, "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname", "namespaces": ["team-a"],
                        "labelSelector": {"matchExpressions": [{"key": "finetune.dev/job-name", "operator": "Exists"}]},
                        "namespaceSelector": {"matchLabels": {"team": "a"}}}}]},
            },
            "priorityClassName": "training",
            "terminationGracePeriodSeconds": 300,
        },
        "suspend": False,
        "backoffLimit": 2,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 60,
    },
}


def seed_manifests() -> list[dict[str, Any]]:
    """Deep copies of every valid manifest the project shows."""
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES] + readme_manifests() + [EVERY_PASS_THROUGH]
    return [copy.deepcopy(d) for d in docs]
