"""What torchrun tells each process through its environment, read here alone and without torch: the CLI sets up
its logging (a rank's prefix) before torch loads, which takes seconds. A process that torchrun did not start is rank
0 of a world of one."""

from __future__ import annotations

import os

# How long a rank waits for its peers, at torchrun's rendezvous (the operator's --rdzv-conf) and at each collective:
# the others wait at a barrier while rank 0 alone writes a checkpoint or the export, and a gang's last pod may start
# many minutes after its first (its node scaled up, a large image pulled), where torchrun's default of 900 s failed
# the attempt, counted.
PEER_WAIT_SECONDS = 3600


def rank() -> int:
    """This process's rank among all workers', known before the ranks join."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together, on all nodes."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node: the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many processes torchrun started on this node, which share its CPUs and its termination log."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
