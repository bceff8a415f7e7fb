"""TrainConfig: every preset loads, YAML and flags round-trip, bad values are refused with the field name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from preprocess.config_io import add_dataclass_args, build_config, dump_yaml, load_yaml, to_dict
from preprocess.errors import ConfigError
from vol3d.models.registry import list_encoders
from vol3d.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PRESETS = sorted((CONFIGS / "train").glob("*.yaml")) + sorted((CONFIGS / "finetune").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}  # segmentation presets (task: seg) may sit beside these
    assert {"tiny_cpu", "vit_b_qwen_lora", "resnet50_lora", "report", "vqa", "ground", "ehr"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads_into_train_config(path):
    if (yaml.safe_load(path.read_text()) or {}).get("task") == "seg":
        from vol3d.seg.config import SegConfig  # segmentation presets have their own config class

        assert load_yaml(SegConfig, path).task == "seg"
        return
    cfg = load_yaml(TrainConfig, path)  # __post_init__ checks run for every section; no model is built
    assert cfg.model.encoder in list_encoders()
    assert cfg.max_steps > cfg.optim.warmup_steps
    if path.parent.name == "finetune":
        assert cfg.task == path.stem
        assert sum(cfg.task_mix().weights().values()) > 0
    if path.stem in ("vit_b_qwen_lora", "resnet50_lora"):
        assert cfg.model.lora and cfg.precision == "bf16" and cfg.model.lm_path
        assert cfg.model.grad_checkpointing_encoder and cfg.model.grad_checkpointing_lm


def test_yaml_round_trip(tmp_path):
    cfg = load_yaml(TrainConfig, CONFIGS / "train" / "tiny_cpu.yaml")
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = load_yaml(TrainConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_flags_map_onto_fields_and_win_over_yaml():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    args = parser.parse_args(["--max-steps", "7", "--optim.lr", "1e-4", "--data.batch-size", "3",
                              "--model.freeze-encoder", "--loss.box-giou", "0.5", "--data.tasks.ground", "2"])
    cfg = build_config(TrainConfig, CONFIGS / "train" / "tiny_cpu.yaml", args)
    assert (cfg.max_steps, cfg.optim.lr, cfg.data.batch_size, cfg.loss.box_giou) == (7, 1e-4, 3, 0.5)
    assert cfg.model.freeze_encoder is True and cfg.data.tasks.ground == 2.0
    assert cfg.model.encoder == "resunet3d_tiny" and cfg.loss.lm_average == "sample"  # untouched fields keep the YAML's values


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"optim.lr": -1.0}, "optim.lr"),
        ({"data.batch_size": 0}, "data.batch_size"),
        ({"loss.box_l1": -1.0}, "loss.box_l1"),
        ({"loss.lm_average": "batch"}, "lm.average"),
        ({"task": "segment"}, "task"),
        ({"device": "tpu"}, "device"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        load_yaml(TrainConfig, CONFIGS / "train" / "tiny_cpu.yaml", overrides)


def test_single_task_mix():
    cfg = TrainConfig(task="vqa")
    w = cfg.task_mix().weights()
    assert w["vqa_closed"] > 0 and w["report"] == w["ground"] == w["ehr"] == 0
    assert TrainConfig().task_mix() == TrainConfig().data.tasks


def test_a_grounding_preset_trains_whichever_grounding_the_model_has():
    """configs/finetune/ground.yaml weights the box head's terms; a perception model points at regions."""
    from types import SimpleNamespace

    from vol3d.train.config import LossConfig
    from vol3d.train.run import grounding_loss_for

    preset = LossConfig(lm=1.0, ehr=0.0, box_centre=1.0, box_l1=0.5, box_giou=1.0)
    perceiving = grounding_loss_for(SimpleNamespace(perception=True, box_head=False), preset)
    assert (perceiving.pointer, perceiving.box_centre, perceiving.box_l1, perceiving.box_giou) == (1.0, 0, 0, 0)
    assert grounding_loss_for(SimpleNamespace(perception=False, box_head=True), preset) == preset
    pointing = LossConfig(lm=1.0, pointer=2.0)
    boxed = grounding_loss_for(SimpleNamespace(perception=False, box_head=True), pointing)
    assert (boxed.pointer, boxed.box_centre, boxed.box_l1, boxed.box_giou) == (0.0, 2.0, 2.0, 2.0)
