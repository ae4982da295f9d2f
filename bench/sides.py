"""What a benchmark side produces, and the held-out evaluation the Hugging Face sides share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Settings:
    """One workload, identical for every side; the HF default side ignores the schedule fields on purpose."""

    train_rows: int = 960
    eval_rows: int = 300
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 128
    eval_every: int = 5
    seed: int = 0
    # Our trainer's default schedule; the tuned HF side copies it, the default HF side keeps HF's.
    schedule: str = "cosine"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    # Our recipe for this task, as deploy/examples/minilm-sentiment.yaml ships it: the bottom layers frozen,
    # LoRA on every module the analysis picks above them, at the larger rate adapters want.
    frozen_layers: int = 2
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_learning_rate: float = 2e-3
    # Autocast on both trainers of a pair: what our `auto` picks on the machine (bench.accuracy's default), fp32 in
    # every run before CPUs with bf16 instructions were recognised.
    precision: str = "fp32"


def auto_precision() -> str:
    """What our `precision: auto` trains MiniLM at on this machine's CPU, and so what both sides of a pair train at."""
    from finetune_trainer.config import Precision, Task
    from finetune_trainer.train import autocast_dtype

    dtype = autocast_dtype(Precision.AUTO, torch.device("cpu"), Task.SEQUENCE_CLASSIFICATION)
    return "fp32" if dtype is None else "bf16"


@dataclass
class EvalPoint:
    step: int
    seconds: float  # training seconds since the first step, evaluation time excluded
    accuracy: float
    cpu_seconds: float | None = None  # the process's CPU seconds over the same span (None: a run before the CPU clock)

    def at(self, clock: str) -> float | None:
        return self.cpu_seconds if clock == "cpu" else self.seconds


@dataclass
class SideResult:
    name: str
    evals: list[EvalPoint] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0  # the training loop alone, evaluation excluded
    wall_seconds: float = 0.0  # everything the side did, loading and evaluation included
    train_cpu_seconds: float | None = None  # CPU seconds of the training loop, over the same span as train_seconds
    final_accuracy: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # None: a run from before sides were paired by seed (they were zipped in seed order)

    def time_to(self, target: float, clock: str = "cpu") -> float | None:
        """Training seconds (by `clock`) at the first evaluation that reached `target`, or None if none did."""
        return next((p.at(clock) for p in self.evals if p.accuracy >= target), None)

    def training(self, clock: str) -> float:
        return (self.train_cpu_seconds if clock == "cpu" else self.train_seconds) or 0.0

    def steps_to(self, target: float) -> int | None:
        return next((p.step for p in self.evals if p.accuracy >= target), None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SideResult:
        return cls(**{**d, "evals": [EvalPoint(**e) for e in d["evals"]]})


class HeldOut:
    """The fixed held-out set, tokenized once and batched by length so evaluating costs little.

    Padding does not change a BERT's predictions (the attention mask hides it), so every HF side
    is scored with the same code on the same token ids, whatever it pads to while training.
    """

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int], max_length: int, batch_size: int = 64):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        self.batches = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            features = [{k: enc[k][i] for k in enc} for i in idx]
            batch = tokenizer.pad(features, return_tensors="pt")
            self.batches.append((dict(batch), torch.tensor([labels[i] for i in idx])))
        self.size = len(texts)

    @torch.inference_mode()
    def accuracy(self, model: torch.nn.Module, bf16: bool = False) -> float:
        """Scored as the side trains: under bf16 autocast when it does, as HF's own evaluation loop would be."""
        was_training = model.training
        model.eval()
        correct = 0
        for inputs, labels in self.batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**inputs).logits
            correct += int((logits.argmax(-1) == labels).sum())
        model.train(was_training)
        return correct / self.size
