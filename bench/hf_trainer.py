"""The baselines a user would pick instead of our trainer: `transformers.Trainer`, default, tuned, and tuned with PEFT."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import transformers
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from bench.common import minilm_path, stopwatch
from bench.data import tokenize
from bench.sides import EvalPoint, HeldOut, Settings, SideResult


class HeldOutClock(TrainerCallback):
    """Scores the held-out set every N steps and keeps training clocks (wall and the process's CPU time) that
    exclude that scoring."""

    def __init__(self, name: str, held_out: HeldOut, every: int):
        self.name, self.held_out, self.every = name, held_out, every
        self.points: list[EvalPoint] = []
        self.start = self.paused = self.train_seconds = 0.0
        self.cpu_start = self.cpu_paused = self.train_cpu_seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.paused = time.perf_counter(), 0.0
        self.cpu_start, self.cpu_paused = time.process_time(), 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        accuracy = self.held_out.accuracy(model, args.bf16)  # under the autocast the side trains with
        self.points.append(EvalPoint(step, t0 - self.start - self.paused, accuracy,
                                     c0 - self.cpu_start - self.cpu_paused))
        self.paused += time.perf_counter() - t0
        self.cpu_paused += time.process_time() - c0
        print(f"bench: {self.name} step {step}: {self.points[-1].seconds:.1f}s ({self.points[-1].cpu_seconds:.1f} "
              f"CPU s), accuracy {accuracy:.3f}", flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_seconds = time.perf_counter() - self.start - self.paused
        self.train_cpu_seconds = time.process_time() - self.cpu_start - self.cpu_paused


def _arguments(settings: Settings, variant: str, output_dir: str) -> TrainingArguments:
    """HF's text-classification example defaults, plus (tuned, lora) the best HF knobs we know for this workload."""
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lora_learning_rate if variant == "hf-lora" else settings.learning_rate,
        num_train_epochs=settings.epochs,
        seed=settings.seed,
        # Harness hygiene, not tuning: no checkpoints, no progress bars, no logging integrations.
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
    )
    if variant == "hf-default":
        return TrainingArguments(**common)
    bf16 = settings.precision == "bf16"
    return TrainingArguments(
        **common,
        train_sampling_strategy="group_by_length",  # LengthGroupedSampler: batches of similar length
        lr_scheduler_type=settings.schedule,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        # Autocast, as our side runs; HF refuses bf16 without a GPU unless told that the run is on the CPU.
        bf16=bf16,
        use_cpu=bf16,
    )


def with_our_recipe(model: Any, settings: Settings) -> Any:
    """PEFT LoRA as a user of it would add our recipe: the same adapters on the same modules (the names come from
    our analysis, so nothing differs by accident), the new head training in full, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    from finetune_trainer.config import Task
    from finetune_trainer.structure import depth, lora_candidates

    layers = depth(model, Task.SEQUENCE_CLASSIFICATION)
    targets = [n for n in lora_candidates(model, Task.SEQUENCE_CLASSIFICATION) if layers.of(n) > settings.frozen_layers]
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=targets, modules_to_save=["classifier"])
    return get_peft_model(model, config)


def run(data: Any, settings: Settings, name: str) -> SideResult:
    """Fine-tune MiniLM with `transformers.Trainer` on the trainer's split (`bench.data.load`): padded to max
    length (hf-default), dynamically (hf-tuned), or dynamically with our LoRA recipe through PEFT (hf-lora)."""
    names = [data.id2label[i] for i in range(len(data.id2label))]
    tuned = name != "hf-default"
    with stopwatch() as wall:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        transformers.set_seed(settings.seed)  # the new head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(),
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        if name == "hf-lora":
            model = with_our_recipe(model, settings)
        encoded = tokenize(tokenizer, data.train.inputs, settings.max_length, pad_to_max=not tuned)
        train = Dataset.from_dict({**encoded, "labels": data.train.labels})
        held_out = HeldOut(tokenizer, data.validation.inputs, data.validation.labels, settings.max_length)
        clock = HeldOutClock(name, held_out, settings.eval_every)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as out:
            trainer = Trainer(
                model=model,
                args=_arguments(settings, name, out),
                train_dataset=train,
                # run_glue.py: default_data_collator when padding to max length, else DataCollatorWithPadding.
                data_collator=DataCollatorWithPadding(tokenizer) if tuned else default_data_collator,
                processing_class=tokenizer,
                callbacks=[clock],
            )
            trainer.train()
    padded = sum(len(ids) for ids in encoded["input_ids"])
    return SideResult(
        name=name,
        evals=clock.points,
        steps=trainer.state.global_step,
        train_seconds=clock.train_seconds,
        train_cpu_seconds=clock.train_cpu_seconds,
        wall_seconds=wall["seconds"],
        final_accuracy=clock.points[-1].accuracy if clock.points else None,
        notes={"tokens_per_epoch_as_tokenized": padded},
    )
