"""Stage 4: the training loop, one plain function.

`train_loop` takes a model ready to train (adapters placed, frozen parameters set), the
encoded training data and a collate function, and runs optimizer steps until the step
budget is spent or early stopping fires. What it does, in order, for every step:

- takes the next `gradientAccumulation` micro-batches of this rank (dynamic padding,
  optionally length-bucketed; see `batches.epoch_batches`);
- sums the loss over them and divides by the number of loss targets (samples for
  classifiers, scored tokens for LMs) of the whole step on all ranks, so accumulation and
  DDP give the gradient of one big batch (torchtune's token-normalised loss);
- stops with `LossNotFinite` when that loss is NaN or Inf, before the weights see it (as an early stop, with
  the best weights, where early stopping keeps them);
- clips the gradient norm, steps AdamW and the warmup + decay schedule;
- evaluates every `evalEverySteps` (early stopping on the first metric), checkpoints every
  `checkpointEverySteps` and at the end; on SIGTERM it checkpoints at once, before an evaluation
  that was due, or abandoning one under way at its next batch (the resumed run makes up for it), or
  right after the checkpoint or the evaluation it came in, and raises `Terminated`.

With early stopping on, the loop keeps the weights of the best evaluation (rank 0, in memory and in
every checkpoint) and puts them back on every rank at the end, so the model it leaves is the best one seen,
not the one that ran `patience` evaluations past it.

It is also the unit a throughput benchmark calls directly: build the model, the optimizer
(`make_optimizer`) and the data (`batches.encode_text`, `batches.make_collate`), then
`train_loop(model, optimizer, scheduler, data, collate, spec, task, world)`; the returned
`LoopState` holds the step count, the seconds spent training, throughput and the history.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune_trainer import checkpoints
from finetune_trainer.batches import IGNORE_INDEX, Batch, Encoded, collated, epoch_batches, loader_threads, rank_batches
from finetune_trainer.config import Batching, Metric, Precision, Schedule, Task, TrainingSpec
from finetune_trainer.distill import Teacher
from finetune_trainer.distributed import World
from finetune_trainer.errors import CheckpointMismatch, DataError, LossNotFinite, Terminated
from finetune_trainer.models import autocast, logits_of

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {Metric.LOSS, Metric.PERPLEXITY}


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint, so a resumed run continues exactly here."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # optimizer steps already taken in this epoch
    seconds: float = 0.0  # time spent in training steps, without evaluations and checkpoints
    # The process's CPU time in those same steps: on a shared machine it counts the work done, not the share of
    # the cores the job was granted (with one intra-op thread; more threads add their spin-waits to it).
    cpu_seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    # Token positions computed, padding included, for the MFU gauge (tokens/s counts real tokens). A checkpoint from
    # before it has none: its real tokens stand in for them (a lower bound; see train_loop).
    padded_tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # {step, seconds_since_train_start, loss, lr, grad_norm}
    evals: list[dict[str, Any]] = field(default_factory=list)  # {step, seconds_since_train_start, cpu_seconds..., metrics}
    best: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    stopped_early: bool = False
    diverged: str | None = None  # why training stopped early where the loss went non-finite (see diverged_early)
    restored_best: bool = False  # the weights at the end are those of best_step


def loop_state(saved: dict[str, Any]) -> LoopState:
    """The state a checkpoint saved. A field an older trainer did not save takes its default; one a newer trainer
    saved (a rollback) is left out, with a warning: passed on, it raised a TypeError, retried for ever."""
    known = {f.name for f in fields(LoopState)}
    if unknown := sorted(saved.keys() - known):
        log.warning("the checkpoint's state holds %s, which this trainer does not know (a newer one wrote it): "
                    "resuming without", ", ".join(unknown))
    # Counted from 0 under the run's tokens and seconds, padded tokens made MFU read 0 at the resume's report
    return LoopState(**{"padded_tokens": saved.get("tokens", 0)} | {k: v for k, v in saved.items() if k in known})


@dataclass
class Hooks:
    """Optional callbacks of the caller: evaluation, progress reporting, checkpoints."""

    # Given a function to call before each batch (as many times on every rank): on SIGTERM it raises, and the loop
    # checkpoints as if the evaluation had not begun.
    evaluate: Callable[[Callable[[], None]], dict[str, float]] | None = None
    on_step: Callable[[LoopState, int], None] | None = None  # (state, total steps)
    on_eval: Callable[[LoopState], None] | None = None
    checkpoint_dir: Path | None = None
    # Whether the caller's own SIGTERM handler took one before the loop began: the Terminated it raised is lost when
    # it lands in a __del__ (a data loader's, a file's), which Python prints and drops.
    sigterm_before: Callable[[], bool] | None = None


# CPU flags (Linux's /proc/cpuinfo) of native bf16 arithmetic: x86's AMX and AVX-512 BF16, Arm's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


@functools.cache
def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 instructions. oneDNN runs bf16 matmuls on them at twice fp32's rate or more
    (AMX: a MiniLM training step took half the CPU time of fp32's); without them it emulates bf16, slower than fp32.
    torch's own check (`mkldnn._is_mkldnn_bf16_supported`) says yes to any AVX-512 CPU, emulating ones included."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return not NATIVE_BF16_FLAGS.isdisjoint(value.split())
    return False


# Tasks whose models `auto` trains in bf16 on a CPU: transformers. In a ResNet-18 on the CPU (torch 2.15, oneDNN
# with AMX), bf16 autocast gave a convolution a non-finite weight gradient in some runs of the same seeded step (1 in
# 12 to 6 in 10), so convolutional models keep fp32 there unless a job asks for bf16.
CPU_BF16_TASKS = frozenset({Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM})


def precision_name(dtype: torch.dtype | None) -> str:
    """The API's name (`training.precision`) of what `autocast_dtype` chose."""
    return {torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16}.get(dtype, Precision.FP32).value


def autocast_dtype(precision: Precision, device: torch.device, task: Task) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, None for fp32. `auto` is bf16 where the hardware computes it
    natively: a bf16 GPU, or a CPU with bf16 instructions for a text model; else fp32."""
    if precision == Precision.FP32:
        return None
    if precision == Precision.BF16:
        return torch.bfloat16
    if precision == Precision.FP16:
        return torch.float16
    if device.type == "cuda":
        # not emulated: a T4 or V100 runs bf16 through fp32 kernels, slower than fp32 itself
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    native = device.type == "cpu" and task in CPU_BF16_TASKS and cpu_computes_bf16()
    return torch.bfloat16 if native else None


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel: on a CPU the unfused step of a 22M-parameter model costs
    seconds (five times the fused one), more than its forward and backward."""
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"))


def make_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec, total_steps: int):
    warmup = min(round(spec.warmup_ratio * total_steps), total_steps - 1)  # the last step, at least, at the peak

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup  # from zero at the first step, linearly up to the peak at step `warmup`
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.schedule == Schedule.COSINE:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if spec.schedule == Schedule.LINEAR:
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(data: Encoded, spec: TrainingSpec, world: World) -> int:
    batches = rank_batches(len(data.lengths), spec.batch_size, world.size)
    if not batches:
        raise DataError(f"{len(data.lengths)} training samples are fewer than the {world.size} workers "
                        "(runtime.workers x runtime.processesPerWorker): train on more (dataset.maxTrainSamples)")
    return math.ceil(batches / spec.gradient_accumulation)


def total_steps(data: Encoded, spec: TrainingSpec, world: World) -> int:
    return spec.max_steps or spec.epochs * steps_per_epoch(data, spec, world)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Summed (not averaged) loss, so that the caller divides by the targets of the whole step."""
    if task == Task.OBJECT_DETECTION:  # a detector returns its loss, averaged over the batch's images
        return logits.float() * labels.shape[0]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), scored(labels, task).reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def scored(labels: torch.Tensor, task: Task) -> torch.Tensor:
    """The target each position of the logits is scored on (IGNORE_INDEX: none)."""
    if task == Task.CAUSAL_LM:  # position t predicts token t+1; the last predicts nothing
        # The labels shift, not the logits: a slice's backward allocates a zero gradient of the logits' whole size
        # (0.47 GiB for 8 x 1,024 tokens of a 30k vocabulary in bf16: about the gap, 0.46 GiB, between our peak memory
        # and HF's Trainer's in bench/gpu.py on an H200, whose loss shifts the labels too).
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def soft_loss_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, task: Task,
                  temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) summed over the positions `loss_sum` scores (a causal LM's
    shifted, unmasked tokens), so that it is normalised by the same targets. Every position is computed and those
    not scored are multiplied by 0: selecting the scored ones (a boolean index) allocated in the backward a zero
    gradient of the logits' whole size, which `scored` spares the labels' loss."""
    keep = (scored(labels, task) != IGNORE_INDEX).float()
    student = F.log_softmax(logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if task == Task.CAUSAL_LM and (extra := student.shape[-1] - teacher.shape[-1]) > 0:
        # The student's rows past the teacher's logits (distill.Teacher.width: the tokenizer's ids) are no token's:
        # the teacher gives them no probability, with a finite floor (-inf's 0 x inf is NaN). Not a slice of the
        # student's logits, whose backward would allocate a zero gradient of their whole size.
        teacher = F.pad(teacher, (0, extra), value=-1e30)
    return ((teacher.exp() * (teacher - student)).sum(-1) * keep).sum()


def distilled_loss_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, task: Task,
                       temperature: float, weight: float) -> torch.Tensor:
    """Per target (1 - w) x cross-entropy on the label + w x T^2 x KL to the teacher's softened distribution, summed
    (Hinton et al.'s T^2 keeps the soft term's gradient on the hard term's scale as T changes). The logits are
    widened to fp32 once, for both terms: under autocast a causal LM's are [batch, tokens, vocabulary]."""
    logits = logits.float()  # loss_sum's and soft_loss_sum's .float() are then no copies
    soft = soft_loss_sum(logits, teacher_logits, labels, task, temperature)
    return (1 - weight) * loss_sum(logits, labels, task) + weight * temperature ** 2 * soft


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step and before each evaluation batch (the main thread
    only)."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def __enter__(self) -> SigtermFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, the flag stays down
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, *_: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step (an evaluation under way stops at its next batch)")
        self.raised = True

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            if self.raised and exc_type is None:  # it came after the loop's last look: the handler outside takes it
                signal.raise_signal(signal.SIGTERM)


class EvaluationStopped(Exception):
    """Every rank saw SIGTERM during an evaluation in the loop: it stops at this batch, unrecorded."""


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Encoded,
               collate: Callable[[Encoded, list[int]], Batch], spec: TrainingSpec, task: Task, world: World,
               hooks: Hooks | None = None, metric: Metric | None = None, teacher: Teacher | None = None) -> LoopState:
    """Train `model` (already on `world.device`, DDP-wrapped when world.size > 1) on `data`; see the module docstring.

    `metric` is the evaluation metric that early stopping watches (the first key `hooks.evaluate` returns if None).
    With a `teacher` (this rank's), the loss blends in its soft targets (`distilled_loss_sum`).
    """
    hooks = hooks or Hooks()
    total = total_steps(data, spec, world)
    per_epoch = steps_per_epoch(data, spec, world)
    eval_every = spec.eval_every_steps or per_epoch
    state = LoopState()
    best: dict[str, torch.Tensor] | None = None  # weights of state.best_step, kept when early stopping is on
    dtype = autocast_dtype(spec.precision, world.device, task)
    scaler = grad_scaler(world.device, dtype)
    # Every rank was seeded alike (spec.seed), for equal fresh weights: each draws its own dropout masks, and none
    # replays the stream that drew those weights.
    if world.size > 1:
        torch.manual_seed(spec.seed + 1 + world.rank)
    if hooks.checkpoint_dir is not None and (
            resumed := checkpoints.load(hooks.checkpoint_dir, unwrap(model), optimizer, scheduler, scaler, world)):
        saved, best = resumed
        state = loop_state(saved)
        if state.history and hooks.on_step:  # where it resumes is its progress until the next step (if any) is made
            hooks.on_step(state, total)
        if state.evals and hooks.on_eval:  # and its latest validation, else none until the next one (an epoch away)
            hooks.on_eval(state)
    saved_at: tuple[int, int] | None = state.step, len(state.evals)  # what the newest checkpoint holds (see save)
    if spec.distillation is not None and teacher is None and state.step < total and not state.stopped_early:
        # The pipeline loads none where the newest checkpoint ends the training; one that did not resume (a misfit,
        # removed; or one that could not be read, set aside) leaves steps to make, which must not be made without it.
        # A retry, whose newest checkpoint then no longer ends the training, loads it.
        raise RuntimeError(f"training.distillation: no teacher for steps {state.step + 1} to {total} (the newest "
                           "checkpoint, which ended the training, was not resumed); a retry loads it")

    def evaluation_due() -> bool:
        done = bool(state.evals) and state.evals[-1]["step"] == state.step
        return hooks.evaluate is not None and state.step > 0 and not done and (
            state.step % eval_every == 0 or state.step == total)

    def stop_evaluating() -> None:  # the ranks agree, so that all of them leave at the same batch
        if world.any(sigterm.raised):
            raise EvaluationStopped

    def evaluate_now() -> None:
        nonlocal best
        try:
            metrics = hooks.evaluate(stop_evaluating)
        except EvaluationStopped:  # as if SIGTERM had come before it: saved without it, the resumed run runs it
            log.warning("SIGTERM: left the evaluation at step %d unfinished; the resumed run evaluates", state.step)
            save()
            raise terminated() from None
        if record_eval(state, metrics, spec, metric) and spec.early_stopping and world.main:
            best = checkpoints.trained_tensors(unwrap(model))  # rank 0's alone (see the end)
        model.train()
        if hooks.on_eval:
            hooks.on_eval(state)

    def stop_if_sigterm() -> None:
        """After an evaluation or a checkpoint, which may take long: a SIGTERM that came during it stops the run now
        (the ranks agree), not after one more step and a checkpoint the grace period may not hold."""
        if world.any(sigterm.raised):
            save()  # after an evaluation, its step with it; after a checkpoint, nothing
            raise terminated()

    def terminated() -> Terminated:
        return Terminated(f"stopped by SIGTERM at step {state.step}"
                          + ("; a checkpoint holds it" if hooks.checkpoint_dir else ""))

    def save() -> None:
        # By its evaluations too: a step SIGTERM saved before its due evaluation is written again once the resumed run
        # has made it, else a run it stopped early (or ended) kept a checkpoint without it, its stop or best weights.
        nonlocal saved_at
        if hooks.checkpoint_dir is not None and saved_at != (state.step, len(state.evals)):
            checkpoints.save(hooks.checkpoint_dir, state.step, unwrap(model), optimizer, scheduler, scaler,
                             asdict(state), world, spec.keep_checkpoints, best)
            saved_at = state.step, len(state.evals)

    model.train()
    with SigtermFlag() as sigterm:
        if hooks.sigterm_before and hooks.sigterm_before():  # stopped after one step, saved (never cleared: one may
            sigterm.raised = True                              # have come since the flag was put up)
        if evaluation_due():  # SIGTERM came at a step due for evaluation, or during it: the checkpoint went first
            evaluate_now()
            stop_if_sigterm()
        while state.step < total and not state.stopped_early:
            batches = epoch_batches(data.lengths, spec.batch_size, seed=spec.seed, epoch=state.epoch,
                                    bucketed=spec.batching == Batching.LENGTH_BUCKETED, rank=world.rank,
                                    world_size=world.size)
            # the steps left of the epoch (a resumed one skips those it made) and of the run: no batch is made for none
            steps = [batches[i:i + spec.gradient_accumulation] for i in range(0, len(batches), spec.gradient_accumulation)
                     ][:per_epoch][state.position:][:total - state.step]
            # the epoch's draws of dataset.augment
            drawn = replace(data, augmenting=replace(data.augmenting, epoch=state.epoch)) if data.augmenting else data
            with contextlib.closing(collated(drawn, collate, [idx for micro in steps for idx in micro],
                                             loader_threads(task, world.device))) as loaded:
                for micro in steps:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    lr = optimizer.param_groups[0]["lr"]  # what this step uses
                    try:
                        loss, grad_norm, samples, tokens, padded_tokens, stop = train_step(
                            model, [next(loaded) for _ in micro], task, world, dtype, scaler, spec.max_grad_norm,
                            optimizer, lambda: sigterm.raised, state.step + 1, teacher)
                    except LossNotFinite as exc:  # raised on every rank alike: the loss and norm are summed
                        if not diverged_early(state, spec, exc):
                            raise
                        saved_at = None  # the checkpoint of this step, if any, lacks the stop
                        break
                    if math.isfinite(grad_norm):  # else fp16's GradScaler skipped the step: the schedule waits too
                        scheduler.step()
                    state.step += 1
                    state.position += 1
                    state.seconds += time.perf_counter() - started
                    state.cpu_seconds += time.process_time() - cpu_started
                    state.samples += samples
                    state.tokens += tokens
                    state.padded_tokens += padded_tokens
                    state.history.append({"step": state.step, "seconds_since_train_start": state.seconds, "loss": loss,
                                          "lr": lr, "grad_norm": grad_norm})
                    if hooks.on_step:
                        hooks.on_step(state, total)
                    if stop:  # within the grace period: save now; the due evaluation runs when the run resumes
                        save()
                        raise terminated()
                    evaluated = evaluation_due()
                    if evaluated:
                        evaluate_now()
                    checkpointed = state.step % spec.checkpoint_every_steps == 0
                    if checkpointed:
                        save()
                    if evaluated or checkpointed:  # the same steps on every rank
                        stop_if_sigterm()
                    if state.step >= total or state.stopped_early:
                        break
                else:
                    state.epoch += 1
                    state.position = 0
        save()  # the end of training, so that evaluating and exporting can be resumed without training again
        if world.sum([float(sigterm.raised)])[0]:  # it came during the last step or its evaluation: stop here too
            raise terminated()
    # Rank 0 alone keeps the best weights, and the others take them from it: a copy on every rank was one per GPU of a
    # large model in the node's memory, where the ranks' weights are the same.
    if world.broadcast(best is not None and state.best_step != state.step):
        failed: CheckpointMismatch | None = None
        if best is not None:
            try:
                checkpoints.restore(unwrap(model), best, f"the best weights (step {state.best_step})")
            except CheckpointMismatch as exc:
                failed = exc
        if world.any(failed is not None):  # else the others would wait in the broadcast below until torchrun's end
            try:
                raise failed or CheckpointMismatch("rank 0 could not put the best weights back (its log says why)")
            finally:  # this frame holding the exception, whose traceback holds the frame, kept the model (and its
                failed = None  # process group, under DDP) until a garbage collection, the interpreter's exit at worst
        world.broadcast_tensors(checkpoints.trained(unwrap(model)).values())
        state.restored_best = True
        log.info("restored the weights of step %s, the best evaluation (%s)", state.best_step, state.best)
    return state


def train_step(model: nn.Module, micro: list[Batch], task: Task, world: World, dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler, max_norm: float, optimizer: torch.optim.Optimizer,
               stop_requested: Callable[[], bool], step: int,
               teacher: Teacher | None = None) -> tuple[float, float, int, int, int, bool]:
    """Optimizer step number `step` over the micro-batches; returns (loss, gradient norm before clipping, samples,
    tokens, padded tokens, whether any rank got SIGTERM by the end of its backward). A norm that is not finite means
    fp16's GradScaler skipped the step. A `teacher` runs on each micro-batch under the same autocast."""
    targets, samples, tokens, padded_tokens = world.sum([
        sum(b.targets for b in micro), sum(b.samples for b in micro), sum(b.tokens for b in micro),
        sum(b.padded_tokens for b in micro)])
    total_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    for i, batch in enumerate(micro):
        batch = batch.to(world.device)
        # DDP averages gradients over ranks; scaling by world.size makes it the sum over all targets / targets.
        sync = contextlib.nullcontext() if i == len(micro) - 1 or world.size == 1 else model.no_sync()
        with sync:
            with autocast(world.device.type, dtype):
                logits = logits_of(model, batch.inputs)
                taught = teacher.logits(batch.inputs) if teacher is not None else None
            loss = loss_sum(logits, batch.labels, task) if taught is None else distilled_loss_sum(
                logits, taught, batch.labels, task, teacher.temperature, teacher.weight)
            # else they lived through the next micro-batch's forward and backward: [batch, tokens, vocabulary] more
            del logits, taught
            scaler.scale(loss * world.size / max(targets, 1)).backward()
        total_loss += loss.detach()
    norm = unscaled_norm(scaler, optimizer, model.parameters(), max_norm)  # on the device; read with the loss below
    # The step's one wait for the device: the loss and the stop flag summed over the ranks, read with the norm (the
    # same on every rank). The flag is asked after the backward: a SIGTERM during this step makes it the last.
    flag = torch.full((), float(stop_requested()), dtype=torch.float64, device=world.device)  # a fill, not a copy
    summed = world.sum_tensor(torch.stack([total_loss, flag]))
    # (`clip_grad_norm_` returns a CPU zero when no parameter has a gradient)
    loss_total, stop, grad_norm = torch.cat([summed, norm.to(summed).reshape(1)]).tolist()
    loss_value = loss_total / max(targets, 1)
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise diverged(f"the training loss is {loss_value} at step {step}", dtype)
    scaled_step(scaler, optimizer, grad_norm, lambda: diverged(
        f"the gradient norm is {grad_norm} at step {step} (the loss is {loss_value})"
        + (f", fp16's loss scale halved down to {scaler.get_scale()} by the steps it skipped" if scaler.is_enabled()
           else ""), dtype))
    return loss_value, grad_norm, int(samples), int(tokens), int(padded_tokens), stop > 0


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16's loss scaling, off at other precisions: unscaled, the gradients of a small loss underflow fp16 to zero."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def unscaled_norm(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                  max_norm: float) -> torch.Tensor:
    """Divide the loss scale out of the gradients and clip them to `max_norm`; returns their norm before clipping,
    on the device: not finite where fp16's scale made them overflow."""
    scaler.unscale_(optimizer)
    return nn.utils.clip_grad_norm_(params, max_norm)


# fp16's loss scale below which a skipped step is a divergence. The scale starts at 2**16, halves at each skipped step
# and doubles after 2,000 taken, so 17 skips in a row take it below (a healthy run's first overflows take a few).
# Under 1 the gradients overflow fp16 unscaled, past 65,504: without a bound every step was skipped to the end, and
# the run exported untrained weights with exit 0.
MIN_LOSS_SCALE = 1.0


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, grad_norm: float,
                diverged: Callable[[], LossNotFinite]) -> bool:
    """Step on the gradients `unscaled_norm` measured, and clear them; returns whether the step was taken. fp16's
    scaler skips a step whose gradients are not finite (and lowers its scale), until its scale is below
    MIN_LOSS_SCALE; without one they diverged: raises. Every rank decides alike: the norm and the scale follow the
    gradients, which DDP made the same on all."""
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
        raise diverged()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # the scale is read (a wait for the device) only after a skip
    if not math.isfinite(grad_norm) and scaler.get_scale() < MIN_LOSS_SCALE:
        raise diverged()
    return math.isfinite(grad_norm)


def diverged(what: str, dtype: torch.dtype | None, rate: str = "adjust.learningRate") -> LossNotFinite:
    """The error of a step that diverged: where, and the fields to change (`rate`, the learning rate of what
    diverged: the training's or healing's; fp32 to a run not in it already, bf16 too to an fp16 one, whose range is
    the narrower)."""
    return LossNotFinite(f"{what}: lower {rate}, check the data for broken rows"
                         + {None: "", torch.float16: ", or set training.precision: bf16 or fp32"}.get(
                             dtype, ", or set training.precision: fp32"))


def diverged_early(state: LoopState, spec: TrainingSpec, exc: LossNotFinite) -> bool:
    """Whether a diverged step ends the training as an early stop: where early stopping keeps the best weights and
    an evaluation made them, those are what the run has learnt, and the job failed and lost them (a new run with a
    lower rate starts a new folder). Then they are put back, evaluated on the test split and exported as after a
    stop by patience, and the divergence is said in the log, the report and the job's status."""
    if spec.early_stopping is None or state.best_step is None:
        return False
    state.stopped_early, state.diverged = True, str(exc)
    log.warning("training stops early: %s; the best weights, of step %d (%s), are evaluated and exported",
                exc, state.best_step, state.best)
    return True


def record_eval(state: LoopState, metrics: dict[str, float], spec: TrainingSpec, metric: Metric | None) -> bool:
    """Note an evaluation and decide on early stopping; returns whether it is the best so far."""
    state.evals.append({"step": state.step, "seconds_since_train_start": state.seconds,
                        "cpu_seconds_since_train_start": state.cpu_seconds, "metrics": metrics})
    key = metric or Metric(next(iter(metrics)))
    value = metrics[key.value]
    sign = -1 if key in LOWER_IS_BETTER else 1
    min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
    # NaN compares False with all: one made best stayed best, and early stopping put its weights back
    improved = math.isfinite(value) and (state.best is None or sign * (value - state.best) > min_delta)
    if improved:
        state.best, state.best_step, state.evals_without_gain = value, state.step, 0
    else:
        state.evals_without_gain += 1
    if spec.early_stopping and state.evals_without_gain >= spec.early_stopping.patience:
        log.info("early stop at step %d: %s has not improved for %d evaluations", state.step, key.value,
                 state.evals_without_gain)
        state.stopped_early = True
    return improved


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot build its kernels here, or None. Inductor builds a CPU's with a C++ compiler ($CXX,
    else g++), Triton a GPU's launcher with a C compiler ($CC, else gcc or clang); without one the first step failed,
    after the model loaded and the baseline ran, and so did every retry."""
    if device.type == "cuda":
        if os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"):
            return None
        return "Triton needs a C compiler (gcc or clang, or $CC) to compile for the GPU, and none is on PATH"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx):
        return None
    return f"inductor needs a C++ compiler ({cxx}) to compile for the CPU, and it is not on PATH"


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, under torch.compile's wrapper and DDP's (`training.compile` compiles the DDP module)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
