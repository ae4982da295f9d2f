"""`make demo`'s own printing (deploy/local/demo.py), without a cluster."""

from __future__ import annotations

import re
import sys

from conftest import LOCAL

sys.path.insert(0, str(LOCAL))
import demo  # noqa: E402  (deploy/local/demo.py)

# Two of kubectl's tables for the same job, as `kubectl get ftj -o wide` printed them: each sized to its own values.
PENDING = """\
NAME               PHASE     STAGE   PROGRESS   WORKERS   ATTEMPTS   AGE   LOSS   EVAL   REASON
minilm-sentiment   Pending                                1          0s                  AttemptCreated
"""
DONE = """\
NAME               PHASE       STAGE   PROGRESS   WORKERS   ATTEMPTS   AGE   LOSS     EVAL                                   REASON
minilm-sentiment   Succeeded   Done    100        0         1          89s   0.5373   accuracy 0.411→0.659, f1 0.303→0.601   Completed
"""


def test_the_rows_it_follows_stay_under_the_header() -> None:
    """kubectl sizes each table to its values, so rows printed from separate calls (--no-headers) drifted: the
    attempt count of a pending job sat under PROGRESS, a running one's progress under STAGE."""
    header = demo.aligned(demo.cells(PENDING), "minilm-sentiment", header=True)
    starts = {m.group(): m.start() for m in re.finditer(r"\S+", header)}
    for table in (PENDING, DONE):
        pairs = demo.cells(table)
        line = demo.aligned(pairs, "minilm-sentiment")
        for column, value in pairs:
            start = starts[column]
            assert line[start:start + len(value)] == value and line[start - 1:start] in ("", " "), (column, line)
    assert dict(demo.cells(PENDING))["WORKERS"] == "" and dict(demo.cells(PENDING))["ATTEMPTS"] == "1"
    assert dict(demo.cells(DONE))["EVAL"] == "accuracy 0.411→0.659, f1 0.303→0.601"
