"""Knowledge distillation (`training.distillation`): a teacher model's soft targets beside the labels.

Every rank loads its own teacher once (`models.load_model`), after the structure analysis and before pruning, the
baseline and training (none where the newest checkpoint already ends the training), in eval mode and without
gradients, on the same device. The training step runs it on each micro-batch under the same autocast, and
`train.distilled_loss_sum` blends its softened distribution into the summed loss. The validation and the final
evaluation never see it; with the baseline, its own test scores are measured (`Scored`).
The teacher reads the student's inputs, so it must score the same classes (text and image classifiers; its columns
are matched to the student's by label name) or the same vocabulary (text tasks).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import ModelSpec, Task, TrainerConfig
from finetune_trainer.data import by_number, matched_labels
from finetune_trainer.errors import ConfigError, ModelError, UserError
from finetune_trainer.models import (check_image_size, check_positions, head_labels, load_model, load_tokenizer,
                                     logits_of, new_modules, without_cache, without_segments)
from finetune_trainer.uris import fetch, local_path

log = logging.getLogger(__name__)

FIELD = "training.distillation.teacher"
UNNAMED = re.compile(r"LABEL_\d+")  # transformers' name of a class no one named, as new_head names a spare output


@dataclass
class Teacher:
    """The loaded teacher and how its predictions enter the loss."""

    model: nn.Module
    temperature: float
    weight: float
    columns: torch.Tensor | None = None  # the teacher's logit column of each student class; None: the same order
    # A causal LM whose table is padded past the tokenizer: the tokenizer's ids, the columns its soft targets keep
    # (train.soft_loss_sum gives the student's rows past them no probability); None: all of them.
    width: int | None = None

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits in the student's column order (call under the step's autocast)."""
        with torch.no_grad():
            logits = logits_of(self.model, without_segments(inputs, self.model))  # a one-segment teacher of pairs
        if self.width is not None:
            logits = logits[..., : self.width]
        return logits if self.columns is None else logits.index_select(-1, self.columns)


class Scored(nn.Module):
    """The teacher as an evaluation scores a model: its logits in the student's columns, so that its test scores
    are on the job's labels."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.model = teacher.model  # a submodule: the evaluation's broadcast of buffers and its eval() reach it

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher.logits(inputs)

    def train(self, mode: bool = True) -> Scored:
        """Always in eval mode: an evaluation puts back the mode it found, a new module's training mode, which
        turned the teacher's dropout on (and its BatchNorm to batch statistics) for every training step after."""
        return super().train(False)


def load_teacher(cfg: TrainerConfig, tokenizer: Any, student: nn.Module, id2label: dict[int, str], num_labels: int,
                 device: torch.device, dtype: torch.dtype | None = None) -> Teacher:
    """`training.distillation`'s teacher, checked against the student: the same classes (by name) for a classifier,
    the same vocabulary for a text model; one that could not read the student's inputs or score its targets is
    refused naming the field. Its weights are in bf16 where the run's autocast `dtype` (train.autocast_dtype) is
    bf16: no optimizer updates them, and they take half of fp32's memory (an 8B teacher: 16 GB per worker, not 32).
    Under fp16 they stay fp32: fp16 weights would put the residual stream, which autocast keeps in fp32, in fp16,
    whose range the activations of bf16-trained models exceed. The random streams are left as they were, so the
    student starts as it would alone."""
    spec = cfg.training.distillation
    assert spec is not None
    task = cfg.model.task
    where = spec.teacher.uri + (f" at revision {spec.teacher.revision}" if spec.teacher.revision else "")
    forked = [device] if device.type == "cuda" else []
    check_merged(cfg)
    try:
        with torch.random.fork_rng(devices=forked):  # load_model seeds the generators
            teacher = load_model(ModelSpec(task=task, uri=spec.teacher.uri, revision=spec.teacher.revision),
                                 tokenizer, cfg.training.seed, device,
                                 torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        check_positions(teacher, cfg.dataset.max_length)
        check_image_size(teacher, cfg.dataset.image_size)
        said = None if task == Task.IMAGE_CLASSIFICATION else teacher_tokenizer(cfg)
    except UserError as exc:  # the model's own words name model.* or dataset.*: say whose model it is
        raise type(exc)(f"{FIELD} {where}: {exc}") from exc
    if random := new_modules(teacher):
        raise ConfigError(f"{FIELD} {where}: its checkpoint lacks {', '.join(random)}, which would be random: a "
                          f"teacher is a model fine-tuned for {task.value}, such as a finished job's output")
    teacher.eval().requires_grad_(False)
    without_cache(teacher)
    width = None if task == Task.IMAGE_CLASSIFICATION else shared_vocabulary(teacher, student, tokenizer, said, where)
    student_names = by_number(head_labels(student)[0])
    columns = None if task == Task.CAUSAL_LM else label_columns(teacher, id2label, num_labels, where, student_names)
    size = sum(p.numel() for p in teacher.parameters())
    log.info("distilling from %s (%s parameters, %.0f MiB, a copy on each worker): loss per target = %.2g x the "
             "labels' cross-entropy + %.2g x T^2 x KL(teacher || student) at temperature T = %g", where, f"{size:,}",
             sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20, 1 - spec.weight, spec.weight,
             spec.temperature)
    return Teacher(teacher, spec.temperature, spec.weight, None if columns is None else columns.to(device), width)


def check_merged(cfg: TrainerConfig) -> None:
    """A local teacher that keeps LoRA adapters apart (adapter/, an export with rearrange.mergeOnExport: false) is
    refused: its model.safetensors lacks them, and it would teach as the model before its fine-tune. A cheap look,
    which the pipeline takes before anything loads; a hub teacher is not looked into."""
    spec = cfg.training.distillation
    if spec is None or spec.teacher.uri.startswith("hf://"):
        return
    if (local_path(spec.teacher.uri) / "adapter").is_dir():
        raise ConfigError(f"{FIELD} {spec.teacher.uri}: it keeps its LoRA adapters apart (adapter/, an export with "
                          "rearrange.mergeOnExport: false), and its weights without them are not the fine-tuned "
                          "model: export the teacher merged (rearrange.mergeOnExport: true)")


def vocabulary(model: nn.Module) -> tuple[int | None, int | None]:
    """Rows of the input embeddings and of the output layer (a causal LM's logits; None for a classifier)."""
    rows = [getattr(get(), "weight", None) if (get := getattr(model, name, None)) else None
            for name in ("get_input_embeddings", "get_output_embeddings")]
    return rows[0].shape[0] if rows[0] is not None else None, rows[1].shape[0] if rows[1] is not None else None


def teacher_tokenizer(cfg: TrainerConfig) -> Any:
    """The tokenizer saved with the teacher (its tokenizer_config.json); None where it has none, for which
    transformers would make one of the special tokens alone from the model's config."""
    spec = cfg.training.distillation
    assert spec is not None
    folder = fetch(spec.teacher.uri, kind="teacher", revision=spec.teacher.revision, error=ModelError)
    if not (folder / "tokenizer_config.json").is_file():
        return None
    # By its URI, not the folder fetched (a cache path need not be one a ModelSpec takes): the hub's cache answers.
    return load_tokenizer(ModelSpec(task=cfg.model.task, uri=spec.teacher.uri, revision=spec.teacher.revision))


def shared_vocabulary(teacher: nn.Module, student: nn.Module, tokenizer: Any, theirs_said: Any,
                      where: str) -> int | None:
    """The teacher reads the student's token ids, and a causal LM's distributions are compared token by token. With
    a tokenizer of its own (`theirs_said`), that must give every token the student's id, and the teacher's tables
    must hold every id (the student's, loaded for that tokenizer, do): tables padded past the tokenizer to other
    sizes (Qwen2.5-7B's 152,064 rows, 0.5B's 151,936, both for 151,665 tokens) differ only in rows no token uses,
    which the soft targets leave out: the tokenizer's ids are returned, the width of the teacher's logits to keep
    (None where the tables are the same size). Without one, only the sizes can be compared, and must be equal."""
    theirs, ours = vocabulary(teacher), vocabulary(student)
    if theirs_said is not None:
        given, wanted = theirs_said.get_vocab(), tokenizer.get_vocab()
        if other := [token for token, i in wanted.items() if given.get(token) != i]:
            raise ConfigError(f"{FIELD} {where}: its tokenizer gives {len(other)} of the student's {len(wanted)} "
                              f"tokens another id or none (such as {other[0]!r}): the teacher reads the student's "
                              "token ids, so it must use the same tokenizer")
        ids = max(wanted.values()) + 1  # not len(): a vocabulary's ids may have gaps
        short = [f"{rows} {whose}" for whose, rows in zip(("input", "output"), theirs)
                 if rows is not None and rows < ids]
        if short:
            raise ConfigError(f"{FIELD} {where}: its embeddings have {' and '.join(short)} rows, fewer than the "
                              f"tokenizer's {ids} token ids: a teacher must have a row for every token id")
        # A student's table narrower than the ids (a model made from a config) bounds what the two can compare.
        return min(ids, ours[1] or ids) if theirs[1] != ours[1] else None
    if theirs != ours:
        raise ConfigError(f"{FIELD} {where}: its vocabulary has {theirs[0]} tokens (output {theirs[1]}), the "
                          f"student's {ours[0]} (output {ours[1]}): the teacher reads the student's token ids, so it "
                          "must use the same tokenizer")
    return None


def label_columns(teacher: nn.Module, id2label: dict[int, str], num_labels: int, where: str,
                  student_names: dict[int, str] | None = None) -> torch.Tensor | None:
    """The teacher's logit column of each of the student's `num_labels` classes, matched by name (in any case where
    that is one to one, as data.head_order matches a trained head: data.matched_labels); None where they are in the
    same order. The teacher's head must have the student's `num_labels` columns and name every label of the job: one
    of another size is refused, a wider one too even when it names every label (its other classes' probability would
    be dropped from its soft targets). The student's spare columns (rearrange.head.numLabels above the labels) are
    matched by the names its head gives them (`student_names`: a kept head keeps its own, rearrange.new_head) too;
    those left take the teacher's left in order where either is unnamed (LABEL_i), and two other names are refused."""
    names, size = head_labels(teacher)
    ours = ", ".join(id2label.values())
    if size != num_labels:
        raise ConfigError(f"{FIELD} {where}: its head scores {size} classes, the student's {num_labels} ({ours}): a "
                          "teacher must be fine-tuned on the job's labels")
    named = matched_labels(id2label, names or {})
    if missing := [name for i, name in id2label.items() if i not in named]:
        said = ", ".join(map(str, (names or {}).values())) or "none (no labels.json beside its weights)"
        raise ConfigError(f"{FIELD} {where}: its labels ({said}) do not name {', '.join(missing)} of the job's "
                          f"({ours}): a teacher must be fine-tuned on the job's labels")
    spare = {i: (student_names or {}).get(i, f"LABEL_{i}") for i in range(num_labels) if i not in id2label}
    theirs = {i: name for i, name in by_number(names).items() if i not in named.values()}
    # By name first: in order, the teacher's fear taught the student's love where their spare classes' orders differ.
    named |= matched_labels({i: n for i, n in spare.items() if not UNNAMED.fullmatch(n)},
                            {i: n for i, n in theirs.items() if not UNNAMED.fullmatch(n)})
    rest = iter(sorted(set(range(size)) - set(named.values())))  # the heads' spare columns left, in order
    columns = [named[i] if i in named else next(rest) for i in range(num_labels)]
    if apart := [f"{theirs[c]} as {spare[i]}" for i, c in enumerate(columns) if i not in named
                 and not UNNAMED.fullmatch(spare[i]) and not UNNAMED.fullmatch(theirs.get(c, f"LABEL_{c}"))]:
        raise ConfigError(f"{FIELD} {where}: its classes beyond the job's labels are not the student's "
                          f"(rearrange.head.numLabels {num_labels}): it would teach {', '.join(apart)}; a teacher "
                          "must name them as the student's head does, or not at all (LABEL_i)")
    return None if columns == list(range(num_labels)) else torch.tensor(columns)


def report_section(cfg: TrainerConfig) -> dict[str, Any]:
    """What the report and the model card say of the distillation."""
    spec = cfg.training.distillation
    assert spec is not None
    return {"teacher": spec.teacher.uri, "revision": spec.teacher.revision, "temperature": spec.temperature,
            "weight": spec.weight}
