"""`make demo`'s own printing (deploy/local/demo.py), without a cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LOCAL, REPO

from finetune_operator import judge
from finetune_operator.api import FineTuneJob

sys.path.insert(0, str(LOCAL))
import demo  # noqa: E402  (deploy/local/demo.py)

# Two of kubectl's tables for the same job, as `kubectl get ftj -o wide` printed them: each sized to its own values.
PENDING = """\
NAME               PHASE     STAGE   PROGRESS   WORKERS   ATTEMPTS   AGE   LOSS   EVAL   REASON
minilm-sentiment   Pending                                1          0s                  AttemptCreated
"""
DONE = """\
NAME               PHASE       STAGE   PROGRESS   WORKERS   ATTEMPTS   AGE   LOSS     EVAL                                   REASON
minilm-sentiment   Succeeded   Done    100        0         1          89s   0.5373   accuracy 0.411→0.659, f1 0.303→0.601   Completed
"""


def test_the_rows_it_follows_stay_under_the_header() -> None:
    """kubectl sizes each table to its values, so rows printed from separate calls (--no-headers) drifted: the
    attempt count of a pending job sat under PROGRESS, a running one's progress under STAGE."""
    header = demo.aligned(demo.cells(PENDING), "minilm-sentiment", header=True)
    starts = {m.group(): m.start() for m in re.finditer(r"\S+", header)}
    for table in (PENDING, DONE):
        pairs = demo.cells(table)
        line = demo.aligned(pairs, "minilm-sentiment")
        for column, value in pairs:
            start = starts[column]
            assert line[start:start + len(value)] == value and line[start - 1:start] in ("", " "), (column, line)
    assert dict(demo.cells(PENDING))["WORKERS"] == "" and dict(demo.cells(PENDING))["ATTEMPTS"] == "1"
    assert dict(demo.cells(DONE))["EVAL"] == "accuracy 0.411→0.659, f1 0.303→0.601"


def test_the_output_it_clears_and_points_to_is_the_examples() -> None:
    """A second `make demo` resumed from the first one's final checkpoint in the output folder: it showed no training
    (Evaluating at 100% after 10 s). It clears the folder the example writes, which it names at the end."""
    doc = yaml.safe_load(demo.EXAMPLE.read_text())
    assert demo.output_folder(doc) == REPO / ".data" / "pvc" / "models" / "minilm-sentiment"


def test_an_unknown_command_is_refused_rather_than_running_the_demo() -> None:
    """`demo.py setup` (the README's by-hand block) and `stop` are its other commands; any other word ran the whole
    demo."""
    result = subprocess.run([sys.executable, str(LOCAL / "demo.py"), "claims"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "usage:" in result.stderr and "[run|setup|stop]" in result.stderr


def test_after_a_failure_it_points_to_the_trainers_log_not_to_a_model() -> None:
    """make demo's first failure (a PermissionError on the output) ended by pointing at the exported model, which a
    failed job has not written."""
    doc = yaml.safe_load(demo.EXAMPLE.read_text())
    c = demo.cluster.Cluster(REPO / ".cluster", Path("/bin-dir"))
    assert f"ls {demo.output_folder(doc)}" in demo.look_around(c, doc, succeeded=True)
    failed = demo.look_around(c, doc, succeeded=False)
    assert "ls " not in failed and "logs -l finetune.dev/job-name=minilm-sentiment" in failed


def test_the_lines_it_points_to_work_from_a_checkout_whose_path_has_a_space(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Its `ls` and `cat` lines were unquoted: under "my checkout" they looked for "my" and "checkout/..."."""
    checkout = tmp_path / "my checkout"
    monkeypatch.setattr(demo, "ASSETS", checkout / ".data" / "pvc")
    doc = yaml.safe_load(demo.EXAMPLE.read_text())
    c = demo.cluster.Cluster(checkout / ".cluster", checkout / "bin")
    demo.output_folder(doc).mkdir(parents=True)
    (c.state / "logs").mkdir(parents=True)
    (c.state / "logs" / "operator.log").write_text("started\n")
    lines = [line for line in demo.look_around(c, doc, succeeded=True).splitlines() if line.startswith(("  ls", "  cat"))]
    assert len(lines) == 2
    for line in lines:
        assert subprocess.run(["bash", "-c", line], capture_output=True, timeout=30).returncode == 0, line


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "deploy" / "examples").glob("*.yaml")))
def test_every_example_runs_on_the_claims_it_sets_up(example: str) -> None:
    """Its claims were ReadWriteOnce, so minilm-sentiment-2workers.yaml applied in finetune-demo failed InvalidSpec
    ("claim 'models' is ReadWriteOnce, but the 2 workers all need it")."""
    spec = FineTuneJob.from_wire(yaml.safe_load((REPO / "deploy" / "examples" / example).read_text())).spec
    claims = {c["metadata"]["name"]: c for c in demo.claims()}
    assert judge.spec_problems(spec, claims, demo.NAMESPACE) == []


def test_a_job_that_does_not_finish_points_to_commands_that_find_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its deadline make demo said "see `kubectl describe ftj minilm-sentiment`", which pasted finds no cluster
    (KUBECONFIG unset) and looks in the namespace `default`."""
    monkeypatch.setattr(demo, "TIMEOUT_SECONDS", 0)
    doc = yaml.safe_load(demo.EXAMPLE.read_text())
    c = demo.cluster.Cluster(REPO / ".cluster", Path("/bin-dir"))
    with pytest.raises(SystemExit) as stopped:
        demo.follow(c, doc)
    message = str(stopped.value)
    assert f"export KUBECONFIG={c.kubeconfig} PATH=/bin-dir:$PATH" in message
    assert "kubectl -n finetune-demo describe ftj minilm-sentiment" in message


def test_the_line_cluster_up_prints_finds_its_kubectl(tmp_path: Path) -> None:
    """cluster-up said only `export KUBECONFIG=...`: on a fresh machine, which has no kubectl of its own, the README's
    next line, `kubectl get nodes`, was not found. Its paths were unquoted: a checkout under a path with a space
    gave a line that broke when pasted."""
    checkout = tmp_path / "my checkout"
    kubectl = checkout / "bin" / "kubectl"
    kubectl.parent.mkdir(parents=True)
    kubectl.write_text("#!/bin/sh\n")
    kubectl.chmod(0o755)
    c = demo.cluster.Cluster(checkout / ".cluster", kubectl.parent)
    found = subprocess.run(["bash", "-c", f'{c.export}; command -v kubectl; echo "$KUBECONFIG"'],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert found.stdout.splitlines() == [str(kubectl), str(c.kubeconfig)]


def test_the_readmes_copies_onto_a_claim_give_kubectl_cp_folders_not_links() -> None:
    """`make assets` links the model folder into the venv, and kubectl cp copies a link as a link (its tar keeps
    it): the claim got a link to a path no pod has, and the example's trainer found no model."""
    copies = re.findall(r"^kubectl .*\bcp (.+) \S+:\S+$", (REPO / "README.md").read_text(), re.M)
    assert len(copies) == 2
    for source in copies:
        folder = Path(subprocess.run(["bash", "-c", f"printf %s {source}"], cwd=REPO, capture_output=True,
                                     text=True, check=True).stdout)
        assert folder.parts and (REPO / folder).is_dir() and not (REPO / folder).is_symlink(), source
