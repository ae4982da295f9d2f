"""The FineTuneJob API: spec (trainer config + runtime + placement) and status.

These models are the single source of truth: the CRD in deploy/crds is generated from
them (`make crds`), and the operator validates specs with them.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError

from finetune_trainer.config import Stage, TrainerConfig
from finetune_trainer.rules import ApiModel, error_lines

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune", "ml"]

# The child Job "<name>-<attempt>" and its pods' index suffixes must stay within 63 characters.
MAX_NAME_LENGTH = 50
# Stricter than the apiserver's subdomain rule: the name becomes a label value and a Service name.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MESSAGE = "metadata.name must be a lowercase RFC 1123 label (a-z, 0-9 and '-')"
LENGTH_MESSAGE = f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the names of the job's pods add suffixes to it"

# Kueue's convention: a queue-name label on the FineTuneJob is copied onto its child Job.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# Kubernetes resource quantities, as the apiserver parses them ("8", "500m", "32Gi").
QUANTITY_PATTERN = r"^([+]?[0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
Quantity = Annotated[int, Field(gt=0)] | Annotated[str, Field(pattern=QUANTITY_PATTERN)]


class ResourcesSpec(ApiModel):
    """The gang of trainer workers and what each one gets."""

    workers: int = Field(1, ge=1, le=256, description="Number of trainer pods (torchrun nodes); rank 0 reports.")
    gpus_per_worker: int = Field(
        1, ge=0, le=16, description="nvidia.com/gpu per worker; 0 trains on the CPU (gloo instead of nccl)."
    )
    cpu: Quantity = Field("4", description="CPU request and limit per worker (a Kubernetes quantity, e.g. 8 or 500m).")
    memory: Quantity = Field("16Gi", description="Memory request and limit per worker (a Kubernetes quantity, e.g. 32Gi).")


class Toleration(ApiModel):
    """A core/v1 Toleration, passed through to the trainer pods."""

    key: str | None = Field(None, description="Taint key to tolerate; empty with operator Exists tolerates all.")
    operator: str | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value to match (operator Equal).")
    effect: str | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated, in seconds.")


class FineTuneJobSpec(TrainerConfig):
    """What to fine-tune (the trainer's config) plus how and where to run it."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and their resources.")
    image: str | None = Field(
        None, max_length=512, description="Trainer image; defaults to the operator's configured trainer image."
    )
    suspend: bool = Field(False, description="Keep (or put) the job suspended: no pods run while true (Kueue sets this).")
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retryable attempt failures before the job fails; disruptions do not count."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job (reason DeadlineExceeded) after running this many seconds in total."
    )
    ttl_seconds_after_finished: int | None = Field(
        604800, ge=0, description="Delete the finished job and its children after this many seconds (default 7 days)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the trainer pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the trainer pods.")
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity for the trainer pods, passed through as is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the trainer pods (also used by Kueue)."
    )



# ---- status -------------------------------------------------------------------------


class Phase(StrEnum):
    """A summary of the conditions (computed from them, never set on its own)."""

    PENDING = "Pending"
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(description="Condition type, e.g. Created, Scheduled, Running, Succeeded, Failed, Suspended.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase machine-readable reason, e.g. Unschedulable or InvalidSpec.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation this condition was computed from.")


class Progress(ApiModel):
    """Training progress of the current attempt, read from rank 0's metrics."""

    percent: int = Field(0, ge=0, le=100, description="Completed optimizer steps as a percentage of totalSteps.")
    step: int = Field(0, ge=0, description="Completed optimizer steps.")
    total_steps: int = Field(0, ge=0, description="Optimizer steps the run will take.")
    epoch: float = Field(0, ge=0, description="Current epoch (fractional).")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds until training ends.")
    updated_at: datetime | None = Field(None, description="When these numbers were read.")


class TrainingMetrics(ApiModel):
    """A snapshot of the trainer's live metrics."""

    loss: float | None = Field(None, description="Training loss (moving average).")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    samples_per_second: float | None = Field(None, description="Training throughput in samples per second.")
    tokens_per_second: float | None = Field(None, description="Training throughput in tokens per second.")


class EvaluationResult(ApiModel):
    """Metrics on the held-out split before and after fine-tuning."""

    baseline: dict[str, float] = Field(default_factory=dict, description="Metric name to value, before fine-tuning.")
    final: dict[str, float] = Field(default_factory=dict, description="Metric name to value, after fine-tuning.")
    summary: str | None = Field(None, description="One line for kubectl, e.g. 'accuracy 0.34→0.71'.")


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    FATAL = "fatal"


class Finding(ApiModel):
    """Something the structure analysis noticed."""

    severity: Severity = Field(description="info, warning or fatal (a fatal finding stops the job).")
    code: str = Field(description="Stable identifier, e.g. NanWeights or HeadSizeMismatch.")
    message: str = Field(description="What was found and what to do about it.")


class Analysis(ApiModel):
    """The headline of the structure analysis (the full report is in the output folder)."""

    total_parameters: int | None = Field(None, ge=0, description="All parameters of the model as trained.")
    trainable_parameters: int | None = Field(None, ge=0, description="Parameters that receive updates.")
    findings: list[Finding] = Field(default_factory=list, description="Warnings and fatal problems found.")


class FineTuneJobStatus(ApiModel):
    """Observed state, written only by the operator."""

    phase: Phase | None = Field(None, description="Pending, Suspended, Running, Succeeded or Failed (from the conditions).")
    stage: Stage | None = Field(None, description="The pipeline stage rank 0 is in.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="The contract: the latest observation of each condition type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: Progress | None = Field(None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(None, description="Live training metrics.")
    evaluation: EvaluationResult | None = Field(None, description="Baseline and final evaluation.")
    analysis: Analysis | None = Field(None, description="Structure analysis headline.")
    attempts: int = Field(0, ge=0, description="Attempts started so far (each one is a child Job).")
    start_time: datetime | None = Field(None, description="When the first attempt started.")
    completion_time: datetime | None = Field(None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(None, description="The spec generation the status reflects.")


class FineTuneJob(ApiModel):
    """Fine-tunes a model on a dataset: analyze, adjust, rearrange, train, evaluate, export."""

    model_config = ApiModel.model_config | {"extra": "ignore"}  # apiVersion, kind, metadata

    spec: FineTuneJobSpec = Field(description="What to fine-tune and how to run it.")
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus, description="Observed state.")


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
    name = str((doc.get("metadata") or {}).get("name", ""))
    if not re.match(NAME_PATTERN, name):
        errors.append(NAME_MESSAGE)
    elif len(name) > MAX_NAME_LENGTH:
        errors.append(LENGTH_MESSAGE)
    try:
        FineTuneJob.from_wire({"spec": doc.get("spec")})
    except ValidationError as exc:
        errors += error_lines(exc)
    return errors
