"""Helm against the real cluster: lint, template and install a small chart whose Job runs
on the process node. The chart's kubeVersion constraint also proves the apiserver reports
a real version (the build's -X ldflags)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kube import Kube

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parent / "fixtures" / "charts" / "smoke"


def test_helm_lint_template_install(kube: Kube, namespace: str) -> None:
    kube.helm("lint", str(CHART), "--strict")
    rendered = kube.helm("template", "smoke", str(CHART), "-n", namespace, "--set", "message=templated").stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert kinds == ["ConfigMap", "Job"]
    kube.helm("install", "smoke", str(CHART), "-n", namespace, "--set", "message=installed",
              "--wait", "--wait-for-jobs", "--timeout", "90s")
    assert "STATUS: deployed" in kube.helm("status", "smoke", "-n", namespace).stdout
    config = kube.get("configmap", "smoke-config", namespace)
    assert config["data"]["message"] == "installed"
    kube.helm("uninstall", "smoke", "-n", namespace, "--wait")
    assert kube.get("configmap", "smoke-config", namespace) is None
