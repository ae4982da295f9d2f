"""The operator end to end on the local control plane: real trainers on the process node, the
scheduler and the Job controller deciding what a real cluster would, and the operator under its
own ServiceAccount in a namespace that enforces the restricted Pod Security Standard."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.children import METRICS_PORT
from finetune_operator.reconcile import CLAIM_WAIT_SECONDS
from kube import Kube, condition
from operator_fixture import OperatorEnv, claim, crd_installed, example, operator_env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster

# Small budgets: enough steps for checkpoints and a clear result, little CPU.
SMALL = {"maxTrainSamples": 256, "maxEvalSamples": 64}


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj.get("status", {}).get("conditions", [])}


def claim_folder(env: OperatorEnv, claim: str) -> Path:
    pvc = env.kube.get("pvc", claim, env.namespace)
    assert pvc and pvc["spec"].get("volumeName"), f"claim {claim} is not bound"
    return Path(env.kube.get("pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])


def trainer_pids(pod_ip: str) -> list[int]:
    """The processes of the trainer pod with this IP (the process node runs pods as local processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FINETUNE_METRICS_ADDR={pod_ip}".encode() in environ:
            found.append(int(proc.name))
    return found


def rank0(env: OperatorEnv, name: str, attempt: int) -> dict[str, Any]:
    pods = [p for p in env.objects("pods", name) if p["metadata"]["labels"]["finetune.dev/attempt"] == str(attempt)]
    return next(p for p in pods if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0")


def at_step(step: int) -> Any:
    return lambda obj: obj.get("status", {}).get("progress", {}).get("step", 0) >= step


def operator_metrics(env: OperatorEnv) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _failed(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def logs(env: OperatorEnv, pod: dict[str, Any]) -> str:
    return env.kube.kubectl("logs", "-n", env.namespace, pod["metadata"]["name"], check=False).stdout


def test_the_minilm_example_runs_and_its_status_tells_the_story(operator_env: OperatorEnv) -> None:
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset=SMALL))
    running = env.wait_ftj(name, at_step(1), "training reported by rank 0")
    assert running["status"]["phase"] == "Running" and running["status"]["stage"] == "Training"
    assert running["status"]["progress"]["totalSteps"] == 16 and running["status"]["workers"]["active"] == 1
    # Rank 0 names its pod, as the apiserver knows it, where the operator reads it (its IP may be another pod's later).
    pod = rank0(env, name, 1)
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics", timeout=5) as response:
        assert f'finetune_trainer_pod_info{{uid="{pod["metadata"]["uid"]}"}} 1.0' in response.read().decode()
    done = env.wait_phase(name, "Succeeded")
    status = done["status"]
    assert status["attempts"] == 1 and status["progress"]["percent"] == 100 and status["stage"] == "Done"
    evaluation = status["evaluation"]
    assert set(evaluation["baseline"]) == set(evaluation["final"]) == {"accuracy", "f1"}
    assert evaluation["summary"].startswith("accuracy ")
    assert status["analysis"]["totalParameters"] > 20_000_000 and status["output"]["uri"] == "pvc://results/minilm-sentiment"
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert {"Created", "Scheduled", "Running", "Succeeded"} <= set(conditions(done))
    # The output is on the claim, and the columns show what happened.
    report = json.loads((claim_folder(env, "results") / "minilm-sentiment" / "report.json").read_text())
    assert report["evaluation"]["final"]["accuracy"] == pytest.approx(evaluation["final"]["accuracy"])
    table = env.kube.kubectl("get", "ftj", name, "-n", env.namespace, "-o", "wide").stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "STAGE", "PROGRESS", "WORKERS", "ATTEMPTS"]
    assert "Succeeded" in row and "Done" in row and "100" in row and "accuracy" in row
    # One attempt's children, owned by the job, with deterministic names (one worker: no Service); an Event per
    # transition.
    for kind in ("jobs", "configmaps"):
        objs = env.objects(kind, name)
        assert [o["metadata"]["name"] for o in objs] == ["minilm-sentiment-1"], kind
        assert objs[0]["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
    assert not env.objects("services", name) and "service" not in status["children"]
    env.wait_events(name, "AttemptCreated", "Training", "Completed")  # posted after the status patch
    with urllib.request.urlopen(f"http://127.0.0.1:{env.liveness_port}/healthz", timeout=5) as response:
        assert response.status == 200  # kopf's liveness endpoint
    # The operator's own metrics count what happened.
    succeeded = ("finetune_operator_jobs", (("phase", "Succeeded"),))
    # Counted from kopf's watch events: at load 10+ they can come many seconds after the status was written.
    samples = env.kube.wait_for("the operator's watch to see Succeeded",
                                lambda: m if (m := operator_metrics(env)).get(succeeded) == 1 else None, env.namespace, 60)
    assert samples[("finetune_operator_attempts_total", (("cause", "Created"),))] == 1
    assert samples[("finetune_operator_time_to_running_seconds_count", ())] == 1
    assert samples[("finetune_operator_reconcile_duration_seconds_count", ())] > 3
    assert samples[("finetune_operator_metric_poll_errors_total", (("reason", "MetricsFromAnotherPod"),))] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name,changes", [
    ("digits-resnet18-from-scratch", {"training": {"epochs": 1}}),
    ("tiny-causal-lm", {"dataset": {"maxTrainSamples": 128, "maxEvalSamples": 32}, "training": {"epochs": 1}}),
    ("minilm-sentiment-2workers", {"dataset": SMALL}),
])
def test_every_example_succeeds(operator_env: OperatorEnv, name: str, changes: dict[str, Any]) -> None:
    env = operator_env
    doc = example(name, **changes)
    env.apply(doc)
    done = env.wait_phase(name, "Succeeded", timeout=420)
    status = done["status"]
    assert status["evaluation"]["final"] and status["evaluation"]["summary"] and status["attempts"] == 1
    assert (claim_folder(env, "results") / name / "report.json").exists()
    pods = env.objects("pods", name)
    workers = doc["spec"]["runtime"].get("workers", 1)
    index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert index["0"]["status"]["phase"] == "Succeeded" and len(pods) <= workers
    # A peer finished with rank 0, or was stopped by the Job's success policy once rank 0 had (the Job controller
    # deletes it; the rank's exit is its own affair then).
    assert all(p["status"]["phase"] == "Succeeded" or p["metadata"].get("deletionTimestamp") for p in pods)
    if workers > 1:  # the gang met through the Service: rank 0 (index 0) reported, the others trained with it
        report = json.loads((claim_folder(env, "results") / name / "report.json").read_text())
        assert report["training"]["workers"] == 2


def test_a_missing_dataset_fails_once_with_the_trainers_reason(operator_env: OperatorEnv) -> None:
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset={"uri": "pvc://data/nowhere.csv"}) | {
        "metadata": {"name": "no-data"}})
    failed = env.wait_phase(name, "Failed")
    assert failed["status"]["reason"] == "InvalidDataset" and failed["status"]["attempts"] == 1
    assert failed["status"]["stage"] == "Loading"  # `kubectl get ftj` says where it stopped
    assert "nowhere.csv" in [c["message"] for c in failed["status"]["conditions"] if c["type"] == "Failed"][0]
    time.sleep(3)  # never retried
    assert len(env.objects("jobs", name)) == 1 and env.ftj(name)["status"]["attempts"] == 1


def test_a_secret_volume_not_there_is_shown_then_waited_for(operator_env: OperatorEnv) -> None:
    # The kubelet keeps such a pod in ContainerCreating and says why only in a FailedMount Event: the job must say it
    # (Pending, not a failure), and run once the Secret is made.
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset=SMALL, runtime={
        "volumes": [{"name": "creds", "secret": {"secretName": "hub-token"}}],
        "volumeMounts": [{"name": "creds", "mountPath": "/creds", "readOnly": True}]}) | {"metadata": {"name": "creds"}})
    stuck = env.wait_ftj(name, lambda o: conditions(o).get("Running") == ("False", "FailedMount"),
                         "Running False FailedMount", timeout=240)  # the operator asks after 2 minutes of creating
    message = [c["message"] for c in stuck["status"]["conditions"] if c["type"] == "Running"][0]
    assert f"secret {env.namespace}/hub-token not found" in message, message
    assert stuck["status"]["phase"] == "Pending" and stuck["status"].get("failures", 0) == 0
    env.kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub-token"},
                    "stringData": {"token": "t"}}, env.namespace)
    running = env.wait_phase(name, "Running", timeout=120)
    assert running["status"]["attempts"] == 1
    # `kubectl delete` waits for the operator's finalizer: a running job's is released in moments, not after kopf's
    # default minute between checks that its timer has stopped (when the deletion came during a tick).
    started = time.monotonic()
    env.kube.kubectl("delete", "ftj", name, "-n", env.namespace, "--wait=true", "--timeout=90s")
    assert time.monotonic() - started < 50  # kopf's default minute is what this guards against


def test_a_gpu_request_no_node_can_hold_shows_the_schedulers_message(operator_env: OperatorEnv) -> None:
    env = operator_env
    doc = example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}})
    name = env.apply(doc)
    stuck = env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "Unschedulable", "Unschedulable")
    message = [c["message"] for c in stuck["status"]["conditions"] if c["type"] == "Scheduled"][0]
    assert "nodes are available" in message and "Insufficient nvidia.com/gpu" in message
    assert stuck["status"]["phase"] == "Pending"
    env.wait_events(name, "Unschedulable", type="Warning")  # posted after the status patch


def test_pods_the_job_controller_cannot_create_are_not_a_silent_pending(operator_env: OperatorEnv) -> None:
    env = operator_env
    name = env.apply(example("minilm-sentiment", pod={"serviceAccountName": "no-such-account"}))
    stuck = env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "FailedCreate", "FailedCreate", timeout=120)
    message = [c["message"] for c in stuck["status"]["conditions"] if c["type"] == "Scheduled"][0]
    assert "no-such-account" in message and stuck["status"]["phase"] == "Pending"


def quota(env: OperatorEnv, name: str, hard: dict[str, str]) -> None:
    """A ResourceQuota in the test's namespace, once its controller has counted it (admission enforces it then)."""
    env.kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}},
                   env.namespace)
    env.kube.wait_for("the quota counted", lambda: (env.kube.get("resourcequota", name, env.namespace)
                                                    or {}).get("status", {}).get("hard"), env.namespace)


def test_a_quota_that_refuses_the_attempt_is_waited_for_not_failed(operator_env: OperatorEnv) -> None:
    """A ResourceQuota refuses the attempt's ConfigMap (403, exceeded quota): the job waits, and says why (Created
    False with the apiserver's message, a Warning Event), and its attempt is made once the namespace has room."""
    env = operator_env
    quota(env, "no-configmaps", {"count/configmaps": "0"})
    name = env.apply(example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}}))

    def created(obj: dict[str, Any]) -> dict[str, Any]:
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Created"), {})

    waiting = env.wait_ftj(name, lambda o: created(o).get("reason") == "ExceededQuota", "ExceededQuota", timeout=60)
    assert created(waiting)["status"] == "False" and "exceeded quota" in created(waiting)["message"]
    assert waiting["status"]["phase"] == "Pending" and not env.objects("jobs", name)
    env.wait_events(name, "ExceededQuota", type="Warning")  # posted after the status patch
    env.kube.kubectl("delete", "resourcequota", "no-configmaps", "-n", env.namespace)
    env.wait_ftj(name, lambda o: created(o).get("status") == "True", "the attempt made", timeout=120)
    assert len(env.objects("jobs", name)) == 1


def test_an_earlier_attempt_s_config_map_and_service_make_room_for_the_next(operator_env: OperatorEnv) -> None:
    """Kept until the job's deletion, every attempt's ConfigMap and Service counted against the namespace's quota: a
    job of two processes per worker, resumed in a namespace that allows one Service, waited for quota for ever."""
    env = operator_env
    quota(env, "one-service", {"services": "1"})
    name = env.apply(example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}},
                                                         "processesPerWorker": 2}))
    env.wait_ftj(name, lambda o: conditions(o).get("Created") == ("True", "AttemptCreated"), "attempt 1", timeout=60)
    assert env.kube.get("service", f"{name}-1", env.namespace)
    patch = ("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p")
    env.kube.kubectl(*patch, '{"spec":{"suspend":true}}')
    env.wait_phase(name, "Suspended", timeout=60)
    env.kube.kubectl(*patch, '{"spec":{"suspend":false}}')
    # Made once the quota counts the Service deleted: the first try may be refused (ExceededQuota), the next 30 s on.
    # By its children: Created stays attempt 1's True until attempt 2's are made.
    env.wait_ftj(name, lambda o: o.get("status", {}).get("children", {}).get("job") == f"{name}-2" and conditions(
        o).get("Created") == ("True", "AttemptCreated"), "attempt 2 made", timeout=120)
    for kind in ("configmaps", "services"):
        assert [o["metadata"]["name"] for o in env.objects(kind, name)] == [f"{name}-2"], kind


def test_a_child_name_held_by_an_object_not_its_own_is_waited_for_visibly(operator_env: OperatorEnv) -> None:
    """An earlier job's children orphaned by `kubectl delete --cascade=orphan` hold the new one's names: its status
    said nothing, and it waited for ever; now it says which object it waits for."""
    env = operator_env
    name = "name-taken"
    env.kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-1"}, "data": {}},
                   env.namespace)
    env.apply(example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}})
              | {"metadata": {"name": name}})
    waiting = env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "NameTaken", "NameTaken", timeout=60)
    created = next(c for c in waiting["status"]["conditions"] if c["type"] == "Created")
    assert created["status"] == "False" and f"ConfigMap named {name}-1" in created["message"]
    assert waiting["status"]["phase"] == "Pending" and not env.objects("jobs", name)
    env.kube.kubectl("delete", "configmap", f"{name}-1", "-n", env.namespace)
    env.wait_ftj(name, lambda o: conditions(o).get("Created") == ("True", "AttemptCreated"), "the attempt", timeout=60)
    assert len(env.objects("jobs", name)) == 1


def test_a_retune_whose_suspend_the_operator_never_saw_takes_effect(operator_env: OperatorEnv) -> None:
    """Suspended, retuned and resumed between two ticks (`kubectl patch` suspend, then `kubectl apply` of the new spec,
    within a poll; here while the operator is down, so surely): the attempt ran on as it was made, here unschedulable
    for ever, while the spec and observedGeneration said it had the new resources."""
    env = operator_env
    name = env.apply(example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}}))
    env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "Unschedulable", "Unschedulable")
    env.kill()
    patch = ("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p")
    env.kube.kubectl(*patch, '{"spec":{"suspend":true}}')
    env.kube.kubectl(*patch, '{"spec":{"suspend":false,"runtime":{"resources":{"limits":{"nvidia.com/gpu":98}}}}}')
    env.start()
    retried = env.wait_ftj(name, lambda o: o.get("status", {}).get("attempts") == 2, "attempt 2", timeout=90)
    assert retried["status"].get("failures", 0) == 0
    env.kube.wait_for("attempt 1's Job deleted", lambda: [j["metadata"]["name"] for j in env.objects("jobs", name)]
                      == [f"{name}-2"], env.namespace, timeout=60)
    limits = env.objects("jobs", name)[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "98"


def test_the_deadline_fails_the_job_and_deleting_it_collects_the_children(operator_env: OperatorEnv) -> None:
    env = operator_env
    doc = example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}})
    doc["spec"]["activeDeadlineSeconds"] = 3
    name = env.apply(doc)
    failed = env.wait_phase(name, "Failed", timeout=60)
    assert failed["status"]["reason"] == "DeadlineExceeded"
    env.kube.wait_for("the attempt's Job deleted", lambda: not env.objects("jobs", name), env.namespace)
    # `kubectl get ftj` shows no worker left (the job is never reconciled again: what it says now stays)
    assert env.ftj(name)["status"]["workers"]["active"] == 0
    env.kube.kubectl("delete", "ftj", name, "-n", env.namespace, "--wait=true", "--timeout=60s")
    for kind in ("configmaps", "services", "pods"):
        env.kube.wait_for(f"{kind} collected", lambda kind=kind: not env.objects(kind, name), env.namespace)


def test_a_finished_job_retuned_says_that_nothing_runs_it_again(operator_env: OperatorEnv) -> None:
    """A plain edit of a finished job is refused with "may change only while the job is suspended"; suspended and
    retuned, it was taken, observedGeneration followed, and nothing ran it or said so."""
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset={"uri": "pvc://data/nowhere.csv"}) | {
        "metadata": {"name": "finished-retuned"}})
    env.wait_phase(name, "Failed")
    patch = ("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p")
    # Said once per change: the apiserver keeps what was said (status.ignoredChange), and a later edit of another
    # field (a TTL) says nothing again. kopf posts Events after the status patch, in the background: each is waited for.
    def told() -> int:
        return sum(e.get("count") or 1 for e in env.events(name) if e["reason"] == "SpecChangeIgnored")

    env.kube.kubectl(*patch, '{"spec":{"suspend":true}}')
    ignored = env.wait_events(name, "SpecChangeIgnored", timeout=30)
    assert ignored[0]["type"] == "Warning" and "delete it and apply it again" in ignored[0]["message"]
    env.kube.kubectl(*patch, '{"spec":{"training":{"epochs":5}}}')
    generation = env.ftj(name)["metadata"]["generation"]
    env.wait_ftj(name, lambda o: o["status"].get("observedGeneration") == generation, "the retune seen", timeout=60)
    assert env.ftj(name)["status"]["phase"] == "Failed" and len(env.objects("jobs", name)) == 1
    assert env.ftj(name)["status"].get("ignoredChange", "").startswith("suspend=true,recipe=")
    env.kube.wait_for("the retune told", lambda: told() >= 2, env.namespace, timeout=30)
    before = told()
    env.kube.kubectl(*patch, '{"spec":{"ttlSecondsAfterFinished":3600}}')
    generation = env.ftj(name)["metadata"]["generation"]
    env.wait_ftj(name, lambda o: o["status"].get("observedGeneration") == generation, "the TTL seen", timeout=60)
    time.sleep(2)
    assert told() == before
    # One that failed before it had a Job (InvalidSpec) is told when it is suspended, to be fixed.
    bad = example("minilm-sentiment", adjust={"freeze": {"strategy": "regex", "pattern": "(("}}) | {
        "metadata": {"name": "bad-regex"}}
    env.apply(bad)
    env.wait_phase("bad-regex", "Failed")
    env.kube.kubectl("patch", "ftj", "bad-regex", "-n", env.namespace, "--type=merge", "-p",
                     '{"spec":{"suspend":true}}')
    env.wait_events("bad-regex", "SpecChangeIgnored", type="Warning", timeout=30)


def test_the_ttl_deletes_a_finished_job(operator_env: OperatorEnv) -> None:
    env = operator_env
    doc = example("minilm-sentiment", dataset={"uri": "pvc://data/nowhere.csv"}) | {"metadata": {"name": "short-lived"}}
    doc["spec"]["ttlSecondsAfterFinished"] = 2
    name = env.apply(doc)
    env.wait_phase(name, "Failed")
    env.kube.wait_for("the finished job deleted", lambda: env.kube.get("ftj", name, env.namespace) is None,
                      env.namespace, timeout=180)
    env.kube.wait_for("its children collected", lambda: not env.objects("configmaps", name), env.namespace)


def test_specs_only_the_operator_can_judge_fail_as_invalid_spec(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "single"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
                   env.namespace)
    # A raw block device, which no container mounts as a folder; a claim being deleted (a finalizer, a backup
    # tool's say, holds it), waited for as a missing one: the pods of either waited in Pending for ever.
    block, going = claim("block", ["ReadWriteOnce"]), claim("going", ["ReadWriteOnce"])
    block["spec"]["volumeMode"], going["metadata"]["finalizers"] = "Block", ["example.com/backup"]
    env.kube.apply([block, going], env.namespace)
    env.kube.kubectl("delete", "pvc", "going", "-n", env.namespace, "--wait=false")
    try:
        _judged_and_failed(env)
    finally:  # else the namespace's deletion waits on it for ever
        env.kube.kubectl("patch", "pvc", "going", "-n", env.namespace, "--type=merge", "-p",
                         '{"metadata":{"finalizers":null}}')


def _judged_and_failed(env: OperatorEnv) -> None:
    cases = {
        "no-claim": ({"output": {"uri": "pvc://absent/out"}}, "spec.output.uri: the PersistentVolumeClaim 'absent'"),
        "rwo-output": ({"output": {"uri": "pvc://single/out"}, "runtime": {"workers": 2}},
                       "spec.output.uri: claim 'single' is ReadWriteOnce"),
        "block-data": ({"dataset": {"uri": "pvc://block/sentiment.csv", "labelField": "sentiment"}},
                       "spec.dataset.uri: claim 'block' is a raw block device"),
        "going-output": ({"output": {"uri": "pvc://going/out"}},
                         "spec.output.uri: the PersistentVolumeClaim 'going' is being deleted"),
        "bad-regex": ({"adjust": {"freeze": {"strategy": "regex", "pattern": "(("}}},
                      "spec.adjust.freeze.pattern: not a valid regular expression"),
    }
    # A claim made right after its job (`kubectl apply -f dir/`, job.yaml before pvc.yaml) is waited for, visibly.
    # Its claim has to come within the 30 s from the job's creation: made as soon as the job is seen waiting, before
    # the others are applied (their five kubectl runs and the operator's burst of them, at load 10+, raced those 30 s).
    late = example("minilm-sentiment", output={"uri": "pvc://late/out"},
                   runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}}) | {"metadata": {"name": "late-claim"}}
    env.apply(late)
    waiting = env.wait_ftj("late-claim", lambda o: o.get("status", {}).get("reason") == "ClaimNotFound", "the wait")
    created = next(c for c in waiting["status"]["conditions"] if c["type"] == "Created")
    assert waiting["status"]["phase"] == "Pending" and "'late' does not exist" in created["message"]
    env.kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "late"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
                   env.namespace)
    for name, (changes, message) in cases.items():
        doc = example("minilm-sentiment") | {"metadata": {"name": name}}
        doc["spec"] |= changes
        env.apply(doc)
    env.wait_ftj("late-claim", lambda o: o.get("status", {}).get("attempts") == 1, "an attempt")
    for name, (_, message) in cases.items():
        failed = env.wait_phase(name, "Failed", timeout=90)
        assert failed["status"]["reason"] == "InvalidSpec"
        assert message in [c["message"] for c in failed["status"]["conditions"] if c["type"] == "Failed"][0]
        assert not env.objects("jobs", name)  # nothing was started
    # The wait is the same for a typo, and for a claim being deleted: each failed only once the claim's time had
    # passed. (Asked of its Failed condition, not of its status at some moment, which a slow machine can reach after
    # those 30 s.)
    for name in ("no-claim", "going-output"):
        waited = _time(_failed(env.ftj(name))["lastTransitionTime"]) - _time(
            env.ftj(name)["metadata"]["creationTimestamp"])
        assert waited >= timedelta(seconds=CLAIM_WAIT_SECONDS), (name, waited)
    assert env.ftj("late-claim")["status"]["phase"] == "Pending"  # its claim came in time: never failed


def test_a_child_the_apiserver_refuses_fails_as_invalid_spec(operator_env: OperatorEnv) -> None:
    """A cluster policy (a ValidatingAdmissionPolicy) refuses the child Job: the job fails once, clearly."""
    env = operator_env
    policy = f"no-big-jobs-{env.namespace}"
    env.kube.apply([
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                          "operations": ["CREATE"], "resources": ["jobs"]}]},
                  "validations": [{"expression": "object.spec.parallelism <= 1",
                                   "message": "jobs here run one pod at most"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}}}}},
    ], env.namespace)
    # The apiserver enforces a new policy once its informer has seen it, not when the create returns: wait until
    # a server-side dry run of a 2-pod Job is refused, or the operator's Job might come first and be admitted.
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "policy-probe"},
             "spec": {"parallelism": 2, "template": {"spec": {"restartPolicy": "Never", "containers": [
                 {"name": "c", "image": "busybox"}]}}}}
    try:
        env.kube.wait_for("the policy in force", lambda: "jobs here run one pod at most" in env.kube.apply(
            probe, env.namespace, "--dry-run=server", check=False).stderr, env.namespace, timeout=30)
        name = env.apply(example("minilm-sentiment-2workers"))
        failed = env.wait_phase(name, "Failed", timeout=60)
        message = [c["message"] for c in failed["status"]["conditions"] if c["type"] == "Failed"][0]
        assert failed["status"]["reason"] == "InvalidSpec" and "jobs here run one pod at most" in message
    finally:
        env.kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False)


@pytest.mark.slow
def test_a_killed_trainer_resumes_from_its_checkpoint(operator_env: OperatorEnv) -> None:
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset={"maxTrainSamples": 320, "maxEvalSamples": 64},
                             training={"checkpointEverySteps": 5}))
    env.wait_ftj(name, at_step(7), "past the first checkpoint", timeout=300)
    pod = rank0(env, name, 1)
    pids = trainer_pids(pod["status"]["podIP"])
    assert pids, "no trainer process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 2 and done["status"]["failures"] == 1
    second = logs(env, rank0(env, name, 2))
    assert "resumed from" in second
    # The first progress line ("step 5/20 epoch 0 loss ...": where it resumed, the checkpoint of step 5 or later);
    # other lines may say "step" too (an analysis finding).
    first_step = int(re.search(r" step (\d+)/\d+ ", second)[1])
    assert first_step >= 5, "attempt 2 started from scratch"
    assert any(e["reason"] != "Completed" and e["type"] == "Warning" for e in env.events(name))


@pytest.mark.slow
def test_suspend_mid_run_and_resume(operator_env: OperatorEnv) -> None:
    env = operator_env
    # 30 steps, suspended after the first: the suspend's way to the trainer (a tick, the Job's delete, SIGTERM) is
    # short beside the rest of the run, which a loaded machine's late status could otherwise let finish first
    doc = example("minilm-sentiment", dataset={"maxTrainSamples": 480, "maxEvalSamples": 64},
                  training={"checkpointEverySteps": 100})
    name = env.apply(doc)
    env.wait_ftj(name, at_step(1), "training", timeout=300)
    env.kube.kubectl("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    suspended = env.wait_phase(name, "Suspended", timeout=60)
    assert conditions(suspended)["Suspended"] == ("True", "Suspended")
    env.kube.wait_for("the attempt's pods gone", lambda: not env.objects("pods", name), env.namespace, timeout=120)
    # While suspended the runtime may change (Kueue's window to place it); then it resumes, not restarts.
    env.kube.kubectl("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p",
                     '{"spec":{"suspend":false,"pod":{"labels":{"placed-by":"kueue"}}}}')
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 2 and done["status"].get("failures", 0) == 0
    second = rank0(env, name, 2)
    assert "resumed from" in logs(env, second) and second["metadata"]["labels"]["placed-by"] == "kueue"


@pytest.mark.slow
def test_a_child_job_its_queue_preempts_and_admits_again_resumes_within_its_attempt(operator_env: OperatorEnv) -> None:
    """What Kueue does to a workload it preempts: the child Job suspended (the Job controller stops its pods), then
    admitted again (unsuspended: new pods). The stopped pods are no failure, the job says Queued meanwhile, and the
    attempt goes on from the checkpoint its SIGTERM wrote."""
    env = operator_env
    doc = example("minilm-sentiment", dataset={"maxTrainSamples": 480, "maxEvalSamples": 64},
                  training={"checkpointEverySteps": 100})
    doc["spec"]["backoffLimit"] = 0  # a counted failure would fail the job
    name = env.apply(doc)
    env.wait_ftj(name, at_step(1), "training", timeout=300)
    first = rank0(env, name, 1)
    [child] = env.objects("jobs", name)

    def suspend(value: bool) -> None:
        env.kube.kubectl("patch", "job", child["metadata"]["name"], "-n", env.namespace, "--type=merge", "-p",
                         json.dumps({"spec": {"suspend": value}}))

    suspend(True)
    queued = env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "Queued", "queued", timeout=60)
    assert queued["status"]["phase"] == "Pending" and conditions(queued)["Scheduled"] == ("False", "Queued")
    env.kube.wait_for("the preempted pods gone", lambda: not env.objects("pods", name), env.namespace, timeout=120)
    assert env.ftj(name)["status"]["reason"] == "Queued" and not env.ftj(name)["status"].get("failures")
    suspend(False)
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 1 and done["status"].get("failures", 0) == 0
    assert [j["metadata"]["uid"] for j in env.objects("jobs", name)] == [child["metadata"]["uid"]]
    second = rank0(env, name, 1)
    assert second["metadata"]["uid"] != first["metadata"]["uid"] and "resumed from" in logs(env, second)


@pytest.mark.slow
def test_a_job_made_again_under_its_name_starts_once_the_deleted_ones_trainer_has_stopped(
        operator_env: OperatorEnv) -> None:
    """`kubectl delete` and `apply` again (how a running job's recipe is changed): the deleted job's trainer writes its
    last checkpoint to the same output for up to its grace period, and the new job's first attempt waits for it."""
    env = operator_env
    doc = example("minilm-sentiment", dataset=SMALL, pod={"terminationGracePeriodSeconds": 20})
    name = env.apply(doc)
    env.wait_ftj(name, at_step(1), "training", timeout=300)
    old = rank0(env, name, 1)
    for pid in trainer_pids(old["status"]["podIP"]):  # a checkpoint that takes its whole grace period
        os.kill(pid, signal.SIGSTOP)
    env.kube.kubectl("delete", "ftj", name, "-n", env.namespace, "--wait=true", "--timeout=60s")
    env.apply(doc)
    stopping = env.kube.wait_for("the old pod being deleted", lambda: (env.kube.get("pod", old["metadata"]["name"],
                                 env.namespace) or {}).get("metadata", {}).get("deletionTimestamp"), env.namespace)
    waiting = env.wait_ftj(name, lambda o: o.get("status", {}).get("reason") == "EarlierPodsStopping",
                           "waiting for the old pod", timeout=60)
    assert old["metadata"]["name"] in [c["message"] for c in waiting["status"]["conditions"] if c["type"] == "Created"][0]
    env.wait_ftj(name, lambda o: o.get("status", {}).get("attempts") == 1, "attempt 1", timeout=120)
    new_job = next(j for j in env.objects("jobs", name)
                   if j["metadata"]["labels"]["finetune.dev/job-uid"] == waiting["metadata"]["uid"])
    # The old trainer is killed at its deletionTimestamp (the end of its grace period), and only then reported stopped.
    assert _time(new_job["metadata"]["creationTimestamp"]) >= _time(stopping), (new_job["metadata"], stopping)
    env.wait_phase(name, "Running", timeout=240)


@pytest.mark.slow
def test_an_evicted_trainer_is_retried_without_counting(operator_env: OperatorEnv) -> None:
    env = operator_env
    doc = example("minilm-sentiment", dataset={"maxTrainSamples": 320, "maxEvalSamples": 64})
    doc["spec"]["backoffLimit"] = 0  # a counted failure would fail the job
    name = env.apply(doc)
    env.wait_ftj(name, at_step(3), "training", timeout=300)
    pod = rank0(env, name, 1)["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": env.namespace}}
    env.kube.kubectl("create", "--raw", f"/api/v1/namespaces/{env.namespace}/pods/{pod}/eviction", "-f", "-",
                     stdin=json.dumps(eviction))
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 2 and done["status"].get("failures", 0) == 0


@pytest.mark.slow
def test_the_operator_killed_mid_job_duplicates_nothing(operator_env: OperatorEnv) -> None:
    env = operator_env
    name = env.apply(example("minilm-sentiment", dataset=SMALL))
    env.wait_ftj(name, lambda o: o.get("status", {}).get("attempts") == 1, "first attempt created")
    env.kill()
    env.start()
    env.wait_ftj(name, at_step(1), "training", timeout=300)
    env.kill()
    env.start()
    done = env.wait_phase(name, "Succeeded", timeout=420)
    assert done["status"]["attempts"] == 1 and done["status"]["evaluation"]["final"]
    for kind in ("jobs", "configmaps"):
        assert len(env.objects(kind, name)) == 1, kind


def test_built_children_of_every_example_pass_the_apiservers_validation(kube: Kube, crd_installed: None,
                                                                        restricted_namespace: str) -> None:
    """What the CRD accepted, the Job's own validation (and restricted admission) accepts too."""
    from bad_corpus import readme_manifests
    from finetune_operator import children
    from finetune_operator.api import FineTuneJob
    from finetune_operator.settings import Settings

    docs = [yaml.safe_load(p.read_text()) for p in sorted(Path(__file__).parents[1].glob("deploy/examples/*.yaml"))]
    for doc in docs + readme_manifests():
        doc["metadata"] |= {"namespace": restricted_namespace, "uid": "00000000-0000-0000-0000-000000000000"}
        spec = FineTuneJob.from_wire(doc).spec
        for obj in children.attempt_children(doc, spec, 1, Settings()):
            obj["metadata"].pop("ownerReferences")  # the owner does not exist
            result = kube.apply(obj, restricted_namespace, "--dry-run=server", check=False)
            assert result.returncode == 0, f"{doc['metadata']['name']}: {obj['kind']}: {result.stderr}"
            assert "PodSecurity" not in result.stderr, result.stderr  # restricted warns on workload templates
