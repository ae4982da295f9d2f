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


def test_a_port_something_listens_on_over_ipv6_alone_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """An IPv4 bind does not see a server of [::] with IPV6_V6ONLY: a dual-stack server given its port failed."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    server = socket.socket(socket.AF_INET6)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        server.bind(("::1", 0))
    except OSError:
        server.close()
        pytest.skip("no IPv6 loopback here")
    with server:
        server.listen()
        taken = server.getsockname()[1]
        draws, choose = [taken], ports._random.choice
        monkeypatch.setattr(ports._random, "choice", lambda candidates: draws.pop() if draws else choose(candidates))
        assert ports.free_port() != taken and not draws


def test_a_range_that_leaves_no_port_gives_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """1024-65535, as some tune it: the tests and the local cluster did not start at all."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOWEST, 65535))
    monkeypatch.setattr(ports, "_bound", lambda candidates: pytest.fail(f"drew from {len(candidates)} ports"))
    picked = ports.free_ports(3)
    assert len(set(picked)) == 3 and all(ports.LOWEST <= port < 65536 for port in picked)
