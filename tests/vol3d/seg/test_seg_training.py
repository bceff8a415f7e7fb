"""Segmentation fine-tuning through the one training loop: the loss goes down, validation scores
Dice/HD95 per class, the run directory can be predicted from, and flags/presets load."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from segphantom import CLASSES, build_cache

from preprocess.config_io import add_dataclass_args, load_yaml
from preprocess.errors import ConfigError, InputError
from vol3d.commands.train import load_config as load_run_config
from vol3d.seg.config import InferConfig, SegConfig, SegDataConfig, SegModelConfig
from vol3d.seg.finetune import add_seg_arguments, finetune
from vol3d.seg.objective import SegObjective, score
from vol3d.train.config import OptimConfig, TrainConfig


def load_config(args):
    return load_run_config(args, SegConfig)


CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "finetune"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("segcache"), n_cases=4)


def _cfg(cache, run_dir, **model) -> SegConfig:
    return SegConfig(
        run_dir=str(run_dir), max_steps=16, log_every=4, val_every=0, ckpt_every=16, tensorboard=False,
        progress=False, device="cpu",
        model=SegModelConfig(encoder="vit3d_tiny", class_names=CLASSES, patch_size=(32, 32, 16), feature_size=4,
                             **model),
        data=SegDataConfig(cache_dir=str(cache), batch_size=2),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        infer=InferConfig(overlap=0.0),
    )


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]


def test_finetune_lowers_the_loss_and_validates_per_class(cache, tmp_path):
    torch.manual_seed(0)
    result = finetune(_cfg(cache, tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses  # windows of 4 steps
    assert result.step == 16
    assert set(result.val) >= {"val/dice_mean", "val/hd95_mean", "val/dice/liver", "val/hd95/kidney"}
    assert 0.0 <= result.val["val/dice/liver"] <= 1.0
    model_dir = tmp_path / "run" / "model"
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "seg_config.json", "preprocess.json"}
    saved = load_yaml(SegConfig, tmp_path / "run" / "config.yaml")
    assert saved.task == "seg" and saved.model.class_names == CLASSES
    with pytest.raises(InputError, match="not empty"):
        finetune(_cfg(cache, tmp_path / "run"))


def test_frozen_encoder_stays_fixed_during_finetune(cache, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(cache, tmp_path / "src")
    cfg.max_steps = cfg.ckpt_every = 2
    cfg.data.val_split = ""
    finetune(cfg)
    frozen = _cfg(cache, tmp_path / "frozen", tune="frozen")
    frozen.max_steps = frozen.ckpt_every = 4
    frozen.init = str(tmp_path / "src")
    frozen.data.val_split = ""  # no validation: only the weights matter here
    finetune(frozen)
    a, b = load_file(tmp_path / "src" / "model" / "model.safetensors"), load_file(tmp_path / "frozen" / "model" / "model.safetensors")
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_objective_batch_and_label_checks(cache):
    from vol3d.data.cache import CacheDataset

    ds = CacheDataset(cache, split="train", mode="patch", patch_size=(32, 32, 16), sampler="label",
                      samples_per_volume=4, label_probability=1.0)
    obj = SegObjective(CLASSES, (32, 32, 16))
    batch = obj.make_batch([ds[i] for i in range(4)], [np.random.default_rng(i) for i in range(4)])
    assert batch["image"].shape == (4, 1, 32, 32, 16) and batch["label"].shape == (4, 1, 32, 32, 16)
    assert all((lab > 0).any() for lab in batch["label"])  # label-balanced sampling: every patch holds organ
    with pytest.raises(ValueError, match="label value 3"):
        SegObjective(CLASSES[:3], (32, 32, 16)).make_batch([ds[i] for i in range(4)], [None] * 4)


def test_metrics_are_nan_for_classes_absent_from_both():
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    pred = truth.copy()
    pred[2, 2, 2] = 0
    s = score(pred, truth, CLASSES, (1.0, 1.0, 2.0))
    assert 0.9 < s["dice"]["liver"] < 1.0
    assert math.isnan(s["dice"]["spleen"]) and math.isnan(s["hd95"]["kidney"])
    assert s["mean_dice"] == pytest.approx(s["dice"]["liver"])  # absent classes do not drag the mean to 0 or 1


def test_seg_flags_join_the_shared_training_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    parser.add_argument("--resume", type=Path)
    add_dataclass_args(parser, TrainConfig)  # what `vol3d finetune` registers first
    add_seg_arguments(parser)
    args = parser.parse_args(["--task", "seg", "--max-steps", "7", "--model.tune", "lora", "--model.patch-size",
                              "32", "32", "16", "--optim.lr", "1e-4", "--data.cache-dir", "C", "--run-dir", "R"])
    cfg = load_config(args)
    assert (cfg.max_steps, cfg.model.tune, cfg.model.patch_size, cfg.optim.lr) == (7, "lora", (32, 32, 16), 1e-4)
    bad = parser.parse_args(["--task", "seg", "--model.lora"])  # a TrainConfig-only field
    with pytest.raises(ConfigError, match="lora"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("seg_*.yaml")), ids=lambda p: p.name)
def test_seg_presets_load_and_build(path):
    cfg = load_yaml(SegConfig, path)
    assert cfg.task == "seg" and cfg.max_steps > cfg.optim.warmup_steps
    from vol3d.seg.model import SegModel

    model = SegModel(cfg.model)
    assert model.decoder.out.conv.conv.out_channels == len(cfg.model.class_names)
    if "tiny" in path.stem:  # the CPU presets take the tiny cache as it is, and run forward at their patch size
        from preprocess.config import read_config

        tiny = read_config(CONFIGS.parent / "preprocess" / "tiny.yaml")
        assert cfg.model.in_chans == len(tiny.ct_windows)
        x = torch.zeros(1, cfg.model.in_chans, *cfg.model.patch_size)
        assert model(x).shape == (1, len(cfg.model.class_names), *cfg.model.patch_size)


def test_a_cache_with_other_labels_brings_its_own_classes(tmp_path):
    """A brain cache (its vocab.json names grey matter, ventricles ...) is segmented into its own labels when
    model.class_names is left at the synthetic abdomen's default; classes given explicitly are kept."""
    import dataclasses
    import json

    from vol3d.seg.config import DEFAULT_CLASSES
    from vol3d.seg.finetune import classes_of_cache
    from vol3d.synth import brain

    vocab = {"findings": {"brain_tumour": {"text": "brain tumour", "organ": "white matter"}},
             "labels": list(brain.LABELS), "finding_labels": ["lesion"]}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    cfg = SegConfig(data=SegDataConfig(cache_dir=str(tmp_path)))
    assert cfg.model.class_names == DEFAULT_CLASSES
    assert classes_of_cache(cfg).model.class_names == list(brain.LABELS)
    mine = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=["background", "tumour"]))
    assert classes_of_cache(mine).model.class_names == ["background", "tumour"]
    (tmp_path / "vocab.json").unlink()
    assert classes_of_cache(cfg).model.class_names == DEFAULT_CLASSES  # no vocabulary: the default stays
