"""Reducers: fixed token counts, and positions that still say where tokens come from."""

from __future__ import annotations

import pytest
import torch

from preprocess.errors import ConfigError
from vol3d.models import create_encoder, create_reducer, list_reducers
from vol3d.models.layers import grid_centres

GRID = (4, 4, 2)
SHAPE = (32, 32, 8)


def _positions() -> torch.Tensor:
    return grid_centres(GRID, (8, 8, 4), (3.5, 3.5, 1.5), SHAPE)


def test_every_reducer_returns_its_declared_count():
    tokens = torch.randn(3, 32, 16, requires_grad=True)
    volume = torch.rand(3, 1, *SHAPE)
    params = {"pool": {"out_grid": (2, 2, 1)}, "perceiver": {"num_queries": 5}, "prune": {"num_tokens": 7}}
    for name in list_reducers():
        red = create_reducer(name, 16, **params.get(name, {}))
        out, pos = red(tokens, _positions(), GRID, volume=volume)
        m = red.num_tokens(GRID)
        assert out.shape == (3, m, red.out_dim) and pos.shape == (3, m, 3)
        assert pos.min() >= 0 and pos.max() <= 1
        out.sum().backward()  # gradients reach the encoder tokens through every reducer
        assert tokens.grad is not None and tokens.grad.abs().sum() > 0
        tokens.grad = None
    with pytest.raises(ConfigError, match="choose one of"):
        create_reducer("merge", 16)


def test_pool_positions_are_means_of_pooled_centres():
    red = create_reducer("pool", 8, out_grid=(2, 2, 1))
    tokens = torch.randn(2, 32, 8)
    out, pos = red(tokens, _positions(), GRID)
    centres = _positions().reshape(*GRID, 3)
    toks = tokens.reshape(2, *GRID, 8)
    # output token (1, 0, 0) averages input tokens x in {2, 3}, y in {0, 1}, all z
    idx = (1 * 2 + 0) * 1 + 0
    torch.testing.assert_close(pos[0, idx], centres[2:4, 0:2, :].reshape(-1, 3).mean(0))
    torch.testing.assert_close(out[1, idx], toks[1, 2:4, 0:2, :].reshape(-1, 8).mean(0))
    # and that mean is the centre of the region those tokens cover: x voxels 16..31 -> 24/32
    torch.testing.assert_close(pos[0, idx], torch.tensor([24 / 32, 8 / 32, 4 / 8]))


def test_perceiver_positions_lie_among_the_tokens_it_attends():
    torch.manual_seed(0)
    red = create_reducer("perceiver", 16, num_queries=6, depth=1)
    pos_in = _positions()
    # only the x < 0.5 half of the volume is offered: every query must be located there
    half = pos_in[:, 0] < 0.5
    out, pos = red(torch.randn(2, int(half.sum()), 16), pos_in[half], (2, 4, 2))
    assert out.shape == (2, 6, 16)
    assert (pos[..., 0] < 0.5).all()


def _two_sample_volume() -> torch.Tensor:
    """Air everywhere except: sample 0 tissue in x < 16, sample 1 tissue in x >= 16 and z < 4."""
    vol = torch.zeros(2, 1, *SHAPE)
    vol[0, :, :16] = 0.5 + 0.1 * torch.rand(1, 16, 32, 8)
    vol[1, :, 16:, :, :4] = 0.5 + 0.1 * torch.rand(1, 16, 32, 4)
    return vol


def test_prune_keeps_tissue_per_sample_within_budget():
    torch.manual_seed(0)
    enc = create_encoder("vit3d_tiny", img_size=SHAPE, patch_size=(8, 8, 4)).eval()
    vol = _two_sample_volume()
    with torch.no_grad():
        tokens = enc.forward_features(vol)
    pos_in = enc.token_positions(SHAPE)
    red = create_reducer("prune", enc.embed_dim, num_tokens=6)
    idx = red.select(tokens, GRID, vol)
    assert idx.shape == (2, 6)
    assert (idx.diff(dim=1) > 0).all()  # unique, and in grid (spatial) order
    out, pos = red(tokens, pos_in, GRID, volume=vol)
    torch.testing.assert_close(pos, pos_in[idx])
    torch.testing.assert_close(out, torch.stack([tokens[b, idx[b]] for b in range(2)]))
    assert (pos[0, :, 0] < 0.5).all()  # sample 0: tissue on the low-x side only
    assert (pos[1, :, 0] > 0.5).all() and (pos[1, :, 2] < 0.5).all()  # sample 1: high x, low z


def test_prune_fills_the_budget_with_all_tissue_first():
    enc = create_encoder("vit3d_tiny", img_size=SHAPE, patch_size=(8, 8, 4)).eval()
    vol = _two_sample_volume()
    with torch.no_grad():
        tokens = enc.forward_features(vol)
    red = create_reducer("prune", enc.embed_dim, num_tokens=12)
    fg = red.foreground_fraction(vol, GRID) >= red.min_foreground  # sample 1 has 2*4*1 = 8 tissue tokens
    assert fg.sum(1).tolist() == [16, 8]
    idx = red.select(tokens, GRID, vol)
    assert set(fg[1].nonzero().flatten().tolist()) <= set(idx[1].tolist())
    with pytest.raises(ConfigError, match="exceeds"):
        create_reducer("prune", 8, num_tokens=33).num_tokens(GRID)
