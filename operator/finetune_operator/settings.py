"""The operator's settings: flags with environment-variable defaults, typed and validated once."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from finetune_operator import coretypes as core

ENV_PREFIX = "FINETUNE_OPERATOR_"
JSON_FIELDS = ("trainer_resources", "trainer_pod_annotations")  # objects, given as JSON text
DEFAULT_TRAINER_RESOURCES = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}
# The apiserver's bound on runAsUser, runAsGroup and fsGroup: a larger uid passed here failed every job's Job
# create (422), blamed on the job's spec (InvalidSpec).
MAX_UID = 2**31 - 1


class Settings(BaseModel):
    """What `finetune-operator run` is told; each field is a flag and FINETUNE_OPERATOR_<NAME>."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: tuple[str, ...] = Field(
        (), description="Namespaces to watch (repeat the flag, or separate them by commas); none: the whole cluster."
    )
    trainer_image: str = Field(
        "ghcr.io/finetune-dev/trainer:0.1.0", max_length=512, description="Trainer image for jobs that name none."
    )
    trainer_resources: core.ResourceRequirements = Field(
        default_factory=lambda: core.ResourceRequirements.from_wire(DEFAULT_TRAINER_RESOURCES),
        description="Per-worker resources (JSON) for jobs that set none.",
    )
    trainer_pull_secrets: tuple[str, ...] = Field((), description="Image pull secrets added to every trainer pod.")
    trainer_pod_annotations: core.Annotations = Field(
        default_factory=dict,
        description="Annotations (JSON object) on every trainer pod, e.g. prometheus.io/scrape; a job's own win.",
    )
    trainer_uid: int = Field(
        10001, ge=0, le=MAX_UID, description="Numeric user (and group, and fsGroup) the trainer runs as (the trainer "
        "image's); 0: none set, the platform's admission assigns them (OpenShift's restricted SCC admits only each "
        "namespace's own range, so no one uid serves several namespaces).")
    poll_seconds: float = Field(2.0, ge=0.2, le=300, description="How often each running job is reconciled and rank 0's metrics read (a waiting job: every 5 polls).")
    metrics_port: int = Field(8000, ge=0, le=65535, description="Port of the operator's own /metrics (0: off).")
    liveness_port: int = Field(8080, ge=1, le=65535, description="Port of kopf's liveness endpoint /healthz.")
    bind_address: str = Field("0.0.0.0", description="Address the metrics and liveness endpoints listen on.")
    lease_namespace: str = Field(
        "", description="Namespace of the Lease that makes one of several operator replicas the active one (the others "
        "wait, and take over within about 20 s of its end); empty: no election, so run one replica only.")
    lease_name: str = Field("finetune-operator", min_length=1, description="Name of that Lease.")

    @property
    def liveness_endpoint(self) -> str:
        """kopf's URL of /healthz; an IPv6 address (::) goes in brackets, or its colons read as the port's."""
        host = f"[{self.bind_address}]" if ":" in self.bind_address else self.bind_address
        return f"http://{host}:{self.liveness_port}/healthz"

    @field_validator("liveness_port")
    @classmethod
    def _own_port(cls, value: int, info: ValidationInfo) -> int:
        """Both endpoints listen on bind_address: on one port, the second to start exited with "address in use"."""
        if value == info.data.get("metrics_port"):
            raise ValueError(f"the metrics port is {value} too; each endpoint needs its own port")
        return value

    @field_validator("trainer_image")
    @classmethod
    def _image(cls, value: str) -> str:
        """As spec.runtime.image: an image with whitespace (a Helm value's trailing newline) got every job's Job
        refused, each job failed InvalidSpec, blamed on its spec."""
        if not re.fullmatch(core.IMAGE, value):
            raise ValueError(f"{value!r} is no image: it must be non-empty, without whitespace or control characters")
        return value

    @field_validator("trainer_pull_secrets", "lease_name")
    @classmethod
    def _names(cls, value: tuple[str, ...] | str) -> tuple[str, ...] | str:
        return _checked(value, core.DNS_SUBDOMAIN, 253, "name")

    @field_validator("namespaces", "lease_namespace")
    @classmethod
    def _namespaces(cls, value: tuple[str, ...] | str) -> tuple[str, ...] | str:
        """A namespace's name is a DNS label (the chart's schema says so too): a dotted or longer one, which no
        namespace has, was taken, and the operator watched nothing there, saying nothing."""
        return _checked(value, core.DNS_LABEL, 63, "namespace name")


def _checked(value: tuple[str, ...] | str, pattern: str, longest: int, what: str) -> tuple[str, ...] | str:
    for name in filter(None, (value,) if isinstance(value, str) else value):  # "": no lease
        if len(name) > longest or not re.fullmatch(pattern, name):
            raise ValueError(f"{name!r} is not a valid {what}")
    return value


def _is_list(name: str) -> bool:
    return isinstance(Settings.model_fields[name].default, tuple)


def flag(name: str) -> str:
    """A list takes one value per flag (--namespace a --namespace b), so its flag is singular."""
    return "--" + (name.removesuffix("s") if _is_list(name) else name).replace("_", "-")


def _from_env(name: str) -> Any:
    raw = os.environ.get(ENV_PREFIX + name.upper())
    return _items([raw]) if raw is not None and _is_list(name) else raw


def _items(values: list[str]) -> tuple[str, ...]:
    """A list's values, each of which may hold several, separated by commas or spaces (--namespace a,b)."""
    return tuple(part for value in values for part in value.replace(",", " ").split())


def _default_text(name: str) -> str:
    """The default as the flag would be given it (JSON for an object), or "" where there is none to show."""
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    default = default.to_wire() if hasattr(default, "to_wire") else default
    if default in ((), {}, ""):
        return ""
    return f"; default {json.dumps(default) if name in JSON_FIELDS else default}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}{_default_text(name)}]"
        if _is_list(name):
            parser.add_argument(flag(name), dest=name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag(name), dest=name, default=None, help=help_text)


def from_arguments(args: argparse.Namespace) -> Settings:
    """Flags win over the environment, which wins over the defaults; a bad value names its flag, or its variable."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name in Settings.model_fields:
        value, where[name] = getattr(args, name), flag(name)
        if value is None:
            value, where[name] = _from_env(name), ENV_PREFIX + name.upper()
        if value is None:
            continue
        if name in JSON_FIELDS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"finetune-operator: invalid settings: {where[name]}: not JSON ({exc})") from exc
        if _is_list(name) and isinstance(value, list):  # the flag's values, once per flag
            value = _items(value)
        values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            where[str(e["loc"][0])] + "".join(f".{part}" for part in e["loc"][1:] if isinstance(part, str))
            + f": {e['msg']}" for e in exc.errors())
        raise SystemExit(f"finetune-operator: invalid settings: {problems}") from exc
