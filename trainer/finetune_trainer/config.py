"""The trainer-facing half of the FineTuneJob API: what to fine-tune and how.

Pure pydantic (no torch), because the operator imports it to validate specs and to
generate the CRD. Field names are the wire (camelCase) names through the alias generator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from finetune_trainer.rules import ApiModel, Rule, checked, immutable

# Any character but ASCII controls and space. Spelled out: \S and \w mean ASCII to the apiserver's
# RE2 but Unicode to Python and pydantic, so they would judge "hf://ü" differently.
PRINTABLE = r"[^\x00-\x20\x7f]"
# A PersistentVolumeClaim's name: a DNS subdomain (models.v2 is one).
CLAIM_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
# pvc://<claim>/<path>, hf://<org>/<name>[/<folder>], file:///abs/path or an absolute path.
URI_PATTERN = (rf"^(pvc://{CLAIM_NAME}(/{PRINTABLE}*)?|hf://[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*"
               rf"|file:///{PRINTABLE}*|/{PRINTABLE}*)$")
# A `..` segment would climb out of the claim (or the mounted volume) the URI names.
PARENT_SEGMENT = r"(^|/)\.\.(/|$)"
LONG_CLAIM = r"^pvc://[^/]{254}"
Uri = Annotated[
    str,
    Field(pattern=URI_PATTERN, max_length=1024),
    *checked(
        f"!self.matches(r'{PARENT_SEGMENT}')",
        lambda uri: re.search(PARENT_SEGMENT, uri) is None,
        "must not contain a '..' segment",
    ),
    # Not in URI_PATTERN: RE2 has no lookahead to bound the length of CLAIM_NAME's repeated labels.
    *checked(
        f"!self.matches(r'{LONG_CLAIM}')",
        lambda uri: re.match(LONG_CLAIM, uri) is None,
        "a pvc:// claim name has at most 253 characters",
    ),
]

# Pinned, a hub repository changed on main changes no run (a later attempt, a rerun) that names a commit or a tag.
Revision = Annotated[str | None, Field(max_length=128, description="Hub revision (branch, tag or commit) for hf:// URIs.")]


# from_pretrained's own arguments, which model.config would reach as keyword arguments: none is a config value.
# Against the folder the trainer fetched, a revision there was silently ignored (model.revision is the one read),
# return_unused_kwargs made the config a tuple, and subfolder or gguf_file read another file or none.
LOADING_ARGUMENTS = ("revision", "code_revision", "subfolder", "gguf_file", "cache_dir", "force_download",
                     "local_files_only", "token", "proxies", "return_unused_kwargs", "_configuration_file",
                     "_from_auto", "_from_pipeline", "_commit_hash")


class Task(StrEnum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    CAUSAL_LM = "causal-lm"
    IMAGE_CLASSIFICATION = "image-classification"
    OBJECT_DETECTION = "object-detection"


class Augmentation(StrEnum):
    HORIZONTAL_FLIP = "horizontal-flip"
    RANDOM_RESIZED_CROP = "random-resized-crop"


class Stage(StrEnum):
    """Pipeline stages in order; shared by the trainer's metrics, the status and the dashboard."""

    STARTING = "Starting"
    LOADING = "Loading"
    ANALYZING = "Analyzing"
    ADJUSTING = "Adjusting"
    REARRANGING = "Rearranging"
    BASELINE = "Baseline"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    EXPORTING = "Exporting"
    DONE = "Done"


DETECTOR_SIZES = ("min_size", "max_size")  # torchvision's detector transforms; detection.models sets both
# The builders read it only with torchvision's weights, and detection.models builds without them (weights=None):
# given, it only warned and every backbone layer trained
DETECTOR_FREEZE = "trainable_backbone_layers"


class ModelSpec(ApiModel):
    """The model to fine-tune: pretrained weights from `uri`, or a fresh one built from `architecture` + `config`."""

    uri: Uri | None = Field(
        None,
        description="Where the pretrained model lives: pvc://<claim>/<path> (a mounted volume), "
        "hf://<org>/<name> (the Hugging Face hub) or an absolute path. Omit it to build a "
        "randomly initialised model from `architecture` and `config`.",
    )
    task: Task = Field(description="What the model is fine-tuned for; decides the head, the loss and the metrics.")
    architecture: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="For image-classification: a torchvision architecture name (e.g. resnet18). For "
        "object-detection (required): a torchvision detection architecture (e.g. fasterrcnn_mobilenet_v3_large_fpn, "
        "retinanet_resnet50_fpn, fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large). Without `uri`: the "
        "transformers model type to build from `config` (e.g. gpt2, llama).",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the model's configuration (transformers config keys, e.g. n_layer; for torchvision "
        "models the builder's keyword arguments, e.g. box_score_thresh for a detector, whose input size is "
        "dataset.imageSize). "
        "Used to build a model from scratch when `uri` is omitted.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    tokenizer_uri: Uri | None = Field(
        None,
        description="Where the tokenizer lives, when not next to the weights (required when building from `config`).",
    )
    revision: Revision = None

    def config_problem(self) -> str | None:
        """`key: message` for a `config` key that would run the model repository's own Python (`config` goes to
        from_pretrained as keyword arguments), a detector's input size, which the trainer sets to dataset.imageSize
        over the builder's, or a detector's trainable_backbone_layers, which the builder ignores. The apiserver's CEL
        cannot read `config`'s preserved fields; the operator and the trainer can."""
        if "trust_remote_code" in self.config:
            return ("trust_remote_code: the trainer never runs a model repository's own Python code (its "
                    "config.json's auto_map); use a model of an architecture transformers has")
        if key := next((k for k in LOADING_ARGUMENTS if k in self.config), None):
            hint = "set model.revision" if key == "revision" else "the trainer reads the model's files itself"
            return (f"{key}: an argument of from_pretrained (how and where it reads the files), not a value of the "
                    f"model's config; {hint}")
        if self.task == Task.OBJECT_DETECTION and (key := next((k for k in DETECTOR_SIZES if k in self.config), None)):
            return (f"{key}: a detector takes its images at dataset.imageSize (resized to it square, their boxes with "
                    "them), and its own transform is set to that; set dataset.imageSize instead")
        if self.task == Task.OBJECT_DETECTION and DETECTOR_FREEZE in self.config:
            return (f"{DETECTOR_FREEZE}: torchvision's builder reads it only when it loads its own weights, which the "
                    "trainer does not (every backbone layer would train); freeze with adjust.freeze instead, strategy "
                    "bottom-layers (count: the backbone's lowest stages) or all-but-head")
        return None

    rules = (
        Rule(
            cel="has(self.uri) || has(self.architecture)",
            holds=lambda m: m.uri is not None or m.architecture is not None,
            message="either uri (pretrained weights) or architecture (build from config) is required",
            field="uri",
        ),
        Rule(
            cel="self.task != 'object-detection' || has(self.architecture)",
            holds=lambda m: m.task != Task.OBJECT_DETECTION or m.architecture is not None,
            message="object-detection needs architecture (a torchvision detector, e.g. fasterrcnn_mobilenet_v3_large_fpn)",
            field="architecture",
        ),
    )


class TextFormat(StrEnum):
    AUTO = "auto"
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"
    HF_DISK = "hf-disk"


class DatasetFormat(StrEnum):
    AUTO = "auto"
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"
    HF_DISK = "hf-disk"
    IMAGE_FOLDER = "imagefolder"
    COCO = "coco"


HUB_LAYOUTS = ("A folder may hold the hub's layouts: files named by split (train.csv, test-00000-of-00001.parquet) "
               "or in folders named by split.")


class TextsSpec(ApiModel):
    """Where texts are read from: a file or folder, its format and the column holding the text (and the one holding
    a pair's second text)."""

    uri: Uri = Field(description="A file or folder: pvc://<claim>/<path>, hf://<org>/<name> (or a folder in it: "
                     "hf://<org>/<name>/<folder>, such as one subset of a dataset) or an absolute path.")
    format: TextFormat = Field(
        TextFormat.AUTO,
        description="File format; auto picks it from the extension (a folder with dataset_info.json is an HF "
        f"save_to_disk dataset). {HUB_LAYOUTS}",
    )
    text_field: str = Field("text", min_length=1, description="Column holding the input text, one a row.")
    text_pair_field: str | None = Field(
        None,
        min_length=1,
        description="Column holding a row's second text (sequence-classification only), classified together with "
        "textField's as a pair: premise and hypothesis (NLI), question and passage, two sentences (paraphrase), "
        "tokenized as the model's pairs are (BERT's [SEP] and segment ids).",
    )
    revision: Revision = None


class DatasetSpec(TextsSpec):
    """The labelled data: its own train, validation and test splits, or a seeded split of its rows into them."""

    format: DatasetFormat = Field(  # type: ignore[assignment]  # texts' formats, and images'
        DatasetFormat.AUTO,
        description="File format; auto picks it from the extension (a folder of class folders is an ImageFolder, "
        "a folder with dataset_info.json is an HF save_to_disk dataset; object-detection reads coco). "
        "coco (object-detection only): a COCO annotations JSON, or a folder with annotations.json or one JSON per split "
        "(train.json, val.json, test.json), each image's file_name relative to the JSON's folder or its images/ (or, "
        f"in COCO's layout, to train2017/ beside annotations/instances_train2017.json). {HUB_LAYOUTS}",
    )

    label_field: str = Field(
        "label", min_length=1, description="Column holding the label (classification tasks)."
    )
    validation_split: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Fraction of the rows held out as the validation split (evaluated during training; early "
        "stopping selects on it) when the dataset has none (seeded by training.seed).",
    )
    test_split: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Fraction of the rows held out as the test split, which the baseline and final scores come "
        "from and nothing else sees, when the dataset has none (seeded by training.seed). Rows with the same input "
        "(the same text, or image files of the same bytes under any names) stay on one side of the split, so no "
        "held-out score is taken on a text or image that trained.",
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Use at most this many training rows (after the split)."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many rows of each held-out split (validation, test)."
    )
    max_length: int = Field(
        128,
        ge=8,
        le=131072,
        description="Tokens per sample: longer texts are truncated for classification and cut into chunks of "
        "this length for causal-lm.",
    )
    image_size: int = Field(
        224, ge=8, le=4096, description="Images are resized to imageSize x imageSize pixels (their boxes with them)."
    )
    augment: Annotated[list[Augmentation], *checked(
        "self.all(a, self.exists_one(b, b == a))", lambda kinds: len(set(kinds)) == len(kinds),
        "each change is named once")] | None = Field(
        None,
        min_length=1,
        max_length=2,
        description="Random changes to the training images, drawn afresh every epoch (seeded by training.seed, so a "
        "resumed run draws them alike); evaluation, and the export's preprocess, see each image whole. "
        "horizontal-flip mirrors half of them (a detector's boxes with them; not for digits or writing); "
        "random-resized-crop shows a random part of 8-100% of the area, of aspect 3/4 to 4/3 "
        "(torchvision's ImageNet recipe), image-classification only.",
    )


class AnalyzeSpec(ApiModel):
    """Stage 1: inspect the model's structure on a few real batches before touching it."""

    probe_batches: int = Field(
        2, ge=1, le=64, description="Batches run through the model to probe gradients, FLOPs and memory."
    )
    fail_on_fatal: bool = Field(
        True, description="Stop the job when the analysis finds a fatal problem (e.g. NaN weights)."
    )


class FreezeStrategy(StrEnum):
    NONE = "none"
    ALL_BUT_HEAD = "all-but-head"
    BOTTOM_LAYERS = "bottom-layers"
    REGEX = "regex"


class FreezeSpec(ApiModel):
    """Which parameters stay fixed during training."""

    strategy: FreezeStrategy = Field(
        FreezeStrategy.NONE,
        description="none: train everything; all-but-head: only the task head; bottom-layers: freeze the embeddings "
        "and the lowest `count` layers; regex: freeze parameters whose name matches `pattern`. Whatever the strategy, "
        "a new head and the modules the checkpoint lacks (random at load: RoBERTa's classifier.dense, a missing "
        "pooler) train whole.",
    )
    count: int | None = Field(None, ge=1, le=1000, description="Number of bottom layers to freeze (bottom-layers).")
    pattern: str | None = Field(
        None, min_length=1, max_length=512,
        description="Python regex over parameter names to freeze (regex), names as loaded: after rearrange.prune, a "
        "kept layer is still named by its place before pruning.",
    )

    def pattern_problem(self) -> str | None:
        """Python's regex syntax, which the apiserver's CEL (RE2) cannot check; the operator and the trainer can."""
        try:
            re.compile(self.pattern or "")
        except re.error as exc:
            return f"not a valid regular expression ({exc})"
        return None

    def ignored(self) -> list[str]:
        """The fields set that the strategy does not read, each said: {freeze: {count: 2}} (strategy none by default)
        froze nothing without a word. Warned of, not refused: jobs stored before a refusal failed at the operator's
        next look at them."""
        return [f"adjust.freeze.{field} is read only with strategy {strategy.value}, and the strategy is "
                f"{self.strategy.value}: ignored"
                for field, strategy in (("count", FreezeStrategy.BOTTOM_LAYERS), ("pattern", FreezeStrategy.REGEX))
                if getattr(self, field) is not None and self.strategy != strategy]

    rules = (
        Rule(
            cel="self.strategy != 'bottom-layers' || has(self.count)",
            holds=lambda m: m.strategy != FreezeStrategy.BOTTOM_LAYERS or m.count is not None,
            message="count is required when strategy is bottom-layers",
            field="count",
        ),
        Rule(
            cel="self.strategy != 'regex' || has(self.pattern)",
            holds=lambda m: m.strategy != FreezeStrategy.REGEX or m.pattern is not None,
            message="pattern is required when strategy is regex",
            field="pattern",
        ),
    )


class AdjustSpec(ApiModel):
    """Stage 2: freezing and optimizer parameter groups."""

    freeze: FreezeSpec = Field(default_factory=FreezeSpec, description="Which parameters to freeze.")
    learning_rate: float = Field(
        5e-5, gt=0, le=1, description="Peak learning rate (after warmup) of what sits above the layer stack: the "
        "pooler, the final norm and the head (unless headLearningRate); the stack's layers decay from it by "
        "layerwiseDecay."
    )
    head_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Learning rate of the head (new or kept) and of the modules the checkpoint lacks; defaults to "
        "learningRate.",
    )
    layerwise_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Each layer of the stack trains at this fraction of the rate above it: the top layer at "
        "learningRate x layerwiseDecay, the one below at that x layerwiseDecay again (1 = no decay).",
    )
    weight_decay: float = Field(
        0.01,
        ge=0,
        le=1,
        description="AdamW weight decay; never applied to biases, norms or embeddings.",
    )


class HeadSpec(ApiModel):
    """The classification head."""

    num_labels: Annotated[int, Field(ge=2, le=100000)] | Literal["auto"] = Field(
        "auto",
        description="Number of classes, or auto to take it from the dataset's labels. A head whose size "
        "differs is replaced by a new one.",
    )
    reinitialize: bool = Field(False, description="Replace the head even when its size already matches.")


class LoraVariant(StrEnum):
    LORA = "lora"
    DORA = "dora"


class LoraSpec(ApiModel):
    """Low-rank adapters (via peft) on the model's linear layers; only they and the head train."""

    rank: int = Field(8, ge=1, le=1024, description="Rank r of the adapter matrices.")
    alpha: float = Field(16, gt=0, le=4096, description="Scaling numerator: adapters are scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    variant: LoraVariant = Field(LoraVariant.LORA, description="lora, or dora (weight-decomposed LoRA).")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=256,
        description="Module names (or suffixes) to adapt, names as loaded (after rearrange.prune, a kept layer is "
        "still named by its place before pruning). Empty: every candidate the analysis found "
        "(linear layers, not the head or the output embeddings). Either way, modules adjust.freeze freezes get none.",
    )


class HealSpec(ApiModel):
    """Healing after pruning: every weight of the remaining layers trains to reproduce the unpruned model's last
    hidden states on the training texts, or on `dataset`'s (no labels), before the recipe's training starts. The
    healed layers are kept beside the checkpoints: an attempt that resumes loads them instead of healing again."""

    steps: int = Field(ge=1, le=100000, description="Optimizer steps of healing, one batch (of training.batchSize texts) each.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW's rate, reached after a 10% linear warmup.")
    dataset: TextsSpec | None = Field(
        None,
        description="Heal on these texts instead of the training split's (every row of every split the files hold, "
        "tokenized as the training data; labels are not read): healing needs no labels, so any text of the task's "
        "kind will do, pairs of texts (its textPairField) for a classifier of pairs (dataset.textPairField). Texts "
        "that are in the job's validation or test split are left out, with a warning saying how many.",
    )

    rules = (
        Rule(  # one column read as both texts of a pair
            cel="!has(self.dataset) || !has(self.dataset.textPairField)"
            " || self.dataset.textPairField != self.dataset.textField",
            holds=lambda h: h.dataset is None or h.dataset.text_pair_field != h.dataset.text_field,
            message="textPairField names the same column as textField: it is a second text",
            field="dataset.textPairField",
        ),
    )


class PruneSpec(ApiModel):
    """Remove the transformer layers the analysis scores least important (Block Influence), before training.

    Exactly one of count, fraction and threshold says how many."""

    count: int | None = Field(None, ge=1, le=1000, description="Remove this many layers, the lowest-scoring first.")
    fraction: float | None = Field(
        None, gt=0, lt=1, description="Remove this fraction of the layers (rounded half up), the lowest-scoring first."
    )
    threshold: float | None = Field(
        None,
        gt=0,
        le=2,
        description="Remove every layer whose Block Influence (1 - cosine similarity of its input and output "
        "hidden states, 0 to 2) is below this.",
    )
    heal: HealSpec | None = Field(
        None,
        description="Heal the pruned model before training: its layers learn to give the unpruned model's last "
        "hidden states back (a copy of the unpruned model is held meanwhile). Omit to train it as pruned.",
    )

    rules = (
        Rule(
            cel="(has(self.count) ? 1 : 0) + (has(self.fraction) ? 1 : 0) + (has(self.threshold) ? 1 : 0) == 1",
            holds=lambda m: [m.count, m.fraction, m.threshold].count(None) == 2,
            message="set exactly one of count, fraction and threshold",
        ),
    )


class RearrangeSpec(ApiModel):
    """Stage 3: change the model's structure (head, adapters, pruned layers)."""

    head: HeadSpec = Field(default_factory=HeadSpec, description="The classification head (ignored for causal-lm).")
    lora: LoraSpec | None = Field(None, description="Add LoRA adapters; omit to fine-tune the weights themselves.")
    merge_on_export: bool = Field(
        True,
        description="Merge the adapters into the base weights on export, after checking that the logits match.",
    )
    prune: PruneSpec | None = Field(
        None,
        description="Remove the least important transformer layers before training (text models); training then "
        "recovers the accuracy. The exported model is smaller and loads with the standard transformers classes.",
    )


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Batching(StrEnum):
    DYNAMIC = "dynamic"
    LENGTH_BUCKETED = "length-bucketed"


class Schedule(StrEnum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class EarlyStoppingSpec(ApiModel):
    """Stop when the evaluation metric has not improved for `patience` evaluations."""

    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as improvement. It also picks the "
                             "weights kept: an evaluation better than the best by less is no new best (as in Keras).")


class TeacherSpec(ApiModel):
    """The model distillation learns from: where it lives, as model.uri says where the student does."""

    uri: Uri = Field(
        description="A model fine-tuned for this task on the same labels, such as an earlier job's output.uri (the "
        "unpruned fine-tune, for a pruned student): pvc://<claim>/<path>, hf://<org>/<name> or an absolute path. It "
        "reads the student's inputs, so a text teacher must have the student's vocabulary.",
    )
    revision: Revision = None


class DistillationSpec(ApiModel):
    """Knowledge distillation: the student learns the teacher's predicted distribution beside the labels."""

    teacher: TeacherSpec = Field(description="The model whose predictions the student learns.")
    temperature: float = Field(
        2.0,
        gt=0,
        le=100,
        description="Both models' logits are divided by it before they are compared: above 1 the teacher's soft "
        "targets pass on more of how it ranks the wrong classes (or tokens).",
    )
    weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The share of the loss that is the teacher's soft targets (temperature^2 x the KL divergence of "
        "the student's softened distribution from the teacher's, per target); the rest is the usual loss on the "
        "labels. 1 learns from the teacher alone.",
    )


class TrainingSpec(ApiModel):
    """Stage 4: the training loop."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(32, ge=1, le=65536, description="Samples per micro-batch per process (a worker runs "
                            "runtime.processesPerWorker), at most (one more where a last row would be alone): an "
                            "epoch's rows are spread evenly over the batches that make this for every process, rounded "
                            "up; an optimizer step takes gradientAccumulation of them.")
    gradient_accumulation: int = Field(
        1,
        ge=1,
        le=1024,
        description="Micro-batches per optimizer step; the loss is normalised by tokens across them.",
    )
    batching: Batching = Field(
        Batching.LENGTH_BUCKETED,
        description="dynamic: pad each batch to its longest sample; length-bucketed: also group samples of "
        "similar length so that little padding remains.",
    )
    precision: Precision = Field(
        Precision.AUTO, description="auto: bf16 autocast where the hardware computes bf16 natively (a GPU with "
        "bf16, or, for text models, a CPU with AMX, AVX-512 BF16 or Arm BF16 instructions), else fp32.",
    )
    schedule: Schedule = Field(Schedule.COSINE, description="Learning-rate decay after warmup.")
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Fraction of the steps spent warming up linearly."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clip gradients to this global L2 norm.")
    compile: bool = Field(
        False,
        description="Train through torch.compile: fused kernels, after a first step that compiles (tens of "
        "seconds, more for a large model), and again for each of the first few new batch shapes (text of varied "
        "length). It pays on long jobs: on one H200 a 1.1B Llama on fixed-length rows trained 1.38x faster "
        "(1.59x with LoRA); a 256-step LoRA job of a MiniLM-sized classifier trained in 88 s instead of 29: "
        "three compiles of 20-30 s, then steps about twice as fast. Needs a C++ compiler (CPU) or a C compiler "
        "(GPU) in the image; the trainer's has both. Evaluations run uncompiled.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each transformer layer's input through the forward and recompute the layer's "
        "activations in the backward: about a third more compute per step, for activation memory down to about one "
        "layer's (plus the inputs kept and what lies outside the layers: the embeddings, a causal LM's logits). For "
        "long texts or large batches that do not fit otherwise, e.g. an 8B model at 2048 tokens. For the transformer "
        "tasks (sequence-classification, causal-lm).",
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate every N steps (for early stopping and progress); default once per epoch.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None,
        description="Stop early on the first evaluation metric, ending with the best evaluation's weights; "
        "omit to train to the end.",
    )
    checkpoint_every_steps: int = Field(
        200, ge=1, description="Save a resumable checkpoint every N steps (and on SIGTERM)."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Checkpoints to keep; older ones are deleted.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for the split, the shuffling and the initialisation.")
    distillation: DistillationSpec | None = Field(
        None,
        description="Also learn from a teacher model's predictions (knowledge distillation, as DistilBERT and Minitron "
        "train a smaller or pruned model): e.g. the unpruned fine-tune of the same data, for a job with "
        "rearrange.prune. Every worker holds a copy of the teacher and runs it on each training batch; validation "
        "and test scores stay on the labels. Not for object-detection.",
    )


class Metric(StrEnum):
    ACCURACY = "accuracy"
    F1 = "f1"
    LOSS = "loss"
    PERPLEXITY = "perplexity"
    MAP = "map"
    MAP50 = "map50"
    MAP75 = "map75"


class EvaluationSpec(ApiModel):
    """Stage 5: measure the model on the test split before (baseline) and after fine-tuning, and on the validation
    split during training."""

    metrics: list[Metric] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="accuracy and f1 (macro) for classification; loss and perplexity for classification and "
        "causal-lm; map (COCO mAP over IoU 0.5:0.95), map50 and map75 for object-detection (per-class AP goes "
        "to the report). The first is the one early stopping watches. Default: the task's (accuracy and f1, loss "
        "and perplexity for causal-lm, map and map50 for object-detection).",
    )
    baseline: bool = Field(True, description="Also evaluate the model before fine-tuning, to report the gain.")
    batch_size: int | None = Field(None, ge=1, description="Evaluation batch size; default training.batchSize.")


class OutputSpec(ApiModel):
    """Stage 6: where the fine-tuned model, its report and the checkpoints go."""

    uri: Uri = Field(description="Output folder: pvc://<claim>/<path> or an absolute path; not the folder of model.uri "
                     "or of the distillation teacher, whose files the export would overwrite, and not in the folder "
                     "of dataset.uri (or of the healing texts), where a retry would read the outputs as data.")


# Unset evaluation.metrics: the task's own (a default that fits every task would leave causal-lm and detection jobs
# refused for metrics their authors never wrote).
DEFAULT_METRICS = {Task.CAUSAL_LM: [Metric.LOSS, Metric.PERPLEXITY],
                   Task.OBJECT_DETECTION: [Metric.MAP, Metric.MAP50]}
CLASSIFIER_METRICS = [Metric.ACCURACY, Metric.F1]


def _classification_metrics_only_for_classifiers(spec: Any) -> bool:
    classifying = {Metric.ACCURACY, Metric.F1}
    return spec.model.task != Task.CAUSAL_LM or not classifying.intersection(spec.evaluation.metrics or [])


DETECTION_METRICS = (Metric.MAP, Metric.MAP50, Metric.MAP75)


def _same_folder_cel(a: str, b: str) -> str:
    return f"({a} == {b} || {a} + '/' == {b} || {a} == {b} + '/')"


def _same_folder(a: str, b: str | None) -> bool:  # as _same_folder_cel says it, so the validator and the CRD agree
    return b is not None and (b in (a, a + "/") or a == b + "/")


def _inside_cel(a: str, b: str) -> str:
    return f"({a} + '/').startsWith({b}.endsWith('/') ? {b} : {b} + '/')"


def _inside(a: str, b: str | None) -> bool:  # as _inside_cel says it: folder a is b, or under it
    return b is not None and (a + "/").startswith(b if b.endswith("/") else b + "/")


def _detection_metrics_only_for_detectors(spec: Any) -> bool:
    if spec.evaluation.metrics is None:
        return True
    detecting = [m in DETECTION_METRICS for m in spec.evaluation.metrics]
    return all(detecting) if spec.model.task == Task.OBJECT_DETECTION else not any(detecting)


# CEL: healing reads texts of its own (rearrange.prune.heal.dataset)
_HEALS_ON_TEXTS = ("has(self.rearrange.prune) && has(self.rearrange.prune.heal)"
                   " && has(self.rearrange.prune.heal.dataset)")


def heal_dataset(spec: Any) -> TextsSpec | None:
    """rearrange.prune.heal.dataset; None where healing reads no texts of its own."""
    heal = spec.rearrange.prune.heal if spec.rearrange.prune else None
    return None if heal is None else heal.dataset


def _healing_pairs(spec: Any) -> bool | None:
    """Whether rearrange.prune.heal.dataset is read as pairs of texts; None where healing reads no texts of its own."""
    texts = heal_dataset(spec)
    return None if texts is None else texts.text_pair_field is not None


class TrainerConfig(ApiModel):
    """Everything the trainer needs: the pipeline's six stages and their inputs."""

    model: ModelSpec = Field(description="The model to fine-tune.", json_schema_extra=immutable("model"))
    dataset: DatasetSpec = Field(description="The labelled data.", json_schema_extra=immutable("dataset"))
    analyze: AnalyzeSpec = Field(default_factory=AnalyzeSpec, description="Stage 1: structure analysis.")
    adjust: AdjustSpec = Field(default_factory=AdjustSpec, description="Stage 2: freezing and parameter groups.")
    rearrange: RearrangeSpec = Field(default_factory=RearrangeSpec, description="Stage 3: head, adapters and pruning.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Stage 4: the training loop.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Stage 5: baseline and final evaluation.")
    output: OutputSpec = Field(description="Stage 6: where the results go.", json_schema_extra=immutable("output"))

    rules = (
        Rule(
            cel="self.model.task != 'causal-lm' || !has(self.evaluation.metrics)"
            " || !self.evaluation.metrics.exists(m, m == 'accuracy' || m == 'f1')",
            holds=_classification_metrics_only_for_classifiers,
            message="accuracy and f1 need a classification task; use loss or perplexity for causal-lm",
            field="evaluation.metrics",
        ),
        Rule(
            cel="has(self.model.uri) || !has(self.model.architecture) || has(self.model.tokenizerUri)"
            " || self.model.task in ['image-classification', 'object-detection']",
            holds=lambda c: c.model.uri is not None or c.model.architecture is None or c.model.tokenizer_uri is not None
            or c.model.task in (Task.IMAGE_CLASSIFICATION, Task.OBJECT_DETECTION),
            message="a model built from config needs tokenizerUri for text tasks",
            field="model.tokenizerUri",
        ),
        Rule(
            cel="!has(self.evaluation.metrics) || (self.model.task == 'object-detection'"
            " ? self.evaluation.metrics.all(m, m in ['map', 'map50', 'map75'])"
            " : !self.evaluation.metrics.exists(m, m in ['map', 'map50', 'map75']))",
            holds=_detection_metrics_only_for_detectors,
            message="object-detection is scored by map, map50 and map75 (set evaluation.metrics, e.g. [map, map50]), "
            "and only object-detection is",
            field="evaluation.metrics",
        ),
        Rule(
            cel="(self.model.task == 'object-detection') == (self.dataset.format == 'coco')"
            " || (self.model.task == 'object-detection' && self.dataset.format == 'auto')",
            holds=lambda c: (c.model.task == Task.OBJECT_DETECTION) == (c.dataset.format == DatasetFormat.COCO)
            or (c.model.task == Task.OBJECT_DETECTION and c.dataset.format == DatasetFormat.AUTO),
            message="object-detection reads the coco format (or auto), and the coco format is for object-detection",
            field="dataset.format",
        ),
        Rule(  # a text task would read the images' paths as its texts (and their class folders' names)
            cel="self.dataset.format != 'imagefolder' || self.model.task == 'image-classification'",
            holds=lambda c: c.dataset.format != DatasetFormat.IMAGE_FOLDER or c.model.task == Task.IMAGE_CLASSIFICATION,
            message="the imagefolder format holds images: it is for image-classification",
            field="dataset.format",
        ),
        Rule(  # the label would be the input: pandas read the two as one table of two equal columns, and failed
            cel="self.model.task in ['causal-lm', 'object-detection'] || self.dataset.format == 'imagefolder'"
            " || self.dataset.labelField != self.dataset.textField",
            holds=lambda c: c.model.task in (Task.CAUSAL_LM, Task.OBJECT_DETECTION)
            or c.dataset.format == DatasetFormat.IMAGE_FOLDER or c.dataset.label_field != c.dataset.text_field,
            message="labelField names the same column as textField: the label would be the model's input",
            field="dataset.labelField",
        ),
        Rule(
            cel="!has(self.dataset.textPairField) || self.model.task == 'sequence-classification'",
            holds=lambda c: c.dataset.text_pair_field is None or c.model.task == Task.SEQUENCE_CLASSIFICATION,
            message="textPairField is a classifier's second text: it is for sequence-classification",
            field="dataset.textPairField",
        ),
        Rule(  # one column read twice, or the label as an input
            cel="!has(self.dataset.textPairField) || (self.dataset.textPairField != self.dataset.textField"
            " && self.dataset.textPairField != self.dataset.labelField)",
            holds=lambda c: c.dataset.text_pair_field not in (c.dataset.text_field, c.dataset.label_field),
            message="textPairField names the same column as textField or labelField: it is a second text",
            field="dataset.textPairField",
        ),
        Rule(
            cel="!has(self.dataset.augment) || self.model.task == 'image-classification'"
            " || (self.model.task == 'object-detection' && self.dataset.augment.all(a, a == 'horizontal-flip'))",
            holds=lambda c: not c.dataset.augment or c.model.task == Task.IMAGE_CLASSIFICATION or (
                c.model.task == Task.OBJECT_DETECTION and set(c.dataset.augment) == {Augmentation.HORIZONTAL_FLIP}),
            message="augment changes images: image-classification takes horizontal-flip and random-resized-crop, "
            "object-detection horizontal-flip",
            field="dataset.augment",
        ),
        Rule(  # a detector's box matching and sampling have data-dependent shapes: compile would break its graph apart
            cel="self.model.task != 'object-detection' || !has(self.training.compile) || !self.training.compile",
            holds=lambda c: c.model.task != Task.OBJECT_DETECTION or not c.training.compile,
            message="compile is for the transformer and image-classification models; object-detection trains eagerly",
            field="training.compile",
        ),
        Rule(  # torchvision's classifiers and detectors have no layers to checkpoint
            cel="!has(self.training.gradientCheckpointing) || !self.training.gradientCheckpointing"
            " || self.model.task in ['sequence-classification', 'causal-lm']",
            holds=lambda c: not c.training.gradient_checkpointing
            or c.model.task in (Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM),
            message="gradientCheckpointing recomputes a transformer's layers: it is for sequence-classification and "
            "causal-lm",
            field="training.gradientCheckpointing",
        ),
        Rule(
            cel="self.model.task != 'object-detection' || !has(self.rearrange.lora)",
            holds=lambda c: c.model.task != Task.OBJECT_DETECTION or c.rearrange.lora is None,
            message="object-detection fine-tunes the detector's weights; LoRA adapters are for the other tasks",
            field="rearrange.lora",
        ),
        Rule(
            cel="!has(self.rearrange.prune) || self.model.task in ['sequence-classification', 'causal-lm']",
            holds=lambda c: c.rearrange.prune is None or c.model.task in (Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM),
            message="pruning removes transformer layers: it needs a text task (sequence-classification or causal-lm)",
            field="rearrange.prune",
        ),
        Rule(  # healing's texts are encoded as the training data's: pairs where it is pairs, and only there
            cel=f"!({_HEALS_ON_TEXTS}) || !has(self.rearrange.prune.heal.dataset.textPairField)"
            " || has(self.dataset.textPairField)",
            holds=lambda c: _healing_pairs(c) is not True or c.dataset.text_pair_field is not None,
            message="textPairField reads healing's texts as pairs, for a classifier of pairs (dataset.textPairField); "
            "this job's inputs are single texts (no dataset.textPairField): heal on single texts",
            field="rearrange.prune.heal.dataset.textPairField",
        ),
        Rule(  # single texts would fit the healed layers to inputs the model never classifies (no second segment)
            cel=f"!({_HEALS_ON_TEXTS}) || !has(self.dataset.textPairField)"
            " || has(self.rearrange.prune.heal.dataset.textPairField)",
            holds=lambda c: _healing_pairs(c) is not False or c.dataset.text_pair_field is None,
            message="dataset.textPairField classifies pairs of texts: heal it on pairs too; set textPairField to the "
            "column of the pairs' second texts, or omit rearrange.prune.heal.dataset to heal on the training pairs",
            field="rearrange.prune.heal.dataset.textPairField",
        ),
        Rule(  # a detector returns its loss, not per-target logits that a teacher's could be compared with
            cel="self.model.task != 'object-detection' || !has(self.training.distillation)",
            holds=lambda c: c.model.task != Task.OBJECT_DETECTION or c.training.distillation is None,
            message="distillation compares a teacher's class or token distributions with the student's: it is for "
            "the classification tasks and causal-lm, not object-detection",
            field="training.distillation",
        ),
        Rule(  # the export replaces config.json and the weights there: the model read, and read again at a retry
            cel="!has(self.model.uri) || !" + _same_folder_cel("self.output.uri", "self.model.uri"),
            holds=lambda c: not _same_folder(c.output.uri, c.model.uri),
            message="output.uri is the folder of model.uri: the export would overwrite the model it fine-tunes; "
            "give the output a folder of its own",
            field="output.uri",
        ),
        Rule(
            cel="!has(self.training.distillation) || !"
            + _same_folder_cel("self.output.uri", "self.training.distillation.teacher.uri"),
            holds=lambda c: c.training.distillation is None
            or not _same_folder(c.output.uri, c.training.distillation.teacher.uri),
            message="output.uri is the teacher's folder (training.distillation.teacher.uri): the export would "
            "overwrite the teacher; give the output a folder of its own",
            field="output.uri",
        ),
        Rule(  # a folder's format is found by walking it: a retry would read the outputs (checkpoints, plots) as data
            cel="!" + _inside_cel("self.output.uri", "self.dataset.uri") + f" && (!({_HEALS_ON_TEXTS}) || !"
            + _inside_cel("self.output.uri", "self.rearrange.prune.heal.dataset.uri") + ")",
            holds=lambda c: not _inside(c.output.uri, c.dataset.uri)
            and ((texts := heal_dataset(c)) is None or not _inside(c.output.uri, texts.uri)),
            message="output.uri is the folder of dataset.uri (or of rearrange.prune.heal.dataset.uri) or under it: a "
            "retry would read the outputs as data; give the output a folder outside the data's",
            field="output.uri",
        ),
    )

    @property
    def evaluation_metrics(self) -> list[Metric]:
        """evaluation.metrics, or the task's own when it is unset (the apiserver stores it unset)."""
        return self.evaluation.metrics or list(DEFAULT_METRICS.get(self.model.task, CLASSIFIER_METRICS))

    @classmethod
    def from_document(cls, doc: dict[str, Any], output: str | None = None) -> TrainerConfig:
        """Accept a FineTuneJob manifest (its runtime fields are the operator's business) or a bare config; `output`
        (--output) replaces output.uri before the checks, so that they and the report see the folder written.
        Anything else is a ValueError, which the CLI reports as the user's (an empty file reads as None)."""
        if not isinstance(doc, dict):
            raise ValueError(f"a config is a mapping (a FineTuneJob or its spec), not {type(doc).__name__}")
        if doc.get("kind") == "FineTuneJob":
            spec = doc.get("spec") or {}
            if not isinstance(spec, dict):
                raise ValueError(f"the FineTuneJob's spec is a mapping, not {type(spec).__name__}")
            doc = {k: v for k, v in spec.items() if k not in OPERATOR_SPEC_FIELDS}
        return cls.from_wire(doc | ({"output": {"uri": output}} if output is not None else {}))

    @classmethod
    def from_file(cls, path: str | Path, output: str | None = None) -> TrainerConfig:
        """One document, or the one FineTuneJob among several (a job.yaml with its claims, as kubectl applies it)."""
        docs = [d for d in yaml.load_all(Path(path).read_text(), Loader=KubectlLoader) if d is not None]
        jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
        if len(docs) > 1 and len(jobs) != 1:
            raise ValueError(f"{len(docs)} documents with {len(jobs)} FineTuneJobs in it: the trainer runs one")
        return cls.from_document(jobs[0] if jobs else (docs or [None])[0], output)


# The FineTuneJob spec's fields beyond the trainer's (finetune_operator.api.FineTuneJobSpec's runtime and lifecycle):
# the operator's business, skipped where the trainer runs a manifest; any other key is refused, as a misspelling
# (adjsut) is. Listed here, as the trainer's image has no operator package; tests/test_api.py checks them.
OPERATOR_SPEC_FIELDS = frozenset({"runtime", "pod", "suspend", "backoffLimit", "activeDeadlineSeconds",
                                  "ttlSecondsAfterFinished", "managedBy"})


# go-yaml v2's plain scalars (its resolve.go), which kubectl's YAML-to-JSON (sigs.k8s.io/yaml) reads into JSON.
_GO_BOOLS = dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True) | dict.fromkeys(
    ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False)
_GO_NULLS = ("", "~", "null", "Null", "NULL")
_GO_SPECIAL_FLOAT = re.compile(r"([-+]?)\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_GO_OCTAL = re.compile(r"[-+]?0[0-7]+")
_GO_INTEGERS = range(-(2**63), 2**64)  # int64, then uint64


def _go_yaml_scalar(text: str) -> Any:
    """A plain scalar as go-yaml v2 resolves it for an untyped target."""
    if text in _GO_BOOLS:
        return _GO_BOOLS[text]
    if text in _GO_NULLS:
        return None
    if special := _GO_SPECIAL_FLOAT.fullmatch(text):
        return math.nan if special[3] else -math.inf if special[1] == "-" else math.inf
    if not text.isascii() or not re.match(r"[-+0-9.]", text):
        return text
    plain = text if text[0] == "." else text.replace("_", "")  # Go drops them after a digit or sign, not after a dot
    try:  # Go's base 0 reads a leading 0 as octal, where Python's refuses it
        number = int(plain, 8) if _GO_OCTAL.fullmatch(plain) else int(plain, 0)
        if number in _GO_INTEGERS:
            return number
    except ValueError:
        pass
    number = float(plain) if _GO_FLOAT.fullmatch(plain) else math.inf
    return text if math.isinf(number) else number  # Go keeps 1e999 as text (out of range)


class KubectlLoader(yaml.SafeLoader):
    """YAML read as kubectl reads it (go-yaml v2's YAML 1.1), so that a manifest means here what it means to the
    apiserver. PyYAML differs on plain scalars: 5e-5 is a string to it (a number to kubectl), y and n are strings
    (booleans), 1:20 is 80 (a string) and 2024-05-01 a date, which JSON cannot carry (a string)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and value != "<<":  # "<<" stays a merge key
            return _GO_PLAIN
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Refuse a repeated key, as kubectl does ("mapping key already defined"): PyYAML kept the last, and a
        second adjust: block dropped the first's freeze without a word. A merge key's (<<) keys may be overridden."""
        first: dict[tuple[type, Any], yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # refused by the construction below
            if (typed := (type(key), key)) in first:  # 1 and true are two keys to Go
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found the key {key!r} again (first on line "
                    f"{first[typed].start_mark.line + 1})", key_node.start_mark)
            first[typed] = key_node
        return super().construct_mapping(node, deep)


_GO_PLAIN = "tag:finetune.dev,2024:go-yaml-plain"
KubectlLoader.add_constructor(_GO_PLAIN, lambda loader, node: _go_yaml_scalar(node.value))
