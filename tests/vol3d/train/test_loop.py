"""The training loop on a toy regression task: learning, accumulation, exact resume, pruning, DDP."""

from __future__ import annotations

import csv
import dataclasses
import math
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy import ToyObjective, toy_items, toy_model

from preprocess.errors import ConfigError
from vol3d.train.checkpoint import checkpoint_dirs
from vol3d.train.config import DataConfig, OptimConfig, TrainConfig
from vol3d.train.loop import (
    DataPlan,
    TrainingInterrupted,
    first_stage_parameters,
    fit,
    group_schedule,
    stage_seconds,
    staged_schedule,
    warmup_cosine,
)
from vol3d.train.run import steps_within


def _cfg(tmp_path=None, **kw) -> TrainConfig:
    base = dict(
        run_dir=str(tmp_path or ""), max_steps=6, log_every=1, val_every=0, ckpt_every=100, keep_last=2,
        progress=False, tensorboard=False, device="cpu",
        optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
    )
    base.update(kw)
    base["data"] = DataConfig(batch_size=base.pop("batch_size", 2))
    return TrainConfig(**base)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_metrics_are_written(tmp_path):
    items = toy_items(64)
    cfg = _cfg(tmp_path, max_steps=60, log_every=10, batch_size=8, optim=OptimConfig(lr=5e-2, warmup_steps=5))
    model, obj = toy_model(), ToyObjective()
    before = obj.validate(model, items)["loss"]
    result = fit(cfg, model, obj, items, val_items=items, run_dir=tmp_path)
    after = result.val["val/loss"]
    assert after < 0.05 * before
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert {"train/loss", "train/mse", "train/lr", "train/samples_per_s", "train/grad_norm", "val/loss"} <= names
    train_loss = [float(r["value"]) for r in rows if r["name"] == "train/loss"]
    assert len(train_loss) == 6 and train_loss[-1] < train_loss[0]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_grad_accumulation_matches_bigger_batch():
    items = toy_items(16)
    a, b = toy_model(), toy_model()
    fit(_cfg(batch_size=2, grad_accum=1), a, ToyObjective(), items)
    fit(_cfg(batch_size=1, grad_accum=2), b, ToyObjective(), items)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_data_plan_is_a_partition_of_each_epoch():
    n = 10
    plan = DataPlan(n, batch_size=2, world_size=1, rank=0, seed=3)
    epoch0 = [plan.index(p) for m in range(5) for p in plan.positions(m)]
    assert sorted(epoch0) == list(range(n))
    ranks = [DataPlan(n, batch_size=1, world_size=2, rank=r, seed=3) for r in range(2)]
    merged = [ranks[r].index(ranks[r].positions(m)[0]) for m in range(5) for r in range(2)]
    assert merged == epoch0  # two ranks of batch 1 read what one process of batch 2 reads


def test_interrupt_then_resume_is_exact(tmp_path):
    """A run stopped by Ctrl-C during step 5 and resumed ends with the same weights as an unbroken run."""
    items = toy_items(12)  # < batch * steps: crosses epochs, so the per-epoch shuffle is resumed too
    kw = dict(max_steps=8, grad_accum=2, batch_size=2, ckpt_every=3, keep_last=2)
    full = toy_model(dropout=0.2)
    fit(_cfg(tmp_path / "full", **kw), full, ToyObjective(), items, run_dir=tmp_path / "full")

    run = tmp_path / "broken"
    first = toy_model(dropout=0.2)
    with pytest.raises(TrainingInterrupted) as exc:
        # the 10th loss call is the 1st micro-batch of step 5: steps 1..4 are done
        fit(_cfg(run, **kw), first, ToyObjective(interrupt_at_call=10), items, run_dir=run)
    assert exc.value.step == 4
    assert [p.name for p in checkpoint_dirs(run)] == ["step_3", "step_4"]

    resumed = toy_model(seed=123, dropout=0.2)  # different init: the checkpoint must overwrite it
    result = fit(_cfg(run, **kw), resumed, ToyObjective(), items, run_dir=run, resume=True)
    assert result.step == 8
    for (name, pa), pb in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # metrics.csv has each step exactly once although steps were logged before the interrupt
    with (run / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]
    assert steps == list(range(1, 9))


def test_checkpoints_are_pruned_to_keep_last(tmp_path):
    fit(_cfg(tmp_path, max_steps=7, ckpt_every=2, keep_last=2), toy_model(), ToyObjective(), toy_items(8),
        run_dir=tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_6", "step_7"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert {"model.safetensors", "trainer_state.pt", "trainer.json"} <= {
        p.name for p in (tmp_path / "checkpoints" / "step_7").iterdir()
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from vol3d.train import distributed

    model = toy_model(seed=rank)  # different inits: DDP must broadcast rank 0's weights
    fit(_cfg(max_steps=4, batch_size=1), model, ToyObjective(), toy_items(16))
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    distributed.cleanup()


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    # fork: the workers inherit the imported modules instead of re-importing torch and transformers
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = toy_model(seed=0)
    fit(_cfg(max_steps=4, batch_size=2), single, ToyObjective(), toy_items(16))
    for name, p in single.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name
        # 2 ranks x batch 1 with averaged gradients == 1 process x batch 2
        torch.testing.assert_close(r0[name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", None), ("bf16", torch.bfloat16), ("auto", None)])
def test_fit_hands_the_run_precision_to_the_model(precision, dtype):
    """A model that autocasts inside forward (the VLM) gets the run's dtype, not its own default."""
    model = toy_model()
    seen = []
    model.set_precision = seen.append
    fit(_cfg(max_steps=1, precision=precision), model, ToyObjective(), toy_items(8))
    assert seen == [dtype]  # auto on CPU is fp32


def test_sync_batchnorm_converts_for_several_gpus_and_refuses_cpu():
    from preprocess.errors import ConfigError
    from vol3d.train import distributed as ddp

    def net():
        return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.ReLU())

    gpus = ddp.DistInfo(rank=0, world_size=2, device=torch.device("cuda:0"))
    converted = ddp.sync_batchnorm(net(), gpus, enabled=True)
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)
    one = ddp.DistInfo(rank=0, world_size=1, device=torch.device("cuda:0"))
    assert isinstance(ddp.sync_batchnorm(net(), one, enabled=True)[1], torch.nn.BatchNorm3d)  # nothing to sync
    with pytest.raises(ConfigError, match="GPUs"):
        ddp.sync_batchnorm(net(), ddp.DistInfo(rank=0, world_size=2, device=torch.device("cpu")), enabled=True)


class _Stack(torch.nn.Module):
    """Blocks in a ModuleList (FSDP units) and two root layers sharing one weight (a tied LM's embeddings)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.pre, self.post = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.post.weight = self.pre.weight
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(torch.tanh(self.post(torch.tanh(self.pre(h)))))


def _fsdp_worker(rank: int, port: int, run: str, steps: int, resume: bool) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from vol3d.train import distributed

    cfg = _cfg(run, max_steps=steps, batch_size=1, grad_accum=2, strategy="fsdp", ckpt_every=2, val_every=2)
    model = _Stack(seed=rank)  # different inits: rank 0's weights are broadcast before sharding
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{run}/init.pt")
    result = fit(cfg, model, ToyObjective(), toy_items(16), toy_items(5, seed=1), run_dir=Path(run), resume=resume)
    assert distributed.is_sharded(model)
    torch.save(result.val, f"{run}/val{rank}.pt")
    distributed.cleanup()


def test_fsdp_two_processes_train_like_one_and_save_full_weights(tmp_path):
    from safetensors.torch import load_file

    from preprocess.errors import InputError
    from vol3d.train import distributed as ddp
    from vol3d.train.checkpoint import optimizer_layout

    run = tmp_path / "run"
    run.mkdir()
    torch.multiprocessing.start_processes(_fsdp_worker, args=(_free_port(), str(run), 4, False), nprocs=2,
                                          join=True, start_method="fork")
    saved = load_file(str(run / "model" / "model.safetensors"))  # the full weights, gathered from both shards
    single = _Stack(seed=0)
    ref = fit(_cfg(max_steps=4, batch_size=2, grad_accum=2, val_every=2), single, ToyObjective(), toy_items(16),
              toy_items(5, seed=1))
    assert set(saved) == set(single.state_dict()) - ddp.tied_names(single)  # the tied alias is stored once
    for name, p in single.state_dict().items():
        if name not in ddp.tied_names(single):
            # 2 ranks x batch 1 (accumulated over 2 micro-batches) == 1 process x batch 2, from rank 0's init
            torch.testing.assert_close(saved[name], p, rtol=1e-5, atol=1e-6, msg=name)
    v0, v1 = torch.load(run / "val0.pt"), torch.load(run / "val1.pt")
    assert v0 == v1 and v0["val/mse"] == pytest.approx(ref.val["val/mse"], rel=1e-5)
    assert optimizer_layout(run / "checkpoints" / "step_4") == "sharded"

    # resume the sharded run from its step-4 checkpoint (full state, read by every rank) to step 6
    torch.multiprocessing.start_processes(_fsdp_worker, args=(_free_port(), str(run), 6, True), nprocs=2,
                                          join=True, start_method="fork")
    assert (run / "checkpoints" / "step_6").is_dir()
    resumed = load_file(str(run / "model" / "model.safetensors"))
    one = tmp_path / "one"  # the same in one process: 4 steps, then resumed to 6
    for steps, again in ((4, False), (6, True)):
        single = _Stack(seed=0)
        fit(_cfg(one, max_steps=steps, batch_size=2, grad_accum=2, ckpt_every=2), single, ToyObjective(),
            toy_items(16), run_dir=one, resume=again)
    for name, p in single.state_dict().items():
        if name in resumed:
            torch.testing.assert_close(resumed[name], p, rtol=1e-5, atol=1e-6, msg=name)
    # a one-process (unsharded) run cannot take the sharded optimizer state
    with pytest.raises(InputError, match="fsdp"):
        fit(_cfg(run, max_steps=8, batch_size=2), _Stack(seed=0), ToyObjective(), toy_items(16), run_dir=run,
            resume=True)


def test_fsdp_units_are_the_blocks_innermost_first():
    from vol3d.train import distributed as ddp

    model = _Stack(seed=0)
    assert ddp.shard_units(model) == [model.blocks[1], model.blocks[0]]
    assert ddp.tied_names(model) == {"post.weight"}
    with pytest.raises(Exception, match="strategy"):
        _cfg(strategy="zero3")


class _StagedToy(ToyObjective):
    """The toy task in two stages: records the step each batch was made for."""

    stage_starts = (3,)

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def make_batch(self, items, rngs, step=None):
        self.steps.append(step)
        return super().make_batch(items, rngs)


def test_a_staged_objective_gets_each_batchs_step_and_each_stage_its_own_schedule(tmp_path):
    obj = _StagedToy()
    cfg = _cfg(tmp_path, max_steps=6, grad_accum=2, optim=OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1))
    fit(cfg, toy_model(), obj, toy_items(16), run_dir=tmp_path)
    assert obj.steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # micro-batches of each optimizer step
    with (tmp_path / "metrics.csv").open() as f:
        lr = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/lr"]
    # the LR after steps 1..6: stage 1 (steps 0-2) warms up and decays, stage 2 (3-5) warms up again
    expected = [1e-2 * staged_schedule(2, 6, 0.1, (3,))(s) for s in range(1, 7)]
    assert lr == pytest.approx(expected)
    assert lr[2] < lr[1] and lr[3] > lr[2]  # the second stage warms up again from a low LR


def test_staged_schedule_runs_a_warmup_and_cosine_per_stage():
    f = staged_schedule(2, 10, 0.1, (4,))
    one, two = warmup_cosine(2, 4, 0.1), warmup_cosine(2, 6, 0.1)
    assert [f(s) for s in range(4)] == [one(s) for s in range(4)]
    assert [f(s) for s in range(4, 10)] == [two(s) for s in range(6)]
    assert f(3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way down stage 1
    assert staged_schedule(2, 10, 0.1)(7) == warmup_cosine(2, 10, 0.1)(7)  # no stages: one schedule
    assert staged_schedule(2, 10, 0.1, (0, 10, 12))(7) == warmup_cosine(2, 10, 0.1)(7)  # starts outside the run


class _TwoParts(torch.nn.Module):
    """A regression whose second part (an additive linear term) joins at the second stage."""

    def __init__(self):
        super().__init__()
        self.first, self.second = toy_model(), torch.nn.Linear(4, 1)

    def forward(self, x, both=True):
        out = self.first(x)
        return out + self.second(x) if both else out


class _TwoStageToy(ToyObjective):
    """Stage 1 (steps < 3) trains ``first`` alone, stage 2 both parts."""

    stage_starts = (3,)

    def make_batch(self, items, rngs, step=None):
        return {**super().make_batch(items, rngs), "both": step is None or step >= 3}

    def loss(self, model, batch):
        pred = model(batch["x"], batch["both"]).squeeze(-1)
        mse = ((pred - batch["y"]) ** 2).mean()
        return mse, {"mse": mse.detach()}


def test_first_stage_parameters_are_those_its_loss_reaches_and_the_model_is_left_as_it_was(tmp_path):
    model, obj = _TwoParts(), _TwoStageToy()
    before, state = _params(model), torch.get_rng_state()
    found = first_stage_parameters(model, obj, toy_items(16), _cfg(tmp_path), torch.device("cpu"))
    assert found == {f"first.{n}" for n, _ in model.first.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_group_schedule_warms_up_only_what_is_new_to_a_stage():
    one, two = warmup_cosine(2, 4, 0.1), warmup_cosine(2, 6, 0.1)
    for stage_lr, after in (("keep", 0.1), ("freeze", 0.0)):
        first, new = (group_schedule(2, 10, 0.1, (4,), stage, stage_lr) for stage in (0, 1))
        assert [first(s) for s in range(4)] == [one(s) for s in range(4)]
        assert [first(s) for s in range(4, 10)] == [after] * 6  # no second warmup
        assert [new(s) for s in range(4)] == [0.0] * 4  # not trained yet
        assert [new(s) for s in range(4, 10)] == [two(s) for s in range(6)]
    restart = staged_schedule(2, 10, 0.1, (4,))
    assert all(group_schedule(2, 10, 0.1, (4,), k)(s) == restart(s) for k in (0, 1) for s in range(10))
    with pytest.raises(ConfigError, match="stage_lr"):
        OptimConfig(stage_lr="thaw")


@pytest.mark.parametrize("stage_lr", ["restart", "keep", "freeze"])
def test_a_stage_warms_up_only_its_new_parameters_unless_told_to_restart_all(tmp_path, stage_lr):
    model, obj = _TwoParts(), _TwoStageToy()
    optim = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, stage_lr=stage_lr)
    cfg = _cfg(tmp_path, max_steps=6, ckpt_every=4, keep_last=5, optim=optim)
    fit(cfg, model, obj, toy_items(16), run_dir=tmp_path)
    groups = torch.load(tmp_path / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False)
    groups = groups["optimizer"]["param_groups"]
    n_first = sum(1 for _ in model.first.parameters())
    if stage_lr == "restart":  # one schedule for the whole model: the second stage warms every parameter up again
        assert [g["stage"] for g in groups] == [0, 0]
        assert [g["lr"] for g in groups] == pytest.approx([1e-2 * staged_schedule(2, 6, 0.1, (3,))(4)] * 2)
    else:  # first's weights and biases, then second's: apart, first at its annealed rate or frozen
        rate = 1e-3 if stage_lr == "keep" else 0.0
        assert [(g["stage"], len(g["params"])) for g in groups] == [(0, 2), (0, n_first - 2), (1, 1), (1, 1)]
        assert [g["lr"] for g in groups] == pytest.approx([rate, rate, 1e-2 * 2 / 3, 1e-2 * 2 / 3])
    first = {k: v for k, v in load_file(str(tmp_path / "checkpoints" / "step_4" / "model.safetensors")).items()
             if k.startswith("first.")}
    moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in first.items())  # steps 5 and 6
    assert moved == (stage_lr != "freeze")
    assert all(p.requires_grad != (stage_lr == "freeze") for p in model.first.parameters())
    assert all(p.requires_grad for p in model.second.parameters())
    if stage_lr == "freeze":  # resumed inside the second stage: frozen again, the first part as saved
        resumed = _TwoParts()
        cfg.max_steps = 8
        fit(cfg, resumed, obj, toy_items(16), run_dir=tmp_path, resume=True)
        assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in first.items())
        assert not any(p.requires_grad for p in resumed.first.parameters())


class _Clocked(_TwoStageToy):
    """Each loss costs one second of its own clock (what ``fit`` reads as ``time.perf_counter``)."""

    def __init__(self):
        super().__init__()
        self.clock = 0.0

    def loss(self, model, batch):
        self.clock += 1.0
        return super().loss(model, batch)


@pytest.mark.parametrize("stage_lr", ["restart", "freeze"])
def test_a_deadline_ends_the_run_early_and_annealed_once_its_last_stage_is_timed(tmp_path, monkeypatch, stage_lr):
    """Steps of 1 s and 20 s to the deadline: once GUARD_STEPS steps of the last stage are timed (its first
    step not), the run is cut to the steps that fit, ends by the deadline, saved, its learning rate at
    the end of its cosine; a deadline far off changes nothing."""
    from types import SimpleNamespace

    from vol3d.train import loop

    obj = _Clocked()
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: obj.clock, time=time.time))
    optim = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, stage_lr=stage_lr)
    cfg = _cfg(tmp_path, max_steps=30, optim=optim)
    result = fit(cfg, _TwoParts(), obj, toy_items(16), run_dir=tmp_path, deadline=20.0)
    end = cfg.max_steps
    assert result.step == end and 3 + 1 + loop.GUARD_STEPS < end < 20 and obj.clock <= 20.0
    assert [int(d.name.split("_")[1]) for d in checkpoint_dirs(tmp_path)] == [end]
    with (tmp_path / "metrics.csv").open() as f:
        lr = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/lr"]
    assert len(lr) == end and lr[-1] == pytest.approx(1e-2 * 0.1)  # annealed at the new end
    assert lr[3] < lr[5]  # the last stage warmed up as before the cut
    obj.clock = 0.0
    cfg = _cfg(tmp_path / "far", max_steps=12, optim=optim)
    assert fit(cfg, _TwoParts(), obj, toy_items(16), run_dir=tmp_path / "far", deadline=1e6).step == 12 == cfg.max_steps


def test_stage_seconds_times_each_stage_on_a_copy_and_leaves_the_run_as_it_was(tmp_path):
    """One time per stage, from batches of that stage; the model, its gradients and the global RNG are
    untouched, so the run that follows trains exactly as without the measurement."""
    obj, model = _StagedToy(), toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, max_steps=6)
    state = torch.get_rng_state()
    seconds = stage_seconds(cfg, model, obj, toy_items(16), steps=2, warmup=1)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert obj.steps == [0, 1, 2, 3, 4, 5]  # 1 + 2 steps from each stage's start
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert len(stage_seconds(cfg, model, ToyObjective(), toy_items(16), steps=1)) == 1  # one stage, one time
    # batches from a data worker, as fit reads them: the worker builds them, the process is left alone
    cfg.data = dataclasses.replace(cfg.data, num_workers=1)
    obj = _StagedToy()
    assert len(stage_seconds(cfg, model, obj, toy_items(16), steps=1, warmup=1)) == 2 and obj.steps == []
    assert torch.equal(torch.get_rng_state(), state)


def test_steps_within_fills_the_seconds_with_each_stage_at_its_share():
    # 0.75 x 1 s + 0.25 x 3 s = 1.5 s a step; 0.9 x 300 s of them
    assert steps_within(300.0, [1.0, 3.0], [0.75, 0.25], most=1000, margin=0.95) == 190
    assert steps_within(300.0, [1.0, 3.0], [0.75, 0.25], most=1000) == 180  # PLAN_MARGIN, 0.9
    assert steps_within(300.0, [1.0, 3.0], [0.75, 0.25], most=100) == 100  # never more than asked
    assert steps_within(300.0, [2.0], [1.0], most=1000, margin=1.0) == 150
    assert steps_within(0.5, [2.0], [1.0], most=1000) == 1  # at least one step
    assert steps_within(-5.0, [2.0], [1.0], most=1000) == 1
    with pytest.raises(ValueError, match="stage"):
        steps_within(300.0, [1.0, 3.0], [1.0], most=10)


def test_plan_within_measures_only_runs_worth_planning(monkeypatch):
    """Too few seconds left, too few steps or several processes: the configured steps stand, unmeasured;
    else the steps that fit (a single stage here)."""
    from types import SimpleNamespace

    from vol3d.train import loop, run

    def never(*args, **kwargs):
        raise AssertionError("measured a run that is not planned")

    monkeypatch.setattr(loop, "stage_seconds", never)
    one = SimpleNamespace(enabled=False, world_size=1)
    for seconds, steps, info in ((run.PLAN_MIN_S - 1, 500, one), (1e6, run.PLAN_FLOOR, one),
                                 (100.0, 500, SimpleNamespace(enabled=True, world_size=2))):
        cfg = _cfg(max_steps=steps)
        run.plan_within(cfg, None, None, [], seconds, info)
        assert cfg.max_steps == steps
    monkeypatch.setattr(loop, "stage_seconds", lambda *args, **kwargs: [1.0])
    cfg = _cfg(max_steps=500)
    run.plan_within(cfg, None, None, [], 100.0, one)
    assert cfg.max_steps in (89, 90)  # 0.9 x (100 s less the measurement's microseconds) at 1 s a step
    # two stages, cut: the last keeps half its 125 steps, the perception gets the rest (at most its 375)
    monkeypatch.setattr(loop, "stage_seconds", lambda *args, **kwargs: [0.5, 1.0])
    cfg = _cfg(max_steps=500, perception_first=0.75)
    objective = SimpleNamespace(perception_steps=cfg.perception_steps)
    run.plan_within(cfg, None, objective, [], 240.5, one)
    assert (cfg.max_steps, cfg.perception_steps, objective.perception_steps) == (369, 306, 306)


def test_a_cut_plan_keeps_half_the_last_stage_and_gives_the_perception_the_rest():
    from vol3d.train.run import perception_kept

    # 0.9 x 240 s = 216 s: the last stage keeps 63 of its 125 steps (63 s), the perception the other 153 s
    assert perception_kept(240.0, [0.5, 1.0], [375, 125], proportional=273) == [306, 63]
    # the perception never gets more than its own steps; the seconds still left go back to the last stage
    assert perception_kept(250.0, [0.4, 1.0], [375, 125], proportional=0) == [375, 75]  # (225 - 150) / 1.0
    assert perception_kept(1000.0, [0.5, 1.0], [375, 125], proportional=0) == [375, 125]
    assert perception_kept(60.0, [0.5, 1.0], [375, 125], proportional=20) is None  # less than shrinking alike
    assert perception_kept(240.0, [0.5, 1.0], [375, 125], proportional=331) is None
    with pytest.raises(ValueError, match="two stages"):
        perception_kept(240.0, [1.0], [300], proportional=0)
