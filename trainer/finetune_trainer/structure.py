"""Where things sit in a model: its head, its stack of layers, what sits below the stack
(embeddings, a stem) and which modules can take LoRA adapters.

Shared by analyze (to report), adjust (to freeze and decay by depth) and rearrange (to
swap the head and place adapters). Names are read through peft's wrapping, so the same
rules hold before and after adapters are added.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from finetune_trainer.batches import Batch
from finetune_trainer.config import Task
from finetune_trainer.errors import ConfigError

PEFT_PREFIX = "base_model.model."
PEFT_INFIXES = re.compile(r"\.(modules_to_save\.default|original_module)(?=\.|$)")
# What peft puts inside a layer it adapts: the layer itself, and the adapters (lora_A, lora_magnitude_vector, ...).
PEFT_LAYER_PARTS = re.compile(r"\.(base_layer|lora_\w+)\..*$")


def canonical(name: str) -> str:
    """A parameter or module name as it was before peft wrapped the model."""
    return PEFT_INFIXES.sub("", name.removeprefix(PEFT_PREFIX))


def under(name: str, modules: tuple[str, ...]) -> bool:
    """Whether parameter `name` (read through peft's wrapping) belongs to one of `modules`."""
    name = canonical(name)
    return any(name.startswith(m + ".") for m in modules)


def within(module: str, modules: tuple[str, ...]) -> bool:
    """Whether `module` is one of `modules` or sits inside one."""
    return canonical(module) in modules or under(module, modules)


def trained_whole(head: str | None, new: tuple[str, ...]) -> tuple[str, ...]:
    """The modules that train whole and take no adapter: the head, and those the checkpoint lacks (random at load);
    none inside another (a new out_proj in RoBERTa's classifier, head_module's), which peft would wrap twice."""
    named = [m for m in dict.fromkeys((head, *new)) if m is not None]
    return tuple(m for m in named if not any(m.startswith(o + ".") for o in named))


def taken_for_whole(name: str, whole: tuple[str, ...]) -> bool:
    """Whether peft's modules_to_save rule, a name's end with no dot boundary, takes module `name` for one of the
    modules trained `whole` though it is none of them (DistilBERT's pre_classifier for its classifier):
    PeftModel.from_pretrained wraps it as well, to load its weights from the adapters'."""
    return name not in whole and any(name.endswith(w) for w in whole)


def lora_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return (nn.Linear, Conv1D, nn.Conv2d)


def output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def head_name(model: nn.Module, task: Task) -> str | None:
    """The classifier's output layer: the last Linear outside the transformers base model (`base_model_prefix`),
    as in every transformers and torchvision classifier. Not the last Linear of all: XLM-R and CamemBERT register
    their classifier before their base model, whose top layer's output.dense came last."""
    if task == Task.CAUSAL_LM:
        return None
    if task == Task.OBJECT_DETECTION:
        from finetune_trainer.detection.models import head_prefix

        return "net." + head_prefix(model.net)
    bases = base_models(model)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    outside = [name for name in linears if not any(name == b or name.startswith(b + ".") for b in bases)]
    return (outside or linears or [None])[-1]


def base_models(model: nn.Module) -> set[str]:
    """The names of the transformers base models in `model` (`base_model_prefix`: roberta, model); none in a
    torchvision network."""
    modules = dict(model.named_modules())
    bases = {f"{name}.{prefix}" if name else prefix for name, m in modules.items()
             if (prefix := getattr(m, "base_model_prefix", "")) and isinstance(prefix, str)}
    return bases & modules.keys()  # a wrapper (peft's) answers its model's prefix without holding a module by that name


def head_module(model: nn.Module, head: str | None) -> str | None:
    """What trains as the head (adjust.freeze all-but-head, whole under LoRA, adjust.headLearningRate): the module of
    the model's own that holds the `head` Linear (head_name), where it has one outside the base model: RoBERTa's,
    XLM-R's and ELECTRA's classifier (a *ClassificationHead: dense + out_proj), which a checkpoint that is a
    classifier trained as one, as peft's convention does (modules_to_save classifier, score); else the Linear itself
    (BERT's classifier, GPT-2's and Llama's score, DeBERTa's classifier beside its pooler). A torchvision network has
    no base model: its head (ResNet's fc, ViT's heads.head) sits in the network (net), and stays the Linear. A new
    head (rearrange.new_head) replaces the Linear only. `head` is a name before peft wrapped the model."""
    if head is None:
        return None
    top, dot, _ = head.partition(".")
    bases = base_models(model)
    if not dot or not bases or any(top == base.partition(".")[0] for base in bases):
        return head
    return top


def unread_layers(model: nn.Module) -> set[str]:
    """Layers whose forward is never called, as their owner reads their weight itself: nn.MultiheadAttention's
    out_proj (ViT's), torchvision Swin's qkv and proj. An adapter on one gets no gradient and trains nothing. Known
    owners rather than a traced forward: the same answer without an input, whatever the data and precision."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    owners = ((nn.MultiheadAttention, ("out_proj",)), (ShiftedWindowAttention, ("qkv", "proj")))
    return {f"{name}.{leaf}" if name else leaf for name, m in model.named_modules()
            for kind, leaves in owners if isinstance(m, kind) for leaf in leaves}


def lora_candidates(model: nn.Module, task: Task) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every layer LoRA can adapt, except the head, the output embeddings and the
    layers whose forward is never called (`unread_layers`).

    Not a grouped convolution (MobileNet's, ConvNeXt's depthwise ones): peft adapts it only at a rank divisible
    by its groups and cannot merge it, and a per-channel filter has no low-rank structure to learn."""
    excluded = output_embedding_names(model) | {head_name(model, task)} | unread_layers(model)
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, lora_types()) and name not in excluded and getattr(m, "groups", 1) == 1
    }


class SplitLayers(ConfigError):
    """No one list holds the model's layers: each layer's parts sit in parallel lists (XLM's and FlauBERT's
    attentions, ffns, layer_norm1, layer_norm2). Any one of them taken for the layers would leave the others' parts
    out: pruned, a list shorter than the rest (an IndexError at the next forward), frozen or decayed by depth, every
    attention and FFN counted as below the stack."""

    def __init__(self, model: nn.Module, lists: list[str]) -> None:
        super().__init__(f"{type(model).__name__} keeps each layer's parts in parallel lists ({', '.join(lists)}), "
                         "not in one list of layers, so its layers cannot be told apart")


@dataclass
class Depth:
    """Depth of each parameter: 0 below the stack (embeddings, stem), 1..n its layers, n+1 above it (pooler, head)."""

    units: list[str]  # module names of the layers, bottom to top
    below: set[str]  # canonical names of the parameters outside the layers and below them (`depth` tells them)
    split: str = ""  # why the model has no layers to count (SplitLayers'), where it has none: all at depth 1
    loaded_units: list[str] | None = None  # each layer's name as loaded, where pruning renumbered them (as_loaded)
    runs: int = 1  # the most times a forward runs one layer: ALBERT's one layer, its weights shared, num_hidden_layers

    @property
    def described(self) -> str:
        """The layers as a message counts them, saying where a forward runs each more than once (ALBERT's)."""
        if self.runs == 1:
            return f"{self.layers} layers"
        return f"{self.layers} layers (each run {self.runs} times per forward, its weights shared across the runs)"

    @property
    def layers(self) -> int:
        return len(self.units)

    def counted(self, field: str) -> Depth:
        """This depth, for `field` to count layers by; refused naming it where the model's layers are split."""
        if self.split:
            raise ConfigError(f"{field}: {self.split}")
        return self

    def as_loaded(self, name: str) -> str:
        """Module or parameter `name` (canonical) as the model was loaded: a layer that pruning renumbered named by
        its place then, as analysis.json lists it and as adjust.freeze.pattern and rearrange.lora.targetModules are
        written, so that they name the same modules whatever pruning removed."""
        for unit, loaded in zip(self.units, self.loaded_units or ()):
            if name == unit or name.startswith(unit + "."):
                return loaded + name[len(unit):]
        return name

    def of(self, name: str) -> int:
        name = canonical(name)
        for i, unit in enumerate(self.units):
            if name.startswith(unit + "."):
                return i + 1
        # An adapter is as deep as the layer it adapts: a stem's or an embedding's sits below the stack too.
        layer = PEFT_LAYER_PARTS.sub("", name)
        if name in self.below or (layer != name and any(b.startswith(layer + ".") for b in self.below)):
            return 0
        return len(self.units) + 1


def pruned_depth(now: Depth, loaded: Depth, drop: list[int]) -> Depth:
    """`now`, the depth of the model that pruning took the layers `drop` out of, naming its layers as `loaded` did."""
    return replace(now, loaded_units=[unit for i, unit in enumerate(loaded.units) if i not in drop])


def depth(model: nn.Module, task: Task, batch: Batch | None = None, dtype: torch.dtype | None = None) -> Depth:
    """Each parameter's depth. One outside the layers sits below them where a forward of `batch` (at the autocast
    `dtype`) first reads it before the last layer starts (embeddings; what the layers read or run between them, as
    DeBERTa's relative embeddings and conv), above them where after (a final norm, the head). The order they are
    registered in put OPT's final norm, registered before its layers, below them, and DeBERTa's relative
    embeddings above: it holds only without a batch, or for a parameter the forward never reads (below where
    listed before the first layer's)."""
    if task != Task.OBJECT_DETECTION and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        # Refused rather than chained: the encoder's layers were the stack, every decoder layer above it (the full
        # rate, never frozen). Chained, the encoder's final norm and the decoder's embeddings would count as below
        # the stack by when they are read, and each decoder layer reads the encoder's top: no one order of depth.
        return Depth([], set(), f"{type(model).__name__} is an encoder-decoder: its encoder's and decoder's layers "
                                "are two stacks, not one whose layers can be counted from the bottom")
    try:
        units = layer_units(model, task)
    except SplitLayers as exc:  # refused only by what counts layers (Depth.counted): a whole fine-tune needs none
        return Depth([], set(), str(exc))
    read_below = first_read_below(model, units[-1], batch, dtype) if batch is not None and units else {}
    runs = max([1, *calls_per_forward(model, units, batch, dtype).values()]) if batch is not None and units else 1
    below: set[str] = set()
    listed_below = True
    for name, _ in model.named_parameters():
        name = canonical(name)
        if any(name.startswith(u + ".") for u in units):
            listed_below = False
        elif read_below.get(name, listed_below):
            below.add(name)
    return Depth(units, below, runs=runs)


def calls_per_forward(model: nn.Module, modules: list[str], batch: Batch, dtype: torch.dtype | None) -> dict[str, int]:
    """How many times an eval forward of `batch` (at the autocast `dtype`) runs each of `modules`: more than once
    where the model runs one set of weights several times (ALBERT's shared layer, num_hidden_layers times)."""
    from finetune_trainer.models import autocast

    calls = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    hooks = [model.get_submodule(name).register_forward_pre_hook(counter(name)) for name in modules]
    try:
        with in_eval(model), torch.no_grad(), autocast(next(model.parameters()).device.type, dtype):
            model(**batch.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def first_read_below(model: nn.Module, last: str, batch: Batch, dtype: torch.dtype | None) -> dict[str, bool]:
    """Canonical name -> whether an eval forward of `batch` first reads the parameter before module `last` starts;
    {} where `last` never runs. Reads, not module calls: DeBERTa's encoder reads its rel_embeddings' weight itself
    and ViT's its class token, never calling a module that owns them."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from finetune_trainer.models import autocast

    names = {id(p): canonical(n) for n, p in model.named_parameters()}
    read_below: dict[str, bool] = {}

    class Reads(TorchFunctionMode):
        started = False  # whether `last` has started

        def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in names:
                    read_below.setdefault(names[id(leaf)], not self.started)
            return func(*args, **(kwargs or {}))

    reads = Reads()
    hook = model.get_submodule(last).register_forward_pre_hook(lambda *_: setattr(reads, "started", True))
    try:
        with in_eval(model), torch.no_grad(), autocast(next(model.parameters()).device.type, dtype), reads:
            model(**batch.inputs)
    finally:
        hook.remove()
    return read_below if reads.started else {}


@contextlib.contextmanager
def in_eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout or layer drop; BatchNorm's statistics stay), then each module back in its
    own mode: the model's put back to all, a submodule held in eval (a frozen part) came out of it training."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def layer_units(model: nn.Module, task: Task) -> list[str]:
    """The repeated blocks: the longest ModuleList that no other holds (transformers' layers, even just one;
    MaxViT's stages, not the 5 layers of its third), else the body's blocks (torchvision). Two such lists of that
    length in one module are a layer's parts (SplitLayers); in two (BART's encoder and decoder), two stacks."""
    if task == Task.OBJECT_DETECTION:
        from finetune_trainer.detection.models import backbone_units

        return backbone_units(model.net)
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    outer = [(len(model.get_submodule(name)), name) for name in lists
             if not any(name.startswith(other + ".") for other in lists)]
    if outer:
        length, prefix = max(outer)
        parent = prefix.rpartition(".")[0]
        if len(parts := [n for size, n in outer if size == length and n.rpartition(".")[0] == parent]) > 1:
            raise SplitLayers(model, sorted(parts))
        return [f"{prefix}.{i}" for i in range(length)]
    return body_blocks(model, head_name(model, task))


def body_blocks(model: nn.Module, head: str | None) -> list[str]:
    """A torchvision network's blocks. Descend into the one child that is a block (has children) besides the head's,
    or that holds nearly all the weights (RegNet's trunk beside its stem): MobileNet's and VGG's `features`, ViT's
    `encoder.layers`. Then the children that are blocks are the layers: ResNet's stages, MobileNet's features,
    ViT's encoder layers. A lone conv or norm (ResNet's stem) is not a layer: it counts as below the stack, as
    embeddings do, or above it; a flat stack of convs (VGG's) is the layers itself."""
    prefix, body = "", model
    while True:
        children = [(prefix + n, c) for n, c in body.named_children() if weights(c)]
        if len(children) > 1:  # else a wrapper (ImageClassifier's net): descend whatever it holds
            children = [(n, c) for n, c in children if not (head == n or (head or "").startswith(n + "."))]
        blocks = [(n, c) for n, c in children if any(True for _ in c.children())]
        largest = max(blocks, key=lambda nc: weights(nc[1]), default=None)
        if largest is None or (len(blocks) > 1 and weights(largest[1]) < DOMINANT * sum(weights(c) for _, c in children)):
            break
        body, prefix = largest[1], largest[0] + "."
    return [n for n, _ in blocks] or [n for n, _ in children]


DOMINANT = 0.9  # a child with this share of the weights is the body (ResNet-18's largest stage holds 75%)


def weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
