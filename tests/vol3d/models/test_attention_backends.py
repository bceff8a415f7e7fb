"""Attention backends: SDPA equals textbook attention; xformers (CUDA only) equals SDPA."""

from __future__ import annotations

import pytest
import torch

from vol3d.attention import _xformers_ops, attention, resolve_backend


def _naive(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v


def test_sdpa_matches_naive_softmax_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), _naive(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, "auto"), _naive(q, k, v), rtol=1e-5, atol=1e-5)


def test_auto_is_sdpa_on_cpu_and_xformers_request_fails_clearly():
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_backend("xformers", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _xformers_ops() is None, reason="needs CUDA and xformers")
def test_xformers_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    assert resolve_backend("auto", "cuda") == "xformers"
    torch.testing.assert_close(attention(q, k, v, "xformers"), attention(q, k, v, "sdpa"), rtol=2e-3, atol=2e-3)
