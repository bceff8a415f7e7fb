"""ViT specifics: anisotropic patches, token geometry, positional-embedding resizing."""

from __future__ import annotations

import pytest
import torch

from vol3d.models import create_encoder


def test_anisotropic_patches_grid_order_and_centres():
    enc = create_encoder("vit3d_tiny", patch_size=(8, 4, 2), img_size=(16, 16, 16), depth=0).eval()
    x = torch.zeros(1, 1, 16, 16, 16)
    assert enc.token_grid(x.shape[2:]) == (2, 4, 8)
    base = enc.forward_features(x)
    x[0, 0, 9, 5, 3] = 10.0  # voxel in patch (1, 1, 1)
    changed = (enc.forward_features(x) - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [(1 * 4 + 1) * 8 + 1]
    pos = enc.token_positions((16, 16, 16))
    # token (0, 0, 0) covers voxels 0..7 x 0..3 x 0..1: centre (3.5, 1.5, 0.5) -> (4, 2, 1) / 16
    torch.testing.assert_close(pos[0], torch.tensor([4 / 16, 2 / 16, 1 / 16]))
    torch.testing.assert_close(pos[changed[0]], torch.tensor([12 / 16, 6 / 16, 3 / 16]))


def test_pos_embed_interpolates_to_other_sizes():
    enc = create_encoder("vit3d_tiny").eval()  # built for 32x32x16, patch 8x8x4 -> grid 4x4x4
    assert enc.interpolate_pos_embed((4, 4, 4)) is enc.pos_embed
    with torch.no_grad():  # channel 0 = normalised x centre of each token: a linear function of space
        gx = enc.base_grid[0]
        xc = ((torch.arange(gx) + 0.5) / gx)[:, None, None].expand(enc.base_grid).reshape(-1)
        enc.pos_embed[0, :, 0] = xc
    pe = enc.interpolate_pos_embed((8, 3, 5))
    assert pe.shape == (1, 8 * 3 * 5, enc.embed_dim)
    got = pe[0, :, 0].reshape(8, 3, 5)
    want = ((torch.arange(8) + 0.5) / 8)[:, None, None].expand(8, 3, 5)
    # trilinear interpolation with centre alignment is exact for a linear field away from the ends
    torch.testing.assert_close(got[2:-2], want[2:-2], atol=1e-6, rtol=0)
    y = enc.forward_features(torch.randn(2, 1, 64, 24, 20))
    assert y.shape == (2, 8 * 3 * 5, enc.embed_dim)


def test_input_not_multiple_of_patch_is_a_clear_error():
    enc = create_encoder("vit3d_tiny")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.forward_features(torch.randn(1, 1, 30, 32, 16))


def test_attention_backend_override_is_applied_to_every_block():
    enc = create_encoder("vit3d_tiny", attn_backend="sdpa")
    assert {b.attn.backend for b in enc.blocks} == {"sdpa"}
    enc.set_attention_backend("auto")
    assert {b.attn.backend for b in enc.blocks} == {"auto"}
