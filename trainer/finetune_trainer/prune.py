"""How much each transformer layer and attention head matters, and the removal of the layers that matter least.

Layers are scored by Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect"): BI_i = 1 - mean over real tokens of cos(x_i, x_i+1), between the hidden states
that enter and leave layer i. A layer that hardly turns its input scores near 0 and is the first to go.

Healing (`rearrange.prune.heal`) follows the recovery step of layer-pruning work (e.g. Kim et al. 2024, "Shortened
LLaMA"; Gromov et al. 2024): before the task's training, the remaining layers learn to give back the unpruned
model's last hidden states on the training texts (or on `heal.dataset`'s, any unlabelled text), so the recipe
starts from nearly the representation the unpruned model starts from. It needs no labels, and its target is the
model as loaded, which an unpruned job starts from already.

Heads are scored as Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") do: a gate xi_h = 1
multiplies head h's output where the heads are concatenated (the input of the attention's output projection),
and I_h = mean over samples of |dL/dxi_h|. Only the gates get gradients: the weights' would cost a full
model's gradient memory, which a LoRA job must not need (the analysis probe's rule).

Removing layers keeps the model a standard transformers model: the layer list is shortened and the config's
layer count follows, so `from_pretrained` rebuilds the smaller model from the exported files. Heads are scored
only: transformers 5 has no per-layer head count (its `prune_heads` is gone), so a model without some heads
would not reload with the standard classes.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import statistics
import time
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune_trainer.batches import Batch
from finetune_trainer.config import HealSpec, PruneSpec, Task
from finetune_trainer.errors import ConfigError
from finetune_trainer.models import autocast, checkpointing_in_eval, logits_of, without_cache
from finetune_trainer.structure import Depth, SplitLayers, in_eval, layer_units, lora_types
from finetune_trainer.train import diverged, grad_scaler, scaled_step, unscaled_norm

log = logging.getLogger(__name__)

LAYER_MEASURE = "block-influence (Men et al. 2024)"
HEAD_MEASURE = "head-mask gradient (Michel et al. 2019)"
# Where the heads meet: the attention's output projection in BERT-like, GPT-2, Llama-like and ViT-like models.
OUTPUT_PROJECTIONS = ("attention.output.dense", "attn.c_proj", "self_attn.o_proj", "self_attn.out_proj",
                      "attention.dense", "attn.out_proj")
# The attributes in which transformers' modules keep the 0-based index of the layer they belong to, by which caches
# and states are indexed: layer_idx (GPT-2, Llama), layer_id (GPT-Neo, XLM, RWKV, Reformer), layer_number
# (GPT-NeoX-Japanese), layer_num (BLIP's text model). Left unrenumbered, GPT-Neo's kept layers [0, 2, 3] updated a
# cache of 3 layers at index 3 (an IndexError on every forward).
LAYER_INDEXES = ("layer_idx", "layer_id", "layer_number", "layer_num")
# The config lists whose values are the 0-based indices of some of the model's layers: Llama-4's MoE layers,
# Qwen-MoE's dense ones, Bamba's and LFM2's attention layers, Zamba2's hybrid ones, Mllama's cross-attention ones,
# Inkling's sliding-window ones, Molmo2's rope-scaled ones. Known by name, as neither a name nor the values tell
# them from a per-layer list: SmolLM3's no_rope_layers holds a 0 or 1 per layer, Qwen4-Exp's ple_layer_ids counts
# from 1 and a draft model's target_layer_ids index another model's layers. A list missed here keeps its values, and
# check_rebuilt refuses the pruning where the model would not rebuild.
INDEX_LISTS = frozenset({"moe_layers", "mlp_only_layers", "attn_layer_indices", "full_attn_idxs", "hybrid_layer_ids",
                         "cross_attention_layers", "local_layer_ids", "rope_scaling_layers"})
# The attributes a module's construction may compute from its layer's index (placed_settings): GPT-2's scaling.
PLAIN = (bool, int, float, str, type(None))
Setting = tuple[nn.Module, str, Any]  # a module, an attribute's name, its value
LATENCY_BATCHES = 8
LATENCY_ROUNDS = 3
HEAL_WARMUP = 0.1  # of the healing steps, a linear warmup
HEAL_MAX_NORM = 1.0  # healing's gradient clipping


def layer_stack(model: nn.Module, task: Task) -> tuple[str, nn.ModuleList] | None:
    """The transformer's list of layers and its name, or None for a model without one (a CNN); raises SplitLayers
    for one whose layers' parts sit in parallel lists (XLM)."""
    if task == Task.IMAGE_CLASSIFICATION:
        return None
    units = layer_units(model, task)
    prefix = units[0].rpartition(".")[0] if units else ""
    stack = model.get_submodule(prefix) if prefix else None
    return (prefix, stack) if isinstance(stack, nn.ModuleList) else None


def stack_for(model: nn.Module, task: Task, field: str) -> tuple[str, nn.ModuleList]:
    """The layer stack that `field` (rearrange.prune, rearrange.prune.heal) works on, refused naming it where there
    is none, or none that holds whole layers."""
    try:
        found = layer_stack(model, task)
    except SplitLayers as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    if found is None:
        raise ConfigError(f"{field}: a {task.value} model has no stack of transformer layers to "
                          f"{field.rpartition('.')[2]}")
    return found


def check_unshared(layers: Depth) -> None:
    """Refuse to prune a model whose forward runs a layer more than once (ALBERT's one layer, num_hidden_layers
    times): removing it removes every run of its weights, not one layer of the stack."""
    if layers.runs > 1:
        raise ConfigError(f"rearrange.prune: the model has {layers.described}, so removing a layer removes all its "
                          "runs; a model whose layers share their weights cannot be pruned by layers")


def output_projection(layer: nn.Module) -> nn.Module | None:
    return next((m for name, m in layer.named_modules() if name.endswith(OUTPUT_PROJECTIONS)
                 and isinstance(m, lora_types())), None)


def importance(model: nn.Module, batches: list[Batch], task: Task, labels_fit: bool,
               dtype: torch.dtype | None = None) -> dict[str, Any] | None:
    """Block Influence of each layer and the head-mask importance of each head (when the model's heads can be
    found) over `batches`, bottom layer first. The heads' loss is the task's own when the labels fit the model
    (causal-lm, or a head the checkpoint trained, already sized for the dataset); else the analysis' label-free probe
    loss, which a classifier head that rearrange replaces, or one initialised at random, makes a rough guide."""
    try:
        found = layer_stack(model, task)
    except SplitLayers:  # no list of whole layers to score: pruning says so (stack_for)
        return None
    if found is None:
        return None
    _, layers = found
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    projections = [output_projection(layer) for layer in layers]
    gated = isinstance(heads, int) and all(p is not None for p in projections)
    device = next(model.parameters()).device
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    turned = torch.zeros(len(layers), dtype=torch.float64, device=device)
    head_grads = torch.zeros(len(layers), heads if gated else 0, dtype=torch.float64, device=device)
    seen = torch.zeros(len(layers), dtype=torch.float64, device=device)  # real tokens through each layer, each run
    samples = 0
    state: dict[str, Any] = {}

    def measure_turn(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            before = args[0] if args else kwargs.get("hidden_states")
            after = output[0] if isinstance(output, tuple) else output
            if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                    and before.shape == after.shape and before.shape[:-1] == state["mask"].shape):
                state["unscored"] = True  # not a stack of hidden states: say nothing rather than something wrong
                return
            cos = F.cosine_similarity(before.detach().float(), after.detach().float(), dim=-1)
            turned[i] += ((1 - cos) * state["mask"]).sum()
            seen[i] += state["mask"].sum()
        return hook

    def gate(i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if x.shape[-1] % heads or x.shape[0] != state["gates"].shape[0]:
                state["ungated"] = True
                return None
            g = state["gates"][:, i].to(x.dtype)  # [samples, heads]
            x = (x.unflatten(-1, (heads, -1)) * g.view(g.shape[0], *[1] * (x.dim() - 2), heads, 1)).flatten(-2)
            return (x, *args[1:])
        return hook

    handles = [layer.register_forward_hook(measure_turn(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if gated:
        handles += [p.register_forward_pre_hook(gate(i)) for i, p in enumerate(projections)]
    try:
        for batch in batches:
            ids = next(iter(batch.inputs.values()))
            state["mask"] = real_tokens(batch)
            state["gates"] = torch.ones(ids.shape[0], len(layers), max(heads if gated else 1, 1), device=device,
                                        requires_grad=gated)
            with autocast(device.type, dtype), \
                    torch.set_grad_enabled(gated):
                logits = logits_of(model, batch.inputs)
            samples += ids.shape[0]
            if gated and logits.requires_grad:
                per_sample_loss(logits, batch, task, labels_fit).sum().backward()
                head_grads += state["gates"].grad.abs().sum(0).double()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train(was_training)
    if state.get("unscored"):
        return None
    # A mean over every run of a layer (ALBERT runs its one layer num_hidden_layers times): each run's 1 - cos is at
    # most 2, and a sum over the runs went past the documented range; the heads' scores add up the runs' gradients, a
    # ranking, which no range bounds. 1 - cos is never below 0 but by float error (-5e-9 for a layer that passes its
    # input on), which read -0.0 rounded in the job's status and -0.000 in the log
    scores = (turned / seen.clamp(min=1)).clamp(min=0)
    out: dict[str, Any] = {"layers": {"measure": LAYER_MEASURE, "scores": scores.tolist()}}
    if gated and not state.get("ungated"):
        out["heads"] = {"measure": HEAD_MEASURE, "loss": "task" if labels_fit else "label-free probe",
                        "scores": (head_grads / max(samples, 1)).tolist()}
    return out


def per_sample_loss(logits: torch.Tensor, batch: Batch, task: Task, labels_fit: bool) -> torch.Tensor:
    """Each sample's loss, so that a gate's gradient can be taken per sample (Michel et al. sum |grad| over them)."""
    logits = logits.float()
    if task == Task.CAUSAL_LM:
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], ignore_index=-100,
                                reduction="none")
        return token.sum(1) / (batch.labels[:, 1:] != -100).sum(1).clamp(min=1)
    if labels_fit:
        return F.cross_entropy(logits, batch.labels, reduction="none")
    return logits.logsumexp(-1)  # as analyze.probe_loss: every output counts, no label needed


def chosen_layers(scores: list[float], spec: PruneSpec) -> list[int]:
    """The layers to remove: the `count` (or `fraction`, rounded half up) lowest-scoring, or all below `threshold`.
    At least one layer must stay, and a fraction must remove one."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    if spec.threshold is not None:
        drop = [i for i in order if scores[i] < spec.threshold]
        field = f"rearrange.prune.threshold {spec.threshold}"
    elif spec.count is not None:
        drop = order[:spec.count]
        field = f"rearrange.prune.count {spec.count}"
    else:
        # The fraction as written, exactly: 0.29 of 50 layers is 14.5, 15 rounded half up (the float's 14.4999..., 14)
        drop = order[:math.floor(Fraction(str(spec.fraction)) * len(scores) + Fraction(1, 2))]
        field = f"rearrange.prune.fraction {spec.fraction}"
    if len(drop) >= len(scores):
        raise ConfigError(f"{field} would remove all {len(scores)} layers of the model; keep at least one")
    if not drop and spec.fraction is not None:  # as count 0 is refused: the job asked for a smaller model
        least = math.ceil(Fraction(10**4, 2 * len(scores))) / 10**4  # rounded up: the one shown must remove a layer
        raise ConfigError(f"{field} of {len(scores)} layers rounds to no layer; a fraction of at least {least} "
                          "removes one")
    if not drop:  # a threshold says how redundant a layer must be; the analysis may find none that is
        log.warning("%s removes no layer (the lowest score is %.4f): the model trains whole", field, scores[order[0]])
    return sorted(drop)


def remove_layers(model: nn.Module, task: Task, drop: list[int]) -> None:
    """Take the layers `drop` out of the model's layer list, in place, and make its config say so."""
    prefix, layers = stack_for(model, task, "rearrange.prune")
    config = getattr(model, "config", None)
    settings = dict(vars(config)) if config is not None else None
    placed: list[Setting] = []
    if config is not None:
        placed = check_rebuilt(model, prefix, layers, drop)  # before the model changes
        shrink_config(model, config, len(layers), drop)
    was = [(module, name, getattr(module, name)) for module, name, _ in placed]
    kept = nn.ModuleList(layer for i, layer in enumerate(layers) if i not in drop)
    model.set_submodule(prefix, kept)
    renumber(kept)
    assign(placed)
    try:
        check_cached_forward(model, task, drop)
    except ConfigError:  # left whole, as check_rebuilt leaves it
        model.set_submodule(prefix, layers)
        assign(was)
        renumber(layers)
        if settings is not None:
            vars(config).update(settings)
        raise
    log.info("pruned layers %s of %s (%d left)", drop, prefix, len(kept))


def renumber(layers: nn.ModuleList) -> None:
    """Make each layer's modules say its place in `layers`: attention caches are indexed by layer (GPT-2, Llama)."""
    for i, layer in enumerate(layers):
        for module in layer.modules():
            for name in LAYER_INDEXES:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, i)


def assign(settings: list[Setting]) -> None:
    for module, name, value in settings:
        setattr(module, name, value)


def shrink_config(model: nn.Module, config: Any, layers: int, drop: list[int]) -> None:
    """Make `config` (of `model`, with `layers` layers) say that the layers `drop` are gone."""
    try:  # GPT-2's n_layer through its attribute_map
        config.num_hidden_layers = layers - len(drop)
    except NotImplementedError as exc:  # Funnel's blocks, ProphetNet's encoder and decoder: no one layer count
        raise ConfigError(f"rearrange.prune: {type(model).__name__} cannot be pruned by layers ({exc})") from exc
    # A list of layer indices names the kept layers by their new places; a list with an entry per layer
    # (layer_types, mlp_layer_types, SmolLM3's no_rope_layers) keeps the kept layers' entries: from_pretrained builds
    # layer i as entry i says.
    place = {old: new for new, old in enumerate(i for i in range(layers) if i not in drop)}
    for key, value in config.to_dict().items():
        if key in INDEX_LISTS:  # one that names no layers of this stack is left as it is, for check_rebuilt
            if isinstance(value, list) and all(v in range(layers) for v in value):
                setattr(config, key, [place[v] for v in value if v in place])
        elif "layer" in key and isinstance(value, list) and len(value) == layers:
            setattr(config, key, [v for i, v in enumerate(value) if i not in drop])


def check_rebuilt(model: nn.Module, prefix: str, layers: nn.ModuleList, drop: list[int]) -> list[Setting]:
    """Refuse a pruning that from_pretrained would not rebuild: it builds layer i as the config says for index i,
    which some configs say by a rule (Qwen2-MoE's decoder_sparse_step, DeepSeek's first_k_dense_replace) rather
    than by a list per layer. Renumbered, such layers reloaded as other modules, with fresh weights and a warning.
    The whole model is compared, not the list alone: one that held only a part of each layer (XLM's layer_norm2)
    left the other parts' lists as long as before, which the config's count then shortens too. Returns the settings
    of the kept layers that from_pretrained gives them by their new index (placed_settings)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    config = copy.deepcopy(model.config)
    shrink_config(model, config, len(layers), drop)
    with torch.device("meta"):  # the modules only: no memory, no initialisation of weights
        built = type(model)._from_config(config)
        whole = type(model)._from_config(copy.deepcopy(model.config))
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}
    expected |= {f"{prefix}.{i}.{k}": v.shape for i, layer in enumerate(kept) for k, v in layer.state_dict().items()}
    got = {k: v.shape for k, v in built.state_dict().items()}
    if differ := sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k)):
        raise ConfigError(f"rearrange.prune: without layers {drop}, {type(model).__name__} would not reload as "
                          f"trained ({differ[0]} and {len(differ) - 1} more differ): its config builds its layers by "
                          f"their index, or {prefix} holds only a part of each; it cannot be pruned by these layers")
    kept_at = [i for i in range(len(layers)) if i not in drop]
    return placed_settings(layers, whole.get_submodule(prefix), built.get_submodule(prefix), kept_at)


def placed_settings(layers: nn.ModuleList, whole: nn.ModuleList, built: nn.ModuleList,
                    kept: list[int]) -> list[Setting]:
    """The plain attributes of the kept layers' modules that from_pretrained sets by the layer's index, with the
    values it sets at their new places: those that `whole` (the model's config, built) and `built` (the pruned
    config's) give the same layer at its old and at its new place differently. GPT-2 with
    scale_attn_by_inverse_layer_idx divides its attention's scaling by index + 1 once, when built: without layer 0 of
    4 the kept layers kept their old scaling, and the export reloaded as another model (logits up to 0.1 apart).
    Attributes that no index decides (training, those the job set) stay as they are."""
    settings: list[Setting] = []
    changed: set[str] = set()
    for place, index in enumerate(kept):
        rebuilt, unpruned = dict(built[place].named_modules()), dict(whole[index].named_modules())
        for name, module in layers[index].named_modules():
            if name not in rebuilt or name not in unpruned:
                continue  # a module no build of the config has
            for key, value in vars(rebuilt[name]).items():
                if key in LAYER_INDEXES:  # renumber's
                    continue
                before = vars(unpruned[name]).get(key)
                if isinstance(value, PLAIN) and key in vars(module) and (type(before), before) != (type(value), value):
                    settings.append((module, key, value))
                    changed.add(f"{name}.{key}".lstrip("."))
    if changed:
        log.info("rearrange.prune: the kept layers' %s follow their new places, as from_pretrained builds them",
                 ", ".join(sorted(changed)))
    return settings


@torch.no_grad()
def check_cached_forward(model: nn.Module, task: Task, drop: list[int]) -> None:
    """Refuse a pruning after which a causal LM cannot run the forward with a cache that generation runs (from its
    export): a hybrid model without its every attention layer (NemotronH's "M-*-" without layer 2) keeps a cache of
    linear-attention layers only, which cannot say its length. Tried rather than told by the layers' kinds, whose
    names each hybrid spells its own way: a one-token forward, on the model's device in its dtype, costs a fraction
    of one training step. Errors of the model's code only are the pruning's: a device's (RuntimeError, as CUDA's out
    of memory) stay the infrastructure's."""
    from transformers import PreTrainedModel

    if not drop or task != Task.CAUSAL_LM or not isinstance(model, PreTrainedModel):  # none removed: as loaded
        return
    try:
        with in_eval(model):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), use_cache=True)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise ConfigError(f"rearrange.prune: without layers {drop}, {type(model).__name__} cannot run a cached "
                          f"forward, as generation does ({exc}): the pruning removes layers the "
                          f"others need (a hybrid model's last attention layer); keep them") from exc


def parameters(model: nn.Module) -> int:
    """The parameters of the model an export writes: under adapters kept apart, of the base they adapt."""
    return parameter_counts(model)[0]


def trained_and_total(model: nn.Module) -> tuple[int, int]:
    """The parameters that train, and all of them each once (`parameter_counts`): as the status reports them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(parameter_counts(model))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """The parameters of the base an export writes and of the adapters on it (0 without peft). Under peft the
    adapters' are their tuner's (lora_A, lora_B, DoRA's magnitudes), and a module trained whole counts once, as
    trained: peft's copy of it as loaded (original_module) is in no export, and counted made a pruned model's
    parameters look fewer removed."""
    if not hasattr(model, "peft_config"):
        return sum(p.numel() for p in model.parameters()), 0
    adapter = re.compile(rf"(^|\.){re.escape(model.base_model.prefix)}")  # LoRA's "lora_"
    base = adapters = 0
    for name, param in model.named_parameters():
        if adapter.search(name):
            adapters += param.numel()
        elif ".original_module." not in f".{name}":
            base += param.numel()
    return base, adapters


@torch.no_grad()
def latency_ms(model: nn.Module, batches: list[Batch]) -> float:
    """Milliseconds of one forward pass per batch (the median of a few rounds over `batches`, after a warm-up
    pass), in eval mode: what serving the model costs on this device."""
    was_training = model.training
    model.eval()
    logits_of(model, batches[0].inputs)
    rounds = []
    for _ in range(LATENCY_ROUNDS):
        start = time.perf_counter()
        for batch in batches:
            logits_of(model, batch.inputs)
        if batches[0].labels.is_cuda:
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) * 1000 / len(batches))
    model.train(was_training)
    return statistics.median(rounds)


def footprint(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """The parameters (adapters kept apart counted on their own) and latency of the model as exported."""
    base, adapters = parameter_counts(model)
    return {"parameters": base, **({"adapter_parameters": adapters} if adapters else {}),
            "latency_ms": latency_ms(model, batches)}


def last_hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    states = getattr(model(**inputs, output_hidden_states=True), "hidden_states", None)
    if not states:
        raise ConfigError(f"rearrange.prune.heal: {type(model).__name__} gives no hidden states to heal towards")
    return states[-1].float()


def real_tokens(batch: Batch) -> torch.Tensor:
    ids = next(iter(batch.inputs.values()))
    mask = batch.inputs.get("attention_mask")
    return (mask if mask is not None else torch.ones(ids.shape[:2], device=ids.device)).float()


@torch.no_grad()
def agreement(model: nn.Module, batch: Batch, target: torch.Tensor) -> float:
    """Mean cosine over real tokens between `model`'s last hidden states and `target`."""
    mask = real_tokens(batch)
    cos = F.cosine_similarity(last_hidden(model, batch.inputs), target, dim=-1)
    return float((cos * mask).sum() / mask.sum())


def healing_target(model: nn.Module) -> nn.Module:
    """A copy of the model before pruning, for healing to aim at: as large as the model, so it is made only when
    healing will run, and dropped after."""
    target = copy.deepcopy(model)
    without_cache(target)  # its config a copy: the model's export still says use_cache
    size = sum(t.numel() * t.element_size() for t in [*target.parameters(), *target.buffers()])
    log.info("healing's target: a copy of the unpruned model (%.0f MiB)", size / 2**20)
    return target


def heal(model: nn.Module, teacher: nn.Module, task: Task, batches: Iterable[Batch], spec: HealSpec,
         dtype: torch.dtype | None = None) -> dict[str, float]:
    """Train the pruned `model`'s layers (not its embeddings or head) so that its last hidden states match
    `teacher`'s, the model before pruning: mean squared error over real tokens, AdamW, clipped at norm 1, in eval
    mode on both (no dropout: a regression onto fixed targets), the model's layers checkpointed where they are for
    training (training.gradientCheckpointing: a job that needs it to fit needs it here too). Under fp16 the loss is
    scaled as the training loop's is, and a step whose gradients overflow is skipped (counted in the steps; the
    warmup waits), until the loss scale is below 1 (LossNotFinite, as the training loop's). Returns the steps,
    those skipped, the seconds and the mean cosine of the two models' states on the first batch, before and after."""
    params = list(stack_for(model, task, "rearrange.prune.heal")[1].parameters())
    device = next(model.parameters()).device
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    teacher.eval()
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, round(spec.steps * HEAL_WARMUP))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    scaler = grad_scaler(device, dtype)
    optimizer.zero_grad(set_to_none=True)  # none left from before healing; scaled_step clears them after each step
    started = time.perf_counter()
    first: tuple[Batch, torch.Tensor] | None = None
    steps = skipped = 0
    try:
        with checkpointing_in_eval(model):  # training.gradientCheckpointing holds here too
            for batch in batches:
                if steps == spec.steps:
                    break
                with autocast(device.type, dtype):
                    with torch.no_grad():
                        target = last_hidden(teacher, batch.inputs)
                    if first is None:
                        first = (batch, target)
                        cosine_before = agreement(model, batch, target)
                    mask = real_tokens(batch)
                    loss = (((last_hidden(model, batch.inputs) - target) ** 2).mean(-1) * mask).sum() / mask.sum()
                rate = f"rearrange.prune.heal.learningRate ({spec.learning_rate})"
                if not torch.isfinite(loss):
                    raise diverged(f"rearrange.prune.heal: the healing loss is {loss.item()} at step {steps + 1}",
                                   dtype, rate)
                scaler.scale(loss).backward()
                norm = float(unscaled_norm(scaler, optimizer, params, HEAL_MAX_NORM))
                if scaled_step(scaler, optimizer, norm, lambda: diverged(
                        f"rearrange.prune.heal: the gradient norm is {norm} at step {steps + 1}", dtype, rate)):
                    scheduler.step()
                else:
                    skipped += 1
                steps += 1
            if first is None:
                raise ConfigError("rearrange.prune.heal: no batches to heal on")
        with autocast(device.type, dtype):
            cosine_after = agreement(model, *first)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train(was_training)
    seconds = time.perf_counter() - started
    log.info("healed the pruned model in %d steps (%d skipped by fp16's loss scaling, %.1f s): cosine to the unpruned "
             "model's last hidden states %.3f -> %.3f", steps, skipped, seconds, cosine_before, cosine_after)
    return {"steps": steps, "skipped_steps": skipped, "seconds": seconds, "cosine_before": cosine_before,
            "cosine_after": cosine_after}
