"""The one training loop: :func:`fit`. Read it top to bottom.

Tasks plug in through an :class:`~vol3d.train.objectives.Objective`; everything
else (AMP, accumulation, DDP, clipping, LR schedule, validation, checkpoints,
exact resume, metrics) lives here once.

Exact resume rests on two choices. (1) The data stream is a pure function of
``(seed, position)`` (:class:`DataPlan`): the items and per-item RNGs of
micro-step ``m`` never depend on what ran before, so a resumed run just starts
at ``m = step * grad_accum``. (2) Every global RNG is captured at each step
boundary and saved with the checkpoint; validation and batch building run with
the RNG forked, so they never perturb the training stream.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from preprocess.errors import InputError
from vol3d.models.layers import use_channels_last
from vol3d.train import checkpoint as ckpt_io
from vol3d.train import distributed as ddp
from vol3d.train.config import RunConfig
from vol3d.train.objectives import Objective

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Ctrl-C during :func:`fit`: a checkpoint of the last finished step was saved."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"interrupted after step {step}")
        self.run_dir = run_dir
        self.step = step


@dataclass
class FitResult:
    """What :func:`fit` reached: the final step and the last logged train/val metrics."""

    step: int
    train: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


class DataPlan:
    """Which items rank ``r`` reads at micro-step ``m``, as a pure function of ``(seed, m, r)``.

    The global stream visits the items in a fresh seeded permutation every epoch.
    Micro-step ``m`` of a world of ``W`` ranks with per-rank batch ``B`` consumes
    stream positions ``m*W*B .. (m+1)*W*B - 1``; rank ``r`` takes the ``r``-th run of
    ``B``. Hence ``grad_accum=2, batch_size=1`` reads exactly the items of
    ``batch_size=2``, and so does a 2-rank run with ``batch_size=1``.
    """

    def __init__(self, n_items: int, batch_size: int, world_size: int, rank: int, seed: int):
        if n_items <= 0:
            raise ValueError("the training set is empty")
        self.n, self.b, self.w, self.r, self.seed = n_items, batch_size, world_size, rank, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def positions(self, micro_step: int) -> list[int]:
        start = (micro_step * self.w + self.r) * self.b
        return list(range(start, start + self.b))

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][offset])

    def item_rng(self, position: int) -> np.random.Generator:
        """The generator for everything random about the item at ``position`` (task, augmentation)."""
        return np.random.default_rng([self.seed, 1_000_003, position])

    def torch_seed(self, micro_step: int) -> int:
        """Seed of torch's global RNG while this rank builds the batch of ``micro_step``."""
        return int(np.random.default_rng([self.seed, 2_000_003, micro_step, self.r]).integers(2**62))


class _PlannedBatches(torch.utils.data.Dataset):
    """Map-style dataset whose element ``m`` is the whole batch of micro-step ``m``."""

    def __init__(self, items: Sequence[Any], objective: Objective, plan: DataPlan, accum: int = 1):
        self.items, self.objective, self.plan, self.accum = items, objective, plan, accum
        self.staged = bool(getattr(objective, "stage_starts", ()))

    def __len__(self) -> int:  # only used by DataLoader's sanity checks
        return 2**62

    def __getitem__(self, micro_step: int) -> dict[str, Any]:
        pos = self.plan.positions(micro_step)
        items = [self.items[self.plan.index(p)] for p in pos]
        rngs = [self.plan.item_rng(p) for p in pos]
        # Libraries that draw from torch's global RNG (TorchIO, MONAI) get a per-batch
        # seed; forking keeps the training process's own stream (dropout) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.plan.torch_seed(micro_step))
            if self.staged:  # a staged objective builds the batch of the stage this step is in
                return self.objective.make_batch(items, rngs, step=micro_step // self.accum)  # type: ignore[call-arg]
            return self.objective.make_batch(items, rngs)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (e.g. a Sample) keeps its type
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ----------------------------------------------------------------------------- optimisation


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): ``auto`` is bf16 on CUDA cards that support it, fp32 elsewhere."""
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_optimizer(model: nn.Module, cfg: RunConfig, first_stage: set[str] | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms and ``model.no_weight_decay()``.

    ``first_stage``: names of the parameters that the first stage of a staged objective trains (see
    :func:`first_stage_parameters`); they and the others then sit in groups of their own, each group's
    ``"stage"`` saying when its parameters first train (0, or 1: at the first later stage), so that
    :func:`group_schedule` can give them learning rates of their own. None: one stage for all.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            stage = 0 if first_stage is None or name in first_stage else 1
            groups.setdefault((stage, p.ndim >= 2 and name not in skip), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    order = [(0, True), (0, False), (1, True), (1, False)]
    param_groups = [{"params": groups.get(k, []), "weight_decay": cfg.optim.weight_decay if k[1] else 0.0, "stage": k[0]}
                    for k in order if k in groups or (first_stage is None and k[0] == 0)]
    return torch.optim.AdamW(param_groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def first_stage_parameters(model: nn.Module, objective: Objective, train_items: Sequence[Any], cfg: RunConfig,
                           device: torch.device) -> set[str]:
    """Names of the parameters that the first stage of a staged objective trains: those that the loss of
    the run's own first batch reaches (one forward and backward; no ``.grad`` is written, buffers such
    as batch-norm statistics are put back and the global RNGs forked, so the run is as without it)."""
    plan = DataPlan(len(train_items), cfg.data.batch_size, 1, 0, cfg.seed)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return set()
    names, params = [n for n, _ in trainable], [p for _, p in trainable]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    amp_dtype = resolve_precision(cfg.precision, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = to_device(_PlannedBatches(train_items, objective, plan)[0], device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = objective.loss(model, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return {n for n, g in zip(names, grads, strict=True) if g is not None}


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``min_ratio`` at ``total``."""

    warmup = min(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def staged_schedule(warmup: int, total: int, min_ratio: float, starts: Sequence[int] = ()):
    """LR multiplier of a run in stages starting at ``starts`` (optimizer steps): each stage has its own
    :func:`warmup_cosine` over its own steps, so a stage that brings new parts to train (e.g. the
    language model after the perception) starts from a warmup instead of the tail of the previous cosine."""
    bounds = [0, *sorted(int(s) for s in starts if 0 < int(s) < total), total]
    parts = [(lo, warmup_cosine(warmup, hi - lo, min_ratio)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def factor(step: int) -> float:
        lo, part = next((lo, f) for lo, f in reversed(parts) if step >= lo)
        return part(step - lo)

    return factor


def group_schedule(warmup: int, total: int, min_ratio: float, starts: Sequence[int] = (), stage: int = 0,
                   stage_lr: str = "restart"):
    """LR multiplier of a parameter group whose parameters first train in stage ``stage`` (0, or 1: at the
    first of ``starts``), by ``optim.stage_lr``. ``restart``: every group follows :func:`staged_schedule`
    (each stage warms the whole model up again). Else a group warms up when its parameters first train
    and follows its cosine to the end of that stage; then ``keep`` holds it at ``min_ratio``, where that
    cosine ended, and ``freeze`` at 0 (its parameters no longer train; :func:`fit` also stops their
    gradients). Either way a later stage warms up only what is new to it (the language model after the
    perception)."""
    if stage_lr == "restart":
        return staged_schedule(warmup, total, min_ratio, starts)
    bounds = [0, *sorted(int(s) for s in starts if 0 < int(s) < total), total]
    lo = bounds[min(stage, len(bounds) - 2)]
    hi = bounds[min(stage, len(bounds) - 2) + 1] if stage == 0 else total
    part = warmup_cosine(warmup, hi - lo, min_ratio)
    after = 0.0 if stage_lr == "freeze" else min_ratio

    def factor(step: int) -> float:
        if step < lo:
            return 0.0  # not trained yet: no gradients, and no decay either
        return part(step - lo) if step < hi or hi >= total else after  # a cosine to the run's end stays there

    return factor


def freeze(model: nn.Module, names: set[str]) -> None:
    """Stop training the parameters ``names`` of ``model`` (``optim.stage_lr: freeze`` at a later stage):
    no gradient, so the backward pass stops where only they would need it."""
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            p.grad = None


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """``metrics.csv`` (long format: ``step,name,value,time``) and TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.csv" if run_dir is not None else None
        self.tb = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # Rows logged after the checkpoint we resume from would be duplicated: drop them.
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._write(rows, "w")
        else:
            self._write([], "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.csv only (pip install tensorboard)")

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        with self.path.open(mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "name", "value", "time"])
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.path is None:
            return
        now = round(time.time(), 3)
        self._write([{"step": step, "name": k, "value": f"{v:.6g}", "time": now} for k, v in values.items()], "a")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Window:
    """Running means of the logs between two log steps (tensors are synced only when read)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def save_model_dir(model: nn.Module, run_dir: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Write ``RUN/model`` (``save_pretrained`` when the model has it) via a temp dir + rename.

    ``state_dict``: the full weights of a sharded model (:func:`vol3d.train.distributed.full_state`)."""
    import shutil

    from safetensors.torch import save_file, save_model

    final = Path(run_dir) / "model"
    tmp = final.with_name("model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    elif state_dict is not None:
        tmp.mkdir(parents=True)
        tied = ddp.tied_names(model)  # stored once, as save_model stores them
        save_file({k: v.contiguous() for k, v in state_dict.items() if k not in tied}, str(tmp / "model.safetensors"))
    else:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def validate_across_ranks(objective: Objective, model: nn.Module, items: Sequence[Any], info: ddp.DistInfo,
                          sharded: bool) -> dict[str, float]:
    """``objective.validate`` on the validation items, split over the ranks: rank ``r`` takes items
    ``r, r + W, ...`` and the metrics are averaged weighted by each rank's item count (every rank gets
    the result). A sharded (FSDP) model needs every rank in every forward pass, so there each rank
    validates all items (the same passes in the same order) and rank 0's metrics count."""
    if not info.enabled or sharded:
        return dict(objective.validate(model, items))
    import torch.distributed as dist

    mine = [items[i] for i in range(info.rank, len(items), info.world_size)]
    local = (dict(objective.validate(model, mine)) if mine else {}, len(mine))
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, local)
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for vals, n in gathered:
        for k, v in vals.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
            weights[k] = weights.get(k, 0) + n
    return {k: totals[k] / weights[k] for k in totals if weights[k]}


# ----------------------------------------------------------------------------- the loop

#: With a deadline, :func:`fit` times this many steps of the run's last stage before it trusts their
#: mean to say how many more fit.
GUARD_STEPS = 5
#: A cut leaves this share of the steps that the deadline seems to afford (their times vary).
GUARD_MARGIN = 0.97


def fit(
    cfg: RunConfig,
    model: nn.Module,
    objective: Objective,
    train_items: Sequence[Any],
    val_items: Sequence[Any] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    deadline: float | None = None,
) -> FitResult:
    """Train ``model`` on ``objective`` for ``cfg.max_steps`` optimizer steps.

    ``cfg`` is any :class:`~vol3d.train.config.RunConfig` (``TrainConfig``, ``SegConfig``);
    besides its run fields and ``optim``, ``fit`` reads ``cfg.data.batch_size`` and ``cfg.data.num_workers``.

    Writes checkpoints, ``model/``, ``metrics.csv`` and ``tb/`` under ``run_dir``
    (rank 0; ``None`` writes nothing, for tests). ``resume=True`` continues from
    the newest ``run_dir/checkpoints/step_N``. Under torchrun every rank calls
    ``fit``; gradients are averaged by DDP. Raises :class:`TrainingInterrupted`
    on Ctrl-C after saving a checkpoint of the last finished step.

    ``deadline`` (a ``time.perf_counter()`` value): the last step must end by then. Once
    :data:`GUARD_STEPS` steps of the last stage (of the run, without stages) have run, their mean
    time says how many more fit; where fewer than planned do, ``cfg.max_steps`` is lowered to match
    and the learning-rate schedule follows it, so the run still anneals and saves its last step
    (a time budget's plan measures only a few steps, and the clock stopping a run mid-schedule
    costs it the annealing and the language model's steps).
    """
    info = ddp.setup(cfg.device)
    device = info.device
    amp_dtype = resolve_precision(cfg.precision, device)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    if hasattr(model, "set_precision"):  # the model autocasts inside forward: make it the run's dtype
        model.set_precision(amp_dtype)
    model = ddp.sync_batchnorm(model, info, cfg.sync_batchnorm)
    model.to(device)
    if device.type == "cpu":  # oneDNN's 3D convolutions run faster channels-last (before the optimizer: its state follows)
        use_channels_last(model)
    stage_starts = tuple(getattr(objective, "stage_starts", ()))
    stage_lr = cfg.optim.stage_lr if stage_starts else "restart"
    first_stage = None if stage_lr == "restart" else first_stage_parameters(model, objective, train_items, cfg, device)
    sharded = cfg.strategy == "fsdp" and info.enabled
    if sharded:  # before the optimizer is built: FSDP2 replaces the parameters by their shards
        ddp.shard(model, info)
    optimizer = build_optimizer(model, cfg, first_stage)

    def schedules(total: int) -> list[Any]:  # each parameter group's LR multiplier for a run of ``total`` steps
        return [group_schedule(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio, stage_starts, g["stage"],
                               stage_lr) for g in optimizer.param_groups]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules(cfg.max_steps))
    frozen_from = min(stage_starts) if stage_lr == "freeze" and first_stage else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, samples_seen = 0, 0
    if resume:
        last = ckpt_io.latest_checkpoint(run_dir) if run_dir is not None else None
        if last is None:
            raise InputError(f"nothing to resume: {run_dir}/checkpoints has no step_N checkpoint")
        state, rng = ckpt_io.load_checkpoint(last, model, optimizer, scheduler, scaler, sharded=sharded)
        step, samples_seen = state.step, state.samples_seen
        if state.world_size != info.world_size:
            log.warning("resuming a %d-process run with %d processes: the data order differs from an uninterrupted run",
                        state.world_size, info.world_size)
        ckpt_io.restore_rng(rng)
        log.info("resumed from %s (step %d)", last, step)
    # a stage that trains part of the model leaves the other parameters without gradients
    ddp_model = ddp.wrap(model, info, cfg.ddp_find_unused or bool(stage_starts))

    accum = cfg.grad_accum
    plan = DataPlan(len(train_items), cfg.data.batch_size, info.world_size, info.rank, cfg.seed)
    loader = torch.utils.data.DataLoader(
        _PlannedBatches(train_items, objective, plan, accum),
        batch_size=None,
        sampler=range(step * accum, cfg.max_steps * accum),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        # Our own generator: creating the iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = iter(loader)
    writes = run_dir if info.is_main else None
    metrics = MetricsLog(writes, cfg.tensorboard, resume_step=step)
    samples_per_step = cfg.data.batch_size * accum * info.world_size
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    result = FitResult(step=step)
    guard_from = max((s for s in stage_starts if s < cfg.max_steps), default=0)
    t_guard: float | None = None
    t_guard_step = 0

    def cut(end: int) -> None:  # fewer steps fit before the deadline: end there, annealed
        log.info("at step %d the deadline leaves time for %d of the %d steps: the run ends there, its learning "
                 "rate annealed by then", step, end, cfg.max_steps)
        cfg.max_steps = end
        scheduler.lr_lambdas = schedules(end)
        if bar is not None:
            bar.total = end
            bar.refresh()
    # samples/s counts training time only: checkpoint and validation time is subtracted
    window, t_window, steps_in_window, paused = _Window(), time.perf_counter(), 0, 0.0
    last_saved = step if resume else -1

    def checkpoint() -> None:
        nonlocal last_saved
        if last_saved == step:
            return
        model_sd = optim_sd = None
        if sharded:  # every rank takes part in gathering the full state; rank 0 writes it
            model_sd, optim_sd = ddp.full_state(model, optimizer)
        if writes is not None:
            state = ckpt_io.TrainerState(step, samples_seen, info.world_size, "sharded" if sharded else "")
            ckpt_io.save_checkpoint(writes, model, optimizer, scheduler, scaler, state, resume_rng, model_sd, optim_sd)
            ckpt_io.prune_checkpoints(writes, cfg.keep_last)
            save_model_dir(model, writes, model_sd)
        last_saved = step

    def validate() -> None:
        if val_items is None or len(val_items) == 0:
            return
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), autocast():
            vals = validate_across_ranks(objective, model, val_items, info, sharded)
        model.train()
        result.val = {f"val/{k}": float(v) for k, v in vals.items()}  # every rank's result holds them
        metrics.write(step, result.val)  # rank 0's writes
        if bar is not None:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.val.items()))

    resume_rng = ckpt_io.capture_rng()
    try:
        model.train()
        while step < cfg.max_steps:
            if frozen_from is not None and step >= frozen_from:  # a later stage (also when resuming in it)
                assert first_stage is not None
                freeze(model, first_stage)
                frozen_from = None
            for micro in range(accum):
                batch = to_device(next(batches), device)
                # Gradients are all-reduced only on the last micro-batch of a step.
                sync = micro == accum - 1 or not info.enabled
                with ddp.gradient_sync(ddp_model, sync):
                    with autocast():
                        loss, logs = objective.loss(ddp_model, batch)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window.add({"loss": loss, **logs})
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.optim.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                window.add({"grad_norm": gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm})
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            samples_seen += samples_per_step
            steps_in_window += 1
            resume_rng = ckpt_io.capture_rng()

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - t_window - paused
                result.train = {f"train/{k}": v for k, v in window.mean().items()}
                result.train["train/lr"] = max(scheduler.get_last_lr())  # of the newest stage's parameters
                result.train["train/samples_per_s"] = steps_in_window * samples_per_step / max(elapsed, 1e-9)
                metrics.write(step, result.train)
                t_window, steps_in_window, paused = time.perf_counter(), 0, 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{result.train['train/loss']:.4f}",
                                    samples_s=f"{result.train['train/samples_per_s']:.1f}")
            if bar is not None:
                bar.update(1)
            if deadline is not None and step > guard_from:  # the stage's first step (new shapes) not timed
                now = time.perf_counter()
                if t_guard is None:
                    t_guard, t_guard_step = now, step
                elif step - t_guard_step >= GUARD_STEPS:
                    fit_more = max(deadline - now, 0.0) / ((now - t_guard) / (step - t_guard_step))
                    if step + fit_more < cfg.max_steps:  # cut a little deeper: no cut at every step after
                        cut(step + int(GUARD_MARGIN * fit_more))
            t_pause = time.perf_counter()
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                checkpoint()
            if cfg.val_every and step % cfg.val_every == 0 and step != cfg.max_steps:
                validate()
            paused += time.perf_counter() - t_pause
        validate()
    except KeyboardInterrupt:
        checkpoint()
        raise TrainingInterrupted(Path(run_dir) if run_dir else Path("."), step) from None
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        del batches
    result.step = step
    return result


def stage_seconds(cfg: RunConfig, model: nn.Module, objective: Objective, train_items: Sequence[Any],
                  steps: int = 4, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of one optimizer step in each stage of ``objective`` on this machine (one
    entry per stage: ``[perception, every task]`` for a staged objective, else one), each the mean
    of ``steps`` steps after ``warmup`` that are not counted.

    The steps run as :func:`fit` runs them: the batches of that stage from a DataLoader with the
    run's ``cfg.data.num_workers``, on a copy of ``model`` with its own optimizer, in this process,
    the global RNGs forked, so the run that follows starts as it would have without the
    measurement; a step's seconds run from the end of the one before (waiting for its batch
    included; with ``optim.stage_lr: freeze`` a later stage's steps without the first stage's
    parameters). What :func:`vol3d.train.run.train` plans a time budget's steps with. Why so: on the
    demo's 2-core CPU a step with every task took 0.6-1.2 s by its batch's questions, so a median fell
    short of the run's mean; building batches and stepping timed apart and summed gave 0.75-0.85 s where
    the run, its data worker beside torch's two threads, took 1.0-1.1 s; and a process's first steps
    fault in their memory and build their kernels (0.6-0.7 s where the run's perception steps took
    0.45 s), so the clock cut planned runs short."""
    device = ddp.setup(cfg.device).device
    amp_dtype = resolve_precision(cfg.precision, device)
    probe = copy.deepcopy(model)
    if hasattr(probe, "set_precision"):
        probe.set_precision(amp_dtype)
    probe.to(device).train()
    if device.type == "cpu":  # as fit runs it
        use_channels_last(probe)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    plan = DataPlan(len(train_items), cfg.data.batch_size, 1, 0, cfg.seed)
    starts = tuple(getattr(objective, "stage_starts", ()))
    seconds = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for start in (0, *starts):
            if start and cfg.optim.stage_lr == "freeze":  # the later stage skips what the first trained
                freeze(probe, first_stage_parameters(probe, objective, train_items, cfg, device))
            loader = torch.utils.data.DataLoader(
                _PlannedBatches(train_items, objective, plan), batch_size=None,
                sampler=range(start, start + warmup + max(steps, 1)), num_workers=cfg.data.num_workers,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
            times, last = [], time.perf_counter()
            for batch in loader:
                batch = to_device(batch, device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, _ = objective.loss(probe, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                times.append(now - last)
                last = now
            seconds.append(float(np.mean(times[warmup:])) if steps > 0 else times[-1])
            del loader
    del probe, optimizer
    return seconds
