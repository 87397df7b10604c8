"""torch.distributed for the trainer and the sampler: one process per device under ``torchrun``.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op for a world of one, so the
single-process path is the same code. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _from_slurm() -> None:
    """Inside a multi-task Slurm job (the submitit launcher's tasks_per_node = GPUs per node), export the
    variables torchrun would set, so that one code path serves both launchers."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import subprocess

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), MASTER_ADDR=nodes[0],
                      MASTER_PORT=str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun (or a multi-task Slurm job) set up, if any; returns the world and this
    rank's device."""
    _from_slurm()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
        atexit.register(_leave_group)
    return World(rank, size, local_rank), device


def _leave_group() -> None:
    """Tear the process group down before interpreter shutdown: a gloo group left to static destructors can
    abort the process at exit ("terminate called without an active exception") after all work succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object: a path, a key)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_ok(ok: bool, world: World, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank (one rank's NaN stops them all)."""
    if not world.distributed:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.size


def gather_to_main(tensor: torch.Tensor, world: World) -> torch.Tensor | None:
    """Concatenate every rank's (N_r, ...) CPU tensor on rank 0 in rank order (None elsewhere)."""
    if not world.distributed:
        return tensor
    parts: list = [None] * world.size if world.is_main else None
    dist.gather_object(tensor, parts, dst=0)
    return torch.cat(parts, 0) if world.is_main else None


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
