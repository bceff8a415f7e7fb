"""Data-parallel plumbing for ``torchrun``: process group, device, DDP wrapping.

``torchrun --nproc_per_node N -m vol3d.cli train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; we join the
group with ``env://`` (NCCL on CUDA, gloo on CPU). A plain ``vol3d train`` is a
world of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly single-process) world."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, logs and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def setup(device: str = "auto") -> DistInfo:
    """Join the ``env://`` process group when launched by torchrun; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world, device=dev)


def wrap(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP-wrap ``model`` for a world > 1 (gradients are averaged across ranks in backward)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


def sync_batchnorm(model: nn.Module, info: DistInfo, enabled: bool) -> nn.Module:
    """BatchNorm layers made SyncBatchNorm for a world > 1 (``enabled``): at batch 1-2 per GPU the
    3D ResNet's batch statistics are then taken over the global batch. torch syncs on GPUs only."""
    if not enabled or not info.enabled:
        return model
    if info.device.type == "cpu":
        from preprocess.errors import ConfigError

        raise ConfigError("sync_batchnorm needs GPUs (torch's SyncBatchNorm does not run on CPU); drop "
                          "--sync-batchnorm, or use norm: instance for the ResNet at small batches")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
