"""deploy/local/ports.py: the free ports that the local cluster and the tests' servers bind after they were picked."""

from __future__ import annotations

import socket

import pytest

import ports  # deploy/local/ports.py (on the path since kube, which conftest imports)


def test_the_ports_are_outside_the_ephemeral_range_and_distinct() -> None:
    """One in the range could be given to an outgoing connection before its server bound it; one handed out twice
    would be bound by two servers."""
    low, high = ports.ephemeral_range()
    picked = ports.free_ports(50) + [ports.free_port() for _ in range(50)]
    assert len(set(picked)) == len(picked)
    assert all(ports.LOWEST <= port < 65536 and not low <= port <= high for port in picked), picked


def test_a_port_something_listens_on_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        taken = server.getsockname()[1]
        draws, choose = [taken], ports._random.choice  # the listened one first, then the helper's own draws
        monkeypatch.setattr(ports._random, "choice", lambda candidates: draws.pop() if draws else choose(candidates))
        assert ports.free_port() != taken and not draws


def test_a_range_that_leaves_no_port_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOWEST, 65535))
    with pytest.raises(OSError, match="leaves no port outside it"):
        ports.free_port()
