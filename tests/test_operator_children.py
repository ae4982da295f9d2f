"""The children of an attempt, built from the spec alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from finetune_operator import children, handlers
from finetune_operator.api import FineTuneJob, RuntimeSpec
from finetune_operator.settings import Settings
from finetune_trainer.config import TrainerConfig

EXAMPLES = Path(__file__).parents[1] / "deploy" / "examples"
SETTINGS = Settings(trainer_image="registry.example/trainer:1")


def ftj(example: str = "minilm-sentiment.yaml", **spec: object) -> tuple[dict, object]:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    doc["spec"].update(spec)
    doc["metadata"] |= {"namespace": "team-a", "uid": "1234", "labels": {"kueue.x-k8s.io/queue-name": "gpus",
                                                                        "kueue.x-k8s.io/priority-class": "urgent"}}
    return doc, FineTuneJob.from_wire(doc).spec


def test_names_labels_and_owner_are_deterministic() -> None:
    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    objs = children.attempt_children(doc, spec, 2, SETTINGS)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]  # the Job last: its pods need the others
    for obj in objs:
        meta = obj["metadata"]
        assert meta["name"] == "minilm-sentiment-2workers-2" and meta["namespace"] == "team-a"
        assert meta["labels"][children.JOB_NAME_LABEL] == "minilm-sentiment-2workers"
        assert meta["labels"][children.ATTEMPT_LABEL] == "2"
        assert meta["ownerReferences"][0]["uid"] == "1234" and meta["ownerReferences"][0]["controller"]
    assert objs == children.attempt_children(doc, spec, 2, SETTINGS)


def test_the_node_rank_is_read_from_what_every_supported_kubernetes_sets() -> None:
    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    env = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
    path = next(e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if e["name"] == "FINETUNE_NODE_RANK")
    # A worker pod of an Indexed Job as Kubernetes 1.27 (the chart's oldest) makes it: the index is an annotation
    # only (the label of the same name came in 1.28).
    worker = {"metadata": {"labels": {"batch.kubernetes.io/controller-uid": "x"},
                           "annotations": {"batch.kubernetes.io/job-completion-index": "1"}}}
    found = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    assert found and worker["metadata"][found.group(1)].get(found.group(2)) == "1"


def test_the_config_map_holds_exactly_the_trainers_half() -> None:
    doc, spec = ftj()
    config = json.loads(children.config_map(doc, spec, 1)["data"][children.CONFIG_KEY])
    assert set(config) == set(TrainerConfig.model_fields)
    assert TrainerConfig.from_wire(config).model.uri == "pvc://models/all-MiniLM-L6-v2"  # the trainer parses it strictly


def test_a_single_process_gets_no_service_nor_subdomain() -> None:
    doc, spec = ftj()
    assert [o["kind"] for o in children.attempt_children(doc, spec, 1, SETTINGS)] == ["ConfigMap", "Job"]
    assert "subdomain" not in children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    doc, spec = ftj(runtime={"workers": 1, "processesPerWorker": 2})  # torchrun: rank 0's name must resolve
    assert [o["kind"] for o in children.attempt_children(doc, spec, 1, SETTINGS)] == ["ConfigMap", "Service", "Job"]


def test_rank_0s_success_is_the_jobs_and_stops_the_peers_still_in_their_teardown() -> None:
    """Rank 0 exports the model; a peer that hung or failed in its teardown after it failed or held the Job."""
    doc, spec = ftj(runtime={"workers": 2})
    assert children.job(doc, spec, 1, SETTINGS)["spec"]["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    doc, spec = ftj()
    assert "successPolicy" not in children.job(doc, spec, 1, SETTINGS)["spec"]  # one index: its success is the Job's


def test_the_service_is_headless_and_publishes_unready_pods() -> None:
    doc, _ = ftj()
    svc = children.service(doc, 1)["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"]
    assert svc["selector"] == children.labels("minilm-sentiment", "1234", 1)


def test_one_worker_runs_the_trainer_directly() -> None:
    doc, spec = ftj()
    job = children.job(doc, spec, 1, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["finetune-trainer", "run", "/etc/finetune/config.json"]
    assert container["image"] == "registry.example/trainer:1"
    assert job["spec"] | {"template": None, "podFailurePolicy": None} == {
        "completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0, "suspend": False,
        "template": None, "podFailurePolicy": None}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"  # Kueue's WorkloadPriorityClass
    env = {e["name"]: e for e in container["env"]}
    assert env["FINETUNE_METRICS_ADDR"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["FINETUNE_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"  # who answers there
    assert env["OMP_NUM_THREADS"]["value"] == "2"  # the CPU limit
    assert env["FINETUNE_GPUS"]["value"] == "0"  # a CPU job
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"  # not the node's GPUs, which the image's "all" would give
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9090}


def test_a_single_process_is_told_it_is_a_world_of_one_whatever_envfrom_brings() -> None:
    """The trainer reads RANK and WORLD_SIZE from its environment, and an unprefixed envFrom key is not checked: a
    shared ConfigMap holding WORLD_SIZE=2 made the lone trainer wait for a peer (an env entry wins over envFrom).
    Under torchrun, torchrun sets them for each process it starts."""
    doc, spec = ftj()
    container = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {n: env.get(n) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    container = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert not {"RANK", "WORLD_SIZE"} & {e["name"] for e in container["env"]}


def test_workers_rendezvous_statically_on_index_zero() -> None:
    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    job = children.job(doc, spec, 3, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[0] == "torchrun" and "--nnodes=2" in command
    assert "--master-addr=minilm-sentiment-2workers-3-0.minilm-sentiment-2workers-3" in command
    assert "--node-rank=$(FINETUNE_NODE_RANK)" in command
    assert pod["subdomain"] == "minilm-sentiment-2workers-3"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2


def test_torchrun_waits_at_its_rendezvous_as_long_as_the_ranks_wait_at_a_collective() -> None:
    """A gang's last pod may start many minutes after its first (a node scaled up, a large image pulled): torchrun's
    static rendezvous gave up after its default 900 s, exit 1 with no termination message, a counted failure."""
    from torch.distributed.run import config_from_args, parse_args

    from finetune_trainer.distributed import COLLECTIVE_TIMEOUT

    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    command = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["command"]
    config, *_ = config_from_args(parse_args([a.replace("$(FINETUNE_NODE_RANK)", "1") for a in command[1:]]))
    assert config.rdzv_backend == "static"
    assert int(config.rdzv_configs["timeout"]) == COLLECTIVE_TIMEOUT.total_seconds() == 3600


def test_the_trainer_is_not_pid_1_where_a_sigterm_with_no_handler_yet_is_dropped() -> None:
    """PID 1 of a pod's PID namespace ignores a signal it has no handler for: the trainer has none until torch and
    CUDA are up, torchrun none until its rendezvous is over. A suspend or a preemption then was lost, and the pod
    held its GPUs for its whole grace period. The pause container is PID 1 with a shared namespace."""
    for name in ("minilm-sentiment.yaml", "minilm-sentiment-2workers.yaml"):
        doc, spec = ftj(name)
        assert children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["shareProcessNamespace"] is True


def test_the_grace_period_reaches_the_pods_and_torchrun_stops_its_workers_within_it() -> None:
    # Unset: Kubernetes' 30 s, of which torchrun gives its workers 25 to checkpoint before its own SIGKILL.
    doc, spec = ftj("minilm-sentiment-2workers.yaml")
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    assert "terminationGracePeriodSeconds" not in pod
    # In torchrun's environment, not a flag: an older torchrun (a user's image) refused the flag, every run
    assert {"name": "PET_SHUTDOWN_TIMEOUT", "value": "25"} in pod["containers"][0]["env"]
    assert not any("shutdown" in arg for arg in pod["containers"][0]["command"])
    doc, spec = ftj("minilm-sentiment-2workers.yaml", pod={"terminationGracePeriodSeconds": 600})
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 600
    assert {"name": "PET_SHUTDOWN_TIMEOUT", "value": "595"} in pod["containers"][0]["env"]
    doc, spec = ftj(pod={"terminationGracePeriodSeconds": 0})  # one process: no torchrun, and 0 is kept
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 0 and pod["containers"][0]["command"][0] == "finetune-trainer"


def test_claims_are_mounted_where_pvc_uris_resolve_and_only_the_output_is_writable() -> None:
    doc, spec = ftj(output={"uri": "pvc://results/minilm"})
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert set(claims) == {"models", "data", "results"}
    for claim, volume in claims.items():
        mount = mounts[volume["name"]]
        assert mount["mountPath"] == f"/mnt/pvc/{claim}"
        assert mount["readOnly"] is (claim != "results")
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["FINETUNE_PVC_ROOT"] == "/mnt/pvc"
    shm = next(v for v in pod["volumes"] if v["name"] == "finetune-shm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_the_claim_of_healings_texts_is_mounted_read_only() -> None:
    """rearrange.prune.heal.dataset may name a claim no other URI names: the trainer reads it, so it is mounted."""
    doc, _ = ftj()
    rearrange = doc["spec"].get("rearrange", {}) | {"prune": {"count": 1, "heal": {
        "steps": 10, "dataset": {"uri": "pvc://unlabelled/tweets.csv"}}}}
    doc, spec = ftj(rearrange=rearrange)
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claims["unlabelled"]] | {"name": None} == {"name": None, "mountPath": "/mnt/pvc/unlabelled",
                                                             "readOnly": True}


def test_the_claim_of_the_distillation_teacher_is_mounted_read_only() -> None:
    """training.distillation.teacher may live on a claim no other URI names (an earlier job's output): the trainer
    reads it, so it is mounted, read-only."""
    doc, _ = ftj()
    training = doc["spec"].get("training", {}) | {"distillation": {"teacher": {"uri": "pvc://results/unpruned"}}}
    doc, spec = ftj(training=training)
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claims["results"]] | {"name": None} == {"name": None, "mountPath": "/mnt/pvc/results", "readOnly": True}


def test_pods_pass_restricted_and_carry_no_token() -> None:
    doc, spec = ftj()
    pod = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # Claims are handed to the fsGroup once, not walked file by file at every attempt's start.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    security = pod["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]


def test_only_a_worker_that_asks_for_no_nvidia_device_has_the_runtimes_gpus_hidden() -> None:
    """NVIDIA_VISIBLE_DEVICES=void keeps NVIDIA's runtime from handing a CPU worker the node's GPUs. A MIG slice or a
    shared GPU is an NVIDIA resource other than nvidia.com/gpu, whose device plugin names its device in that variable:
    ours replaced it, and the worker trained on the CPU."""
    def env(resources: dict[str, object]) -> dict[str, str]:
        doc, spec = ftj(runtime={"resources": resources})
        container = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    assert env({"limits": {"cpu": "2", "memory": "4Gi"}})["NVIDIA_VISIBLE_DEVICES"] == "void"
    for none in (0, "0"):  # "a limit of 0 runs its processes on the CPU": it got every GPU of its node
        assert env({"limits": {"nvidia.com/gpu": none, "cpu": "2"}})["NVIDIA_VISIBLE_DEVICES"] == "void"
    for device in ("nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "nvidia.com/gpu.shared"):
        assert "NVIDIA_VISIBLE_DEVICES" not in env({"limits": {device: 1, "cpu": "2", "memory": "4Gi"}}), device


def test_runtime_and_placement_pass_through() -> None:
    doc, spec = ftj(
        runtime={"image": "mine:2", "imagePullPolicy": "Always", "env": [{"name": "HF_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "hub", "key": "token"}}}],
            "resources": {"limits": {"nvidia.com/gpu": 2, "cpu": "8", "memory": "32Gi"}},
            "processesPerWorker": 2, "volumes": [{"name": "scratch", "emptyDir": {}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}], "shmSize": "8Gi"},
        pod={"labels": {"team": "a"}, "nodeSelector": {"pool": "h100"}, "priorityClassName": "high",
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "serviceAccountName": "trainer"},
    )
    template = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]
    pod, container = template["spec"], template["spec"]["containers"][0]
    assert container["image"] == "mine:2" and container["imagePullPolicy"] == "Always"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # quantities travel as strings
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in container["env"]  # 8 CPUs over 2 processes
    assert {"name": "FINETUNE_GPUS", "value": "2"} in container["env"]  # the trainer fails where CUDA sees none
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in container["env"]}  # the device plugin's to set
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}} in container["env"]
    assert "--nproc-per-node=2" in container["command"]
    assert {"name": "scratch", "mountPath": "/scratch", "readOnly": False} in container["volumeMounts"]
    assert template["metadata"]["labels"]["team"] == "a"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["priorityClassName"] == "high"
    assert pod["serviceAccountName"] == "trainer" and pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert next(v for v in pod["volumes"] if v["name"] == "finetune-shm")["emptyDir"]["sizeLimit"] == "8Gi"


def test_the_operators_pod_annotations_reach_every_trainer_pod_and_the_jobs_own_win() -> None:
    settings = Settings(trainer_pod_annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "9090"})
    doc, spec = ftj(pod={"annotations": {"prometheus.io/port": "9999", "team": "a"}})
    annotations = children.job(doc, spec, 1, settings)["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9999", "team": "a"}


class Refusing:
    """Clients whose apiserver answers every creation with one error."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message

    def call(self, method: str, path: str, body: object = None, **query: object) -> bytes:
        exc = ApiException(status=self.status, reason="Refused")
        exc.body = json.dumps({"kind": "Status", "code": self.status, "message": self.message})
        raise exc


def test_a_quota_refusal_waits_and_an_invalid_child_is_refused() -> None:
    doc, spec = ftj()
    quota = 'configmaps "ft-1" is forbidden: exceeded quota: team-quota, requested: count/configmaps=1'
    with pytest.raises(handlers.HeldBack, match="waits for quota: .*exceeded quota: team-quota") as held:
        handlers._create_attempt(Refusing(403, quota), doc, spec, 1, SETTINGS)
    assert held.value.reason == "ExceededQuota" and held.value.delay == handlers.QUOTA_RETRY_SECONDS
    with pytest.raises(handlers.Refused):
        handlers._create_attempt(Refusing(422, "Job.batch is invalid"), doc, spec, 1, SETTINGS)
    # A policy's denial is as final whatever code its webhook set (the apiserver makes none 400; controller-runtime's
    # webhooks set 403) or its ValidatingAdmissionPolicy's reason gave: a 403 was retried every 5 s, the status empty.
    for code, denial in ((403, 'admission webhook "validation.gatekeeper.sh" denied the request: [team] label team'),
                         (403, 'jobs.batch "ft-1" is forbidden: ValidatingAdmissionPolicy \'team\' with binding '
                               '\'team\' denied request: a team label is required')):
        with pytest.raises(handlers.Refused, match="denied"):
            handlers._create_attempt(Refusing(code, denial), doc, spec, 1, SETTINGS)
    # The operator's own permissions, for its admin to fix, not the job: it waits, saying so in its status.
    with pytest.raises(handlers.HeldBack, match='could not be created: User "op" cannot create') as held:
        handlers._create_attempt(Refusing(403, 'User "op" cannot create resource "jobs"'), doc, spec, 1, SETTINGS)
    assert held.value.reason == handlers.CREATE_FAILED and held.value.delay == handlers.CREATE_RETRY_SECONDS


class Existing:
    """Clients whose apiserver already holds every child as the spec makes it, owned by `uid`."""

    def __init__(self, uid: str, deleting: bool = False) -> None:
        self.uid, self.deleting = uid, deleting
        self.asked: dict = {}

    def call(self, method: str, path: str, body: dict | None = None, **query: object) -> bytes:
        if method == "POST":
            self.asked = body or {}
            raise ApiException(status=409, reason="AlreadyExists")
        meta = {"ownerReferences": [{"kind": "FineTuneJob", "uid": self.uid}]}
        meta |= {"deletionTimestamp": "2026-12-01T12:00:00Z"} if self.deleting else {}
        return json.dumps(self.asked | {"metadata": meta}).encode()


def test_a_job_records_the_generation_and_recipe_it_was_made_from() -> None:
    """What the reconcile compares with the spec, to tell a retune whose suspend it never saw (a lifecycle field's
    change, or numbers written otherwise, is none)."""
    from finetune_operator import outcome

    doc, spec = ftj()
    doc["metadata"]["generation"] = 4
    summary = outcome.job_summary(children.job(doc, spec, 1, SETTINGS))
    assert summary["generation"] == 4 and summary["recipe"] == children.recipe(spec)
    assert children.recipe(ftj(backoffLimit=7, suspend=True)[1]) == children.recipe(spec)
    assert children.recipe(ftj(pod={"labels": {}})[1]) == children.recipe(spec)  # a default written out, or not
    rate = spec.adjust.learning_rate
    assert children.recipe(ftj(adjust=doc["spec"]["adjust"] | {"learningRate": rate * 2})[1]) != children.recipe(spec)
    assert outcome.job_summary({"metadata": {"name": "x-1"}})["recipe"] is None  # an older operator's Job


def test_a_child_that_exists_is_ours_or_waited_for() -> None:
    doc, spec = ftj()
    handlers._create_attempt(Existing("1234"), doc, spec, 1, SETTINGS)  # made by an earlier tick
    # An earlier FineTuneJob of the same name, deleted and created again: its children are not taken over.
    for other in (Existing("an-earlier-uid"), Existing("1234", deleting=True)):
        with pytest.raises(handlers.HeldBack, match="waiting") as held:  # shown as Created False, NameTaken
            handlers._create_attempt(other, doc, spec, 1, SETTINGS)
        assert held.value.reason == "NameTaken" and held.value.delay == handlers.NAME_TAKEN_RETRY_SECONDS



class Holding:
    """Clients whose apiserver keeps what is created, and refuses Jobs for a quota while `quota` is set."""

    def __init__(self) -> None:
        self.objects: dict[str, object] = {}
        self.quota = True

    def call(self, method: str, path: str, body: dict | None = None, **query: object) -> bytes:
        if method == "GET":
            return json.dumps(self.objects[path]).encode()
        assert body is not None
        if f"{path}/{body['metadata']['name']}" in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        if self.quota and body["kind"] == "Job":
            raise Refusing(403, 'jobs.batch "ft-1" is forbidden: exceeded quota: team-quota').call(method, path)
        self.objects[f"{path}/{body['metadata']['name']}"] = body
        return b"{}"


def test_a_config_map_made_from_an_earlier_spec_is_not_taken_for_the_attempts() -> None:
    """Attempt 1's ConfigMap made, its Job held back by a quota (or the operator killed before it), the job suspended,
    retuned and resumed: attempt 1 kept its number, and its Job, made from the new spec, ran the trainer config of the
    old one, which the ConfigMap that already existed held."""
    apiserver = Holding()
    doc, spec = ftj()
    with pytest.raises(handlers.HeldBack):
        handlers._create_attempt(apiserver, doc, spec, 1, SETTINGS)
    apiserver.quota = False
    retuned, new_spec = ftj(training=doc["spec"]["training"] | {"epochs": 7})
    with pytest.raises(handlers.Stale, match="ConfigMap minilm-sentiment-1 .*earlier spec"):
        handlers._create_attempt(apiserver, retuned, new_spec, 1, SETTINGS)
    # The same spec's, written by an operator of another version (a default more in the trainer's config), or made
    # before the ConfigMap said its recipe: the tick that made it, again.
    made = next(obj for path, obj in apiserver.objects.items() if path.endswith("/configmaps/minilm-sentiment-1"))
    made["data"] = {key: text.replace("{", '{\n "aDefaultOfLater": 1,', 1) for key, text in made["data"].items()}
    apiserver.quota = True
    with pytest.raises(handlers.HeldBack):  # taken: the Job is what the quota refuses
        handlers._create_attempt(apiserver, doc, spec, 1, SETTINGS)
    del made["metadata"]["annotations"]  # made before the annotation: taken, whatever spec asks now, as it was
    apiserver.quota = False
    handlers._create_attempt(apiserver, retuned, new_spec, 1, SETTINGS)
    assert any(path.endswith("/jobs/minilm-sentiment-1") for path in apiserver.objects)


class Answering:
    """Clients whose apiserver has no Events and every claim (ReadWriteMany); it counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def call(self, method: str, path: str, body: object = None, **query: object) -> bytes:
        self.calls += 1
        if path.endswith("/events"):
            return b'{"items": []}'
        return json.dumps({"spec": {"accessModes": ["ReadWriteMany"]}}).encode()


def test_the_per_namespace_reads_of_deleted_namespaces_are_not_kept_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each namespace's Warning Events and claims were kept until read again: a namespace deleted (CI's, made and
    deleted by the thousand) kept its entries, and the operator grew with every one."""
    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    apiserver, warnings, claims = Answering(), handlers.Warnings("Job"), handlers.Claims()
    for i in range(100):
        namespace = f"ci-{i}"
        for _ in range(2):  # within their TTL, read once
            warnings.of(apiserver, namespace, "ft-1")
            claims.get(apiserver, namespace, "data")
        clock[0] += 60  # each namespace lives a minute
    assert apiserver.calls == 200
    assert set(warnings.by_namespace) == set(warnings.locks) == {"ci-99"} and set(claims.found) == {("ci-99", "data")}


def test_a_spec_s_hf_home_replaces_the_operator_s() -> None:
    """HF_HOME is documented as the way to a shared hub cache: the pod had two, the operator's then the spec's, of
    which the apiserver warns that one "may be dropped when using apply"."""
    mount = {"volumes": [{"name": "hub", "persistentVolumeClaim": {"claimName": "hub-cache"}}],
             "volumeMounts": [{"name": "hub", "mountPath": "/hub"}]}
    for env, home in (([], children.HF_HOME), ([{"name": "HF_HOME", "value": "/hub"}], "/hub")):
        doc, spec = ftj(runtime=mount | {"env": env})
        container = children.job(doc, spec, 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
        assert [e["value"] for e in container["env"] if e["name"] == "HF_HOME"] == [home]
    assert "HF_HOME" in RuntimeSpec.model_fields["env"].description


def test_an_image_pull_secret_named_twice_is_given_once() -> None:
    """The operator's pull secrets and the job's were joined as they came: regcred in both made the apiserver warn
    "duplicate name" at each Job's creation, and an apply of the list (a map keyed by name) trips over the second."""
    doc, spec = ftj(pod={"imagePullSecrets": [{"name": "regcred"}, {"name": "team"}, {"name": "team"}]})
    settings = Settings(trainer_image="registry.example/trainer:1", trainer_pull_secrets=["regcred", "org"])
    pod = children.job(doc, spec, 1, settings)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "org"}, {"name": "team"}]
