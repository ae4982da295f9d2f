"""The trainer image's Python stack, pinned to the versions the tests ran on: trainer/constraints.txt.

    python trainer/pins.py           write trainer/constraints.txt from this environment (`make pins`)
    python trainer/pins.py --check   exit 1 when the file differs from this environment (a test runs it)

The pins are the `trainer` extra's requirements, followed transitively, as installed here and
under this platform's markers (Linux, CPython: the image's). `make install` and the Dockerfile
both install with `pip install -c trainer/constraints.txt`, so the tests and the image resolve
to exactly these versions, or pip fails.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "finetune-operator"
EXTRA = "trainer"
CONSTRAINTS = Path(__file__).with_name("constraints.txt")
HEADER = "# The trainer image's stack as the tests ran on it; written by `make pins` (trainer/pins.py). Do not edit.\n"


def closure(project: str = PROJECT, extra: str = EXTRA) -> dict[str, str]:
    """Installed version (public part: 2.15.0 of 2.15.0+cpu) of every distribution `project[extra]` needs."""
    found: dict[str, str] = {}
    pending = [(project, {extra})]
    while pending:
        name, extras = pending.pop()
        for line in distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            key = canonicalize_name(requirement.name)
            if key == canonicalize_name(project) or key in found:
                continue
            try:
                found[key] = distribution(key).version.split("+")[0]
            except PackageNotFoundError:
                raise SystemExit(f"{key} (needed by {name}) is not installed: run `make install` first") from None
            pending.append((key, set(requirement.extras)))
    return found


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    text = render(closure())
    if "--check" in sys.argv[1:]:
        if CONSTRAINTS.read_text() != text:
            print(f"{CONSTRAINTS} differs from this environment; run `make pins`", file=sys.stderr)
            return 1
        return 0
    CONSTRAINTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
