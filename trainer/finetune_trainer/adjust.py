"""Stage 2: which parameters train, and at what learning rate and weight decay.

`freeze` only ever turns training off, so it can run again after `rearrange` to cover the
adapters placed in frozen layers. `param_groups` then builds AdamW groups from what trains:
layer-wise learning-rate decay by depth, and no weight decay on biases, norms and embeddings.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from torch import nn

from finetune_trainer.config import AdjustSpec, FreezeSpec, FreezeStrategy, LoraSpec, Task
from finetune_trainer.errors import ConfigError
from finetune_trainer.structure import (Depth, canonical, lora_candidates, taken_for_whole, trained_whole, under,
                                        unread_layers, within)

log = logging.getLogger(__name__)


def freeze(model: nn.Module, spec: FreezeSpec, depth: Depth, head: str | None, new: tuple[str, ...] = ()) -> int:
    """Apply the freeze strategy; returns how many parameters it froze. The `new` modules (random at load, or a head
    rearrange put in) are spared: frozen, they would keep their random initialisation (the freeze of the model as
    loaded covered the head that a new one replaced)."""
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad and not under(name, new) and frozen_by(spec, name, depth, head):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def freeze_checked(model: nn.Module, spec: FreezeSpec, depth: Depth, head: str | None, new: tuple[str, ...] = (),
                   loaded: Depth | None = None, unmatched: bool = False) -> bool:
    """Freeze the model as loaded (or as pruned from `loaded`), warning of what the user cannot have meant: a pattern
    that matches no name (a typo: `layers` for `layer`) freezes nothing, and a count beyond the layers (or those
    pruning left) freezes them all. After pruning (`loaded` given), only what pruning brought about is warned of: once
    is enough (`unmatched`, read only then: the pattern matched nothing as loaded either). Returns whether the pattern
    matches nothing."""
    frozen = freeze(model, spec, depth, head, new)
    log.info("froze %s parameters (%s)", f"{frozen:,}", spec.strategy.value)
    for ignored in spec.ignored() if loaded is None else ():
        log.warning("%s", ignored)
    names = [n for n, _ in model.named_parameters()]
    matches_nothing = spec.strategy == FreezeStrategy.REGEX and not any(frozen_by(spec, n, depth, head) for n in names)
    if matches_nothing and not unmatched:
        cause = "pruning removed the layers it matched" if loaded else "nothing is frozen"
        example = depth.as_loaded(canonical(next((n for n in names if depth.of(n) == 1), names[0])))
        log.warning("adjust.freeze.pattern %r matches no parameter name (such as %s): %s", spec.pattern, example, cause)
    beyond = (spec.count or 0) > depth.layers and (loaded is None or (spec.count or 0) <= loaded.layers)
    if spec.strategy == FreezeStrategy.BOTTOM_LAYERS and beyond:
        log.warning("adjust.freeze.count %d exceeds the model's %s: all of them are frozen, and only what sits "
                    "above them (a pooler, a final norm, the head) trains", spec.count, depth.described)
    if spec.strategy == FreezeStrategy.ALL_BUT_HEAD and head is None and new and loaded is None:
        trains = sum(p.numel() for n, p in model.named_parameters() if under(n, new))
        log.warning("adjust.freeze all-but-head: the model has no task head (a causal-lm job counts its output layer, "
                    "tied to the embeddings or not, as part of the body, which is frozen), so only the modules the "
                    "checkpoint lacks train, %s parameters: %s",
                    f"{trains:,}", ", ".join(new))
    return matches_nothing


def frozen_by(spec: FreezeSpec, name: str, depth: Depth, head: str | None) -> bool:
    if spec.strategy == FreezeStrategy.ALL_BUT_HEAD:
        return head is None or not canonical(name).startswith(head + ".")
    if spec.strategy == FreezeStrategy.BOTTOM_LAYERS:
        # A count beyond the stack freezes all of it, never what sits above (pooler, final norm, head): whether
        # the head trained would depend on whether rearrange replaces it.
        depth = depth.counted("adjust.freeze (strategy bottom-layers)")
        return depth.of(name) <= min(spec.count or 0, depth.layers)
    if spec.strategy == FreezeStrategy.REGEX:
        # `re` caches the compiled pattern
        return re.search(spec.pattern or "", depth.as_loaded(canonical(name))) is not None
    return False


def adaptable(candidates: list[str], spec: FreezeSpec, depth: Depth, head: str | None) -> list[str]:
    """The LoRA candidates (module names) whose weight the freeze leaves training: adapters in frozen modules
    would cost compute and learn nothing."""
    return [name for name in candidates if not frozen_by(spec, name + ".weight", depth, head)]


def lora_targets(model: nn.Module, lora: LoraSpec, task: Task, spec: FreezeSpec, depth: Depth,
                 head: str | None, new: tuple[str, ...] = (), *, merging: bool = True) -> list[str]:
    """The modules to adapt: those `lora.target_modules` names (peft's rule for a list: a module's name or its last
    parts), else every LoRA candidate; in either case only those the freeze leaves training. Where the export merges
    the adapters (`merging`: rearrange.mergeOnExport), only those peft can merge; else only those it can load
    apart (not taken_for_whole). The head and the `new` modules named are left to add_adapters, which trains them
    whole whatever the freeze."""
    names = lora.target_modules
    whole = trained_whole(head, new)
    if not names:
        candidates = [m for m in lora_candidates(model, task) if merging or not taken_for_whole(m, whole)]
        return adaptable(candidates, spec, depth, head)
    matched = named_by(model, names, depth)
    if not matched and depth.loaded_units:  # peft would match them to the renumbered layers
        raise ConfigError(f"rearrange.lora.targetModules {names}: no module that rearrange.prune kept is named so "
                          "(names are read as the model was loaded, before pruning renumbered its layers)")
    if not matched:
        return list(names)  # peft says that they match nothing
    named = called([m for m in matched if not within(m, whole)], names, model)
    named = mergeable(named, names, model) if merging else loadable(named, names, whole)
    strategy = spec.strategy.value
    kept = kept_named(named, adaptable(named, spec, depth, head), names,
                      refusal=f"adjust.freeze (strategy {strategy}) freezes every module they name that would take an "
                              "adapter, so no adapter would train; freeze less or name modules that train",
                      reason=f"which adjust.freeze (strategy {strategy}) freezes")
    return kept + [m for m in matched if within(m, whole)]


def named_by(model: nn.Module, names: list[str], depth: Depth | None = None) -> list[str]:
    """The modules that rearrange.lora.targetModules `names` match: by peft's rule for a list, a module's name or its
    last parts; the name as loaded, where `depth` says that pruning renumbered the layers."""
    loaded = depth.as_loaded if depth is not None else str
    return [m for m, _ in model.named_modules()
            if any((name := loaded(m)) == n or name.endswith("." + n) for n in names)]


def merging_picks_targets(model: nn.Module, lora: LoraSpec, task: Task, head: str | None,
                          new: tuple[str, ...] = ()) -> bool:
    """Whether rearrange.mergeOnExport may change which modules lora_targets adapts: the model has a module it would
    adapt only where the export merges (taken_for_whole; a grouped convolution named). The freeze is not asked: it
    may leave the choice alike, and then a flip of the flag restarts a run that could have resumed, no worse."""
    whole = trained_whole(head, new)
    if not lora.target_modules:
        return any(taken_for_whole(m, whole) for m in lora_candidates(model, task))
    return any(taken_for_whole(m, whole) or grouped(model, m) for m in named_by(model, lora.target_modules))


def called(named: list[str], names: list[str], model: nn.Module) -> list[str]:
    """The modules `named` in rearrange.lora.targetModules less those whose forward is never called
    (structure.unread_layers), which are warned of, or refused where nothing else is named: an adapter on one gets
    no gradient."""
    unread = unread_layers(model)
    return kept_named(named, [m for m in named if m not in unread], names,
                      refusal="their attention reads the weights of the modules they name ({first}, ...) without "
                              "calling them, so an adapter there gets no gradient; name others (the MLP's Linear "
                              "layers)",
                      reason="whose weights their attention reads without calling them, so an adapter gets no "
                             "gradient")


def grouped(model: nn.Module, name: str) -> bool:
    """Whether the module `name` is a grouped convolution, whose adapter peft cannot merge."""
    return getattr(model.get_submodule(name), "groups", 1) != 1


def mergeable(named: list[str], names: list[str], model: nn.Module) -> list[str]:
    """The modules `named` in rearrange.lora.targetModules less the grouped convolutions (MobileNet's depthwise ones,
    which lora_candidates leaves out), which are warned of, or refused where nothing else is named: peft cannot merge
    their adapters, and the export that rearrange.mergeOnExport asks for failed after all of training."""
    return kept_named(named, [m for m in named if not grouped(model, m)], names,
                      refusal="they name grouped convolutions ({first}, ...), whose adapters peft cannot merge into "
                              "the weights as rearrange.mergeOnExport asks; name others or set "
                              "rearrange.mergeOnExport false",
                      reason="grouped convolutions, whose adapters peft cannot merge as rearrange.mergeOnExport asks")


def loadable(named: list[str], names: list[str], whole: tuple[str, ...]) -> list[str]:
    """The modules `named` in rearrange.lora.targetModules less those peft takes for a module trained `whole`
    (taken_for_whole), which are warned of, or refused where nothing else is named: the adapters kept apart
    (rearrange.mergeOnExport false) would not load, as peft cannot keep an adapted module whole."""
    return kept_named(named, [m for m in named if not taken_for_whole(m, whole)], names,
                      refusal="peft takes the modules they name ({first}, ...) for a module trained whole (a name "
                              "ending with the head's), so the adapters kept apart would not load; name others or "
                              "set rearrange.mergeOnExport true",
                      reason="which peft takes for a module trained whole (a name ending with the head's), so the "
                             "adapters kept apart would not load")


def kept_named(named: list[str], kept: list[str], names: list[str], refusal: str, reason: str) -> list[str]:
    """`kept`, the modules `named` in rearrange.lora.targetModules (`names`) that may take an adapter. Refused where
    none is kept (`refusal`, in which `{first}` stands for the first module dropped), as the user asked for adapters
    and none would train; else the modules dropped are warned of, for `reason`."""
    dropped = [m for m in named if m not in kept]
    if named and not kept:
        raise ConfigError(f"rearrange.lora.targetModules {names}: " + refusal.format(first=dropped[0]))
    if dropped:
        log.warning("rearrange.lora.targetModules: no adapters on %d of the %d modules named, %s (%s, ...)",
                    len(dropped), len(named), reason, dropped[0])
    return kept


# Parameters held beside submodules that are embeddings or scales, not a layer's weight: ViT's position embedding
# and class token, Swin's relative position tables, ConvNeXt's layer scales (timm's no_weight_decay names them so).
# nn.MultiheadAttention's in_proj_weight is held there too, and is a layer's weight.
EMBEDDING_LIKE = re.compile(r"pos|token|embed|relative_position|scale")


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases, norm weights, DoRA's magnitudes and embeddings (EMBEDDING_LIKE too): decaying them toward zero hurts
    and regularises nothing."""
    names = set()
    for module_name, module in model.named_modules():
        # peft's Dora*Layer holds DoRA's magnitude: each output's norm, a scale (4-D for a convolution's)
        exempt = isinstance(module, nn.Embedding) or any(k in type(module).__name__ for k in ("Norm", "Dora"))
        beside = any(True for _ in module.children())
        for name, p in module.named_parameters(recurse=False):
            if exempt or p.dim() < 2 or (beside and EMBEDDING_LIKE.search(name)):
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def param_groups(model: nn.Module, spec: AdjustSpec, depth: Depth, head: str | None,
                 new: tuple[str, ...] = ()) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, one per (learning rate, weight decay). headLearningRate is
    the head's and the `new` modules' (random at load: the rest of a task head, RoBERTa's classifier.dense)."""
    rated = trained_whole(head, new)
    if not rated and spec.head_learning_rate:
        log.warning("adjust.headLearningRate %g is not used: the model has no task head (a causal-lm job counts its "
                    "output layer as part of the body) nor a module the checkpoint lacks; adjust.learningRate is the "
                    "top rate",
                    spec.head_learning_rate)
    exempt = no_decay_names(model)
    if spec.layerwise_decay != 1:
        depth = depth.counted(f"adjust.layerwiseDecay {spec.layerwise_decay}")
    top = depth.layers + 1
    groups: dict[tuple[float, float], dict] = defaultdict(lambda: {"params": [], "param_names": []})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if under(name, rated) and spec.head_learning_rate:
            lr = spec.head_learning_rate
        else:
            lr = spec.learning_rate * spec.layerwise_decay ** (top - min(depth.of(name), top))
        decay = 0.0 if name in exempt else spec.weight_decay
        group = groups[(lr, decay)]
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        bodied = " (a causal-lm job has no task head: its output layer counts as part of the body)"
        raise ConfigError(f"adjust.freeze (strategy {spec.freeze.strategy.value}) leaves no parameter to train"
                          + (bodied if head is None else "") + "; freeze less")
    out = [{"lr": lr, "weight_decay": decay, **g} for (lr, decay), g in sorted(groups.items(), reverse=True)]
    for g in out:
        count = sum(p.numel() for p in g["params"])
        log.info("param group lr=%.3g weight_decay=%g: %d tensors, %s parameters (e.g. %s)",
                 g["lr"], g["weight_decay"], len(g["params"]), f"{count:,}", canonical(g["param_names"][0]))
    return out
