"""Every registered encoder: forward/backward with and without checkpointing, shapes, geometry."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from preprocess.errors import ConfigError
from vol3d.models import create_encoder, list_encoders
from vol3d.models.registry import encoder_defaults


def _small_overrides(name: str) -> dict:
    """The preset's layout, narrow enough for a CPU test in about a second."""
    d = encoder_defaults(name)
    if name.startswith("vit3d"):
        return {"embed_dim": d["num_heads"] * 4}
    if name.startswith("resunet3d"):
        return {"channels": [4 * 2**i for i in range(len(d["channels"]))]}
    # ResNet-50/152 keep their bottleneck blocks but one per stage: 3D convolution backward
    # on CPU is slow, and the full stage layouts are checked on the meta device in test_inflate
    return {"width": 4} if d["block"] == "basic" else {"width": 4, "layers": (1, 1, 1, 1)}


def _test_input(enc, batch: int = 1) -> torch.Tensor:
    # 2 x 3 x 2 tokens: a non-cubic grid catches axis mix-ups in flattening
    shape = [m * p for m, p in zip((2, 3, 2), enc.patch_size, strict=True)]
    return torch.randn(batch, enc.in_chans, *shape)


def test_registry_lists_the_contract_names():
    for name in ("vit3d_tiny", "vit3d_small", "vit3d_base", "vit3d_large",
                 "resnet3d_tiny", "resnet3d_18", "resnet3d_50", "resnet3d_152", "resunet3d_tiny", "resunet3d_base"):
        assert name in list_encoders()
    with pytest.raises(ConfigError, match="choose one of"):
        create_encoder("vit3d_huge")
    with pytest.raises(ConfigError, match="preset arguments"):
        create_encoder("vit3d_tiny", not_an_argument=1)


@pytest.mark.parametrize(
    "name, lo, hi",
    [("vit3d_small", 22e6, 26e6), ("vit3d_base", 86e6, 92e6), ("vit3d_large", 300e6, 315e6),
     ("resnet3d_18", 30e6, 36e6), ("resnet3d_50", 40e6, 50e6), ("resnet3d_152", 110e6, 125e6)],
)
def test_full_size_parameter_counts_on_meta(name, lo, hi):
    with torch.device("meta"):
        enc = create_encoder(name)
    n = sum(p.numel() for p in enc.parameters())
    assert lo < n < hi, f"{name}: {n / 1e6:.1f}M parameters"


@pytest.mark.parametrize("name", list_encoders())
def test_forward_backward_checkpointing_matches(name):
    torch.manual_seed(0)
    plain = create_encoder(name, **_small_overrides(name))
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = _test_input(plain)
    grid = plain.token_grid(x.shape[2:])
    assert grid == (2, 3, 2)

    outs, grads = [], []
    for model in (plain, ckpt):
        model.train()
        xi = x.clone().requires_grad_(True)
        y = model.forward_features(xi)
        # a loss that depends on every token differently, so grid order matters
        w = torch.linspace(-1, 1, y.shape[1])[None, :, None]
        (y * w).square().mean().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])

    assert outs[0].shape == (x.shape[0], math.prod(grid), plain.embed_dim)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        assert g0 is not None and g1 is not None
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["vit3d_tiny", "resnet3d_tiny"])
def test_intermediates_positions_and_no_weight_decay(name):
    enc = create_encoder(name).eval()
    x = _test_input(enc, batch=1)
    feats = enc.forward_intermediates(x)
    assert all(f.ndim == 5 and f.shape[0] == 1 for f in feats)
    # the deepest map is forward_features' grid
    last = enc.forward_features(x)
    gx, gy, gz = enc.token_grid(x.shape[2:])
    assert feats[-1].shape[1:] == (enc.embed_dim, gx, gy, gz)
    torch.testing.assert_close(feats[-1].flatten(2).transpose(1, 2), last)
    pos = enc.token_positions(x.shape[2:])
    assert pos.shape == (gx * gy * gz, 3) and pos.min() >= 0 and pos.max() <= 1
    names = {n for n, _ in enc.named_parameters()}
    assert enc.no_weight_decay() <= names and enc.no_weight_decay()


def test_resnet_multiscale_intermediates():
    enc = create_encoder("resnet3d_tiny").eval()
    x = torch.randn(1, 1, 64, 64, 32)
    maps = enc.forward_intermediates(x)
    assert [m.shape[1] for m in maps] == enc.stage_dims
    assert [tuple(m.shape[2:]) for m in maps] == [(32, 32, 16), (16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 2)]
    assert enc.token_grid((64, 64, 32)) == (2, 2, 2)
    # odd sizes: the grid formula agrees with the convolutions
    assert enc.token_grid((70, 50, 9)) == tuple(enc.forward_intermediates(torch.randn(1, 1, 70, 50, 9), [4])[0].shape[2:])


def test_resnet_in_chans_mismatch_is_a_clear_error():
    enc = create_encoder("resnet3d_tiny", in_chans=2)
    with pytest.raises(ValueError, match="in_chans=1"):
        enc.forward_features(torch.randn(1, 1, 64, 64, 32))


def test_resnet_dense_layout_keeps_fine_maps_and_counts_tokens():
    """A stride-1 max-pool is dropped and the stem may be 3x3x3: the maps a dense head reads stay
    fine, and token_grid still predicts the last map exactly."""
    enc = create_encoder("resnet3d_tiny", width=4, stem_kernel=3, xy_strides=(2, 1, 2, 2, 1),
                         z_strides=(1, 1, 2, 2, 1), norm="instance").eval()
    assert isinstance(enc.maxpool, torch.nn.Identity)
    assert enc.patch_size == (8, 8, 4)
    x = torch.randn(1, 1, 40, 24, 12)
    maps = enc.forward_intermediates(x)
    assert [tuple(m.shape[2:]) for m in maps] == [(20, 12, 12), (20, 12, 12), (10, 6, 6), (5, 3, 3), (5, 3, 3)]
    assert enc.token_grid(x.shape[2:]) == (5, 3, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in enc.modules())
    with pytest.raises(ValueError, match="xy_strides"):
        create_encoder("resnet3d_tiny", xy_strides=(2, 2, 3, 2, 2))
