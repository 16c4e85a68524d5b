"""Process-group set-up so one training script runs alone or under ``torchrun --nproc_per_node N``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True for the one process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    pref = preference.strip().lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {preference!r} was requested but no CUDA GPU is available; use device: cpu.")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "cpu":
        raise ConfigError(f"Unknown device {preference!r}: use auto, cpu, cuda or cuda:N.")
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU); else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def teardown(ctx: DistContext) -> None:
    """Leave the process group together (a no-op when running alone).

    The other ranks finish long before the main one (it alone calibrates and exports); a rank that destroyed its
    gloo group and exited while the main one still held connections to it was seen to abort ("terminate called
    without an active exception", once in CI), so every rank waits for the others first."""
    if ctx.distributed and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_mean(value: float, ctx: DistContext) -> float:
    """Mean of a per-process float over all processes."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def gather_objects(obj, ctx: DistContext) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` when running alone)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every process (keeps early stopping in step)."""
    if not ctx.distributed:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
