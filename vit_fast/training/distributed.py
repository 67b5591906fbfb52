"""torchrun / DDP / FSDP2 set-up: the process group, the device of each rank, the model wrapper, cross-rank means."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistEnv:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun) and its device;
    `created_group` says whether the trainer initialised the process group (and so destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK; with more than one process, join (or create) the
    default process group: nccl for CUDA devices, gloo for CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    created = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistEnv(rank, world, local, dev, created)


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 when `fsdp`) around `model` when running on more than one process."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer block, then the root (embeddings, final norm, head), as FSDP2 advises.
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for blk in getattr(model, "blocks", []):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def all_mean(value: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value
