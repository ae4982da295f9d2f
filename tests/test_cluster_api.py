"""The real apiserver takes our CRD, documents it, accepts every example and refuses every
case of the bad-input corpus at apply time, naming the field at fault."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bad_corpus import BadCase, load_bad_corpus, readme_manifests
from finetune_operator.api import manifest_errors
from kube import Kube, condition

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "deploy" / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
MINILM = REPO / "deploy" / "examples" / "minilm-sentiment.yaml"


@pytest.fixture(scope="module")
def crd(kube: Kube) -> Iterator[dict]:
    """The CRD installed (server-side: it is too big for apply's last-applied annotation)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    name = yaml.safe_load(CRD.read_text())["metadata"]["name"]

    def established() -> dict | None:
        found = kube.get("crd", name)
        return found if found and condition(found, "Established").get("status") == "True" else None

    yield kube.wait_for(f"CRD {name} established", established, "default")


def test_kubectl_explain_shows_the_descriptions(kube: Kube, crd: dict) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def explain() -> str | None:
        # The OpenAPI document is published a moment after the CRD is established.
        result = kube.kubectl("explain", "ftj.spec", check=False)
        return result.stdout if result.returncode == 0 else None

    text = " ".join(kube.wait_for("kubectl explain ftj.spec", explain, "default").split())
    assert "FineTuneJob" in text
    assert " ".join(schema["description"].split()) in text
    for field, prop in schema["properties"].items():
        assert field in text
        first_words = " ".join(prop.get("description", "").split()[:6])
        assert first_words in text, f"description of spec.{field} missing from kubectl explain"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_server_side_dry_run(kube: Kube, crd: dict, module_namespace: str, example: Path) -> None:
    result = kube.kubectl("apply", "--dry-run=server", "-n", module_namespace, "-f", str(example), check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", ["tiny-causal-lm", "shapes-fasterrcnn"])
def test_a_job_that_names_no_metrics_is_accepted_for_any_task(kube: Kube, crd: dict, module_namespace: str,
                                                              example: str) -> None:
    doc = yaml.safe_load((REPO / "deploy" / "examples" / f"{example}.yaml").read_text())
    del doc["spec"]["evaluation"]
    result = kube.apply(doc, module_namespace, "--dry-run=server", "-o", "yaml", check=False)
    assert result.returncode == 0, result.stderr
    assert "metrics" not in yaml.safe_load(result.stdout)["spec"]["evaluation"]  # the trainer picks the task's


@pytest.mark.parametrize("uri", ["/scratch", "/scratch/", "file:///scratch", "/scratch/out"])
def test_an_output_at_the_root_of_a_writable_claim_mount_is_accepted(kube: Kube, crd: dict, module_namespace: str,
                                                                      uri: str) -> None:
    """/scratch/ was taken and /scratch refused ("the output must outlive the pod"), the same folder: the trainer
    stages its export inside the output folder, so a claim's root takes it as pvc://<claim> does. /scratchy/out is
    not under it."""
    doc = yaml.safe_load((REPO / "deploy" / "examples" / "minilm-sentiment.yaml").read_text())
    doc["spec"]["output"]["uri"] = uri
    doc["spec"]["runtime"] = {"volumes": [{"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}}],
                              "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    assert manifest_errors(doc) == []
    result = kube.apply(doc, module_namespace, "--dry-run=server", check=False)
    assert result.returncode == 0, result.stderr
    doc["spec"]["output"]["uri"] = "/scratchy/out"
    assert manifest_errors(doc) and kube.apply(doc, module_namespace, "--dry-run=server", check=False).returncode != 0


def test_readme_examples_pass_server_side_dry_run(kube: Kube, crd: dict, module_namespace: str) -> None:
    for doc in readme_manifests():
        result = kube.apply(doc, module_namespace, "--dry-run=server", check=False)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", load_bad_corpus(), ids=lambda c: c.name)
def test_bad_input_is_refused_naming_its_field(kube: Kube, crd: dict, module_namespace: str, case: BadCase) -> None:
    # A real apply (not a dry run): refused cases create nothing, so they share a namespace.
    result = kube.apply(case.manifest, module_namespace, check=False)
    assert result.returncode != 0, f"accepted, but {case.why}"
    assert any(case.names_field(line) for line in result.stderr.splitlines()), (
        f"the error does not name {case.field}:\n{result.stderr}")


def test_annotation_keys_are_taken_in_any_case_as_the_apiserver_takes_them(kube: Kube, crd: dict,
                                                                          module_namespace: str) -> None:
    """The apiserver checks an annotation key lowercased, where an object's or a pod's annotations or a fieldRef name
    it: the CRD's rules refused a pod annotation Example.COM/Owner, and a fieldRef to it, which a Job takes, and
    manifest_errors the job's own too."""
    from finetune_operator.api import manifest_errors

    doc = yaml.safe_load(MINILM.read_text())
    doc["metadata"]["annotations"] = {"Example.COM/Owner": "x"}
    doc["spec"]["pod"] = {"annotations": {"Example.COM/Owner": "x"}}
    doc["spec"]["runtime"]["env"] = [
        {"name": "OWNER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['Example.COM/Owner']"}}}]
    assert manifest_errors(doc) == []
    result = kube.apply(doc, module_namespace, "--dry-run=server", check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("name", "value", "pod_taken", "taken"), [
    ("hugepages-2Mi", "2097151.5", True, True), ("hugepages-2Mi", "2047.9999Ki", True, True),
    ("hugepages-2Mi", "2097152.5", False, False), ("hugepages-2Mi", "100m", False, False),
    ("hugepages-1", "4503599627370495.5", True, True), ("hugepages-1", "4503599627370496.5", True, False),
    ("hugepages-1", "4503599627370495.999999999", True, True),
    ("hugepages-1", "4503599627370495.9999999991", True, False)])  # rounded up to nanos: 2^52 reaches CEL
def test_huge_pages_of_a_fraction_of_a_byte_are_taken_as_the_apiserver_rounds_them(
        kube: Kube, crd: dict, module_namespace: str, name: str, value: str, pod_taken: bool, taken: bool) -> None:
    """The apiserver rounds huge pages up to whole bytes (Value()) before it asks for whole pages: 2097151.5 of
    hugepages-2Mi is one page, which a pod (so a Job) takes, and the operator and the CRD refused. From 2^52 bytes on
    a fraction is refused, in Python as in CEL, which rounds through a float."""
    from finetune_operator.api import manifest_errors

    resources = {"limits": {name: value, "memory": "1Gi"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "huge-pages"},
           "spec": {"containers": [{"name": "c", "image": "x", "resources": resources}]}}
    result = kube.apply(pod, module_namespace, "--dry-run=server", check=False)
    assert (result.returncode == 0) == pod_taken, result.stderr
    doc = yaml.safe_load(MINILM.read_text())
    doc["spec"]["runtime"]["resources"] = resources
    assert (manifest_errors(doc) == []) == taken
    result = kube.apply(doc, module_namespace, "--dry-run=server", check=False)
    assert (result.returncode == 0) == taken, result.stderr
    assert taken or "spec.runtime.resources.limits" in result.stderr, result.stderr


def test_apiserver_defaults_match_the_models(kube: Kube, crd: dict, namespace: str) -> None:
    from finetune_operator.api import FineTuneJob

    doc = yaml.safe_load(EXAMPLES[0].read_text())
    kube.apply(doc, namespace)
    stored = kube.get("ftj", doc["metadata"]["name"], namespace)
    assert stored["spec"] == FineTuneJob.from_wire(doc).spec.to_wire()


def test_model_dataset_and_output_are_immutable(kube: Kube, crd: dict, namespace: str) -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["suspend"] = True  # even while suspended
    kube.apply(doc, namespace)
    for section, field, value in (("model", "uri", "pvc://models/other"), ("dataset", "uri", "pvc://data/other.csv"),
                                  ("output", "uri", "pvc://models/elsewhere")):
        changed = copy.deepcopy(doc)
        changed["spec"].setdefault(section, {})[field] = value
        result = kube.apply(changed, namespace, check=False)
        assert result.returncode != 0 and f"{section} is immutable" in result.stderr, result.stderr


# One change per section that may change only while the job is suspended.
WHILE_SUSPENDED = {
    "analyze": ("probeBatches", 3),
    "adjust": ("learningRate", 1e-3),
    "rearrange": ("mergeOnExport", False),
    "training": ("epochs", 3),
    "evaluation": ("baseline", False),
    "runtime": ("image", "registry.example/trainer:2"),
    "pod": ("nodeSelector", {"pool": "a100"}),
}


def test_a_running_job_keeps_its_recipe_and_runtime(kube: Kube, crd: dict, namespace: str) -> None:
    doc = yaml.safe_load(MINILM.read_text())
    kube.apply(doc, namespace)
    for section, (field, value) in WHILE_SUSPENDED.items():
        changed = copy.deepcopy(doc)
        changed["spec"].setdefault(section, {})[field] = value
        result = kube.apply(changed, namespace, check=False)
        assert result.returncode != 0, f"{section} changed on a running job"
        assert f"spec.{section}: Invalid value" in result.stderr and "only while the job is suspended" in result.stderr, result.stderr
    # The lifecycle always may change, and so may labels (Kueue's queue name).
    doc["spec"].update(activeDeadlineSeconds=600, ttlSecondsAfterFinished=60, backoffLimit=1)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    kube.apply(doc, namespace)
    doc["spec"]["suspend"] = True
    kube.apply(doc, namespace)


def test_a_suspended_job_may_be_retuned_and_placed(kube: Kube, crd: dict, namespace: str) -> None:
    doc = yaml.safe_load(MINILM.read_text())
    doc["spec"]["suspend"] = True
    kube.apply(doc, namespace)
    for section, (field, value) in WHILE_SUSPENDED.items():
        doc["spec"].setdefault(section, {})[field] = value
    doc["spec"]["suspend"] = False  # Kueue places and resumes it in one update
    kube.apply(doc, namespace)
    stored = kube.get("ftj", doc["metadata"]["name"], namespace)["spec"]
    assert stored["training"]["epochs"] == 3 and stored["pod"]["nodeSelector"] == {"pool": "a100"}


def test_managed_by_is_immutable(kube: Kube, crd: dict, namespace: str) -> None:
    doc = yaml.safe_load(MINILM.read_text())
    kube.apply(doc, namespace)
    doc["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    result = kube.apply(doc, namespace, check=False)
    assert result.returncode != 0 and "managedBy is immutable" in result.stderr, result.stderr


def test_a_status_write_gives_the_version_it_made(kube: Kube, crd: dict, namespace: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator reads the resourceVersion its status patch made from the answer's bytes (handlers.Written): the
    apiserver's, not a label's keyed resourceVersion, which comes before it."""
    from finetune_operator import handlers
    from finetune_operator.clients import Clients

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))  # the operator reads it first
    job = yaml.safe_load(MINILM.read_text())
    job["metadata"] |= {"namespace": namespace, "labels": {"resourceVersion": "1"}}
    kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    made = handlers._patch_status(Clients(connections=1, timeout=30, retries=False), namespace,
                                  job["metadata"]["name"], {"phase": "Pending", "reason": "Testing"})
    stored = kube.get("ftj", job["metadata"]["name"], namespace)
    assert made == stored["metadata"]["resourceVersion"] and stored["status"]["reason"] == "Testing"


def test_the_check_for_jobs_deleted_unseen_lists_every_job(kube: Kube, crd: dict, namespace: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """handlers.Vanished lists the FineTuneJobs' metadata alone, in pages, of a namespace or all of them: a job the
    index holds that the list lacks was deleted while the watch was down; those listed are not."""
    from finetune_operator import handlers
    from finetune_operator.clients import Clients

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))  # the operator reads it first
    monkeypatch.setattr(handlers, "LIST_CHUNK", 2)
    job = yaml.safe_load(MINILM.read_text())
    names = [f"listed-{n}" for n in range(3)]
    kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(
        [job | {"metadata": {"name": name}} for name in names]))
    uids = {kube.get("ftj", name, namespace)["metadata"]["uid"] for name in names}
    clients = Clients(connections=1, timeout=30, retries=False)
    jobs = {(namespace, uid) for uid in uids}
    assert set(handlers._listed_jobs(clients, namespace)) == jobs
    assert jobs <= set(handlers._listed_jobs(clients, None))
    vanished = handlers.Vanished()
    vanished.check(clients, (namespace,), {"Succeeded": [(namespace, "deleted-unseen"), *jobs]})
    assert vanished.jobs == {(namespace, "deleted-unseen")}


def test_a_new_attempt_deletes_the_earlier_ones_configmaps_services_and_all_but_the_last_jobs(
        kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """handlers._drop_earlier, before attempt 7 is made: the ConfigMaps and Services of attempts 1-6 go, and the Jobs
    of all but the last three (a `count/jobs.batch` quota filled by one job's retries held its next attempt for ever),
    each with its pods; an object of that name that is another FineTuneJob's (by its uid label) stays."""
    from finetune_operator import children, handlers
    from finetune_operator.clients import Clients

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))  # the operator reads it first
    uid, other = "11111111-aaaa", "22222222-bbbb"
    made = []
    for attempt in range(1, 7):
        name = children.child_name("x", attempt)
        labels = {children.JOB_UID_LABEL: other if attempt == 2 else uid}
        meta = {"name": name, "labels": labels}
        pod = {"containers": [{"name": "c", "image": "none"}], "restartPolicy": "Never",
               "nodeSelector": {"no-such-node": "true"}}
        made += [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {}},
                 {"apiVersion": "v1", "kind": "Service", "metadata": meta,
                  "spec": {"clusterIP": "None", "selector": {"app": "none"}}},
                 {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                  "spec": {"suspend": True, "template": {"spec": pod}}}]
    kube.apply(made, namespace)
    job_1 = kube.get("job", "x-1", namespace)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x-1-0", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "x-1", "uid": job_1["metadata"]["uid"]}]},
        "spec": {"containers": [{"name": "c", "image": "none"}], "nodeSelector": {"no-such-node": "true"}}}
    kube.apply(pod, namespace)

    handlers._drop_earlier(Clients(connections=1, timeout=30, retries=False), namespace, "x", uid, 7)

    def names(kind: str) -> list[str]:
        found = yaml.safe_load(kube.kubectl("get", kind, "-n", namespace, "-o", "yaml").stdout)["items"]
        return sorted(o["metadata"]["name"] for o in found
                      if o["metadata"]["name"].startswith("x-") and not o["metadata"].get("deletionTimestamp"))

    assert names("configmaps") == names("services") == ["x-2"]
    assert names("jobs") == ["x-2", "x-4", "x-5", "x-6"]
    kube.wait_for("the deleted Job's pod collected", lambda: not kube.get("pod", "x-1-0", namespace), namespace)
