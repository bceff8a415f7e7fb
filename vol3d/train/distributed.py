"""Multi-process plumbing for ``torchrun``: process group, device, DDP or FSDP2.

``torchrun --nproc_per_node N -m vol3d.cli train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; we join the
group with ``env://`` (NCCL on CUDA, gloo on CPU). A plain ``vol3d train`` is a
world of one and never touches ``torch.distributed``.

Two strategies (``strategy:`` in a run config, ``--strategy`` on the command line):

- ``ddp``: every rank holds the whole model; gradients are averaged (``DistributedDataParallel``).
- ``fsdp``: torch's FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded
  over the ranks, each transformer layer / encoder block a unit gathered just before it runs, for
  language models that do not fit replicated. Checkpoints hold the full (gathered) state, so a
  run saved under one world size resumes under another, and ``RUN/model`` loads anywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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


STRATEGIES = ("ddp", "fsdp")


def is_sharded(model: nn.Module) -> bool:
    """True for a model :func:`shard` made an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 gathers one at a time: every child with parameters of every ``nn.ModuleList``
    (the LM's decoder layers, the ViT's blocks, the ResNet's and decoders' stages), innermost first."""
    units = [child for m in model.modules() if isinstance(m, nn.ModuleList)
             for child in m if next(child.parameters(), None) is not None]
    return units[::-1]  # modules() is pre-order: reversed, a nested unit comes before the one holding it


def shard(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2 ``fully_shard`` of :func:`shard_units`, then of the whole model (the rest: embeddings,
    heads, projector), for a world > 1. In place (``model`` becomes an ``FSDPModule``); build the
    optimizer after it, from the sharded parameters."""
    if not info.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # as DDP does: every rank starts from rank 0's weights, whatever its own init
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward passes of a DDP or FSDP model accumulate gradients locally (``enabled=False``,
    the first micro-batches of a step) or reduce them across ranks (``enabled=True``, the last one)."""
    if enabled:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. an LM's output embedding tied to its input)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full model and optimizer state of a sharded model, gathered to rank 0's CPU (other ranks get
    empty dicts). Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: Mapping[str, Any],
                    optim_sd: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Load full state dicts (what :func:`full_state` gathered; every rank read them) into a sharded model
    and its optimizer. Returns the model's missing and unexpected keys (tied aliases not counted)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    keys = set_model_state_dict(model, dict(model_sd), options=opts)
    set_optimizer_state_dict(model, optimizer, dict(optim_sd), options=StateDictOptions(full_state_dict=True))
    tied = tied_names(model)
    return [k for k in keys.missing_keys if k not in tied], list(keys.unexpected_keys)


def wrap(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP-wrap ``model`` for a world > 1 (gradients are averaged across ranks in backward); a model
    :func:`shard` made FSDP2 is returned as it is (it reduces its own gradients)."""
    if not info.enabled or is_sharded(model):
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
