"""What the operator changes in kopf's machinery keeps kopf's semantics: the diff base, the kept bodies and the malloc heap."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import yaml

from finetune_operator.diffbase import SpecDiffBase
from finetune_operator.handlers import PREFIX, _plain, slim_body

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "minilm-sentiment.yaml"


def live_body() -> dict[str, Any]:
    """An example FineTuneJob as a watch delivers it: server metadata, managedFields, kopf's annotations, status."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] |= {
        "namespace": "team-a", "uid": "0d9c", "resourceVersion": "812", "generation": 1,
        "creationTimestamp": "2026-12-01T10:00:00Z", "finalizers": [f"{PREFIX}/finalizer"],
        "labels": {"team": "nlp"},
        "annotations": {"note": "kept", f"{PREFIX}/last-handled-configuration": json.dumps({"spec": {}}),
                        f"{PREFIX}/reconcile": json.dumps({"started": "2026-12-01T10:00:01"})},
        "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:spec": {"f:model": {}}}}],
    }
    body["status"] = {"phase": "Running", "attempts": 1, "conditions": [{"type": "Running", "status": "True"}]}
    return body


def test_the_light_diff_base_builds_kopfs_essence() -> None:
    body = live_body()
    before = copy.deepcopy(body)
    ours = SpecDiffBase(prefix=PREFIX).build(body=kopf.Body(body))
    theirs = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX).build(body=kopf.Body(body))
    assert ours == theirs
    assert ours["spec"] == before["spec"] and ours["metadata"]["labels"] == {"team": "nlp"}
    assert "status" not in ours and "managedFields" not in ours.get("metadata", {})
    ours["spec"]["model"]["source"] = "changed"  # the essence is a copy: the watched body is untouched
    assert body == before


def test_the_light_diff_base_defers_to_kopf_for_extra_fields() -> None:
    body = kopf.Body(live_body())
    fields = [("status", "phase")]
    assert SpecDiffBase(prefix=PREFIX).build(body=body, extra_fields=fields) == \
        kopf.AnnotationsDiffBaseStorage(prefix=PREFIX).build(body=body, extra_fields=fields)


ARENAS_IN_USE = """
import ctypes, ctypes.util, sys, threading
from finetune_operator import malloc
print(malloc.limit_arenas() if sys.argv[1] == "limited" else None)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()  # 8 threads alive at once: glibc gives each an arena of its own, up to its limit
    libc.malloc(4096)
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def test_malloc_arenas_are_limited_on_glibc() -> None:
    """Run in fresh interpreters (mallopt changes the process for good): 8 threads that allocate at once share
    malloc.ARENAS arenas, where without the limit glibc gives them one each."""
    from finetune_operator import malloc

    def arenas(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", ARENAS_IN_USE, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert arenas("limited") == ("True", malloc.ARENAS)
    assert arenas("unlimited")[1] > malloc.ARENAS  # the count sees the threads' arenas


def test_the_body_kopf_keeps_loses_its_managed_fields_and_nothing_else() -> None:
    raw = live_body()
    kept = kopf.Body(raw)  # as kopf keeps it for the timers: a view of the watch event's dict
    before, old_metadata = copy.deepcopy(raw), raw["metadata"]
    asyncio.run(slim_body(event={"type": "MODIFIED", "object": raw}))
    assert "managedFields" not in kept.metadata
    assert dict(kept.metadata) == {k: v for k, v in before["metadata"].items() if k != "managedFields"}
    assert kept.spec == before["spec"] and kept.status == before["status"]
    assert old_metadata == before["metadata"]  # replaced, not edited: a reader of the previous one is unaffected
    assert _plain(kept) == {"metadata": dict(kept.metadata), "spec": before["spec"], "status": before["status"]}


FREED_INSIDE_THE_HEAP = """
import ctypes, ctypes.util, sys, time
from finetune_operator import malloc
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096
chunks = [libc.malloc(1000) for _ in range(60_000)]  # 60 MB of small chunks, as a burst of decoded bodies
for chunk in chunks:
    ctypes.memset(chunk, 1, 1000)
for chunk in chunks[:-1]:
    libc.free(chunk)  # the last one pins the top of the heap: free() gives none of it back by itself
held = rss()
thread = malloc.trim_periodically(0.05) if sys.argv[1] == "trimmed" else None
deadline = time.monotonic() + (5 if thread else 0.5)  # a few periods, or a loaded machine's scheduling of them
while held - rss() < 40 << 20 and time.monotonic() < deadline:
    time.sleep(0.05)
print(thread is None or (thread.daemon and thread.is_alive()), (held - rss()) // 2**20)
"""


def test_the_heap_is_trimmed_periodically_on_glibc() -> None:
    """In fresh interpreters: 60 MB freed below a chunk still in use go back to the system within a few periods of
    the trimming thread, which lives as long as the process; without it they stay."""
    def released_mib(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FREED_INSIDE_THE_HEAP, mode], capture_output=True, text=True,
                             check=True)
        alive, released = out.stdout.split()
        return alive, int(released)

    alive, released = released_mib("trimmed")
    assert alive == "True" and released > 40
    assert released_mib("untrimmed")[1] < 10  # the freed chunks alone are no release


def test_the_bodies_kopf_keeps_share_their_field_names() -> None:
    """Two jobs decoded from the wire, as two watch events give them: after slimming, each field name (and short
    value) is one string object for both, and the bodies are equal to what they were."""
    wire = json.dumps(live_body())
    first, second = json.loads(wire), json.loads(wire)
    assert next(iter(first["spec"])) is not next(iter(second["spec"]))  # what the decoder gives: copies
    for raw in (first, second):
        asyncio.run(slim_body(event={"type": "MODIFIED", "object": raw}))
    assert first == second == {**json.loads(wire), "metadata": {
        k: v for k, v in json.loads(wire)["metadata"].items() if k != "managedFields"}}

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for key, item in value.items() for s in [key, *strings(item)]]
        if isinstance(value, list):
            return [s for item in value for s in strings(item)]
        return [value] if isinstance(value, str) else []
    parts = ("metadata", "spec", "status")
    pairs = list(zip(strings([first[p] for p in parts]), strings([second[p] for p in parts]), strict=True))
    assert pairs and all(a is b for a, b in pairs if len(a) <= 64)
