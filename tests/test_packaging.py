"""The operator side installs and imports without the ML stack."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

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
        "import sys, finetune_operator.api, finetune_operator.generate, finetune_operator.__main__;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
