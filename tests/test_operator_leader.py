"""The standby's pieces of leader election that need no apiserver (the rest: test_cluster_leader.py)."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request

import pytest

from finetune_operator import leader
from operator_fixture import free_port


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not _ipv6(), reason="no IPv6 loopback here"))])
def test_a_standby_answers_healthz_on_the_bind_address_of_either_family(host: str) -> None:
    """bindAddress :: (or an IPv6 pod IP) stopped every operator of the chart at its start: the standby's server was
    IPv4-only."""
    port = free_port()
    with leader._standby_health(host, port):
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200 and response.read() == b"standby\n"
    with pytest.raises(OSError):  # closed, for kopf's own endpoint to take the port
        urllib.request.urlopen(url, timeout=5)


def test_sigterm_stops_a_standby_quietly_and_the_handlers_are_given_back() -> None:
    """As PID 1 (the image's), a process without a SIGTERM handler never gets the signal: a standby ran on through an
    upgrade, took the lease as the active pod stopped, and held the new pods back until its SIGKILL."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, leader.stopped_by_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 0 and signal.getsignal(signal.SIGTERM) is before
