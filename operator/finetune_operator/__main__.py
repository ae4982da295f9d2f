"""`finetune-operator`: the controller (`run`) and tools around the FineTuneJob API (`crd`, `validate`)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

import yaml

from finetune_operator import crd
from finetune_operator.api import manifest_errors
from finetune_trainer.config import KubectlLoader


def validate(paths: list[Path]) -> int:
    """Check manifests offline, with the same rules the apiserver applies at `kubectl apply`."""
    failed = 0
    for path in paths:
        for doc in yaml.load_all(path.read_text(), Loader=KubectlLoader):
            if doc is None:  # an empty document, as kubectl skips it
                continue
            errors = manifest_errors(doc)
            name = (doc or {}).get("metadata", {}).get("name", "?") if isinstance(doc, dict) else "?"
            if errors:
                failed += 1
                print(f"{path}: {name}: invalid", file=sys.stderr)
                for line in errors:
                    print(f"  {line}", file=sys.stderr)
            else:
                print(f"{path}: {name}: valid")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """The operator: reconcile FineTuneJobs until interrupted (kopf's signal handling stops it cleanly)."""
    import kopf

    from finetune_operator import handlers, malloc, settings

    malloc.limit_arenas()
    malloc.trim_periodically()
    ours = settings.from_arguments(args)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, ours)
    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # kopf logs every timer run; transitions are logged (and posted as Events) by us
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        registry=registry,
        memo=kopf.Memo(settings=ours),
        standalone=True,  # one replica (Recreate); kopf's peering would need cluster-wide CRDs of its own
        clusterwide=not ours.namespaces,
        namespaces=list(ours.namespaces),
        liveness_endpoint=f"http://{ours.bind_address}:{ours.liveness_port}/healthz",
        # kopf would ask the passwd database for our user name, which an arbitrary container UID lacks.
        identity=f"finetune-operator@{socket.gethostname()}/{os.getpid()}",  # type: ignore[arg-type]
    )
    return 0


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
