"""The API models: examples validate, every bad manifest is refused naming its field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bad_corpus import BadCase, load_bad_corpus, readme_manifests
from finetune_operator.api import LENGTH_MESSAGE, NAME_MESSAGE, FineTuneJob, manifest_errors
from finetune_trainer.config import TrainerConfig

EXAMPLES = sorted((Path(__file__).parents[1] / "deploy" / "examples").glob("*.yaml"))
CRD = Path(__file__).parents[1] / "deploy" / "crds" / "finetune.dev_finetunejobs.yaml"
CORPUS = load_bad_corpus()


def test_there_are_examples_and_a_corpus() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "minilm-sentiment.yaml",
        "digits-resnet18-from-scratch.yaml",
        "tiny-causal-lm.yaml",
        "minilm-sentiment-2workers.yaml",
        "minilm-sentiment-pruned.yaml",
    }
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert manifest_errors(doc) == []
    # The trainer reads the same manifest (its runtime fields are ignored).
    assert TrainerConfig.from_document(doc).output.uri.startswith("pvc://")


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_bad_manifest_is_refused_naming_its_field(case: BadCase) -> None:
    errors = manifest_errors(case.manifest)
    assert errors, f"{case.name} was accepted ({case.why})"
    # Each case breaks one thing, so every error must be about that field.
    stray = [e for e in errors if not case.names_field(e)]
    assert not stray, f"{case.name}: errors that do not name {case.field}: {stray}"


@pytest.mark.parametrize(("example", "metrics"), [("tiny-causal-lm", ["loss", "perplexity"]),
                                                  ("shapes-fasterrcnn", ["map", "map50"])])
def test_a_job_that_names_no_metrics_is_scored_by_its_tasks(example: str, metrics: list[str]) -> None:
    """The default was accuracy and f1 for every task, in the CRD too: a causal-lm or object-detection job without
    evaluation.metrics was refused for metrics its author never wrote."""
    doc = yaml.safe_load((EXAMPLES[0].parent / f"{example}.yaml").read_text())
    del doc["spec"]["evaluation"]["metrics"]
    assert FineTuneJob.from_wire(doc).spec.evaluation_metrics == metrics
    default = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"]["properties"]["evaluation"]
    assert "metrics" not in default.get("default", {}) and "default" not in default["properties"]["metrics"]


def test_defaults_are_what_a_user_would_pick() -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    spec = FineTuneJob.from_wire({"spec": {k: doc["spec"][k] for k in ("model", "dataset", "output")}}).spec
    assert spec.training.epochs == 1 and spec.training.batch_size == 32
    assert spec.training.precision == "auto" and spec.training.batching == "length-bucketed"
    assert spec.adjust.learning_rate == 5e-5 and spec.adjust.freeze.strategy == "none"
    assert spec.rearrange.lora is None and spec.rearrange.head.num_labels == "auto"
    assert spec.evaluation.metrics is None and spec.evaluation_metrics == ["accuracy", "f1"] and spec.evaluation.baseline
    assert spec.runtime.workers == 1 and spec.runtime.processes_per_worker == 1
    assert spec.runtime.resources is None and spec.runtime.image is None  # the operator's configured defaults
    assert spec.backoff_limit == 3 and not spec.suspend
    # Nothing is deleted unless asked (as batch/v1 Job), and no deadline is imposed.
    assert spec.ttl_seconds_after_finished is None and spec.active_deadline_seconds is None


def test_wire_round_trip_keeps_camel_case() -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    wire = FineTuneJob.from_wire(doc).spec.to_wire()
    assert wire["dataset"]["textField"] == "text"
    assert wire["runtime"]["resources"]["limits"]["cpu"] == "2"
    assert FineTuneJob.from_wire({"spec": wire}).spec.to_wire() == wire


def test_validate_command_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_operator.__main__ import main

    bad = next(c for c in CORPUS if c.field == "spec.adjust.freeze.count")
    assert main(["validate", str(EXAMPLES[0])]) == 0
    assert main(["validate", str(Path(__file__).parent / "bad_manifests" / f"{bad.name}.yaml")]) == 1
    assert "spec.adjust.freeze.count: count is required" in capsys.readouterr().err


def test_null_means_absent() -> None:
    """The apiserver prunes a null (no field is nullable), so null must mean what leaving it out means."""
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["ttlSecondsAfterFinished"] = None
    doc["spec"]["rearrange"]["lora"] = None
    assert manifest_errors(doc) == []
    spec = FineTuneJob.from_wire(doc).spec
    assert spec.ttl_seconds_after_finished is None and spec.rearrange.lora is None


def test_validate_takes_multi_document_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_operator.__main__ import main

    good = EXAMPLES[0].read_text()
    bad = (Path(__file__).parent / "bad_manifests" / f"{CORPUS[0].name}.yaml").read_text()
    path = tmp_path / "jobs.yaml"
    path.write_text("---\n" + good + "\n---\n# nothing here\n---\n" + bad + "\n---\n")
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.count(": valid") == 1 and err.count(": invalid") == 1
    path.write_text(good + "\n---\n\n---\n" + good)
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    path.write_text("# a manifest to come\n---\n")  # said nothing and exited 0, where kubectl apply fails
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}: no objects in it\n"


def test_the_readme_multi_node_example_is_valid() -> None:
    docs = readme_manifests()
    assert docs and any(d["spec"]["runtime"]["workers"] > 1 for d in docs)
    for doc in docs:
        assert manifest_errors(doc) == []


def test_a_name_must_start_with_a_letter_as_its_service_name_must(tmp_path: Path) -> None:
    from finetune_operator.__main__ import main

    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["metadata"]["name"] = "7b-llama-sft"  # its 2-worker attempts' Service, 7b-llama-sft-1, would be refused
    errors = manifest_errors(doc)
    assert errors and all(e.startswith("metadata.name") for e in errors)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    doc["metadata"]["name"] = "llama-7b-sft"
    assert manifest_errors(doc) == []


def test_validate_reads_yaml_as_kubectl_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """kubectl's YAML (go-yaml v2) makes 5e-5 a number, y a boolean and a date text; PyYAML makes the first a string,
    the second a string and the third a date, so its reading refused (or let through) what the apiserver does not."""
    from finetune_operator.__main__ import main

    text = (EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text()
    text = text.replace("metadata:\n", "metadata:\n  annotations: {reviewed: 2024-05-01}\n", 1)
    path = tmp_path / "job.yaml"
    path.write_text(re.sub(r"learningRate: .*", "learningRate: 5e-5", text))
    assert main(["validate", str(path)]) == 0
    assert TrainerConfig.from_file(path).adjust.learning_rate == 5e-5
    path.write_text(re.sub(r"labelField: .*", "labelField: y", text))  # a column named y is `true` to kubectl
    assert main(["validate", str(path)]) == 1
    assert "spec.dataset.labelField: Input should be a valid string" in capsys.readouterr().err


def test_a_repeated_key_is_refused_naming_it_and_its_lines(tmp_path: Path) -> None:
    """PyYAML kept a repeated key's last value: a second adjust: block dropped the first's freeze without a word.
    kubectl refuses it ("mapping key already defined"), and so does the trainer; a merge key's keys may be overridden."""
    from finetune_trainer.config import KubectlLoader

    path = tmp_path / "job.yaml"
    path.write_text("model: {task: sequence-classification, uri: pvc://models/m}\ndataset: {uri: pvc://data/s.csv}\n"
                    "adjust:\n  freeze: {strategy: all-but-head}\noutput: {uri: /tmp/o}\nadjust:\n  learningRate: 1e-4\n")
    with pytest.raises(yaml.YAMLError, match=r"(?s)the key 'adjust' again \(first on line 3\).*line 6"):
        TrainerConfig.from_file(path)
    with pytest.raises(yaml.YAMLError, match="the key 'a' again"):
        yaml.load("x: {a: 1, b: 2, a: 3}", Loader=KubectlLoader)
    assert yaml.load("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n", Loader=KubectlLoader)["x"] == {"a": 3, "b": 2}


def test_the_trainer_runs_the_one_job_of_a_file_that_holds_its_claims_too(tmp_path: Path) -> None:
    """`kubectl apply -f job.yaml` takes a job with its claims in one file; `finetune-trainer run job.yaml` refused
    it with PyYAML's "expected a single document in the stream"."""
    job = (EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text()
    claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: models}\nspec: {}\n"
    path = tmp_path / "job.yaml"
    path.write_text(f"{claim}---\n{job}---\n")
    assert TrainerConfig.from_file(path) == TrainerConfig.from_document(yaml.safe_load(job))
    path.write_text(f"{job}---\n{job}")
    with pytest.raises(ValueError, match="2 documents with 2 FineTuneJobs in it: the trainer runs one"):
        TrainerConfig.from_file(path)
    path.write_text("")
    with pytest.raises(ValueError, match="a config is a mapping"):
        TrainerConfig.from_file(path)


def test_the_trainer_refuses_a_misspelt_spec_field_of_a_job_and_skips_only_the_operators_own() -> None:
    """`finetune-trainer run job.yaml` kept the spec's keys that TrainerConfig knows: a misspelt section (adjsut,
    trainig) was dropped without a word, and the job trained without its freeze or its epochs. Only the operator's
    own fields are skipped, listed in the trainer (its image has no operator) as FineTuneJobSpec has them."""
    from finetune_operator.api import FineTuneJobSpec
    from finetune_trainer.config import OPERATOR_SPEC_FIELDS

    def wire(model: type) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()}

    assert OPERATOR_SPEC_FIELDS == wire(FineTuneJobSpec) - wire(TrainerConfig)
    doc = yaml.safe_load((EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text())
    doc["spec"] |= {"suspend": False, "backoffLimit": 2, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 60,
                    "managedBy": "example.com/x", "pod": {}}
    assert TrainerConfig.from_document(doc).output.uri.startswith("pvc://")
    doc["spec"]["adjsut"] = doc["spec"].pop("adjust")
    with pytest.raises(ValueError, match=r"adjsut\n  Extra inputs are not permitted"):
        TrainerConfig.from_document(doc)


def test_validate_reports_odd_documents_and_skips_other_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each document gets a verdict and none a traceback; a claim beside the job is kubectl's to create, not ours to judge."""
    from finetune_operator.__main__ import main

    good = (EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text()
    infinite = re.sub(r"weightDecay: .*", "weightDecay: .inf", good)
    claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {}\n"
    path = tmp_path / "jobs.yaml"
    path.write_text("\n---\n".join([claim, good, "metadata:", "metadata: [x]", "metadata: text", infinite]))
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "PersistentVolumeClaim data: skipped" in out and out.count(": valid") == 1
    assert err.count(": invalid") == 4 and "spec: not JSON" in err
    path.write_text(claim + "---\n" + good)
    assert main(["validate", str(path)]) == 0
    (broken := tmp_path / "broken.yaml").write_text("spec: [\n")
    assert main(["validate", str(broken), str(tmp_path / "absent.yaml")]) == 1
    assert capsys.readouterr().err.count("cannot read it") == 2


def test_validate_reads_a_lists_items_and_keys_that_are_no_strings_as_kubectl_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kubectl apply` creates each item of a `kind: List`: validate skipped the List, passing a job the apiserver
    refuses. kubectl writes a label key 1 (or true) as "1": validate stopped with a traceback."""
    from finetune_operator.__main__ import main

    good = (EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text()
    job = yaml.safe_load(good)
    bad = job | {"metadata": {"name": "Bad_Name"}}
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [job, bad]}))
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.count(": valid") == 1 and "Bad_Name: invalid" in err
    path.write_text(good.replace("metadata:\n", "metadata:\n  labels: {1: a, true: b}\n", 1))
    assert main(["validate", str(path)]) == 0
    for key in ("~", ".inf", "1.5", "18446744073709551615"):  # kubectl refuses or rewrites them: quoted, they are plain
        path.write_text(good.replace("metadata:\n", f"metadata:\n  labels: {{{key}: a}}\n", 1))
        assert main(["validate", str(path)]) == 1
    assert "is no text: quote it" in capsys.readouterr().err
    # Any kind of list (a FineTuneJobList too), its items judged; an empty one is no objects, one inside is refused.
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJobList", "items": [job]}))
    assert main(["validate", str(path)]) == 0
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": []}))
    assert main(["validate", str(path)]) == 1 and "no objects in it" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "List", "items": [bad]}]}))
    assert main(["validate", str(path)]) == 1 and "a list inside a list" in capsys.readouterr().err


def test_a_generated_name_is_judged_as_the_apiserver_makes_it() -> None:
    """`kubectl create` of a manifest with metadata.generateName: the apiserver appends 5 characters, then the name
    rules apply to the whole."""
    doc = yaml.safe_load((EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text())
    doc["metadata"] = {"generateName": "minilm-sentiment-"}
    assert manifest_errors(doc) == []
    doc["metadata"] = {"generateName": "m" * 46}  # 51 characters once named
    assert manifest_errors(doc) == [LENGTH_MESSAGE]
    doc["metadata"] = {"generateName": "7b-"}
    assert manifest_errors(doc) == [NAME_MESSAGE]


def test_a_claim_named_as_a_dns_subdomain_is_a_pvc_uri() -> None:
    """A PersistentVolumeClaim's name is a DNS subdomain: pvc://models.v2/... was refused at apply, though valid."""
    from finetune_operator.judge import claim_fields

    doc = yaml.safe_load((EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text())
    doc["spec"]["model"]["uri"] = "pvc://models.v2/all-MiniLM-L6-v2"
    assert manifest_errors(doc) == []
    assert "models.v2" in claim_fields(FineTuneJob.from_wire(doc).spec)
    longest = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters, as a DNS subdomain may have
    doc["spec"]["model"]["uri"] = f"pvc://{longest}/all-MiniLM-L6-v2"
    assert manifest_errors(doc) == []
    for claim in ("Models", "models.", ".models", "models..v2", "models.-v2", "models_v2", longest + "b"):
        doc["spec"]["model"]["uri"] = f"pvc://{claim}/all-MiniLM-L6-v2"
        assert [e.split(":")[0] for e in manifest_errors(doc)] == ["spec.model.uri"], claim


def test_pod_annotations_leave_the_operator_room_in_the_apiserver_s_bytes_of_annotations() -> None:
    """64 annotations of 4096 characters passed, with the operator's trainer_pod_annotations beside them, though the
    apiserver takes 262144 bytes of a pod's annotations in all: each map holds at most POD_ANNOTATIONS_MAX_BYTES,
    counted in bytes as the apiserver counts them."""
    from pydantic import TypeAdapter, ValidationError

    from finetune_operator import coretypes as core

    annotations = TypeAdapter(core.Annotations)
    full = {f"k{i:02}": "x" * 4096 for i in range(29)}
    rest = core.POD_ANNOTATIONS_MAX_BYTES - core.annotations_bytes(full) - len("k29")
    assert 2 * core.POD_ANNOTATIONS_MAX_BYTES + 1024 < core.ANNOTATIONS_MAX_BYTES  # the Job controller's room
    annotations.validate_python(full | {"k29": "x" * rest})
    for value in ("x" * (rest + 1), "é" * rest):  # é: two bytes, one character
        with pytest.raises(ValidationError, match="at most 122880 bytes"):
            annotations.validate_python(full | {"k29": value})


@pytest.mark.parametrize(("path", "taken"), [
    ("metadata.labels['team']", True), ("metadata.annotations['example.com/owner']", True),
    (f"metadata.labels['{'a' * 253}/b']", True), ("metadata.labels['bad key!']", False),
    ("metadata.annotations['-x']", False), (f"metadata.labels['{'a' * 254}/b']", False),
    ("metadata.labels['a" + "b" * 63 + "']", False), ("metadata.labels['a\nb']", False),
    ("metadata.annotations['Example.COM/Owner']", True), ("metadata.labels['Example.COM/owner']", False)])
def test_a_field_path_s_label_or_annotation_key_is_a_qualified_name(path: str, taken: bool) -> None:
    """metadata.labels['bad key!'] passed: the apiserver refused the Job, and the job failed as InvalidSpec. The
    apiserver checks an annotation's key lowercased (a label's as written): Example.COM/Owner was refused here."""
    doc = yaml.safe_load((EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text())
    doc["spec"].setdefault("runtime", {})["env"] = [{"name": "KEY", "valueFrom": {"fieldRef": {"fieldPath": path}}}]
    errors = manifest_errors(doc)
    assert (errors == []) == taken and all("fieldRef.fieldPath" in e for e in errors), errors


@pytest.mark.parametrize("where", ["spec.pod", "metadata"])
@pytest.mark.parametrize(("field", "keys", "taken"), [
    ("annotations", ["Example.COM/Owner", "EXAMPLE.com/a"], True), ("annotations", ["Example.COM_/Owner"], False),
    ("labels", ["Example.COM/owner"], False)])
def test_an_annotation_key_s_prefix_may_have_capitals(where: str, field: str, keys: list[str], taken: bool) -> None:
    """The apiserver checks an annotation key lowercased (ValidateAnnotations), a label key as written: a job's (or its
    pods') annotation Example.COM/Owner, which the apiserver takes, was refused."""
    doc = yaml.safe_load((EXAMPLES[0].parent / "minilm-sentiment.yaml").read_text())
    (doc["spec"].setdefault("pod", {}) if where == "spec.pod" else doc["metadata"])[field] = dict.fromkeys(keys, "x")
    errors = manifest_errors(doc)
    assert (errors == []) == taken and all(f"{where}.{field}" in e for e in errors), errors


@pytest.mark.parametrize("size", [0, "0", "0Gi", "-0", "+0.0", "0e3", ".0m"])
def test_a_shm_size_of_0_in_any_spelling_is_refused_naming_it(size: int | str) -> None:
    """A sizeLimit of 0 is none to the kubelet (a tmpfs as large as the pod's memory): the integer 0 was taken and
    became the default 1Gi, the string "0" reached the pod as sizeLimit "0"."""
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["runtime"]["shmSize"] = size
    errors = manifest_errors(doc)
    assert errors and all(e.startswith("spec.runtime.shmSize: must be more than 0") for e in errors), errors
    doc["spec"]["runtime"]["shmSize"] = "1m"  # rounded up to a byte: a bound
    assert manifest_errors(doc) == []


@pytest.mark.parametrize(("prefix", "taken"), [
    ("PET_", False), ("PET_RDZV_", False), ("FINETUNE_", False), ("TORCHELASTIC_", False),
    ("PE", False), ("MASTER_", False), ("R", False), ("LOCAL_", False), ("OMP_NUM_THREAD", False),
    ("HF_", True), ("APP_", True), ("MY_PET_", True), ("RANK", True), ("OMP_NUM_THREADS", True)])
def test_an_env_from_prefix_that_makes_a_reserved_name_of_a_key_is_refused(prefix: str, taken: bool) -> None:
    """A prefix was checked as a name only: PET_ made a ConfigMap's key RDZV_CONF torchrun's rendezvous setting, and
    MASTER_ its key ADDR torchrun's MASTER_ADDR. A prefix that a reserved name only begins with (RANK) makes none."""
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["runtime"]["envFrom"] = [{"prefix": prefix, "configMapRef": {"name": "c"}}]
    errors = manifest_errors(doc)
    assert (errors == []) == taken
    assert all(e.startswith("spec.runtime.envFrom[0].prefix: would make a key a name torchrun") for e in errors), errors
