"""Datasets over the preprocessed cache (torch). Imported lazily so ``vol3d --help`` stays instant."""

from __future__ import annotations

from typing import Any

__all__ = ["CacheDataset", "collate_cases", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vol3d.data import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'vol3d.data' has no attribute {name!r}")
