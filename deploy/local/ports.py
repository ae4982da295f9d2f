"""Free loopback ports for a server that binds them later: the local cluster's components, and the tests' servers,
Prometheus and torchrun.

A port the kernel hands out for port 0 is in its ephemeral range, the range it also gives every outgoing
connection its local port from: between the pick and the server's bind, a connection of anything on the machine
(the apiserver's to etcd, a kubectl, pip) could be given the same port, and the bind failed. These ports are drawn
at random from outside that range, where no outgoing connection is ever given one; each is checked to bind, and
none is handed out twice by one process. Where a server of our own can bind port 0 and say which port it got, that
is better still: nothing here is needed."""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Where the file cannot be read: the widest that common kernels use (Linux 32768-60999, macOS and the BSDs 49152-65535)
EPHEMERAL_ELSEWHERE = (32768, 65535)
LOWEST = 1024  # below it, the privileged ports

_given: set[int] = set()  # handed out by this process: a port picked and not yet bound passes the bind check
# Its own source: the trainer seeds `random` in the tests' process, and two processes seeded alike drew alike.
_random = random.SystemRandom()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports, both ends included."""
    try:
        low, high = map(int, RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return EPHEMERAL_ELSEWHERE
    return low, high


def free_ports(count: int) -> list[int]:
    """`count` distinct ports outside the ephemeral range that nothing holds on this machine now; where that range
    leaves none (1024-65535, as some tune it), ports the kernel picks, as before, with their race."""
    low, high = ephemeral_range()
    candidates = [*range(LOWEST, low), *range(high + 1, 65536)]
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(_bound(candidates) if candidates else _kernels())
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _kernels() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def free_port() -> int:
    return free_ports(1)[0]


def _held_on_ipv6(port: int) -> bool:
    """Whether something holds `port` on IPv6 alone (a server of [::] with IPV6_V6ONLY), which an IPv4 bind does
    not see, and a dual-stack server binding it later would fail on; False where the machine has no IPv6."""
    try:
        s = socket.socket(socket.AF_INET6)
    except OSError:
        return False
    with s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(("::", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _bound(candidates: list[int]) -> socket.socket:
    """A socket bound to a random candidate on every IPv4 address: one that anything listens on, on any address,
    is passed over."""
    for _ in range(1000):
        port = _random.choice(candidates)
        if port in _given:
            continue
        s = socket.socket()
        try:
            s.bind(("", port))  # no SO_REUSEADDR: a port still in TIME_WAIT is passed over too
        except OSError:
            s.close()
            continue
        if _held_on_ipv6(port):
            s.close()
            continue
        _given.add(port)
        return s
    raise OSError(f"no free port found outside the ephemeral range {ephemeral_range()}")
