"""`vol3d train`: train the vision-language model from a preprocessed cache"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def load_config(args: argparse.Namespace):
    """The TrainConfig of a new run (--config + flags) or of the run being resumed (RUN/config.yaml + flags)."""
    from preprocess.config_io import build_config, overrides_from_args
    from vol3d.train.config import TrainConfig
    from vol3d.train.run import load_run_config

    if args.resume is not None:
        overrides = overrides_from_args(args)
        overrides["run_dir"] = str(args.resume)
        return load_run_config(args.resume, overrides)
    return build_config(TrainConfig, args.config, args)


def run_training(cfg, resume: bool, command: str) -> int:
    """Train; on Ctrl-C report the saved checkpoint and how to resume (exit 130)."""
    from vol3d.train import distributed as ddp
    from vol3d.train.loop import TrainingInterrupted
    from vol3d.train.run import train

    try:
        result = train(cfg, resume=resume)
    except TrainingInterrupted as exc:
        print(f"vol3d {command}: interrupted; step {exc.step} is saved in {exc.run_dir}/checkpoints/step_{exc.step}. "
              f"Resume with: vol3d {command} --resume {exc.run_dir}", file=sys.stderr)
        return 130
    finally:
        ddp.cleanup()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    summary = ", ".join(f"{k}={v:.4g}" for k, v in {**result.train, **result.val}.items() if "loss" in k)
    print(f"trained {cfg.run_dir} to step {result.step}: {summary}")
    print(f"model: {cfg.run_dir}/model  (reload with Vol3DModel.from_pretrained)")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return run_training(cfg, resume=args.resume is not None, command="train")
