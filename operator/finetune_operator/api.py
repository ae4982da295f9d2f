"""The FineTuneJob API: spec (trainer config + runtime + placement) and status.

These models are the single source of truth: the CRD in deploy/crds is generated from
them (`make crds`), and the operator validates specs with them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError
from pydantic.alias_generators import to_snake

from finetune_operator import coretypes as core
from finetune_trainer.config import Stage, TrainerConfig
from finetune_trainer.rules import ApiModel, Rule, error_lines, transition

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune", "ml"]

# The child Job "<name>-<attempt>" and its pods' index suffixes must stay within 63 characters.
MAX_NAME_LENGTH = 50
# Stricter than the apiserver's subdomain rule: the name becomes a label value and a Service name, and Service
# names are RFC 1035 labels (a leading digit is refused only when a multi-worker attempt creates its Service).
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MESSAGE = "metadata.name must be a lowercase RFC 1035 label (a-z, 0-9 and '-', starting with a letter)"
LENGTH_MESSAGE = f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the names of the job's pods add suffixes to it"

# The apiserver's generateName: at most 58 characters of it, then 5 random ones (consonants and digits).
GENERATED_PREFIX_MAX, GENERATED_SUFFIX = 58, 5

# Kueue's labels, copied from the FineTuneJob onto its child Job, where Kueue reads them: the queue, and the
# WorkloadPriorityClass (which orders and preempts workloads apart from the pods' PriorityClass).
KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")

def _unique(field: str, key: str, message: str) -> Rule:
    attr, key_attr = to_snake(field), to_snake(key)

    def holds(model: ApiModel) -> bool:
        keys = [getattr(item, key_attr) for item in getattr(model, attr)]
        return len(keys) == len(set(keys))

    return Rule(f"self.{field}.all(x, self.{field}.exists_one(y, y.{key} == x.{key}))", holds, message, field)


def _rfc3339(value: Any) -> Any:
    """A timestamp as the wire carries it (RFC 3339 text), read before strict validation, which takes only a datetime
    once a model's before-validator has turned the JSON into Python objects."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


Timestamp = Annotated[datetime, BeforeValidator(_rfc3339)]


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


_GPUS = f"self.resources.limits['{core.GPU}']"
# A GPU count as written (2 or "2"): a quantity() here cost the apiserver's estimate a hundred times its budget, and a
# whole number is what a GPU limit is (any other spelling of one is left alone).
_GPU_COUNT = "^[0-9]{1,4}$"


def _a_gpu_per_process(runtime: RuntimeSpec) -> bool:
    gpus = str(runtime.resources.limits.get(core.GPU, "")) if runtime.resources else ""
    return not re.fullmatch(_GPU_COUNT, gpus) or int(gpus) == 0 or int(gpus) >= runtime.processes_per_worker


class RuntimeSpec(ApiModel):
    """How the trainer runs: the gang of workers, their container and its volumes."""

    workers: int = Field(1, ge=1, le=256, description="Trainer pods (torchrun nodes); the one with index 0 is rank 0 and reports.")
    processes_per_worker: int = Field(
        1, ge=1, le=64, description="Trainer processes per pod (torchrun --nproc-per-node): one per GPU."
    )
    image: str | None = Field(
        None, min_length=1, max_length=512, pattern=core.IMAGE,
        description="Trainer image; defaults to the operator's configured trainer image.",
    )
    image_pull_policy: PullPolicy | None = Field(None, description="Always, IfNotPresent or Never (Kubernetes' default).")
    resources: core.ResourceRequirements | None = Field(
        None,
        description="Per-worker requests and limits (any resource, e.g. nvidia.com/gpu: 8); "
        "defaults to the operator's configured trainer resources, which a value here replaces whole: give cpu and "
        "memory too (OMP_NUM_THREADS follows the cpu; with none, a pod without requests is the first evicted).",
    )
    env: list[core.EnvVar] = Field(
        default_factory=list, max_length=64,
        description="Extra environment variables (e.g. a hub token from a Secret); torchrun's and the trainer's own are "
        "refused. HF_HOME moves the hub cache (an emptyDir of each pod at /var/cache/huggingface) to a path of its "
        "own, e.g. on a claim in volumes, to share it between workers and jobs.",
    )
    env_from: list[core.EnvFromSource] = Field(
        default_factory=list, max_length=16, description="Secrets and ConfigMaps whose keys become environment "
        "variables. Their keys are not checked: without a prefix, keep out those torchrun reads (PET_*, TORCHELASTIC_*).",
    )
    volumes: list[core.Volume] = Field(
        default_factory=list, max_length=16,
        description="Extra volumes (claims, ConfigMaps, Secrets, emptyDirs); the claims that URIs name are mounted without this.",
    )
    volume_mounts: list[core.VolumeMount] = Field(
        default_factory=list, max_length=16, description="Where the extra volumes appear in the trainer container.",
    )
    shm_size: core.PositiveQuantity | None = Field(
        None, description="Size of /dev/shm (an in-memory emptyDir; DataLoader workers and NCCL use it), more than 0. "
        "Default 1Gi.",
    )

    rules = (
        _unique("env", "name", "env names must be unique"),
        _unique("volumes", "name", "volume names must be unique"),
        _unique("volumeMounts", "mountPath", "mount paths must be unique"),
        Rule(
            cel="self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
            holds=lambda r: {m.name for m in r.volume_mounts} <= {v.name for v in r.volumes},
            message="every volumeMount must name a volume in runtime.volumes",
            field="volumeMounts",
        ),
        # The trainer refuses it (InvalidConfig), but only once every worker is scheduled, its image pulled and its
        # GPUs held. A limit of 0 runs its processes on the CPU; with none here the operator's trainer resources
        # apply, which the apiserver cannot see: the operator judges those (judge.py).
        Rule(
            cel=f"!has(self.resources) || !('{core.GPU}' in self.resources.limits) || "
            f"!string({_GPUS}).matches('{_GPU_COUNT}') || int(string({_GPUS})) == 0 || "
            f"int(string({_GPUS})) >= self.processesPerWorker",
            holds=_a_gpu_per_process,
            message=f"at most one process per GPU: processesPerWorker must be at most resources.limits {core.GPU}",
            field="processesPerWorker",
        ),
    )


# A Job's ttlSecondsAfterFinished's bound (int32), 68 years: past a few hundred billion seconds a time plus the span
# overflowed, and the job's every tick failed, its status never written again.
MAX_SECONDS = 2**31 - 1
MAX_GRACE_SECONDS = 86400  # a day: past it a stopped pod would hold its GPUs for nothing


class PodSpec(ApiModel):
    """Pod-level settings of every trainer pod: metadata, identity and placement."""

    labels: core.Labels = Field(default_factory=dict, description="Extra labels of the trainer pods.")
    annotations: core.Annotations = Field(default_factory=dict, description="Extra annotations of the trainer pods.")
    service_account_name: core.Name | None = Field(
        None, description="ServiceAccount of the trainer pods (its token is never mounted: the trainer needs no API access)."
    )
    image_pull_secrets: list[core.LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the trainer image."
    )
    scheduler_name: core.Name | None = Field(None, description="A scheduler other than the default one.")
    node_selector: core.LabelMap = Field(default_factory=dict, description="Node labels the trainer pods require.")
    tolerations: list[core.Toleration] = Field(default_factory=list, max_length=32, description="Tolerations of the trainer pods.")
    affinity: core.Affinity | None = Field(None, description="Node and pod affinity of the trainer pods.")
    priority_class_name: core.Name | None = Field(None, description="PriorityClass of the trainer pods (Kueue reads it too).")
    termination_grace_period_seconds: int | None = Field(
        None, ge=0, le=MAX_GRACE_SECONDS,
        description="Seconds a stopped trainer pod (suspended, preempted, evicted) has to finish its step and save a "
        "checkpoint before it is killed; torchrun gets 5 s less. Default Kubernetes' 30: raise it for a model whose "
        "checkpoint (weights and optimizer state) takes longer to write.",
    )


# What may change on a live job: everything below only while it is suspended (Kueue's window to
# place it, and a user's to retune it); model, dataset and output never; suspend, the deadline and
# the TTL always.
SUSPENDED_ONLY = ("analyze", "adjust", "rearrange", "training", "evaluation", "runtime", "pod")
MANAGED_BY = "finetune.dev/operator"


def _output_outlives_the_pod(spec: FineTuneJobSpec) -> bool:
    uri = spec.output.uri
    if uri.startswith("pvc://"):
        return True
    # A claim mounted read-only (on the volume or the mount) cannot take the output.
    claims = {v.name for v in spec.runtime.volumes if v.persistent_volume_claim and not v.persistent_volume_claim.read_only}
    return spec.runtime.workers == 1 and any(
        m.name in claims and not m.read_only and (uri.removeprefix("file://") + "/").startswith(m.mount_path.rstrip("/") + "/")
        for m in spec.runtime.volume_mounts
    )


class FineTuneJobSpec(TrainerConfig):
    """What to fine-tune (the trainer's config), how to run it (runtime, pod) and its lifecycle."""

    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="The workers, their container and volumes.")
    pod: PodSpec = Field(default_factory=PodSpec, description="Pod metadata, identity and placement of every worker.")
    suspend: bool = Field(
        False, description="No pods run while true; a running attempt is stopped (its checkpoints stay) and resumes on false."
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retryable attempt failures before the job fails; disruptions do not count. As "
        "a Job's, the attempt after each counted failure waits 10 s, doubled per failure, at most 6 min.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=MAX_SECONDS,
        description="Fail the job (reason DeadlineExceeded) after it has been active this many seconds.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=MAX_SECONDS,
        description="Delete the job and its children this many seconds after it finished; omit to keep it.",
    )
    managed_by: str | None = Field(
        None, max_length=63, pattern=r"^[a-z0-9.-]+/[-a-zA-Z0-9_.]+$",
        description=f"The controller that runs this job; omit for this operator ({MANAGED_BY}). "
        "Another value (e.g. a MultiKueue controller) makes this operator leave the job alone.",
    )

    rules = TrainerConfig.rules + (
        Rule(
            cel="self.output.uri.startsWith('pvc://') || (self.runtime.workers == 1 && self.runtime.volumeMounts.exists(m, "
            "!m.readOnly && self.runtime.volumes.exists(v, v.name == m.name && has(v.persistentVolumeClaim) && "
            "!(has(v.persistentVolumeClaim.readOnly) && v.persistentVolumeClaim.readOnly)) && "
            "((self.output.uri.startsWith('file://') ? self.output.uri.substring(7) : self.output.uri) + '/')"
            ".startsWith(m.mountPath.endsWith('/') ? m.mountPath : m.mountPath + '/')))",
            holds=_output_outlives_the_pod,
            message="the output must outlive the pod: use pvc://<claim>/<path> (or, for one worker, a path under "
            "a writable mount of a persistentVolumeClaim volume); a multi-worker job needs pvc://",
            field="output.uri",
        ),
    )
    transition_rules = tuple(
        transition(f"oldSelf.suspend || self.{name} == oldSelf.{name}",
                   f"{name} may change only while the job is suspended", name)
        for name in SUSPENDED_ONLY
    ) + (
        transition(
            "has(self.managedBy) == has(oldSelf.managedBy) && (!has(self.managedBy) || self.managedBy == oldSelf.managedBy)",
            "managedBy is immutable", "managedBy",
        ),
    )


# ---- status -------------------------------------------------------------------------

# Bounds on what the operator writes: a status stays small however chatty a trainer is.
MESSAGE_MAX = 1024
REASON_PATTERN = r"^[A-Z][A-Za-z0-9]*$"
Reason = Annotated[str, Field(min_length=1, max_length=64, pattern=REASON_PATTERN)]


def reason_or(value: Any, fallback: str) -> str:
    """`value` when the status schema takes it as a reason or a finding's code, else `fallback`: one from a trainer
    image of another version (or a user's own) must not get the whole status patch refused."""
    return value if isinstance(value, str) and len(value) <= 64 and re.fullmatch(REASON_PATTERN, value) else fallback
Message = Annotated[str, Field(max_length=MESSAGE_MAX)]
MetricValues = Annotated[dict[str, float], Field(max_length=16)]


class Phase(StrEnum):
    """A summary of the conditions (computed from them, never set on its own)."""

    PENDING = "Pending"
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


FINISHED = frozenset({Phase.SUCCEEDED, Phase.FAILED})  # phases a job never leaves


class ConditionType(StrEnum):
    """Condition types: adjectives and past participles, as the Kubernetes API conventions want."""

    CREATED = "Created"  # the attempt's children exist; False (ExceededQuota, CreateFailed, ...) says why not yet
    SCHEDULED = "Scheduled"  # False: Unschedulable (the scheduler's words), SchedulingGated, Queued; new per attempt
    RUNNING = "Running"
    RESTARTING = "Restarting"  # an attempt ended and the next one is being started
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    METRICS_STALE = "MetricsStale"  # rank 0's metrics could not be read for a while; the reason says why


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A metav1.Condition."""

    type: ConditionType = Field(
        description="Created, Scheduled, Running, Restarting, Suspended, Succeeded, Failed or MetricsStale.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Reason = Field(description="CamelCase machine-readable reason, e.g. Unschedulable or InvalidSpec.")
    message: Message = Field("", description="Human-readable details.")
    last_transition_time: Timestamp = Field(description="When status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation this condition was computed from.")


class Progress(ApiModel):
    """Training progress of the current attempt, read from rank 0's metrics."""

    percent: int = Field(0, ge=0, le=100, description="Completed optimizer steps as a percentage of totalSteps.")
    step: int = Field(0, ge=0, description="Completed optimizer steps.")
    total_steps: int = Field(0, ge=0, description="Optimizer steps the run will take.")
    epoch: float = Field(0, ge=0, description="The epoch in progress, counted from 0 (a one-epoch run stays at 0).")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds until training ends.")
    updated_at: Timestamp | None = Field(None, description="When these numbers were read.")


class TrainingMetrics(ApiModel):
    """A snapshot of the trainer's live metrics."""

    loss: float | None = Field(None, description="Training loss of the latest step.")
    learning_rate: float | None = Field(
        None, description="Current learning rate of the fastest parameter group that trains, as scheduled "
        "(adjust.learningRate or adjust.headLearningRate).")
    samples_per_second: float | None = Field(None, description="Training throughput in samples per second.")
    tokens_per_second: float | None = Field(None, description="Training throughput in tokens per second; none for image tasks.")


class EvaluationResult(ApiModel):
    """Metrics on the held-out split before and after fine-tuning."""

    baseline: MetricValues = Field(default_factory=dict, description="Metric name to value, before fine-tuning.")
    final: MetricValues = Field(default_factory=dict, description="Metric name to value, after fine-tuning.")
    teacher: MetricValues = Field(default_factory=dict, description=(
        "Metric name to value of training.distillation's teacher, measured with the baseline: how near the "
        "student may come."))
    summary: str | None = Field(None, max_length=256, description="One line for kubectl, e.g. 'accuracy 0.34→0.71'.")


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    FATAL = "fatal"


class Finding(ApiModel):
    """Something the structure analysis noticed."""

    severity: Severity = Field(description="info, warning or fatal (a fatal finding stops the job).")
    code: Reason = Field(description="Stable identifier, e.g. NonFiniteWeights or HeadMismatch.")
    message: Message = Field(description="What was found and what to do about it.")


MAX_FINDINGS = 20
MAX_LAYERS = 512


class Analysis(ApiModel):
    """The headline of the structure analysis (the full report is in the output folder)."""

    total_parameters: int | None = Field(None, ge=0, description="All parameters of the model as trained.")
    trainable_parameters: int | None = Field(None, ge=0, description="Parameters that receive updates.")
    findings: list[Finding] = Field(
        default_factory=list, max_length=MAX_FINDINGS, description="Warnings and fatal problems, most severe first."
    )
    layer_importance: list[float] = Field(
        default_factory=list,
        max_length=MAX_LAYERS,
        description="Block Influence of each transformer layer, bottom first (1 - cosine similarity of its input "
        "and output hidden states on the probe batches): the lowest are the ones rearrange.prune removes first.",
    )


class BeforeAfter(ApiModel):
    """A figure of the model before pruning and of the model as exported."""

    before: float = Field(description="Before pruning (the model as loaded, with its head for the dataset).")
    after: float = Field(description="Pruned and fine-tuned, as exported.")


class PruningResult(ApiModel):
    """What rearrange.prune removed, and what serving the model costs before and after."""

    removed_layers: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, max_length=MAX_LAYERS, description="The layers removed, counted from 0 at the bottom."
    )
    parameters: BeforeAfter | None = Field(None, description="Parameter counts.")
    latency_ms: BeforeAfter | None = Field(
        None, description="Milliseconds per test batch of one forward pass, on the training device."
    )
    metrics_before: MetricValues = Field(
        default_factory=dict,
        description="Test metrics of the model before pruning (evaluation.final is the pruned model's).",
    )


ChildName = Annotated[str, Field(max_length=63)]


class Children(ApiModel):
    """The current attempt's objects, all in the job's namespace."""

    config_map: ChildName | None = Field(None, description="The ConfigMap holding the trainer's config.")
    service: ChildName | None = Field(None, description="The headless Service of torchrun's rendezvous (none for a single process).")
    job: ChildName | None = Field(None, description="The Indexed batch/v1 Job running the workers.")


class WorkerCounts(ApiModel):
    """The current attempt's trainer pods."""

    active: int = Field(0, ge=0, description="Pods running or waiting to run.")
    ready: int = Field(0, ge=0, description="Pods running and ready.")
    succeeded: int = Field(0, ge=0, description="Pods that finished successfully.")
    failed: int = Field(0, ge=0, description="Pods that failed.")


class QueueWait(ApiModel):
    """The current attempt's Job's times in its queue (Kueue), as the Job last said them."""

    attempt: int = Field(ge=1, description="The attempt whose Job this is.")
    since: Timestamp = Field(description="When the Job was made: its queue holds it from then.")
    admitted: Timestamp | None = Field(
        None, description="When its queue admitted it (the Job's startTime, set again after a preemption); absent "
        "while it waits.")


class OutputLocation(ApiModel):
    """Where the exported model is."""

    uri: str = Field(max_length=1024, description="spec.output.uri: the model, tokenizer, report.json and model card.")


class FineTuneJobStatus(ApiModel):
    """Observed state, written only by the operator."""

    phase: Phase | None = Field(None, description="Pending, Suspended, Running, Succeeded or Failed (from the conditions).")
    reason: Reason | None = Field(None, description="Why the job is in its phase (the deciding condition's reason).")
    stage: Stage | None = Field(None, description="The pipeline stage rank 0 is in.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=len(ConditionType),
        description="The contract: the latest observation of each condition type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: Progress | None = Field(None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(None, description="Live training metrics.")
    evaluation: EvaluationResult | None = Field(None, description="Baseline and final evaluation.")
    analysis: Analysis | None = Field(None, description="Structure analysis headline.")
    pruning: PruningResult | None = Field(None, description="The layers rearrange.prune removed; size and speed.")
    output: OutputLocation | None = Field(None, description="Where the exported model is, once the job succeeded.")
    children: Children | None = Field(None, description="The current attempt's ConfigMap, Service and Job.")
    workers: WorkerCounts | None = Field(None, description="The current attempt's trainer pods.")
    attempts: int = Field(0, ge=0, description="Attempts started so far (each one is a child Job).")
    failures: int = Field(0, ge=0, description="Failed attempts counted against backoffLimit (disruptions are not).")
    retry_after: Timestamp | None = Field(
        None, description="When the next attempt starts, after a failure counted against backoffLimit (the back-off: "
        "10 s, doubled per counted failure, at most 6 min); cleared once it starts.")
    start_time: Timestamp | None = Field(
        None, description="When the job started, as a Job's: reset when it is resumed; moved on, at each next "
        "attempt, by the time the attempt before waited for its queue (Kueue) to admit it. activeDeadlineSeconds "
        "counts from it, less the current attempt's wait.")
    queue: QueueWait | None = Field(
        None, description="The current attempt's wait in its queue, which activeDeadlineSeconds does not count: kept "
        "here because a Job deleted by hand takes its times along.")
    completion_time: Timestamp | None = Field(None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation the status reflects.")
    ignored_change: str | None = Field(
        None, max_length=64, description="The change of a finished job's spec last told to be ignored (a "
        "SpecChangeIgnored Event): its suspend and the digest of its recipe. Each change is told once.")


class FineTuneJob(ApiModel):
    """Fine-tunes a model on a dataset: analyze, adjust, rearrange, train, evaluate, export."""

    model_config = ApiModel.model_config | {"extra": "ignore"}  # apiVersion, kind, metadata

    spec: FineTuneJobSpec = Field(description="What to fine-tune and how to run it.")
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus, description="Observed state.")


def _key_text(key: Any) -> str | None:
    """A map key as kubectl's YAML to JSON writes it: true and 1 as "true" and "1"; None where its text is not plain
    (a float's is Go's 32-bit formatting, .inf its YAML spelling) or kubectl refuses it (null, beyond int64)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, int) and -(2**63) <= key < 2**63:
        return str(key)
    return None


def _metadata_map_errors(meta: dict[str, Any]) -> list[str]:
    """metadata.labels and metadata.annotations as the apiserver checks every object's."""
    errors = []
    for field, key_pattern, value_pattern in (("labels", core.QUALIFIED_NAME, core.LABEL_VALUE),
                                              ("annotations", core.ANNOTATION_KEY, None)):
        found = meta.get(field)
        if found is None:
            continue
        if not isinstance(found, dict) or not all(isinstance(v, str) or v is None for v in found.values()):
            errors.append(f"metadata.{field}: must be a map of strings")
            continue
        if odd := [k for k in found if _key_text(k) is None]:
            errors.append(f"metadata.{field}: the key {odd[0]!r} is no text: quote it")
            continue
        found = {_key_text(k): v or "" for k, v in found.items()}  # Go decodes a null string as ""
        bad = [k for k in found if not (re.fullmatch(key_pattern, k) and k.rfind("/") <= 253)]
        bad += [f"{k}={v}" for k, v in found.items() if value_pattern and not re.fullmatch(value_pattern, v)]
        if bad:
            errors.append(f"metadata.{field}: not a valid key or value: {', '.join(bad)[:200]}")
        if field == "annotations" and core.annotations_bytes(found) > core.ANNOTATIONS_MAX_BYTES:
            errors.append(f"metadata.annotations: may not be more than {core.ANNOTATIONS_MAX_BYTES} bytes in all")
    return errors


def manifest_errors(doc: Any) -> list[str]:
    """Every problem with a FineTuneJob manifest, one `field: message` line each (empty when valid).

    The same checks the apiserver makes through the CRD's schema and CEL rules, so a manifest
    that `kubectl apply` would refuse is refused here with the same field named.
    """
    if not isinstance(doc, dict):
        return ["manifest: must be a mapping"]
    errors = []
    if doc.get("apiVersion") != f"{GROUP}/{VERSION}":
        errors.append(f"apiVersion: must be {GROUP}/{VERSION}")
    if doc.get("kind") != KIND:
        errors.append(f"kind: must be {KIND}")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        return errors + ["metadata: must be a mapping"]
    name = meta.get("name")
    if name is None and isinstance(meta.get("generateName"), str):  # `kubectl create`: the apiserver names it so
        name = meta["generateName"][:GENERATED_PREFIX_MAX] + "x" * GENERATED_SUFFIX
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        errors.append(NAME_MESSAGE)
    elif len(name) > MAX_NAME_LENGTH:
        errors.append(LENGTH_MESSAGE)
    errors += _metadata_map_errors(meta)
    try:
        FineTuneJob.from_wire({"spec": doc.get("spec")})
    except ValidationError as exc:
        errors += error_lines(exc)
    except ValueError as exc:  # a value that JSON cannot carry
        errors.append(f"spec: {exc}")
    return errors
