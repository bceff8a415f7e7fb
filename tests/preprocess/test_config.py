import dataclasses
from pathlib import Path

import numpy as np
import pytest

from preprocess.config import PreprocessConfig, derive_chunk
from preprocess.config_io import dump_yaml, load_yaml
from preprocess.errors import ConfigError
from preprocess.ingest.config import IngestConfig

PRESETS = sorted((Path(__file__).parents[2] / "configs" / "preprocess").glob("*.yaml"))


def test_every_expected_preset_exists():
    names = {p.stem for p in PRESETS}
    assert {"ct_abdomen", "ct_chest", "mr_brain", "mr_knee", "tiny", "tiny_mr"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_with_sane_fields(path):
    cfg = load_yaml(PreprocessConfig, path)
    assert isinstance(cfg.ingest, IngestConfig)
    assert cfg.target_spacing is None or (len(cfg.target_spacing) == 3 and min(cfg.target_spacing) > 0)
    assert all(hi > lo for lo, hi in cfg.ct_windows)
    assert len(cfg.patch_size) == 3
    chunk = cfg.effective_chunk((512, 512, 512))
    assert 10 * 1024 <= 2 * chunk[0] * chunk[1] * chunk[2] <= 1024 * 1024  # float16 chunk of 10 KiB..1 MiB
    if cfg.fixed_size is not None:
        assert all(p <= f for p, f in zip(cfg.patch_size, cfg.fixed_size, strict=True))
    assert len(cfg.params_hash()) == 64


def test_merlin_like_ct_presets():
    for name in ("ct_abdomen", "ct_chest"):
        cfg = load_yaml(PreprocessConfig, PRESETS[[p.stem for p in PRESETS].index(name)])
        assert cfg.target_spacing == (1.5, 1.5, 3.0)
        assert cfg.ingest.modalities == ("CT",)


def test_tiny_preset_fits_a_synthetic_body_in_64x64x32():
    cfg = load_yaml(PreprocessConfig, PRESETS[[p.stem for p in PRESETS].index("tiny")])
    assert cfg.fixed_size == (64, 64, 32)
    fov = np.multiply(cfg.fixed_size, cfg.target_spacing)
    body = np.array([340.0, 250.0]) + 2 * cfg.crop_margin_mm  # vol3d synth's largest body, mm
    assert np.all(body <= fov[:2]) and np.all(body >= 0.85 * fov[:2])  # fits, and fills the volume


def test_yaml_round_trip_keeps_the_hash(tmp_path):
    cfg = PreprocessConfig(ct_windows=[(-160, 240), (-1000, 1000)], fixed_size=(32, 32, 16))
    dump_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(PreprocessConfig, tmp_path / "c.yaml")
    assert back == cfg
    assert back.params_hash() == cfg.params_hash()


def test_hash_ignores_workers_and_key_but_not_output_fields():
    base = PreprocessConfig()
    assert PreprocessConfig(workers=7, id_key="secret").params_hash() == base.params_hash()
    assert PreprocessConfig(target_spacing=(1, 1, 1)).params_hash() != base.params_hash()
    assert PreprocessConfig(ingest=IngestConfig(min_slices=3)).params_hash() != base.params_hash()
    assert "secret" not in str(PreprocessConfig(id_key="secret").public_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_spacing": (1.0, 0.0, 1.0)},
        {"ct_windows": [(100, -100)]},
        {"ct_windows": []},
        {"mr_percentiles": (99.0, 1.0)},
        {"fixed_size": (64, 64)},
        {"compression": "zip"},
        {"modality_default": "PET"},
        {"workers": -1},
    ],
)
def test_bad_values_raise_config_error_naming_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        PreprocessConfig(**kwargs)


def test_unknown_yaml_field_is_rejected(tmp_path):
    (tmp_path / "c.yaml").write_text("target_spacing: [1, 1, 1]\nspacingg: 3\n")
    with pytest.raises(ConfigError, match="spacingg"):
        load_yaml(PreprocessConfig, tmp_path / "c.yaml")


def test_derived_chunk_fits_patch_and_array():
    assert derive_chunk((512, 512, 512), (64, 64, 32)) == (32, 64, 32)
    assert derive_chunk((20, 512, 512), (64, 64, 32)) == (20, 64, 32)
    assert derive_chunk((512, 512, 512), (64, 64, 32), chunk=(16, 16, 16)) == (16, 16, 16)



@dataclasses.dataclass
class _Inner:
    depth: int = 2  # a nested field
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Outer:
    lr: float = 1e-3
    sizes: tuple[int, ...] = (1, 2)
    flag: bool = False
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_flags_map_one_to_one_onto_fields_including_nested_and_dicts():
    import argparse

    from preprocess.config_io import add_dataclass_args, build_config

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Outer)
    argv = ["--lr", "0.5", "--sizes", "3", "4", "--flag", "--inner.depth", "7", "--inner.params", "{heads: 4, name: x}"]
    cfg = build_config(_Outer, None, parser.parse_args(argv))
    assert cfg == _Outer(lr=0.5, sizes=(3, 4), flag=True, inner=_Inner(depth=7, params={"heads": 4, "name": "x"}))
    # untouched flags keep the dataclass defaults
    assert build_config(_Outer, None, parser.parse_args([])) == _Outer()


def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_file(tmp_path):
    import argparse

    from preprocess.config_io import add_dataclass_args, build_config

    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 0.1\ninner:\n  depth: 3\n")
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Outer)
    with pytest.raises(ConfigError, match=r"^--inner\.depth: expected int"):
        build_config(_Outer, preset, parser.parse_args(["--inner.depth", "abc"]))
    preset.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"p\.yaml\.lr: expected float"):
        build_config(_Outer, preset, parser.parse_args([]))


def test_comment_per_field_becomes_the_flag_help():
    import argparse

    from preprocess.config import PreprocessConfig
    from preprocess.config_io import add_dataclass_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, PreprocessConfig)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert "spacing" in helps["--target-spacing"].lower()
    assert "VOL3D_ID_KEY" in helps["--id-key"]
    assert helps["--ingest.min-slices"]  # nested dataclasses too
    parser.format_help()  # no stray % in any help text
