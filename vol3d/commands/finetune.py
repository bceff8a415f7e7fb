"""`vol3d finetune`: fine-tune a run for one task (report, vqa, ground, ehr, grpo, seg)"""

from __future__ import annotations

import argparse
from pathlib import Path

from preprocess.errors import ConfigError

HELP = "fine-tune a run for one task (report, vqa, ground, ehr, grpo, seg)"
DESCRIPTION = """Fine-tune from a run dir (--init RUN) on one task with the same training loop as
`vol3d train`: --task report | vqa | ground | ehr (presets in configs/finetune/), --task grpo
(reinforcement with verifiable rewards: sampled answers scored against the reference; vol3d.train.rl), or
--task seg, which adds a segmentation decoder over the encoder's intermediate
features (vol3d.seg). The model architecture, and the cache when --data.cache-dir
is not given, come from the --init run. Every TrainConfig field is a flag, as in
`vol3d train`; Ctrl-C saves a checkpoint, continue with --resume OUT."""

FINETUNE_TASKS = ("report", "vqa", "ground", "ehr", "grpo", "seg")


def _finetune_flags(parser: argparse.ArgumentParser) -> None:
    from preprocess.config_io import add_dataclass_args
    from vol3d.train.config import TrainConfig

    # --task and --init are TrainConfig fields, so they come with the shared flags.
    add_dataclass_args(parser, TrainConfig)
    from vol3d.seg.finetune import add_seg_arguments

    add_seg_arguments(parser)  # the seg-only flags (same names mean the same in both configs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML preset (configs/finetune/<task>.yaml)")
    parser.add_argument("--resume", type=Path, metavar="OUT", help="continue the fine-tune OUT from its newest checkpoint")
    _finetune_flags(parser)


def _finetune_config(args: argparse.Namespace):
    from preprocess.config_io import build_config
    from vol3d.commands.train import load_config
    from vol3d.presets import resolve_config
    from vol3d.train.config import TrainConfig
    from vol3d.train.run import load_run_config

    if args.resume is not None:
        return load_config(args)
    cfg = build_config(TrainConfig, resolve_config(args.config, "finetune") if args.config else None, args)
    if cfg.task not in FINETUNE_TASKS:
        raise ConfigError(f"--task must be one of {list(FINETUNE_TASKS)} (got {cfg.task!r}); "
                          "`vol3d train` does multi-task pre-training")
    if not cfg.init:
        raise ConfigError("--init RUN is required: the run directory whose model/ is fine-tuned")
    if not cfg.data.cache_dir:
        cfg.data.cache_dir = load_run_config(cfg.init).data.cache_dir
    return cfg


def _task_of(args: argparse.Namespace) -> str | None:
    """``--task``, else the task named by the config file (``--resume RUN``'s or ``--config``'s)."""
    task = getattr(args, "cfg:task", None)
    from vol3d.presets import resolve_config

    path = Path(args.resume) / "config.yaml" if args.resume is not None else (
        resolve_config(args.config, "finetune") if args.config else None)
    if task is None and path is not None and Path(path).is_file():
        import yaml

        task = (yaml.safe_load(Path(path).read_text()) or {}).get("task")
    return task


def run(args: argparse.Namespace) -> int:
    from vol3d.commands.train import run_training

    if _task_of(args) == "seg":
        from vol3d.commands.train import load_config
        from vol3d.seg.config import SegConfig
        from vol3d.seg.finetune import finetune

        seg = load_config(args, SegConfig)
        return run_training(seg, args.resume is not None, "finetune --task seg", finetune,
                            f"segment new images with: vol3d predict {seg.run_dir} INPUT --out DIR",
                            keys=("val/dice_mean", "val/hd95_mean"))
    cfg = _finetune_config(args)
    if args.resume is None and cfg.run_dir and Path(cfg.run_dir).resolve() == Path(cfg.init).resolve():
        raise ConfigError("--run-dir must differ from --init: fine-tuning writes a new run")
    return run_training(cfg, resume=args.resume is not None, command="finetune")
