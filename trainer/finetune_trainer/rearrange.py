"""Stage 3: change the model's structure: a head sized for the dataset's labels, LoRA or
DoRA adapters through peft, and, on export, the adapters merged back into the weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from operator import attrgetter

import torch
from torch import nn

from finetune_trainer.config import LoraSpec, LoraVariant
from finetune_trainer.data import by_number, matched_labels
from finetune_trainer.errors import ConfigError
from finetune_trainer.export import kept_in_fp32
from finetune_trainer.models import ImageClassifier, head_labels, logits_of
from finetune_trainer.prune import trained_and_total
from finetune_trainer.structure import taken_for_whole, trained_whole, within

log = logging.getLogger(__name__)

HEAD_INIT_STD = 0.02  # transformers' initializer_range default; small logits keep the first steps calm
MERGE_ATOL = 1e-3  # merged and adapter logits differ only by float rounding of W + BA
CHANGE_KEPT = 0.9  # the share of the adapters' change that a 16-bit export keeps, below which it is warned of
MERGE_CHUNK = 1 << 20  # elements of a merged weight measured at a time


def new_head(model: nn.Module, head: str, num_labels: int, id2label: dict[int, str], reinitialize: bool) -> bool:
    """Put a fresh Linear of `num_labels` outputs in place of the head when its size differs (or when asked)."""
    old = model.get_submodule(head)
    kept = old.out_features == num_labels and not reinitialize
    config = getattr(model, "config", None)
    # A kept head that names every label at its id (data.head_order gave them its ids) keeps its own names for the
    # outputs no label uses (neutral, for data of negative and positive only); other outputs are LABEL_i.
    names = by_number(head_labels(model)[0])
    spare = names if kept and matched_labels(id2label, names) == {i: i for i in id2label} else {}
    fresh_names = {i: id2label.get(i, spare.get(i, f"LABEL_{i}")) for i in range(num_labels)}
    if isinstance(model, ImageClassifier):
        # An export of ours loaded keeps its labels.json's names and its builder's class count: models.head_labels
        # (a distillation's student, a teacher's columns) read the old head's classes after a new head
        model.labels = fresh_names
        model.builder_kwargs = {**model.builder_kwargs, "num_classes": num_labels}
    if config is not None:  # transformers models export their labels through the config
        config.num_labels = num_labels
        config.id2label = fresh_names
        config.label2id = {v: k for k, v in config.id2label.items()}
        # What it trains: one label of a softmax. A base saved multi-label (or for regression) exported so, and
        # transformers' pipeline scored the classes with sigmoids, its loss refused the labels.
        config.problem_type = "single_label_classification"
    if kept:
        return False
    fresh = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
    nn.init.normal_(fresh.weight, std=HEAD_INIT_STD)
    if fresh.bias is not None:
        nn.init.zeros_(fresh.bias)
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, fresh.to(old.weight.device, old.weight.dtype))
    log.info("new head %s: %d -> %d outputs", head, old.out_features, num_labels)
    return True


def add_adapters(model: nn.Module, spec: LoraSpec, targets: list[str], head: str | None,
                 new: tuple[str, ...] = ()) -> nn.Module:
    """Wrap `model` with LoRA (or DoRA) on `targets` (module names, or their last parts).

    The head, when there is one, trains in full (`modules_to_save`): it is new or must fit new labels. So do the `new`
    modules (random at load), which take no adapter: the rest of a task head (RoBERTa's classifier.dense), which with
    one would stay a random projection under a low-rank change, as peft's own SEQ_CLS task keeps `classifier` whole.
    """
    from peft import LoraConfig, get_peft_model

    whole = trained_whole(head, new)
    if targets and all(within(t, whole) for t in targets):
        verb = "trains" if len(targets) == 1 else "train"
        raise ConfigError(f"rearrange.lora: no layer is left to adapt: {', '.join(targets)} {verb} whole (the head, "
                          "or modules the checkpoint lacks); name other modules in rearrange.lora.targetModules")
    targets = [t for t in targets if not within(t, whole)]  # peft skips those inside
    if not targets:
        raise ConfigError("rearrange.lora: no layer is left to adapt (adjust.freeze freezes every LoRA candidate); "
                          "freeze fewer layers or drop rearrange.lora")
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_dora=spec.variant == LoraVariant.DORA,
        target_modules=targets,
        exclude_modules=inside(whole),
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError among them
        raise ConfigError(f"rearrange.lora.targetModules {targets}: {exc}") from exc
    if getattr(model, "is_gradient_checkpointing", False):
        # peft puts back the embeddings' input-gradient hook that checkpoint_layers removes, for the reentrant form:
        # with it every step recomputes the frozen bottom layers and takes their input gradients, training nothing.
        model.disable_input_require_grads()
    keep_whole(wrapped, whole)
    # as the status counts them: peft's own count adds its copy of a module trained whole (original_module) to the total
    trainable, total = trained_and_total(wrapped)
    log.info("%s adapters (r=%d) on %d modules: %s of %s parameters train (%.2f%%)", spec.variant.value, spec.rank,
             len(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return wrapped


def inside(modules: tuple[str, ...]) -> str | None:
    """A pattern peft matches to the full name of `modules` and of everything in them: no adapter goes there, as
    modules_to_save would have ensured."""
    return f"({'|'.join(map(re.escape, modules))})(\\..*)?" if modules else None


def keep_whole(wrapped: nn.Module, modules: tuple[str, ...]) -> None:
    """Train `modules` whole, as peft's modules_to_save does, but matched by their full names: peft matches the end of
    a name with no dot boundary, so `classifier` took DistilBERT's pre_classifier too (trained whole unasked, or a
    TypeError where it takes an adapter). What peft takes for them and has no adapter is wrapped frozen: saved with
    the adapters, unchanged, as PeftModel.from_pretrained wraps it too and loads its weights from them."""
    from peft.utils import ModulesToSaveWrapper

    adapter = wrapped.active_adapter
    base = wrapped.base_model.model
    taken = [name for name, adapted in mistaken_for_whole(wrapped, modules).items() if not adapted]  # adapted: merged
    for name in (*modules, *taken):
        parent, _, leaf = name.rpartition(".")
        owner = base.get_submodule(parent) if parent else base
        wrapper = ModulesToSaveWrapper(getattr(owner, leaf), adapter)
        wrapper.set_adapter(adapter)
        if name in taken:
            wrapper.requires_grad_(False)
        setattr(owner, leaf, wrapper)
    # Saved in adapter_config.json, for PeftModel.from_pretrained to put the modules saved whole back
    wrapped.peft_config[adapter].modules_to_save = list(modules) or None


def merge_adapters(model: nn.Module, inputs: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """Fold the adapters into the base weights, unless the merged logits drift from the adapter logits.

    Returns the model to export (plain when merged, still with adapters when the check failed) and the
    check: the largest logit difference, the tolerance, whether it passed and whether the export is merged; with
    `dtype`, the 16-bit dtype the export is written in (export.published_dtype), also the share of the adapters'
    change to the weights it keeps. Merged all the same where the check failed but the adapters kept apart would not
    load (stranded_apart): an export that differs by the drift told is of use, one that cannot load is not.
    """
    model.eval()
    with torch.no_grad():
        before = logits_of(model, inputs).float()
        kept = merge_measured(model, dtype)
        after = logits_of(model, inputs).float()
    diff = float((before - after).abs().max())
    tolerance = MERGE_ATOL * max(1.0, float(before.abs().max()))
    stranded = [] if diff <= tolerance else stranded_apart(model)
    check = {"max_abs_logit_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance,
             "merged": diff <= tolerance or bool(stranded)}
    if check["passed"]:
        log.info("merge check: max |logit difference| %.2e (tolerance %.1e) passed", diff, tolerance)
    elif stranded:
        log.warning("rearrange.mergeOnExport: the merged model's logits differ from the adapted model's by up to %.2e "
                    "(tolerance %.1e): exported merged all the same, as the adapters kept apart would not load (peft "
                    "takes %s, adapted, for a module saved whole)", diff, tolerance, ", ".join(stranded))
    if check["merged"]:
        if kept is not None:
            check |= {"dtype": str(dtype).removeprefix("torch."), "change_kept": kept}
            warn_if_lost(kept, check["dtype"])
        return model.unload(), check
    # Not the export rearrange.mergeOnExport asked for: an adapter on an embedding tied to the output does this
    log.warning("rearrange.mergeOnExport: the merged model's logits differ from the adapted model's by up to %.2e "
                "(tolerance %.1e): exporting the adapters unmerged", diff, tolerance)
    model.unmerge_adapter()
    return model, check


def stranded_apart(model: nn.Module) -> list[str]:
    """The adapted modules that peft's modules_to_save rule takes for a module saved whole (taken_for_whole:
    DistilBERT's pre_classifier, which lora_targets adapts only where the export merges): kept apart, their adapters
    make PeftModel.from_pretrained fail (a TypeError)."""
    whole = tuple(model.peft_config[model.active_adapter].modules_to_save or ())
    return [name for name, adapted in mistaken_for_whole(model, whole).items() if adapted]


def mistaken_for_whole(wrapped: nn.Module, whole: tuple[str, ...]) -> dict[str, bool]:
    """The modules of peft's `wrapped` that its modules_to_save rule takes for one of `whole` though they are none of
    them (taken_for_whole), each with whether it has adapters: keep_whole keeps the others frozen and saved with the
    adapters; the adapted are stranded_apart."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: isinstance(m, BaseTunerLayer) for name, m in wrapped.base_model.model.named_modules()
            if taken_for_whole(name, whole)}


def merge_measured(model: nn.Module, dtype: torch.dtype | None) -> float | None:
    """Merge the adapters in place (reversible with unmerge_adapter), a layer at a time as peft's merge_adapter does,
    and return the share of their change to the weights that the export at `dtype` keeps: the rounded change's
    projection on the change, summed over the layers (None without `dtype` or a change); what the export keeps in
    fp32 keeps all of it. The merge check and the final evaluation see the fp32 weights; a change under half a 16-bit
    step of a weight is rounded away."""
    from peft.tuners.tuners_utils import BaseTunerLayer, onload_layer

    model.base_model._check_merge_allowed()  # what merge_adapter refuses: an adapter on a tied weight
    fp32 = kept_in_fp32(model, dtype) if dtype is not None else None
    outer, parts = None, []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or (outer and name.startswith(f"{outer}.")):
            continue  # one within another (nn.MultiheadAttention's out_proj) is merged and measured by it
        outer = name
        with onload_layer(module):  # an offloaded layer's weights onto its device, as merge_adapter does
            if fp32 is None:
                module.merge(safe_merge=True)
            else:
                parts += merge_layer(module, f"{name}.base_layer", dtype, fp32)
    along, total = sum(part.double().cpu() for part in parts).tolist() if parts else (0.0, 0.0)
    return along / total if total else None


def merge_layer(module: nn.Module, name: str, dtype: torch.dtype, fp32: Callable[[str], bool]) -> list[torch.Tensor]:
    """Merge one tuner layer and return change_sums of every weight of its base layer `name`, on their devices
    (nn.MultiheadAttention's merge changes its in_proj_weight and its out_proj's weight)."""
    base_layer = module.get_base_layer()
    before = {n: p.detach().clone() for n, p in base_layer.named_parameters() if p.is_floating_point()}
    module.merge(safe_merge=True)
    # by name: MultiheadAttention's merge puts new tensors in place of its weights
    return [change_sums(attrgetter(n)(base_layer).detach(), base, None if fp32(f"{name}.{n}") else dtype)
            for n, base in before.items()]


def change_sums(weight: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """[rounded change . change, |change|^2] of `weight` merged from `base`, rounded to `dtype` (None: kept in fp32),
    a chunk at a time: widened copies of a whole weight took 1.25 times its size beside the copy of its base."""
    sums = torch.zeros(2, device=weight.device)
    for w, b in zip(weight.reshape(-1).split(MERGE_CHUNK), base.reshape(-1).split(MERGE_CHUNK)):
        change = w.float() - b.float()
        rounded = change if dtype is None else w.to(dtype).float() - b.to(dtype).float()
        sums += torch.stack([(rounded * change).sum(), change.square().sum()])
    return sums


def warn_if_lost(kept: float, dtype: str) -> None:
    if kept < CHANGE_KEPT:
        log.warning("the export is written in %s, the checkpoint's dtype, which keeps %.0f%% of the adapters' change "
                    "to the weights: the rest is below half a %s step of the weights it changes, and the exported "
                    "model does less than the evaluated one; set model.config dtype: float32 to export at fp32",
                    dtype, 100 * kept, dtype)
