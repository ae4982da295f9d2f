"""The bad-input corpus: manifests that must be refused, each naming the field at fault.

Each file in tests/bad_manifests/ starts with `# field: <path>` (the field its error must
name, as a manifest spells it) and `# why: <reason>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CORPUS = Path(__file__).parent / "bad_manifests"


@dataclass(frozen=True)
class BadCase:
    name: str
    manifest: dict[str, Any]
    field: str
    why: str

    def names_field(self, line: str) -> bool:
        """Whether an error line names this case's field (errors may go deeper, e.g. `.0` or `[0]`)."""
        return re.search(rf"(^|[\s\"']){re.escape(self.field)}($|[.\[:\s\"'])", line) is not None


def load_bad_corpus() -> list[BadCase]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        text = path.read_text()
        tags = dict(re.findall(r"^# (field|why): (.+)$", text, flags=re.M))
        cases.append(BadCase(path.stem, yaml.safe_load(text), tags["field"], tags["why"]))
    return cases


def readme_manifests() -> list[dict[str, Any]]:
    """The FineTuneJob manifests the README shows (they must be valid, though not run here)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if (doc or {}).get("kind") == "FineTuneJob"]
