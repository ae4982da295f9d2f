"""The objects of one attempt, built from the spec alone (pure functions, no API calls).

Each attempt N of FineTuneJob `x` gets a ConfigMap, an Indexed Job and, when its processes meet
through torchrun, a headless Service, all named `x-N`, labelled with the job's name and the
attempt, and owned by the FineTuneJob. The Job's pod with completion index 0 is rank 0: the
static rendezvous address is its hostname, `x-N-0.x-N`, so the rank that reports is never c10d's
choice.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from finetune_operator import api
from finetune_operator import coretypes as core
from finetune_operator.judge import claim_fields
from finetune_operator.settings import Settings
from finetune_trainer.config import TrainerConfig
from finetune_trainer.torchrun import PEER_WAIT_SECONDS

JOB_NAME_LABEL = "finetune.dev/job-name"
# The FineTuneJob's uid: one deleted and created again under its name must not take the old one's children for its own.
JOB_UID_LABEL = "finetune.dev/job-uid"
ATTEMPT_LABEL = "finetune.dev/attempt"
# On each child Job: the FineTuneJob's generation and recipe (the sections that may change only while it is suspended)
# it was made from, so that a retune whose suspend was undone before the operator saw it is not lost (reconcile).
GENERATION_ANNOTATION = "finetune.dev/generation"
RECIPE_ANNOTATION = "finetune.dev/recipe"
TRAINER = "trainer"
CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/finetune"
PVC_ROOT = "/mnt/pvc"
HF_HOME = "/var/cache/huggingface"
METRICS_PORT = 9090
RENDEZVOUS_PORT = 29500
TERMINATION_LOG = "/dev/termination-log"
DEFAULT_SHM = "1Gi"
SHM_VOLUME = "finetune-shm"  # /dev/shm: an emptyDir of spec.runtime.shmSize
# The annotation, not the label of the same name, which came only in Kubernetes 1.28.
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def child_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-{attempt}"


def labels(job_name: str, uid: str, attempt: int) -> dict[str, str]:
    return {JOB_NAME_LABEL: job_name, JOB_UID_LABEL: uid, ATTEMPT_LABEL: str(attempt)}


def owner_reference(ftj: dict[str, Any]) -> dict[str, Any]:
    meta = ftj["metadata"]
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(ftj: dict[str, Any], attempt: int) -> dict[str, Any]:
    name = ftj["metadata"]["name"]
    return {"name": child_name(name, attempt), "namespace": ftj["metadata"]["namespace"],
            "labels": labels(name, ftj["metadata"]["uid"], attempt), "ownerReferences": [owner_reference(ftj)]}


def recipe(spec: api.FineTuneJobSpec) -> str:
    """A digest of the spec's sections that may change only while the job is suspended, as parsed (so as the CEL
    rules compare them: an apply that writes 1.0 for 1 changes the stored object and its generation, not this), and
    without defaults (an operator of a later version, with a field more, digests an unchanged spec alike)."""
    wire = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    sections = {name: wire.get(name) for name in api.SUSPENDED_ONLY}
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]


def trainer_config(spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """Exactly the trainer's half of the spec: the trainer parses it strictly."""
    fields = {name: getattr(spec, name) for name in TrainerConfig.model_fields}
    return TrainerConfig.model_validate(fields).to_wire()


def config_map(ftj: dict[str, Any], spec: api.FineTuneJobSpec, attempt: int) -> dict[str, Any]:
    """The trainer's config, and the recipe it was made from (as the Job's): a ConfigMap of a try of this attempt
    cut short before its Job may hold another spec's (handlers._create)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(ftj, attempt) | {"annotations": {RECIPE_ANNOTATION: recipe(spec)}},
            "data": {CONFIG_KEY: json.dumps(trainer_config(spec), indent=1, sort_keys=True)}}


def rendezvous(spec: api.FineTuneJobSpec) -> bool:
    """Whether torchrun starts the processes, meeting at rank 0's name, which the Service publishes. A single
    process needs neither: without the Service a burst of such jobs saves a write per job, and kcm's writes of
    its Endpoints and EndpointSlice (created, then changed as the pod comes and goes)."""
    return spec.runtime.workers > 1 or spec.runtime.processes_per_worker > 1


def service(ftj: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Headless, and publishing pods before they are ready: torchrun's rendezvous needs the names first."""
    meta = _metadata(ftj, attempt)
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": meta["labels"],
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}, {"name": "metrics", "port": METRICS_PORT}],
        },
    }


NVIDIA = "nvidia.com/"  # the prefix of NVIDIA's device plugins' resources (gpu, mig-1g.10gb, gpu.shared)


def gpus(resources: core.ResourceRequirements) -> int:
    """A worker's GPUs: its limit of them (a request of an extended resource, if given, equals its limit)."""
    limit = resources.limits.get(core.GPU)
    return 0 if limit is None else int(core.quantity_value(limit))


def _threads(resources: core.ResourceRequirements, processes: int) -> int:
    """OMP_NUM_THREADS: the CPU limit (else request) shared by the worker's processes, at least 1."""
    cpu = resources.limits.get("cpu", resources.requests.get("cpu"))
    if cpu is None:
        return 1
    return max(1, math.floor(core.quantity_value(cpu) / processes))


KUBERNETES_GRACE_SECONDS = 30  # a pod's terminationGracePeriodSeconds when none is set
TORCHRUN_EXIT_SECONDS = 5  # torchrun's own exit after its workers', within the pod's grace


def shutdown_timeout(spec: api.FineTuneJobSpec) -> int:
    """How long torchrun lets its workers checkpoint after a SIGTERM before it SIGKILLs them: the pod's grace period
    less the time torchrun needs to exit, so that the kubelet's SIGKILL does not cut both off at once."""
    grace = spec.pod.termination_grace_period_seconds
    return max(1, (KUBERNETES_GRACE_SECONDS if grace is None else grace) - TORCHRUN_EXIT_SECONDS)


def command(name: str, spec: api.FineTuneJobSpec) -> list[str]:
    config = f"{CONFIG_DIR}/{CONFIG_KEY}"
    rt = spec.runtime
    if not rendezvous(spec):
        return ["finetune-trainer", "run", config]
    # Static rendezvous on index 0: torchrun's c10d backend would let any node be rank 0.
    return ["torchrun", f"--nnodes={rt.workers}", f"--nproc-per-node={rt.processes_per_worker}",
            "--node-rank=$(FINETUNE_NODE_RANK)", f"--master-addr={name}-0.{name}", f"--master-port={RENDEZVOUS_PORT}",
            f"--rdzv-conf=timeout={PEER_WAIT_SECONDS}", "--max-restarts=0", "-m", "finetune_trainer.cli", "run", config]


def _env(spec: api.FineTuneJobSpec, resources: core.ResourceRequirements) -> list[dict[str, Any]]:
    ours = [
        {"name": "FINETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "FINETUNE_METRICS_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "FINETUNE_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "FINETUNE_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "FINETUNE_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "TERMINATION_MESSAGE_PATH", "value": TERMINATION_LOG},
        {"name": "OMP_NUM_THREADS", "value": str(_threads(resources, spec.runtime.processes_per_worker))},
        # the trainer fails an attempt whose GPUs CUDA does not see (a broken driver), where it trained on the CPU
        {"name": "FINETUNE_GPUS", "value": str(gpus(resources))},
        {"name": "HF_HOME", "value": HF_HOME},
    ]
    if not any(name.startswith(NVIDIA) and core.quantity_value(count) > 0
               for name, count in (*resources.limits.items(), *resources.requests.items())):
        # NVIDIA's runtime gives a container that asks for no GPU every GPU of its node where the image says
        # NVIDIA_VISIBLE_DEVICES=all (CUDA's images do): a CPU worker trained on GPUs given to other pods. "void":
        # the runtime adds nothing, as runc. Not for any NVIDIA resource (a MIG slice, nvidia.com/gpu.shared), whose
        # device plugin names its device in that variable, which the container's own would replace. A count of 0
        # is none: no device plugin is asked, and the runtime gave every GPU.
        ours.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    if rendezvous(spec):  # torchrun's --shutdown-timeout, as its environment gives it: an older torchrun without
        # the setting (in a user's image) ignores it and keeps its 30 s, where the flag stopped every run
        ours.append({"name": "PET_SHUTDOWN_TIMEOUT", "value": str(shutdown_timeout(spec))})
    else:  # a world of one, said: a key of an envFrom Secret or ConfigMap (unchecked) would say otherwise, and an
        # env entry wins over envFrom's; torchrun sets these for the processes it starts
        ours += [{"name": n, "value": v} for n, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                                        ("LOCAL_WORLD_SIZE", "1"))]
    # A spec's HF_HOME (the one name of ours it may set) replaces ours, e.g. a hub cache on a shared claim: once, not
    # after ours, which the apiserver warns of ("hides previous definition", "may be dropped when using apply").
    theirs = {e.name for e in spec.runtime.env}
    return [e for e in ours if e["name"] not in theirs] + [e.to_wire() for e in spec.runtime.env]


def _volumes(name: str, spec: api.FineTuneJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shm = DEFAULT_SHM if spec.runtime.shm_size is None else spec.runtime.shm_size
    volumes: list[dict[str, Any]] = [
        {"name": "finetune-config", "configMap": {"name": name}},
        {"name": "finetune-hf-cache", "emptyDir": {}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": str(shm)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "finetune-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "finetune-hf-cache", "mountPath": HF_HOME},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]
    for i, (claim, (_, writes)) in enumerate(sorted(claim_fields(spec).items())):
        volumes.append({"name": f"finetune-pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writes}})
        mounts.append({"name": f"finetune-pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writes})
    volumes += [v.to_wire() for v in spec.runtime.volumes]
    mounts += [m.to_wire() for m in spec.runtime.volume_mounts]
    return volumes, mounts


def restricted_security(uid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod and container securityContexts that pass the "restricted" Pod Security Standard; uid 0 sets no user,
    group or fsGroup, for an admission that assigns them (OpenShift's SCC)."""
    ids = {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid} if uid else {}
    # OnRootMismatch: the kubelet hands a claim to the fsGroup once, not by walking every file at each attempt's
    # start (minutes on a dataset of a million images, or an output folder of many checkpoints).
    pod = {"runAsNonRoot": True, **ids, "fsGroupChangePolicy": "OnRootMismatch",
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    return pod, container


def job(ftj: dict[str, Any], spec: api.FineTuneJobSpec, attempt: int, settings: Settings) -> dict[str, Any]:
    meta = _metadata(ftj, attempt)
    name = meta["name"]
    rt, pod = spec.runtime, spec.pod
    resources = rt.resources or settings.trainer_resources
    volumes, mounts = _volumes(name, spec)
    pod_security, container_security = restricted_security(settings.trainer_uid)
    container: dict[str, Any] = {
        "name": TRAINER,
        "image": rt.image or settings.trainer_image,
        "command": command(name, spec),
        "env": _env(spec, resources),
        "envFrom": [e.to_wire() for e in rt.env_from],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}, {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "resources": {side: {k: str(v) for k, v in values.items()} for side, values in resources.to_wire().items()},
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security,
    }
    if rt.image_pull_policy:
        container["imagePullPolicy"] = rt.image_pull_policy.value
    # each name once: the apiserver warned "duplicate name" at every Job's creation (the operator's and the job's
    # both naming regcred), and an apply of the list, a map keyed by name, trips over the second
    pull_secrets = [{"name": name} for name in dict.fromkeys(
        [*settings.trainer_pull_secrets, *(s.name for s in pod.image_pull_secrets)])]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The pause container is PID 1, not the trainer: the kernel drops a signal PID 1 has no handler for, and the
        # trainer has none until its imports and CUDA are up, nor torchrun until its rendezvous is over (up to an
        # hour). A SIGTERM then (a suspend, Kueue's preemption, a drain) was lost: the pod ran its whole grace period
        # holding its GPUs, and the next attempt waited behind it.
        "shareProcessNamespace": True,
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": volumes,
        "nodeSelector": pod.node_selector,
        "tolerations": [t.to_wire() for t in pod.tolerations],
        "imagePullSecrets": pull_secrets,
    }
    optional = {"subdomain": name if rendezvous(spec) else None,
                "serviceAccountName": pod.service_account_name, "schedulerName": pod.scheduler_name,
                "priorityClassName": pod.priority_class_name, "affinity": pod.affinity.to_wire() if pod.affinity else None}
    pod_spec |= {k: v for k, v in optional.items() if v}
    if pod.termination_grace_period_seconds is not None:  # 0 is a setting: no time to checkpoint
        pod_spec["terminationGracePeriodSeconds"] = pod.termination_grace_period_seconds
    own = ftj["metadata"].get("labels", {})
    job_labels = dict(meta["labels"]) | {key: own[key] for key in api.KUEUE_LABELS if own.get(key)}
    made_from = {GENERATION_ANNOTATION: str(ftj["metadata"].get("generation", 0)),
                 RECIPE_ANNOTATION: recipe(spec)}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": meta | {"labels": job_labels, "annotations": made_from},
        "spec": {
            "completionMode": "Indexed",
            "completions": rt.workers,
            "parallelism": rt.workers,
            "backoffLimit": 0,  # the operator owns retries: whole-gang attempts
            # A disruption fails the Job with a reason that outlives the evicted pod (outcome.DISRUPTION_RULE).
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            # Rank 0 exports the model: its success is the run's, and the Job controller stops peers still in their
            # teardown (Kubernetes 1.31 on; an older apiserver drops the field, and the operator decides the same).
            **({"successPolicy": {"rules": [{"succeededIndexes": "0"}]}} if rt.workers > 1 else {}),
            "suspend": False,
            "template": {
                "metadata": {"labels": pod.labels | meta["labels"], "annotations": settings.trainer_pod_annotations | pod.annotations},
                "spec": pod_spec,
            },
        },
    }


def attempt_children(ftj: dict[str, Any], spec: api.FineTuneJobSpec, attempt: int, settings: Settings) -> list[dict[str, Any]]:
    """In creation order: the Job last, so its pods find their config and Service."""
    return [config_map(ftj, spec, attempt), *([service(ftj, attempt)] if rendezvous(spec) else []),
            job(ftj, spec, attempt, settings)]
