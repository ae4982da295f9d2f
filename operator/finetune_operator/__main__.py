"""`finetune-operator`: the controller (`run`) and tools around the FineTuneJob API (`crd`, `validate`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune_operator import api, crd
from finetune_trainer.config import KubectlLoader

if TYPE_CHECKING:
    from finetune_operator.settings import Settings


def _name(doc: Any) -> str:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else "?"


def _other_kind(doc: Any) -> bool:
    """A document of another API (say the claim a job reads), which `kubectl apply` of the file creates as it is."""
    return (isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"] != api.KIND
            and not str(doc.get("apiVersion")).startswith(f"{api.GROUP}/"))


def _is_list(doc: Any) -> bool:
    """A list of objects (kind List, FineTuneJobList, ...), whose items `kubectl apply` creates one by one."""
    return isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list)


def _listed(docs: list[Any]) -> list[Any]:
    """The documents, a list's items in its place."""
    return [item for doc in docs for item in (doc["items"] if _is_list(doc) else [doc])]


def validate(paths: list[Path]) -> int:
    """Check manifests offline, with the same rules the apiserver applies at `kubectl apply`."""
    failed = 0
    for path in paths:
        try:  # kubectl skips an empty document
            docs = _listed([d for d in yaml.load_all(path.read_text(), Loader=KubectlLoader) if d is not None])
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
            failed += 1
            print(f"{path}: cannot read it: {exc}", file=sys.stderr)
            continue
        if not docs:  # kubectl apply refuses it too ("no objects passed to apply"): likely the wrong file
            failed += 1
            print(f"{path}: no objects in it", file=sys.stderr)
        for doc in docs:
            if _is_list(doc):  # kubectl: "not a list: no Items field"
                failed += 1
                print(f"{path}: {doc['kind']} {_name(doc)}: a list inside a list, which kubectl refuses", file=sys.stderr)
                continue
            if _other_kind(doc):
                print(f"{path}: {doc['kind']} {_name(doc)}: skipped (not a {api.KIND})")
                continue
            errors = api.manifest_errors(doc)
            if errors:
                failed += 1
                print(f"{path}: {_name(doc)}: invalid", file=sys.stderr)
                for line in errors:
                    print(f"  {line}", file=sys.stderr)
            else:
                print(f"{path}: {_name(doc)}: valid")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """The operator: reconcile FineTuneJobs until interrupted (kopf's signal handling stops it cleanly)."""
    import kopf

    from finetune_operator import handlers, malloc, metrics, settings

    malloc.limit_arenas()
    malloc.trim_periodically()
    ours = settings.from_arguments(args)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, ours)
    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # kopf logs every timer run; transitions are logged (and posted as Events) by us
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf would ask the passwd database for our user name, which an arbitrary container UID lacks. A container
    # restarted in its pod (pid 1 again) is the same identity, and takes its own lease back at once.
    identity = f"finetune-operator@{socket.gethostname()}/{os.getpid()}"
    if not handlers.wait_for_crd():
        logging.getLogger("finetune_operator").error(
            "finetune-operator: the apiserver does not serve %s.%s/%s (the CRD is not installed): install it "
            "(kubectl apply --server-side -f charts/finetune-operator/crds/); exiting, to look again at the restart",
            api.PLURAL, api.GROUP, api.VERSION)
        return 1
    metrics.serve(ours.bind_address, ours.metrics_port)  # a standby's too: a target that is down raises alerts
    with _elected(ours, identity):
        metrics.lead()
        watched = handlers.watchable(ours.namespaces)
        if left_out := tuple(ns for ns in ours.namespaces if ns not in watched):
            # Stopped as a pod being deleted is, and its Deployment starts it again. Not kopf's stop_flag: a
            # threading.Event one is waited for on a thread of the loop's executor, which the loop joins as it
            # closes, so every stop by SIGTERM hung there, its lease never given up.
            handlers.stop_once_readable(left_out, lambda: os.kill(os.getpid(), signal.SIGTERM))
        ours = ours.model_copy(update={"namespaces": watched})
        kopf.run(
            registry=registry,
            memo=kopf.Memo(settings=ours),
            # one active replica (the Lease); kopf's peering would need cluster-wide CRDs of its own
            standalone=True,
            clusterwide=not ours.namespaces,
            namespaces=list(ours.namespaces),
            liveness_endpoint=ours.liveness_endpoint,
            identity=identity,  # type: ignore[arg-type]
        )
    return 0


@contextlib.contextmanager
def _elected(ours: Settings, identity: str) -> Iterator[None]:
    """With a lease namespace, run only while this replica holds the Lease (`leader`); else at once."""
    if not ours.lease_namespace:
        yield
        return
    from finetune_operator import leader
    from finetune_operator.clients import Clients

    # A renewal's requests are bounded by its deadline (leader.leading), the rest by the lease's own duration.
    lease = leader.Lease(Clients(connections=1, timeout=leader.LEASE_SECONDS, retries=False),
                         ours.lease_namespace, ours.lease_name, identity)
    with leader.stopped_by_signals():  # until kopf takes SIGTERM over
        leader.wait_to_lead(lease, ours.bind_address, ours.liveness_port)
        with leader.leading(lease):
            yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    operate = sub.add_parser("run", help="run the operator (in a cluster, or against $KUBECONFIG)")
    operate.add_argument("-v", "--verbose", action="store_true", help="log kopf's own details too")
    from finetune_operator.settings import add_arguments

    add_arguments(operate)
    sub.add_parser("crd", help="print the FineTuneJob CRD (pipe it to `kubectl apply -f -`)")
    check = sub.add_parser("validate", help="validate FineTuneJob manifests offline")
    check.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "crd":
        sys.stdout.write(crd.render())
        return 0
    return validate(args.paths)


if __name__ == "__main__":
    sys.exit(main())
