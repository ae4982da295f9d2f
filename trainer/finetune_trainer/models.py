"""Load the model to fine-tune: transformers Auto classes for text, torchvision for images,
pretrained weights from a path/pvc/hub URI or a fresh model built from a config.

The head is loaded as the checkpoint has it; fitting it to the dataset is `rearrange`'s job,
so that the analysis can report the mismatch it fixes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn

from finetune_trainer.batches import Encoded, smallest_batch
from finetune_trainer.checkpoints import DAMAGED, damaged
from finetune_trainer.config import DatasetSpec, ModelSpec, Task
from finetune_trainer.errors import ConfigError, ModelError, failed_read
from finetune_trainer.structure import head_name
from finetune_trainer.uris import fetch

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# Where a training script's checkpoint keeps the weights beside its optimizer's state: many under "state_dict",
# torchvision's reference scripts (references/classification, detection) under "model". Lightning's "state_dict" is
# not the network's: its keys begin with the LightningModule's attribute that holds it.
CHECKPOINT_KEYS = ("state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torchvision's side classifiers, which only their own training's loss read: Inception v3's and GoogLeNet's
AUX_HEADS = ("AuxLogits", "aux1", "aux2")
TRANSFORM_INPUT = ("googlenet", "inception_v3")  # built by torchvision with transform_input for its own weights


class KeepsFrozenNorms(nn.Module):
    """A wrapper of a torchvision network (`net`) that leaves the running statistics of its frozen batch norms be."""

    net: nn.Module

    def train(self, mode: bool = True) -> KeepsFrozenNorms:
        """Training mode, except for a batch norm whose weights are frozen (adjust.freeze, or every base weight under
        LoRA): it keeps normalising with its running statistics and leaves them as they are, as Keras does for a
        frozen layer. Else each step moved them towards the new data's batches, and a frozen backbone changed."""
        super().train(mode)
        if mode:
            for module in self.net.modules():
                params = list(module.parameters(recurse=False))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and \
                        not any(p.requires_grad for p in params):
                    module.eval()
        return self


class ImageClassifier(KeepsFrozenNorms):
    """A torchvision network called like a transformers model: keyword inputs in, logits out."""

    def __init__(self, net: nn.Module, architecture: str, builder_kwargs: dict[str, Any] | None = None,
                 labels: dict[int, str] | None = None, trained_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.architecture = architecture
        self.builder_kwargs = builder_kwargs or {}  # what built `net`; the export records them
        self.labels = labels  # the class names of an export of ours, which its head was trained on
        self.trained_size = trained_size  # the input size an export of ours was trained at (its imageSize)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast at `dtype` (what train.autocast_dtype chose), or off where the run is fp32 (None)."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def held_at(model: nn.Module, dtype: torch.dtype | None, task: Task) -> list[nn.Linear]:
    """The frozen Linear layers of `model` put at the autocast `dtype`, where that loses nothing (a bf16
    checkpoint's weights, widened at load). Autocast casts them to it at each use anyway, so every product is the
    same; in fp32 they took twice the memory, and each use made one more copy, kept for the backward: a Llama 8B's
    frozen Linear layers under LoRA held 30 GB of weights and about 13 GB of casts where 15 GB do. A weight that is
    also another module's (an output layer tied to the embeddings, read outside autocast's casts) stays fp32, as do
    layers without autocast (`dtype` None), and a detector's, which evaluates with autocast off (detection.models:
    fp32 box decoding). `widened` puts them back, exactly, before the export."""
    if dtype is None or task == Task.OBJECT_DETECTION:
        return []
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    held = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if type(module) is nn.Linear and all(
                not p.requires_grad and id(p) not in shared and p.dtype == torch.float32
                and torch.equal(p.detach().to(dtype).float(), p.detach()) for p in params):
            held.append(module.to(dtype))
    return held


def widened(held: list[nn.Linear]) -> None:
    """`held_at`'s layers back in fp32, as they were loaded."""
    for module in held:
        module.float()


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def one_segment(model: nn.Module) -> bool:
    """Whether the model's token type table has one row or none (RoBERTa's kind, DeBERTa's): a BERT tokenizer's
    (model.tokenizerUri) pair gives its second text segment 1, which indexes past it."""
    return getattr(getattr(model, "config", None), "type_vocab_size", 2) < 2


def without_segments(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`inputs` less token type ids where `model` is of `one_segment`."""
    return {k: v for k, v in inputs.items() if k != "token_type_ids"} if one_segment(model) else inputs


def without_cache(model: nn.Module) -> None:
    """A transformers model whose forward keeps a key/value cache (a causal LM, its classifiers) keeps none, for good
    (a teacher, healing's target): every layer's keys and values, kept for a next token that a teacher never reads,
    were about 2 GiB more at the peak for an 8B teacher at 8 x 2048 tokens. torchvision's models have no config."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


def checkpoint_layers(model: nn.Module) -> None:
    """training.gradientCheckpointing: each transformer layer keeps only its input through the forward and recomputes
    its activations in the backward (transformers' checkpointing, non-reentrant, as HF Trainer and torchtune do it),
    while the model trains; adapters and pruning added later keep it, as they keep the layers."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"training.gradientCheckpointing: {type(model).__name__} has no layers transformers can "
                          "checkpoint; set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # The non-reentrant form needs no gradient on the layers' input: the hook transformers adds for it would carry
    # the backward down through frozen bottom layers that train nothing.
    model.disable_input_require_grads()


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that checkpoint in training (training.gradientCheckpointing): those transformers' wrapper
    checkpoints, with the flag on (the model has the flag too)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in layers if isinstance(m, GradientCheckpointingLayer)]
    return layers


@contextlib.contextmanager
def checkpointing_in_eval(model: nn.Module) -> Iterator[list[nn.Module]]:
    """The layers that checkpoint in training (training.gradientCheckpointing) checkpoint meanwhile in eval mode too
    (the analysis probe's step, healing's). Transformers checkpoints a layer only while its `training` flag is set,
    which some layers also read to drop out (OPT's, BART's): each layer's forward goes through the layer's own
    checkpoint function instead, as transformers calls it in training. Yields those layers."""
    layers = [m for m in checkpointed_layers(model) if not m.training]
    kept = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = through_checkpoint(layer)
    try:
        yield layers
    finally:
        for layer, forward in zip(layers, kept):
            if forward is None:
                del layer.forward  # the class's again
            else:
                layer.forward = forward


def through_checkpoint(layer: nn.Module) -> Callable[..., Any]:
    """`layer`'s forward, called through its checkpoint function (transformers' wrapper's call, keywords bound)."""
    forward = layer.forward

    def call(*args: Any, **kwargs: Any) -> Any:
        return layer._gradient_checkpointing_func(functools.partial(forward, **kwargs), *args)

    return call


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """A transformers model whose forward keeps a key/value cache (a causal LM, its classifiers) keeps none meanwhile,
    as in an evaluation, whose forward under no_grad would otherwise hold every layer's keys and values to its end;
    its config says use_cache again after, as the export writes it for generate(). torchvision's have no config."""
    kept = getattr(getattr(model, "config", None), "use_cache", False)
    without_cache(model)
    try:
        yield
    finally:
        if kept:
            model.config.use_cache = kept


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    uri = spec.tokenizer_uri or spec.uri
    # a teacher's tokenizer (distill) comes by its model's uri: the field is the caller's to name
    kind = "model.tokenizerUri" if spec.tokenizer_uri else "tokenizer"
    path = fetch(uri, kind=kind, revision=spec.revision, error=ModelError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        # TypeError: a config.json that holds no JSON object; bare Exceptions: the tokenizers library's (Rust) parse
        # errors, and convert_slow_tokenizer's for a slow tokenizer's files it cannot convert (no tokenizer.json)
        if (not isinstance(exc, (OSError, ValueError, TypeError)) and type(exc) is not Exception) or failed_read(exc):
            raise  # failed_read: the volume's, not the spec's: retried
        if type(exc) is Exception and (path / "tokenizer.json").is_file():
            from tokenizers import __version__ as tokenizers_version

            raise ModelError(f"{kind} {uri}: {path / 'tokenizer.json'} cannot be read by the installed tokenizers "
                             f"{tokenizers_version} ({exc}): a newer format than it knows, or a damaged file; save "
                             "the tokenizer again with this version") from exc
        raise ModelError(f"{kind} {uri}: cannot load it from {path} ({exc})") from exc
    if tokenizer.pad_token_id is None:
        # Decoder tokenizers (GPT-2) have no pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ModelError(f"tokenizer {uri}: it has no pad, eos or unk token to pad batches with; "
                         "use a tokenizer that defines one (model.tokenizerUri)")
    return tokenizer


def load_model(spec: ModelSpec, tokenizer, seed: int, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on `device`, its weights in fp32 whatever the checkpoint's dtype: these are the weights AdamW
    updates, and bf16 rounds an update of lr 1e-5 away; precision asks for autocast, not bf16 weights. A bf16 or
    fp16 checkpoint (Llama, Qwen) is read in its own dtype and widened on the device, so each process's host
    memory holds it at its stored size (an 8B model: 16 GB, not 32 GB, per process). Another `dtype` is for a
    model no optimizer updates (a distillation teacher, held in bf16): each weight is cast as it moves, so the
    device never holds the whole model at fp32; a transformer's buffers keep their dtype (RoPE's inv_freq, which
    transformers keeps in fp32: in bf16 its angles are wrong by whole radians at a few hundred positions)."""
    torch.manual_seed(seed)  # fresh weights (a new head, a model from config) are the same on every rank and rerun
    if spec.task == Task.IMAGE_CLASSIFICATION:
        return load_vision_model(spec).to(device, dtype)
    model = _load_transformer(spec, tokenizer)
    if dtype == torch.float32:
        return model.to(device).float()
    for param in model.parameters():
        param.data = param.data.to(device, dtype)
    return model.to(device)


def _load_transformer(spec: ModelSpec, tokenizer) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if spec.task == Task.CAUSAL_LM else AutoModelForSequenceClassification
    if problem := spec.config_problem():
        raise ConfigError(f"model.config.{problem}")
    # Outside the try: a hub that cannot be reached (an OSError) is no mistake of the spec; fetch tells them apart.
    path = None if spec.uri is None else fetch(spec.uri, kind="model", revision=spec.revision, error=ModelError)
    try:
        if path is None:
            overrides: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                         **text_bounds(tokenizer)}
            config = made_causal(AutoConfig.for_model(spec.architecture, **(overrides | spec.config)), spec.task)
            log.info("building %s from its config (%s)", spec.architecture, spec.config or "defaults")
            return padding_as_batched(auto.from_config(config), tokenizer, fresh=True)
        config = made_causal(AutoConfig.from_pretrained(path, **spec.config), spec.task)
        # dtype auto: the checkpoint's, see load_model
        model, info = auto.from_pretrained(path, config=config, dtype="auto", output_loading_info=True)
        model.new_modules = newly_initialised(model, info["missing_keys"])
        if spec.task == Task.CAUSAL_LM:
            stops_where_texts_end(model, tokenizer)
        return padding_as_batched(model, tokenizer, fresh=False)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, AssertionError, StrictDataclassError,
            RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
        # model.config's mistakes among them: a quoted number ("2"), a fraction of a count, zero heads, a vocab_size
        # below the tokenizer's pad id (the embedding's assertion), a negative size; a weights file that is none (a
        # git-lfs pointer, an upload cut short). Torch's other RuntimeErrors (out of memory) and a read the volume
        # failed are no mistake of the spec.
        if isinstance(exc, RuntimeError) and MISMATCHED in str(exc):  # its report went to a log we keep quiet
            raise ModelError(f"model {spec.uri}: its weights do not fit the config they are loaded with (model.config, "
                             f"or the config.json beside them): {mismatches(exc)}") from exc
        if isinstance(exc, RuntimeError) and not user_runtime_error(exc) or failed_read(exc):
            raise
        raise ModelError(f"model {spec.uri or spec.architecture}: cannot load it as {spec.task.value} ({exc})") from exc


MISMATCHED = "ignore_mismatched_sizes"  # transformers' error when a checkpoint's tensor has another shape


def mismatches(exc: BaseException, shown: int = 5) -> str:
    """The tensors whose shapes differ between the checkpoint and the config, as transformers' report lists them: from
    the load's own record, which the frame that raised holds (a second load to ask would hold a second copy of the
    model beside the first, and a large one would be OOM-killed, read as no mistake of the spec's, and retried)."""
    keys: set[tuple[str, Any, Any]] = set()
    trace = exc.__traceback__
    while trace is not None:
        keys = getattr(trace.tb_frame.f_locals.get("loading_info"), "mismatched_keys", None) or keys
        trace = trace.tb_next
    if not keys:
        return "the shapes of some of its tensors differ"
    found = sorted(keys)
    said = "; ".join(f"{key} is {tuple(saved)} in the weights, {tuple(made)} by the config"
                     for key, saved, made in found[:shown])
    return said + (f"; and {len(found) - shown} more" if len(found) > shown else "")


def newly_initialised(model: nn.Module, missing_keys: Iterable[str]) -> tuple[str, ...]:
    """The modules of `model` with weights its checkpoint lacks, which transformers initialised at random: a base
    checkpoint (AutoModel's) loaded for classification lacks all of the task head, which is more than its last Linear
    in RoBERTa's and ELECTRA's (classifier.dense), DistilBERT's (pre_classifier) and DeBERTa's (pooler.dense), and
    loaded for causal-lm, the LM head's transform (BERT's cls.predictions.transform.dense and LayerNorm). Not the
    output embeddings nor what holds them (cls.predictions) where tied to the input embeddings: a copy would cut the
    tie. Untied, they are random too and train whole, as one module with what they hold."""
    params = dict(model.named_parameters())
    embeddings = model.get_output_embeddings()
    tied = embeddings is not None and embeddings.weight is model.get_input_embeddings().weight
    output = next((name for name, m in model.named_modules() if m is embeddings), None) if tied else None
    missing = {key.rpartition(".")[0] for key in missing_keys if key in params}
    kept = {m for m in missing if output is None or not f"{output}.".startswith(f"{m}.")}
    new = tuple(sorted(m for m in kept if not any(m.startswith(f"{o}.") for o in kept)))
    if new:
        log.info("not in the checkpoint, initialised at random and trained whole: %s", ", ".join(new))
    return new


def new_modules(model: nn.Module) -> tuple[str, ...]:
    """What `newly_initialised` found when the model loaded; none for a model built from its config or torchvision's."""
    return getattr(model, "new_modules", ())


def made_causal(config: Any, task: Task) -> Any:
    """`config` made causal for a causal-lm where it names an encoder (BERT, RoBERTa, ELECTRA: `is_decoder` false):
    the encoder attends both ways, so each position saw the token it was scored on predicting, a loss no model
    that generates can reach (MiniLM, 26 steps: test perplexity 201 peeking, 450 causal). transformers' remedy, in a
    warning the trainer's log level hides: `is_decoder=True`, a causal mask. Decoders (GPT-2, Llama) have no field."""
    if task == Task.CAUSAL_LM and has_causal_switch(config) and not config.is_decoder:
        log.info("model %s is an encoder: trained as a decoder (is_decoder=True, a causal mask), as causal-lm needs",
                 config.model_type)
        config.is_decoder = True
    return config


def has_causal_switch(config: Any) -> bool:
    """Whether `config` is an encoder's that `is_decoder` makes causal (BERT, RoBERTa, ELECTRA); decoders (GPT-2,
    Llama) have no such field."""
    return getattr(config, "is_decoder", None) is not None


def head_labels(model: nn.Module) -> tuple[dict[int, str] | None, int | None]:
    """The class names a model's head was trained on and its size (a detector's without its background): a
    transformers model's config, or a torchvision one's export of ours (its labels.json)."""
    from finetune_trainer.detection.models import Detector, class_count

    if isinstance(model, Detector):
        return model.labels, class_count(model.net) - 1
    if isinstance(model, ImageClassifier):
        return model.labels, model.builder_kwargs.get("num_classes")
    config = getattr(model, "config", None)
    return (config.id2label, config.num_labels) if config is not None else (None, None)


def padding_as_batched(model: nn.Module, tokenizer, fresh: bool) -> nn.Module:
    """`model` with config.pad_token_id the tokenizer's pad, which the batches are padded with: a decoder classifier
    (GPT-2, Llama) pools the last token that is not its pad id, so with another id (Llama-2's config names its unk,
    0, where its tokenizer has no pad and pads with eos) it pooled the padding of every row shorter than the batch's
    longest. Set after loading a checkpoint: a pad of its own (BERT's [PAD]) stays the embedding's padding row.

    A pad borrowed from eos or unk (a decoder's tokenizer has none) is a token the model reads, so it is no padding
    row of the input embedding, where it would take no gradient (Llama's eos, a separator such as <|endoftext|>
    inside a text, and our own exports name it their pad), and, in a `fresh` model (built from its config), start at
    zero: it is drawn as the other rows are. The position embedding of RoBERTa's kind keeps counting from it."""
    if model.config.pad_token_id != tokenizer.pad_token_id:
        log.info("model config's pad_token_id %s is not the tokenizer's pad (%s), which batches are padded with: "
                 "using %s", model.config.pad_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id)
        model.config.pad_token_id = tokenizer.pad_token_id
    pad = tokenizer.pad_token_id
    if (generation := getattr(model, "generation_config", None)) is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad  # as exported: generate() pads a batch of prompts with it
    if pad not in (tokenizer.eos_token_id, tokenizer.unk_token_id):
        return model
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:  # a model that reads no token embedding (CANINE's characters)
        return model
    if getattr(embedding, "padding_idx", None) == pad:
        embedding.padding_idx = None
        if fresh:
            with torch.no_grad():
                embedding.weight[pad].normal_(0.0, getattr(model.config, "initializer_range", 0.02))
    return model


def text_bounds(tokenizer) -> dict[str, int | None]:
    """The ids a text starts and ends with, for a model built from its config, whose defaults are another
    vocabulary's (GPT-2's 50256, Llama's 1 and 2): generate() stops at the eos id. A tokenizer without bos and eos
    (BERT's) wraps each text in its cls and sep tokens instead."""
    def first(*ids: int | None) -> int | None:
        return next((i for i in ids if i is not None), None)

    return {"bos_token_id": first(tokenizer.bos_token_id, tokenizer.cls_token_id),
            "eos_token_id": first(tokenizer.eos_token_id, tokenizer.sep_token_id)}


def stops_where_texts_end(model: nn.Module, tokenizer) -> None:
    """generate() stops at the token every training text ends with (`text_bounds`: encode_causal appends the eos,
    a BERT tokenizer adds its [SEP]), beside the checkpoint's own: a model loaded from model.uri kept its generation
    config's, none for BERT, another for a base model under its instruct tokenizer (<|im_end|>), and generated on
    into a new text."""
    end, generation = text_bounds(tokenizer)["eos_token_id"], getattr(model, "generation_config", None)
    if end is None or generation is None:
        return
    found = generation.eos_token_id
    ids = [] if found is None else [found] if isinstance(found, int) else list(found)
    if end not in ids:
        generation.eos_token_id = [*ids, end] if ids else end


def positions_of(model: nn.Module) -> int | None:
    """The longest input the model's position table takes; None where it has none (or is not a transformer)."""
    config = getattr(model, "config", None)
    positions = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, key, None), int)), None)
    # RoBERTa and its kin number positions from their pad id + 1, the position table's padding row.
    offset = next((m.padding_idx + 1 for name, m in model.named_modules() if name.endswith("position_embeddings")
                   and isinstance(m, nn.Embedding) and m.padding_idx is not None), 0)
    return None if positions is None else positions - offset


def check_positions(model: nn.Module, max_length: int) -> None:
    """A sample longer than the model's position table fails deep in its embedding (an IndexError, which would
    read as infrastructure); say which field to change instead."""
    if (positions := positions_of(model)) is not None and max_length > positions:
        raise ConfigError(f"dataset.maxLength {max_length} exceeds the {positions} positions the model has; "
                          f"set it to {positions} or less")


def check_image_size(model: nn.Module, image_size: int) -> None:
    """An image size the network cannot take (ViT's fixed 224, poolings that shrink 16 pixels to nothing, Inception's
    75 or more) failed at its first forward with torch's words, an error that read as infrastructure and was retried;
    name dataset.imageSize instead. The forward runs on the meta device: shapes only, no compute, nothing to fail but
    the shapes. An export of ours given another size than it trained at is warned of: its digits at 16 pixels read
    at 224 scored 0.08, not 0.88; a detector of shapes trained at 128 read at 224 mAP@50 0.080, not 0.117."""
    trained = getattr(model, "trained_size", None)  # an ImageClassifier's or a Detector's, exported by us
    if trained not in (None, image_size):  # the CRD's default 224 is set whether the user wrote it or not
        log.warning("model.uri was trained on %dx%d images (its config.json imageSize) and dataset.imageSize %d "
                    "resizes them otherwise, which it has not learnt (the baseline shows it); set dataset.imageSize "
                    "%d to fine-tune it on the input it knows", trained, trained, image_size, trained)
    net = shrinking_net(model)
    if net is None:
        return
    if exc := meta_forward_error(model, net, image_size):
        default = DatasetSpec.model_fields["image_size"].default  # what torchvision's classifiers are trained at
        fits = f"; {default} fits" if image_size != default and not meta_forward_error(model, net, default) else ""
        raise ConfigError(f"dataset.imageSize {image_size}: model {model.architecture} cannot take {image_size}x"
                          f"{image_size} images ({type(exc).__name__}: {exc}){fits}")


def shrinking_net(model: nn.Module) -> nn.Module | None:
    """The part of an image model that shrinks the image, which a size check runs: an image classifier's network, a
    detector's backbone (its FPN or SSD's extra layers included; its heads pad). None for other models."""
    from finetune_trainer.detection.models import Detector

    if isinstance(model, Detector):
        return model.net.backbone
    return model.net if isinstance(model, ImageClassifier) else None


def check_one_sample_batches(model: nn.Module, image_size: int, batch_size: int, samples: int) -> None:
    """A training batch of one image (training.batchSize 1, or `samples` 1: epoch_batches gives every batch 2 rows or
    more, repeating a few where too few, but a training split of one sample has no other): a batch norm that trains
    cannot normalise one value per channel, which it gets where the network has shrunk the image to 1x1 (ResNet's last
    stage at 32 pixels or fewer, SSDlite's extra layers at any size), and raised at the first step. Checked once the
    freeze and the adapters are in place: a frozen batch norm (KeepsFrozenNorms, a trained detector's
    FrozenBatchNorm2d) keeps its running statistics and takes one image; a detector's before its analysis too, which
    trains every weight."""
    if smallest_batch(samples, batch_size) > 1:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's adapters
    net = shrinking_net(base)
    if net is None:
        return
    exc = meta_forward_error(model, net, image_size, training=True)
    if exc is None:
        return
    if not is_one_value_norm_error(exc):
        # Not this check's to judge (a module without a meta path): the image size check or the first step tells
        log.debug("a batch of one image: the forward on the meta device raised %r; not refused", exc)
        return
    # both where both make batches of one: fixing either alone is refused again at the next run
    more_samples = "train on 2 samples or more (dataset.maxTrainSamples, or the dataset's training split)"
    larger_batches = "set training.batchSize 2 or more"
    cause, fix = ((f"training.batchSize {batch_size}: {samples} training sample makes a batch of one",
                   more_samples + (f" and {larger_batches}" if batch_size == 1 else ""))
                  if samples == 1 else ("training.batchSize 1", larger_batches))
    raise ConfigError(f"{cause}: model {base.architecture} cannot train on one {image_size}x{image_size} image at a "
                      f"time (dataset.imageSize; {exc}); {fix}, or a larger dataset.imageSize")


def is_one_value_norm_error(exc: Exception) -> bool:
    """Whether `exc` is a training batch norm's refusal of one value per channel (torch's _verify_batch_size)."""
    return isinstance(exc, ValueError) and str(exc).startswith("Expected more than 1 value per channel when training")


def meta_forward_error(model: nn.Module, net: nn.Module, size: int, training: bool = False) -> Exception | None:
    """What a forward of one size x size image through `net` (`model`'s network) raises, on the meta device: shapes
    only, no compute. In eval mode, or in training mode as `model` sets it (its frozen batch norms in eval)."""
    state = {name: torch.empty_like(t, device="meta")
             for name, t in itertools.chain(net.named_parameters(), net.named_buffers())}
    was_training = model.training
    try:
        model.train(training)
        with torch.no_grad():
            torch.func.functional_call(net, state, (torch.empty(1, 3, size, size, device="meta"),))
    except NotImplementedError:  # an operation without a meta kernel: the first real forward will tell
        return None
    except (RuntimeError, AssertionError, ValueError) as exc:
        return exc
    finally:
        model.train(was_training)
    return None


def check_vocabulary(model: nn.Module, pad_token_id: int, splits: Iterable[Encoded]) -> None:
    """A token id beyond the model's embedding table fails deep in it (an IndexError, which would read as
    infrastructure): a tokenizer that is not the model's, or a model.config vocab_size below the tokenizer's."""
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get() if get else None, "num_embeddings", None)
    if rows is None:
        return
    largest = max(itertools.chain([pad_token_id], *(itertools.chain.from_iterable(s.features) for s in splits)))
    if largest >= rows:
        raise ConfigError(f"the tokenizer gives token id {largest}, beyond the {rows} rows of the model's embeddings: "
                          "use the model's own tokenizer (model.tokenizerUri), or a model.config vocab_size above "
                          f"{largest}")


def load_vision_model(spec: ModelSpec) -> ImageClassifier:
    import torchvision

    path = None if spec.uri is None else fetch(spec.uri, kind="model", revision=spec.revision, error=ModelError)
    saved = exported_config(path)
    refuse_transformers(path, spec.uri)
    architecture = spec.architecture or (saved or {}).get("architecture") or "resnet18"
    kwargs = builder_kwargs(saved, spec.config, background=0)
    if path is not None and saved is None:
        kwargs = for_torchvision_weights(architecture, kwargs)
    known = torchvision.models.list_models(torchvision.models)
    if architecture not in known:
        raise ModelError(f"model.architecture {architecture!r}: not a torchvision classifier; e.g. "
                         f"{', '.join(known[:12])}")
    try:
        net = torchvision.models.get_model(architecture, weights=None, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: a negative size ("negative dimension")
        if isinstance(exc, RuntimeError) and not user_runtime_error(exc):
            raise
        raise ModelError(f"model.config {spec.config}: {architecture} does not take it ({exc})") from exc
    if head_name(net, Task.IMAGE_CLASSIFICATION) is None:  # SqueezeNet's classifier is a 1x1 convolution
        raise ConfigError(f"model.architecture {architecture}: its classifier ends in no Linear layer, the head the "
                          "trainer sizes to the dataset's labels, trains whole and exports; choose another network "
                          "(mobilenet_v3_small is as small)")
    drop_aux_heads(net)
    if path is not None:  # torchvision's weights have the side heads (model.config aux_logits false or not)
        state = {k: v for k, v in read_state_dict(weight_file(path)).items() if k.split(".")[0] not in AUX_HEADS}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            hint = misfit_hint(net, state, assumed=not (spec.architecture or saved))
            raise ModelError(f"model {spec.uri}: its weights do not fit {architecture}{hint} ({exc})") from exc
    return ImageClassifier(net, architecture, kwargs, exported_labels(path) if saved and path else None,
                           (saved or {}).get("imageSize"))


def for_torchvision_weights(architecture: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's arguments for weights that are no export of ours (whose config.json records its own), taken for
    torchvision's: GoogLeNet and Inception v3 with transform_input, as torchvision builds them for its weights (ported
    from TensorFlow, they take inputs scaled to [-1, 1] and turn ImageNet's normalisation into it). Built with
    weights=None, it was off, and they trained on inputs at another scale. model.config's transform_input prevails;
    the export records the setting, so its reload is the same network."""
    if architecture not in TRANSFORM_INPUT or "transform_input" in kwargs:
        return kwargs
    log.info("model.uri: weights that are no export of ours, taken for torchvision's: %s built with "
             "transform_input, as torchvision builds it for them (model.config transform_input: false if they are "
             "not)", architecture)
    return {"transform_input": True} | kwargs


def drop_aux_heads(net: nn.Module) -> None:
    """Remove the network's side classifiers (AUX_HEADS), whose outputs no loss here reads. The new head resized only
    the last Linear: a side head kept its 1000 outputs where the export's reload built it with numLabels, so the
    export did not load again."""
    if not hasattr(net, "aux_logits"):
        return
    net.aux_logits = False  # else its forward in train mode returns the side heads' outputs beside the logits
    for name in AUX_HEADS:
        if hasattr(net, name):
            setattr(net, name, None)


def refuse_transformers(path: Path | None, uri: str | None) -> None:
    """Refuse a transformers model (the hub's ViT, ConvNeXt, Swin: a config.json with a model_type) by name: its
    weights fit no torchvision network, and the misfit's message told to set model.architecture, which no value
    satisfies."""
    file = None if path is None else path / "config.json"
    config = read_config(file) if file is not None and file.is_file() else None
    if isinstance(config, dict) and "model_type" in config:
        names = ", ".join(map(str, config.get("architectures") or [config["model_type"]]))
        raise ModelError(f"model {uri}: a transformers model ({names}), which image-classification does not load: "
                         "it fine-tunes a torchvision network (model.architecture), from its state dict or from "
                         "random weights")


def misfit_hint(net: nn.Module, state: dict[str, torch.Tensor], assumed: bool) -> str:
    """What to set when a state dict does not fit the network built: torch's message lists hundreds of keys and says
    neither that model.architecture defaulted nor that the weights' head has another size (a checkpoint of one's own
    trained on 10 classes), which the builder takes as model.config num_classes. Where the keys are the network's,
    the architecture is right whether it was set or not, so only the head's size is told."""
    head = next((name for name, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)
    weight = state.get(f"{head}.weight")
    other_head = head is not None and weight is not None and weight.dim() == 2 and \
        weight.shape[0] != net.get_submodule(head).out_features
    if other_head and (not assumed or set(state) == set(net.state_dict())):
        return f": their head ({head}) has {weight.shape[0]} classes; set model.config num_classes: {weight.shape[0]}"
    if assumed:
        return ", which model.architecture (not set) defaults to: set it to the network they are for"
    return ""


def exported_config(path: Path | None) -> dict[str, Any] | None:
    """The config.json of an export of ours at `path` (architecture, builder settings, numLabels), else None
    (weights alone, or another library's config.json)."""
    exported = None if path is None else path / "config.json"
    saved = read_config(exported) if exported is not None and exported.is_file() else None
    return saved if isinstance(saved, dict) and isinstance(saved.get("numLabels"), int) else None


def exported_labels(folder: Path) -> dict[int, str] | None:
    """The class names of an export of ours (export.py's labels.json), when it has them."""
    file = folder / "labels.json"
    return {int(k): str(v) for k, v in read_config(file).items()} if file.is_file() else None


def builder_kwargs(saved: dict[str, Any] | None, config: dict[str, Any], background: int) -> dict[str, Any]:
    """The torchvision builder's arguments: the settings and class count an export's config.json records
    (`background` classes added to its labels), under `config` (model.config) overriding them."""
    if saved is None:
        return dict(config)
    return saved.get("config", {}) | {"num_classes": saved["numLabels"] + background} | config


def read_config(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: not valid JSON ({exc})") from exc


def weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return path / name
    raise ModelError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch weights file. A file that is neither (a git-lfs pointer, an upload cut
    short, a saved web page) is the user's to fix: exit 1, not a retry; a read the volume failed is retried."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return unwrapped(load_file(path))
        # torchvision's reference scripts keep their argparse arguments beside the weights: a bag of plain values
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsupported = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), None)
        if unsupported is None:  # no pickle at all
            raise ModelError(not_weights(path, exc)) from exc
        raise ModelError(f"{path}: holds Python objects besides tensors (a whole model saved with torch.save(model), "
                         f"say), which the trainer does not unpickle: save its state_dict() instead ({unsupported})"
                         ) from exc
    except DAMAGED as exc:  # what a damaged file's bytes make torch or safetensors raise, as a checkpoint's
        if not damaged(exc):  # a read the volume failed, the node's out of memory: retried
            raise
        raise ModelError(not_weights(path, exc)) from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a state dict (names to tensors): save the "
                         "model's state_dict()")
    for key in CHECKPOINT_KEYS:
        weights = state.get(key)
        if isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
            state = weights
            break
    return unwrapped(state)


def not_weights(path: Path, exc: BaseException) -> str:
    return (f"{path}: not a {'safetensors' if path.suffix == '.safetensors' else 'torch'} weights file (a git-lfs "
            f"pointer that was never pulled, or a file cut short?) ({type(exc).__name__}: {exc})"[:2000])


def user_runtime_error(exc: RuntimeError) -> bool:
    """Whether torch's RuntimeError is a spec's mistake: a negative size in model.config."""
    return "negative dimension" in str(exc)


def unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the network itself where every key bears the prefix of a wrapper it was saved through:
    nn.DataParallel's or DDP's "module.", torch.compile's "_orig_mod."."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            return unwrapped({k.removeprefix(prefix): v for k, v in state.items()})
    return state
