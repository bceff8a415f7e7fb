"""YAML presets by name, from anywhere: ``--preset tiny``, ``--config tiny_cpu``.

The presets live in the repository's ``configs/<kind>/<name>.yaml``; the package ships them as
``vol3d/_configs`` (a link to ``configs/`` in a checkout, a copy in a wheel), found with
:mod:`importlib.resources`, so a non-editable ``pip install vol3d`` has them too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from preprocess.errors import InputError

KINDS = ("preprocess", "train", "finetune")


def _folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"preset kind must be one of {KINDS}, got {kind!r}")
    return Path(str(resources.files("vol3d") / "_configs" / kind))


def list_presets(kind: str) -> list[str]:
    """Names of the presets of ``kind`` (preprocess, train, finetune), sorted."""
    folder = _folder(kind)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(name: str, kind: str = "preprocess") -> Path:
    """The file of preset ``name`` of ``kind``; the error lists the presets there."""
    path = _folder(kind) / f"{name}.yaml"
    if not path.is_file():
        found = ", ".join(list_presets(kind)) or "none (this vol3d installation ships no presets)"
        raise InputError(f"no {kind} preset named {name!r}; available: {found}")
    return path


def resolve_config(value: str | Path, kind: str) -> Path:
    """``--config VALUE``: an existing file, else the name of a preset of ``kind``."""
    path = Path(value)
    if path.is_file() or path.parent != Path("."):  # a file, or a path whose error names it
        return path
    return preset_path(path.stem if path.suffix in (".yaml", ".yml") else str(value), kind)
