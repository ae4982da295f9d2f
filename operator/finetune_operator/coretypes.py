"""The Kubernetes core types a FineTuneJob passes through to its pods, as strict as the apiserver.

A spec the apiserver would refuse inside a Job's pod template must be refused at `kubectl apply`
of the FineTuneJob, naming the field: so these are typed copies of the core/v1 types (only the
parts a trainer pod may use: no hostPath, no privileged anything), with the apiserver's syntax
rules as patterns and CEL (each with its Python twin). Every list, map and string is bounded, as
the CEL cost budget requires.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, Context, Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from finetune_trainer.config import PARENT_SEGMENT, PRINTABLE
from finetune_trainer.rules import INT64, ApiModel, Rule, checked

# RFC 1123 names, as the apiserver checks object names and references.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label or annotation key: an optional DNS-subdomain prefix and a name of at most 63 characters.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# The apiserver checks an annotation key lowercased (ValidateAnnotations), so its prefix may have capitals too:
# Example.COM/Owner is one.
ANNOTATION_KEY = QUALIFIED_NAME.replace("[a-z0-9]", "[A-Za-z0-9]").replace("[-a-z0-9]", "[-A-Za-z0-9]")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# An environment variable name as the apiserver accepts it (C identifiers and more).
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A container image: the apiserver refuses one with leading or trailing whitespace (a Job's whole create), and
# whitespace within or a control character no runtime pulls.
IMAGE = rf"^{PRINTABLE}+$"
# A Kubernetes quantity (resource.Quantity's grammar).
# The exponent has at most three digits: CEL's quantity() of 1e999999999 compared with 2 kept the
# apiserver busy past its request timeout (found by the fuzzer).
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]{1,3})?$"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


# Exact for every quantity the pattern admits (the default context rounds at 28 digits and overflows at 1e999999).
EXACT = Context(prec=256, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _quantity(text: str) -> Decimal:
    """The value of a quantity that matches QUANTITY."""
    match = re.match(r"^([+-]?[0-9.]+)(.*)$", text)
    assert match, text
    number, suffix = Decimal(match[1]), match[2]
    if suffix[:1] in ("e", "E") and suffix not in ("E", "Ei"):  # an exponent (1e3), not exa (1E) or exbi (1Ei)
        return number.scaleb(int(suffix[1:]), EXACT)
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    decimal = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
    if suffix in binary:
        return EXACT.multiply(number, Decimal(1024 ** binary[suffix]))
    return number.scaleb(decimal[suffix], EXACT)


def quantity_value(value: int | str) -> Decimal:
    return Decimal(value) if isinstance(value, int) else _quantity(value)


def _cel_quantity(expr: str) -> str:
    """CEL: the int-or-string `expr` is a quantity QUANTITY admits (checked before any quantity() of it)."""
    return f"string({expr}).matches(r'{QUANTITY}')"


# The GPUs torchrun's processes take, one each (LOCAL_RANK): the trainer's image has torch's CUDA build.
GPU = "nvidia.com/gpu"


# A quantity as users write it: `8`, `"500m"`, `"32Gi"`; never negative (the apiserver refuses those
# wherever a pod takes one).
Quantity = Annotated[
    int | Annotated[str, Field(max_length=64)],
    *checked(
        f"{_cel_quantity('self')} && isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0",
        lambda v: (isinstance(v, int) or re.fullmatch(QUANTITY, v) is not None) and quantity_value(v) >= 0,
        "must be a non-negative quantity, e.g. 8, 500m or 32Gi",
    ),
]
# A size whose 0 the kubelet takes for no bound at all (an emptyDir's sizeLimit: a tmpfs as large as the pod's
# memory), so never 0 in any spelling (0, "0", "0Gi"). A malformed one is left to Quantity's own rule.
PositiveQuantity = Annotated[
    Quantity,
    *checked(
        f"!{_cel_quantity('self')} || !isQuantity(string(self)) || quantity(string(self)).compareTo(quantity('0')) > 0",
        lambda v: quantity_value(v) > 0,
        "must be more than 0: the kubelet takes a size of 0 for no limit at all",
    ),
]


# The operator's and the Job controller's label and annotation prefixes.
RESERVED_PREFIXES = ("finetune.dev/", "batch.kubernetes.io/")
# The Job controller's pod labels of before its prefix, which it still sets: the apiserver refuses a Job whose pod
# template gives one another value than the Job's name or uid, so a pod label of them failed the job (InvalidSpec).
RESERVED_LABELS = ("job-name", "controller-uid")
# Annotations a kubelet reads as the pod's AppArmor or seccomp profile: "unconfined" would undo the
# restricted securityContext, so a spec may not set them.
PROFILE_PREFIXES = ("container.apparmor.security.beta.kubernetes.io/", "seccomp.security.alpha.kubernetes.io/",
                    "container.seccomp.security.alpha.kubernetes.io/")


def _labels(kind: str, pattern: str, reserved: tuple[str, ...], why: str, keys: tuple[str, ...] = ()) -> Any:
    """Metadata for a map of label (or annotation) keys: each key matches `pattern` (a qualified name), none with a
    reserved prefix in any case (a prefix is a DNS subdomain, and the apiserver takes an annotation key's in
    capitals: FineTune.dev/x was taken) or one of the reserved `keys`."""
    named = f"the prefixes {', '.join(reserved)}" + (f" and the keys {', '.join(keys)}" if keys else "")
    return checked(
        f"self.all(k, k.matches(r'{pattern}') && k.lastIndexOf('/') <= 253"
        + "".join(f" && !k.lowerAscii().startsWith('{p}')" for p in reserved)
        + (" && !(k in [" + ", ".join(f"'{k}'" for k in keys) + "])" if keys else "") + ")",
        # lower() after the pattern, which takes ASCII alone: CEL's lowerAscii() then
        lambda m: all(re.fullmatch(pattern, k) and k.rfind("/") <= 253 and not k.lower().startswith(reserved)
                      and k not in keys for k in m),
        f"{kind} keys must be qualified names ([prefix/]name, name at most 63 characters); {named} are {why}",
    )


# The apiserver's own limit on all of an object's annotations together (keys and values, in bytes).
ANNOTATIONS_MAX_BYTES = 256 * 1024
# A pod's annotations are a job's spec.pod.annotations and the operator's trainer_pod_annotations (both Annotations)
# together, and then the Job controller's completion index and what network plugins write (k8s.v1.cni.cncf.io/
# network-status): each map at most 120 KiB leaves them 16 KiB. At 64 values of 4096 characters the apiserver refused
# the Job, or the Job controller its pods.
POD_ANNOTATIONS_MAX_BYTES = 120 * 1024


def annotations_bytes(annotations: dict[str, str]) -> int:
    """The size the apiserver counts against ANNOTATIONS_MAX_BYTES."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())


Labels = Annotated[dict[str, LabelValue], Field(max_length=64), *_labels(
    "label", QUALIFIED_NAME, RESERVED_PREFIXES, "the operator's and the Job controller's", RESERVED_LABELS)]
Annotations = Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=64), *_labels(
    "annotation", ANNOTATION_KEY, RESERVED_PREFIXES + PROFILE_PREFIXES,
    "the operator's, the Job controller's and the kubelet's security profiles"), *checked(
    f"self.map(k, bytes(k).size() + bytes(self[k]).size()).sum() <= {POD_ANNOTATIONS_MAX_BYTES}",
    lambda m: annotations_bytes(m) <= POD_ANNOTATIONS_MAX_BYTES,
    f"keys and values may hold at most {POD_ANNOTATIONS_MAX_BYTES} bytes in all (of the apiserver's "
    f"{ANNOTATIONS_MAX_BYTES} for a pod's annotations, the rest is the operator's and others')",
)]
# Label keys and values to match (a node selector, a label selector).
LabelMap = Annotated[dict[str, LabelValue], Field(max_length=64), *checked(
    f"self.all(k, k.matches(r'{QUALIFIED_NAME}') && k.lastIndexOf('/') <= 253)",
    lambda m: all(re.fullmatch(QUALIFIED_NAME, k) and k.rfind("/") <= 253 for k in m),
    "keys must be label keys ([prefix/]name, name at most 63 characters)",
)]


# ---- resources ----------------------------------------------------------------------

# Extended resources (a domain that is not kubernetes.io: nvidia.com/gpu, ...) and huge pages (hugepages-2Mi)
# cannot be overcommitted: the apiserver insists on a limit and a request equal to it, and on a whole number of an
# extended resource.
RESOURCE_NAME = QUALIFIED_NAME  # the apiserver's check of a resource name: hugepages-2Mi has a capital
HUGE_PAGES = "hugepages-"


# CEL has no exact rounding: it finds a fraction's whole bytes through its float (asApproximateFloat), which is
# within a byte of it below this only; so a fraction of a byte of huge pages is taken below it (4 PiB) alone, and
# only where the apiserver's rounding up to nanos (ParseQuantity) leaves it below: 2^52 - 1e-10 reaches CEL as 2^52.
ROUNDED_BELOW = 2**52
FRACTIONS_UP_TO = ROUNDED_BELOW - Decimal("1e-9")


def _whole_pages(name: str, value: int | str) -> bool:
    """The apiserver's IsHugePageResourceValueDivisible: hugepages-<size> names a page size, a positive whole number
    of bytes (hugepages-abc names none), and its quantity, a fraction of a byte rounded up (Value()), is a multiple
    of it: 2097151.5 of hugepages-2Mi is one page."""
    size, quantity = name.removeprefix(HUGE_PAGES), quantity_value(value)
    if re.fullmatch(QUANTITY, size) is None or not _whole(page := quantity_value(size)) or page <= 0:
        return False
    rounded = quantity.to_integral_value(ROUND_CEILING)
    if rounded != quantity and quantity > FRACTIONS_UP_TO:
        return False
    return _whole(rounded) and int(rounded) % int(page) == 0


# What a container may ask for without a domain (the apiserver's IsStandardContainerResourceName)
CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def _container_resource(name: str) -> bool:
    """The apiserver's validateContainerResourceName: without a domain, a standard one (`gpu` is none: a GPU is
    nvidia.com/gpu); with one outside kubernetes.io, an extended resource, which never starts with `requests.`."""
    if "/" not in name:
        return name in CONTAINER_RESOURCES or name.startswith(HUGE_PAGES)
    return "kubernetes.io/" in name or not name.startswith("requests.")


_PAGE = f"quantity(k.substring({len(HUGE_PAGES)}))"
_HUGE = "quantity(string(self[k]))"
# A fraction's whole bytes: of n, n + 1 and n + 2 (n: its float truncated, within a byte of it), the one at or just
# above it. No cel.bind: Kubernetes 1.29 lacks it.
_N = f"(int({_HUGE}.asApproximateFloat()) + d)"
_ROUNDED_WHOLE_PAGES = (
    f"({_HUGE}.isInteger() ? {_HUGE}.asInteger() % {_PAGE}.asInteger() == 0 "
    f": {_HUGE}.isLessThan(quantity('{ROUNDED_BELOW}')) && [0, 1, 2].exists(d, "
    f"!{_HUGE}.sub({_N}).isGreaterThan(quantity('0')) && {_HUGE}.sub({_N} - 1).isGreaterThan(quantity('0')) "
    f"&& {_N} % {_PAGE}.asInteger() == 0))"
)
ResourceList = Annotated[dict[str, Quantity], Field(max_length=16), *checked(
    f"self.all(k, k.matches(r'{RESOURCE_NAME}'))",
    lambda m: all(re.fullmatch(RESOURCE_NAME, k) for k in m),
    "keys must be resource names, e.g. cpu, memory or nvidia.com/gpu",
), *checked(
    f"self.all(k, k.contains('/') ? (k.contains('kubernetes.io/') || !k.startsWith('requests.')) "
    f": (k in {list(CONTAINER_RESOURCES)} || k.startsWith('{HUGE_PAGES}')))",
    lambda m: all(_container_resource(k) for k in m),
    f"a resource without a domain is one of {', '.join(CONTAINER_RESOURCES)} or {HUGE_PAGES}<size> (a GPU is "
    "nvidia.com/gpu, amd.com/gpu, ...), and one with a domain does not start with requests.: the apiserver refuses "
    "the Job",
), *checked(
    f"self.all(k, !k.startsWith('{HUGE_PAGES}') || (k.substring({len(HUGE_PAGES)}).matches(r'{QUANTITY}') "
    f"&& isQuantity(k.substring({len(HUGE_PAGES)})) && {_PAGE}.isInteger() && {_PAGE}.compareTo(quantity('0')) > 0 "
    f"&& (!{_cel_quantity('self[k]')} || {_ROUNDED_WHOLE_PAGES})))",
    lambda m: all(_whole_pages(k, v) for k, v in m.items() if k.startswith(HUGE_PAGES)),
    "huge pages come in whole pages: hugepages-<size> names a page size of whole bytes (e.g. hugepages-2Mi), and its "
    "quantity is a multiple of it (e.g. 4Mi)",
)]


def _requests_within_limits(r: ResourceRequirements) -> bool:
    return all(k not in r.limits or quantity_value(v) <= quantity_value(r.limits[k]) for k, v in r.requests.items())


def _huge_pages_with_cpu_or_memory(r: ResourceRequirements) -> bool:
    """The apiserver's "HugePages require cpu or memory" (a request or a limit of either)."""
    names = r.requests.keys() | r.limits.keys()
    return not any(k.startswith(HUGE_PAGES) for k in names) or not names.isdisjoint({"cpu", "memory"})


def _extended(name: str) -> bool:
    return "/" in name and not name.startswith("kubernetes.io/")


def _overcommit_forbidden(name: str) -> bool:
    """The apiserver's !IsOvercommitAllowed: an extended resource, or huge pages."""
    return _extended(name) or name.startswith(HUGE_PAGES)


def _fixed_requests_equal_limits(r: ResourceRequirements) -> bool:
    return all(
        k in r.limits and quantity_value(v) == quantity_value(r.limits[k])
        for k, v in r.requests.items() if _overcommit_forbidden(k)
    )


def _whole(value: Decimal) -> bool:
    """CEL's quantity isInteger(): a whole number that int64 holds."""
    return value == value.to_integral_value() and INT64.start <= value < INT64.stop


def _extended_whole(r: ResourceRequirements) -> bool:
    return all(
        _whole(quantity_value(v))
        for side in (r.requests, r.limits) for k, v in side.items() if _extended(k)
    )


_EXTENDED = "k.contains('/') && !k.startsWith('kubernetes.io/')"
_OVERCOMMIT_FORBIDDEN = f"({_EXTENDED}) || k.startsWith('{HUGE_PAGES}')"
# Rules over two quantities leave a malformed one to its own rule (the apiserver runs them regardless).
_BOTH_VALID = f"{_cel_quantity('self.requests[k]')} && {_cel_quantity('self.limits[k]')}"


class ResourceRequirements(ApiModel):
    """Compute resources of one worker (core/v1 ResourceRequirements): any resource, GPUs included."""

    requests: ResourceList = Field(default_factory=dict, description="Resources the scheduler reserves per worker.")
    limits: ResourceList = Field(
        default_factory=dict,
        description="Most a worker may use. Extended resources such as nvidia.com/gpu, and huge pages, go here "
        "(a request of one must equal its limit).",
    )

    rules = (
        Rule(
            cel=f"![self.requests, self.limits].exists(m, m.exists(k, k.startsWith('{HUGE_PAGES}'))) || "
            "['cpu', 'memory'].exists(k, k in self.requests || k in self.limits)",
            holds=_huge_pages_with_cpu_or_memory,
            message="huge pages require a cpu or memory request or limit",
        ),
        Rule(
            cel=f"self.requests.all(k, !(k in self.limits) || !({_BOTH_VALID}) || "
            "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
            holds=_requests_within_limits,
            message="each request must be at most its limit",
            field="requests",
        ),
        Rule(
            cel=f"self.requests.all(k, !({_OVERCOMMIT_FORBIDDEN}) || (k in self.limits && (!({_BOTH_VALID}) || "
            "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) == 0)))",
            holds=_fixed_requests_equal_limits,
            message="an extended resource (e.g. nvidia.com/gpu) or huge pages cannot be overcommitted: set it in "
            "limits (its request, if given, must equal the limit)",
            field="requests",
        ),
        Rule(
            cel=f"[self.requests, self.limits].all(m, m.all(k, !({_EXTENDED}) || !{_cel_quantity('m[k]')} "
            "|| quantity(string(m[k])).isInteger()))",
            holds=_extended_whole,
            message="extended resources (e.g. nvidia.com/gpu) must be whole numbers",
            field="limits",
        ),
    )


# ---- environment --------------------------------------------------------------------


def _cel_strings(items: tuple[str, ...]) -> str:
    """A CEL list of these strings."""
    return "[" + ", ".join(f"'{s}'" for s in items) + "]"


# Set by torchrun or by the operator for the trainer: a user's value would break the run.
RESERVED_ENV = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
    "TERMINATION_MESSAGE_PATH", "JOB_COMPLETION_INDEX", "OMP_NUM_THREADS",
)
RESERVED_ENV_PREFIXES = ("FINETUNE_", "TORCHELASTIC_", "PET_")
_CEL_NO_RESERVED_ENV_PREFIX = " && ".join(f"!self.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)

EnvName = Annotated[
    str,
    Field(min_length=1, max_length=256, pattern=ENV_NAME),
    *checked(
        f"!(self in {_cel_strings(RESERVED_ENV)}) && {_CEL_NO_RESERVED_ENV_PREFIX}",
        lambda n: n not in RESERVED_ENV and not n.startswith(RESERVED_ENV_PREFIXES),
        "is set by torchrun or the operator: " + ", ".join(RESERVED_ENV) + " and names starting with "
        + ", ".join(RESERVED_ENV_PREFIXES) + " are reserved",
    ),
]


def _prefix_makes_no_reserved_name(prefix: str) -> bool:
    """Whether no key (of at least one character) after `prefix` makes a reserved name: the prefix starts with no
    reserved prefix, and begins no reserved name or prefix (PE makes PET_RDZV_CONF of a key T_RDZV_CONF)."""
    return not prefix.startswith(RESERVED_ENV_PREFIXES) and not any(
        n.startswith(prefix) and n != prefix for n in RESERVED_ENV + RESERVED_ENV_PREFIXES)


# An envFrom prefix, put before every key of a Secret or ConfigMap, whose keys no spec shows: PET_ made a key
# RDZV_CONF torchrun's rendezvous setting.
EnvPrefix = Annotated[
    str,
    Field(max_length=256, pattern=ENV_NAME),
    *checked(
        f"{_CEL_NO_RESERVED_ENV_PREFIX} && "
        f"!{_cel_strings(RESERVED_ENV + RESERVED_ENV_PREFIXES)}.exists(n, n.startsWith(self) && n != self)",
        _prefix_makes_no_reserved_name,
        "would make a key a name torchrun or the operator sets: it may not start with " + ", ".join(RESERVED_ENV_PREFIXES)
        + ", nor begin one of them or a name reserved in env (MASTER_ makes MASTER_ADDR of a key ADDR)",
    ),
]


class KeyRef(ApiModel):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: Name = Field(description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="The key.")
    optional: bool | None = Field(None, description="Start even if it does not exist.")


SUBSCRIPTED_FIELD = r"^metadata\.(labels|annotations)\["
# A subscripted field path as the apiserver takes it: its key a label or annotation key (whose prefix, up to its last
# /, is checked apart: a DNS subdomain has at most 253 characters).
QUALIFIED_FIELD = (
    r"^metadata\.(labels\['" + QUALIFIED_NAME[1:-1] + r"'\]|annotations\['" + ANNOTATION_KEY[1:-1] + r"'\])$"
)


def _subscript_qualified(path: str) -> bool:
    return not re.match(SUBSCRIPTED_FIELD, path) or (
        re.fullmatch(QUALIFIED_FIELD, path) is not None and path[path.index("[") + 2:-2].rfind("/") <= 253)


class FieldRef(ApiModel):
    """A field of the pod (the downward API)."""

    field_path: str = Field(
        pattern=r"^(metadata\.(name|namespace|uid|labels\['[^']+'\]|annotations\['[^']+'\])|"
        r"spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$",
        max_length=512,
        description="e.g. metadata.name, spec.nodeName or status.podIP.",
    )

    rules = (
        # The key is cut out (after the first [') only once the path has its shape.
        Rule(
            cel=f"!self.fieldPath.matches(r'{SUBSCRIPTED_FIELD}') || (self.fieldPath.matches(r\"{QUALIFIED_FIELD}\") "
            "&& self.fieldPath.substring(self.fieldPath.indexOf('[') + 2, self.fieldPath.size() - 2).lastIndexOf('/') "
            "<= 253)",
            holds=lambda f: _subscript_qualified(f.field_path),
            message="a label or annotation key must be a qualified name ([prefix/]name, name at most 63 characters)",
            field="fieldPath",
        ),
    )


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from: exactly one source."""

    secret_key_ref: KeyRef | None = Field(None, description="A key of a Secret (e.g. a hub token).")
    config_map_key_ref: KeyRef | None = Field(None, description="A key of a ConfigMap.")
    field_ref: FieldRef | None = Field(None, description="A field of the pod.")

    rules = (
        Rule(
            cel="[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef)].filter(x, x).size() == 1",
            holds=lambda s: [s.secret_key_ref, s.config_map_key_ref, s.field_ref].count(None) == 2,
            message="exactly one of secretKeyRef, configMapKeyRef or fieldRef",
        ),
    )


class EnvVar(ApiModel):
    """An environment variable of the trainer container (core/v1 EnvVar)."""

    name: EnvName = Field(description="Variable name; torchrun's and the trainer's own are refused.")
    # No NUL: no process environment can hold one (the apiserver takes it; the container would never start).
    value: str | None = Field(None, max_length=32768, pattern=r"^[^\x00]*$", description="A literal value.")
    value_from: EnvVarSource | None = Field(None, description="A value read from a Secret, a ConfigMap or the pod.")

    rules = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            holds=lambda e: e.value is None or e.value_from is None,
            message="value and valueFrom are mutually exclusive",
            field="valueFrom",
        ),
    )


class SourceRef(ApiModel):
    """A whole Secret or ConfigMap."""

    name: Name = Field(description="Its name, in the job's namespace.")
    optional: bool | None = Field(None, description="Start even if it does not exist.")


class EnvFromSource(ApiModel):
    """Every key of a Secret or a ConfigMap as environment variables (core/v1 EnvFromSource)."""

    prefix: EnvPrefix | None = Field(
        None, description="Prepended to every key; one that would make a key a name torchrun or the operator sets (PET_, MASTER_) is "
        "refused.")
    secret_ref: SourceRef | None = Field(None, description="The Secret (e.g. one holding HF_TOKEN).")
    config_map_ref: SourceRef | None = Field(None, description="The ConfigMap.")

    rules = (
        Rule(
            cel="has(self.secretRef) != has(self.configMapRef)",
            holds=lambda s: (s.secret_ref is None) != (s.config_map_ref is None),
            message="exactly one of secretRef or configMapRef",
        ),
    )


# ---- volumes ------------------------------------------------------------------------


class PersistentVolumeClaimSource(ApiModel):
    claim_name: Name = Field(description="A PersistentVolumeClaim in the job's namespace.")
    read_only: bool | None = Field(None, description="Mount read-only.")


class ConfigMapSource(ApiModel):
    name: Name = Field(description="A ConfigMap in the job's namespace.")
    optional: bool | None = Field(None, description="Start even if it does not exist.")


class SecretSource(ApiModel):
    secret_name: Name = Field(description="A Secret in the job's namespace.")
    optional: bool | None = Field(None, description="Start even if it does not exist.")


class StorageMedium(StrEnum):
    DISK = ""
    MEMORY = "Memory"


class EmptyDirSource(ApiModel):
    medium: StorageMedium | None = Field(None, description="Empty for the node's disk, Memory for tmpfs.")
    size_limit: Quantity | None = Field(None, description="Most this volume may hold.")


class Volume(ApiModel):
    """An extra volume of the trainer pods: a claim, a ConfigMap, a Secret or an emptyDir (nothing from the host)."""

    name: LabelName = Field(description="Volume name, referred to by volumeMounts; finetune-* names are the operator's.")
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(None, description="A PersistentVolumeClaim.")
    config_map: ConfigMapSource | None = Field(None, description="A ConfigMap's keys as files.")
    secret: SecretSource | None = Field(None, description="A Secret's keys as files.")
    empty_dir: EmptyDirSource | None = Field(None, description="Scratch space that lives as long as the pod.")

    rules = (
        Rule(
            cel="[has(self.persistentVolumeClaim), has(self.configMap), has(self.secret), has(self.emptyDir)]"
            ".filter(x, x).size() == 1",
            holds=lambda v: [v.persistent_volume_claim, v.config_map, v.secret, v.empty_dir].count(None) == 3,
            message="exactly one of persistentVolumeClaim, configMap, secret or emptyDir",
        ),
        Rule(
            cel="!self.name.startsWith('finetune-')",
            holds=lambda v: not v.name.startswith("finetune-"),
            message="names starting with finetune- are the operator's own volumes",
            field="name",
        ),
    )


DOT_SEGMENT = r"(^|/)\.\.?(/|$)"
# Where the operator mounts the trainer's config, the claims the spec names, the hub cache and /dev/shm.
RESERVED_MOUNT_PATHS = ("/etc/finetune", "/mnt/pvc", "/var/cache/huggingface", "/dev/shm", "/dev/termination-log")


class VolumeMount(ApiModel):
    """Where a volume appears in the trainer container (core/v1 VolumeMount)."""

    name: LabelName = Field(description="The volume's name in runtime.volumes.")
    # No empty segment and at most one trailing slash: the rules below compare paths as text, so /mnt/ and //mnt must
    # not pass for other paths than /mnt (the apiserver's CEL and Python strip a trailing slash alike only then).
    mount_path: str = Field(
        max_length=1024, pattern=r"^(/[^/:]+)+/?$", description="Absolute path in the container."
    )
    read_only: bool = Field(False, description="Mount read-only.")
    sub_path: str | None = Field(
        None, max_length=1024, pattern=r"^[^/]([^/]*/?)*$", description="A path inside the volume to mount instead of its root."
    )

    rules = (
        Rule(
            cel="[" + ", ".join(f"'{p}'" for p in RESERVED_MOUNT_PATHS) + "].all(p, self.mountPath != p "
            "&& !self.mountPath.startsWith(p + '/') "
            "&& !p.startsWith(self.mountPath.endsWith('/') ? self.mountPath : self.mountPath + '/'))",
            holds=lambda m: all(
                m.mount_path != p and not m.mount_path.startswith(p + "/") and not p.startswith(m.mount_path.rstrip("/") + "/")
                for p in RESERVED_MOUNT_PATHS
            ),
            message="overlaps a path the operator mounts: " + ", ".join(RESERVED_MOUNT_PATHS),
            field="mountPath",
        ),
        # The container runtime cleans the path: /mnt/./pvc is /mnt/pvc.
        Rule(
            cel=f"!self.mountPath.matches(r'{DOT_SEGMENT}')",
            holds=lambda m: not re.search(DOT_SEGMENT, m.mount_path),
            message="must not contain a '.' or '..' segment",
            field="mountPath",
        ),
        Rule(
            cel=f"!has(self.subPath) || !self.subPath.matches(r'{PARENT_SEGMENT}')",
            holds=lambda m: not re.search(PARENT_SEGMENT, m.sub_path or ""),
            message="must not contain a '..' segment",
            field="subPath",
        ),
    )


# ---- placement ----------------------------------------------------------------------


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    ALL = ""  # as core/v1 takes it: every effect, as when omitted
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A core/v1 Toleration of the trainer pods."""

    # Empty as omitted, as core/v1 takes it (a toleration copied from a pod's spec may say key: "" or effect: "")
    key: str | None = Field(None, max_length=317, pattern=f"^$|{QUALIFIED_NAME}",
                            description="Taint key; omit (or leave empty) with Exists to tolerate every taint.")
    operator: TolerationOperator | None = Field(None, description="Exists or Equal (the default).")
    value: LabelValue | None = Field(None, description="Taint value to match (operator Equal).")
    effect: TaintEffect | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute; omit (or leave empty) to match all.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated, in seconds.")

    rules = (
        Rule(
            cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            holds=lambda t: bool(t.key) or t.operator == TolerationOperator.EXISTS,
            message="operator must be Exists when key is empty",
            field="operator",
        ),
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            holds=lambda t: t.operator != TolerationOperator.EXISTS or not t.value,
            message="value must be empty when operator is Exists",
            field="value",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            holds=lambda t: t.toleration_seconds is None or t.effect == TaintEffect.NO_EXECUTE,
            message="effect must be NoExecute when tolerationSeconds is set",
            field="effect",
        ),
    )


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


_WITH_VALUES = "self.operator in ['In', 'NotIn'] ? self.values.size() > 0 : self.operator in ['Exists', 'DoesNotExist'] ? self.values.size() == 0 : "


def _values_fit(r: Any) -> bool:
    if r.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN):
        return len(r.values) > 0
    if r.operator in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST):
        return not r.values
    return len(r.values) == 1 and re.fullmatch(r"^-?[0-9]+$", r.values[0]) is not None


class Requirement(ApiModel):
    """A label compared with values (the shape of node and label selectors' requirements)."""

    key: str = Field(max_length=317, pattern=QUALIFIED_NAME, description="The label key.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists, DoesNotExist; for nodes also Gt and Lt.")
    values: list[LabelValue] = Field(default_factory=list, max_length=64, description="Values to compare with.")


class NodeSelectorRequirement(Requirement):
    """A node label compared with values."""

    rules = (
        Rule(
            cel=_WITH_VALUES + "self.values.size() == 1 && self.values[0].matches(r'^-?[0-9]+$')",
            holds=_values_fit,
            message="values must be non-empty for In and NotIn, empty for Exists and DoesNotExist, "
            "and one integer for Gt and Lt",
            field="values",
        ),
    )


class NodeSelectorTerm(ApiModel):
    """Requirements that must all hold (at least one given)."""

    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Requirements on node labels."
    )

    rules = (
        Rule(cel="self.matchExpressions.size() > 0", holds=lambda t: bool(t.match_expressions),
             message="a term needs at least one requirement", field="matchExpressions"),
    )


class NodeSelector(ApiModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=16, description="Terms of which at least one must hold."
    )


class PreferredSchedulingTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="Weight in the scheduler's score, 1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred node term.")


class NodeAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="Nodes the pods must land on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16, description="Nodes the pods prefer."
    )


class LabelSelectorRequirement(Requirement):
    """A pod or namespace label compared with values."""

    rules = (
        Rule(
            cel=_WITH_VALUES + "false",
            holds=lambda r: r.operator not in (SelectorOperator.GT, SelectorOperator.LT) and _values_fit(r),
            message="operator must be In, NotIn, Exists or DoesNotExist; values non-empty for In and NotIn, "
            "empty otherwise",
            field="values",
        ),
    )


class LabelSelector(ApiModel):
    """Pods (or namespaces) by their labels; an empty selector matches all."""

    match_labels: LabelMap = Field(default_factory=dict, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Requirements that must all hold."
    )


class PodAffinityTerm(ApiModel):
    """Pods near (or away from) which the trainer pods run, per topology domain."""

    label_selector: LabelSelector | None = Field(None, description="The other pods.")
    namespace_selector: LabelSelector | None = Field(None, description="Namespaces of the other pods.")
    namespaces: list[LabelName] = Field(default_factory=list, max_length=64, description="Namespaces of the other pods.")
    topology_key: str = Field(
        min_length=1, max_length=317, pattern=QUALIFIED_NAME, description="Node label defining the domain, e.g. kubernetes.io/hostname."
    )


class WeightedPodAffinityTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="Weight in the scheduler's score, 1-100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The preferred term.")


class PodAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=16, description="Terms that must hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=16, description="Terms that are preferred."
    )


class Affinity(ApiModel):
    """A core/v1 Affinity of the trainer pods."""

    node_affinity: NodeAffinity | None = Field(None, description="Which nodes.")
    pod_affinity: PodAffinity | None = Field(None, description="Near which pods.")
    pod_anti_affinity: PodAffinity | None = Field(None, description="Away from which pods.")


class LocalObjectReference(ApiModel):
    name: Name = Field(description="Name of an object in the job's namespace.")
