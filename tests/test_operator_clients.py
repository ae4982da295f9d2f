"""The operator's API calls: the paths it builds, and the kubernetes client's generated API classes kept out of
its memory (the calls themselves run against the real apiserver in test_cluster_operator.py)."""

from __future__ import annotations

import subprocess
import sys

from finetune_operator import api
from finetune_operator.clients import api_path


def test_the_paths_are_the_apiservers() -> None:
    assert api_path("team-a", "events") == "/api/v1/namespaces/team-a/events"
    assert api_path("team-a", "persistentvolumeclaims", "data") == "/api/v1/namespaces/team-a/persistentvolumeclaims/data"
    assert api_path("team-a", "jobs", "ft-1", group="batch") == "/apis/batch/v1/namespaces/team-a/jobs/ft-1"
    assert api_path("team-a", api.PLURAL, "ft", group=api.GROUP, version=api.VERSION) == \
        "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/ft"


def test_the_generated_api_classes_are_never_imported() -> None:
    """In a fresh interpreter: CoreV1Api alone cost the operator ~21 MB."""
    code = ("import sys; import finetune_operator.handlers, finetune_operator.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
