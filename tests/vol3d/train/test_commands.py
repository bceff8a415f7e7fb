"""`vol3d train` / `vol3d finetune`: run-dir safety, Ctrl-C exit code, seg dispatch, end to end on a synthetic cache."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vol3d.cli import main

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"


def test_train_refuses_a_non_empty_run_dir(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    code = main(["train", "--config", str(TINY), "--run-dir", str(tmp_path), "--data.cache-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and f"--resume {tmp_path}" in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(TINY.read_text())
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from vol3d.train import run as run_mod
    from vol3d.train.loop import TrainingInterrupted

    def interrupted(cfg, resume=False):
        raise TrainingInterrupted(Path(cfg.run_dir), 7)

    monkeypatch.setattr(run_mod, "train", interrupted)
    assert main(["train", "--config", str(TINY), "--run-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "step_7" in err and f"vol3d train --resume {tmp_path / 'run'}" in err


def test_finetune_requires_init_and_a_finetune_task(tmp_path, capsys):
    assert main(["finetune", "--task", "report", "--run-dir", str(tmp_path / "out")]) == 2
    assert "--init RUN is required" in capsys.readouterr().err
    assert main(["finetune", "--task", "pretrain", "--init", str(tmp_path), "--run-dir", str(tmp_path / "o")]) == 2
    assert "--task must be one of" in capsys.readouterr().err


def test_finetune_takes_the_task_from_a_seg_preset(tmp_path, capsys):
    """A seg preset without --task goes to the segmentation fine-tune (its own error, not TrainConfig's)."""
    seg_preset = ROOT / "configs" / "finetune" / "seg_vit_tiny.yaml"
    assert main(["finetune", "--config", str(seg_preset), "--run-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--data.cache-dir" in err and "unknown field" not in err


def _vol3d(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vol3d.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=600)


@pytest.mark.slow
def test_end_to_end_on_a_synthetic_cache(tmp_path):
    """synth -> preprocess -> train -> resume -> finetune; each run dir reloads on its own."""
    src, cache, run, ft = tmp_path / "src", tmp_path / "cache", tmp_path / "run", tmp_path / "ft"
    assert _vol3d("synth", str(src), "--cases", "6", "--size", "small").returncode == 0
    pre = _vol3d("preprocess", str(src / "dicom"), "--out", str(cache), "--config", str(ROOT / "configs/preprocess/tiny.yaml"),
                 "--reports", str(src / "reports.csv"), "--codes", str(src / "ehr_codes.csv"),
                 "--labels", str(src / "labels"), "--boxes", str(src / "boxes.json"), "--vocab", str(src / "vocab.json"),
                 env={"VOL3D_ID_KEY": "0123456789abcdef" * 4})
    assert pre.returncode in (0, 3), pre.stderr
    common = ["--data.cache-dir", str(cache), "--data.val-split", "train", "--data.num-workers", "0", "--no-progress",
              "--log-every", "2", "--ckpt-every", "3", "--val-every", "0"]
    out = _vol3d("train", "--config", str(TINY), "--run-dir", str(run), "--max-steps", "3", *common)
    assert out.returncode == 0, out.stderr
    out = _vol3d("train", "--resume", str(run), "--max-steps", "6")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3", "step_6"]
    with (run / "metrics.csv").open() as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r["name"] == "train/loss"})
    assert steps == [2, 3, 4, 6]
    out = _vol3d("finetune", "--task", "ground", "--init", str(run), "--config", str(ROOT / "configs/finetune/ground.yaml"),
                 "--run-dir", str(ft), "--max-steps", "2", "--no-progress", "--data.val-split", "")
    assert out.returncode == 0, out.stderr

    from vol3d.models import Vol3DModel

    for r in (run, ft):
        model = Vol3DModel.from_pretrained(r / "model")
        assert model.config.perception and model.config.ehr_codes  # heads and the code vocabulary travel with it
        assert model.config.perception_patch == [32, 32, 32] and model.looks_again  # the crops it learned on
        assert sorted(model.vocab) == sorted(json.loads((src / "vocab.json").read_text())["findings"])
        # ... and so does the preprocessing, so a run dir alone prepares new images like the training ones
        from preprocess.config import read_config

        assert read_config(r / "model" / "preprocess.json").params_hash() == read_config(cache).params_hash()
