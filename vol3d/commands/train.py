"""`vol3d train`: train the vision-language model from a preprocessed cache"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HELP = "train the vision-language model from a preprocessed cache"
DESCRIPTION = """Train encoder -> token reducer -> projector -> causal LM on report generation,
VQA, grounded boxes and EHR codes from a cache, with checkpointing and exact resume.

Every TrainConfig field is a flag (`--max-steps 100`, `--optim.lr 1e-4`,
`--model.encoder vit3d_base`); flags win over the --config file. Multi-GPU:
`torchrun --nproc_per_node N -m vol3d.cli train ...`. Ctrl-C saves a checkpoint;
continue with `vol3d train --resume RUN`. See docs/training.md."""


def _train_flags(parser: argparse.ArgumentParser) -> None:
    from preprocess.config_io import add_dataclass_args
    from vol3d.train.config import TrainConfig

    add_dataclass_args(parser, TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML preset (e.g. configs/train/tiny_cpu.yaml)")
    parser.add_argument("--resume", type=Path, metavar="RUN",
                        help="continue RUN from its newest checkpoint (its config.yaml; flags still override)")
    _train_flags(parser)


def load_config(args: argparse.Namespace, cls: Any = None):
    """The run config (``cls``: TrainConfig, or another :class:`~vol3d.train.config.RunConfig`) of a
    new run (--config + flags) or of the run being resumed (RUN/config.yaml + flags)."""
    from preprocess.config_io import build_config, overrides_from_args
    from vol3d.presets import resolve_config
    from vol3d.train.config import TrainConfig
    from vol3d.train.run import load_run_config

    cls = cls or TrainConfig
    if args.resume is not None:
        overrides = overrides_from_args(args)
        overrides["run_dir"] = str(args.resume)
        return load_run_config(args.resume, overrides, cls)
    kind = "train" if cls is TrainConfig else "finetune"
    return build_config(cls, resolve_config(args.config, kind) if args.config else None, args)


def run_interruptible(fit_fn: Any, cfg: Any, resume: bool, resume_command: str) -> Any:
    """``fit_fn(cfg, resume=resume)``; on Ctrl-C report the saved step and how to resume.

    Returns the fit result, or None when interrupted (the caller exits 130). Shared by
    `vol3d train`, `vol3d finetune` and `vol3d finetune --task seg`.
    """
    from vol3d.train import distributed as ddp
    from vol3d.train.loop import TrainingInterrupted

    try:
        return fit_fn(cfg, resume=resume)
    except TrainingInterrupted as exc:
        print(f"{resume_command.split(' --')[0]}: interrupted; step {exc.step} is saved in "
              f"{exc.run_dir}/checkpoints/step_{exc.step}. Resume with: {resume_command} --resume {exc.run_dir}",
              file=sys.stderr)
        return None
    finally:
        ddp.cleanup()


def print_result(cfg: Any, result: Any, next_step: str, keys: tuple[str, ...] = ()) -> None:
    """One line of final losses (plus the validation ``keys``) and where the model is (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    values = {k: v for k, v in result.train.items() if "loss" in k}
    values |= {k: v for k, v in result.val.items() if "loss" in k or k in keys}
    print(f"trained {cfg.run_dir} to step {result.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    print(f"model: {cfg.run_dir}/model  ({next_step})")


def run_training(cfg: Any, resume: bool, command: str, fit_fn: Any = None,
                 next_step: str = "reload with Vol3DModel.from_pretrained", keys: tuple[str, ...] = ()) -> int:
    """Run ``fit_fn(cfg, resume=resume)`` (default: the vision-language :func:`vol3d.train.run.train`) as
    ``vol3d COMMAND`` and report the result (:func:`print_result`); the exit code."""
    if fit_fn is None:
        from vol3d.train.run import train as fit_fn

    result = run_interruptible(fit_fn, cfg, resume, f"vol3d {command}")
    if result is None:
        return 130
    print_result(cfg, result, next_step, keys=keys)
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return run_training(cfg, resume=args.resume is not None, command="train")
