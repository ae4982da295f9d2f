"""The operator side installs and imports without the ML stack."""

from __future__ import annotations

import re
import subprocess
import sys
import json
import tomllib
from pathlib import Path

from dockerfile import instructions

REPO = Path(__file__).parents[1]
HEAVY = {"torch", "torchvision", "transformers", "peft", "datasets", "accelerate"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_operator_extra_has_no_ml_stack() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["operator"])
    assert not wanted & HEAVY
    assert {"kopf", "kubernetes", "prometheus-client", "pydantic"} <= wanted
    assert {"torch", "transformers", "peft", "safetensors"} <= _names(project["optional-dependencies"]["trainer"])


def test_operator_modules_import_without_torch() -> None:
    code = (
        "import sys, finetune_operator.api, finetune_operator.generate, finetune_operator.__main__,"
        " finetune_operator.handlers, finetune_operator.reconcile, finetune_operator.children;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_operator_image_is_slim_non_root_without_torch() -> None:
    steps = instructions(REPO / "operator" / "Dockerfile")
    args = dict(s.split("=", 1) for kind, s in steps if kind == "ARG" and "=" in s)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], next(v for kind, v in steps if kind == "FROM"))
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base
    user = [v for kind, v in steps if kind == "USER"][-1].split(":")[0]
    assert user.isdigit() and user != "0", "a numeric non-root UID lets runAsNonRoot verify it"
    installs = " ".join(v for kind, v in steps if kind == "RUN" and "pip install" in v)
    assert ".[operator]" in installs and "trainer]" not in installs
    assert json.loads(next(v for kind, v in steps if kind == "ENTRYPOINT")) == ["finetune-operator"]
    for kind, value in steps:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source
