import subprocess
import sys

import pytest

from vol3d.cli import COMMANDS, build_parser, main


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"vol3d {name}" in out
        assert len(out.splitlines()) > 3


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; from vol3d.cli import build_parser; build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'pydicom', 'h5py', 'monai', 'SimpleITK') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_info_json_reports_codecs_and_device(capsys):
    import json

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"].startswith(("cpu", "cuda"))
    assert "JPEG 2000 lossless" in info["dicom_codecs"]
    assert info["libraries"]["torch"]


def test_parser_builds_all_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_configs_behind_the_flags_are_torch_free():
    """Train/seg flags are built from these dataclasses: importing them must not load torch."""
    code = (
        "import sys, vol3d.train.config, vol3d.seg.config, vol3d.models.config;"
        "print(','.join(m for m in ('torch', 'transformers', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_train_help_lists_every_config_field(capsys):
    import dataclasses

    from vol3d.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if not dataclasses.is_dataclass(f.type) and f.name != "model":
            assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--model.encoder" in out and "--optim.lr" in out
