"""Stage 6: write the fine-tuned model where it can be loaded again, with what explains it.

The output folder holds model.safetensors + config.json (transformers' layout, loadable
with the same Auto class; a torchvision model gets its architecture in config.json), the
tokenizer, labels.json, report.json, a short README.md model card and loss_curve.png.
Adapters that were not merged go to adapter/ (peft's layout) instead of model.safetensors, which
then holds the base they adapt only where model.uri does not (a pruned model, one built from its
config): `PeftModel.from_pretrained(AutoModelFor...from_pretrained(out), out / "adapter")`.

An export goes in whole or not at all (`staging`, `publish`): it is written into a folder `.export-*` inside the
output folder (the same filesystem, where the output is a claim's mount point too, and on NFS), flushed to disk, then
moved into place file by file with renames, report.json last: the export is whole where report.json is. A failure or
SIGTERM while it is written leaves the earlier export as it was; the staged folder goes. The one window left is the
renames themselves (milliseconds, SIGTERM held back across them): a reader in it, or a SIGKILL, sees some of each
export and no report.json; the staged folder then still holds its report, and the next attempt finishes the renames
before anything else (`recover`). A rename replaces a file whole, so no file is ever seen half written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.batches import IMAGENET_MEAN, IMAGENET_STD
from finetune_trainer.checkpoints import fsync, fsync_tree, replace_atomically
from finetune_trainer.config import Task, TrainerConfig
from finetune_trainer.data import by_number
from finetune_trainer.detection.models import Detector, class_count
from finetune_trainer.matplotlib_folder import matplotlib_folder
from finetune_trainer.models import ImageClassifier, has_causal_switch, one_segment, positions_of
from finetune_trainer.structure import head_name
from finetune_trainer.uris import hub_parts, local_path

log = logging.getLogger(__name__)

MARKER = "report.json"  # moved into place last: an export is whole where it is
STAGING = ".export-"
STALE = ".stale.json"  # in a staged folder: the earlier export's files that its publish removes
ADAPTER = "adapter"  # adapters kept apart, peft's layout
CHAT_TEMPLATES = "additional_chat_templates"  # a tokenizer's named chat templates, which from_pretrained globs
FOLDERS = (ADAPTER, CHAT_TEMPLATES)  # the folders an export writes
# An earlier export's weights, whatever its report lists: one an older trainer cut short has no report.
WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", ADAPTER)
# What a tokenizer's save_pretrained writes: transformers' own files, and the vocabularies of its tokenizers.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", CHAT_TEMPLATES)
# Every name an export writes in the output folder (export_model, the tokenizer, write_outputs' card, curve and
# report): the only names of an earlier export's that a new one removes. The report of a trainer from before
# exports were staged listed all the folder held (a dataset in the same claim, notes, another job's folder), and the
# run's checkpoints/ and analysis.json are beside the export, not of it.
EXPORTED = (*WEIGHTS, "config.json", "generation_config.json", "labels.json", "README.md", "loss_curve.png", MARKER,
            *TOKENIZER_FILES)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A new folder inside `out` to write an export into and `publish` from; removed if the export fails before
    its report is written there. What an earlier attempt left staged, `recover` dealt with at this one's start."""
    folder = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    try:
        yield folder
    except BaseException:
        if not (folder / MARKER).exists():  # else its publish was cut short: whole, the next attempt finishes it
            shutil.rmtree(folder, ignore_errors=True)
        raise


def publish(staged: Path, out: Path, report: str) -> None:
    """Put the export written in `staged` in place of the one in `out`: flushed to disk, what the earlier export has
    that this one lacks noted, then `report` (report.json) written, which makes the staged export whole, and moved."""
    new = {p.name for p in staged.iterdir()} | {MARKER}
    earlier = {*listed(out / MARKER), *(p.name for pattern in WEIGHTS for p in out.glob(pattern))}
    (staged / STALE).write_text(json.dumps(sorted(name for name in earlier - new if of_an_export(out / name))))
    fsync_tree(staged, recursive=True)  # on disk before a report says it is whole, a node lost included
    replace_atomically(staged, MARKER, lambda tmp: tmp.write_text(report))
    swap(staged, out)


def json_text(value: Any) -> str:
    """`value` as JSON that strict readers take: a float that is not finite (an fp16 step's skipped gradient norm, a
    broken checkpoint's layer score) as null. Python's json wrote Infinity and NaN, which JSON.parse, Go's decoder
    and jq refuse or misread."""
    def finite(item: Any) -> Any:
        if isinstance(item, float):
            return item if math.isfinite(item) else None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, list | tuple):
            return [finite(v) for v in item]
        return item
    return json.dumps(finite(value), indent=2, default=str, allow_nan=False)


def listed(report: Path) -> set[str]:
    """The names in `out` of the files an export's report lists (a folder's for its files); none where it has no
    report, or one cut short by an older trainer."""
    try:
        files = json.loads(report.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    names = {Path(f).parts[0] for f in files if isinstance(f, str) and f and not Path(f).is_absolute()}
    return {name for name in names if not name.startswith(".")}  # nor "..": only what is in `out`


def of_an_export(path: Path) -> bool:
    """Whether `path`, in an output folder, is one an export writes (`EXPORTED`); of the folders, only `FOLDERS`."""
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_dir() and not path.is_symlink():
        return path.name in FOLDERS
    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in EXPORTED)


def swap(staged: Path, out: Path) -> None:
    """Move a whole staged export (its report written) into `out`, report.json last, and remove the earlier export's
    files that it has not. Run again on what it left (a SIGKILL between two renames), it finishes the move."""
    try:
        stale = json.loads((staged / STALE).read_text())
    except (OSError, ValueError):  # a staged folder not of this trainer's making: its report moves all the same
        stale = []
    with sigterm_held():
        (out / MARKER).unlink(missing_ok=True)  # from here until the last rename, out says nothing of being whole
        fsync(out)
        for name in stale:
            set_aside(out / name, staged)
        for path in sorted(p for p in staged.iterdir() if not p.name.startswith(".") and p.name != MARKER):
            if path.is_dir() or (out / path.name).is_dir():  # a folder is replaced by a rename only when empty
                set_aside(out / path.name, staged)
            os.replace(path, out / path.name)
        fsync(out)
        os.replace(staged / MARKER, out / MARKER)
        fsync(out)
    shutil.rmtree(staged, ignore_errors=True)  # on NFS a file held open elsewhere may stay: the next attempt's


def set_aside(path: Path, staged: Path) -> None:
    """Remove `path` from the export: a file at once, a folder moved into `staged` whole (removed in place, a reader
    would see some of its files), deleted with it."""
    if path.is_dir() and not path.is_symlink():
        aside = staged / f".earlier-{path.name}"
        shutil.rmtree(aside, ignore_errors=True)  # one set aside by a swap cut short, which moved this one in since
        os.replace(path, aside)
    else:
        path.unlink(missing_ok=True)


def recover(out: Path) -> None:
    """Deal with what an earlier attempt left staged in `out`: finish the move of an export it wrote whole (its
    report is in the staged folder), remove one it did not finish writing. The main rank, before anything else."""
    if not out.is_dir():
        return
    for staged in sorted((p for p in out.glob(f"{STAGING}*") if p.is_dir()), key=lambda p: p.stat().st_mtime):
        if (staged / MARKER).exists():
            log.warning("finishing the export to %s that an earlier attempt wrote and was stopped putting in place",
                        out)
            swap(staged, out)
        else:
            log.info("removing %s, an export an earlier attempt did not finish writing", staged)
            shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """SIGTERM held back until the block ends, then raised as it came: its Terminated raised between two renames of
    `swap` would leave some of each export in place. Outside the main thread SIGTERM is not Python's to hold."""
    came: list[int] = []
    try:
        previous, held = signal.signal(signal.SIGTERM, lambda signum, _: came.append(signum)), True
    except ValueError:  # not the main thread
        previous, held = None, False
    try:
        yield
    finally:
        if held:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if came:
            signal.raise_signal(signal.SIGTERM)


def export_model(model: nn.Module, tokenizer: Any, id2label: dict[int, str], cfg: TrainerConfig, out: Path) -> list[str]:
    """Write weights, config, tokenizer and labels into `out`, a new folder (`staging`'s: what an earlier export
    has that this one has not, `publish` removes); returns the files written (relative to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    adapters = hasattr(model, "peft_config")  # kept apart: not merged on request, or the merge check failed
    if adapters:
        model.save_pretrained(out / ADAPTER)
        named_base(out / ADAPTER, *adapters_base(model, cfg))
        if cfg.model.task == Task.CAUSAL_LM and not base_is_new(cfg):  # the card loads model.uri's (from_uri)
            # generate()'s stops as trained (models.stops_where_texts_end added the eos each text ended with), which
            # the card's code puts on model.uri's base: its own generation config lacks that eos, and went on past it
            model.generation_config.save_pretrained(out)
    if writes_base(model, cfg):  # with adapters, what they adapt: the adapters taken out (in place), not merged
        write_weights(model.unload() if adapters else model, cfg, out)
    if tokenizer is not None:
        # A BERT tokenizer's token_type_ids made generate(**tokenizer(...)) refuse, and a one-segment model's
        # forward index past its table (the card's classify of a pair, transformers' pipeline)
        if cfg.model.task == Task.CAUSAL_LM or one_segment(model):
            names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
            tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = names
        # A model built from model.config may take fewer positions than the tokenizer's (MiniLM's 512): truncation
        # to the tokenizer's limit (transformers' pipeline) then overran the model's table
        if (positions := positions_of(model)) is not None and positions < tokenizer.model_max_length:
            tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = positions
        tokenizer.save_pretrained(out)
    if id2label:
        (out / "labels.json").write_text(json.dumps({str(k): v for k, v in id2label.items()}, indent=2))
    weights_follow_umask(out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def weights_follow_umask(out: Path) -> None:
    """safetensors writes its files 0600 whatever the umask, so a pod of another uid in the output claim's fsGroup (a
    server of the model) read the config and tokenizer but not the weights; give them the mode the others got."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [*out.glob("*.safetensors"), *out.glob("adapter/*.safetensors")]:
        path.chmod(0o666 & ~umask)


def write_weights(model: nn.Module, cfg: TrainerConfig, out: Path) -> None:
    """model.safetensors and config.json: transformers' layout, or a torchvision network and its builder's
    arguments."""
    from safetensors.torch import save_model

    if isinstance(model, ImageClassifier):
        save_model(model.net, str(out / "model.safetensors"))
        # The head's size, which the weights have: rearrange.head.numLabels may exceed the dataset's labels.
        head = model.get_submodule(head_name(model, cfg.model.task))
        # How its input is made (batches.pixel_values): without it an export trained at 16 pixels gets fed 224.
        config = {"architecture": model.architecture, "task": cfg.model.task.value, "config": model.builder_kwargs,
                  "numLabels": head.out_features, "imageSize": cfg.dataset.image_size, "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)}
        (out / "config.json").write_text(json.dumps(config, indent=2))
    elif isinstance(model, Detector):  # detection.models.load_exported reads it back
        save_model(model.net, str(out / "model.safetensors"))
        # categoryIds: a label's category_id in the COCO file trained on, which numbers them otherwise (COCO's own
        # 1..90 for its 80 classes, from 0, ...), for a user who scores the detections with pycocotools
        config = {"architecture": model.architecture, "task": cfg.model.task.value, "config": model.builder_kwargs,
                  "numLabels": class_count(model.net) - 1, "imageSize": model.image_size, "backgroundClass": 0,
                  "categoryIds": {str(c): cid for c, cid in model.category_ids.items()}}
        (out / "config.json").write_text(json.dumps(config, indent=2))
    else:
        as_published(model).save_pretrained(out, safe_serialization=True)


def as_published(model: nn.Module) -> nn.Module:
    """`model` cast in place to the 16-bit dtype its checkpoint was published in (its config's: Llama's and Qwen's
    bf16), which loading widened to fp32 for training: written in fp32, the export of an 8B model took 32 GB where
    the base took 16, and from_pretrained (dtype auto) loaded it at fp32 (a server at fp16). Exporting is the last
    use of the model; a model.config dtype float32 keeps fp32. What transformers keeps in fp32 at that dtype (an MoE
    router's weight and bias) stays fp32, as it loads and saves them."""
    dtype = published_dtype(model)
    if dtype is None or model.dtype == dtype:
        return model
    log.info("writing the weights in %s, the dtype of the checkpoint (trained in %s)", dtype, model.dtype)
    fp32 = kept_in_fp32(model, dtype)
    for prefix, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and not fp32(f"{prefix}.{name}".lstrip(".")):
                tensor.data = tensor.data.to(dtype)  # in place: a buffer or a (tied) parameter stays itself
    return model


def kept_in_fp32(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether `as_published` at `dtype` keeps a parameter or buffer, by its name, in fp32: what transformers keeps
    so. A name within peft's wrapping (base_model.model., .base_layer) is taken as the unloaded model's, so that
    rearrange.merge_measured counts the weights the export keeps as the export does."""
    kept = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:  # the list transformers keeps in fp32 only where it loads at fp16
        kept |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    fp32 = re.compile("|".join(rf"(^|\.){re.escape(name)}($|\.)" for name in sorted(kept)) or "(?!)")
    return lambda name: bool(fp32.search(re.sub(r"^base_model\.model\.|\.base_layer(?=\.|$)", "", name)))


def published_dtype(model: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype of the checkpoint (its config's), which `as_published` writes the export in; None for fp32."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def written_dtype(model: nn.Module, cfg: TrainerConfig) -> torch.dtype | None:
    """The 16-bit dtype `export_model` writes `model`'s weights in (`as_published`); None for fp32, or where it
    writes adapters alone (writes_base)."""
    return published_dtype(model) if writes_base(model, cfg) else None


def writes_base(model: nn.Module, cfg: TrainerConfig) -> bool:
    """Whether `export_model` writes the model's weights: not where it writes adapters alone, whose base is
    model.uri's (base_is_new)."""
    return not hasattr(model, "peft_config") or base_is_new(cfg)


def base_is_new(cfg: TrainerConfig) -> bool:
    """Whether the model under the adapters is one model.uri does not hold: built from its config (random weights),
    or pruned (its layers renumbered, healed). Adapters kept apart are of no use without it."""
    return cfg.model.uri is None or cfg.rearrange.prune is not None


def base_as_published(model: nn.Module, cfg: TrainerConfig) -> bool:
    """Whether model.uri, loaded as published, is the model under the adapters: not where it is new (`base_is_new`),
    model.config changes it (num_hidden_layers; a dropout rate alone does not act at inference), or an encoder was
    made causal (its config.json attends both ways)."""
    causal = cfg.model.task == Task.CAUSAL_LM and has_causal_switch(getattr(model, "config", None))
    changed = [key for key in cfg.model.config if "dropout" not in key and not key.endswith("pdrop")]
    return not (base_is_new(cfg) or changed or causal)


def adapters_base(model: nn.Module, cfg: TrainerConfig) -> tuple[str | None, str | None]:
    """The base and revision the adapters' config names: what peft's AutoPeftModelForCausalLM loads under them. A
    classifier's is named too, but AutoPeftModelForSequenceClassification builds that base with its own number of
    labels (2 unless its config says otherwise), and fails on a head of another size: the card's code builds the
    base with num_labels and puts the adapters on it (PeftModel.from_pretrained). None where
    model.uri as published is not their base (`base_as_published`): with none named it fails, and the card's code
    builds the base they were trained on. An hf:// repo by its id and the commit loaded: peft named the model's own
    path, the pod's hub cache snapshot, which loads nowhere else, and no revision (the repo's main of the day). None
    for a folder in a repo, which peft cannot name (it loads the repo's root). Else the path the card loads too (a
    claim's as mounted in the pod), which fails where it is not rather than load another model."""
    if not base_as_published(model, cfg):
        return None, None
    uri = str(cfg.model.uri)
    if not uri.startswith("hf://"):
        return base_uri(uri), None
    repo, folder = hub_parts(uri)
    return (None, None) if folder else (repo, loaded_revision(model, cfg))


def loaded_revision(model: nn.Module, cfg: TrainerConfig) -> str | None:
    """The revision of an hf:// model.uri that the adapters' config and the card's code name: the commit the job
    loaded (fetch's snapshots/<commit>, the base's path, or its folder's), as a branch (main, where model.revision
    names none) moves on; model.revision where the path is no snapshot. None for another model.uri."""
    uri = str(cfg.model.uri)
    if not uri.startswith("hf://"):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    snapshot = Path(getattr(base, "name_or_path", "") or "")
    for _ in Path(hub_parts(uri)[1]).parts:  # up from the repo's folder to its root
        snapshot = snapshot.parent
    return snapshot.name if snapshot.parent.name == "snapshots" else cfg.model.revision


def named_base(adapter: Path, base: str | None, revision: str | None) -> None:
    """Name `base` at `revision` in the adapters' config (`adapters_base`). peft's save_pretrained names the model's
    own path where the config has none, so the file is rewritten after it."""
    path = adapter / "adapter_config.json"
    named = {"base_model_name_or_path": base, "revision": revision}
    path.write_text(json.dumps(json.loads(path.read_text()) | named, indent=2))


def loss_curve(history: list[dict[str, float]], evals: list[dict[str, Any]], path: Path) -> None:
    matplotlib_folder()
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training loss", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        metric = next(iter(evals[0]["metrics"]))
        twin = ax.twinx()
        twin.plot([e["step"] for e in evals], [e["metrics"][metric] for e in evals], "o-", color="tab:orange",
                  label=f"eval {metric}")
        twin.set_ylabel(f"eval {metric}")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(cfg: TrainerConfig, report: dict[str, Any], adapters_apart: bool = False,
               causal_switch: bool = False, written_in: torch.dtype | None = None, revision: str | None = None,
               marker: str | None = None, spare: dict[int, str] | None = None) -> str:
    """The export's README; `causal_switch`: the model's config has `is_decoder` (models.has_causal_switch);
    `written_in`: the 16-bit dtype of the weights written (`written_dtype`); `revision`: the commit of model.uri the
    job loaded (`loaded_revision`), which adapters kept apart load on (model.revision where not given); `marker`
    and `spare`: as loading_lines takes them."""
    evaluation = report["evaluation"]
    rows = [f"| {m} | {fmt(evaluation['baseline'].get(m))} | {fmt(v)} | {fmt(evaluation['delta'].get(m), '+')} |"
            for m, v in evaluation["final"].items()]
    training = report["training"]
    lora = cfg.rearrange.lora
    adapters = f"{lora.variant.value} r={lora.rank} alpha={lora.alpha}" if lora else "none (weights trained directly)"
    merge = report.get("merge_check")
    unit = rows_of(cfg.model.task)
    unit = f"{unit} of up to {cfg.dataset.max_length} tokens, cut from its texts" if unit == "chunks" else unit
    lines = [
        f"# Fine-tuned {cfg.model.uri or cfg.model.architecture}",
        "",
        f"- Task: {cfg.model.task.value}",
        f"- Dataset: {cfg.dataset.uri} ({training['train_samples']} training, {training['validation_samples']} "
        f"validation, {training['test_samples']} test {unit})",
        f"- Labels: {', '.join(report['labels'].values()) or 'none (language model)'}",
        f"- Adapters: {adapters}" + merge_note(merge),
        *dtype_lines(written_in, training),
        training_line(cfg, training),
        recipe_line(cfg),
        *distillation_lines(report.get("distillation"), evaluation.get("teacher")),
        "",
        "## Evaluation on the test split (seen by neither training nor model selection)",
        "",
        "| metric | baseline | fine-tuned | delta |",
        "|---|---|---|---|",
        *rows,
        *per_class_rows(evaluation.get("per_class_ap")),
        "",
        *pruning_section(report.get("pruning")),
        *loading_lines(cfg, head_size(cfg, len(report["labels"])), adapters_apart, causal_switch, revision,
                       marker, spare),
        "Trained by finetune-trainer; report.json has the structure analysis and the full history.",
    ]
    return "\n".join(lines) + "\n"


def merge_note(merge: dict[str, Any] | None) -> str:
    """The card's word on merged adapters, and on how much of their change the export's 16-bit weights keep (the
    evaluation saw fp32 weights)."""
    if not merge or not merge["merged"]:
        return ""
    note = f"; merged (max logit difference {merge['max_abs_logit_diff']:.1e}"
    note += ")" if merge["passed"] else f", over the merge check's tolerance {merge['tolerance']:.1e})"
    if "change_kept" in merge:
        note += f"; written in {merge['dtype']}, which keeps {merge['change_kept']:.1%} of their change to the weights"
    return note


def dtype_lines(written_in: torch.dtype | None, training: dict[str, Any]) -> list[str]:
    """The card's word on weights written in 16 bits (`as_published`): the scores it shows are the fp32 model's,
    merged or not, computed at the run's precision; and on that precision where it is not fp32 (`auto` is bf16 on a
    CPU that has it), with how to score as the run did: under bf16 autocast the arithmetic is bf16's, whose rounding
    may flip a near-tie, so the export, loaded in fp32 and run without autocast, scores slightly otherwise."""
    precision = training.get("precision", "fp32")
    lines = []
    if written_in is not None:
        name = str(written_in).removeprefix("torch.")
        measured = "in fp32" if precision == "fp32" else f"on the fp32 weights under {precision} autocast"
        lines.append(f"- Weights: written in {name}, the checkpoint's dtype; the scores below were measured "
                     f"{measured}, before the cast")
    if precision != "fp32":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, precision)
        lines.append(f"- Precision: the scores below were measured under {precision} autocast (the run's precision), "
                     "on fp32 weights; loaded in fp32 and run without autocast, the model scores slightly otherwise "
                     "(rounding may flip a near-tie). To reproduce them exactly, load it in fp32 and run its forward "
                     f"inside `torch.autocast(device_type, dtype=torch.{dtype})`, on the kind of device the run used")
    return lines


def training_line(cfg: TrainerConfig, training: dict[str, Any]) -> str:
    """The card's line on training; a run that stopped early says so, and a run whose end restored the weights of
    the best evaluation says whose they are (early stopping keeps them)."""
    line = (f"- Training: {training['steps']} steps in {training['seconds']:.0f} s, "
            f"{training['samples_per_second']:.1f} {rows_of(cfg.model.task)}/s, seed {cfg.training.seed}")
    if training.get("stopped_early"):
        why = f", {training['diverged']}" if training.get("diverged") else ""
        line += f"; stopped early ({training['total_steps']} planned{why})"
    if (best := training.get("restored_best_step")) is not None:
        line += f"; the weights are step {best}'s, the best validation {cfg.evaluation_metrics[0].value}"
    return line


def recipe_line(cfg: TrainerConfig) -> str:
    """The card's line on what set the optimisation apart from another run of the same data (report.json has the
    whole configuration)."""
    adjust, training = cfg.adjust, cfg.training
    rate = f"learning rate {adjust.learning_rate:g}"
    if adjust.head_learning_rate is not None:
        rate += f" (the head's {adjust.head_learning_rate:g})"
    batches = f"batches of {training.batch_size}"
    if training.gradient_accumulation > 1:
        batches += f" x {training.gradient_accumulation} accumulated"
    return f"- Recipe: {rate}, {batches} per process"


def distillation_lines(distillation: dict[str, Any] | None, scores: dict[str, float] | None) -> list[str]:
    """The card's line on the teacher a distilled model learned from, and its own test `scores` where measured."""
    if not distillation:
        return []
    at = f" at revision {distillation['revision']}" if distillation.get("revision") else ""
    weight = distillation["weight"]
    scored = f"; the teacher's own test scores: {', '.join(f'{m} {fmt(v)}' for m, v in scores.items())}" if scores \
        else ""
    return [f"- Distilled from {distillation['teacher']}{at}: {weight:g} of the loss its soft targets at temperature "
            f"{distillation['temperature']:g}, {1 - weight:g} the labels'{scored}"]


def rows_of(task: Task) -> str:
    """What the counts and rates count: a causal LM's chunks of its texts (not bounded by maxTrainSamples), else
    samples."""
    return "chunks" if task == Task.CAUSAL_LM else "samples"


def head_size(cfg: TrainerConfig, labels: int) -> int:
    """The outputs of the head trained (a rearrange.head.numLabels above the dataset's labels, else one per label),
    which a base loaded for adapters kept apart must have for their head to load into it."""
    num_labels = cfg.rearrange.head.num_labels
    return labels if num_labels == "auto" else max(int(num_labels), labels)


def spare_names(model: nn.Module, id2label: dict[int, str]) -> dict[int, str]:
    """The names the model's config gives the head's outputs that none of the dataset's labels (`id2label`) uses: a
    kept head wider than the dataset keeps the base's own names for them (rearrange.new_head), others are LABEL_i
    (left out here). labels.json lacks them; a merged export's config.json has them, and the card's code for adapters
    kept apart names them alike."""
    names = by_number(getattr(getattr(model, "config", None), "id2label", None))
    return {i: name for i, name in names.items() if i not in id2label and name != f"LABEL_{i}"}


def loading_lines(cfg: TrainerConfig, labels: int, adapters_apart: bool, causal_switch: bool = False,
                  revision: str | None = None, marker: str | None = None,
                  spare: dict[int, str] | None = None) -> list[str]:
    """Code that loads the export, run from the folder holding it: the standard classes, and where adapters were
    kept apart, peft on the base they adapt (this folder's, or model.uri's at `revision` with the new head's
    size). `marker`: the token that led each pair's second text (batches.pair_marker), None where the tokenizer marks
    the boundary itself. `spare`: the names the trained head gives its outputs that no label uses (`spare_names`),
    which a merged export's config.json has and labels.json lacks."""
    task, revision = cfg.model.task, revision or cfg.model.revision
    from_uri = adapters_apart and not base_is_new(cfg)
    pairs = cfg.dataset.text_pair_field is not None  # sequence-classification's alone (the config's rules)
    note: list[str] = []  # said below the code
    if task == Task.OBJECT_DETECTION:  # LoRA is not offered for detectors: never adapters apart
        # In eval mode: in training mode a detector wants the true boxes and returns its loss.
        code = ["from pathlib import Path", "import torch",
                "from finetune_trainer.detection.batches import squashed",
                "from finetune_trainer.detection.models import load_exported", "",
                "model = load_exported(Path.cwd()).eval()", "",
                "def detect(path):  # boxes [x0, y0, x1, y1] in the image's pixels, labels (labels.json's ids), scores",
                "    pixels, (width, height) = squashed(path, model.image_size)  # of any size, resized as in training",
                "    with torch.no_grad():",
                "        found = model(pixels[None])[0]",
                "    found['boxes'] = found['boxes'] * torch.tensor([width, height, width, height]) / model.image_size",
                "    return found"]
    elif task == Task.IMAGE_CLASSIFICATION:
        code = ["from pathlib import Path", "from finetune_trainer.config import ModelSpec",
                "from finetune_trainer.models import load_vision_model",
                "from finetune_trainer.batches import pixel_values", "",
                # In eval mode, as from_pretrained gives a model: in training mode batch norm would normalise by the
                # batch it is given, and one image's prediction would depend on the others'.
                'model = load_vision_model(ModelSpec(task="image-classification", uri=str(Path.cwd()))).eval()']
        if from_uri:  # the base as the job built it (a plain state dict names no network), with the head trained
            spec = {"task": task.value, "architecture": cfg.model.architecture, "uri": base_uri(str(cfg.model.uri)),
                    "revision": revision, "config": cfg.model.config}
            code[-1:] = [f"spec = ModelSpec.model_validate({ {k: v for k, v in spec.items() if v}!r})",
                         "model = load_vision_model(spec).eval()",
                         f"new_head(model, head_name(model, spec.task), {labels}, {{}}, reinitialize=False)"]
            code[3:3] = ["from finetune_trainer.rearrange import new_head",
                         "from finetune_trainer.structure import head_name"]
    else:
        auto = "AutoModelForCausalLM" if task == Task.CAUSAL_LM else "AutoModelForSequenceClassification"
        imports, args, setup, named = [f"from transformers import {auto}"], "'.'", [], []
        if from_uri:  # the base as published, at the commit loaded (adapter_config.json's), a head of this job's size
            uri = base_uri(str(cfg.model.uri))
            repo, folder = hub_parts(uri) if uri.startswith("hf://") else (uri, "")
            args = repr(repo) + (f", subfolder={folder!r}" if folder else "")
            args += f", revision={revision!r}" if revision and uri.startswith("hf://") else ""
            own: dict[str, str] = {}  # the config values the card sets itself, as code
            loading = ""
            if task == Task.CAUSAL_LM:  # the stops training taught, which export_model wrote: not model.uri's alone
                imports[-1] += ", GenerationConfig"
                named = ["model.generation_config = GenerationConfig.from_pretrained('.')"]
                # peft's AutoPeftModel (and transformers' from_pretrained of adapter/) loads the generation config of
                # the base the adapters' config names, and reads none beside the adapters
                note = [f"With peft's `AutoPeftModelForCausalLM.from_pretrained('adapter')` instead, the model has the "
                        "base's generation config, not this folder's (the eos each training text ended with): set "
                        f"`{named[0]}` after it.", ""]
            if task == Task.CAUSAL_LM and causal_switch:
                # an encoder (BERT) trained causal (models.made_causal): its config.json says is_decoder false, and
                # loaded so it attends both ways, under adapters trained with a causal mask
                own["is_decoder"] = "True"
            elif task != Task.CAUSAL_LM:
                # and the pad the batches had (this folder's tokenizer's): a decoder classifier pools the last token
                # that is not its pad id, and GPT-2's or Llama's config names none (it refused batches) or another
                imports = ["import json", f"{imports[0]}, AutoTokenizer"]
                setup = ["tokenizer = AutoTokenizer.from_pretrained('.')"]
                own = {"num_labels": str(labels), "pad_token_id": "tokenizer.pad_token_id"}
                loading = ", ignore_mismatched_sizes=True"
                # and the names of the classes the head learnt (labels.json), not the base's (LABEL_0, or its own)
                named = ["names = {int(i): name for i, name in json.load(open('labels.json')).items()}",
                         *([f"names |= {dict(sorted(spare.items()))!r}  # the head's outputs no label uses, named as "
                            "the base names them"] if spare else []),
                         f"model.config.id2label = {{i: names.get(i, f'LABEL_{{i}}') for i in range({labels})}}",
                         "model.config.label2id = {name: i for i, name in model.config.id2label.items()}"]
            if overrides := {k: v for k, v in cfg.model.config.items() if k not in own}:
                # model.config's overrides through AutoConfig, as the job took them (num_hidden_layers 3: a base of 3
                # layers, not the 6 model.uri's config.json says; a key its config lacks is dropped, as in the job)
                imports[-1] += ", AutoConfig"
                setup.append(f"config = AutoConfig.from_pretrained({args}, **{overrides!r}"
                             + "".join(f", {k}={v}" for k, v in own.items()) + ")")
                own = {"config": "config"}
            args += "".join(f", {k}={v}" for k, v in own.items()) + loading
            # at fp32, as the job loaded it (models.load_model) under the adapters it trained and scored: a 16-bit
            # checkpoint loads in its own dtype otherwise
            args += ", dtype=torch.float32"
        if task == Task.CAUSAL_LM or (pairs and not setup):
            imports[-1] += ", AutoTokenizer"
            setup = ["tokenizer = AutoTokenizer.from_pretrained('.')", *setup]
        code = [*(["import torch"] if from_uri or pairs else []), *imports, "", *setup,
                f"model = {auto}.from_pretrained({args})", *named]
    if adapters_apart:
        code.insert(code.index(""), "from peft import PeftModel")
        code.append('model = PeftModel.from_pretrained(model, "adapter")  # the adapters, kept apart')
    if pairs:  # as encode_text gave them: the tokenizer's pair, the second led by the marker where it marks none
        pair = "first, second" if marker is None else f"first, {marker!r} + second"
        code += ["", f"def classify(first, second):  # a pair's logits: its {cfg.dataset.text_field}, then its "
                     f"{cfg.dataset.text_pair_field}",
                 f"    inputs = tokenizer({pair}, truncation=True, max_length={cfg.dataset.max_length}, "
                 "return_tensors='pt')",
                 "    with torch.no_grad():", "        return model(**inputs).logits"]
    if task == Task.CAUSAL_LM:  # each text trained on ended with the eos, or the [SEP] a BERT tokenizer adds
        # Only that end is taken off a prompt, and never its only token: any special token was, and a Llama
        # tokenizer's empty prompt, its bos alone, went to nothing, which generate() cannot start from. A GPT-2
        # tokenizer adds no bos: its empty prompt is nothing already, and starts from the token each text followed.
        code += ["", "def generate(prompt, max_new_tokens=20):",
                 "    ids = tokenizer(prompt, return_tensors='pt').input_ids",
                 "    if ids.shape[1] > 1 and ids[0, -1].item() in (tokenizer.eos_token_id, tokenizer.sep_token_id):",
                 "        ids = ids[:, :-1]  # a text's end (BERT's [SEP]): a prompt goes on",
                 "    if ids.shape[1] == 0:  # an empty prompt, no bos added (GPT-2's): start as a text does, after one",
                 "        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else "
                 "tokenizer.eos_token_id",
                 "        ids = ids.new_tensor([[start]])",
                 "    out = model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), "
                 "max_new_tokens=max_new_tokens)",
                 "    return tokenizer.decode(out[0], skip_special_tokens=True)"]
    if task == Task.IMAGE_CLASSIFICATION:  # model(**preprocess(["cat.png"])) are its logits
        size = cfg.dataset.image_size
        code += ["", f"def preprocess(paths):  # image files as it trained on them: RGB, {size}x{size}, "
                     "ImageNet's mean and std", f"    return {{'pixel_values': pixel_values(paths, {size})}}"]
    return ["## Loading it", "", "From this folder:", "", "```python", *code, "```", "", *note]


def base_uri(uri: str) -> str:
    """model.uri where a user can load it: an hf:// URI as it is, else the local path (a pvc:// claim's as the
    trainer saw it)."""
    return uri if uri.startswith("hf://") else str(local_path(uri))


def per_class_rows(per_class: dict[str, dict[str, float]] | None) -> list[str]:
    """A detector's AP by category (COCO's IoU 0.5:0.95), before and after."""
    if not per_class:
        return []
    baseline, final = per_class.get("baseline", {}), per_class.get("final", {})
    return ["", "AP per category:", "", "| category | baseline | fine-tuned |", "|---|---|---|",
            *(f"| {name} | {fmt(baseline.get(name))} | {fmt(ap)} |" for name, ap in final.items())]


def pruning_section(pruning: dict[str, Any] | None) -> list[str]:
    """Before (the model as loaded, with its head for this dataset) against after (pruned and fine-tuned)."""
    if not pruning:
        return []
    before, after = pruning["before"], pruning["after"]
    metrics = [m for m in after if m not in ("parameters", "adapter_parameters", "latency_ms")]
    return [
        "## Pruning",
        "",
        removed_line(pruning),
        *heal_lines(pruning.get("heal")),
        "",
        "| | before pruning | pruned and fine-tuned |",
        "|---|---|---|",
        f"| parameters | {before['parameters']:,} | {after['parameters']:,} |",
        *adapter_rows(after.get("adapter_parameters")),
        f"| latency per test batch (ms, the training device) | {before['latency_ms']:.1f} | {after['latency_ms']:.1f} |",
        *[f"| {m} (test split) | {fmt(before.get(m))} | {fmt(after[m])} |" for m in metrics],
        "",
    ]


def adapter_rows(adapters: int | None) -> list[str]:
    """Adapters kept apart (prune.footprint counts them apart from the base, which the row above compares)."""
    return [f"| adapter parameters (kept apart, adapter/) | - | {adapters:,} |"] if adapters else []


def removed_line(pruning: dict[str, Any]) -> str:
    removed, layers = pruning["removed_layers"], pruning["layers_before"]
    if not removed:  # rearrange.prune.threshold below every layer's score
        return f"Removed none of the {layers} layers: none scored below the threshold by {pruning['measure']}."
    return (f"Removed {len(removed)} of {layers} layers ({', '.join(map(str, removed))}, counted from 0 at the "
            f"bottom), the least important by {pruning['measure']}, before training.")


def heal_lines(heal: dict[str, float] | None) -> list[str]:
    if not heal:
        return []
    skipped = f", {heal['skipped_steps']} of them skipped by fp16's loss scaling" if heal.get("skipped_steps") else ""
    return ["", f"Healed in {heal['steps']} steps{skipped} ({heal['seconds']:.0f} s) towards the unpruned model's last "
                f"hidden states: their mean cosine on a training batch went from {heal['cosine_before']:.3f} to "
                f"{heal['cosine_after']:.3f}."]


def fmt(value: float | None, sign: str = "") -> str:
    """Four decimals, or four significant digits where four decimals would show fewer (a first mAP of 7.1e-05 then
    1.5e-04 read 0.0001, 0.0001 and a delta of +0.0001) or a needlessly long number (a perplexity of 1e30)."""
    if value is None:
        return "-"
    return format(value, sign + (".4f" if value == 0 or 0.1 <= abs(value) < 1e6 else ".4g"))
