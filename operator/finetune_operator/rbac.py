"""The operator's permissions, in one place: the tests' ServiceAccount, the chart and the plain
manifests all take these rules. Each rule names the handler code that needs it, and
tests/test_cluster_security.py checks them against what the operator asks the apiserver for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune_operator import api

CHART_RULES = Path("charts/finetune-operator/files/rbac-rules.yaml")
CHART_FINALIZER_RULES = Path("charts/finetune-operator/files/rbac-finalizer-rules.yaml")
CHART_LEASE_RULES = Path("charts/finetune-operator/files/rbac-lease-rules.yaml")

RULES: list[dict[str, Any]] = [
    # kopf lists and watches FineTuneJobs; patch: its finalizer and annotations; delete: ttlSecondsAfterFinished
    {"apiGroups": [api.GROUP], "resources": [api.PLURAL], "verbs": ["list", "watch", "patch", "delete"]},
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["patch"]},
    # never a request: where OwnerReferencesPermissionEnforcement admits the children's blockOwnerDeletion
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/finalizers"], "verbs": ["update"]},
    # the attempt's children (indexed by kopf); delete: suspend, deadline (the rest goes by owner references);
    # get: whose a child is that already exists; delete: earlier attempts' ConfigMaps and Services, and the Jobs of
    # all but the last EARLIER_JOBS_KEPT, each read first by its name (handlers._drop_earlier)
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["get", "create", "delete"]},
    # the pods' exit codes, termination messages, scheduling and rank 0's IP (indexed by kopf); patch: the deadline
    # of one whose trainer has exited that injected containers keep running (reconcile._stop_outlived)
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "patch"]},
    # the claims the spec names: they exist, and their access modes fit the workers
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    # Events on every transition (kopf posts core/v1 Events); list: why a Job has no pods (FailedCreate), why a pod's
    # containers are not created (FailedMount)
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]


# Watching some namespaces, these alone are also granted cluster-wide: a watched namespace being deleted loses its
# contents in no set order, its Role and RoleBinding of RULES too, and when they went before the operator released its
# finalizer on a FineTuneJob there, the job and the namespace stayed Terminating for ever. The FineTuneJobs' watch
# stream, authorized when it opened, still brings the deletion; only the patch that releases the finalizer needs this.
FINALIZER_RULES: list[dict[str, Any]] = [{"apiGroups": [api.GROUP], "resources": [api.PLURAL], "verbs": ["patch"]}]


def lease_rules(name: str) -> list[dict[str, Any]]:
    """In the operator's own namespace: the Lease `name` that makes one replica the active one (leader.py), and no
    other (a controller's in the same namespace). create cannot be limited to a name (it is in the request's body)."""
    def leases(**more: list[str]) -> dict[str, Any]:
        return {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], **more}

    return [leases(verbs=["create"]), leases(resourceNames=[name], verbs=["get", "update"])]


LEASE_NAME = "${LEASE_NAME}"  # in the chart's copy, which puts the release's in its place
LEASE_RULES = lease_rules(LEASE_NAME)


def role(kind: str, name: str, namespace: str | None = None, rules: list[dict[str, Any]] = RULES) -> dict[str, Any]:
    """A ClusterRole (watching every namespace) or a Role (one watched namespace) holding `rules`."""
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules}


def render_rules(rules: list[dict[str, Any]]) -> str:
    """Rules as the chart's templates include them (a generated file, checked for drift like the CRD)."""
    header = "# Generated from operator/finetune_operator/rbac.py by `make crds`: do not edit.\n"
    return header + yaml.safe_dump(rules, sort_keys=False)
