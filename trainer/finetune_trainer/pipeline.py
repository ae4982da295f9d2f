"""The six stages, read top to bottom: load, analyze, adjust, rearrange, train (with the
baseline before it), evaluate, export.

`run(cfg, output_dir)` is the whole job. It returns the report that it also writes to
output_dir/report.json: `analysis`, `evaluation: {baseline, final, delta, teacher}` (on the test split;
the teacher's: training.distillation's),
`training: {steps, seconds, cpu_seconds, samples_per_second, tokens_per_second, history, evals (on the
validation split), ...}`. It writes the
termination message, success or not, and re-raises what stopped it (the CLI maps that to
an exit code).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer import analyze as analysis
from finetune_trainer import checkpoints, distill, distributed, export, prune, torchrun, uris
from finetune_trainer.adjust import freeze, freeze_checked, lora_targets, merging_picks_targets, param_groups
from finetune_trainer.batches import (Augmenting, Batch, Encoded, decode_side, digest, encode_causal, encode_images,
                                      encode_text, epoch_batches, eval_batches, make_collate, pair_marker,
                                      say_truncated)
from finetune_trainer.config import (Augmentation, Batching, HealSpec, PruneSpec, Stage, Task, TrainerConfig,
                                     heal_dataset)
from finetune_trainer.data import (LabelledData, Split, bad_images, bad_images_error, cap_jpeg_memory,
                                   check_label_count, head_order, in_head_order, load_dataset, load_texts)
from finetune_trainer.detection import analysis as detection_analysis
from finetune_trainer.detection.coco import load_coco, renumbered
from finetune_trainer.detection.metrics import evaluate_detector
from finetune_trainer.detection.models import check_batch_size, load_detector, resize_head
from finetune_trainer.errors import EXIT_OK, ConfigError, DataError, Terminated, no_space_in
from finetune_trainer.evaluate import deltas, evaluate
from finetune_trainer.lora_fused import FORMS, fuse
from finetune_trainer.models import (cache_off, check_image_size, check_one_sample_batches, check_positions,
                                     check_vocabulary, checkpoint_layers, has_causal_switch, head_labels, held_at,
                                     load_model, load_tokenizer, new_modules, one_segment, widened)
from finetune_trainer.rearrange import add_adapters, merge_adapters, new_head
from finetune_trainer.structure import depth, head_module, head_name, pruned_depth
from finetune_trainer.telemetry import Metrics, write_failure, write_termination
from finetune_trainer.train import (Hooks, LoopState, autocast_dtype, compiler_missing, make_optimizer, make_scheduler,
                                    precision_name, steps_per_epoch, total_steps, train_loop)
from finetune_trainer.uris import local_path

log = logging.getLogger(__name__)


class Progress:
    """The stage reached and the figures so far, for the metrics, the log and the termination message."""

    def __init__(self, metrics: Metrics, main: bool) -> None:
        self.metrics = metrics
        self.main = main
        self.stage = Stage.STARTING
        self.message: dict[str, Any] = {}
        self.bar: Any = None
        self.last_log = 0.0
        # A SIGTERM came. Its Terminated is raised where the run is, and lost if that is a __del__ (Python prints and
        # drops it), so each stage's start and the run's end look here too.
        self.sigterm = False

    def terminated(self) -> Terminated:
        trained = self.stage in (Stage.EVALUATING, Stage.EXPORTING)
        return Terminated(f"stopped by SIGTERM in stage {self.stage.value}"
                          + ("; the trained weights are in a checkpoint" if trained else ""))

    def enter(self, stage: Stage) -> None:
        if self.sigterm:
            raise self.terminated()
        self.stage = stage
        self.metrics.set_stage(stage)
        if self.main:
            log.info("stage %s", stage.value)

    def evaluating(self, rows: int, task: Task) -> None:
        """Said before an evaluation during training: on a large validation split it takes minutes without a step.
        A causal LM's rows are its texts' chunks, named as the model card and the CLI's summary name them."""
        if self.main:
            log.info("evaluating on the validation split (%d %s)", rows, export.rows_of(task))

    def evaluated(self, state: LoopState) -> None:
        latest = state.evals[-1]
        self.metrics.set_eval("training", latest["metrics"])
        if self.main:
            log.info("validation at step %d: %s", latest["step"], latest["metrics"])

    def trained(self, state: LoopState) -> None:
        """An early stop ends the plan at its step, as in the status (100%, no time left): with the planned total
        kept, the dashboard showed a job that had succeeded short of 100% and with time left."""
        if state.stopped_early:
            self.metrics.total_steps.set(state.step)
            if progress := self.message.get("progress"):  # the operator reads the same end
                progress["totalSteps"] = state.step

    def step(self, state: LoopState, total: int, flops: analysis.StepFlops | None) -> None:
        last = state.history[-1]
        m = self.metrics
        m.loss.set(last["loss"])
        m.learning_rate.set(last["lr"])
        m.grad_norm.set(last["grad_norm"])
        m.step.set(state.step)
        m.total_steps.set(total)
        m.epoch.set(state.epoch)
        m.set_throughput((state.seconds, state.step, state.samples, state.tokens, state.padded_tokens), flops)
        self.message["progress"] = {"step": state.step, "totalSteps": total, "epoch": state.epoch}
        # The gauges' rates, which the status showed until this message replaced them at the end: the run's average
        # there (carried over a resume) put another samples/s beside the last tokens/s.
        self.message["metrics"] = {"loss": last["loss"], "learningRate": last["lr"],
                                   "samplesPerSecond": m.samples_per_second.value}
        if m.tokens_per_second.value is not None:
            self.message["metrics"]["tokensPerSecond"] = m.tokens_per_second.value
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(state.step - self.bar.n)
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        now = time.monotonic()
        if now - self.last_log >= 10 or state.step in (1, total):  # a line every 10 s is enough for `kubectl logs`
            self.last_log = now
            # The gauges' recent rate, as the status and the dashboard show: the run's average (a resume carries it
            # over) gave a run resumed on slower GPUs the first attempt's speed and a fraction of the time left.
            eta = (total - state.step) / max(m.steps_per_second.value or 0.0, 1e-9)  # set by set_throughput above
            log.info("step %d/%d epoch %d loss %.4f lr %.2e grad norm %.3g %.1f samples/s eta %.0fs", state.step,
                     total, state.epoch, last["loss"], last["lr"], last["grad_norm"], m.samples_per_second.value or 0.0,
                     eta)


def run(cfg: TrainerConfig, output_dir: Path) -> dict[str, Any]:
    """Run the whole pipeline; see the module docstring for the report it returns and writes."""
    metrics: Metrics | None = None
    cap_jpeg_memory()
    try:
        # Rank 0 serves before the ranks join: the rendezvous and NCCL's start may take minutes, through which the
        # operator read a Running pod that refused its scrapes as stale metrics, and the dashboard saw no stage.
        metrics = Metrics(distributed.local_device())
        metrics.set_stage(Stage.STARTING)
        if torchrun.rank() == 0:
            metrics.serve()
        world = distributed.join()
    except BaseException as exc:
        write_failure(Stage.STARTING, exc)
        if metrics is not None:
            metrics.close()
        raise
    progress = Progress(metrics, world.main)

    def stop(*_: Any) -> None:  # outside the training loop, which checkpoints first (train.SigtermFlag)
        progress.sigterm = True
        raise progress.terminated()

    previous = interrupt = None
    try:
        with contextlib.suppress(ValueError):  # not the main thread: SIGTERM keeps its default
            previous = signal.signal(signal.SIGTERM, stop)
            interrupt = ctrl_c_as_sigterm()
        with uris.pinned():  # the hub commits this run loads its models at
            report = stages(cfg, Path(output_dir), world, progress)
        if progress.sigterm:  # it came during the export, and its Terminated was lost
            raise progress.terminated()
        if previous is not None:  # finished: a SIGTERM now must not turn the run into a failure that is retried
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        distributed.leave()  # after its last barrier; a failed run leaves it to torchrun, as a rank may be in one
        write_termination({"stage": Stage.DONE.value, "reason": "Succeeded", "message": outcome(report),
                           "exitCode": EXIT_OK, **progress.message})
        return report
    except BaseException as caught:
        if previous is not None:  # one SIGTERM is enough: the termination message still has to go out
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # What failed after a SIGTERM failed because of it: a library that caught the Terminated raised its own error
        # (transformers' OSError "Can't load tokenizer", read as the user's), or a rank whose Terminated was lost met
        # its stopped peers' collective. Either would have failed the job for good, or counted a retry.
        exc = progress.terminated() if progress.sigterm and not isinstance(caught, Terminated) else caught
        # Any write may meet a full volume (healed layers, baseline, analysis, export), each library saying so its way
        full = no_space_in(Path(output_dir), exc)
        write_failure(progress.stage, full or exc, progress.message)
        if full is not None:
            raise full from caught
        if exc is not caught:
            raise exc from caught
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        metrics.close()  # Ctrl-C still ends its wait for the last scrape, as SIGTERM does
        if interrupt is not None:
            signal.signal(signal.SIGINT, interrupt)


def ctrl_c_as_sigterm() -> Any:
    """Ctrl-C stops a run as SIGTERM does: a checkpoint of the steps made, a one-line message, exit 143; it raised
    KeyboardInterrupt mid-step, which lost the steps since the last periodic checkpoint and printed a traceback. A
    SIGINT ignored when the trainer started (a background job of a script) stays ignored. Returns the handler
    to put back, or None."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None

    def forward(*_: Any) -> None:
        log.warning("Ctrl-C (SIGINT): stopping as on SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)

    return signal.signal(signal.SIGINT, forward)


def outcome(report: dict[str, Any]) -> str:
    """One line for the job's status: the steps, and the first metric on the test split before and after."""
    evaluation = report["evaluation"]
    metric, final = next(iter(evaluation["final"].items()))
    before = evaluation["baseline"].get(metric)
    change = f"{before:.4g} -> {final:.4g}" if before is not None else f"{final:.4g}"
    training = report["training"]
    diverged = f"; stopped early with the best validation's weights: {training['diverged']}" if training.get(
        "diverged") else ""
    return f"{training['steps']} steps; test {metric} {change}{diverged}"


def stages(cfg: TrainerConfig, out: Path, world: distributed.World, progress: Progress) -> dict[str, Any]:
    task = cfg.model.task
    seed = cfg.training.seed
    detecting = task == Task.OBJECT_DETECTION

    if problem := cfg.adjust.freeze.pattern_problem():  # before anything is loaded
        raise ConfigError(f"adjust.freeze.pattern: {problem}")
    if cfg.training.compile and (missing := compiler_missing(world.device)):
        raise ConfigError(f"training.compile: {missing}; set it to false, or use an image that has one")
    if detecting:
        check_batch_size(cfg.model.architecture or "", cfg.training.batch_size)
    distill.check_merged(cfg)  # the teacher itself loads after the analysis
    check_output_apart(cfg, out)
    check_output(out)
    if world.main:  # an export an earlier attempt was killed putting in place is whole from the start
        export.recover(out)
    world.barrier()  # and no other rank reads the output folder while it moves
    # Before anything is fetched: the hub commits an earlier attempt of this run loaded its models at, loaded again
    earlier_base = world.main_look(checkpoints.earlier_base, out / "checkpoints",
                                   *(fingerprinted(cfg, world.size, defaults=defaults) for defaults in (False, True)))
    uris.pin((earlier_base or {}).get("hub", {}))
    progress.enter(Stage.LOADING)
    tokenizer = None if task in (Task.IMAGE_CLASSIFICATION, Task.OBJECT_DETECTION) else load_tokenizer(cfg.model)
    data = load_coco(cfg.dataset, seed) if detecting else load_dataset(cfg.dataset, task, seed)
    if task == Task.IMAGE_CLASSIFICATION:
        cropped = Augmentation.RANDOM_RESIZED_CROP in (cfg.dataset.augment or ())  # its crops decode the most
        check_images_once(data, cfg.dataset.uri, world, decode_side(cfg.dataset.image_size, cropped))
    num_labels = 0 if task == Task.CAUSAL_LM else check_label_count(data.id2label, cfg.rearrange.head.num_labels)
    train_data, validation_data, test_data = encode(data, tokenizer, cfg, world.main)
    # read now: a bad file stops the job before the model loads
    heal_data = healing_texts(cfg, tokenizer, train_data, (data.validation, data.test))
    collate = make_collate(task, tokenizer.pad_token_id if tokenizer else 0, cfg.dataset.image_size)
    if detecting:
        torch.manual_seed(seed)  # fresh weights and a new head, the same on every rank and rerun
        model = load_detector(cfg.model, cfg.dataset.image_size).to(world.device)
        if order := trained_head_order(model, data.id2label, num_labels, cfg.rearrange.head.reinitialize,
                                       data.category_ids):
            data = renumbered(data, order)
            train_data, validation_data, test_data = encode(data, tokenizer, cfg, world.main)
        model.category_ids = data.category_ids  # for the export, whose labels are the class ids
    else:
        model = load_model(cfg.model, tokenizer, seed, world.device)
        if cfg.training.gradient_checkpointing:  # before the analysis, whose probe step measures the memory with it
            checkpoint_layers(model)
        if order := trained_head_order(model, data.id2label, num_labels, cfg.rearrange.head.reinitialize):
            data = in_head_order(data, order)
            train_data, validation_data, test_data = (replace(e, labels=[order[i] for i in e.labels])
                                                      for e in (train_data, validation_data, test_data))
        if train_data.segments is not None and one_segment(model):  # healing's batches too
            train_data, validation_data, test_data, heal_data = (
                replace(e, segments=None) for e in (train_data, validation_data, test_data, heal_data))
    check_positions(model, cfg.dataset.max_length)
    check_image_size(model, cfg.dataset.image_size)
    if detecting:  # its analysis trains a step of every weight (its loss needs train mode), before any freeze
        check_one_sample_batches(model, cfg.dataset.image_size, cfg.training.batch_size, len(train_data.lengths))
    if tokenizer is not None:
        check_vocabulary(model, tokenizer.pad_token_id, (train_data, validation_data, test_data, heal_data))

    progress.enter(Stage.ANALYZING)
    def training_batches(split: Encoded = train_data) -> Iterator[Batch]:
        """The split's batches, epoch after epoch, in the order one worker's training loop takes them."""
        for epoch in itertools.count():
            for idx in epoch_batches(split.lengths, cfg.training.batch_size, seed=seed, epoch=epoch,
                                     bucketed=cfg.training.batching == Batching.LENGTH_BUCKETED):
                yield collate(split, idx).to(world.device)

    probe = list(itertools.islice(training_batches(), cfg.analyze.probe_batches))
    dtype = autocast_dtype(cfg.training.precision, world.device, cfg.model.task)
    if world.main:
        log.info("precision %s: %s%s on %s", cfg.training.precision.value, precision_name(dtype),
                 " autocast" if dtype else "", world.device.type)
    if detecting:
        report = detection_analysis.analyze(model, probe, train_data, num_labels, dtype)
    else:
        report = analysis.analyze(model, probe, task, num_labels, adapters=cfg.rearrange.lora is not None, dtype=dtype)
    if world.main:
        log.info("structure analysis:\n%s", "\n".join([analysis.summary(report), *(
            detection_analysis.summary_lines(report) if detecting else [])]))
        out.mkdir(parents=True, exist_ok=True)
        analysis_text = export.json_text(report.to_dict())  # through a temporary file: a kill never tears it
        checkpoints.replace_atomically(out, "analysis.json", lambda tmp: tmp.write_text(analysis_text))
    progress.message["analysis"] = {"totalParameters": report.total_parameters,
                                    "trainableParameters": report.trainable_parameters,
                                    "findings": [f.__dict__ for f in report.findings]}
    if report.importance:
        progress.message["analysis"]["layerImportance"] = [round(s, 4) for s in report.importance["layers"]["scores"]]
    if cfg.analyze.fail_on_fatal:
        analysis.fail_on_fatal(report)

    progress.enter(Stage.ADJUSTING)
    layers = depth(model, task, probe[0], dtype)  # what sits outside the layers, by when the forward reads it
    head = head_name(model, task)  # the Linear a new head replaces
    trained_head = head_module(model, head)  # what trains as the head: RoBERTa's classifier (dense + out_proj)
    spec_head = cfg.rearrange.head
    if task == Task.CAUSAL_LM and world.main and (spec_head.num_labels != "auto" or spec_head.reinitialize):
        log.warning("rearrange.head: a causal-lm has no classification head (its output layer is its vocabulary): "
                    "numLabels and reinitialize are ignored")
    new = new_modules(model)  # random at load: like a new head, they train whole whatever the freeze
    unmatched = freeze_checked(model, cfg.adjust.freeze, layers, trained_head, new)

    eval_size = cfg.evaluation.batch_size or cfg.training.batch_size

    per_class: dict[str, dict[str, float]] = {}  # a detector's AP by category, on the test split

    def sigterm_taken() -> None:  # a Terminated lost in a __del__ stops the baseline or final evaluation at a batch
        if world.any(progress.sigterm):
            raise progress.terminated()

    def measure(m: nn.Module, split: Encoded, phase: str | None = None,
                before_batch: Callable[[], None] = sigterm_taken) -> dict[str, float]:
        world.broadcast_buffers(m)  # every rank scores (and early stopping keeps) the model rank 0 exports
        if not detecting:
            return evaluate(m, split, collate, task, cfg.evaluation_metrics, eval_size, world, num_labels, dtype,
                            before_batch)
        scores, by_category = evaluate_detector(m, split, collate, cfg.evaluation_metrics, eval_size, world,
                                                data.id2label, before_batch)
        if phase is not None:
            per_class[phase] = by_category
        return scores

    progress.enter(Stage.REARRANGING)
    if detecting:  # no freeze follows (a detector takes neither LoRA nor pruning): nothing to spare its head from
        resize_head(model, num_labels + 1, cfg.rearrange.head.reinitialize)  # the background is class 0
    elif head is not None and new_head(model, head, num_labels, data.id2label, cfg.rearrange.head.reinitialize):
        new = tuple(dict.fromkeys((*new, head)))  # the freezes after this one spare it
    pruning: dict[str, Any] = {}
    serving: list[Batch] = []  # the test batches a pruned model's latency is measured on, before and after
    drop = None
    base = world.main_look(base_identity, cfg, earlier_base)
    data_digest = digest(train_data, validation_data, test_data, *([heal_data] if heal_data else []))
    picks = cfg.rearrange.lora is not None and merging_picks_targets(model, cfg.rearrange.lora, task, trained_head, new)
    if cfg.rearrange.prune is not None:
        prune.stack_for(model, task, "rearrange.prune")  # says why, for a model with no list of whole layers
        prune.check_unshared(layers)
        drop = earlier_pruning(out / "checkpoints", cfg, world, pruned_layers(report, cfg.rearrange.prune, world),
                               data_digest, picks, base)
    # Named by the layers pruning removes; healing keeps its result there.
    identity, full = (fingerprinted(cfg, world.size, drop, data_digest, defaults, picks, base)
                      for defaults in (False, True))
    checkpoint_dir = checkpoints.run_folder(out / "checkpoints", identity, world, full)
    # The teacher, after the analysis (its probe's measured peak memory is the model's alone) and before pruning,
    # healing, the baseline and training: one that does not fit the job stops it before them. None where the newest
    # checkpoint already ends the training (an attempt retried in the final evaluation or the export): nothing is
    # left to teach, and a teacher gone since does not stop a finished model's export.
    teacher = None
    if cfg.training.distillation is not None:
        if checkpoints.finished(checkpoint_dir, total_steps(train_data, cfg.training, world), world):
            log.info("training.distillation: the teacher is not loaded, the newest checkpoint of %s ends the "
                     "training", checkpoint_dir)
        else:
            teacher = distill.load_teacher(cfg, tokenizer, model, data.id2label, num_labels, world.device, dtype)
            # the teacher's hub commit too, for the next attempt (rank 0's look: every rank takes the branch)
            if (pinned := world.main_look(uris.current_pins)) and pinned != base.get("hub"):
                checkpoints.note_base(checkpoint_dir, base | {"hub": pinned}, world)
    if cfg.rearrange.prune is not None and drop is not None:
        serving = [collate(test_data, idx).to(world.device)
                   for idx in eval_batches(test_data.lengths, eval_size)[: prune.LATENCY_BATCHES]]
        heal = cfg.rearrange.prune.heal if drop else None  # a threshold may remove none: nothing to heal
        # Healing's target is the model before pruning, a copy as large as the model; an attempt that resumes
        # loads the layers an earlier one healed and needs none.
        # Rank 0's look, every rank's answer: ranks that each looked in a shared folder seen otherwise healed beside
        # others loading (different collectives)
        healed = heal is not None and world.main_look(checkpoints.healed_kept, checkpoint_dir)
        pruning, unpruned = prune_layers(model, task, report, drop, cfg, serving, measure, test_data,
                                          heal is not None and not healed, world)
        if heal is not None:
            pruning["heal"] = heal_once(model, unpruned, task, training_batches(heal_data), heal, dtype,
                                        healed, checkpoint_dir, world)
            del unpruned
        loaded, layers = layers, pruned_depth(depth(model, task, probe[0], dtype), layers, drop)
        for p in model.parameters():  # the freeze counted the layers as loaded; count the ones that stay
            p.requires_grad_(True)
        freeze_checked(model, cfg.adjust.freeze, layers, trained_head, new, loaded, unmatched)
        progress.message["pruning"] = {"removedLayers": pruning["removed_layers"]}
    if cfg.rearrange.lora is not None:
        targets = lora_targets(model, cfg.rearrange.lora, task, cfg.adjust.freeze, layers, trained_head, new,
                               merging=cfg.rearrange.merge_on_export)
        model = add_adapters(model, cfg.rearrange.lora, targets, trained_head, new)
        freeze(model, cfg.adjust.freeze, layers, trained_head, new)
        if form := FORMS.get(world.device.type):  # other devices keep peft's own path
            log.info("LoRA computed as %s on %d of the adapted modules", form.__name__, fuse(model, form))
    model.to(world.device)
    if held := held_at(model, dtype, task):
        log.info("%d frozen Linear layers held at %s, as autocast computes them (%.0f MiB less)", len(held),
                 precision_name(dtype), sum(p.numel() for m in held for p in m.parameters()) * 2 / 2**20)
    check_one_sample_batches(model, cfg.dataset.image_size, cfg.training.batch_size, len(train_data.lengths))
    groups = param_groups(model, cfg.adjust, layers, trained_head, new)  # refuses a freeze that leaves nothing to train
    # For the MFU gauge, a step of what trains: the analysis measured the model as loaded, every weight training
    # (a freeze of all but the head made MFU read about 3x too high, a quarter of the layers pruned 4/3).
    flops = (detection_analysis.step_flops(model, probe[0], dtype) if detecting
             else analysis.step_flops(model, probe, dtype))
    trainable, total = prune.trained_and_total(model)
    progress.message["analysis"].update(totalParameters=total, trainableParameters=trainable)
    # The analysis modelled the model as loaded (all of it training); this is what will train.
    memory = analysis.memory_model(dict(model.named_parameters()),
                                   report.memory["activations"] - analysis.cast_copies(model, held),
                                   report.memory["largest_activation"])
    log.info("memory model after rearrange (MiB, activations as probed before freezing): %s",
             analysis.memory_line(memory))

    baseline: dict[str, float] = {}
    if cfg.evaluation.baseline:
        progress.enter(Stage.BASELINE)
        baseline = scores_once(checkpoints.BASELINE, lambda: measure(model, test_data, "baseline"), per_class,
                               checkpoint_dir, world)
        progress.metrics.set_eval("baseline", baseline)
        log.info("baseline: %s", baseline)
    # The teacher's own scores, with the baseline: how near the student may come. A finished training loads no
    # teacher, and reports the scores an earlier attempt kept.
    taught: dict[str, float] = {}
    if cfg.evaluation.baseline and cfg.training.distillation is not None:
        taught = scores_once(checkpoints.TEACHER, None if teacher is None else (
            lambda: measure(distill.Scored(teacher), test_data)), per_class, checkpoint_dir, world)
        if taught:
            progress.metrics.set_eval("teacher", taught)
            log.info("the teacher, on the test split: %s", taught)

    progress.enter(Stage.TRAINING)
    steps = total_steps(train_data, cfg.training, world)
    optimizer = make_optimizer(groups, world.device)
    scheduler = make_scheduler(optimizer, cfg.training, steps)
    trained = model
    if world.size > 1:
        trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=bool(report.no_grad_parameters))
    if cfg.training.compile:  # the training steps only: evaluations take `model`, eager, in eval mode
        log.info("training through torch.compile: the first step compiles the model, and a batch of a new shape "
                 "may compile it again (tens of seconds each, a few times; then the steps are faster)")
        trained = torch.compile(trained)

    def validate(before_batch: Callable[[], None]) -> dict[str, float]:  # selection never sees the test split
        progress.evaluating(len(validation_data.lengths), task)
        return measure(model, validation_data, before_batch=before_batch)

    hooks = Hooks(
        evaluate=validate,
        on_step=lambda state, planned: progress.step(state, planned, flops),
        on_eval=progress.evaluated,
        checkpoint_dir=checkpoint_dir,
        sigterm_before=lambda: progress.sigterm,
    )
    progress.bar = progress_bar(steps) if world.main else None
    try:
        with cache_off(model):  # no step reads a key/value cache, which checkpointed layers refuse with a warning
            state = train_loop(trained, optimizer, scheduler, train_data, collate, cfg.training, task, world, hooks,
                               cfg.evaluation_metrics[0], teacher)
    finally:
        if progress.bar is not None:
            progress.bar.close()
    del teacher  # its memory, before the final evaluation and the export
    progress.trained(state)

    progress.enter(Stage.EVALUATING)
    # The weights training ended with (the best validation's, when it restored them).
    final = measure(model, test_data, "final")
    progress.metrics.set_eval("final", final)
    on_test = {"baseline": baseline, "final": final, **({"teacher": taught} if taught else {})}
    evaluation = on_test | {"delta": deltas(baseline, final)}
    if per_class:
        evaluation["per_class_ap"] = per_class
        log.info("AP per category (test split): %s", per_class)
    progress.message["evaluation"] = on_test

    progress.enter(Stage.EXPORTING)
    result = {
        "config": cfg.to_wire(),
        "labels": {str(k): v for k, v in data.id2label.items()},
        "analysis": report.to_dict(),
        "parameters": {"total": total, "trainable": trainable},
        "memory_after_rearrange": memory,
        "evaluation": evaluation,
        **({"pruning": pruning | {"after": dict(final)}} if pruning else {}),
        **({"distillation": distill.report_section(cfg)} if cfg.training.distillation else {}),
        "training": training_section(state, steps, steps_per_epoch(train_data, cfg.training, world), train_data,
                                     validation_data, test_data, world, dtype),
    }
    widened(held)  # the export writes the weights as loaded, and merges the adapters into them in fp32
    if world.main:
        result.update(write_outputs(model, tokenizer, data.id2label, cfg, out, probe[0].inputs, result, serving))
        if pruning:
            progress.message["pruning"] = pruning_message(result["pruning"])
    world.barrier()
    progress.enter(Stage.DONE)
    return result


# Why a folder cannot take the outputs that another attempt would meet again: a file in the way, no permission.
UNWRITABLE = {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS}


def check_output_apart(cfg: TrainerConfig, out: Path) -> None:
    """The output folder is not the model's or the teacher's: the export would overwrite what the run reads, and a
    retry would fine-tune the export. Compared as folders on this machine, so that other spellings of one folder
    (file:// and a path, '//', '/./', a link, --output), which the CRD's literal rule lets through, are caught; a
    weights file's folder is the one compared (model.uri .../det/model.safetensors, output .../det), where the file
    has a name the export writes (others it leaves alone), and so is anything under a folder the export replaces
    whole (model.uri .../det/adapter). Nor is it in a data folder: a retry walks that again, and would read the
    outputs as data (a second format, a class of plots). Data in the output folder is read alone: refused only where
    the export writes."""
    data = {field: uri for field, uri in data_uris(cfg).items() if not uri.startswith("hf://")}
    for field, uri in data.items():  # a data file holds no folder; one that is not there is the data's to report
        if os.path.isdir(local_path(uri)) and written_over(Path(os.path.realpath(out)), local_path(uri), inside=True):
            raise ConfigError(f"output.uri (or --output): {out} is in the folder of {field} {uri}: a retry would "
                              "read the outputs as data; give the output a folder outside it")
    read = {"model.uri": cfg.model.uri} | data
    if cfg.training.distillation is not None:
        read["training.distillation.teacher.uri"] = cfg.training.distillation.teacher.uri
    for field, uri in read.items():
        if uri is not None and not uri.startswith("hf://") and overwritten(local_path(uri), out):
            raise ConfigError(f"output.uri (or --output): {out} is the folder of {field} {uri}: the export would "
                              "overwrite it; give the output a folder of its own")


def data_uris(cfg: TrainerConfig) -> dict[str, str]:
    """The data the run reads, by field."""
    texts = heal_dataset(cfg)
    return {"dataset.uri": cfg.dataset.uri, **({"rearrange.prune.heal.dataset.uri": texts.uri} if texts else {})}


def overwritten(path: Path, out: Path) -> bool:
    """Whether an export into `out` would overwrite or remove what `path` reads, by its own name or by where its
    links lead (a link elsewhere to out/model.safetensors; out/model.safetensors a link, which the export replaces;
    a folder's own link, models/m/model.safetensors -> out/model.safetensors, as the hub's cache links its files):
    `out` itself, or a name in it the export writes (export.of_an_export), or anything under one (out/adapter/...)."""
    if not out.is_dir():
        return False
    # by realpath and os.path.isdir: Path.resolve() raises on a link loop, Path.is_dir() on a folder it may not search
    reads = [path, Path(os.path.realpath(path))]
    if os.path.isdir(path):
        reads += [Path(os.path.realpath(link)) for link in own_links(path)]
    return any(written_over(read, out) for read in dict.fromkeys(reads))


def own_links(folder: Path) -> list[Path]:
    """The links in `folder`; none where it cannot be listed (mode 0711: its files are read by name)."""
    try:
        return [entry for entry in folder.iterdir() if entry.is_symlink()]
    except OSError:
        return []


def written_over(read: Path, out: Path, inside: bool = False) -> bool:
    """Whether the path `read` is `out`, or a name in it the export writes, or under one; `inside`: anywhere in it."""
    if os.path.isdir(read) and os.path.samefile(read, out):
        return True
    return any(os.path.isdir(inner.parent) and os.path.samefile(inner.parent, out)
               and (inside or export.of_an_export(inner)) for inner in (read, *read.parents))


def check_output(out: Path) -> None:
    """Create the output folder before anything is loaded: one that cannot take the outputs is the user's to fix
    (exit 1), found in seconds rather than after loading, analysis and a baseline."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".writable-"):  # what a mount allows, not just its mode bits
            pass
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        raise ConfigError(f"output.uri (or --output): cannot write to {out}: {exc.strerror}") from exc


# Fields that change no weight at any step (`compile`: none beyond rounding, and dropout's masks, which inductor draws
# from a generator of its own: other masks, alike in law; `gradientCheckpointing` recomputes with the RNG state the
# forward had): editing them must not restart a run from step 0, as a job turned to checkpointing after running out
# of memory would have.
BOOKKEEPING = {"analyze": None, "output": None, "rearrange": {"mergeOnExport"},
               "training": {"checkpointEverySteps", "keepCheckpoints", "compile", "gradientCheckpointing"},
               "evaluation": {"baseline", "batchSize"}}


def fingerprinted(cfg: TrainerConfig, world_size: int, pruned: list[int] | None = None,
                  data: str | None = None, defaults: bool = False, merge_picks: bool = False,
                  base: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the config less its bookkeeping (and the evaluations'
    cadence when early stopping is off), the world size (the
    global batch and the schedule's length follow from it), the layers pruning removes (the same shapes,
    other weights), the data (`batches.digest`) and the base trained on (`base_identity`: the checkpoints hold
    what trains, not the frozen weights under it). A field added later counts until listed above.

    Only the values that differ from their defaults, unless `defaults` (the full form, which names the run's folder,
    and `run_folder` compares saved fingerprints in, and saves): a field an upgrade adds with a default that keeps the old behaviour must not
    move every retried job to a new folder, from step 0. A default whose value a new version changes is a change all
    the same: the saved fingerprint holds its old value.

    rearrange.mergeOnExport counts where it picks the modules that take adapters (`merge_picks`,
    adjust.merging_picks_targets): the checkpoints hold those adapters, and a flip of it is another run, not a
    checkpoint of another trainer's layout to discard. Elsewhere it only chooses the export's form."""
    wire = cfg.to_wire(defaults)
    # Not in the short form: the folder an earlier version named without it stays this run's (`checkpoints.filled`)
    counted = {"mergeOnExport"} if merge_picks and defaults else set()
    for section, fields in BOOKKEEPING.items():
        if fields is None:
            wire.pop(section, None)
        else:
            wire[section] = {k: v for k, v in wire.get(section, {}).items() if k not in fields - counted}
    if cfg.training.early_stopping is None:  # evaluations then only report: no weight depends on when they run
        wire["training"].pop("evalEverySteps", None)
    return wire | {"worldSize": world_size} | ({"prunedLayers": pruned} if pruned is not None else {}) | (
        {"data": data} if data is not None else {}) | ({checkpoints.BASE: base} if base else {})


def base_identity(cfg: TrainerConfig, earlier: dict[str, Any] | None) -> dict[str, Any]:
    """Which base the run trains on, for its fingerprint (checkpoints.BASE): the commits its hub model repos were
    fetched at (`uris.current_pins`: a branch's head moves), and `checkpoints.files_identity` of model.uri and the
    distillation teacher where they are files (file://, pvc://, a path), which may be replaced at the same uri. A
    teacher's that is gone (a finished training loads none) is taken as the `earlier` attempt's."""
    uris_read = {"model.uri": cfg.model.uri}
    if cfg.training.distillation is not None:
        uris_read["training.distillation.teacher.uri"] = cfg.training.distillation.teacher.uri
    files = {}
    for field, uri in uris_read.items():
        if uri is None or uri.startswith("hf://"):
            continue
        if (found := checkpoints.files_identity(local_path(uri))) is None:
            found = ((earlier or {}).get("files") or {}).get(field)
        if found is not None:
            files[field] = found
    hub = uris.current_pins()
    return {**({"hub": hub} if hub else {}), **({"files": files} if files else {})}


def pruned_layers(report: analysis.StructureReport, spec: PruneSpec, world: distributed.World) -> list[int]:
    """The layers `rearrange.prune` removes: rank 0's analysis scored them least important. Each rank scored its
    own, and a GPU's non-deterministic kernels can order a near-tie differently on another rank, which would then
    cut other layers (DDP failing on shapes, or averaging different layers' gradients): every rank takes rank 0's
    scores, those it reports too."""
    if report.importance is None:
        raise ConfigError(f"rearrange.prune: no stack of transformer layers found in {report.model_class}")
    report.importance = world.broadcast(report.importance)
    return prune.chosen_layers(report.importance["layers"]["scores"], spec)


def earlier_pruning(parent: Path, cfg: TrainerConfig, world: distributed.World, drop: list[int], data: str,
                    merge_picks: bool, base: dict[str, Any] | None = None) -> list[int]:
    """The layers an earlier attempt of this run removed, if one did, else `drop`. Its checkpoints and healed layers
    are of those layers; this attempt's scores, on other hardware or at another precision, can order a near-tie
    otherwise, and a new choice would discard them and train from step 0. Rank 0's look, on every rank: a rank whose
    view of the shared folder lacked the earlier run pruned other layers."""
    identity, full = (fingerprinted(cfg, world.size, drop, data, defaults, merge_picks, base)
                      for defaults in (False, True))
    earlier = world.main_look(checkpoints.earlier_choice, parent, identity, "prunedLayers", full)
    if earlier is None or earlier == drop:
        return drop
    log.warning("rearrange.prune: this attempt's scores would remove layers %s; an earlier attempt of this run "
                "removed %s and kept its training in checkpoints, so those layers go again", drop, earlier)
    return list(earlier)


def prune_layers(model: nn.Module, task: Task, report: analysis.StructureReport, drop: list[int], cfg: TrainerConfig,
                 serving: list[Batch], measure: Any, test_data: Encoded, keep_target: bool,
                 world: distributed.World) -> tuple[dict[str, Any], nn.Module | None]:
    """Remove the layers `drop`; returns what was removed and the model before (its parameters and latency, and
    its test metrics when a baseline is asked for), and with `keep_target` a copy of the unpruned model, healing's
    target."""
    assert report.importance is not None
    scores = report.importance["layers"]["scores"]
    before = footprint_alone(model, serving, world)
    if cfg.evaluation.baseline:
        before |= measure(model, test_data)
    unpruned = prune.healing_target(model) if keep_target else None
    prune.remove_layers(model, task, drop)
    log.info("pruned %d of %d layers %s (%s %s); %s -> %s parameters", len(drop), len(scores), drop,
             report.importance["layers"]["measure"], [round(scores[i], 4) for i in drop],
             f"{before['parameters']:,}", f"{prune.parameters(model):,}")
    pruning = {"measure": report.importance["layers"]["measure"], "removed_layers": drop,
               "removed_scores": [scores[i] for i in drop], "layers_before": len(scores),
               "layers_after": len(scores) - len(drop), "before": before}
    return pruning, unpruned


def footprint_alone(model: nn.Module, serving: list[Batch], world: distributed.World) -> dict[str, Any]:
    """The model's footprint, its latency measured by rank 0 while the other ranks wait, as the pruned model's is in
    the export: measured while they ran the same forwards on the same cores, the latency before pruning was
    theirs too, and a CPU job on 2 ranks reported 3-4x the speedup one process measured."""
    figures = prune.footprint(model, serving) if world.main else {"parameters": prune.parameters(model)}
    world.barrier()
    return figures


def check_images_once(data: LabelledData, uri: str, world: distributed.World, at_least: int | None = None) -> None:
    """The image files the run uses (its splits, within maxTrainSamples and maxEvalSamples, not every file of the
    dataset) open as images, decoded for `at_least` (data.draft), each read once: each rank opens its share and every
    rank raises the one verdict. Every rank had read every file from the one volume; rank 0 alone kept the others in
    the collective past NCCL's timeout on a large dataset. A read that fails (the volume's), or any error, is a
    verdict too, so no rank waits on one that raised."""
    paths = list(dict.fromkeys(path for split in (data.train, data.validation, data.test) for path in split.inputs))
    try:
        verdict: tuple[dict[str, str], Exception | None] = (bad_images(paths[world.rank::world.size], at_least), None)
    except Exception as exc:  # noqa: BLE001 (an EIO, or a decoder's own error: raised on every rank below)
        verdict = ({}, exc)
    verdicts = world.gather(verdict)
    if failed := next((exc for _, exc in verdicts if exc is not None), None):
        raise failed
    found = {path: problem for bad, _ in verdicts for path, problem in bad.items()}
    if found:  # in the dataset's order, as one rank would list them
        raise bad_images_error({path: found[path] for path in paths if path in found}, len(paths), uri)


def heal_once(model: nn.Module, unpruned: nn.Module | None, task: Task, batches: Iterator[Batch], spec: HealSpec,
              dtype: torch.dtype | None, kept: bool, folder: Path, world: distributed.World) -> dict[str, Any]:
    """Heal the pruned model towards `unpruned`, or load the layers an earlier attempt of the same run healed and
    `kept` in its checkpoint `folder` (`unpruned` is None then); returns healing's figures."""
    found = prune.layer_stack(model, task)  # None never after pruning; heal says so if it were
    figures = checkpoints.load_healed(folder, found[1]) if kept and found is not None else None
    world.barrier()  # every rank has read them before rank 0 writes new ones
    if figures is not None:
        return figures
    assert unpruned is not None, "no healed layers kept, and no copy of the unpruned model to heal towards"
    figures = prune.heal(model, unpruned, task, batches, spec, dtype)
    if found is not None:
        checkpoints.save_healed(folder, found[1], figures, world)
    return figures


def scores_once(name: str, measure_scores: Callable[[], dict[str, float]] | None, per_class: dict[str, Any],
                folder: Path, world: distributed.World) -> dict[str, float]:
    """The test scores `name` (checkpoints.BASELINE, TEACHER), or those an earlier attempt of this run kept in its
    checkpoint folder: a retry after training (a SIGTERM in the final evaluation or the export) scored a large test
    split again, for minutes. With no `measure_scores` (a teacher a finished training did not load), only those
    kept, or none."""
    what = Path(name).stem  # the phase: baseline, teacher
    # rank 0's, on every rank: ranks that each read a shared folder seen otherwise measured beside others that did not
    kept = world.main_look(checkpoints.load_scores, folder, name)
    if kept is not None:
        log.info("the %s was measured by an earlier attempt of this run (%s)", what, folder / name)
        if kept["per_class"] is not None:
            per_class[what] = kept["per_class"]
        return kept["scores"]
    if measure_scores is None:
        return {}
    scores = measure_scores()
    checkpoints.save_scores(folder, name, {"scores": scores, "per_class": per_class.get(what)}, world)
    return scores


def pruning_message(pruning: dict[str, Any]) -> dict[str, Any]:
    """The termination message's pruning section: what was removed and the cost of serving, before and after."""
    before, after = pruning["before"], pruning["after"]
    return {"removedLayers": pruning["removed_layers"],
            "parameters": {"before": before["parameters"], "after": after["parameters"]},
            "latencyMs": {"before": round(before["latency_ms"], 3), "after": round(after["latency_ms"], 3)},
            "metricsBefore": {k: v for k, v in before.items() if k not in ("parameters", "latency_ms")}}


def trained_head_order(model: nn.Module, id2label: dict[int, str], num_labels: int, reinitialize: bool,
                       category_ids: dict[int, int] | None = None) -> list[int] | None:
    """`head_order` for a classifier or detector whose head stays as it was trained (its size fits, no reinitialize
    asked), where it names the dataset's labels in another order or among others; for a detector's head that names
    none, `category_order` of the dataset's `category_ids`."""
    head, size = head_labels(model)
    if not id2label or reinitialize or size != num_labels:
        return None
    if not head:
        return category_order(category_ids, size)
    if (order := head_order(id2label, head)) is not None:
        log.info("the model's head names the dataset's labels in another order, or among others (%s); they take "
                 "its ids", ", ".join(head[i] for i in sorted(head)))
    return order


def category_order(category_ids: dict[int, int] | None, size: int) -> list[int] | None:
    """The dataset's category ids as the class ids of a kept detector head that names no classes, where they fit it
    (1..size) and are not 1..K already: such a head is torchvision's (its COCO checkpoints, models trained with its
    reference scripts), whose class index is the category id. Numbered 1..K, a COCO subset (person, car, dog: ids 1,
    3, 18) trained the head's person, bicycle and car outputs as them, shuffled."""
    ids = [category_ids[c] for c in sorted(category_ids or {})]
    if not ids or ids == list(range(1, len(ids) + 1)) or min(ids) < 1 or max(ids) > size:
        return None
    log.info("the detector's head (%d classes, none named) is kept: the dataset's category ids are its class ids, as "
             "torchvision's COCO heads number them", size)
    return ids


def encode(data: LabelledData, tokenizer: Any, cfg: TrainerConfig, main: bool) -> tuple[Encoded, Encoded, Encoded]:
    """The three splits, ready to batch; the main rank says how many texts were truncated (one line a run)."""
    if tokenizer is None:  # only training sees dataset.augment's changes
        augmenting = Augmenting(tuple(cfg.dataset.augment), cfg.training.seed) if cfg.dataset.augment else None
        return encode_images(data.train, augmenting), encode_images(data.validation), encode_images(data.test)
    text = text_encoder(cfg.model.task)
    encoded = tuple(text(split, tokenizer, cfg.dataset.max_length) for split in (data.train, data.validation, data.test))
    if main:
        say_truncated(encoded, cfg.dataset.max_length)
    if cfg.model.task == Task.CAUSAL_LM:  # else its loss is 0 (no term), and perplexity 1: a success, reported
        for name, split in zip(("training", "validation", "test"), encoded):
            if split.lengths and max(split.lengths) < 2:
                eos = "" if tokenizer.eos_token_id is not None else " and the tokenizer appends no end-of-text token"
                raise DataError(f"dataset {cfg.dataset.uri}: no text of the {name} split has a token to predict: each "
                                f"is one token long{eos}; use longer texts in dataset.textField, or a tokenizer with an "
                                "eos token (model.tokenizerUri)")
    return encoded


def text_encoder(task: Task) -> Callable[..., Encoded]:
    return encode_causal if task == Task.CAUSAL_LM else encode_text


def healing_texts(cfg: TrainerConfig, tokenizer: Any, train_data: Encoded, evaluated: tuple[Split, ...]) -> Encoded:
    """What healing reads: `rearrange.prune.heal.dataset`'s texts, or pairs of texts where the training split is
    pairs (the config's rules), less those of the `evaluated` splits (the job's validation and test), tokenized as
    the training split's; or the training split itself."""
    heal = cfg.rearrange.prune.heal if cfg.rearrange.prune else None
    if heal is None or heal.dataset is None:
        return train_data
    field = "rearrange.prune.heal.dataset"
    if tokenizer is None:
        raise ConfigError(f"{field}: healing on other data needs texts; a {cfg.model.task.value} model takes none")
    texts = unevaluated(load_texts(heal.dataset, field), evaluated, heal.dataset.uri)
    # Labels are never read (healing's target is the unpruned model's states); the collate wants one per row.
    return text_encoder(cfg.model.task)(Split(texts, [0] * len(texts)), tokenizer, cfg.dataset.max_length)


def unevaluated(texts: list[Any], evaluated: tuple[Split, ...], uri: str) -> list[Any]:
    """Healing's `texts` (or pairs) less those of the `evaluated` splits: load_texts reads every split of its file,
    so healing on the job's own dataset.uri fitted the layers to the texts early stopping selects on and the final
    scores are of. Left out by text rather than refused by URI: the file's other rows (the job's training split's)
    are good healing text, and a copy of the file under another name holds the same rows."""
    seen = {text for split in evaluated for text in split.inputs}
    kept = [text for text in texts if text not in seen]
    field = "rearrange.prune.heal.dataset.uri"
    if not kept:
        raise DataError(f"{field} {uri}: each of its texts is one of the job's validation or test split's, which "
                        "healing must not see; heal on other texts, or leave out rearrange.prune.heal.dataset to heal "
                        "on the training split")
    if len(kept) < len(texts):
        log.warning("%s %s: left out %d of its %d texts that are in the job's validation or test split, which healing "
                    "must not see; %d heal", field, uri, len(texts) - len(kept), len(texts), len(kept))
    return kept


def training_section(state: LoopState, total: int, per_epoch: int, train_data: Encoded, validation_data: Encoded,
                     test_data: Encoded, world: distributed.World, dtype: torch.dtype | None) -> dict[str, Any]:
    seconds = max(state.seconds, 1e-9)
    epochs = state.epoch + state.position / per_epoch  # passes over the data, fractional when stopped early
    return {"steps": state.step, "total_steps": total, "epochs": epochs, "seconds": state.seconds,
            "cpu_seconds": state.cpu_seconds,
            "samples_per_second": state.samples / seconds,
            "tokens_per_second": state.tokens / seconds if state.tokens else None,  # images have no tokens
            "train_samples": len(train_data.lengths), "validation_samples": len(validation_data.lengths),
            "test_samples": len(test_data.lengths), "workers": world.size,
            "precision": precision_name(dtype),  # what `auto` resolved to
            "stopped_early": state.stopped_early, "diverged": state.diverged,
            "restored_best_step": state.best_step if state.restored_best else None,
            "history": state.history, "evals": state.evals}


def write_outputs(model: nn.Module, tokenizer: Any, id2label: dict[int, str], cfg: TrainerConfig, out: Path,
                  inputs: dict[str, torch.Tensor], report: dict[str, Any], serving: list[Batch]) -> dict[str, Any]:
    """Export on rank 0: merge adapters (checked), weights, loss curve, model card, report.json; a pruned model's
    latency is measured as it is exported (merged or not). All of it is written into a folder `.export-*` inside
    `out` and put in place whole, report.json last (export.publish): a run stopped in between leaves the earlier
    export as it was."""
    extra: dict[str, Any] = {}
    if cfg.rearrange.lora is not None and cfg.rearrange.merge_on_export:
        model, extra["merge_check"] = merge_adapters(model, inputs, export.published_dtype(model))
    if "pruning" in report:
        report["pruning"]["after"] |= prune.footprint(model, serving)
    earlier = (out / export.MARKER).exists()
    try:
        with export.staging(out) as staged:
            files = export.export_model(model, tokenizer, id2label, cfg, staged)
            export.loss_curve(report["training"]["history"], report["training"]["evals"], staged / "loss_curve.png")
            card = export.model_card(cfg, report | extra, adapters_apart=(staged / export.ADAPTER).is_dir(),
                                     causal_switch=has_causal_switch(getattr(model, "config", None)),
                                     written_in=export.written_dtype(model, cfg),
                                     revision=export.loaded_revision(model, cfg),
                                     marker=pair_marker(tokenizer) if cfg.dataset.text_pair_field else None,
                                     spare=export.spare_names(model, id2label))
            (staged / "README.md").write_text(card)
            analysis_file = ["analysis.json"] if (out / "analysis.json").exists() else []  # the run's, listed as ever
            extra["files"] = sorted({*files, "loss_curve.png", "README.md", export.MARKER, *analysis_file})
            export.publish(staged, out, export.json_text(report | extra))
    except Exception as exc:
        beside = ", which the volume holds beside the earlier export until it is whole" if earlier else ""
        if full := no_space_in(out, exc, f"the export{beside}"):
            raise full from exc
        raise
    log.info("exported to %s", out)
    return extra


def progress_bar(total: int) -> Any:
    """A tqdm bar for a person at a terminal; pods get the log lines only."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
