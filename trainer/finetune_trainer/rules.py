"""Cross-field rules written once, checked twice: by pydantic here and by the apiserver.

Each `Rule` carries a CEL expression (emitted into the CRD as `x-kubernetes-validations`)
and the same predicate in Python, so `kubectl apply` and `finetune-trainer run` reject the
same manifests with the same message, naming the same field.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Rule:
    cel: str  # `self` is the object the rule is attached to
    holds: Callable[[Any], bool]
    message: str
    field: str = ""  # camelCase path below the object that the error names

    def to_crd(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = "." + self.field
        return out


class RuleViolation(ValueError):
    def __init__(self, rule: Rule) -> None:
        super().__init__(rule.message)
        self.field = rule.field


def _schema_extra(schema: dict[str, Any], cls: type[ApiModel]) -> None:
    """Add what pydantic leaves out of the JSON schema: our CEL rules, and defaults made by factories."""
    if cls.rules or cls.transition_rules:
        schema["x-kubernetes-validations"] = [r.to_crd() for r in cls.rules] + list(cls.transition_rules)
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        value = field.default_factory()  # type: ignore[call-arg]
        # Spelled out in full: the apiserver checks a default against the CEL rules as it stands.
        default = value.to_wire() if isinstance(value, ApiModel) else TypeAdapter(Any).dump_python(value, mode="json")
        schema["properties"][field.alias or name]["default"] = default


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        json_schema_extra=_schema_extra,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()
    # CEL over `self` and `oldSelf`, checked by the apiserver on updates (only it sees the old object).
    transition_rules: ClassVar[tuple[dict[str, str], ...]] = ()

    @classmethod
    @functools.cache
    def _wire_fields(cls) -> dict[str, FieldInfo]:
        """The fields by their wire (camelCase) and Python names, built once per class: both before-validators read
        it for every object parsed (30 times for a FineTuneJob's spec)."""
        return {f.alias or name: f for name, f in cls.model_fields.items()} | cls.model_fields

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        """The apiserver prunes a null (no field is nullable, nor any map value) and then applies the
        default: so do we. A null under an unknown name stays, to be refused as the apiserver refuses it;
        so does one in a field that keeps unknown fields (model.config)."""
        if not isinstance(data, dict):
            return data
        fields = cls._wire_fields()
        pruned = {}
        for key, value in data.items():
            field = fields.get(key)
            if field is not None and value is None:
                continue
            if field is not None and isinstance(value, dict) and get_origin(field.annotation) is dict \
                    and not (field.json_schema_extra or {}).get("x-kubernetes-preserve-unknown-fields"):
                value = {k: v for k, v in value.items() if v is not None}
            pruned[key] = value
        return pruned

    @model_validator(mode="before")
    @classmethod
    def _whole_floats_are_integers(cls, data: Any) -> Any:
        """The apiserver's schema validation takes a whole float below 2^53 (1.0, 1e3) for an integer field, which
        kubectl sends as 1 anyway; other clients send 1.0. An int-or-string field stays strict: its CEL rules refuse
        a float."""
        if not isinstance(data, dict):
            return data
        fields = cls._wire_fields()
        return {key: int(value) if isinstance(value, float) and value.is_integer() and abs(value) <= JSON_INTEGER
                and key in fields and _is_integer(fields[key].annotation) else value for key, value in data.items()}

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in self.rules:
            if not rule.holds(self):
                raise RuleViolation(rule)
        return self

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        """Validate a manifest's JSON as the apiserver does: no coercion of "32" to 32 or "yes" to true. What JSON cannot
        carry (NaN, infinity, YAML's sets and binary) is a ValueError, as kubectl refuses to send it."""
        try:
            text = json.dumps(_as_decoded(doc), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not JSON, so kubectl cannot send it: {exc}") from exc
        return cls.model_validate_json(text, strict=True)

    def to_wire(self, defaults: bool = True) -> dict[str, Any]:
        """The JSON form used in manifests and ConfigMaps (camelCase, no unset optionals); without `defaults`, only
        the values that differ from their field's default (one set to its default is left out as well)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=not defaults)


INT64 = range(-(2**63), 2**63)
JSON_INTEGER = 2**53 - 1  # the largest whole float the apiserver's schema takes for an integer (go-openapi's)


def _is_integer(annotation: Any) -> bool:
    """`int` or `int | None`."""
    if get_origin(annotation) in (Union, UnionType):
        return set(get_args(annotation)) == {int, NoneType}
    return annotation is int


def _as_decoded(value: Any) -> Any:
    """Numbers as the apiserver's JSON decoder reads them: an integer beyond int64 becomes a float."""
    if isinstance(value, dict):
        return {k: _as_decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_decoded(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        return float(value)
    return value


@dataclass(frozen=True)
class _InCrd:
    """Adds its rule to the value's `x-kubernetes-validations`, after any other `checked` rule on the same type
    (a `Field(json_schema_extra=...)` per rule would keep only the last)."""

    rule: Rule

    def __get_pydantic_json_schema__(self, schema: Any, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        out = handler(schema)
        out.setdefault("x-kubernetes-validations", []).append(self.rule.to_crd())
        return out


def checked(cel: str, holds: Callable[[Any], bool], message: str) -> tuple[Any, Any]:
    """`Annotated` metadata for a rule on a single value (a string, a map): CEL for the CRD, Python here.

    Use as `Annotated[str, *checked(...)]`, as often as the value has rules.
    """
    rule = Rule(cel, holds, message)

    def check(value: Any) -> Any:
        if not holds(value):
            raise RuleViolation(rule)
        return value

    return AfterValidator(check), _InCrd(rule)


def transition(cel: str, message: str, field: str) -> dict[str, str]:
    """A CEL transition rule (it reads `oldSelf`) for an object's `transition_rules`."""
    return {"rule": cel, "message": message, "fieldPath": "." + field}


def immutable(name: str) -> dict[str, Any]:
    """Schema extra for a field that may not change once the job exists."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{name} is immutable"}]}


# pydantic puts the union member it tried into `loc` ("int", "literal['auto']"); a manifest has no such key.
_UNION_TAG = re.compile(r"^(int|str|float|bool|none|constrained-\w+)$|[\[(]")


def error_lines(exc: ValidationError, root: str = "") -> list[str]:
    """One `path.to.field: message` line per error, with paths as a manifest spells them."""
    lines = []
    for err in exc.errors():
        path = root
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"  # as kubectl spells list items
            elif not _UNION_TAG.search(part):
                path = f"{path}.{part}" if path else part
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolation):
            path = ".".join(filter(None, [path, cause.field]))
            message = str(cause)
        else:
            message = err["msg"]
        lines.append(f"{path}: {message}")
    return list(dict.fromkeys(lines))
