"""The process group under torchrun (gloo on CPUs, nccl on GPUs), and a single process without it.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; in a cluster its static rendezvous (rank 0's pod by its
hostname on the operator's headless Service, children.py) is what joins the ranks.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from finetune_trainer.errors import ConfigError, GPUsNotVisible
from finetune_trainer.torchrun import PEER_WAIT_SECONDS, local_rank, rank, world_size

# How long a collective waits for the other ranks (PEER_WAIT_SECONDS): a large model's optimizer state written to a
# network volume can take longer than NCCL's default of 10 minutes, whose watchdog then aborted the waiting ranks (and
# the attempt). A rank that dies is torchrun's to see, at once.
COLLECTIVE_TIMEOUT = timedelta(seconds=PEER_WAIT_SECONDS)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Add the values up across ranks (one collective for all of them); a single process asks no GPU, whose
        round trip each step made the host wait for the step before it."""
        if self.size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank; a single process asks no collective (nor a GPU)."""
        return flag if self.size == 1 else self.sum([float(flag)])[0] > 0

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers. DDP broadcasts them before each forward, but each rank's training
        forward then moves its BatchNorm statistics by its own batch, so the ranks would evaluate models that differ
        from each other and from rank 0's, which is the one exported."""
        self.broadcast_tensors(model.buffers())

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` (the same shapes on every rank), in place on every rank."""
        if self.size > 1:
            for tensor in tensors:
                dist.broadcast(tensor.detach(), 0)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object, of any size on each rank), in rank order."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0, device=self.device)
        return box[0]

    def main_look(self, look: Callable[..., Any], *args: Any) -> Any:
        """`look(*args)` as rank 0 finds it, on every rank; only rank 0 calls it. For what is read from a shared
        volume: its listing may differ between ranks (NFS's cached attributes, a file rank 0 wrote a moment before),
        and ranks that each read their own resumed different steps or waited in different numbers of collectives."""
        return self.broadcast(look(*args) if self.main else None)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def local_device() -> torch.device:
    """The GPU of this process's LOCAL_RANK where there are GPUs, else the CPU; known before the ranks join. Not the
    CPU where the worker was granted GPUs (GPUS_ENV, the operator's): that is a fault of the image or the node."""
    local = local_rank()
    cuda = torch.cuda.is_available()
    if not cuda and (granted := granted_gpus()):
        has = f"the worker has {granted} GPU(s) (nvidia.com/gpu)"
        if torch.version.cuda is None:
            raise ConfigError(f"runtime.image: {has} and the image's torch {torch.__version__} is built without CUDA; "
                              "use an image with a CUDA build of torch")
        if hides_every_gpu(hidden := os.environ.get("CUDA_VISIBLE_DEVICES")):
            raise ConfigError(f"runtime.env: {has} and CUDA_VISIBLE_DEVICES={hidden!r} hides them; leave it unset")
        raise GPUsNotVisible(f"{has} and CUDA sees none (torch {torch.__version__}, CUDA {torch.version.cuda}: "
                             f"{cuda_problem()}): the node's driver (too old for this CUDA?) or device plugin failed "
                             "it, or the cluster runs GPU pods under a runtime class; a new attempt may land on "
                             "another node")
    if cuda and local >= (gpus := torch.cuda.device_count()):  # else CUDA's "invalid device ordinal": retried
        if (granted := granted_gpus()) > gpus:  # enough for its processes, as the operator's admission checked
            has = f"the worker has {granted} GPU(s) (nvidia.com/gpu) and CUDA sees {gpus}"
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
            if (names := visible_list(hidden)) is not None and len(names) < granted:  # the job's env, not the node
                raise ConfigError(f"runtime.env: {has}: CUDA_VISIBLE_DEVICES={hidden!r} hides the others; leave it "
                                  "unset")
            raise GPUsNotVisible(f"{has}: the node lost one (an Xid error, a GPU fallen off the bus) or its device "
                                 "plugin gave fewer; a new attempt may land on another node")
        raise ConfigError(f"runtime.processesPerWorker: this worker runs more processes than it has GPUs ({gpus}): "
                          "at most one process per GPU (nvidia.com/gpu in runtime.resources.limits)")
    return torch.device("cuda", local) if cuda else torch.device("cpu")


GPUS_ENV = "FINETUNE_GPUS"  # the worker's nvidia.com/gpu, as the operator made its pod


def cuda_problem() -> str:
    """Why CUDA sees no GPU, as its start says (no driver, one too old)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # torch's RuntimeError, or whatever the driver's library raised
        return str(exc).split("\n")[0]
    return "it starts, yet counts no device"


def hides_every_gpu(visible: str | None) -> bool:
    """Whether CUDA_VISIBLE_DEVICES hides every GPU (it names none, `visible_list`). A list that names GPUs (a
    scheduler's "0,1") hides none; a GPU it names that CUDA then does not see is the node's fault."""
    return visible is not None and not visible_list(visible)


def visible_list(visible: str | None) -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names, None where it is unset: CUDA reads its list up to the first entry that is
    no index or UUID ("", "-1", "none")."""
    if visible is None:
        return None
    names = []
    for entry in (e.strip() for e in visible.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        names.append(entry)
    return names


def granted_gpus() -> int:
    """The GPUs the operator gave this worker's pod; 0 where it says none (a pod of an older operator, a CLI run)."""
    try:
        return max(int(os.environ.get(GPUS_ENV) or 0), 0)
    except ValueError:
        return 0


def join() -> World:
    """Join the ranks, each on its local_device: the rendezvous and NCCL's start may take minutes."""
    size = world_size()
    device = local_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=COLLECTIVE_TIMEOUT)
    return World(rank=rank(), size=size, device=device)


def leave() -> None:
    """Tear the process group down, after the last collective: NCCL's communicators left to the interpreter's exit
    can crash or hang there. What holds the group first goes: a DDP module left in a reference cycle kept it past its
    destruction, to the interpreter's exit."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
