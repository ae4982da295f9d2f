"""Pod addresses on loopback (all of 127/8 is loopback on Linux), for the process node and for kwok.

Each cluster's networks come from its state folder, so clusters side by side on one machine
(worktrees, a test's second node) most likely hand out different addresses (two state folders
share a network with odds 1 in 253)."""

from __future__ import annotations

import ipaddress
import zlib
from pathlib import Path

FIRST, COUNT = 2, 253  # 127.2.0.0/16 … 127.254.0.0/16


def _second_octet(state_dir: Path, offset: int) -> int:
    return FIRST + (zlib.crc32(str(state_dir).encode()) + offset) % COUNT


def pod_network(state_dir: Path) -> ipaddress.IPv4Address:
    """Where the process node (state folder `state_dir`) starts its pod IPs: 127.<n>.0.0."""
    return ipaddress.ip_address(f"127.{_second_octet(state_dir, 0)}.0.0")


def kwok_cidr(node_state_dir: Path) -> str:
    """kwok's pod CIDR: the /16 after the process node's, also on loopback, so a simulated pod's IP is an
    address a local server can answer on (the operator reads rank 0's metrics there) and never collides
    with a process-node pod."""
    return f"127.{_second_octet(node_state_dir, 1)}.0.0/16"
