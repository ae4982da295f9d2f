"""The generated CRD: up to date, structural, documented, and defaulting as the models do."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from finetune_operator import api, apidoc, crd, generate

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for name, prop in node.get("properties", {}).items():
            yield from walk(prop, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}.*")


def test_generated_files_match_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert generate.main(["--check"]) == 0, "run `make crds`"
    assert all(yaml.safe_load(p.read_text()) == crd.build_crd() for p in crd.CRD_PATHS)


def test_check_notices_a_hand_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in generate.generated():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((REPO / path).read_text())
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--check"]) == 0
    edited = crd.CRD_PATHS[1]
    edited.write_text(edited.read_text().replace("maxLength: 1024", "maxLength: 2048", 1))
    assert generate.main(["--check"]) == 1


def test_api_reference_lists_every_spec_field(schema: dict[str, Any]) -> None:
    reference = apidoc.render_reference(schema)
    for path, _ in walk(schema["properties"]["spec"], "spec"):
        if not path.endswith((".*", "[]")):
            assert f"`{path}`" in reference, path


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "const", "title"} & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("type") == "object" and "properties" not in node:
            assert "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields") or path in (
                ".metadata",
            ), path


def test_every_field_is_documented(schema: dict[str, Any]) -> None:
    undocumented = [p for p, n in walk(schema) if p and not p.endswith(("[]", ".*")) and not n.get("description")]
    assert undocumented == [".metadata"]


def test_names_columns_and_subresources(schema: dict[str, Any]) -> None:
    spec = crd.build_crd()["spec"]
    assert spec["group"] == "finetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["plural"] == "finetunejobs"
    assert spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Phase", "Stage", "Progress", "Workers", "Attempts", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Loss", "Eval", "Reason"]
    assert {c["name"]: (c["jsonPath"], c["type"]) for c in columns} == {
        "Phase": (".status.phase", "string"), "Stage": (".status.stage", "string"),
        "Progress": (".status.progress.percent", "integer"), "Workers": (".status.workers.active", "integer"),
        "Attempts": (".status.attempts", "integer"), "Age": (".metadata.creationTimestamp", "date"),
        "Loss": (".status.metrics.loss", "number"), "Eval": (".status.evaluation.summary", "string"),
        "Reason": (".status.reason", "string")}
    # A column whose path names no field of the status shows an empty column, and kubectl never says why.
    fields = dict(walk(schema))
    assert all(fields[c["jsonPath"]]["type"] == c["type"] for c in columns if c["name"] != "Age")


def test_the_condition_types_description_names_every_type(schema: dict[str, Any]) -> None:
    """`kubectl explain ftj.status.conditions.type` left out MetricsStale, which the operator sets."""
    condition = schema["properties"]["status"]["properties"]["conditions"]["items"]["properties"]["type"]
    assert [t for t in api.ConditionType if not re.search(rf"\b{t}\b", condition["description"])] == []


def test_cel_rules_cover_cross_field_constraints_and_immutability(schema: dict[str, Any]) -> None:
    rules = {p: [r["rule"] for r in n.get("x-kubernetes-validations", [])] for p, n in walk(schema)}
    assert any("has(self.count)" in r for r in rules[".spec.adjust.freeze"])
    assert any("has(self.pattern)" in r for r in rules[".spec.adjust.freeze"])
    assert any("causal-lm" in r for r in rules[".spec"])
    for section in ("model", "dataset", "output"):
        assert "self == oldSelf" in rules[f".spec.{section}"]
    assert "has(self.uri) || has(self.architecture)" in rules[".spec.model"]  # kept beside immutability
    assert any("type(self) == int" in r for r in rules[".spec.rearrange.head.numLabels"])
    assert any("metadata.name" in r for r in rules[""])
    # While a job runs, only suspend, the deadline, the TTL (and metadata) may change.
    for section in api.SUSPENDED_ONLY:
        assert f"oldSelf.suspend || self.{section} == oldSelf.{section}" in rules[".spec"]


def test_the_name_rule_refuses_what_a_service_name_cannot_be(schema: dict[str, Any]) -> None:
    rule = next(r["rule"] for r in schema["x-kubernetes-validations"] if "matches" in r["rule"])
    found = re.search(r"matches\(r'(.*)'\)", rule)
    assert found
    pattern = found.group(1)
    dns_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # the apiserver's rule for Service names
    # a Service name is one DNS label: no dot, no capital or underscore, no hyphen at either end
    for name in ("7b-llama-sft", "llama-7b", "a", "0", "x-1", "x-", "-x", "a.b", "llama-7b.v2", "Ab", "a_b"):
        assert bool(re.fullmatch(pattern, name)) == bool(re.fullmatch(dns_1035, name)), name


def test_no_field_is_nullable(schema: dict[str, Any]) -> None:
    """Optional fields are left out, never null: a null would be pruned anyway, and nullable invites two meanings."""
    assert not [p for p, n in walk(schema) if n.get("nullable")]


def _apply_defaults(node: dict[str, Any], obj: Any) -> Any:
    """The apiserver's structural defaulting: fill absent properties, then recurse."""
    if not isinstance(obj, dict):
        return obj
    for name, prop in node.get("properties", {}).items():
        if name not in obj and "default" in prop:
            obj[name] = copy.deepcopy(prop["default"])
        if name in obj:
            obj[name] = _apply_defaults(prop, obj[name])
    return obj


def test_apiserver_defaults_equal_pydantic_defaults(schema: dict[str, Any]) -> None:
    minimal = {
        "model": {"uri": "pvc://models/m", "task": "sequence-classification"},
        "dataset": {"uri": "pvc://data/d.csv"},
        "output": {"uri": "pvc://models/out"},
        "rearrange": {"lora": {}},
        "training": {"earlyStopping": {}},
    }
    defaulted = _apply_defaults(schema["properties"]["spec"], copy.deepcopy(minimal))
    assert defaulted == api.FineTuneJob.from_wire({"spec": minimal}).spec.to_wire()


def test_status_schema_has_no_defaults(schema: dict[str, Any]) -> None:
    assert not [p for p, n in walk(schema["properties"]["status"]) if "default" in n]
