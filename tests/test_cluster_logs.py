"""`kubectl logs` through the apiserver to the process node's kubelet API: a follow streams
every line while the container runs, `--tail` reads from the end, and `--previous` shows the
run before the last restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kube import Kube, phase, terminate
from pods import HOST_PATH, finished, make_claim, make_pod

pytestmark = pytest.mark.cluster

LINES = 3000


def test_follow_streams_every_line_while_the_container_runs(kube: Kube, namespace: str, host_folder: Path) -> None:
    # Blocks after its first line until the test creates `go` in its claim: run through (~2 s), the script had ended
    # before the follow started, and `kubectl logs -f` on an ended container prints the whole log without streaming.
    # Then writes in bursts, slower at the end, so the follow must keep up.
    script = ("import os, time\nprint('line 00000', flush=True)\n"
              "while not os.path.exists('/mnt/go/go'): time.sleep(0.05)\n"
              f"for i in range(1, {LINES}):\n    print(f'line {{i:05d}}', flush=True)\n"
              "    if i % 500 == 0: time.sleep(0.3)\nprint('last', flush=True)")
    claim = make_claim("go")
    claim["metadata"]["annotations"] = {HOST_PATH: str(host_folder)}
    pod = make_pod("talker", script, volumes=[{"name": "go", "persistentVolumeClaim": {"claimName": "go"}}],
                   container={"volumeMounts": [{"name": "go", "mountPath": "/mnt/go", "readOnly": True}]})
    kube.apply([claim, pod], namespace)
    kube.wait_pod(namespace, "talker", lambda p: phase(p) != "Pending", "started")
    follow = subprocess.Popen([*kube.kubectl_argv(), "logs", "-f", "talker", "-n", namespace],
                              stdout=subprocess.PIPE, text=True)
    try:
        first = follow.stdout.readline()
        assert first == "line 00000\n"
        assert follow.poll() is None, "the follow ended while the container still runs"
        (host_folder / "go").touch()
        rest, _ = follow.communicate(timeout=60)  # the follow ends when the container does
    finally:
        (host_folder / "go").touch()  # the container ends either way
        terminate(follow, grace=5)
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
