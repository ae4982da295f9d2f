"""Stage 1: look at the model before touching it, and say what will go wrong.

`analyze(model, batches, ...)` counts parameters, finds LoRA candidates, the head, tied
and broken weights, runs a probe step to find parameters that get no gradient, measures
FLOPs and the memory of that step, scores the importance of each transformer layer and attention
head (`prune.importance`), and turns what it saw into findings with a severity.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune_trainer.batches import Batch
from finetune_trainer.config import Task
from finetune_trainer.errors import FatalFinding
from finetune_trainer.models import (autocast, cache_off, checkpointed_layers, checkpointing_in_eval, logits_of,
                                     new_modules)
from finetune_trainer.prune import importance
from finetune_trainer.structure import calls_per_forward, head_name, lora_candidates, lora_types, unread_layers

log = logging.getLogger(__name__)

MAX_GROUPS = 24  # rows of the per-module table: deep enough to show the layers, short enough to read
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32 each


class Severity:
    INFO = "info"
    WARNING = "warning"
    FATAL = "fatal"
    RANK = {FATAL: 0, WARNING: 1, INFO: 2}  # most severe first: the order in which a short message keeps findings


@dataclass
class Finding:
    severity: str
    code: str
    message: str


@dataclass
class ModuleCount:
    name: str
    total: int
    trainable: int
    frozen: int


@dataclass
class StructureReport:
    model_class: str
    total_parameters: int
    trainable_parameters: int
    frozen_parameters: int
    modules: list[ModuleCount]
    layer_types: dict[str, dict[str, int]]  # class name -> {count, parameters}
    lora_candidates: dict[str, list[int]]  # module name -> weight shape
    head: dict[str, object] | None  # {name, out_features, dataset_labels}
    tied_weights: list[list[str]]
    no_grad_parameters: list[str]
    flops: dict[str, float | str | None]
    memory: dict[str, int | str | None]
    findings: list[Finding] = field(default_factory=list)
    importance: dict[str, Any] | None = None  # {layers: {measure, scores}, heads: {measure, loss, scores}}

    def to_dict(self) -> dict:
        return asdict(self)

    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.FATAL]


def analyze(model: nn.Module, batches: list[Batch], task: Task, num_labels: int, adapters: bool,
            dtype: torch.dtype | None = None) -> StructureReport:
    """Inspect `model` on a few training batches; `num_labels` is what the dataset needs, `adapters` whether LoRA
    follows, `dtype` the autocast precision the run trains at (None: fp32)."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    head = head_name(model, task)
    head_info = None
    if head is not None:
        head_info = {"name": head, "out_features": model.get_submodule(head).out_features, "dataset_labels": num_labels}
    no_grad, probe = probe_step(model, batches, task, adapters, dtype)
    report = StructureReport(
        model_class=type(model).__name__,
        total_parameters=total,
        trainable_parameters=trainable,
        frozen_parameters=total - trainable,
        modules=module_counts(params),
        layer_types=layer_types(model),
        lora_candidates={k: list(v) for k, v in lora_candidates(model, task).items()},
        head=head_info,
        tied_weights=tied_weights(model),
        no_grad_parameters=no_grad,
        flops=flop_estimate(model, batches[0], task, probe["flops"], adapters, dtype),
        memory=memory_model(params, probe["activations"], probe["largest_activation"], probe["peak"],
                            probe["peak_source"], probe["gradients"]),
    )
    # A head the checkpoint lacked (a base model's, initialised at random) scores the heads by noise: label-free
    fits = task == Task.CAUSAL_LM or (head is not None and head_info["out_features"] == num_labels
                                      and not any(head == m or head.startswith(f"{m}.") for m in new_modules(model)))
    report.importance = importance(model, batches, task, labels_fit=fits, dtype=dtype)
    report.findings = findings(report, params, task)
    return report


def module_counts(params: dict[str, nn.Parameter]) -> list[ModuleCount]:
    """Parameter counts grouped by name prefix, at the deepest level that still fits in MAX_GROUPS rows."""
    best: dict[str, list[int]] = {}
    for level in range(1, 1 + max(n.count(".") + 1 for n in params)):
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, p in params.items():
            groups[".".join(name.split(".")[:level])][0 if p.requires_grad else 1] += p.numel()
        if len(groups) > MAX_GROUPS:
            break
        best = groups
    return [ModuleCount(name, t + f, t, f) for name, (t, f) in best.items()]


def layer_types(model: nn.Module) -> dict[str, dict[str, int]]:
    """Modules by type, with the parameters they hold: a tied weight (GPT-2's lm_head, its wte) under its first
    holder only, so that the rows add up to the model's parameters, not above them."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "parameters": 0})
    counted: set[int] = set()
    for module in model.modules():
        held = [p for p in module.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in held)
        own = sum(p.numel() for p in held)
        if own or not any(True for _ in module.children()):
            entry = counts[type(module).__name__]
            entry["count"] += 1
            entry["parameters"] += own
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]["parameters"]))


def tied_weights(model: nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return [group for group in names.values() if len(group) > 1]


def probe_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss every output contributes to, independent of labels: the head may not fit them yet."""
    return logits.float().logsumexp(-1).mean()


def probe_step(model: nn.Module, batches: list[Batch], task: Task, adapters: bool,
               dtype: torch.dtype | None) -> tuple[list[str], dict[str, Any]]:
    """Forward and backward without an optimizer step, under the run's autocast `dtype`; returns parameters left
    without a gradient and what it cost.

    Eval mode keeps BatchNorm's running statistics untouched; the weights never change. When adapters will train
    instead of the weights, the matrices get no gradient here either (a large model's would not fit beside it):
    only vectors (biases, norms) do, and a matrix counts as reached when a gradient reaches its module's output.
    """
    was_training = model.training
    model.eval()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(not adapters or p.dim() < 2)  # probe what may train, frozen or not: freezing comes later
        p.grad = None
    reached: set[str] = set()
    # A layer whose owner reads its weight itself (unread_layers: ViT's out_proj) is reached with its owner
    unread = {layer: layer.rpartition(".")[0] for layer in unread_layers(model)} if adapters else {}
    hooks = [module.register_forward_hook(mark_reached(name, reached)) for name, module in model.named_modules()
             if adapters and (any(p.dim() >= 2 for p in module.parameters(recurse=False)) or name in unread.values())]
    try:
        with cache_off(model):  # as in training, where no step reads a key/value cache
            probe = measure_step(model, lambda batch: probe_loss(logits_of(model, batch.inputs)), batches, dtype)
    finally:
        for hook in hooks:
            hook.remove()
    reached |= {layer for layer, owner in unread.items() if owner in reached}
    owner = {f"{m}.{n}" if m else n: m for m, module in model.named_modules() for n, _ in module.named_parameters(recurse=False)}
    no_grad = [n for n, p in model.named_parameters()
               if (p.grad is None if p.requires_grad else owner[n] not in reached)]
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(requires[name])
    model.train(was_training)
    return no_grad, probe


@dataclass(frozen=True)
class StepFlops:
    """A training step's FLOPs for the MFU gauge, per unit of the work the loop counts: per padded token of token
    inputs, per sample of images (all of one size). Per sample, a text batch's figure grew with its padded length,
    which length-bucketed batching draws at random: one probe batch put MFU off by 0.3x to 2.7x with the seed."""

    flops: float
    per_token: bool

    def per_second(self, samples_per_second: float, padded_tokens_per_second: float) -> float:
        return self.flops * (padded_tokens_per_second if self.per_token else samples_per_second)


def step_flops(model: nn.Module, batches: list[Batch], dtype: torch.dtype | None) -> StepFlops:
    """The FLOPs of a training step of the model as it will train, for the MFU gauge: its requires_grad
    flags as set (a frozen layer computes no weight gradient, none below the lowest trainable one an input
    gradient), its adapters in the form that trains, its layers after pruning. `probe_step` makes every weight
    trainable, as the analysis comes before freezing. Averaged over `batches`: attention's FLOPs per token still
    grow with the length, so a figure per token is an approximation, closest at the probe batches' lengths (the
    more of them, the nearer the run's mix)."""
    was_training = model.training
    model.eval()
    try:
        flops = counted_flops(model, lambda b: probe_loss(logits_of(model, b.inputs)), batches, dtype)
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    if padded := sum(b.padded_tokens for b in batches):
        return StepFlops(flops / padded, per_token=True)
    return StepFlops(flops / sum(b.samples for b in batches), per_token=False)


def autocast_loss(model: nn.Module, loss: Callable[[Batch], torch.Tensor], batch: Batch,
                  dtype: torch.dtype | None) -> torch.Tensor:
    with autocast(next(model.parameters()).device.type, dtype):
        return loss(batch)


def counted_flops(model: nn.Module, loss: Callable[[Batch], torch.Tensor], batches: list[Batch],
                  dtype: torch.dtype | None) -> float:
    """The FLOPs of `loss`'s forward and backward on each of `batches`, together; leaves the gradients."""
    with FlopCounterMode(display=False) as counter:
        for batch in batches:
            autocast_loss(model, loss, batch, dtype).backward()
    return counter.get_total_flops()


def measure_step(model: nn.Module, loss: Callable[[Batch], torch.Tensor], batches: list[Batch],
                 dtype: torch.dtype | None) -> dict[str, Any]:
    """Forward `loss` and backward on each batch, under the autocast `dtype`, leaving the gradients for the caller;
    returns what the first batch's step cost: FLOPs per sample, the bytes of the activations autograd saved (all,
    and the largest), of the gradients, and the peak memory."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        # A weight is no activation, even saved as a view (a Linear saves Wᵀ): the memory model counts it apart.
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as counter, measured_peak(model) as peak:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), checkpointing(model, keep):
            first = autocast_loss(model, loss, batches[0], dtype)
        first.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    probe = {"flops": counter.get_total_flops() / batches[0].samples, "activations": sum(saved.values()),
             "largest_activation": max(saved.values(), default=0), "gradients": gradients,
             "peak": peak.get("bytes"), "peak_source": peak.get("source")}
    for batch in batches[1:]:
        autocast_loss(model, loss, batch, dtype).backward()
    return probe


@contextlib.contextmanager
def checkpointing(model: nn.Module, keep: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """The layers that checkpoint in training checkpoint in the probe's eval mode too (`checkpointing_in_eval`), so
    that it measures the run's activations. What such a layer keeps for its recompute is its inputs, which no
    saved-tensor hook sees: each goes to `keep` as the layer is called. The backward recomputes one layer's
    activations at a time on top, which only the measured peak includes."""

    def inputs_kept(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and torch.is_grad_enabled():
                    keep(t)

    with checkpointing_in_eval(model) as layers:
        hooks = [layer.register_forward_pre_hook(inputs_kept, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def mark_reached(name: str, reached: set[str]) -> Any:
    """A forward hook noting whether a gradient reaches the module's output (its weights' gradient needs one)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            reached.add(name)  # cannot tell without the weights' gradient: no finding rather than a false one
            return None
        if not output.requires_grad:  # nothing below trains (an embedding): start the graph here
            output = output.detach().requires_grad_().clone()
        output.register_hook(lambda grad: reached.add(name))
        return output

    return hook


PROC = Path("/proc/self")


def resident(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", (PROC / "status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else 0


@contextlib.contextmanager
def measured_peak(model: nn.Module) -> Iterator[dict[str, int | str]]:
    """The peak memory of what runs inside, weights included: the CUDA allocator's peak on a GPU; on a CPU
    the weights plus the rise of the process's peak resident size (Linux resets it through clear_refs).

    The CPU figure misses memory the allocator still holds from earlier work (glibc's malloc_trim hands most
    of it back first), so it is a lower bound; the probe is the process's first training step, where that is
    small. Elsewhere it stays empty.
    """
    out: dict[str, int | str] = {}
    cuda = next(model.parameters()).is_cuda
    rss = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):  # no measurement where /proc is masked: a stale peak would mislead
            (PROC / "clear_refs").write_text("5")  # 5: reset the peak resident size to the current one
            rss = resident("VmRSS")
    yield out
    if cuda:
        out.update(bytes=torch.cuda.max_memory_allocated(), source="cuda allocator peak")
    elif rss:
        weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        out.update(bytes=weights + max(0, resident("VmHWM") - rss), source="weights + peak RSS rise")


def flop_estimate(model: nn.Module, batch: Batch, task: Task, measured: float, adapters: bool,
                  dtype: torch.dtype | None) -> dict[str, float | str | None]:
    """Measured training FLOPs per sample against the 6N rule (N = weights of the matmul layers, per token, each
    counted as many times as a forward runs it: ALBERT's shared layer num_hidden_layers times).

    With adapters the frozen weights get no weight gradient, in training as in the probe, so a step costs about 4N.
    """
    out: dict[str, float | str | None] = {"measured_per_sample": measured, "rule": None, "estimate_per_sample": None,
                                          "measured_over_estimate": None, "training_per_sample": measured}
    if task == Task.IMAGE_CLASSIFICATION:
        out["rule"] = "none: convolutions reuse weights across positions, so 6N per sample does not hold"
        return out
    matmuls = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, lora_types())}
    runs = calls_per_forward(model, list(matmuls), batch, dtype)
    # once where the forward reads the weight without calling the layer (unread_layers)
    n = sum(size * max(runs[name], 1) for name, size in matmuls.items())
    tokens = batch.inputs["input_ids"].numel() / batch.samples  # padded positions cost as much as real ones
    estimate = (4 if adapters else 6) * n * tokens
    out.update(rule="4N per token (adapters)" if adapters else "6N per token", estimate_per_sample=estimate,
               measured_over_estimate=measured / estimate if estimate else None)
    return out


def memory_model(params: dict[str, nn.Parameter], activations: int, largest_activation: int, peak: int | None = None,
                 measured_by: str | None = None, probe_gradients: int | None = None) -> dict[str, int | str | None]:
    """Bytes of a training step: weights, gradients and AdamW state of what trains, the batch's activations,
    and the transient peak of the backward pass.

    Activations are the tensors autograd saved in the probe's forward (counted once per storage; with
    training.gradientCheckpointing, those outside the layers and the layers' inputs: see `checkpointing`). When the
    backward starts they are all alive, together with the gradient of the largest of them (a language model's
    logits) and two temporaries of its size in the loss's backward, hence transient = 3 x the largest
    (measured: 3.06 x for a GPT-2 with a 30k vocabulary). `probe_gradients` are the bytes of the gradients the
    probe computed (every weight's unless adapters follow).
    """
    unique = {id(p): p for p in params.values()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    trainable = [p for p in unique if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(p.numel() * ADAMW_STATE_BYTES for p in trainable)
    transient = 3 * largest_activation
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
            "largest_activation": largest_activation, "transient": transient,
            "total": weights + gradients + optimizer + activations + transient,
            # The probe has no optimizer, so compare like with like.
            "probe_model": weights + (weights if probe_gradients is None else probe_gradients) + activations
            + transient,
            "measured_probe_peak": None if peak is None else int(peak),
            "measured_by": measured_by}


def cast_copies(model: nn.Module, held: list[nn.Linear]) -> int:
    """The bytes of autocast's copies of the `held` layers' weights (models.held_at), which the probe counted among
    the activations (each kept for its layer's input gradient) and a held layer no longer makes; none for a layer
    inside one that checkpoints, whose saved tensors the probe does not see, nor for peft's copy of a module trained
    whole as it was loaded (original_module): the trained copy still makes the cast."""
    inside = {id(m) for layer in checkpointed_layers(model) for m in layer.modules()}
    spare = {id(m) for name, m in model.named_modules() if ".original_module." in f".{name}."}
    skipped = inside | spare
    return sum(m.weight.numel() * m.weight.element_size() for m in held if id(m) not in skipped)


def findings(report: StructureReport, params: dict[str, nn.Parameter], task: Task) -> list[Finding]:
    out: list[Finding] = []
    for name, p in params.items():
        data = p.detach()
        if not torch.isfinite(data).all():
            bad = int((~torch.isfinite(data)).sum())
            out.append(Finding(Severity.FATAL, "NonFiniteWeights", f"{name} has {bad} NaN/Inf values: the checkpoint is broken"))
        elif data.dim() >= 2 and not data.any():
            out.append(Finding(Severity.WARNING, "ZeroWeights", f"{name} is all zeros; it passes no signal until trained"))
    head = report.head
    if task != Task.CAUSAL_LM and head is None:
        out.append(Finding(Severity.FATAL, "NoHead", "no Linear output layer found to classify with"))
    elif head is not None and head["out_features"] != head["dataset_labels"]:
        out.append(Finding(Severity.INFO, "HeadMismatch",
                           f"head {head['name']} has {head['out_features']} outputs, the dataset {head['dataset_labels']} "
                           "labels: rearrange puts a new head in its place"))
    if report.tied_weights:
        out.append(Finding(Severity.INFO, "TiedWeights", "shared: " + "; ".join(" = ".join(g) for g in report.tied_weights)))
    if report.no_grad_parameters:
        shown = ", ".join(report.no_grad_parameters[:5])
        more = len(report.no_grad_parameters) - 5
        out.append(Finding(Severity.WARNING, "NoGradient",
                           f"{len(report.no_grad_parameters)} parameter(s) get no gradient and cannot learn: {shown}"
                           + (f" and {more} more" if more > 0 else "")))
    if not report.lora_candidates:
        out.append(Finding(Severity.INFO, "NoLoraCandidates", "no Linear/Conv1D/Conv2d layer besides the head"))
    mem = report.memory
    if mem["measured_probe_peak"] and mem["probe_model"]:
        off = mem["measured_probe_peak"] / mem["probe_model"]
        if not 0.67 < off < 1.5:
            out.append(Finding(Severity.INFO, "MemoryOffModel",
                               f"the probe step peaked at {off:.2f}x the memory model ({mem['measured_by']}): "
                               "size the job's memory by the measurement"))
    ratio = report.flops.get("measured_over_estimate")
    if isinstance(ratio, float) and not 0.5 < ratio < 3:
        out.append(Finding(Severity.INFO, "FlopsOffEstimate", f"measured FLOPs are {ratio:.2f}x the estimate ({report.flops['rule']})"))
    return out


def summary(report: StructureReport) -> str:
    """The report as a reader wants it in the log."""
    lines = [f"{report.model_class}: {report.total_parameters:,} parameters "
             f"({report.trainable_parameters:,} trainable, {report.frozen_parameters:,} frozen)"]
    width = max(len(m.name) for m in report.modules)
    lines += [f"  {m.name:<{width}} {m.total:>12,} total {m.trainable:>12,} trainable {m.frozen:>12,} frozen"
              for m in report.modules]
    types = ", ".join(f"{k} x{v['count']}" for k, v in list(report.layer_types.items())[:8])
    lines.append(f"  layer types: {types}")
    # Named by their last non-index part: `layer2.0.downsample.0` is a downsample.
    kinds = Counter(next(p for p in reversed(name.split(".")) if not p.isdigit()) for name in report.lora_candidates)
    lines.append(f"  LoRA candidates: {len(report.lora_candidates)} ({', '.join(f'{k} x{n}' for k, n in kinds.items())})")
    flops = report.flops
    line = f"  FLOPs per sample: {flops['measured_per_sample']:.3g} measured"
    if flops["estimate_per_sample"]:
        line += f", {flops['estimate_per_sample']:.3g} by {flops['rule']} ({flops['measured_over_estimate']:.2f}x)"
    lines.append(line)
    mem = report.memory
    peak = mem["measured_probe_peak"]
    lines.append("  memory model (MiB): " + memory_line(mem)
                 + (f"; probe {mem['probe_model'] / 2**20:.1f} modelled vs {peak / 2**20:.1f} measured" if peak else ""))
    if report.importance:
        scores = report.importance["layers"]["scores"]
        lines.append(f"  layer importance ({report.importance['layers']['measure']}), bottom first: "
                     + " ".join(f"{s:.3f}" for s in scores))
    lines += [f"  [{f.severity}] {f.code}: {f.message}" for f in report.findings]
    return "\n".join(lines)


def memory_line(mem: dict[str, Any]) -> str:
    keys = ("weights", "gradients", "optimizer", "activations", "transient", "total")
    return ", ".join(f"{k} {mem[k] / 2**20:.1f}" for k in keys)


def fail_on_fatal(report: StructureReport) -> None:
    if fatal := report.fatal():
        raise FatalFinding("; ".join(f"{f.code}: {f.message}" for f in fatal))
