"""Pruning: MiniLM with a quarter of its layers removed against the unpruned fine-tune, over several seeds.

One process. For every seed, both sides run the trainer's whole pipeline on the same rows, split and recipe
(`--recipe lora`: our shipped LoRA recipe, bench.ours.recipe, with `--frozen-layers` bottom layers frozen; `--recipe
full`: a full fine-tune, every weight training at `--learning-rate`); the pruned side adds `rearrange.prune: {fraction: 0.25}`, which removes
the 2 of 6 layers with the lowest Block Influence on the probe batch before training. Then both exported models
are reloaded with `AutoModelForSequenceClassification` and their CPU inference latency is measured side by side:
rounds alternate which model goes first, on the same test batches, in the same process and thread count.
`--longer-epochs N` adds a third side, apart from the headline: the pruned model trained for N epochs, which spends
about the training time its smaller size saves (a recipe difference, reported as such). `--heal-steps N` heals the
pruned model for N steps before its training (`rearrange.prune.heal`: its layers learn to give back the unpruned
model's last hidden states on the training texts, no labels); the table gives the healing's seconds beside the
training's. `--heal-rows N` heals on N other rows of the corpus instead (`rearrange.prune.heal.dataset`), rows in
none of the seed's train, validation and test splits, texts only: their labels are never read.
`--distill` adds a side apart from the headline too: the pruned model trained with the same recipe plus
`training.distillation`, its teacher the unpruned side's export of the same seed (so it runs after it), at
`--distill-temperature` and `--distill-weight` (the share of the loss that is the teacher's soft targets).
`--teacher-rows N` makes the teacher a stronger one: the unpruned recipe trained on N rows (the job's and those that
follow them in the split; the same validation and test splits), its test accuracy in the table.
Goal (issue 14): accuracy within one point of the unpruned fine-tune, and at least 1.25x faster inference.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import RESULTS, command_line, fmt, machine, minilm_path, refuse_dirty_tree, result_stem, write_results
from bench.data import dataset_spec, same_held_out
from bench.ours import recipe
from bench.sides import Settings

SIDES = ("unpruned", "pruned")
LONGER = "pruned-longer"  # the pruned model trained for --longer-epochs
DISTILLED = "pruned-distilled"  # the pruned model taught by the unpruned side's export (--distill)
TEACHER = "teacher"  # the unpruned recipe on --teacher-rows rows, the distilled side's teacher instead
PRUNE = {"fraction": 0.25}  # a quarter of 6 layers is 1.5: the trainer rounds half up, so 2 go and 4 stay
GOAL_ACCURACY_POINTS = 1.0
GOAL_SPEEDUP = 1.25


def prune_spec(heal_steps: int | None, heal_lr: float) -> dict[str, Any]:
    return PRUNE | ({"heal": {"steps": heal_steps, "learningRate": heal_lr}} if heal_steps else {})


def job(settings: Settings, full: bool, eval_rows: int, output: Path, prune: dict[str, Any] | None,
        distillation: dict[str, Any] | None = None) -> Any:
    """The FineTuneJob spec of a side: the recipe (LoRA, or `full`), evaluated once per epoch, plus the pruning and
    the distillation."""
    from finetune_trainer.config import TrainerConfig

    spec = recipe(settings, full)
    if prune:
        spec["rearrange"]["prune"] = prune
    return TrainerConfig.model_validate({
        "model": {"uri": str(minilm_path()), "task": "sequence-classification"},
        "dataset": dataset_spec(settings.train_rows, eval_rows, settings.max_length),
        **spec,
        "training": {"epochs": settings.epochs, "batchSize": settings.batch_size, "schedule": settings.schedule,
                     "warmupRatio": settings.warmup_ratio, "checkpointEverySteps": 1_000_000, "seed": settings.seed,
                     **({"distillation": distillation} if distillation else {})},
        "evaluation": {"metrics": ["accuracy", "f1"], "baseline": False},
        "output": {"uri": str(output)},
    })


def train(settings: Settings, full: bool, eval_rows: int, output: Path, prune: dict[str, Any] | None,
          distillation: dict[str, Any] | None = None) -> dict[str, Any]:
    from finetune_trainer import pipeline

    load = list(os.getloadavg())
    report = pipeline.run(job(settings, full, eval_rows, output, prune, distillation), output)
    side = {"final": report["evaluation"]["final"], "train_seconds": report["training"]["seconds"],
            "train_cpu_seconds": report["training"]["cpu_seconds"],
            "steps": report["training"]["steps"], "test_samples": report["training"]["test_samples"],
            "precision": report["training"]["precision"],
            "layer_scores": report["analysis"]["importance"]["layers"]["scores"],
            "loadavg_before": load, "loadavg_after": list(os.getloadavg())}
    if prune:
        side["removed_layers"] = report["pruning"]["removed_layers"]
        side["heal"] = report["pruning"].get("heal")
    return side


def serving_batches(tokenizer: Any, texts: list[str], batch_size: int, batches: int, max_length: int) -> list[dict]:
    """Batches of test texts in the split's order (not sorted by length), each padded to its longest text."""
    return [tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt") for i in range(0, batch_size * batches, batch_size)]


def latency(models: dict[str, Any], batches: list[dict], rounds: int) -> dict[str, Any]:
    """Seconds per batch of each model, wall and CPU (this process), round by round; the order alternates."""
    import torch

    names = list(models)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    with torch.inference_mode():
        for model in models.values():  # warm-up: the first pass allocates
            model(**batches[0])
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                wall, cpu = time.perf_counter(), time.process_time()
                for batch in batches:
                    models[name](**batch)
                times[name]["wall"].append((time.perf_counter() - wall) / len(batches))
                times[name]["cpu"].append((time.process_time() - cpu) / len(batches))
    ratios = {clock: [a / b for a, b in zip(times["unpruned"][clock], times["pruned"][clock])]
              for clock in ("wall", "cpu")}
    return {"seconds_per_batch": times, "speedup_per_round": ratios,
            "speedup": {clock: statistics.median(v) for clock, v in ratios.items()},
            "median_ms": {n: {c: 1000 * statistics.median(v) for c, v in t.items()} for n, t in times.items()}}


def heal_file(settings: Settings, rows: int, folder: Path) -> tuple[dict[str, Any], int]:
    """`rearrange.prune.heal.dataset` for `rows` unlabelled corpus rows outside the seed's splits, written to a CSV of
    texts only, and how many texts it holds."""
    from bench.data import unlabelled_rows

    texts = unlabelled_rows(settings.train_rows, rows, settings.max_length, settings.seed)
    path = folder / "heal.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return {"uri": str(path), "format": "csv", "textField": "text"}, len(texts)


def distillation_spec(teacher: Path, temperature: float, weight: float) -> dict[str, Any]:
    """`training.distillation` of the pruned-distilled side: the unpruned side's export of the seed teaches."""
    return {"teacher": {"uri": str(teacher)}, "temperature": temperature, "weight": weight}


def measure_seed(settings: Settings, full: bool, eval_rows: int, rounds: int, batch_size: int,
                 batches: int, longer_epochs: int | None = None, prune: dict[str, Any] = PRUNE,
                 heal_rows: int | None = None, distill: tuple[float, float] | None = None,
                 teacher_rows: int | None = None) -> dict[str, Any]:
    """One seed's sides; `distill`: (temperature, weight) of a pruned-distilled side, taught by the unpruned side or
    by a `teacher_rows` one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.data import load

    sides: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        heal_texts = None
        if heal_rows:
            dataset, heal_texts = heal_file(settings, heal_rows, Path(tmp))
            prune = prune | {"heal": prune["heal"] | {"dataset": dataset}}
        order = SIDES[settings.seed % 2:] + SIDES[:settings.seed % 2]  # rotates, so a drifting load favours neither
        teacher = TEACHER if teacher_rows else "unpruned"  # main takes --teacher-rows with --distill only
        if teacher_rows:
            same_held_out(settings.train_rows, teacher_rows, eval_rows, settings.max_length, settings.seed)
        later = ((LONGER,) if longer_epochs else ()) + ((TEACHER,) if teacher_rows else ()) + (
            (DISTILLED,) if distill else ())
        own = {LONGER: replace(settings, epochs=longer_epochs), TEACHER: replace(settings, train_rows=teacher_rows)}
        for name in order + later:  # a teacher before its student
            taught = distillation_spec(Path(tmp) / teacher, *distill) if name == DISTILLED and distill else None
            sides[name] = train(own.get(name, settings), full, eval_rows, Path(tmp) / name, prune if name in (
                "pruned", LONGER, DISTILLED) else None, taught)
            print(f"bench.pruning: seed {settings.seed} {name}: accuracy {sides[name]['final']['accuracy']:.4f}, "
                  f"{sides[name]['train_seconds']:.0f}s training", flush=True)
        models = {n: AutoModelForSequenceClassification.from_pretrained(Path(tmp) / n).eval() for n in SIDES}
        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "pruned")
        texts = load(settings.train_rows, eval_rows, settings.max_length, settings.seed).test.inputs
        timing = latency(models, serving_batches(tokenizer, texts, batch_size, batches, settings.max_length), rounds)
        for n, model in models.items():
            sides[n]["parameters"] = sum(p.numel() for p in model.parameters())
            sides[n]["layers"] = model.config.num_hidden_layers
    differences = {n: sides[n]["final"]["accuracy"] - sides["unpruned"]["final"]["accuracy"] for n in sides}
    return {"seed": settings.seed, "sides": sides, "latency": timing, "accuracy_difference": differences["pruned"],
            **({"heal_texts": heal_texts} if heal_texts is not None else {}),
            **({"accuracy_difference_longer": differences[LONGER]} if longer_epochs else {}),
            **({"accuracy_difference_distilled": differences[DISTILLED]} if distill else {})}


def points(differences: list[float]) -> dict[str, Any]:
    """Accuracy differences over seeds in points: mean, range, spread, and whether the mean meets the goal."""
    mean = statistics.mean(differences)
    return {"mean": 100 * mean, "min": 100 * min(differences), "max": 100 * max(differences),
            "stdev": 100 * statistics.stdev(differences) if len(differences) > 1 else None,
            "goal_met": mean >= -GOAL_ACCURACY_POINTS / 100}


def summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    speedups = {c: [s["latency"]["speedup"][c] for s in seeds] for c in ("wall", "cpu")}
    headline = points([s["accuracy_difference"] for s in seeds])
    longer = [s["accuracy_difference_longer"] for s in seeds if "accuracy_difference_longer" in s]
    distilled = [s["accuracy_difference_distilled"] for s in seeds if "accuracy_difference_distilled" in s]
    return {"accuracy_difference_points": headline,
            **({"longer_accuracy_difference_points": points(longer)} if longer else {}),
            **({"distilled_accuracy_difference_points": points(distilled)} if distilled else {}),
            "speedup": {c: {"median": statistics.median(v), "min": min(v), "max": max(v)} for c, v in speedups.items()},
            "goal_accuracy_met": headline["goal_met"],
            "goal_speed_met": statistics.median(speedups["cpu"]) >= GOAL_SPEEDUP
            and statistics.median(speedups["wall"]) >= GOAL_SPEEDUP}


def markdown(seeds: list[dict[str, Any]], result: dict[str, Any], info: dict[str, Any], command: str,
             args: argparse.Namespace) -> str:
    rows = []
    for s in seeds:
        u, p = s["sides"]["unpruned"], s["sides"]["pruned"]
        loads = [side[k][0] for side in (u, p) for k in ("loadavg_before", "loadavg_after")]
        rows.append(
            f"| {s['seed']} | {p['removed_layers']} | {u['final']['accuracy']:.4f} | {p['final']['accuracy']:.4f} "
            f"| {100 * s['accuracy_difference']:+.2f} | {s['latency']['median_ms']['unpruned']['wall']:.1f} / "
            f"{s['latency']['median_ms']['pruned']['wall']:.1f} | {s['latency']['speedup']['wall']:.2f}× "
            f"| {s['latency']['speedup']['cpu']:.2f}× | {u['parameters']:,} / {p['parameters']:,} "
            f"| {u['train_seconds']:.0f} / {p['train_seconds']:.0f} |{heal_cell(p)} {fmt(min(loads), 1)}–"
            f"{fmt(max(loads), 1)} |")
    acc, speed = result["accuracy_difference_points"], result["speedup"]
    return "\n".join([
        "# Pruning: MiniLM, a quarter of its layers removed, against the unpruned fine-tune",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{info['git_commit']}`, started {info['started_utc']}, {info['nproc']} cores ({info['cpu']}), "
        f"{args.threads} torch thread(s), 1-minute load {info['loadavg_at_start'][0]:.1f} at the start",
        "",
        f"Both sides: {recipe_words(args)}, {args.train_rows} training rows, {args.epochs} epochs, batch "
        f"{args.batch_size}, max length {args.max_length}; accuracy on the test split ({seeds[0]['sides']['pruned']['test_samples']} rows). "
        f"Pruned: `rearrange.prune: {prune_spec(args.heal_steps, args.heal_lr)}` (6 → 4 layers, lowest Block "
        f"Influence{', healed before training' if args.heal_steps else ''}).{heal_words(seeds, args)} Latency: "
        f"{args.rounds} alternating rounds over {args.batches} test batches of {args.batch_size}, reloaded with "
        "`AutoModelForSequenceClassification`, same process and threads; speed-up = unpruned / pruned, the median "
        "over rounds.",
        "",
        "Headline: the same recipe and steps on both sides"
        + (" (the pruned side's healing is part of its pruning, its cost in its own column)." if args.heal_steps
           else "."),
        "",
        "| seed | removed layers | accuracy unpruned | accuracy pruned | difference (points) | ms per batch "
        "unpruned / pruned (wall) | speed-up (wall) | speed-up (CPU time) | parameters unpruned / pruned "
        "| training s unpruned / pruned |" + (" healing s, cosine to the unpruned before → after |"
                                               if args.heal_steps else "") + " 1-min load during training |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.heal_steps else "") + "---|",
        *rows,
        "",
        f"**Accuracy**: pruned minus unpruned, mean {acc['mean']:+.2f} points (range {acc['min']:+.2f} to "
        f"{acc['max']:+.2f}) — goal ≥ −{GOAL_ACCURACY_POINTS:.0f}: "
        f"**{'met' if result['goal_accuracy_met'] else 'not met'}**.  ",
        f"**Speed-up**: median over seeds {speed['wall']['median']:.2f}× wall ({speed['wall']['min']:.2f}–"
        f"{speed['wall']['max']:.2f}), {speed['cpu']['median']:.2f}× CPU time ({speed['cpu']['min']:.2f}–"
        f"{speed['cpu']['max']:.2f}) — goal ≥ {GOAL_SPEEDUP}×: **{'met' if result['goal_speed_met'] else 'not met'}**.",
        "",
        *longer_lines(seeds, result, args),
        *distilled_lines(seeds, result, args),
    ])


def longer_lines(seeds: list[dict[str, Any]], result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The pruned model trained longer, apart from the headline: a recipe difference, in about equal training time."""
    if "longer_accuracy_difference_points" not in result:
        return []
    rows = [f"| {s['seed']} | {s['sides']['unpruned']['final']['accuracy']:.4f} "
            f"| {s['sides'][LONGER]['final']['accuracy']:.4f} | {100 * s['accuracy_difference_longer']:+.2f} "
            f"| {s['sides']['unpruned']['train_seconds']:.0f} / {s['sides'][LONGER]['train_seconds']:.0f} "
            f"| {s['sides'][LONGER]['train_cpu_seconds'] / s['sides']['unpruned']['train_cpu_seconds']:.2f} |"
            for s in seeds]
    return apart_section(
        f"the pruned model trained for {args.longer_epochs} epochs instead of {args.epochs}",
        "A recipe difference: more steps for the pruned side, spending about the training time its smaller model "
        "saves (the CPU-time ratio below; the same model as the pruned side, so the same latency).",
        ["seed", "accuracy unpruned", "accuracy pruned, longer", "difference (points)",
         "training s unpruned / pruned longer", "training CPU time, pruned longer / unpruned"],
        rows, result["longer_accuracy_difference_points"])


def distilled_lines(seeds: list[dict[str, Any]], result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The pruned model taught by the unpruned fine-tune (or by one on more rows, `--teacher-rows`), apart from the
    headline: it needs that fine-tune first."""
    if "distilled_accuracy_difference_points" not in result:
        return []
    stronger = args.teacher_rows
    rows = [f"| {s['seed']} | {s['sides']['unpruned']['final']['accuracy']:.4f} "
            + (f"| {s['sides'][TEACHER]['final']['accuracy']:.4f} " if stronger else "")
            + f"| {s['sides']['pruned']['final']['accuracy']:.4f} | {s['sides'][DISTILLED]['final']['accuracy']:.4f} "
            f"| {100 * s['accuracy_difference_distilled']:+.2f} "
            f"| {100 * (s['accuracy_difference_distilled'] - s['accuracy_difference']):+.2f} "
            f"| {s['sides']['pruned']['train_seconds']:.0f} / {s['sides'][DISTILLED]['train_seconds']:.0f} |"
            for s in seeds]
    teacher = (f"the unpruned recipe trained on {stronger} rows (the job's {args.train_rows} and the "
               f"{stronger - args.train_rows} that follow them in the seed's split; the same validation and test "
               "splits)" if stronger else "the unpruned side's export of the seed")
    return apart_section(
        "the pruned model distilled from " + ("an unpruned fine-tune on more rows" if stronger else
                                              "the unpruned fine-tune"),
        f"A recipe difference: the pruned side's job plus `training.distillation: {{teacher: <{teacher}>, "
        f"temperature: {args.distill_temperature:g}, weight: {args.distill_weight:g}}}`, so it needs that fine-tune "
        "first; each step also runs the teacher (the training seconds below). The same model as the pruned side, so "
        "the same latency. The difference is to the unpruned side, as in the headline.",
        ["seed", "accuracy unpruned", *([f"accuracy teacher ({stronger} rows)"] if stronger else []),
         "accuracy pruned", "accuracy pruned, distilled", "difference (points)", "gain over pruned (points)",
         "training s pruned / distilled"],
        rows, result["distilled_accuracy_difference_points"])


def apart_section(title: str, words: str, columns: list[str], rows: list[str], acc: dict[str, Any]) -> list[str]:
    """A side apart from the headline: what differs, its table, and its accuracy against the unpruned fine-tune."""
    return [
        f"## Apart from the headline: {title}",
        "",
        words,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *rows,
        "",
        f"**Accuracy**: mean {acc['mean']:+.2f} points (range {acc['min']:+.2f} to {acc['max']:+.2f}, stdev "
        f"{fmt(acc['stdev'], 2)}) — goal ≥ −{GOAL_ACCURACY_POINTS:.0f}: "
        f"**{'met' if acc['goal_met'] else 'not met'}**.",
        "",
    ]


def heal_words(seeds: list[dict[str, Any]], args: argparse.Namespace) -> str:
    if not (args.heal_steps and args.heal_rows):
        return ""
    counts = sorted({s["heal_texts"] for s in seeds})
    return (f" Healing texts (`heal.dataset`): {args.heal_rows} rows of the corpus in none of the seed's train, "
            f"validation and test splits, **unlabelled** (their labels are never read), less any text also in a "
            f"held-out split: {'–'.join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))} texts.")


def heal_cell(side: dict[str, Any]) -> str:
    heal = side.get("heal")
    return f" {heal['seconds']:.0f}, {heal['cosine_before']:.3f} → {heal['cosine_after']:.3f} |" if heal else ""


def recipe_words(args: argparse.Namespace) -> str:
    if args.recipe == "full":
        return f"a full fine-tune (nothing frozen, no adapters, lr {args.learning_rate:g})"
    frozen = f"embeddings and the bottom {args.frozen_layers} layers frozen" if args.frozen_layers else "nothing frozen"
    shipped = " (the shipped LoRA recipe)" if args.frozen_layers == Settings.frozen_layers else ""
    return f"LoRA r 8, α 16, lr 2e-3, {frozen}{shipped}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--seeds", default="0,1,2", help="each seed changes the split, the head and the order")
    parser.add_argument("--recipe", choices=("lora", "full"), default="lora",
                        help="both sides' recipe: the shipped LoRA recipe, or a full fine-tune")
    parser.add_argument("--frozen-layers", type=int, default=defaults.frozen_layers,
                        help="lora: bottom layers frozen (counted after pruning); the shipped recipe freezes 2")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="full: the learning rate")
    parser.add_argument("--train-rows", type=int, default=defaults.train_rows)
    parser.add_argument("--eval-rows", type=int, default=1000,
                        help="test rows per seed (and validation rows): one row is 0.1 point")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--longer-epochs", type=int, default=None,
                        help="also train the pruned model for this many epochs, reported apart (a recipe difference)")
    parser.add_argument("--heal-steps", type=int, default=None,
                        help="heal the pruned model for this many steps before its training (rearrange.prune.heal)")
    parser.add_argument("--heal-lr", type=float, default=1e-4, help="the healing's learning rate")
    parser.add_argument("--heal-rows", type=int, default=None,
                        help="heal on this many unlabelled corpus rows outside the seed's splits, not the training texts")
    parser.add_argument("--distill", action="store_true",
                        help="also train the pruned model distilled from the unpruned side's export, reported apart")
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="--distill: training.distillation's")
    parser.add_argument("--distill-weight", type=float, default=0.5,
                        help="--distill: the share of the loss that is the teacher's soft targets")
    parser.add_argument("--teacher-rows", type=int, default=None,
                        help="--distill: the teacher is the unpruned recipe trained on this many rows, not the job's")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training and latency batches")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds per seed, alternating the order")
    parser.add_argument("--batches", type=int, default=8, help="test batches per latency round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training and inference")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder elsewhere takes results of any tree (trials)")
    args = parser.parse_args(argv)
    if args.heal_rows and not args.heal_steps:
        parser.error("--heal-rows needs --heal-steps")
    if args.teacher_rows is not None and not (args.distill and args.teacher_rows > args.train_rows):
        parser.error("--teacher-rows needs --distill, and more rows than --train-rows")
    refuse_dirty_tree(args.out)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")  # no metrics server beside a trainer already on :9090
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    info = machine()
    command = command_line()
    stem = result_stem("pruning", info)
    base = Settings(train_rows=args.train_rows, epochs=args.epochs, batch_size=args.batch_size,
                    max_length=args.max_length, learning_rate=args.learning_rate, frozen_layers=args.frozen_layers)
    done: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        done.append(measure_seed(replace(base, seed=seed), args.recipe == "full", args.eval_rows, args.rounds,
                                 args.batch_size, args.batches, args.longer_epochs,
                                 prune_spec(args.heal_steps, args.heal_lr), args.heal_rows,
                                 (args.distill_temperature, args.distill_weight) if args.distill else None,
                                 args.teacher_rows))
        result = summary(done)
        # Written after every seed, so an interrupted run keeps the seeds it finished.
        payload = {"command": command, "machine": info, "settings": vars(args) | {"out": str(args.out)},
                   "prune": prune_spec(args.heal_steps, args.heal_lr), "seeds": done, "summary": result}
        written = write_results(stem, payload, markdown(done, result, info, command, args), args.out)
        print(f"bench.pruning: seed {seed} done; {written}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
