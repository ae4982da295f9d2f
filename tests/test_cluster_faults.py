"""The operator under faults, on the real control plane: it is SIGKILLed again and again during a burst, the
kube-apiserver and etcd restart under a training job, and trainers' metrics endpoints misbehave.

The long versions (a burst of 50 with 20 kills) are marked `long` and run with `pytest -m long`; `make test`
runs the short ones."""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.request
from typing import Any

import pytest
import yaml

from fault_servers import FaultServer
from finetune_operator import rbac
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.children import METRICS_PORT, rendezvous
from finetune_operator.handlers import EARLIER_JOBS_KEPT, READABLE_CHECK_SECONDS
from finetune_operator.status import STALE_AFTER_SECONDS
from kube import Kube, condition
from operator_fixture import (REPO, SERVICE_ACCOUNT, OperatorEnv, a_trainer_outlived_by_a_sidecar_is_ended,  # noqa: F401
                              crd_installed, example, kwok_job, kwok_results, operator_env)

pytestmark = pytest.mark.cluster

BACKOFF_LIMIT = 1


def _healthy(env: OperatorEnv) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{env.liveness_port}/healthz", timeout=2):
            return True
    except OSError:
        return False


def _terminal(obj: dict[str, Any]) -> bool:
    return obj.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _crash_repeatedly(env: OperatorEnv, kills: int, rng: random.Random) -> None:
    """SIGKILL the operator at a random moment of its work (0–2.5 s after it answers /healthz), then start it."""
    for _ in range(kills):
        env.kube.wait_for("the operator's /healthz", lambda: _healthy(env), env.namespace, timeout=120)
        time.sleep(rng.uniform(0, 2.5))
        env.kill()
        env.start()


def _burst_under_kills(env: OperatorEnv, output: str, jobs: int, kills: int) -> None:
    rng = random.Random(jobs * 1000 + kills)
    failing = set(rng.sample(range(jobs), jobs // 5))  # every attempt of these fails: retries under the kills too
    names = []
    for i in range(jobs):
        doc = kwok_job(f"burst-{i:02d}", f"{output}/burst-{i:02d}", runs_for="2s", up_to="15s", fail=i in failing)
        doc["spec"]["backoffLimit"] = BACKOFF_LIMIT
        names.append(env.apply(doc))
    _crash_repeatedly(env, kills, rng)
    assert len(env.restarts) == kills
    for name in names:
        env.wait_ftj(name, _terminal, "a terminal phase", timeout=300)
    ftjs = {o["metadata"]["name"]: o for o in _listed(env, "ftj")}
    jobs_by_owner = _by_job_name(_listed(env, "jobs"))
    config_maps = _by_job_name(_listed(env, "configmaps"))
    services = _by_job_name(_listed(env, "services"))
    for i, name in enumerate(names):
        status = ftjs[name]["status"]
        conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
        expected_attempts = BACKOFF_LIMIT + 1 if i in failing else 1
        assert status["attempts"] == expected_attempts, (name, status)
        if i in failing:
            assert status["phase"] == "Failed" and status["reason"] == "BackoffLimitExceeded", (name, status)
            assert conditions["Failed"] == ("True", "BackoffLimitExceeded")
        else:
            assert status["phase"] == "Succeeded" and conditions["Succeeded"] == ("True", "Completed"), (name, status)
            assert "Restarting" not in conditions, (name, status)  # a crash of the operator is no failed attempt
        # The Jobs of the last attempt and the EARLIER_JOBS_KEPT before it (their pods' logs), the ConfigMap and
        # Service of the last only (handlers._drop_earlier)
        last = [f"{name}-{expected_attempts}"]
        kept = range(max(1, expected_attempts - EARLIER_JOBS_KEPT), expected_attempts + 1)
        wanted = {"Job": [f"{name}-{a}" for a in kept], "ConfigMap": last, "Service": last}
        uid = ftjs[name]["metadata"]["uid"]
        gang = rendezvous(FineTuneJobSpec.model_validate(ftjs[name]["spec"]))  # else no Service
        for kind, found in (("Job", jobs_by_owner), ("ConfigMap", config_maps), ("Service", services)):
            objects = found.pop(name, [])
            assert sorted(o["metadata"]["name"] for o in objects) == (wanted[kind] if kind != "Service" or gang else []), \
                (kind, name)
            assert all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in objects), (kind, name)
    # Nothing that belongs to no FineTuneJob of this burst.
    assert not jobs_by_owner and not config_maps and not services


def _listed(env: OperatorEnv, kind: str) -> list[dict[str, Any]]:
    return yaml.safe_load(env.kube.kubectl("get", kind, "-n", env.namespace, "-o", "yaml").stdout)["items"]


def _by_job_name(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        owner = (obj["metadata"].get("labels") or {}).get("finetune.dev/job-name")
        if owner:
            found.setdefault(owner, []).append(obj)
    return found


def test_operator_killed_during_a_burst_leaves_each_job_right(operator_env: OperatorEnv, kwok_results: str) -> None:
    _burst_under_kills(operator_env, kwok_results, jobs=10, kills=5)


@pytest.mark.long
def test_operator_killed_20_times_during_a_burst_of_50(operator_env: OperatorEnv, kwok_results: str) -> None:
    _burst_under_kills(operator_env, kwok_results, jobs=50, kills=20)


def _restart(kube: Kube, component: str) -> None:
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    import cluster  # deploy/local/cluster.py

    # Started once more if it did not come back (it exited, or a loaded machine took longer): left down, every later
    # test of the session failed with it.
    try:
        cluster.restart(kube.cluster_dir, component, timeout=120)
    except cluster.ClusterError as error:
        print(f"{component} did not come back ({error}): starting it again", file=sys.stderr)
        cluster.restart(kube.cluster_dir, component, timeout=180)


def test_a_training_job_completes_once_across_apiserver_and_etcd_restarts(operator_env: OperatorEnv) -> None:
    if operator_env.kube.cluster_dir is None:
        pytest.skip("the control plane is not this session's to restart")
    env = operator_env
    name = env.apply(example("tiny-causal-lm", training={"epochs": 3}))
    env.wait_ftj(name, lambda o: (o.get("status", {}).get("progress") or {}).get("step", 0) > 0, "training", 300)
    for component in ("kube-apiserver", "etcd"):
        _restart(env.kube, component)
        step = env.ftj(name)["status"]["progress"]["step"]
        # The operator reconnects: the status moves on (or the job ends) after each restart.
        env.wait_ftj(name, lambda o, s=step: _terminal(o) or o["status"]["progress"]["step"] > s,
                     f"progress after the {component} restart", 180)
    done = env.wait_phase(name, "Succeeded", timeout=600)
    assert done["status"]["attempts"] == 1 and done["status"].get("failures", 0) == 0
    assert [j["metadata"]["name"] for j in env.objects("jobs", name)] == [f"{name}-1"]
    assert env.process is not None and env.process.poll() is None, "the operator exited"


def test_a_status_write_the_apiserver_refuses_does_not_end_the_jobs_reconciles(operator_env: OperatorEnv,
                                                                               kwok_results: str) -> None:
    """kopf sent the status patch after each tick, and one that failed there (a 422, or an apiserver down longer
    than kopf's retries) ended the job's timer for good: the job was never reconciled again until the operator
    restarted. A policy refuses the operator's status writes for a while; once it goes, the job runs to its end."""
    env = operator_env
    policy = f"no-status-{env.namespace}"
    refused = "status writes refused for now"
    env.kube.apply([
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"matchConstraints": {"resourceRules": [{"apiGroups": ["finetune.dev"], "apiVersions": ["*"],
                                                          "operations": ["UPDATE"],
                                                          "resources": ["finetunejobs/status"]}]},
                  "validations": [{"expression": "!has(object.status)", "message": refused}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}}}}},
    ], env.namespace)
    try:
        # In force once a status write is refused (the apiserver's informer sees a new policy a moment later): a job
        # another controller runs, which the operator leaves alone, takes the probe's writes.
        probe = kwok_job("status-probe", f"{kwok_results}/probe")
        probe["spec"]["managedBy"] = "example.com/another"
        env.apply(probe)
        env.kube.wait_for("the policy in force", lambda: refused in env.kube.kubectl(
            "patch", "ftj", "status-probe", "-n", env.namespace, "--subresource=status", "--type=merge",
            "-p", '{"status":{"phase":"Pending"}}', check=False).stderr, env.namespace, timeout=30)
        name = env.apply(kwok_job("status-refused", f"{kwok_results}/refused"))
        # The operator creates the attempt; its status writes are refused, so the job shows none.
        env.kube.wait_for("the attempt's Job", lambda: env.objects("jobs", name), env.namespace, timeout=60)
        time.sleep(5)  # more ticks, each refused
        assert "status" not in env.ftj(name)
    finally:
        env.kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False)
    done = env.wait_phase(name, "Succeeded", timeout=120)
    assert done["status"]["attempts"] == 1 and [j["metadata"]["name"] for j in env.objects("jobs", name)] == [
        f"{name}-1"]


def _operator_metric(env: OperatorEnv, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5).read().decode()
    line = next((line for line in text.splitlines() if line.startswith(f"{name}{{{labels}}}")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_faulty_metrics_endpoints_make_their_jobs_stale_and_no_other(operator_env: OperatorEnv,
                                                                    kwok_results: str) -> None:
    env = operator_env
    faults = {"hang": "MetricsTimeout", "garbage": "MetricsUnparsable", "close": "MetricsUnreachable", "ok": None}
    for behaviour in faults:
        env.apply(kwok_job(f"metrics-{behaviour}", f"{kwok_results}/{behaviour}", runs_for="600s"))
    servers = []
    try:
        for behaviour in faults:
            pod = env.kube.wait_for(f"metrics-{behaviour}'s rank 0 running", lambda b=behaviour: next(
                (p for p in env.objects("pods", f"metrics-{b}")
                 if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")), None), env.namespace)
            # kwok's pod IPs are on loopback: the test answers as that pod's trainer would, or would not.
            servers.append(FaultServer(pod["status"]["podIP"], METRICS_PORT, behaviour))
        for behaviour, reason in faults.items():
            if reason:
                stale = env.wait_ftj(f"metrics-{behaviour}", lambda o, r=reason: any(
                    c["type"] == "MetricsStale" and c["status"] == "True" and c["reason"] == r
                    for c in o["status"].get("conditions", [])), f"MetricsStale {reason}", 150)  # never read: a minute
                assert stale["status"]["phase"] == "Running"
        for reason in filter(None, faults.values()):
            # Counted from the attempt's first minute on (a starting rank 0 is no fault); a hanging endpoint, stale
            # by then, is read again up to 16 polls later (SlowScrapes)
            env.kube.wait_for(f"poll errors {reason} counted", lambda r=reason: _operator_metric(
                env, "finetune_operator_metric_poll_errors_total", f'reason="{r}"') > 0, env.namespace, timeout=60)
        healthy = env.wait_ftj("metrics-ok", lambda o: (o["status"].get("progress") or {}).get("step") == 7,
                               "the healthy job's step", 30)
        first = healthy["status"]["progress"]["updatedAt"]
        # Refreshed before it would count as stale; a fixed 3 s sleep can be shorter than one reconcile at load 10+.
        again = env.wait_ftj("metrics-ok", lambda o: o["status"]["progress"]["updatedAt"] > first,
                             "the healthy job's status refreshed", STALE_AFTER_SECONDS)["status"]
        assert not any(c["type"] == "MetricsStale" and c["status"] == "True" for c in again["conditions"])
        env.wait_events("metrics-hang", "MetricsTimeout")  # posted after the status patch
    finally:
        for server in servers:
            server.close()


def test_jobs_by_phase_counts_finished_jobs_after_an_operator_restart(operator_env: OperatorEnv,
                                                                       kwok_results: str) -> None:
    """A finished job is never reconciled again, so the gauge must not wait for a reconcile to read kopf's index:
    restarted onto finished jobs alone, the operator said 0 in every phase."""
    env = operator_env
    done = env.apply(kwok_job("phase-done", f"{kwok_results}/done", runs_for="1s"))
    env.wait_phase(done, "Succeeded", timeout=120)
    env.kill()
    env.start()
    env.kube.wait_for("the operator's /healthz", lambda: _healthy(env), env.namespace, timeout=120)
    env.kube.wait_for("finetune_operator_jobs{phase=Succeeded} 1 after the restart", lambda: _operator_metric(
        env, "finetune_operator_jobs", 'phase="Succeeded"') == 1, env.namespace, timeout=30)
    assert _operator_metric(env, "finetune_operator_jobs", 'phase="Running"') == 0


def test_a_watched_namespace_deleted_with_its_role_holds_up_no_other(operator_env: OperatorEnv,
                                                                        kwok_results: str) -> None:
    """kopf runs no handler before every watch has listed once: restarted with a watched namespace gone (the chart's
    Role with it, so listing there is forbidden), the operator ran nothing anywhere and its /healthz failed, so its
    liveness probe restarted it for ever. Now it leaves that namespace out, and says so."""
    env = operator_env
    env.stop()
    env.start(f"{env.namespace}-deleted")
    done = env.apply(kwok_job("beside-deleted", f"{kwok_results}/done", runs_for="1s"))
    env.wait_phase(done, "Succeeded", timeout=60)
    assert _healthy(env)
    assert f"not watching {env.namespace}-deleted: forbidden" in env.log.read_text()
    # The namespace is made again, and `helm upgrade` its Role: the operator, which cannot add a watch, stops to be
    # started again (as its Deployment does) watching it. Before, its jobs went unobserved until a restart by hand.
    back = f"{env.namespace}-deleted"
    env.kube.kubectl("create", "namespace", back)
    try:
        env.kube.apply([rbac.role("Role", "finetune-operator", back),
                        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": "finetune-operator"},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                     "name": "finetune-operator"},
                         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                       "namespace": env.namespace}]}], back)
        assert env.process is not None and env.process.wait(timeout=READABLE_CHECK_SECONDS + 60) == 0
        assert f"{back} may be read now: stopping" in env.log.read_text()
        env.start(back)
        env.kube.wait_for("the operator's /healthz", lambda: _healthy(env), env.namespace, timeout=60)
        assert env.log.read_text().count(f"not watching {back}") == 1
    finally:
        env.kube.kubectl("delete", "namespace", back, "--wait=false", check=False)


def test_a_trainer_outlived_by_an_injected_sidecar_ends_its_attempt(operator_env: OperatorEnv,
                                                                    kwok_results: str) -> None:
    a_trainer_outlived_by_a_sidecar_is_ended(operator_env, kwok_results)


def test_a_kubelets_eviction_for_the_pods_own_limit_is_counted_and_names_the_field(operator_env: OperatorEnv,
                                                                                   kwok_results: str) -> None:
    """The kubelet evicts a pod whose trainer writes past its ephemeral-storage limit with status.reason Evicted and no
    DisruptionTarget: the Job's pod failure policy does not match, and the operator counted it as "pod ... exited
    137", naming nothing to change. Neither node here runs an eviction manager, so the test writes the kwok pod's
    status as the kubelet's evictPod does (pkg/kubelet/eviction: phase Failed, its message, the container killed)."""
    env = operator_env
    doc = kwok_job("disk-evicted", f"{kwok_results}/disk", runs_for="600s")
    doc["spec"]["backoffLimit"] = 0  # counted: the job fails; free: a second attempt
    name = env.apply(doc)
    pod = env.kube.wait_for("the trainer running", lambda: next(
        (p for p in env.objects("pods", name) if p.get("status", {}).get("phase") == "Running"), None),
        env.namespace, timeout=120)
    message = 'Container trainer exceeded its local ephemeral storage limit "1Gi". '
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    killed = [dict(c, ready=False, started=False, state={"terminated": {
        "exitCode": 137, "reason": "Error", "startedAt": c["state"]["running"]["startedAt"], "finishedAt": now}})
        for c in pod["status"]["containerStatuses"]]
    env.kube.kubectl("patch", "pod", pod["metadata"]["name"], "-n", env.namespace, "--subresource=status",
                     "--type=merge", "-p", json.dumps({"status": {"phase": "Failed", "reason": "Evicted",
                                                                 "message": message, "containerStatuses": killed}}))
    failed = env.wait_phase(name, "Failed", timeout=60)
    # The operator fails the job from the evicted pod alone, while the Job controller (its 1 s batch of pod updates)
    # writes FailureTarget, then Failed, each in a write of its own: read once, the Job may not say Failed yet.
    jobs = env.kube.wait_for("the Job's Failed condition", lambda: (found := env.objects("jobs", name)) and all(
        condition(j, "Failed").get("status") == "True" for j in found) and found, env.namespace, timeout=60)
    [job] = jobs
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
    said = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")["message"]
    assert failed["status"]["reason"] == "BackoffLimitExceeded" and failed["status"]["failures"] == 1
    assert "StorageLimitExceeded" in said and message.strip() in said, said
    assert "spec.runtime.resources.limits.ephemeral-storage" in said, said
