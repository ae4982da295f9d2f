"""`make demo`: the whole system on this machine, as a user meets it.

Brings up the local control plane (deploy/local/cluster.py), installs the CRD, gives the
namespace the bundled model and data as claims, starts the operator, applies
deploy/examples/minilm-sentiment.yaml and follows it as `kubectl get ftj` shows it, until it
ends; then prints baseline against fine-tuned from the resource's status. The cluster and the
operator stay up to look around; `make cluster-down` stops both.

    python deploy/local/demo.py [run]     the demo
    python deploy/local/demo.py setup     only the cluster, the CRD, the namespace and its claims (README: by hand)
    python deploy/local/demo.py stop      stop the operator it started
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
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cluster  # noqa: E402
from ports import free_port  # noqa: E402

REPO = cluster.REPO
EXAMPLE = REPO / "deploy" / "examples" / "minilm-sentiment.yaml"
CRD = REPO / "deploy" / "crds" / "finetune.dev_finetunejobs.yaml"
ASSETS = REPO / ".data" / "pvc"
NAMESPACE = "finetune-demo"  # the demo's operator watches only this namespace
OPERATOR = "operator"  # its name in the cluster's pids/ and logs/
TIMEOUT_SECONDS = 1200


def kubectl(c: cluster.Cluster, *args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run([str(c.bin_dir / "kubectl"), f"--kubeconfig={c.kubeconfig}", *args], input=stdin,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def claims() -> list[dict]:
    """The bundled model and data (`make assets` put them in .data/pvc) as claims the examples name; ReadWriteMany,
    as the workers of minilm-sentiment-2workers.yaml all read and write them (the operator checks the mode)."""
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": name, "annotations": {"local.finetune.dev/host-path": str(ASSETS / name)}},
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
            for name in ("models", "data")]


def output_folder(doc: dict) -> Path:
    """Where the job's spec.output.uri (pvc://<claim>/<path>, a claim on .data/pvc/<claim>) lands on this machine."""
    return ASSETS / doc["spec"]["output"]["uri"].removeprefix("pvc://")


def start_operator(c: cluster.Cluster) -> None:
    """Recorded as cluster.py records its components (PID and whole command line, in pids/), so `cluster.py down`
    stops it too, and a fresh `up`, before it wipes the record."""
    pid = cluster._read_pid(c, OPERATOR)
    if pid is not None:
        print(f"operator already running (pid {pid})")
        return
    env = os.environ | {"KUBECONFIG": str(c.kubeconfig), "PYTHONUNBUFFERED": "1"}
    proc = cluster.start_process(c, OPERATOR, [
        sys.executable, "-m", "finetune_operator", "run", "--namespace", NAMESPACE, "--bind-address", "127.0.0.1",
        "--metrics-port", "0", "--liveness-port", str(free_port())], env)
    print(f"operator started (pid {proc.pid}, log {c.log(OPERATOR)})")


def stop_operator(state: Path, grace: float = 10.0) -> None:
    """SIGTERM, SIGKILL after `grace`: only while its PID still runs the command line it was started with."""
    c = cluster.Cluster(state.resolve(), Path())
    pid = cluster._read_pid(c, OPERATOR)
    cluster._stop(c, OPERATOR, grace)
    if pid is not None:
        print(f"operator stopped (pid {pid})")


# The widest value of a column, where it is wider than its name: the rows are printed one at a time, and kubectl
# sizes each table's columns to its own values, so a row printed as kubectl aligned it would not sit under the header.
WIDTHS = {"PHASE": len("Succeeded"), "STAGE": len("Rearranging"), "AGE": len("19m59s"), "LOSS": len("0.5373"),
          "EVAL": len("accuracy 0.411→0.659, f1 0.303→0.601")}


def cells(table: str) -> list[tuple[str, str]]:
    """kubectl's table (a header and one row) as (column, value) pairs, cut where the header's columns start."""
    header, row = table.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    return [(column, row[start:end].strip())
            for column, start, end in zip(header.split(), starts, [*starts[1:], None])]


def aligned(pairs: list[tuple[str, str]], name: str, header: bool = False) -> str:
    """One line of the table, every column as wide as its name, its widest value or the job's name."""
    widths = WIDTHS | {"NAME": len(name)}
    return "   ".join(f"{column if header else value:<{max(len(column), widths.get(column, 0))}}"
                      for column, value in pairs).rstrip()


def follow(c: cluster.Cluster, doc: dict) -> dict:
    """Print `kubectl get ftj -o wide` whenever the phase, stage, progress or attempts change, until the job ends."""
    name = doc["metadata"]["name"]
    deadline, last, printed_header = time.monotonic() + TIMEOUT_SECONDS, None, False
    while time.monotonic() < deadline:
        obj = json.loads(kubectl(c, "get", "ftj", name, "-n", NAMESPACE, "-o", "json"))
        status = obj.get("status", {})
        seen = (status.get("phase"), status.get("stage"), status.get("progress", {}).get("percent"),
                status.get("attempts"), status.get("reason"))
        if seen != last:
            pairs = cells(kubectl(c, "get", "ftj", name, "-n", NAMESPACE, "-o", "wide"))
            if not printed_header:
                print(aligned(pairs, name, header=True))
                printed_header = True
            print(aligned(pairs, name), flush=True)
            last = seen
        if status.get("phase") in ("Succeeded", "Failed"):
            return obj
        time.sleep(2)
    # Where to look, as after a failure: a bare `kubectl describe ftj` finds no cluster (no KUBECONFIG) or namespace.
    raise SystemExit(f"{name} did not finish in {TIMEOUT_SECONDS} s. {look_around(c, doc, succeeded=False)}")


def report(obj: dict) -> None:
    status = obj["status"]
    print(f"\n{obj['metadata']['name']}: {status['phase']} ({status.get('reason')}) after {status.get('attempts')} attempt(s)")
    evaluation = status.get("evaluation") or {}
    if evaluation:
        print(f"{'metric':<10} {'baseline':>9} {'fine-tuned':>10}")
        for metric, value in evaluation["final"].items():
            print(f"{metric:<10} {evaluation['baseline'].get(metric, float('nan')):>9.4f} {value:>10.4f}")
    else:
        failed = [c for c in status.get("conditions", []) if c["type"] == "Failed"]
        print(failed[0]["message"] if failed else "")


def setup() -> cluster.Cluster:
    """What the example needs before an operator runs it: the cluster, the CRD, the namespace and its claims (each
    `make cluster-up` after a `make cluster-down` starts from an empty etcd)."""
    c = cluster.up()
    kubectl(c, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl(c, "wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=60s")
    kubectl(c, "create", "namespace", NAMESPACE, check=False)  # AlreadyExists on a rerun
    kubectl(c, "apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(claims()))
    print(f"namespace {NAMESPACE}: claims models and data on {ASSETS / 'models'} and {ASSETS / 'data'}")
    return c


def run() -> int:
    started = time.monotonic()
    c = setup()
    start_operator(c)
    doc = yaml.safe_load(EXAMPLE.read_text())
    name = doc["metadata"]["name"]
    kubectl(c, "delete", "ftj", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")  # a rerun starts afresh:
    # its pods (a stopped pod checkpoints on SIGTERM) gone, then its output: its checkpoints would resume at its end
    kubectl(c, "wait", "--for=delete", "pods", "-n", NAMESPACE, "-l", f"finetune.dev/job-name={name}", "--timeout=120s",
            check=False)  # "no matching resources": none left
    shutil.rmtree(output_folder(doc), ignore_errors=True)
    kubectl(c, "apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    obj = follow(c, doc)
    report(obj)
    succeeded = obj["status"]["phase"] == "Succeeded"
    print(f"\ndone in {time.monotonic() - started:.0f} s. {look_around(c, doc, succeeded)}")
    return 0 if succeeded else 1


def look_around(c: cluster.Cluster, doc: dict, succeeded: bool) -> str:
    """Where to look next: the exported model after a success, the trainer's log after a failure (there is no
    model then)."""
    name = doc["metadata"]["name"]
    if succeeded:
        last = f"ls {shlex.quote(str(output_folder(doc)))}        # the exported model, report.json, model card, loss curve"
    else:
        last = f"kubectl -n {NAMESPACE} logs -l finetune.dev/job-name={name} --tail=30   # each attempt's trainer"
    return f"""Look around:
  {c.export}
  kubectl -n {NAMESPACE} describe ftj {name}          # conditions and the Events of each transition
  kubectl -n {NAMESPACE} get jobs,pods -l finetune.dev/job-name={name}
  {last}
  cat {shlex.quote(str(c.log(OPERATOR)))}
Stop everything: make cluster-down"""


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "run"
    if command == "stop":
        stop_operator(cluster.DEFAULT_STATE)
        return 0
    if command == "setup":
        setup()
        return 0
    if command != "run":
        raise SystemExit(f"usage: {sys.argv[0]} [run|setup|stop]")
    return run()


if __name__ == "__main__":
    sys.exit(main())
