"""What operator/finetune_operator/rbac.py grants, as (resource.group[/subresource], verb) pairs spelled as kubectl
and the apiserver's audit log spell them, and the pair a request asks for: the unit tests' fake apiservers refuse
what the rules do not grant, as the real one does (a read-back by a get, which the rules lacked, passed every unit
test and was refused on every cluster)."""

from __future__ import annotations

from finetune_operator import rbac

VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def granted_by_rules() -> set[tuple[str, str]]:
    """rbac.RULES as (resource.group[/subresource], verb) pairs, as kubectl spells them."""
    pairs = set()
    for rule in rbac.RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                name, _, sub = resource.partition("/")
                spelled = (f"{name}.{group}" if group else name) + (f"/{sub}" if sub else "")
                pairs |= {(spelled, verb) for verb in rule["verbs"]}
    return pairs


def asked(method: str, path: str) -> tuple[str, str]:
    """The (resource, verb) pair a request for a namespaced `path` (/api/v1/namespaces/ns/... or
    /apis/<group>/<version>/namespaces/ns/...) asks for."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    resource, *rest = parts[parts.index("namespaces") + 2:]
    spelled = (f"{resource}.{group}" if group else resource) + (f"/{rest[1]}" if len(rest) > 1 else "")
    if method != "GET":
        return spelled, VERBS[method]
    return spelled, "get" if rest else "list"
