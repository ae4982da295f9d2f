"""The Helm chart on the local control plane, with a real Prometheus.

One story shares one short training job: `helm install` runs the operator as a pod on the process
node under the chart's ServiceAccount and RBAC (a missing rule fails the job); Prometheus finds the
trainer and the operator through the apiserver with the scrape configs prometheus-operator would make
from the chart's PodMonitor and ServiceMonitor; after the job, every query of the dashboard has data
for it; then `helm upgrade` rolls the operator and `helm uninstall` leaves nothing of ours behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import prometheus_server
from finetune_operator import rbac
from kube import Kube
from operator_fixture import ASSETS, claim, crd_installed, example, free_port  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "grafana"))
import preview  # noqa: E402 (deploy/grafana/preview.py)

CHART = str(REPO / "charts" / "finetune-operator")
DASHBOARD = REPO / "deploy" / "grafana" / "finetune.json"
README = REPO / "README.md"
CRD_FILE = Path("crds") / "finetune.dev_finetunejobs.yaml"
RELEASE = "fto"
SMALL = {"maxTrainSamples": 256, "maxEvalSamples": 64}
TOGGLES = ["serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusScrapeAnnotations.enabled=true",
           "networkPolicy.enabled=true", "dashboards.enabled=true", "crds.templated=true"]
# Kinds whose CRDs (prometheus-operator's) this cluster does not have: the Prometheus below stands in for them.
MONITORS = {"ServiceMonitor", "PodMonitor"}


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def rendered(kube: Kube, namespace: str, *values: str, only: tuple[str, ...] = (),
             release: str = RELEASE) -> list[dict[str, Any]]:
    shown = [arg for path in only for arg in ("--show-only", path)]
    out = kube.helm("template", release, CHART, "-n", namespace, *sets(*values), *shown).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_lint_schema_rbac_and_the_apiserver_accepts_every_toggle(kube: Kube, crd_installed: None,
                                                                  namespace: str) -> None:
    kube.helm("lint", CHART, "--strict")
    kube.helm("lint", CHART, "--strict", *sets(*TOGGLES, "watchNamespaces={a,b}"))
    refused = kube.helm("lint", CHART, *sets("replicas=two"), check=False)
    assert refused.returncode != 0 and "replicas" in refused.stdout + refused.stderr
    assert kube.helm("template", RELEASE, CHART, *sets("watchNamespaces={Not_A_Name}"), check=False).returncode != 0

    # Cluster-wide by default: one ClusterRole holding exactly rbac.RULES; no wildcard, no Secret.
    docs = rendered(kube, namespace)
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert cluster_role["rules"] == rbac.RULES
    for rule in rbac.RULES:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] and "secrets" not in rule["resources"]
    # (Watching namespaces: test_chart.py.)

    # Every toggle on, as the real apiserver sees it (admission and schema included); also under the longest release
    # name Helm takes (53 characters), whose metrics Service was refused: its name had 71 characters, past a DNS label's.
    for release in (RELEASE, "r" * 53):
        docs = rendered(kube, namespace, *TOGGLES, f"watchNamespaces={{{namespace}}}", release=release)
        assert MONITORS <= {d["kind"] for d in docs}
        manifest = yaml.safe_dump_all([d for d in docs if d["kind"] not in MONITORS])
        kube.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-n", namespace, "-f", "-",
                     stdin=manifest)
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["finetune.json"]) == json.loads(DASHBOARD.read_text())


# --- the story: install, a job scraped by Prometheus, upgrade, uninstall --------------------------

def operator_pod(kube: Kube, namespace: str) -> dict[str, Any] | None:
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                   "-o", "json").stdout)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")
               and not p["metadata"].get("deletionTimestamp")]
    return running[0] if len(running) == 1 and len(pods) == 1 else None


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, and the variables' label_values queries."""
    board = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
            assert match, variable["query"]
            found.append((f"variable {variable['name']}", f"group by ({match[2]}) ({match[1]})"))
    return found


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(v[1] not in ("NaN", "+Inf", "-Inf") for r in result for v in r["values"])


@pytest.mark.skipif(not prometheus_server.installed(), reason="Prometheus is not built (`make prometheus`)")
def test_install_scrape_a_job_upgrade_and_uninstall(kube: Kube, crd_installed: None, restricted_namespace: str,
                                                    tmp_path: Path) -> None:
    ns = restricted_namespace
    kube.apply([claim("models", ["ReadOnlyMany"], ASSETS / "models"), claim("data", ["ReadOnlyMany"], ASSETS / "data"),
                claim("results", ["ReadWriteMany"])], ns)
    # The process node runs pods in the host's network: bind the operator to its pod IP, as the chart allows.
    values = [f"watchNamespaces={{{ns}}}", "bindAddress=$(POD_IP)", "pollSeconds=1",
              "trainer.image=finetune-trainer:local", "prometheusScrapeAnnotations.enabled=true"]
    kube.helm("install", RELEASE, CHART, "-n", ns, *sets(*values), "--wait", "--timeout", "120s")
    pod = kube.wait_for("the operator pod running", lambda: operator_pod(kube, ns), ns)
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-finetune-operator"
    ip = pod["status"]["podIP"]
    kube.wait_for("the operator's /healthz", lambda: _answers(f"http://{ip}:8080/healthz"), ns)

    monitoring = {d["kind"]: d for d in rendered(
        kube, ns, *values, "podMonitor.enabled=true", "serviceMonitor.enabled=true",
        only=("templates/podmonitor.yaml", "templates/servicemonitor.yaml", "templates/service.yaml"))}
    # A vanilla Prometheus keeps only the pods annotated for scraping: the operator put the annotation there.
    annotated = {"action": "keep", "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                 "regex": "true"}
    prometheus = prometheus_server.start(tmp_path / "prometheus", [
        prometheus_server.pod_monitor_config(monitoring["PodMonitor"], kube.kubeconfig, [annotated]),
        prometheus_server.service_monitor_config(monitoring["ServiceMonitor"], monitoring["Service"], kube.kubeconfig),
    ], free_port())
    try:
        _run_and_scrape(kube, ns, ip, prometheus)
        _upgrade_rolls_the_operator(kube, ns, values, pod, prometheus)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- prometheus log:\n{prometheus.log.read_text()[-3000:]}") from None
    finally:
        prometheus.stop()
    _uninstall_leaves_nothing(kube, ns)


def _answers(url: str) -> bool:
    try:
        http_get(url)
        return True
    except OSError:
        return False


def _scraped(prometheus: prometheus_server.Prometheus, expr: str) -> bool:
    return bool(prometheus.query_range(expr, time.time() - 2, time.time(), 1))


def _run_and_scrape(kube: Kube, ns: str, operator_ip: str, prometheus: prometheus_server.Prometheus) -> None:
    # The job's first minute (time to Running, the first poll errors) counts only if the operator is already watched.
    kube.wait_for("Prometheus scraping the operator", lambda: _scraped(prometheus, 'up{job="finetune-operator"} == 1'),
                  ns, timeout=60)
    start = time.time()
    good = example("minilm-sentiment", dataset=SMALL)
    # A job whose claim does not exist fails (InvalidSpec) once the 30 s a claim may take to come have passed: the
    # failures panel has something to show.
    broken = example("minilm-sentiment", dataset={"uri": "pvc://nowhere/data.csv"}) | {"metadata": {"name": "no-claim"}}
    kube.apply([good, broken], ns)
    name = good["metadata"]["name"]

    def ftj(job: str) -> dict[str, Any]:
        return kube.get("ftj", job, ns) or {}

    running = kube.wait_for("rank 0 reporting steps", lambda: ftj(name).get("status", {}).get("progress", {})
                            .get("step", 0) >= 1 and ftj(name), ns, timeout=300)
    assert running["status"]["phase"] == "Running"
    rank0 = json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", f"finetune.dev/job-name={name}", "-o",
                                    "json").stdout)["items"][0]
    assert rank0["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for url in (f"http://{rank0['status']['podIP']}:9090/metrics", f"http://{operator_ip}:8000/metrics"):
        assert not (problems := prometheus_server.check_metrics(http_get(url))), f"promtool on {url}:\n{problems}"

    def ended(job: str, phase: str) -> bool:
        status = ftj(job).get("status", {})
        assert status.get("phase") in (None, "Pending", "Running", phase), f"{job}: {status}"
        return status.get("phase") == phase

    kube.wait_for(f"{name} Succeeded", lambda: ended(name, "Succeeded"), ns, timeout=420)
    # The small job can end inside the claim's 30 s.
    failed = kube.wait_for("no-claim Failed", lambda: ended("no-claim", "Failed") and ftj("no-claim"), ns, timeout=60)
    assert failed["status"]["reason"] == "InvalidSpec"
    # The range ends once a point of its 2 s grid sees no-claim's failure scraped (the failures panel): a fixed 4 s
    # sleep missed it whenever the scrape came more than 2 s after the failure, as on a loaded machine.
    def failure_scraped() -> float | None:
        now = time.time()
        return now if has_data(prometheus.query_range("finetune_operator_job_failures_total", start, now)) else None

    end = kube.wait_for("no-claim's failure scraped", failure_scraped, ns, timeout=60)

    # The trainer's series carry the job's name and namespace, from the pod's labels.
    steps = prometheus.query_range(f'finetune_trainer_step{{finetunejob="{name}"}}', start, end)
    assert steps and {s["metric"]["namespace"] for s in steps} == {ns}, steps
    assert {s["metric"]["attempt"] for s in steps} == {"1"}
    # Every query of the dashboard returns data for this job, but the teacher's bar, which only a distilled job has
    # (test_chart checks it against a real Prometheus with a distilled run's series).
    empty = []
    for title, expr in dashboard_queries():
        if 'phase="teacher"' in expr:
            continue
        concrete = preview.fill(expr, ns, name, start, end)
        if not has_data(prometheus.query_range(concrete, start, end)):
            empty.append(f"{title}: {concrete}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    if picture := os.environ.get("FTO_DASHBOARD_PNG"):  # the README's picture, from this run's data
        preview.draw(prometheus.url, ns, name, start, end, Path(picture))


def _upgrade_rolls_the_operator(kube: Kube, ns: str, values: list[str], before: dict[str, Any],
                                prometheus: prometheus_server.Prometheus) -> None:
    kube.helm("upgrade", RELEASE, CHART, "-n", ns, *sets(*values, "pollSeconds=3"), "--wait", "--timeout", "120s")

    def rolled() -> dict[str, Any] | None:
        pod = operator_pod(kube, ns)
        return pod if pod and pod["metadata"]["uid"] != before["metadata"]["uid"] else None

    after = kube.wait_for("a new operator pod", rolled, ns)
    assert env_of(after)["FINETUNE_OPERATOR_POLL_SECONDS"] == "3"
    ip = after["status"]["podIP"]
    kube.wait_for("the new operator's /healthz", lambda: _answers(f"http://{ip}:8080/healthz"), ns)
    # Prometheus follows the Service's endpoints to the new pod.
    query = f'up{{job="finetune-operator", pod="{after["metadata"]["name"]}"}} == 1'
    kube.wait_for("the new operator scraped", lambda: _scraped(prometheus, query), ns, timeout=60)


def _uninstall_leaves_nothing(kube: Kube, ns: str) -> None:
    # Jobs go first, while the operator still runs to release its finalizer.
    kube.kubectl("delete", "ftj", "--all", "-n", ns, "--wait=true", "--timeout=60s")
    kube.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={RELEASE}"

    def left() -> list[str]:
        kinds = ("all,serviceaccounts,roles,rolebindings,configmaps,networkpolicies,endpointslices", "-n", ns)
        # Cluster-wide, this release's only: a release of this name in another namespace (one a failed test left
        # behind) is not this one's to answer for.
        cluster_wide = json.loads(kube.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector,
                                               "-o", "json").stdout)["items"]
        return (kube.kubectl("get", *kinds, "-l", selector, "-o", "name").stdout.split()
                + [f"{o['kind']}/{o['metadata']['name']}" for o in cluster_wide
                   if (o["metadata"].get("annotations") or {}).get("meta.helm.sh/release-namespace") == ns])

    # The operator's pod goes last: the garbage collector deletes it with its ReplicaSet, after its grace period.
    kube.wait_for("nothing of the release left", lambda: not left(), ns, timeout=90)
    assert kube.get("crd", "finetunejobs.finetune.dev") is not None  # Helm keeps CRDs (crds/), as it documents


# --- the CRD upgrades the NOTES and the README give ------------------------------------------------

@pytest.fixture
def own_crd_chart(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A copy of the chart (tmp_path/charts/finetune-operator) whose CRD is under another group, so that Helm really
    creates it: this cluster's FineTuneJob CRD, other tests' jobs', is left alone. Deleted after the test."""
    chart = tmp_path / "charts" / "finetune-operator"
    shutil.copytree(CHART, chart)
    crd = yaml.safe_load((chart / CRD_FILE).read_text())
    crd["spec"]["group"] = group = f"{namespace}.example.com"
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    (chart / CRD_FILE).write_text(yaml.safe_dump(crd))
    yield chart, crd
    kube.kubectl("delete", "crd", crd["metadata"]["name"], "--ignore-not-found", check=False)


def next_chart_s_crd(chart: Path, crd: dict[str, Any]) -> str:
    """The chart's CRD changed as the next chart's would be; the changed description."""
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "the next chart's"
    (chart / CRD_FILE).write_text(yaml.safe_dump(crd))
    return "the next chart's"


def crd_description(kube: Kube, crd: dict[str, Any]) -> str:
    return kube.get("crd", crd["metadata"]["name"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]


def documented_crd_upgrade(source: str, notes: str) -> tuple[str, str]:
    """(command, the folder it runs in) of the CRD upgrade the NOTES or the README give."""
    if source == "NOTES":  # after `helm pull <chart> --untar`, which leaves the chart in finetune-operator/
        found = re.search(r"kubectl apply [^\n]*finetune-operator/crds/", notes.split("Upgrading:")[1])
        return (found[0] if found else ""), "charts"
    found = re.search(r"`(kubectl apply [^`]*charts/finetune-operator/crds/)`", README.read_text())
    return (found[1] if found else ""), "."


@pytest.mark.parametrize("source", ["NOTES", "README"])
def test_the_documented_crd_upgrade_applies_the_next_chart_s_crd_over_helm_s(
        kube: Kube, namespace: str, own_crd_chart: tuple[Path, dict[str, Any]], source: str) -> None:
    """Helm creates crds/ as field manager "helm", so the NOTES' and the README's `kubectl apply --server-side` of
    the next chart's CRD failed on every schema change ("conflict with "helm" ... .spec.versions") and changed
    nothing."""
    chart, crd = own_crd_chart
    try:
        installed = kube.helm("install", RELEASE, str(chart), "-n", namespace, "--set", "replicas=0",
                              "--set", "rbac.create=false").stdout
        command, where = documented_crd_upgrade(source, installed)
        assert command, installed
        wanted = next_chart_s_crd(chart, crd)
        applied = subprocess.run([*kube.kubectl_argv(), *shlex.split(command)[1:]], cwd=chart.parents[1] / where,
                                 capture_output=True, text=True, timeout=60)
        assert applied.returncode == 0, f"{command}:\n{applied.stderr}"
        assert crd_description(kube, crd) == wanted
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)


def test_the_readme_s_switch_to_a_templated_crd_takes_over_an_installed_release_s_crd(
        kube: Kube, namespace: str, own_crd_chart: tuple[Path, dict[str, Any]]) -> None:
    """crds.templated was told for a new install only; set on an installed release, helm upgrade refused the CRD
    that crds/ had made ("exists and cannot be imported into the current release: invalid ownership metadata")."""
    chart, crd = own_crd_chart
    release = "finetune-operator"  # the README's
    try:
        kube.helm("install", release, str(chart), "-n", namespace, "--set", "replicas=0", "--set", "rbac.create=false")
        found = re.search(r"`(helm upgrade [^`]*--set crds\.templated=true[^`]*)`", README.read_text())
        assert found, "the README gives no switch for an installed release"
        command = found[1].replace(" charts/finetune-operator ", f" {chart} ").replace(" finetune-system", f" {namespace}")
        kube.helm(*shlex.split(command)[1:])
        # From now on the release's upgrades bring the next chart's CRD, and uninstalling keeps it.
        wanted = next_chart_s_crd(chart, crd)
        kube.helm("upgrade", release, str(chart), "-n", namespace, "--reuse-values")
        assert crd_description(kube, crd) == wanted
        kube.helm("uninstall", release, "-n", namespace)
        assert kube.get("crd", crd["metadata"]["name"]) is not None
    finally:
        kube.helm("uninstall", release, "-n", namespace, check=False)


# --- a watched namespace deleted with its jobs ----------------------------------------------------

def test_deleting_a_watched_namespace_with_a_live_job_ends(kube: Kube, crd_installed: None, namespace: str) -> None:
    """The namespace controller deletes a watched namespace's contents in no set order: the chart's RoleBinding
    there could go before the operator released its finalizer on the namespace's FineTuneJob, and with it the
    operator's right to patch that FineTuneJob: the job, and so the namespace, stayed Terminating for ever."""
    watched = [f"{namespace}-w{i}" for i in range(3)]
    for name in watched:
        kube.kubectl("create", "namespace", name)
    values = [f"watchNamespaces={{{','.join(watched)}}}", "bindAddress=$(POD_IP)", "pollSeconds=1",
              "trainer.image=finetune-trainer:local"]
    # Pending for the 30 s its missing claim may take to come, and so holding the operator's finalizer.
    job = example("minilm-sentiment", output={"uri": "pvc://nowhere/out"})
    try:
        kube.helm("install", RELEASE, CHART, "-n", namespace, *sets(*values), "--wait", "--timeout", "120s")
        for name in watched:
            kube.apply(job, name)
        for name in watched:
            kube.wait_for(f"the finalizer on {name}'s job", lambda n=name: (kube.get("ftj", job["metadata"]["name"], n)
                          or {}).get("metadata", {}).get("finalizers"), name, timeout=60)
        kube.kubectl("delete", "namespace", *watched, "--wait=false")
        # 11 s on an idle machine (the namespace controller requeues while the jobs' finalizers hold): the bug was
        # for ever, so a bound that a loaded machine's controller keeps to is no weaker.
        kube.wait_for("the watched namespaces gone", lambda: not [n for n in watched if kube.get("namespace", n)],
                      namespace, timeout=180)
    finally:
        for name in watched:  # what a hang left: released by hand, so the namespaces go
            kube.kubectl("patch", "ftj", job["metadata"]["name"], "-n", name, "--type=merge", "-p",
                         '{"metadata": {"finalizers": null}}', check=False)
            kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
        kube.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "120s", check=False)
