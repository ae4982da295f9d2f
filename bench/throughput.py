"""(c) Throughput of our training loop against a bare torch loop at identical settings.

Same model (MiniLM + a fresh 3-way head, copied from one pristine instance for every run), same
optimizer groups and schedule, same batches (the trainer's length-bucketed epoch order), fp32 on
the CPU. The bare loop is what a person writes by hand: pad, forward, mean loss, backward, clip,
step. Rounds alternate which side goes first (ABBA...), because the machine is shared and its
speed drifts; the ratio is bare seconds / our seconds (= our throughput / bare throughput).
"""

from __future__ import annotations

import argparse
import logging
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from bench import data
from bench.common import RESULTS, command_line, machine, minilm_path, refuse_dirty_tree, result_stem, write_results

GOAL = 0.97  # issue 4, item 11 (c)


@dataclass(frozen=True)
class Workload:
    train_rows: int = 1200
    batch_size: int = 32
    max_length: int = 128
    steps: int = 20
    rounds: int = 4
    learning_rate: float = 5e-5
    seed: int = 0


class Shared:
    """Everything both loops get: the pristine model, the encoded rows, the trainer's spec and batch order."""

    def __init__(self, w: Workload):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from finetune_trainer.batches import encode_text
        from finetune_trainer.config import AdjustSpec, TrainingSpec

        loaded = data.load(w.train_rows, 1, w.max_length, w.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.encoded = encode_text(loaded.train, self.tokenizer, w.max_length)
        torch.manual_seed(w.seed)
        self.pristine = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(loaded.id2label))
        self.adjust = AdjustSpec(learning_rate=w.learning_rate)
        # fp32 on both loops (whatever the CPU); checkpoints never fall due; no evaluation inside the loop.
        self.spec = TrainingSpec(max_steps=w.steps, batch_size=w.batch_size, precision="fp32", seed=w.seed,
                                 checkpoint_every_steps=10**9)
        self.w = w

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """A copy of the pristine model with the trainer's AdamW groups and warmup + cosine schedule."""
        from finetune_trainer.adjust import param_groups
        from finetune_trainer.config import Task
        from finetune_trainer.structure import depth, head_name
        from finetune_trainer.train import make_optimizer, make_scheduler

        model = copy.deepcopy(self.pristine)
        task = Task.SEQUENCE_CLASSIFICATION
        groups = param_groups(model, self.adjust, depth(model, task), head_name(model, task))
        optimizer = make_optimizer(groups, torch.device("cpu"))
        return model, optimizer, make_scheduler(optimizer, self.spec, self.w.steps)

    def batch_order(self) -> list[list[int]]:
        from finetune_trainer.batches import epoch_batches

        order: list[list[int]] = []
        epoch = 0
        while len(order) < self.w.steps:
            order += epoch_batches(self.encoded.lengths, self.w.batch_size, seed=self.w.seed, epoch=epoch, bucketed=True)
            epoch += 1
        return order[: self.w.steps]


class Clock:
    """Wall seconds, and the CPU seconds of this process: the second is far less sensitive to other
    processes taking the shared cores (though threads that spin while waiting still count)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_ours(shared: Shared) -> Clock:
    from finetune_trainer.batches import make_collate
    from finetune_trainer.config import Task
    from finetune_trainer.distributed import World
    from finetune_trainer.train import train_loop

    model, optimizer, scheduler = shared.fresh()
    task = Task.SEQUENCE_CLASSIFICATION
    collate = make_collate(task, shared.tokenizer.pad_token_id, 0)
    with Clock() as clock:
        state = train_loop(model, optimizer, scheduler, shared.encoded, collate, shared.spec, task,
                           World(rank=0, size=1, device=torch.device("cpu")))
    assert state.step == shared.w.steps, state.step
    return clock


def run_bare(shared: Shared, limit: int | None = None) -> Clock:
    """The loop a person writes by hand, on the same batches in the same order."""
    model, optimizer, scheduler = shared.fresh()
    rows, labels, pad = shared.encoded.features, shared.encoded.labels, shared.tokenizer.pad_token_id
    model.train()
    with Clock() as clock:
        for idx in shared.batch_order()[:limit]:
            input_ids = pad_sequence([torch.tensor(rows[i]) for i in idx], batch_first=True, padding_value=pad)
            attention_mask = pad_sequence([torch.ones(len(rows[i]), dtype=torch.long) for i in idx], batch_first=True)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = F.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return clock


SIDES: dict[str, Callable[[Shared], Clock]] = {"bare": run_bare, "ours": run_ours}


def markdown(rounds: list[dict[str, float]], cpu: list[dict[str, float]], w: Workload, info: dict[str, Any],
             command: str, tokens: int) -> str:
    sides = list(rounds[0])
    others = [side for side in sides if side != "bare"]
    lines = [
        "# (c) Throughput: our training loop vs a bare torch loop (CPU)",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads); load average at start {info['loadavg_at_start'][0]:.1f} "
        "(the machine is shared: compare the ratios).",
        f"Workload: all-MiniLM-L6-v2 full fine-tune, fp32, {asdict(w)}; {tokens} real tokens per round and side "
        "(dynamic padding, the trainer's length-bucketed order).",
        "",
        "| round | order | " + " | ".join(f"{s} s" for s in sides) + " | " + " | ".join(f"{s}/bare" for s in others) + " |",
        "|---|---|" + "---|" * (len(sides) + len(others)),
    ]
    for i, r in enumerate(rounds):
        lines.append(f"| {i + 1} | {', '.join(r)} | " + " | ".join(f"{r[s]:.1f}" for s in sides) + " | "
                     + " | ".join(f"{r['bare'] / r[s]:.3f}" for s in others) + " |")
    lines.append("")
    for side in others:
        ratios = [r["bare"] / r[side] for r in rounds]
        total = sum(r["bare"] for r in rounds) / sum(r[side] for r in rounds)
        goal = f" (goal ≥{GOAL})"
        cpu_ratios = [r["bare"] / r[side] for r in cpu]
        lines.append(f"- {side} throughput / bare throughput: median over rounds **{statistics.median(ratios):.3f}**, "
                     f"over all seconds {total:.3f}{goal}; by CPU seconds: median {statistics.median(cpu_ratios):.3f} "
                     f"(rounds: {', '.join(f'{q:.3f}' for q in cpu_ratios)}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(Workload()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--sides", default="bare,ours", help=f"from {', '.join(SIDES)}; bare is the reference")
    parser.add_argument("--name", default="throughput", help="results file stem under bench/results (a date is added)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="a folder elsewhere takes results of any tree (trials)")
    args = parser.parse_args(argv)
    refuse_dirty_tree(args.out)
    # The trainer's progress lines (a step line every 10 s), so a long run shows it is alive.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    w = Workload(**{k: getattr(args, k) for k in asdict(Workload())})
    sides = args.sides.split(",")
    info = machine()
    shared = Shared(w)
    tokens = sum(len(shared.encoded.features[i]) for idx in shared.batch_order() for i in idx)
    run_bare(shared, limit=3)  # warm-up, not measured: first-touch allocations and kernel selection
    rounds: list[dict[str, float]] = []
    cpu: list[dict[str, float]] = []
    for i in range(w.rounds):
        order = sides if i % 2 == 0 else sides[::-1]  # who goes first alternates: the machine's speed drifts
        clocks = {side: SIDES[side](shared) for side in order}
        rounds.append({side: c.wall for side, c in clocks.items()})
        cpu.append({side: c.cpu for side, c in clocks.items()})
        print(f"bench.throughput: round {i + 1}: wall {rounds[-1]}, cpu {cpu[-1]}", flush=True)
    command = command_line()
    report = markdown(rounds, cpu, w, info, command, tokens)
    payload = {"command": command, "machine": info, "workload": asdict(w), "tokens_per_side_round": tokens,
               "rounds": rounds, "cpu_rounds": cpu,
               "median_ratio_vs_bare": {s: statistics.median(r["bare"] / r[s] for r in rounds) for s in sides if s != "bare"}}
    print(report)
    print(f"written: {write_results(result_stem(args.name, info), payload, report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
