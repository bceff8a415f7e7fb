"""Encoder registry: ``create_encoder(name, **overrides)`` and ``list_encoders()``.

Each model family file registers its presets with :func:`register_encoder`; a preset
is a function returning the keyword arguments of the family's constructor, so
``overrides`` simply replace entries (``create_encoder("vit3d_base", depth=2)``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from preprocess.errors import ConfigError


@dataclass(frozen=True)
class _Entry:
    cls: type[nn.Module]
    defaults: dict[str, Any]
    description: str


_ENCODERS: dict[str, _Entry] = {}
# Modules whose import registers presets; imported on first use so the registry is
# complete however the caller reached it.
_FAMILIES = ("vol3d.models.vit3d", "vol3d.models.resnet3d", "vol3d.models.unet3d")


def register_encoder(name: str, cls: type[nn.Module], description: str, **defaults: Any) -> None:
    """Register preset ``name`` building ``cls(**defaults)``."""
    if name in _ENCODERS:
        raise ValueError(f"encoder {name!r} is registered twice")
    _ENCODERS[name] = _Entry(cls, dict(defaults), description)


def _load_families() -> None:
    for mod in _FAMILIES:
        importlib.import_module(mod)


def list_encoders() -> list[str]:
    """Names of all registered encoder presets, sorted."""
    _load_families()
    return sorted(_ENCODERS)


def encoder_defaults(name: str) -> dict[str, Any]:
    """Constructor arguments of preset ``name`` (a copy)."""
    _load_families()
    if name not in _ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(_ENCODERS)}")
    return dict(_ENCODERS[name].defaults)


def describe_encoders() -> dict[str, str]:
    """``{name: one-line description}`` for docs and ``vol3d info``."""
    _load_families()
    return {k: v.description for k, v in sorted(_ENCODERS.items())}


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build encoder preset ``name``; ``overrides`` replace the preset's constructor arguments.

    Unknown names or arguments raise :class:`ConfigError` listing the valid ones.
    """
    defaults = encoder_defaults(name)
    entry = _ENCODERS[name]
    kwargs = {**defaults, **overrides}
    try:
        return entry.cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"encoder {name!r}: {exc}; preset arguments are {sorted(defaults)}") from None

