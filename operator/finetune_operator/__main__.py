"""`finetune-operator`: tools around the FineTuneJob API (the controller itself lands as `run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from finetune_operator import crd
from finetune_operator.api import manifest_errors


def validate(paths: list[Path]) -> int:
    """Check manifests offline, with the same rules the apiserver applies at `kubectl apply`."""
    failed = 0
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the FineTuneJob CRD (pipe it to `kubectl apply -f -`)")
    check = sub.add_parser("validate", help="validate FineTuneJob manifests offline")
    check.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd.render())
        return 0
    return validate(args.paths)


if __name__ == "__main__":
    sys.exit(main())
