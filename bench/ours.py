"""Our side: the trainer's whole pipeline (`finetune_trainer.pipeline.run`) on the shared spec."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import minilm_path, stopwatch
from bench.data import dataset_spec
from bench.sides import EvalPoint, Settings, SideResult


def recipe(settings: Settings, full: bool = False) -> dict[str, Any]:
    """The `adjust` and `rearrange` sections of a side: our shipped example (bottom layers frozen, LoRA above them),
    or, `full`, our defaults: every weight trains at the shared learning rate."""
    if full:
        return {"adjust": {"learningRate": settings.learning_rate, "weightDecay": settings.weight_decay},
                "rearrange": {}}
    freeze = {"strategy": "bottom-layers", "count": settings.frozen_layers} if settings.frozen_layers else {
        "strategy": "none"}
    return {
        "adjust": {"learningRate": settings.lora_learning_rate, "weightDecay": settings.weight_decay,
                   "freeze": freeze},
        "rearrange": {"lora": {"rank": settings.lora_rank, "alpha": settings.lora_alpha, "dropout": 0.0}},
    }


def config(settings: Settings, output_dir: Path, full: bool) -> Any:
    """A FineTuneJob spec as a user would write it: our recipe (or, `full`, our defaults: a full fine-tune at the
    shared learning rate), plus the workload every side shares."""
    from finetune_trainer.config import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "model": {"uri": str(minilm_path()), "task": "sequence-classification"},
            "dataset": dataset_spec(settings.train_rows, settings.eval_rows, settings.max_length),
            **recipe(settings, full),
            "training": {
                "epochs": settings.epochs,
                "batchSize": settings.batch_size,
                "schedule": settings.schedule,
                "warmupRatio": settings.warmup_ratio,
                "evalEverySteps": settings.eval_every,
                # The HF sides save nothing while training; neither do we.
                "checkpointEverySteps": 1_000_000,
                "seed": settings.seed,
                "precision": settings.precision,
            },
            "evaluation": {"metrics": ["accuracy"], "baseline": False},
            "output": {"uri": str(output_dir)},
        }
    )


def run(settings: Settings, full: bool) -> SideResult:
    """Run the six stages; the training clock (evaluations excluded) and the evaluations come from the report."""
    from finetune_trainer import pipeline

    name = "ours-full" if full else "ours"
    # Port 0: no metrics server, so a benchmark never collides with a trainer already serving :9090.
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as out, stopwatch() as wall:
        report = pipeline.run(config(settings, Path(out), full), Path(out))
    training = report["training"]
    evals = [EvalPoint(e["step"], e["seconds_since_train_start"], e["metrics"]["accuracy"],
                       e["cpu_seconds_since_train_start"]) for e in training["evals"]]
    for p in evals:
        print(f"bench: {name} step {p.step}: {p.seconds:.1f}s ({p.cpu_seconds:.1f} CPU s), accuracy {p.accuracy:.3f}",
              flush=True)
    return SideResult(
        name=name,
        evals=evals,
        steps=training["steps"],
        train_seconds=training["seconds"],
        train_cpu_seconds=training["cpu_seconds"],
        wall_seconds=wall["seconds"],
        # The last evaluation on the held-out rows every side is scored on; the pipeline's own final score comes
        # from its test split, which the HF sides never see (kept in the notes).
        final_accuracy=evals[-1].accuracy if evals else None,
        notes={"test_split_accuracy": report["evaluation"]["final"]["accuracy"],
               **{k: training.get(k) for k in ("samples_per_second", "tokens_per_second", "train_samples",
                                               "validation_samples", "test_samples")}},
    )


def train_causal_lm(model: Any, batches: list[Any], learning_rate: float, steps: int, device: Any,
                    on_step: Any = None) -> None:
    """Our `train_loop` on pre-packed causal-LM rows (the GPU benchmark): bf16 autocast on a GPU, AdamW as
    the pipeline builds it (fused), constant learning rate, no evaluation and no checkpoints."""
    import torch

    from finetune_trainer.batches import Encoded, make_collate
    from finetune_trainer.config import Task, TrainingSpec
    from finetune_trainer.distributed import World
    from finetune_trainer.train import Hooks, make_optimizer, make_scheduler, train_loop

    rows = [row for batch in batches for row in batch.tolist()]
    data = Encoded(features=rows, labels=None, lengths=[len(r) for r in rows])
    spec = TrainingSpec(max_steps=steps, batch_size=len(batches[0]), batching="dynamic", schedule="constant",
                        warmup_ratio=0.0, precision="bf16" if device.type == "cuda" else "fp32",
                        checkpoint_every_steps=10**9)
    # One group, no weight decay: HF's default TrainingArguments (weight_decay=0), the other side.
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate, "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, device)
    hooks = Hooks(on_step=(lambda state, total: on_step(state.step)) if on_step else None)
    train_loop(model, optimizer, make_scheduler(optimizer, spec, steps), data, make_collate(Task.CAUSAL_LM, 0, 0),
               spec, Task.CAUSAL_LM, World(rank=0, size=1, device=torch.device(device)), hooks)
