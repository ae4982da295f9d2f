"""A real Prometheus on loopback for the chart's tests (built by deploy/local/build-prometheus.sh).

It discovers targets through the apiserver (`kubernetes_sd_configs`) with the scrape configs that
prometheus-operator would generate from the chart's PodMonitor and ServiceMonitor: the same
selectors, port names and relabelings, taken from the rendered objects, so a wrong relabeling
in the chart shows up as a missing label here.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kube import terminate

SCRAPE_INTERVAL = "1s"  # the monitors' intervals, shortened so a short job leaves many samples
RELABEL_KEYS = {"sourceLabels": "source_labels", "targetLabel": "target_label", "separator": "separator",
                "regex": "regex", "replacement": "replacement", "action": "action", "modulus": "modulus"}


BUILD = Path(__file__).resolve().parents[1] / "deploy" / "local" / "build-prometheus.sh"


def bin_dir() -> Path:
    return Path(subprocess.run([str(BUILD), "--print-bin-dir"], check=True, capture_output=True, text=True).stdout.strip())


def installed() -> bool:
    return (bin_dir() / "prometheus").exists() and (bin_dir() / "promtool").exists()


def _label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector_keeps(selector: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """A label selector as keep rules on the discovered object's labels (as prometheus-operator writes them)."""
    keeps: list[dict[str, Any]] = []
    for key, value in selector.get("matchLabels", {}).items():
        keeps.append({"action": "keep", "source_labels": [f"{prefix}_label_{_label(key)}", f"{prefix}_labelpresent_{_label(key)}"],
                      "regex": f"({value});true"})
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "Exists", f"not emulated: {expr}"
        keeps.append({"action": "keep", "source_labels": [f"{prefix}_labelpresent_{_label(expr['key'])}"], "regex": "true"})
    return keeps


def _namespaces(selector: dict[str, Any], own: str) -> dict[str, Any]:
    if selector.get("any"):
        return {}
    return {"namespaces": {"names": selector.get("matchNames") or [own]}}


def _scrape_config(monitor: dict[str, Any], role: str, endpoint: dict[str, Any], kubeconfig: Path,
                   relabel: list[dict[str, Any]]) -> dict[str, Any]:
    spec, meta = monitor["spec"], monitor["metadata"]
    return {
        "job_name": f"{monitor['kind']}/{meta['namespace']}/{meta['name']}",
        "scrape_interval": SCRAPE_INTERVAL,
        "metrics_path": endpoint.get("path", "/metrics"),
        "kubernetes_sd_configs": [{"role": role, "kubeconfig_file": str(kubeconfig),
                                   **_namespaces(spec.get("namespaceSelector", {}), meta["namespace"])}],
        "relabel_configs": relabel,
    }


def pod_monitor_config(monitor: dict[str, Any], kubeconfig: Path, extra: list[dict[str, Any]]) -> dict[str, Any]:
    """`extra` rules go before the monitor's own relabelings (e.g. a vanilla Prometheus's annotation keep)."""
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    return _scrape_config(monitor, "pod", endpoint, kubeconfig, [
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        *_selector_keeps(monitor["spec"]["selector"], "__meta_kubernetes_pod"),
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"]},
        *extra,
        *({RELABEL_KEYS[k]: v for k, v in rule.items()} for rule in endpoint.get("relabelings", [])),
    ])


def from_file(config: dict[str, Any], targets: Path) -> dict[str, Any]:
    """A monitor's scrape config over pods described in a file_sd file (their `__meta_kubernetes_pod_*` labels
    given by hand) instead of discovered: its relabelings checked without a cluster."""
    config = dict(config)
    del config["kubernetes_sd_configs"]
    return config | {"file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}


def file_pod_monitor_config(monitor: dict[str, Any], targets: Path) -> dict[str, Any]:
    return from_file(pod_monitor_config(monitor, targets, []), targets)


def service_monitor_config(monitor: dict[str, Any], service: dict[str, Any], kubeconfig: Path) -> dict[str, Any]:
    """The ServiceMonitor's targets: the pods its Service selects, on the Service port's target port.

    prometheus-operator would read them from the Service's EndpointSlices; here the apiserver refuses
    to put the process node's loopback pod IPs in those, so the pod role finds the same pods through
    the Service's selector, and the Service's own labels (jobLabel, its name) are added as it would.
    """
    spec = monitor["spec"]
    endpoint = spec["endpoints"][0]
    port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    static = {"service": service["metadata"]["name"], "job": service["metadata"]["name"]}
    if spec.get("jobLabel"):
        static["job"] = service["metadata"]["labels"][spec["jobLabel"]]
    return _scrape_config(monitor, "pod", endpoint, kubeconfig, [
        *_selector_keeps({"matchLabels": service["spec"]["selector"]}, "__meta_kubernetes_pod"),
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port["targetPort"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        *({"target_label": label, "replacement": value} for label, value in static.items()),
        *({RELABEL_KEYS[k]: v for k, v in rule.items()} for rule in endpoint.get("relabelings", [])),
    ])


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 2.0) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", query=expr)["result"]

    def stop(self) -> None:
        terminate(self.process)


def start(folder: Path, scrape_configs: list[dict[str, Any]], port: int) -> Prometheus:
    """Prometheus on 127.0.0.1:port with its data in `folder`; ready when this returns."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "5s"},
                                      "scrape_configs": scrape_configs}, sort_keys=False))
    check = subprocess.run([str(bin_dir() / "promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"promtool check config:\n{check.stdout}{check.stderr}"
    log = folder / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(bin_dir() / "prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"Prometheus did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def backfill(folder: Path, openmetrics: str) -> None:
    """Recorded series (OpenMetrics text with timestamps, ending in `# EOF`) as blocks of the Prometheus that
    `start(folder, ...)` runs: the dashboard's queries over a history no test would wait for."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "backfill.om").write_text(openmetrics)
    subprocess.run([str(bin_dir() / "promtool"), "tsdb", "create-blocks-from", "openmetrics", str(folder / "backfill.om"),
                    str(folder / "data")], check=True, capture_output=True, text=True)


def check_metrics(text: str) -> str:
    """`promtool check metrics` on an exposition; returns its complaints (empty when clean)."""
    result = subprocess.run([str(bin_dir() / "promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    return "" if result.returncode == 0 else f"{result.stdout}{result.stderr}"
