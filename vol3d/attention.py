"""Attention backend selection: xformers memory-efficient attention on CUDA when
installed, torch scaled-dot-product attention (SDPA) everywhere else."""

from __future__ import annotations

import functools
from typing import Literal

Backend = Literal["auto", "sdpa", "xformers"]


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: F401
    except Exception:  # ImportError, or a build mismatched with torch
        return None
    return xops


def xformers_status() -> str:
    """Human-readable availability of xformers for `vol3d info`."""
    import torch

    if _xformers_ops() is None:
        return "not installed (torch SDPA is used; pip install 'vol3d[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "installed, but no CUDA device (torch SDPA is used)"
    return "available (used for attention on CUDA)"


def resolve_backend(backend: Backend, device_type: str) -> Literal["sdpa", "xformers"]:
    """Pick the attention implementation for a device; ``auto`` prefers xformers on CUDA."""
    if backend == "sdpa":
        return "sdpa"
    available = _xformers_ops() is not None and device_type == "cuda"
    if backend == "xformers":
        if not available:
            raise RuntimeError("attention backend 'xformers' needs xformers installed and a CUDA device; use 'sdpa' or 'auto'")
        return "xformers"
    return "xformers" if available else "sdpa"


def attention(q, k, v, backend: Backend = "auto", dropout_p: float = 0.0):
    """Multi-head attention on ``(B, H, N, D)`` tensors, returns ``(B, H, N, D)``."""
    import torch.nn.functional as F

    impl = resolve_backend(backend, q.device.type)
    if impl == "xformers":
        xops = _xformers_ops()
        # xformers expects (B, N, H, D)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
