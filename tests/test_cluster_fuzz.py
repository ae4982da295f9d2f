"""The fuzzed API: manifests mutated around the valid ones (fields removed, retyped, resized, renamed,
added from the schema), each judged by `finetune-operator validate`'s rules and by the real
apiserver (a server-side dry-run create). They must agree on every one: both accept, or both
refuse naming the same fields. Every disagreement found is kept: refusals in tests/bad_manifests/,
acceptances in ACCEPTED_EDGES below, and the harness's own misreadings in HARNESS_EDGES.

The default run checks a fixed, derandomized set of FUZZ_EXAMPLES manifests; `-m long` runs
LONG_EXAMPLES more.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_operator.api import manifest_errors
from finetune_operator.crd import build_crd
from kube import Kube
from operator_fixture import crd_installed  # noqa: F401 (fixture)
from seeds import seed_manifests

pytestmark = pytest.mark.cluster

FUZZ_EXAMPLES = 500
LONG_EXAMPLES = 5000
SEEDS = seed_manifests()
SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]



def _edge(changes: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(SEEDS[0])
    doc["spec"] |= changes
    doc["metadata"] |= meta or {}
    return doc


# Manifests validate refused and the apiserver accepted, found by the fuzzer: both must accept them.
ACCEPTED_EDGES: list[dict[str, Any]] = [
    # null means absent: pruned, then defaulted (validate refused a null where a default applies)
    _edge({"training": None, "backoffLimit": None, "runtime": None}),
    # a null map value is pruned too
    _edge({"runtime": {"resources": {"limits": {"cpu": None, "memory": "4Gi"}}}}, {"labels": {"team": None}}),
    # 1E is an exa, not an exponent without digits (validate crashed on int(""))
    _edge({"runtime": {"shmSize": "1E"}}),
    # RE2's \S is ASCII: a no-break space is not white to the apiserver (it was to pydantic's regex)
    _edge({"runtime": {"image": "registry.example/trainer:1\u00a0"}}),
    # a whole float is an integer to the apiserver's schema (validate refused it; the long run)
    _edge({"training": {"epochs": 1.0, "batchSize": 1e1}, "backoffLimit": 3.0}),
]

# Manifests both refuse alike that this harness misread (found by the long run): each must be judged to agree.
HARNESS_EDGES: list[dict[str, Any]] = [
    # a map's keys "" and "0": the apiserver's paths are limits[] and limits[0], validate's limits. and limits.0
    _edge({"runtime": {"resources": {"limits": {"": "8\n"}}}}),
    _edge({"runtime": {"resources": {"limits": {"0": "8\n"}}}}),
    # a list over its length whose items miss a required field: the apiserver names the items too, and skips the
    # CEL rules
    _edge({"pod": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}] * 17}}}}),
]


# ---- the two judges -----------------------------------------------------------------


def _field_of(line: str) -> str:
    """The field a `validate` line names (`spec.x.y: message`, or `metadata.name must be ...`)."""
    return "metadata.name" if line.startswith("metadata.name ") else line.split(": ", 1)[0]


def validator_fields(doc: dict[str, Any]) -> set[str]:
    return {_normal(_field_of(line)) for line in manifest_errors(doc)}


def _normal(field: str) -> str:
    """One spelling for a field path, every step after a dot. The apiserver writes list items and map keys alike,
    `[0]` for item 0 and for key "0" (`[]` for the empty key); validate writes items as `[0]` and keys as `.0`."""
    return re.sub(r"\[([^\]]*)\]", r".\1", field)


def test_a_field_path_has_one_spelling() -> None:
    assert _normal("spec.runtime.env[0].name") == _normal("spec.runtime.env.0.name")
    assert _normal("spec.runtime.resources.limits[nvidia.com/gpu]") == "spec.runtime.resources.limits.nvidia.com/gpu"
    # the apiserver's paths of the map keys "" and "0", where validate says `limits.` and `limits.0` (the long run)
    assert _normal("spec.runtime.resources.limits[]") == "spec.runtime.resources.limits."
    assert _normal("spec.runtime.resources.limits[0]") == "spec.runtime.resources.limits.0"


class Verdict(NamedTuple):
    fields: dict[str, str]  # each field named, with what was said of it; empty when accepted
    decoded: bool  # False: refused while decoding (unknown fields, wrong types in metadata), before any validation
    complete: bool  # False: the apiserver skipped some rules because of other errors
    message: str


def apiserver_verdict(client: Any, namespace: str, doc: dict[str, Any]) -> Verdict:
    """What the apiserver says to a server-side dry-run create of `doc`."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    try:
        CustomObjectsApi(client).create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", namespace, "finetunejobs", doc, dry_run="All",
            field_validation="Strict",  # as kubectl apply sends it: an unknown field is an error
            _request_timeout=60)
    except ApiException as exc:
        status = json.loads(exc.body or "{}")
        message = status.get("message", exc.reason)
        if exc.status == 400:  # not decoded: the message names the fields
            named = [_normal(f) for f in re.findall(r'unknown field "([^"]+)"', message)]
            named += [f"metadata.{f.lower()}" for f in re.findall(r"Go struct field ObjectMeta\.(?:metadata\.)?(\w+)", message)]
            return Verdict(dict.fromkeys(named or ["?"], message), False, False, message)
        causes = (status.get("details") or {}).get("causes") or []
        skipped = [c for c in causes if "some validation rules were not checked" in c.get("message", "")]
        fields: dict[str, str] = {}
        for cause in causes:
            field, said = cause.get("field") or "<nil>", cause.get("message", "")
            if field == "<nil>" and "metadata.name" in said:  # the name's rule is on the whole object
                field = "metadata.name"
            if field != "<nil>":
                fields[_normal(field)] = fields.get(_normal(field), "") + said
        return Verdict(fields or {"?": message}, True, not skipped, message)
    return Verdict({}, True, True, "")


def _rule_messages(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        yield from (rule["message"] for rule in node.get("x-kubernetes-validations", []))
        for child in node.values():
            yield from _rule_messages(child)


RULE_MESSAGES = set(_rule_messages(SCHEMA))


def _beneath(field: str, other: str) -> bool:
    return other.startswith(field + ".") or other.startswith(field + "[")


def disagreement(client: Any, namespace: str, doc: dict[str, Any]) -> str | None:
    """Why the two judge `doc` differently, or None when they agree: both accept, or both refuse
    naming the same fields, where the apiserver's two stages allow for three differences:

    - a manifest it cannot decode is refused for the undecodable fields alone (validate may name more);
    - when some fields are refused it skips the CEL rules (validate may name the fields of those rules);
    - CEL rules still run when a field of their object is refused (pydantic's rules do not), so
      beside a field both name it may name one that a rule names;
    - it checks the items of a list that is too long (pydantic reports the length alone), so it may
      name items of a list both refuse for its length.
    """
    ours, theirs = validator_fields(doc), apiserver_verdict(client, namespace, doc)
    named = set(theirs.fields)
    too_long = {_normal(_field_of(line)) for line in manifest_errors(doc) if "should have at most" in line}
    if bool(ours) != bool(named):
        agree = False
    elif not theirs.decoded:  # an unknown field below a field of the wrong type is that field's fault
        agree = all(f in ours or any(_beneath(o, f) for o in ours) for f in named)
    elif not theirs.complete:
        agree = all(f in ours or any(_beneath(o, f) for o in ours & too_long) for f in named)
    else:
        common = ours & named
        extra = {f for f in named - ours
                 if not (common and (any(_beneath(f, o) for o in common)
                                     or any(m in theirs.fields[f] for m in RULE_MESSAGES)
                                     or any(_beneath(o, f) for o in common & too_long)))}
        agree = ours <= named and not extra
    if agree:
        return None
    return (f"validate names {sorted(ours) or 'nothing (accepts)'}, the apiserver "
            f"{sorted(named) or 'nothing (accepts)'}\napiserver: {theirs.message}"
            f"\nvalidate: {manifest_errors(doc)}\nmanifest: {json.dumps(doc)}")


# ---- mutations ----------------------------------------------------------------------

HOSTILE_STRINGS = ["", " ", "a b", "A", "-a", "a-", "a.b", "a/b", "a_b", "..", "/", "/etc/passwd", "../x", "0",
                   "1.5", "-1", "500m", "32Gi", "1e3", "auto", "true", "null", "Exists", "pvc://", "pvc://x/../y",
                   "hf://ü/x", "hf://org/ná", "file:///tmp/x", "é", "日本語", "😀", "\u0000", "a\nb", "$(HOME)",
                   "finetune-x", "finetune.dev/x", "abc\n", "a\u00a0b", "a\u2028", "kubernetes.io/x", "x" * 63, "x" * 64, "y" * 253, "y" * 254]
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False, allow_infinity=False),
                        st.sampled_from(HOSTILE_STRINGS),
                        # built afresh each time: a later mutation may change them in place
                        st.builds(list), st.builds(dict), st.builds(lambda: ["x"]), st.builds(lambda: {"x": "y"}))


def schema_at(path: list[Any]) -> dict[str, Any]:
    """The CRD schema of the node at `path` (below the manifest's root); {} where the schema is open."""
    node = SCHEMA
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part) or (node.get("additionalProperties") or {})
            if node.get("x-kubernetes-preserve-unknown-fields"):
                return {}
    return node


def _boundaries(node: dict[str, Any], integer: bool) -> list[Any]:
    found: list[Any] = [0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63]
    for key in ("minimum", "maximum"):
        if key in node:
            edge = node[key]
            found += [edge - 1, edge, edge + 1] if integer else [edge, edge / 2, edge * 2, edge + 1e-9, edge - 1e-9]
    return found


@st.composite
def value_for(draw: st.DrawFn, node: dict[str, Any], depth: int = 0) -> Any:
    """A value the schema's type admits, near its bounds (often outside them)."""
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        return draw(st.one_of(st.integers(-3, 2**63), st.sampled_from(["8", "500m", "32Gi", "1.5", "-1", "1e3", "2Ki", "x",
                                                                       "0.5", "+1", ".5", "1E", "100000000000000Ei",
                                                                       "1e999999999", "9223372036854775808", "1n", "8\n"])))
    if "enum" in node:
        return draw(st.one_of(st.sampled_from(node["enum"]), st.sampled_from([str(v).upper() for v in node["enum"]])))
    if kind == "integer":
        return draw(st.one_of(st.sampled_from(_boundaries(node, True)), st.integers(-1000, 10**6)))
    if kind == "number":
        return draw(st.one_of(st.sampled_from(_boundaries(node, False)), st.floats(-10, 10**4, allow_nan=False),
                              st.integers(-5, 5)))
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "string":
        limit = node.get("maxLength", 300)
        candidates = [st.sampled_from(HOSTILE_STRINGS), st.text(max_size=8)]
        if "pattern" in node:
            candidates.append(st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) <= limit + 1))
        text = draw(st.one_of(*candidates))
        if draw(st.booleans()) and text:  # at the length bound, or just past it
            text = (text * (limit // len(text) + 2))[: limit + draw(st.sampled_from([0, 1]))]
        return text
    if kind == "array":
        if depth > 2:
            return []
        return draw(st.lists(value_for(node.get("items", {}), depth + 1), max_size=2))
    if kind == "object":
        if depth > 2:
            return {}
        props = node.get("properties", {})
        if props:
            names = draw(st.lists(st.sampled_from(sorted(props)), max_size=3, unique=True))
            return {n: draw(value_for(props[n], depth + 1)) for n in names}
        values = node.get("additionalProperties") or {"type": "string"}
        keys = st.one_of(st.sampled_from(HOSTILE_STRINGS[:30]), st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?", fullmatch=True))
        return draw(st.dictionaries(keys, value_for(values, depth + 1), max_size=2))
    return draw(WRONG_TYPES)


def _nodes(value: Any, path: list[Any]) -> Iterator[list[Any]]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, [*path, key])
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _nodes(child, [*path, i])


def _get(doc: Any, path: list[Any]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


@st.composite
def mutate(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    """One change somewhere under spec, or to the name and labels."""
    paths = [p for p in _nodes(doc, []) if p[:1] == ["spec"] or p[:2] in (["metadata", "name"], ["metadata", "labels"])]
    path = draw(st.sampled_from(paths))
    target = _get(doc, path)
    how = draw(st.sampled_from(["delete", "retype", "schema", "schema", "add", "add", "unknown", "grow"]))
    if how == "delete" and len(path) > 1:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
    elif how == "retype" and path:
        _get(doc, path[:-1])[path[-1]] = draw(WRONG_TYPES)
    elif how == "schema" and path:
        _get(doc, path[:-1])[path[-1]] = draw(value_for(schema_at(path)))
    elif how == "add" and isinstance(target, dict):
        props = schema_at(path).get("properties", {})
        missing = sorted(set(props) - set(target))
        if missing:
            name = draw(st.sampled_from(missing))
            target[name] = draw(value_for(props[name]))
    elif how == "unknown" and isinstance(target, dict) and path[:2] != ["spec", "model"]:
        target[draw(st.sampled_from(["extra", "hostPath", "privileged", "securityContext", "hostNetwork"]))] = \
            draw(WRONG_TYPES)
    elif how == "grow" and isinstance(target, list) and target:
        target.extend(copy.deepcopy(target[:1]) * draw(st.sampled_from([1, 16, 64])))


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        draw(mutate(doc))
    return doc


# ---- the tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_client(kube: Kube, crd_installed: None) -> Iterator[Any]:
    from kubernetes import config

    client = config.new_client_from_config(str(kube.kubeconfig))
    yield client
    client.close()


def test_every_seed_is_accepted_by_both(api_client: Any, module_namespace: str) -> None:
    for doc in SEEDS + ACCEPTED_EDGES:
        assert not validator_fields(doc) and not apiserver_verdict(api_client, module_namespace, doc).fields, doc


def test_every_harness_edge_is_judged_alike(api_client: Any, module_namespace: str) -> None:
    for doc in HARNESS_EDGES:
        assert disagreement(api_client, module_namespace, doc) is None


FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@FUZZ
@given(doc=manifests())
def test_validate_and_the_apiserver_agree(api_client: Any, module_namespace: str, doc: dict[str, Any]) -> None:
    problem = disagreement(api_client, module_namespace, doc)
    assert problem is None, problem


@pytest.mark.long
@pytest.mark.timeout(3600)  # 5,000 dry runs: minutes on a quiet machine, more than the default 900 s on a busy one
@settings(FUZZ, max_examples=LONG_EXAMPLES, derandomize=False)
@given(doc=manifests())
def test_validate_and_the_apiserver_agree_long(api_client: Any, module_namespace: str, doc: dict[str, Any]) -> None:
    problem = disagreement(api_client, module_namespace, doc)
    assert problem is None, problem
