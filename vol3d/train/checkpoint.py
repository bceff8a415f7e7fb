"""Resumable checkpoints: ``RUN/checkpoints/step_N/``.

Each checkpoint holds everything a run needs to continue bit-for-bit:

- ``model.safetensors``: the full ``state_dict`` (no pickle);
- ``trainer_state.pt``: optimizer, LR scheduler, grad scaler and RNG states, read
  back with ``torch.load(weights_only=True)`` so it can never execute code;
- ``trainer.json``: step, samples seen, world size (the data position is derived
  from the step: see :class:`vol3d.train.loop.DataPlan`).

A checkpoint is written to ``step_N.tmp`` and renamed, so a crash mid-write
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from preprocess.errors import InputError

_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Counters restored from ``trainer.json``."""

    step: int
    samples_seen: int
    world_size: int
    #: optimizer state layout: "sharded" (FSDP: full state keyed by parameter name) or "" (keyed by index)
    optimizer_layout: str = ""


def capture_rng() -> dict[str, Any]:
    """Every RNG the loop may draw from (torch CPU/CUDA, Python, NumPy's global), as tensors/tuples."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was removed."""
    dirs = checkpoint_dirs(run_dir)
    removed = dirs[: max(0, len(dirs) - keep_last)]
    for d in removed:
        shutil.rmtree(d)
    return removed


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    state: TrainerState,
    rng: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optim_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_N`` atomically and return its path.

    ``model_state``/``optim_state``: the full state of a sharded (FSDP) model, gathered by
    :func:`vol3d.train.distributed.full_state`, saved instead of
    ``model``'s and ``optimizer``'s own."""
    final = Path(run_dir) / "checkpoints" / f"step_{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if model_state is not None:  # tied aliases once, as save_model stores them
        from vol3d.train.distributed import tied_names

        tied = tied_names(model)
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items() if k not in tied},
                  str(tmp / "model.safetensors"))
    else:  # save_model (not save_file) deduplicates tied weights, e.g. LM input/output embeddings.
        save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optim_state is None else optim_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "trainer.json").write_text(json.dumps(state.__dict__, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    sharded: bool = False,
) -> tuple[TrainerState, dict[str, Any]]:
    """Restore model/optimizer/scheduler/scaler in place; returns the counters and the RNG state.

    ``sharded``: ``model`` is an FSDP2 module (every rank reads the full state and keeps its shard)."""
    ckpt = Path(ckpt)
    needed = [ckpt / n for n in ("model.safetensors", "trainer_state.pt", "trainer.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise InputError(f"checkpoint {ckpt} is incomplete (missing {missing}); delete it to resume from an older one")
    if sharded != (optimizer_layout(ckpt) == "sharded"):
        saved, now = ("fsdp", "ddp (or one process)") if not sharded else ("ddp (or one process)", "fsdp")
        raise InputError(f"checkpoint {ckpt} was saved by a {saved} run and this run uses {now}: their optimizer "
                         f"states differ; resume with the strategy it was saved with (strategy: in config.yaml)")
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    if sharded:
        from vol3d.train.distributed import load_full_state

        missing_keys, unexpected = load_full_state(model, optimizer, load_file(str(ckpt / "model.safetensors")),
                                                   blob["optimizer"])
    else:
        missing_keys, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if missing_keys or unexpected:
        raise InputError(
            f"checkpoint {ckpt} does not match the model built from config.yaml "
            f"(missing {missing_keys[:5]}, unexpected {unexpected[:5]}); was config.yaml edited?"
        )
    if not sharded:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    state = TrainerState(**json.loads((ckpt / "trainer.json").read_text()))
    return state, blob["rng"]


def optimizer_layout(ckpt: Path) -> str:
    """The ``optimizer_layout`` a checkpoint was saved with (see :class:`TrainerState`)."""
    return str(json.loads((Path(ckpt) / "trainer.json").read_text()).get("optimizer_layout", ""))
