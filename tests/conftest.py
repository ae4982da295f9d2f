"""Shared fixtures.

Cluster tests (marked `cluster`) run against the real local control plane of deploy/local:
the session starts its own once, in .cluster-test/ (FTO_CLUSTER_DIR), and stops it at the
end; never `make cluster-up`'s or `make demo`'s (.cluster/). A KUBECONFIG from the
environment is refused unless it is that local cluster's or FTO_TEST_CLUSTER names its
cluster (kube.chosen_kubeconfig). Each test gets its own namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube import LOCAL, Kube, RefusedCluster, chosen_kubeconfig, local_cluster, one_session

REPO = Path(__file__).resolve().parents[1]
# The tests' servers are all on loopback (127/8: the pods' addresses too), which urllib sent to an http(s)_proxy of the
# environment that no_proxy does not name, as no_proxy cannot name a range (cluster.open_url, with a TLS context).
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`long` tests run only when asked for (`-m long`); the default run has their short versions."""
    if "long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a long run: select it with -m long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """The session's own local cluster (FTO_CLUSTER_DIR, default .cluster-test/), or KUBECONFIG's when allowed.

    Not the one `make cluster-up` or `make demo` leaves running in .cluster/: the tests restart its etcd and
    apiserver, add nodes and charts, under the demo's job. A cluster a killed session left in the folder is
    stopped and a fresh one started; one session at a time uses a folder (a second stopped the first's cluster
    under it, at its end).
    """
    bin_dir = local_cluster.bin_dir()
    state = Path(os.environ.get("FTO_CLUSTER_DIR", REPO / ".cluster-test"))
    paths = local_cluster.Cluster(state.resolve(), bin_dir)
    try:
        kubeconfig = chosen_kubeconfig(os.environ, paths.kubeconfig)
    except RefusedCluster as refused:
        pytest.exit(str(refused), returncode=4)
    if kubeconfig is not None:
        yield Kube(kubeconfig, bin_dir if (bin_dir / "kubectl").exists() else None, None)
        return
    with one_session(state):
        if state.exists() and any(local_cluster.running(paths).values()):
            local_cluster.down(state)  # a killed session's: its state is no test's to build on
        try:
            # a fresh, loaded 2-core machine came close to the default 90 s
            cluster = local_cluster.up(state, timeout=300)
        except local_cluster.ClusterError as error:
            pytest.fail(f"could not start the local cluster: {error}", pytrace=False)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)  # for clients that read it (kopf, kubernetes)
        try:
            yield Kube(cluster.kubeconfig, bin_dir, cluster.state)
        finally:
            del os.environ["KUBECONFIG"]
            local_cluster.down(state)


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
