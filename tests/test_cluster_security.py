"""Least privilege and isolation, checked against the real apiserver: what the operator's
ServiceAccount may do (kubectl auth can-i --list) is exactly operator/finetune_operator/rbac.py,
and exactly what the operator asked for in an end-to-end run (the apiserver's audit log); no spec
field reaches privileged, the host or added capabilities; and a user who may create FineTuneJobs
in one namespace gets nothing in another through the operator."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import children, rbac
from finetune_operator.api import FineTuneJob, manifest_errors
from finetune_operator.settings import Settings
from conftest import REPO
from granted import granted_by_rules
from kube import Kube
from operator_fixture import (SERVICE_ACCOUNT, OperatorEnv, a_trainer_outlived_by_a_sidecar_is_ended,  # noqa: F401
                              crd_installed, example, kwok_results, operator_env)
from seeds import EVERY_PASS_THROUGH

pytestmark = pytest.mark.cluster

# kubectl auth can-i --list: "resource.group/sub   [urls]   [names]   [verbs]"
CAN_I_LINE = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")
# Granted for the apiserver's authorization checks, never asked for: the OwnerReferencesPermissionEnforcement
# admission plugin (off here, on in OpenShift) wants it for blockOwnerDeletion on the children.
AUTHORIZATION_ONLY = {("finetunejobs.finetune.dev/finalizers", "update")}


def can_i_list(kube: Kube, user: str, namespace: str) -> set[tuple[str, str]]:
    """What `kubectl auth can-i --list` says `user` may do in `namespace`, as (resource, verb) pairs;
    non-resource URLs as ("url:<path>", verb)."""
    out = kube.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={user}").stdout
    pairs = set()
    for line in out.splitlines()[1:]:
        match = CAN_I_LINE.match(line)
        assert match, f"unreadable can-i line: {line!r}"
        resource, urls, _, verbs = match.groups()
        names = [resource] if resource else [f"url:{u}" for u in urls.split()]
        pairs |= {(name, verb) for name in names for verb in verbs.split()}
    return pairs


def can_i(kube: Kube, user: str, *args: str) -> bool:
    result = kube.kubectl("auth", "can-i", *args, f"--as={user}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def _service_account(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}"


def _cluster_role(kube: Kube, namespace: str) -> Iterator[str]:
    """The chart's cluster-wide mode: the operator's ServiceAccount bound to a ClusterRole of rbac.RULES."""
    name = f"finetune-operator-{namespace}"
    kube.apply([rbac.role("ClusterRole", name),
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                 "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]}], namespace)
    yield name
    kube.kubectl("delete", "clusterrolebinding,clusterrole", name, check=False)


# ---- the operator's permissions ------------------------------------------------------


def test_the_operators_permissions_are_its_rules_and_nothing_else(kube: Kube, operator_env: OperatorEnv,
                                                                  namespace: str) -> None:
    env = operator_env
    operator, baseline = _service_account(env.namespace), f"system:serviceaccount:{env.namespace}:default"
    # What every ServiceAccount may do (discovery, self-reviews) is not the operator's doing.
    ours = can_i_list(kube, operator, env.namespace) - can_i_list(kube, baseline, env.namespace)
    assert ours == granted_by_rules()
    assert not any("*" in resource or verb == "*" for resource, verb in ours)
    assert not any(resource.startswith(("secrets", "url:")) for resource, _ in ours)
    assert not can_i(kube, operator, "get", "secrets", "-n", env.namespace)
    assert not can_i(kube, operator, "list", "secrets", "--all-namespaces")
    assert not can_i(kube, operator, "create", "pods", "-n", env.namespace)  # pods come from the Job controller
    # Namespaced (a Role): nothing in another namespace.
    assert can_i_list(kube, operator, namespace) == can_i_list(kube, baseline, namespace)
    # Cluster-wide (the chart's ClusterRole): the same rules in every namespace, and still no Secret.
    for _ in _cluster_role(kube, env.namespace):
        elsewhere = can_i_list(kube, operator, namespace) - can_i_list(kube, baseline, namespace)
        assert elsewhere == granted_by_rules()
        assert not can_i(kube, operator, "list", "secrets", "--all-namespaces")
        assert not can_i(kube, operator, "get", "secrets", "-n", namespace)


def audited_requests(kube: Kube, user: str, since: float) -> list[dict[str, Any]]:
    """The apiserver's audit events of `user`'s requests since `since` (a Unix time)."""
    assert kube.audit_log is not None and kube.audit_log.exists(), (
        "no audit log: this cluster was started before deploy/local/cluster.py logged requests; restart it")
    events = []
    for line in kube.audit_log.read_text().splitlines():
        event = json.loads(line)
        stamp = time.mktime(time.strptime(event["requestReceivedTimestamp"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if event["user"]["username"] == user and stamp >= since - 1 and "objectRef" in event:
            events.append(event)
    return events


def _asked(event: dict[str, Any]) -> tuple[str, str]:
    ref = event["objectRef"]
    name = f"{ref['resource']}.{ref['apiGroup']}" if ref.get("apiGroup") else ref["resource"]
    return (name + (f"/{ref['subresource']}" if ref.get("subresource") else ""), event["verb"])


def test_the_operator_asks_for_exactly_what_its_rules_grant(kube: Kube, operator_env: OperatorEnv,
                                                             kwok_results: str) -> None:
    """Every rule is used, and nothing else is asked for, across the operator's paths: a job that
    fails and is deleted by its TTL, one whose deadline passes (its processes meet through torchrun,
    so it has a Service), one the Job controller cannot make pods for (the Warning Events are read),
    one suspended and resumed (its first attempt's ConfigMap and Service go), one created again under its name while its predecessor's children remain, and one
    whose trainer an injected sidecar outlives (its pod is given a deadline)."""
    env = operator_env
    if kube.audit_log is None:
        pytest.skip("the cluster's audit log is readable only on the local cluster this session runs")
    started = time.time()
    reborn_children_wait_their_turn(env)
    a_trainer_outlived_by_a_sidecar_is_ended(env, kwok_results)
    gone = example("minilm-sentiment", dataset={"uri": "pvc://data/nowhere.csv"}) | {"metadata": {"name": "gone"}}
    gone["spec"]["ttlSecondsAfterFinished"] = 1
    late = example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}, "processesPerWorker": 2}) \
        | {"metadata": {"name": "late"}}
    late["spec"]["activeDeadlineSeconds"] = 3
    podless = example("minilm-sentiment", pod={"serviceAccountName": "no-such-account"}) | {"metadata": {"name": "podless"}}
    paused = example("minilm-sentiment", runtime={"resources": {"limits": {"nvidia.com/gpu": 99}}, "processesPerWorker": 2}) \
        | {"metadata": {"name": "paused"}}
    for doc in (gone, late, podless, paused):
        env.apply(doc)
    env.wait_ftj("paused", lambda o: o.get("status", {}).get("attempts") == 1, "an attempt")
    env.kube.kubectl("patch", "ftj", "paused", "-n", env.namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    env.wait_phase("late", "Failed", timeout=120)
    env.wait_phase("paused", "Suspended", timeout=120)
    env.kube.kubectl("patch", "ftj", "paused", "-n", env.namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    env.wait_ftj("paused", lambda o: o.get("status", {}).get("attempts") == 2, "the resumed attempt")
    env.kube.wait_for("attempt 1's Service deleted", lambda: env.kube.get("service", "paused-1", env.namespace) is None,
                      env.namespace)
    env.wait_ftj("podless", lambda o: o.get("status", {}).get("reason") == "FailedCreate", "FailedCreate", timeout=120)
    env.kube.wait_for("the TTL's deletion", lambda: env.kube.get("ftj", "gone", env.namespace) is None,
                      env.namespace, timeout=240)
    asked = {_asked(e) for e in audited_requests(kube, _service_account(env.namespace), started)}
    assert asked <= granted_by_rules(), f"asked beyond its rules (the operator would have failed): {asked - granted_by_rules()}"
    unused = granted_by_rules() - asked - AUTHORIZATION_ONLY
    assert not unused, f"granted but never asked for: {sorted(unused)}"
    # Not asked in this run: a status write whose answer was lost is read back (handlers._stored) by a list of its
    # one name, which the rules grant and the apiserver serves for a custom resource.
    listed = kube.kubectl("get", "ftj", "-n", env.namespace, "--field-selector=metadata.name=paused", "-o", "name",
                          f"--as={_service_account(env.namespace)}").stdout.split()
    assert listed == ["finetunejob.finetune.dev/paused"], listed


def reborn_children_wait_their_turn(env: OperatorEnv) -> None:
    """A FineTuneJob deleted with its children orphaned (or before the garbage collector removed them) and created
    again: its attempt's names are taken by children that are not its own. It neither adopts nor overwrites them,
    and makes each of its own once the one in its way is gone (each 409 is read: whose is it?). Its Job can make no
    pod (no such service account): an orphaned Job's pods would hold the new attempt back (EarlierPodsStopping)."""
    ns, name = env.namespace, children.child_name("reborn", 1)
    reborn = example("minilm-sentiment", pod={"serviceAccountName": "no-such-account"},
                     runtime={"processesPerWorker": 2}) | {"metadata": {"name": "reborn"}}
    env.apply(reborn)
    kinds = ("configmap", "service", "job")  # the order the operator makes them in
    env.kube.wait_for("reborn's children", lambda: all(env.kube.get(k, name, ns) for k in kinds), ns)
    env.kube.kubectl("delete", "ftj", "reborn", "-n", ns, "--cascade=orphan")
    env.kube.wait_for("reborn deleted, its children orphaned", lambda: env.kube.get("ftj", "reborn", ns) is None
                      and not any(env.kube.get(k, name, ns)["metadata"].get("ownerReferences") for k in kinds), ns)
    uid = env.ftj(env.apply(reborn))["metadata"]["uid"]

    def owner(kind: str) -> str | None:
        found = env.kube.get(kind, name, ns)
        return found and next((r["uid"] for r in found["metadata"].get("ownerReferences") or []), None)

    for kind in kinds:
        time.sleep(2)  # the operator ticks every second: time to have met the orphan and left it alone
        assert owner(kind) is None and all(owner(k) == uid for k in kinds[:kinds.index(kind)])
        env.kube.kubectl("delete", kind, name, "-n", ns, "--cascade=background")
        env.kube.wait_for(f"reborn's own {kind}", lambda: owner(kind) == uid, ns)
    labels = env.kube.get("job", name, ns)["spec"]["template"]["metadata"]["labels"]
    assert labels["finetune.dev/job-uid"] == uid


# ---- what a spec can reach ------------------------------------------------------------

# What would take a pod out of its box, tried as a key in every object a spec passes through.
ESCAPES: dict[str, Any] = {
    "privileged": True,
    "hostPath": {"path": "/"},
    "hostNetwork": True,
    "hostPID": True,
    "hostIPC": True,
    "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
    "capabilities": {"add": ["NET_ADMIN"]},
    "allowPrivilegeEscalation": True,
}
# Annotations the kubelet reads as a security profile: a pod annotation must not name one.
PROFILE_ANNOTATIONS = {
    "container.apparmor.security.beta.kubernetes.io/trainer": "unconfined",
    "seccomp.security.alpha.kubernetes.io/pod": "unconfined",
    "container.seccomp.security.alpha.kubernetes.io/trainer": "unconfined",
}
# Maps whose keys are the user's (labels, selectors, quantities): an escape's name there is only a key.
FREE_KEYS = ("labels", "annotations", "nodeSelector", "requests", "limits", "matchLabels")


def _objects(value: Any, path: list[Any]) -> Iterator[list[Any]]:
    if isinstance(value, dict):
        if not path or path[-1] not in FREE_KEYS:
            yield path
        for key, child in value.items():
            yield from _objects(child, [*path, key])
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _objects(child, [*path, i])


def escape_attempts() -> Iterator[tuple[str, dict[str, Any]]]:
    """EVERY_PASS_THROUGH with one escape put into one object under spec.runtime or spec.pod (or spec)."""
    for path in _objects(EVERY_PASS_THROUGH["spec"], ["spec"]):
        if path[:2] not in (["spec", "runtime"], ["spec", "pod"]) and path != ["spec"]:
            continue
        for key, value in ESCAPES.items():
            doc = copy.deepcopy(EVERY_PASS_THROUGH)
            target = doc
            for part in path:
                target = target[part]
            target[key] = copy.deepcopy(value)
            yield ".".join(map(str, path)) + "." + key, doc
    for key, value in PROFILE_ANNOTATIONS.items():
        doc = copy.deepcopy(EVERY_PASS_THROUGH)
        doc["spec"]["pod"]["annotations"][key] = value
        yield f"spec.pod.annotations[{key}]", doc
    for key, value in ESCAPES.items():  # as a label, a node selector or a resource name it is only a word
        doc = copy.deepcopy(EVERY_PASS_THROUGH)
        doc["spec"]["pod"]["labels"][key] = "true"
        doc["spec"]["pod"]["nodeSelector"][key] = "true"
        doc["spec"]["runtime"]["env"].append({"name": key.upper(), "value": json.dumps(value)})
        yield f"spec.pod.labels/nodeSelector/env[{key}]", doc


SAFE_VOLUME_SOURCES = {"configMap", "emptyDir", "persistentVolumeClaim", "secret"}


def assert_confined(pod_spec: dict[str, Any]) -> None:
    """The pod of a child Job: nothing from the host, nothing privileged, every capability dropped."""
    assert not {"hostNetwork", "hostPID", "hostIPC", "hostUsers"} & set(pod_spec)
    assert pod_spec["automountServiceAccountToken"] is False
    pod_security, container_security = children.restricted_security(Settings().trainer_uid)
    assert pod_spec["securityContext"] == pod_security
    for volume in pod_spec["volumes"]:
        assert set(volume) - {"name"} <= SAFE_VOLUME_SOURCES and len(volume) == 2, volume
    for container in pod_spec["containers"]:
        assert container["securityContext"] == container_security
    assert not set(ESCAPES) & set(_keys(pod_spec)) - {"securityContext", "capabilities", "allowPrivilegeEscalation"}


def _keys(value: Any) -> Iterator[str]:
    """Every field name in a pod spec (a node selector's keys are the user's words, not fields)."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            if key != "nodeSelector":
                yield from _keys(child)
    elif isinstance(value, list):
        for child in value:
            yield from _keys(child)


def test_no_spec_field_reaches_the_host_or_privileges(kube: Kube, crd_installed: None,
                                                      restricted_namespace: str) -> None:
    from test_cluster_fuzz import apiserver_verdict
    from kubernetes import config

    client = config.new_client_from_config(str(kube.kubeconfig))
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer"}}, restricted_namespace)
    refused = rendered = 0
    for where, doc in escape_attempts():
        errors, verdict = manifest_errors(doc), apiserver_verdict(client, restricted_namespace, doc)
        assert bool(errors) == bool(verdict.fields), f"{where}: validate {errors}, apiserver {verdict.message}"
        if errors:
            refused += 1
            continue
        rendered += 1
        doc["metadata"] |= {"namespace": restricted_namespace, "uid": "00000000-0000-0000-0000-000000000000"}
        job = children.job(doc, FineTuneJob.from_wire(doc).spec, 1, Settings())
        template = job["spec"]["template"]
        assert_confined(template["spec"])
        assert not set(PROFILE_ANNOTATIONS) & set(template["metadata"]["annotations"])
        assert_admitted(kube, restricted_namespace, template, where)
    client.close()
    assert refused >= 100 and rendered >= len(ESCAPES), (refused, rendered)


def assert_admitted(kube: Kube, namespace: str, template: dict[str, Any], where: str) -> None:
    """The restricted namespace's admission takes the pod as the Job controller would make it."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", **template["metadata"]},
           "spec": {k: v for k, v in template["spec"].items() if k != "priorityClassName"}}  # no such class here
    result = kube.apply(pod, namespace, "--dry-run=server", check=False)
    assert result.returncode == 0 and "PodSecurity" not in result.stderr, f"{where}: {result.stderr}"


def test_a_trainer_uid_of_0_leaves_user_group_and_fsgroup_to_the_platform(kube: Kube, crd_installed: None,
                                                                           restricted_namespace: str) -> None:
    """OpenShift's restricted SCC admits each namespace's own uid range only: one uid for all the namespaces an
    operator watches was refused in all but one. With 0 the pods name none (the SCC fills them in), and still pass
    the "restricted" Pod Security Standard."""
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer"}}, restricted_namespace)
    doc = yaml.safe_load((REPO / "deploy" / "examples" / "minilm-sentiment.yaml").read_text())
    doc["metadata"] |= {"namespace": restricted_namespace, "uid": "00000000-0000-0000-0000-000000000000"}
    template = children.job(doc, FineTuneJob.from_wire(doc).spec, 1, Settings(trainer_uid=0))["spec"]["template"]
    security = template["spec"]["securityContext"]
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(security) and security["runAsNonRoot"] is True, security
    assert_admitted(kube, restricted_namespace, template, "trainer_uid 0")


# ---- two namespaces, one limited user ------------------------------------------------

USER = "alice"


def test_a_user_of_one_namespace_gets_nothing_in_another_through_the_operator(
        kube: Kube, operator_env: OperatorEnv, namespace: str) -> None:
    env, other = operator_env, namespace
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub"}, "stringData": {"token": "other's"}},
               other)
    kube.apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "ftj-author"},
                 "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"],
                            "verbs": ["create", "get", "list", "watch", "delete"]}]},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "ftj-author"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ftj-author"},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]}], env.namespace)
    assert can_i(kube, USER, "create", "finetunejobs", "-n", env.namespace)
    for verb, resource, ns in (("create", "finetunejobs", other), ("create", "pods", env.namespace),
                               ("create", "jobs", env.namespace), ("create", "pods", other),
                               ("get", "secrets", other), ("get", "secrets", env.namespace)):
        assert not can_i(kube, USER, verb, resource, "-n", ns), (verb, resource, ns)
    # Every reference carries the other namespace; with strict validation the apiserver refuses each one.
    doc = example("minilm-sentiment", runtime={
        "resources": {"limits": {"nvidia.com/gpu": 99}},  # never scheduled: the pod template is what counts
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token", "namespace": other}}}],
        "envFrom": [{"secretRef": {"name": "hub", "namespace": other}}],
        "volumes": [{"name": "keys", "secret": {"secretName": "hub", "namespace": other}},
                    {"name": "claim", "persistentVolumeClaim": {"claimName": "data", "namespace": other}}],
        "volumeMounts": [{"name": "keys", "mountPath": "/keys"}, {"name": "claim", "mountPath": "/claim"}]},
        pod={"imagePullSecrets": [{"name": "hub", "namespace": other}], "serviceAccountName": "default"})
    strict = kube.kubectl("apply", "-n", env.namespace, f"--as={USER}", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert strict.returncode != 0 and strict.stderr.count('unknown field "spec.') == 5, strict.stderr
    elsewhere = kube.kubectl("apply", "-n", other, f"--as={USER}", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert elsewhere.returncode != 0 and "forbidden" in elsewhere.stderr, elsewhere.stderr
    # Without validation the unknown fields are pruned: the references name this namespace's objects only.
    started = time.time()
    for _ in _cluster_role(kube, env.namespace):  # even an operator that could act everywhere
        kube.kubectl("apply", "-n", env.namespace, f"--as={USER}", "--validate=false", "-f", "-",
                     stdin=yaml.safe_dump(doc))
        name = doc["metadata"]["name"]
        env.wait_ftj(name, lambda o: o.get("status", {}).get("attempts") == 1, "an attempt")
        job = env.objects("jobs", name)[0]
        assert "namespace" not in json.dumps(job["spec"]["template"]["spec"])
        assert_confined(job["spec"]["template"]["spec"])
        for kind in ("jobs", "pods", "configmaps", "services"):
            listed = kube.kubectl("get", kind, "-n", other, "-l", "finetune.dev/job-name", "-o", "name").stdout
            assert not listed.strip(), f"{kind} in {other}: {listed}"
        if kube.audit_log is not None:
            touched = {e["objectRef"].get("namespace") for e in audited_requests(kube, _service_account(env.namespace), started)}
            assert touched == {env.namespace}, touched
