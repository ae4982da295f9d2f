"""Large and hostile input, with the operator running: a spec near the apiserver's request and etcd's
object limits, labels and annotations at their limits, Unicode (and worse) in every free-text field.
Each is accepted or refused cleanly: the operator keeps running, every accepted job reaches a terminal
phase or a clear refusal in its status and Events, and deleting it leaves no finalizer behind."""

from __future__ import annotations

import json
from typing import Any

import pytest

from operator_fixture import OperatorEnv, crd_installed, example, operator_env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster

KIB, MIB = 1024, 1024 * 1024
# Never scheduled (no node has 99 GPUs), so the deadline ends it: the operator's side is what is tested.
PARKED = {"resources": {"limits": {"nvidia.com/gpu": 99}}}


def create(env: OperatorEnv, doc: dict[str, Any]) -> str | None:
    """The apiserver's refusal of `doc` (None: created), as a client that is not kubectl sends it."""
    from kubernetes import config
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    client = config.new_client_from_config(str(env.kube.kubeconfig))
    try:
        CustomObjectsApi(client).create_namespaced_custom_object("finetune.dev", "v1alpha1", env.namespace,
                                                                 "finetunejobs", doc, _request_timeout=120)
    except ApiException as exc:
        return f"{exc.status}: {json.loads(exc.body).get('message', exc.reason) if exc.body else exc.reason}"
    finally:
        client.close()
    return None


def failed_message(obj: dict[str, Any]) -> str:
    return next(c["message"] for c in obj["status"]["conditions"] if c["type"] == "Failed")


def parked(name: str, **changes: Any) -> dict[str, Any]:
    doc = example("minilm-sentiment", runtime=PARKED, **changes) | {"metadata": {"name": name}}
    doc["spec"]["activeDeadlineSeconds"] = 5
    return doc


def assert_all_deleted_cleanly(env: OperatorEnv) -> None:
    assert env.process is not None and env.process.poll() is None, f"the operator exited:\n{env.log.read_text()[-4000:]}"
    env.kube.kubectl("delete", "ftj", "--all", "-n", env.namespace, "--wait=false")
    env.kube.wait_for("every FineTuneJob gone (no finalizer left behind)",
                      lambda: not env.kube.kubectl("get", "ftj", "-n", env.namespace, "-o", "name").stdout.strip(),
                      env.namespace, timeout=120)


def test_a_spec_near_the_size_limits_is_accepted_or_refused_cleanly(operator_env: OperatorEnv) -> None:
    env = operator_env
    blob = lambda size: {"note": "x" * size}  # model.config keeps unknown fields: the one unbounded field
    # Under a ConfigMap's 1 MiB: runs (here: parked until its deadline).
    assert create(env, parked("big", model={"config": blob(700 * KIB)})) is None
    # Over a ConfigMap's 1 MiB, under etcd's 1.5 MiB: accepted, and the trainer's ConfigMap is refused.
    assert create(env, parked("bigger", model={"config": blob(1100 * KIB)})) is None
    # Over etcd's 1.5 MiB, over the apiserver's 2 MiB to etcd, over its 3 MiB request limit: refused
    # at once, saying why, and nothing is stored.
    for name, size, said in (("too-big", 1600 * KIB, "request is too large"), ("far-too-big", 2 * MIB, "larger than max"),
                             ("huge", 3 * MIB + 1, "413")):
        refused = create(env, parked(name, model={"config": blob(size)}))
        assert refused and said in refused, refused
        assert env.kube.get("ftj", name, env.namespace) is None
    big = env.wait_phase("big", "Failed", timeout=120)
    assert big["status"]["reason"] == "DeadlineExceeded"
    bigger = env.wait_phase("bigger", "Failed", timeout=120)
    assert bigger["status"]["reason"] == "InvalidSpec" and "ConfigMap" in failed_message(bigger)
    env.wait_events("bigger", "InvalidSpec")  # posted after the status patch
    assert_all_deleted_cleanly(env)


def test_labels_and_annotations_at_their_limits(operator_env: OperatorEnv) -> None:
    env = operator_env
    prefix = ".".join(["a" * 63] * 3) + "." + "b" * 61  # a 253-character DNS subdomain
    labels = {f"{prefix}/{str(i) * 63}"[:317]: "v" * 63 for i in range(10)}
    # 64 of 1,900 bytes: 120 KiB less a little, a pod's share of the apiserver's 256 KiB (the rest is the operator's
    # trainer annotations' and the Job controller's)
    annotations = {f"example.com/{i:02d}": "a" * 1900 for i in range(64)}
    full = example("minilm-sentiment", runtime=PARKED, pod={"labels": labels, "annotations": annotations})
    full["metadata"] = {"name": "full-labels", "labels": labels, "annotations": {"example.com/big": "z" * (250 * KIB)}}
    assert create(env, full) is None
    # 64 annotations of 4 KiB: each within the API's limit, together past a pod's share: refused at apply, naming the
    # field (the Job's create refused them, and the job failed as InvalidSpec at its first attempt)
    over = parked("over-annotated", pod={"annotations": {f"example.com/{i}": "a" * 4096 for i in range(64)}})
    assert "spec.pod.annotations" in (create(env, over) or "")
    env.wait_ftj("full-labels", lambda o: o.get("status", {}).get("reason") == "Unschedulable", "its pod waiting for GPUs")
    template = env.objects("jobs", "full-labels")[0]["spec"]["template"]["metadata"]
    assert labels.items() <= template["labels"].items() and annotations.items() <= template["annotations"].items()
    assert_all_deleted_cleanly(env)


UNICODE = "Ünïcødé 日本語 😀 \u202eevil\u202c ﷽ e\u0301"


def test_unicode_in_every_free_text_field_reaches_the_trainer_and_back(operator_env: OperatorEnv) -> None:
    env = operator_env
    doc = example("minilm-sentiment", dataset={"uri": f"pvc://data/nowhere-{UNICODE.replace(' ', '-')}.csv",
                                               "textField": UNICODE, "labelField": UNICODE + " label"})
    doc["metadata"] = {"name": "unicode", "annotations": {"example.com/note": UNICODE}}
    doc["spec"]["model"] |= {"revision": UNICODE, "config": {"note": UNICODE}}
    doc["spec"]["adjust"]["freeze"] = {"strategy": "regex", "pattern": f"^{UNICODE}$"}
    doc["spec"]["rearrange"]["lora"]["targetModules"] = [UNICODE]
    doc["spec"]["output"]["uri"] = f"pvc://results/{UNICODE.replace(' ', '_')}"
    doc["spec"]["runtime"]["env"] = [{"name": "NOTE", "value": UNICODE + "\n\t"}]
    doc["spec"]["pod"] = {"annotations": {"example.com/note": UNICODE}}
    assert create(env, doc) is None
    failed = env.wait_phase("unicode", "Failed", timeout=300)
    # The trainer read every field and refused the dataset it could not find, naming it.
    assert failed["status"]["reason"] == "InvalidDataset", failed["status"]
    assert "nowhere-Ünïcødé" in failed_message(failed)
    config = json.loads(env.objects("configmaps", "unicode")[0]["data"]["config.json"])
    assert config["dataset"]["textField"] == UNICODE and config["dataset"]["labelField"] == UNICODE + " label"
    assert config["model"]["config"]["note"] == UNICODE
    assert_all_deleted_cleanly(env)
