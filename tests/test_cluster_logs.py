"""`kubectl logs` through the apiserver to the process node's kubelet API: a follow streams
every line while the container runs, `--tail` reads from the end, and `--previous` shows the
run before the last restart."""

from __future__ import annotations

import subprocess

import pytest

from kube import Kube, phase
from pods import finished, make_pod

pytestmark = pytest.mark.cluster

LINES = 3000


def test_follow_streams_every_line_while_the_container_runs(kube: Kube, namespace: str) -> None:
    # Writes in bursts, slower at the end, so the follow starts mid-way and must keep up.
    script = (f"import time\nfor i in range({LINES}):\n    print(f'line {{i:05d}}', flush=True)\n"
              "    if i % 500 == 0: time.sleep(0.3)\nprint('last', flush=True)")
    kube.apply(make_pod("talker", script), namespace)
    kube.wait_pod(namespace, "talker", lambda p: phase(p) != "Pending", "started")
    follow = subprocess.Popen([*kube.kubectl_argv(), "logs", "-f", "talker", "-n", namespace],
                              stdout=subprocess.PIPE, text=True)
    first = follow.stdout.readline()
    assert first == "line 00000\n"  # streamed, before the container is done
    rest, _ = follow.communicate(timeout=60)  # the follow ends when the container does
    assert (first + rest).splitlines() == [f"line {i:05d}" for i in range(LINES)] + ["last"]
    assert kube.kubectl("logs", "--tail=2", "talker", "-n", namespace).stdout == f"line {LINES - 1:05d}\nlast\n"


def test_previous_shows_the_run_before_the_restart(kube: Kube, namespace: str) -> None:
    script = ("import os, sys; p = '/scratch/runs'; n = len(open(p).read()) if os.path.exists(p) else 0\n"
              "open(p, 'a').write('x'); print(f'run {n}', flush=True); sys.exit(1 if n == 0 else 0)")
    kube.apply(make_pod("restarts", script, restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {}}],
                        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}), namespace)
    kube.wait_pod(namespace, "restarts", finished, "finished")
    assert kube.kubectl("logs", "restarts", "-n", namespace).stdout == "run 1\n"
    assert kube.kubectl("logs", "--previous", "restarts", "-n", namespace).stdout == "run 0\n"
