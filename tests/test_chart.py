"""The chart's generated parts without a cluster: the plain manifests and the dashboard.

(The CRD, the RBAC rules and the dashboard's two copies are checked for drift with the CRD, in
test_crd.py, through `finetune_operator.generate`.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator import dashboard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "manifests"))
import render  # noqa: E402 (deploy/manifests/render.py)

METRICS = {"finetune_trainer_" + n for n in ("loss", "learning_rate", "step", "total_steps", "samples_per_second",
                                             "tokens_per_second", "stage", "eval_metric", "gpu_memory_bytes", "mfu")}


def helm() -> str:
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    import cluster  # deploy/local/cluster.py

    path = cluster.bin_dir() / "helm"
    if not path.exists():
        pytest.skip("helm is not built yet (`make k8s-binaries`)")
    return str(path)


def test_plain_manifests_are_the_chart_rendered() -> None:
    assert render.main(["--check", "--helm", helm()]) == 0, "run `make manifests`"
    docs = [d for d in yaml.safe_load_all(render.OUT.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "CustomResourceDefinition" in kinds
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"} <= set(kinds)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_the_dashboard_has_the_four_rows_and_reads_only_shared_metric_names() -> None:
    board = json.loads(dashboard.render())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Job: $namespace/$job", "Evaluation: $namespace/$job", "Operator"]
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "job"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"finetune_\w+", e)}
    assert METRICS <= {re.sub(r"_(bucket|count)$", "", m) for m in used}
    trainer = [e for e in exprs if "finetune_trainer_" in e and "gpu_memory_bytes > bool" not in e]
    assert all('finetunejob="$job"' in e for e in trainer), "every per-job panel selects the job"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")
