"""Shared fixtures.

Cluster tests (marked `cluster`) run against the real local control plane of deploy/local:
the session starts it once, or reuses the one already running there. A KUBECONFIG from the
environment is refused unless it is that local cluster's or FTO_TEST_CLUSTER names its
cluster (kube.chosen_kubeconfig). Each test gets its own namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube import Kube, RefusedCluster, chosen_kubeconfig

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "deploy" / "local"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`long` tests run only when asked for (`-m long`); the default run has their short versions."""
    if "long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a long run: select it with -m long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def _local_cluster():
    sys.path.insert(0, str(LOCAL))
    import cluster  # deploy/local/cluster.py

    return cluster


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """The local cluster (FTO_CLUSTER_DIR, default .cluster/), or KUBECONFIG's when allowed.

    A local cluster that already runs (`make cluster-up`) is reused and left running; one this
    session starts is stopped at the end.
    """
    local = _local_cluster()
    bin_dir = local.bin_dir()
    state = Path(os.environ.get("FTO_CLUSTER_DIR", REPO / ".cluster"))
    try:
        kubeconfig = chosen_kubeconfig(os.environ, local.Cluster(state.resolve(), bin_dir).kubeconfig)
    except RefusedCluster as refused:
        pytest.exit(str(refused), returncode=4)
    if kubeconfig is not None:
        yield Kube(kubeconfig, bin_dir if (bin_dir / "kubectl").exists() else None, None)
        return
    was_running = state.exists() and all(local.running(local.Cluster(state.resolve(), bin_dir)).values())
    try:
        cluster = local.up(state, timeout=300)  # a fresh, loaded 2-core machine came close to the default 90 s
    except local.ClusterError as error:
        pytest.fail(f"could not start the local cluster: {error}", pytrace=False)
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)  # for clients that read it (kopf, kubernetes)
    try:
        yield Kube(cluster.kubeconfig, bin_dir, cluster.state)
    finally:
        del os.environ["KUBECONFIG"]
        if not was_running:
            local.down(state)


def _new_namespace(kube: Kube, request: pytest.FixtureRequest, labels: dict[str, str]) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:5]}"
    kube.kubectl("create", "namespace", name)
    if labels:
        kube.kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
    # Pods are refused until the service-account controller made `default`.
    kube.wait_for("the default service account", lambda: kube.get("serviceaccount", "default", name), name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    yield from _new_namespace(kube, request, {})


@pytest.fixture(scope="module")
def module_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """One namespace shared by a module's tests (for tests that create nothing in it)."""
    yield from _new_namespace(kube, request, {})


@pytest.fixture
def restricted_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace that enforces the restricted Pod Security Standard."""
    yield from _new_namespace(kube, request, {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    })


@pytest.fixture
def host_folder() -> Iterator[Path]:
    """A folder under .data/pvc (where claims may point with the host-path annotation), removed after."""
    folder = REPO / ".data" / "pvc" / f"test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)
