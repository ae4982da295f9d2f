"""Cheap checks of what cannot run here: the trainer image's invariants and the GPU benchmarks' CPU paths."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dockerfile import instructions

REPO = Path(__file__).resolve().parents[1]


def test_trainer_image_is_pinned_python_non_root_with_the_cli_entrypoint() -> None:
    steps = instructions(REPO / "trainer" / "Dockerfile")
    args = {k: v for k, v in (s.split("=", 1) for kind, s in steps if kind == "ARG" and "=" in s)}
    base = next(v for kind, v in steps if kind == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    # CUDA comes with the pinned torch wheels (tests/trainer/test_pins.py), the driver from the host.
    assert re.fullmatch(r"python:\d+\.\d+-slim-\w+", base), base

    users = [v for kind, v in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0].isdigit(), "a numeric UID lets runAsNonRoot verify it"
    # trainer.uid 0 (OpenShift): a uid the SCC assigns, in group 0, writes the home's caches as the image's user does
    home = next(v for kind, v in steps if kind == "RUN" and "useradd" in v)
    assert "--gid 0" in home and "chmod -R g=u /home/trainer" in home, home

    installs = " ".join(v for kind, v in steps if kind == "RUN" and "pip install" in v)
    assert ".[trainer]" in installs
    # training.compile: inductor builds a CPU's kernels with g++, Triton a GPU's launcher with gcc
    packages = " ".join(v for kind, v in steps if kind == "RUN" and "apt-get install" in v).split()
    assert {"gcc", "g++"} <= set(packages)

    entrypoint = json.loads(next(v for kind, v in steps if kind == "ENTRYPOINT"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["finetune-trainer"] and "finetune-trainer" in scripts
    # Everything the image COPYs must exist (a missing path fails `docker build`).
    for kind, value in steps:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source


def _gpu_bench(*args: str, module: str = "bench.gpu") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("module", ["bench.gpu", "bench.gpu_pipeline"])
def test_gpu_bench_says_no_gpu_and_exits_0_on_a_cpu_machine(module: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run for real")
    done = _gpu_bench(module=module)
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU" in done.stdout


@pytest.mark.slow
def test_gpu_bench_dry_run_exercises_both_sides_and_modes_on_a_tiny_model(tmp_path: Path) -> None:
    sides = ("hf", "ours", "ours-accumulated", "ours-peft")  # on a CPU `ours` is the merged form
    done = _gpu_bench("--cpu-dry-run", "--out", str(tmp_path), "--sides", ",".join(sides))
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = tmp_path.glob("gpu-*.json")  # a dated name, as in bench/results
    results = json.loads(written.read_text())["results"]
    measured = {(r["side"], r["mode"]) for r in results if r["tokens_per_second"]}
    assert measured == {(side, mode) for side in sides for mode in ("full", "lora")}
    assert "lora: ours-peft / HF tokens/s" in written.with_suffix(".md").read_text()


@pytest.mark.slow
def test_gpu_pipeline_dry_run_runs_the_pipeline_to_an_export(tmp_path: Path) -> None:
    done = _gpu_bench("--cpu-dry-run", "--out", str(tmp_path), "--cases", "classifier-lora,causal-lm-full",
                      module="bench.gpu_pipeline")
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = tmp_path.glob("gpu-pipeline-*.json")
    results = json.loads(written.read_text())["results"]
    assert [r["case"] for r in results] == ["classifier-lora", "causal-lm-full"]
    for r in results:
        assert r["steps"] > 0 and r["exported"] == ["model.safetensors"], r
    assert set(results[0]["final"]) >= {"accuracy"} and set(results[1]["final"]) >= {"loss", "perplexity"}


@pytest.mark.slow
def test_gpu_pipeline_stops_at_a_sigterm_and_starts_no_next_case(tmp_path: Path) -> None:
    """An unattended run's time limit (`timeout`'s SIGTERM) ends it: the case it stopped is recorded as stopped, and
    the next case does not start."""
    run = subprocess.Popen([sys.executable, "-m", "bench.gpu_pipeline", "--cpu-dry-run", "--out", str(tmp_path),
                            "--cases", "classifier-lora,causal-lm-full"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert run.stderr is not None
        # At the first case's loading: the rest of that case (seconds, where its training takes about one) is time
        # to spare for this process's delay in reading the line and sending, on a loaded machine
        for line in run.stderr:
            if "stage Loading" in line:
                run.send_signal(signal.SIGTERM)
                break
        else:
            pytest.fail("the first case never started")
        log = run.stderr.read()
        assert run.wait(timeout=300) == 1, log[-3000:]
    finally:
        run.kill()
    [written] = tmp_path.glob("gpu-pipeline-*.json")
    [stopped] = json.loads(written.read_text())["results"]
    assert stopped["case"] == "classifier-lora" and stopped["stopped"], stopped
    assert stopped["failed"].startswith("Terminated: stopped by SIGTERM"), stopped
    assert "causal-lm" not in log


def test_a_run_for_bench_results_refuses_a_dirty_tree_before_its_work(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    import bench.common

    _fake_git(monkeypatch, status=" M trainer/finetune_trainer/train.py")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        bench.common.refuse_dirty_tree(bench.common.RESULTS)
    bench.common.refuse_dirty_tree(tmp_path)  # a trial's folder takes any tree


def test_a_gpu_side_that_fails_is_recorded_and_the_others_still_run() -> None:
    """Unattended, one side's failure must not lose the rest: token ids beyond the vocabulary make the embedding
    fail, and that becomes the side's result."""
    import torch

    from bench.gpu import TINY, measure_or_skip

    batches = [torch.full((TINY.batch_size, TINY.seq_len), 50)] * (TINY.warmup_steps + TINY.measure_steps)
    result = measure_or_skip("ours", "full", batches, 8, TINY, torch.device("cpu"))
    assert result.tokens_per_second is None and result.skipped.startswith("failed: IndexError")


def test_a_sigterm_in_our_loop_ends_the_gpu_run_and_is_no_sides_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our loop turns `timeout`'s SIGTERM into Terminated: recorded as the side's failure, the run went on through
    every other side until the SIGKILL."""
    import torch

    import bench.gpu
    from finetune_trainer.errors import Terminated

    def stopped(*_: object) -> None:
        raise Terminated("stopped by SIGTERM at step 3")

    monkeypatch.setattr(bench.gpu, "measure", stopped)
    with pytest.raises(Terminated):
        bench.gpu.measure_or_skip("ours", "full", [], 8, bench.gpu.TINY, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _bench_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ is scripts run from the repository root, not an installed package."""
    monkeypatch.syspath_prepend(str(REPO))


def _fake_git(monkeypatch: pytest.MonkeyPatch, status: str, head: str = "abc123") -> None:
    import bench.common

    answers = {"status": status, "rev-parse": head}
    monkeypatch.setattr(bench.common, "_git", lambda *args: answers[args[0]])


def _payload(head: str = "abc123", started: str = "2026-12-01T04:00:00+00:00") -> dict:
    return {"machine": {"git_commit": head, "started_utc": started}}


def test_mfu_reads_each_gpu_s_own_dense_bf16_peak() -> None:
    from bench.gpu import peak_flops

    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200 NVL") == peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM's 989
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("Tesla T4") is None


def test_a_result_is_not_recorded_from_a_dirty_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bench.common

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    _fake_git(monkeypatch, status=" M trainer/finetune_trainer/train.py")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        bench.common.write_results("accuracy-x", _payload(), "# x\n", tmp_path)
    assert not list(tmp_path.iterdir())


def test_results_get_dated_names_and_an_older_run_is_never_replaced(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    import bench.common

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    _fake_git(monkeypatch, status="")
    first = _payload()
    stem = bench.common.result_stem("accuracy", first["machine"])
    assert stem == "accuracy-20261201-0400"
    bench.common.write_results(stem, first, "# seed 0\n", tmp_path)
    bench.common.write_results(stem, first, "# seeds 0, 1\n", tmp_path)  # the same run, one more seed done
    assert (tmp_path / f"{stem}.md").read_text() == "# seeds 0, 1\n"
    recorded = json.loads((tmp_path / f"{stem}.json").read_text())
    assert recorded["machine"]["git_commit"] == "abc123" and "loadavg_at_end" in recorded
    with pytest.raises(SystemExit, match="never replaced"):
        bench.common.write_results(stem, _payload(started="2026-12-01T04:00:30+00:00"), "# other\n", tmp_path)
    with pytest.raises(SystemExit, match="HEAD moved"):
        bench.common.write_results("accuracy-y", _payload(head="def456"), "# y\n", tmp_path)


def test_a_dry_run_folder_outside_the_results_takes_any_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bench.common

    _fake_git(monkeypatch, status=" M bench/gpu.py")
    written = bench.common.write_results("gpu", _payload(), "# dry\n", tmp_path)
    assert written.read_text() == "# dry\n"


def _side(name: str, cpu_per_step: float, reached_at: list[tuple[int, float]], wall_per_step: float = 1.0) -> object:
    from bench.sides import EvalPoint, SideResult

    evals = [EvalPoint(step, step * wall_per_step, accuracy, step * cpu_per_step) for step, accuracy in reached_at]
    return SideResult(name, evals, steps=20, train_seconds=20 * wall_per_step, train_cpu_seconds=20 * cpu_per_step,
                      final_accuracy=evals[-1].accuracy)


def test_the_comparison_reports_the_ratio_its_spread_and_the_compute_speed_alone() -> None:
    from bench.accuracy import compare

    # Ours does half the CPU work per step, but ran on a busier machine: the same wall seconds per step.
    # Seed 2 of theirs never reaches the target.
    ours = [_side("ours", 0.5, [(5, 0.5), (10, 0.6), (20, 0.62)]) for _ in range(3)]
    theirs = [_side("hf-lora", 1.0, [(5, 0.5), (10, 0.6), (20, 0.6)]), _side("hf-lora", 1.0, [(10, 0.58), (20, 0.6)]),
              _side("hf-lora", 1.0, [(10, 0.4), (20, 0.5)])]
    row = compare({"ours": ours, "hf-lora": theirs}, [0.57], "ours", "hf-lora", 1.3)
    head = row["0.57"]
    assert row["clock"] == "cpu"
    assert head["per_seed"] == [2.0, 2.0, float("inf")]
    assert head["speedup"] == 2.0 and head["per_seed_range"] == (2.0, float("inf"))
    low, high = head["bootstrap_95"]
    assert low == 2.0 and high == float("inf")
    assert row["seconds_per_step_ratio"]["median"] == 2.0
    assert row["wall"]["seconds_per_step_ratio"]["median"] == 1.0 and row["wall"]["speedup"]["0.57"] == 1.0
    assert row["final_accuracy_delta"] > 0
    by_wall = compare({"ours": ours, "hf-lora": theirs}, [0.57], "ours", "hf-lora", 1.3, clock="wall")
    assert by_wall["0.57"]["speedup"] == 1.0 and "wall" not in by_wall


def test_a_seed_cut_short_leaves_whole_pairs_and_compares_only_seeds_both_sides_ran() -> None:
    from dataclasses import replace

    from bench.accuracy import compare, comparisons_of, markdown, side_order
    from bench.sides import Settings

    sides = ["ours", "hf-lora", "ours-full", "hf-tuned"]
    orders = [side_order(sides, seed) for seed in range(4)]
    for order in orders:
        assert sorted(order) == sorted(sides)
        assert abs(order.index("ours") - order.index("hf-lora")) == 1
        assert abs(order.index("ours-full") - order.index("hf-tuned")) == 1
    assert {order[0] for order in orders} == set(sides)  # every side goes first once in 4 seeds
    ours = [replace(_side("ours", 0.5, [(10, 0.6)]), seed=s) for s in (0, 1, 2)]
    theirs = [replace(_side("hf-lora", 1.0, [(10, 0.6)]), seed=s) for s in (2, 0)]  # seed 1 never ran its side
    row = compare({"ours": ours, "hf-lora": theirs}, [0.57], "ours", "hf-lora", 1.3)
    assert row["seeds"] == [0, 2] and row["0.57"]["per_seed"] == [2.0, 2.0]
    # After the first side of a run, no pair has both sides yet: no comparison, and no error.
    assert comparisons_of({"ours": ours[:1], "hf-lora": [], "ours-full": [], "hf-tuned": []}, [0.57]) == {}
    partial = {"ours": ours, "hf-lora": theirs, "ours-full": [], "hf-tuned": []}
    assert list(comparisons_of(partial, [0.57])) == ["ours vs hf-lora"]
    for runs in partial.values():
        for r in runs:
            r.notes.update(loadavg_before=[1.0] * 3, loadavg_after=[1.0] * 3)
    info = {"git_commit": "abc", "git_dirty": False, "nproc": 2, "cpu": "x", "torch_threads": 1,
            "versions": {"torch": "t", "transformers": "t", "peft": "p"}, "loadavg_at_start": [1.0] * 3}
    report = markdown(partial, comparisons_of(partial, [0.57]), Settings(), [0, 1, 2], [0.57], info, "cmd", 300)
    assert "| ours | hf-lora | 0, 2 | **2.00×**" in report and "| ours-full |" not in report


def test_sides_outside_the_equal_pairs_rotate_too() -> None:
    """ours vs hf-default (the recipe-level run) ran ours first on every seed: a side outside the pairs always ran
    last, so the order, and the process's first-side warm-up, never rotated for that comparison."""
    from bench.accuracy import side_order

    orders = [side_order(["ours", "hf-default"], seed) for seed in range(4)]
    assert [order[0] for order in orders] == ["ours", "hf-default", "ours", "hf-default"]
    every = ["ours", "hf-lora", "ours-full", "hf-tuned", "hf-default"]
    orders = [side_order(every, seed) for seed in range(6)]
    for order in orders:
        assert sorted(order) == sorted(every)
        assert abs(order.index("ours") - order.index("hf-lora")) == 1
        assert abs(order.index("ours-full") - order.index("hf-tuned")) == 1
    assert {order[0] for order in orders} == set(every)


def _run_file(path: Path, seeds: list[int], commit: str = "abc123", clock: str | None = "cpu",
              **machine: object) -> Path:
    from dataclasses import asdict

    from bench.sides import Settings

    sides = {name: [_side(name, per_step, [(10, 0.6), (20, 0.62)]).as_dict() for _ in seeds]
             for name, per_step in (("ours", 0.5), ("hf-lora", 1.0))}
    for runs in sides.values():
        for r in runs:
            r["notes"] = {"loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [1.5, 1.0, 1.0]}
    payload = {"command": f"python -m bench.accuracy --seeds {seeds}", "seeds": seeds, "targets": [0.57],
               "settings": asdict(Settings()), "eval_rows": 300, "clocks": {},
               "machine": {"git_commit": commit, "git_dirty": False, "nproc": 2, "cpu": "x", "torch_threads": 1,
                           "versions": {"torch": "t", "transformers": "t", "peft": "p"},
                           "loadavg_at_start": [1.0, 1.0, 1.0], **machine},
               "sides": sides, **({"clock": clock} if clock else {})}  # no clock: a run from before the CPU clock
    path.write_text(json.dumps(payload))
    return path


def test_runs_of_one_commit_combine_into_one_table_over_their_seeds(tmp_path: Path) -> None:
    from bench.accuracy import main

    a, b = _run_file(tmp_path / "a.json", [0, 1]), _run_file(tmp_path / "b.json", [2])
    out = tmp_path / "out"
    assert main(["--combine", f"{a},{b}", "--out", str(out)]) == 0
    combined = json.loads(next(out.glob("accuracy-combined-*.json")).read_text())
    assert combined["seeds"] == [0, 1, 2] and len(combined["sides"]["ours"]) == 3
    assert combined["clock"] == "cpu" and combined["comparisons"]["ours vs hf-lora"]["0.57"]["per_seed"] == [2.0] * 3
    assert [s["file"] for s in combined["sources"]] == ["a.json", "b.json"]
    assert "speed-up to 0.57, cpu s" in next(out.glob("accuracy-combined-*.md")).read_text()
    other = _run_file(tmp_path / "c.json", [3], commit="def456")
    with pytest.raises(SystemExit, match="other code"):
        main(["--combine", f"{a},{other}", "--out", str(out)])
    by_wall = _run_file(tmp_path / "d.json", [4], clock=None)
    with pytest.raises(SystemExit, match="different clocks"):
        main(["--combine", f"{a},{by_wall}", "--out", str(out)])


@pytest.mark.parametrize("machine", [{"torch_threads": 2}, {"cpu": "AMD EPYC"}, {"git_dirty": True},
                                     {"versions": {"torch": "t2", "transformers": "t", "peft": "p"}}])
def test_runs_of_one_commit_on_other_machines_or_threads_do_not_combine(tmp_path: Path, machine: dict) -> None:
    """One commit ran on the AMD and on the Intel machine, at 1 and 2 threads: CPU seconds of such runs are other
    measurements, and their seeds must not pool into one median."""
    from bench.accuracy import main

    a, b = _run_file(tmp_path / "a.json", [0, 1]), _run_file(tmp_path / "b.json", [2], **machine)
    with pytest.raises(SystemExit, match=f"machine.{next(iter(machine))}"):
        main(["--combine", f"{a},{b}", "--out", str(tmp_path / "out")])


def test_the_pruning_goals_read_the_mean_accuracy_difference_and_the_median_speedup() -> None:
    from bench.pruning import summary

    def seed(difference: float, wall: float, cpu: float) -> dict:
        return {"accuracy_difference": difference, "latency": {"speedup": {"wall": wall, "cpu": cpu}}}

    met = summary([seed(-0.02, 1.3, 1.4), seed(0.005, 1.5, 1.3), seed(0.0, 1.1, 1.2)])
    assert met["accuracy_difference_points"]["mean"] == pytest.approx(-0.5)
    assert met["speedup"]["wall"] == {"median": 1.3, "min": 1.1, "max": 1.5}
    assert met["goal_accuracy_met"] and met["goal_speed_met"]
    slow = summary([seed(-0.03, 1.3, 1.4), seed(-0.005, 1.2, 1.24), seed(0.0, 1.1, 1.2)])
    assert not slow["goal_accuracy_met"] and not slow["goal_speed_met"]
    assert "longer_accuracy_difference_points" not in slow


def test_a_pruned_side_trained_longer_is_judged_apart_from_the_headline() -> None:
    from bench.pruning import summary

    seeds = [{"accuracy_difference": d, "accuracy_difference_longer": longer,
              "latency": {"speedup": {"wall": 1.5, "cpu": 1.5}}} for d, longer in ((-0.03, -0.01), (-0.02, 0.0))]
    result = summary(seeds)
    assert result["accuracy_difference_points"]["mean"] == pytest.approx(-2.5) and not result["goal_accuracy_met"]
    longer = result["longer_accuracy_difference_points"]
    assert longer["mean"] == pytest.approx(-0.5) and longer["min"] == pytest.approx(-1.0) and longer["goal_met"]


def test_a_pruned_side_distilled_from_the_unpruned_one_is_judged_apart_from_the_headline(tmp_path: Path) -> None:
    """bench.pruning --distill: the pruned job plus training.distillation, its teacher the unpruned side's export of
    the seed; its difference to the unpruned fine-tune is summarised and judged apart, the headline as without it."""
    import argparse

    from bench.pruning import DISTILLED, PRUNE, TEACHER, distillation_spec, distilled_lines, job, summary
    from bench.sides import Settings

    spec = job(Settings(seed=3), False, 100, tmp_path / DISTILLED, PRUNE,
               distillation_spec(tmp_path / "unpruned", 3.0, 0.8)).training.distillation
    assert (spec.teacher.uri, spec.temperature, spec.weight) == (str(tmp_path / "unpruned"), 3.0, 0.8)
    seeds = [{"seed": seed, "accuracy_difference": d, "accuracy_difference_distilled": taught,
              "latency": {"speedup": {"wall": 1.5, "cpu": 1.5}},
              "sides": {name: {"final": {"accuracy": 0.6}, "train_seconds": 10.0}
                        for name in ("unpruned", "pruned", DISTILLED)}}
             for seed, d, taught in ((0, -0.03, -0.012), (1, -0.02, 0.002))]
    result = summary(seeds)
    assert result["accuracy_difference_points"]["mean"] == pytest.approx(-2.5) and not result["goal_accuracy_met"]
    taught = result["distilled_accuracy_difference_points"]
    assert taught["mean"] == pytest.approx(-0.5) and taught["min"] == pytest.approx(-1.2) and taught["goal_met"]
    lines = distilled_lines(seeds, result, argparse.Namespace(distill_temperature=3.0, distill_weight=0.8,
                                                              teacher_rows=None))
    assert "temperature: 3, weight: 0.8" in lines[2] and "| 0 | 0.6000 | 0.6000 | 0.6000 | -1.20 | +1.80 |" in lines[6]
    assert distilled_lines(seeds[:0], summary([{k: v for k, v in seeds[0].items() if k != "accuracy_difference_distilled"}]),
                           argparse.Namespace()) == []
    # --teacher-rows: a stronger teacher, its accuracy in a column of its own.
    for s in seeds:
        s["sides"][TEACHER] = {"final": {"accuracy": 0.7}, "train_seconds": 40.0}
    lines = distilled_lines(seeds, result, argparse.Namespace(distill_temperature=3.0, distill_weight=0.8,
                                                              teacher_rows=3840, train_rows=960))
    assert "an unpruned fine-tune on more rows" in lines[0]
    assert "trained on 3840 rows (the job's 960 and the 2880" in lines[2] and "| accuracy teacher (3840 rows) |" in lines[4]
    assert "| 0 | 0.6000 | 0.7000 | 0.6000 | 0.6000 | -1.20 |" in lines[6]


def test_a_teacher_on_more_rows_holds_out_what_the_job_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.pruning --teacher-rows: the teacher trains on the job's rows and those after them, and scores none of
    them: the wider load splits as the job's, which the bench checks before it trains (and refuses otherwise)."""
    from bench import data

    data.same_held_out(960, 3840, 1000, 128, 4)
    with pytest.raises(AssertionError, match=r"the corpus has \d+ training rows, not more"):
        data.same_held_out(960, 10**6, 1000, 128, 4)  # the table would have said 1,000,000 rows
    real = data.load

    def shuffled(rows: int, *args: Any) -> Any:  # a split that changed with the number of training rows
        loaded = real(rows, *args)
        return replace(loaded, test=replace(loaded.test, inputs=loaded.test.inputs[::-1])) if rows > 960 else loaded

    monkeypatch.setattr(data, "load", shuffled)
    with pytest.raises(AssertionError, match="the wider job must hold out what the job does"):
        data.same_held_out(960, 3840, 1000, 128, 4)


def test_healing_rows_are_corpus_rows_outside_every_split_the_seed_scores(tmp_path: Path) -> None:
    """bench.pruning --heal-rows: the rows after the job's training rows, less any text a held-out split also has;
    written as a CSV of texts only (no label column)."""
    import pandas as pd

    from bench.data import load
    from bench.pruning import heal_file
    from bench.sides import Settings

    job = load(960, None, 128, 10)
    spec, count = heal_file(Settings(train_rows=960, seed=10), 400, tmp_path)
    texts = pd.read_csv(spec["uri"], keep_default_na=False)
    assert list(texts.columns) == ["text"] and spec["textField"] == "text" and len(texts) == count
    assert 350 < count <= 400  # the corpus repeats some texts: those also held out are left out
    held_out = set(job.validation.inputs) | set(job.test.inputs)
    assert not held_out & set(texts["text"])
    assert set(texts["text"]) <= set(load(1360, None, 128, 10).train.inputs[960:])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_an_equal_recipe_trains_both_trainers_at_one_precision(tmp_path: Path, precision: str) -> None:
    """Our side's job and the tuned HF sides' arguments carry the run's precision; HF's example defaults stay
    HF's (fp32), since that side is the Trainer as a user runs it untuned."""
    from bench import hf_trainer, ours
    from bench.sides import Settings

    settings = Settings(precision=precision)
    assert ours.config(settings, tmp_path, full=False).training.precision == precision
    for variant in ("hf-lora", "hf-tuned"):
        assert hf_trainer._arguments(settings, variant, str(tmp_path)).bf16 is (precision == "bf16")
    assert hf_trainer._arguments(settings, "hf-default", str(tmp_path)).bf16 is False


def test_a_trial_profile_or_throughput_run_writes_outside_the_results_from_any_tree(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's `--out DIR` for trials: profile and throughput had none, so every trial of theirs had to be a
    kept result from a clean tree."""
    import torch

    import bench.common
    from bench import profile, throughput

    _fake_git(monkeypatch, status=" M bench/profile.py")
    kept = sorted(bench.common.RESULTS.iterdir())

    def side(shared: object, settings: object, recipe: str, rec: profile.Recorder) -> None:
        with rec.prof:
            for _ in range(rec.warmup + rec.steps):
                torch.ones(4).add_(1)
                rec.step()

    monkeypatch.setattr(profile, "SIDES", {"ours": side, "hf": side})
    monkeypatch.setattr(profile.data, "load", lambda *args: None)
    assert profile.main(["--warmup", "1", "--steps", "2", "--precision", "fp32", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("profile-lora-*.json"))
    with pytest.raises(SystemExit, match="uncommitted changes"):
        profile.main(["--precision", "fp32"])

    class Shared:
        def __init__(self, w: object) -> None:
            self.encoded = type("E", (), {"features": [[1, 2]]})()

        def batch_order(self) -> list[list[int]]:
            return [[0]]

    def clock(shared: object, limit: int | None = None) -> object:
        return type("C", (), {"wall": 1.0, "cpu": 1.0})()

    monkeypatch.setattr(throughput, "Shared", Shared)
    monkeypatch.setattr(throughput, "run_bare", clock)
    monkeypatch.setattr(throughput, "SIDES", {"bare": clock, "ours": clock})
    assert throughput.main(["--rounds", "2", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("throughput-*.json"))
    with pytest.raises(SystemExit, match="uncommitted changes"):
        throughput.main(["--rounds", "2"])
    assert sorted(bench.common.RESULTS.iterdir()) == kept  # nothing of the trials went into the results


def test_a_median_step_count_between_two_evaluations_is_not_rounded_away() -> None:
    """Two seeds at 10 and 15 steps have a median of 12.5; the table printed 12 (and 17.5 as 18), which the README
    then quoted."""
    from dataclasses import replace

    from bench.accuracy import markdown
    from bench.sides import Settings

    runs = [replace(_side("ours", 0.5, [(at, 0.6)]), seed=s) for s, at in ((0, 10), (1, 15))]
    for r in runs:
        r.notes.update(loadavg_before=[1.0] * 3, loadavg_after=[1.0] * 3)
    info = {"git_commit": "abc", "git_dirty": False, "nproc": 2, "cpu": "x", "torch_threads": 1,
            "versions": {"torch": "t", "transformers": "t", "peft": "p"}, "loadavg_at_start": [1.0] * 3}
    report = markdown({"ours": runs}, {}, Settings(), [0, 1], [0.57], info, "cmd", 300)
    assert "| 0.600 | 12.5 |" in report
