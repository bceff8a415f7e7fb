"""Presets resolve by name from anywhere, and ship inside the package (wheel), not only in a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from preprocess.errors import InputError
from vol3d.presets import list_presets, preset_path, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_presets_resolve_by_name_and_list_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the source tree
    assert preset_path("tiny", "preprocess").read_text() == (ROOT / "configs/preprocess/tiny.yaml").read_text()
    assert {"tiny_cpu", "vit_b_qwen_lora"} <= set(list_presets("train"))
    assert resolve_config("tiny_cpu", "train") == resolve_config("tiny_cpu.yaml", "train")
    own = tmp_path / "mine.yaml"
    own.write_text("max_steps: 3\n")
    assert resolve_config(own, "train") == own and resolve_config("mine.yaml", "train") == Path("mine.yaml")
    with pytest.raises(InputError, match="available: .*tiny_cpu"):
        resolve_config("tiny_gpu", "train")


def test_python_dash_m_vol3d_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "vol3d", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("vol3d ")


def test_the_wheel_carries_the_presets_and_py_typed(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("vol3d-*.whl"))).namelist()
    for kind, name in (("train", "tiny_cpu"), ("preprocess", "tiny"), ("finetune", "seg_unet_tiny")):
        assert f"vol3d/_configs/{kind}/{name}.yaml" in names
    assert "vol3d/py.typed" in names and "preprocess/py.typed" in names
