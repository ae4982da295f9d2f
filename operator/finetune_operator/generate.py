"""`make crds`: write (or with --check, verify) every generated file: the CRD and its chart copy, the API
reference, the chart's RBAC rules and alerting rules, and the Grafana dashboard (both copies)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_operator import alerts, apidoc, crd, rbac

README = Path("README.md")


def generated() -> dict[Path, str]:
    """Each generated file and the text it must hold."""
    files = {path: crd.render() for path in crd.CRD_PATHS}
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    files[README] = apidoc.splice(README.read_text(), apidoc.render_reference(schema))
    files[rbac.CHART_RULES] = rbac.render_rules(rbac.RULES)
    files[rbac.CHART_FINALIZER_RULES] = rbac.render_rules(rbac.FINALIZER_RULES)
    files[rbac.CHART_LEASE_RULES] = rbac.render_rules(rbac.LEASE_RULES)
    files[alerts.CHART_RULES] = alerts.render()
    # The dashboard needs grafana-foundation-sdk (the dev extra), which the operator image does not carry.
    from finetune_operator import dashboard

    files |= {path: dashboard.render() for path in dashboard.PATHS}
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a generated file differs from the models")
    args = parser.parse_args(argv)
    stale = {p: text for p, text in generated().items() if not p.exists() or p.read_text() != text}
    if args.check:
        for path in stale:
            print(f"{path} is out of date with the models: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in stale.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
