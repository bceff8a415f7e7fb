"""``vol3d finetune --task seg``: from a :class:`SegConfig` to a finished segmentation run.

Builds label-balanced patch datasets from the cache, the :class:`SegModel`
(encoder from ``--init RUN`` or from scratch), the :class:`SegObjective`, and runs
the one training loop, :func:`vol3d.train.loop.fit`. The run directory is laid out
as every vol3d run (docs/formats.md section 4); ``model/`` also holds the cache's
preprocessing config so that ``vol3d predict RUN`` prepares new images the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from preprocess.config_io import add_dataclass_args, to_dict
from preprocess.errors import ConfigError, InputError
from vol3d.seg.config import SegConfig

log = logging.getLogger(__name__)


def add_seg_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`SegConfig` flags that ``parser`` does not have yet (``--model.tune``,
    ``--data.patch-size`` ...), plus ``--config`` and ``--resume`` when missing.

    ``vol3d finetune`` registers the shared :class:`~vol3d.train.config.TrainConfig` flags
    first; fields with the same dotted name (``--max-steps``, ``--optim.lr``, ``--data.cache-dir``)
    mean the same thing in both configs, so they are kept and only seg-specific flags are added.
    """
    scratch = argparse.ArgumentParser(add_help=False)
    if "--config" not in parser._option_string_actions:
        scratch.add_argument("--config", type=Path, help="YAML preset (e.g. configs/finetune/seg_vit_tiny.yaml)")
    if "--resume" not in parser._option_string_actions:
        scratch.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its newest checkpoint")
    add_dataclass_args(scratch, SegConfig)
    group = parser.add_argument_group("segmentation (--task seg)")
    for action in scratch._actions:
        if not any(opt in parser._option_string_actions for opt in action.option_strings):
            group._add_action(action)  # as argparse's own `parents=` does


def read_cache_preprocess(cache_dir: str | Path) -> dict[str, Any]:
    """The preprocessing config a cache was made with, as saved beside a model (no secrets)."""
    from preprocess.config import read_config

    return to_dict(read_config(cache_dir))


def build_datasets(cfg: SegConfig) -> tuple[Any, Any]:
    """Label-balanced training patches and whole validation volumes of the cache's labelled cases."""
    from vol3d.data.cache import CacheDataset

    d = cfg.data
    train = CacheDataset(d.cache_dir, split=d.train_split, mode="patch", patch_size=cfg.model.patch_size,
                         sampler="label", label_probability=d.label_probability, seed=cfg.seed)
    train.rows = [r for r in train.rows if r.get("has_label") is not False]
    if not train.rows:
        raise InputError(f"{d.cache_dir}: no ok case with a label in split {d.train_split!r}; preprocess with "
                         "`--labels DIR` (label maps named <key>.nii.gz) or pass --data.train-split")
    train.samples_per_volume = d.samples_per_volume or math.ceil(
        cfg.max_steps * cfg.grad_accum * d.batch_size / len(train.rows))
    val = None
    if d.val_split:
        val = CacheDataset(d.cache_dir, split=d.val_split, mode="volume")
        val.rows = [r for r in val.rows if r.get("has_label") is not False][: d.max_val_cases or None]
        if not val.rows:
            log.warning("no labelled case in split %r: validation is skipped", d.val_split)
            val = None
    return train, val


def build_model(cfg: SegConfig, preprocess: dict[str, Any]) -> tuple[Any, SegConfig]:
    """The model and the config updated with the ``--init`` run's encoder architecture."""
    import torch

    from vol3d.seg.model import SegModel, load_init_encoder

    state = None
    if cfg.init:
        arch, state = load_init_encoder(cfg.init)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **arch))
        log.info("encoder %s initialised from %s (%d tensors)", arch["encoder"], cfg.init, len(state))
    torch.manual_seed(cfg.seed)
    return SegModel(cfg.model, encoder_state=state, preprocess=preprocess), cfg


def classes_of_cache(cfg: SegConfig) -> SegConfig:
    """``cfg`` with the cache's label names (its ``vocab.json`` ``labels``) as the classes when
    ``model.class_names`` was left at the synthetic abdomen's default: a brain cache segments its own
    labels, not the abdomen's."""
    from preprocess.sidecars import cache_vocabulary
    from vol3d.seg.config import DEFAULT_CLASSES

    labels = [str(n) for n in cache_vocabulary(cfg.data.cache_dir).get("labels") or []]
    if not labels or list(cfg.model.class_names) != DEFAULT_CLASSES or labels == DEFAULT_CLASSES:
        return cfg
    log.info("classes from the cache's vocab.json: %s", ", ".join(labels))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=labels))


def finetune(cfg: SegConfig, resume: bool = False) -> Any:
    """Run (or resume) a segmentation fine-tune; returns the loop's :class:`~vol3d.train.loop.FitResult`."""
    from vol3d.seg.model import SegModel
    from vol3d.seg.objective import SegObjective
    from vol3d.train import distributed as ddp
    from vol3d.train.loop import fit
    from vol3d.train.run import check_channels, check_run_dir, write_run_config

    if not cfg.run_dir:
        raise ConfigError("run_dir is not set; pass --run-dir RUN")
    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir is not set; pass --data.cache-dir CACHE (made by `vol3d preprocess --labels`)")
    if cfg.init and Path(cfg.init).resolve() == Path(cfg.run_dir).resolve():
        raise ConfigError("--run-dir must differ from --init: fine-tuning writes a new run")
    run_dir = Path(cfg.run_dir)
    info = ddp.setup(cfg.device)
    check_run_dir(run_dir, resume)
    ddp.barrier(info)

    preprocess = read_cache_preprocess(cfg.data.cache_dir)
    if not resume:
        cfg = classes_of_cache(cfg)
    train_ds, val_ds = build_datasets(cfg)
    if resume:  # weights come from the checkpoint; the architecture from config.yaml
        model = SegModel(cfg.model, preprocess=preprocess)
    else:
        model, cfg = build_model(cfg, preprocess)
    check_channels(train_ds, cfg.model.in_chans)
    write_run_config(cfg, info.is_main)
    objective = SegObjective(cfg.model.class_names, cfg.model.patch_size, cfg.loss, cfg.infer)
    log.info("seg fine-tune %s: %d labelled train cases (%d patches/pass), %d val, encoder %s (%s), "
             "%.2fM trainable parameters", run_dir, len(train_ds.rows), len(train_ds),
             len(val_ds) if val_ds is not None else 0, cfg.model.encoder, cfg.model.tune,
             model.num_parameters(trainable_only=True) / 1e6)
    return fit(cfg, model, objective, train_ds, val_ds, run_dir=run_dir, resume=resume)
