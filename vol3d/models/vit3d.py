"""3D Vision Transformer with anisotropic patches and a resizable positional embedding.

CT voxels are usually thicker along Z than in-plane (e.g. 1.5 x 1.5 x 3 mm as in
Merlin's preprocessing), so the default patch ``(16, 16, 8)`` covers a 24 mm cube.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vol3d.attention import Backend
from vol3d.models.layers import (
    Block,
    Int3,
    VolumeEncoder,
    grid_to_tokens,
    maybe_checkpoint,
    to_3tuple,
    tokens_to_grid,
)
from vol3d.models.registry import register_encoder


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches -> tokens: ``(B, C, X, Y, Z) -> (B, D, gx, gy, gz)``."""

    def __init__(self, patch_size: Int3, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [n for n, p in zip(x.shape[2:], self.patch_size, strict=True) if n % p]
        if bad:
            raise ValueError(
                f"volume of spatial shape {tuple(x.shape[2:])} is not a multiple of the patch size "
                f"{self.patch_size}; crop/pad the input (e.g. preprocessing's target shape) to a multiple "
                "of the patch size or build the encoder with another patch_size"
            )
        return self.proj(x)


class ViT3D(VolumeEncoder):
    """Plain ViT on 3D patches; no class token (pooled features are the token mean).

    Args:
        img_size: spatial input ``(X, Y, Z)`` the positional embedding is built for; other
            sizes (multiples of the patch) work by trilinear interpolation of the embedding.
        patch_size: voxels per patch along ``(X, Y, Z)``, may differ per axis.
        in_chans: input channels (e.g. the number of CT HU windows in the cache).
        embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        attn_backend: ``auto`` (xformers on CUDA when installed, else SDPA), ``sdpa``, ``xformers``.
    """

    def __init__(
        self,
        img_size: Sequence[int] = (224, 224, 160),
        patch_size: int | Sequence[int] = (16, 16, 8),
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attn_backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.img_size = to_3tuple(img_size)
        self.patch_size = to_3tuple(patch_size)
        # token i covers voxels [i*p, (i+1)*p - 1]: its centre is at (p - 1) / 2 past the start
        self.token_offset = tuple((p - 1) / 2 for p in self.patch_size)  # type: ignore[assignment]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed3d(self.patch_size, in_chans, embed_dim)
        self.base_grid = self.token_grid(self.img_size)
        n = self.base_grid[0] * self.base_grid[1] * self.base_grid[2]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i], backend=attn_backend) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ interface

    def token_grid(self, input_shape_xyz: Sequence[int]) -> Int3:
        return tuple(int(n) // p for n, p in zip(input_shape_xyz[-3:], self.patch_size, strict=True))  # type: ignore[return-value]

    def set_attention_backend(self, backend: Backend) -> None:
        """Override the attention implementation of every block (``auto``/``sdpa``/``xformers``)."""
        for blk in self.blocks:
            blk.attn.backend = backend

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"pos_embed"}

    def interpolate_pos_embed(self, grid: Int3) -> torch.Tensor:
        """Positional embedding for a token grid ``(gx, gy, gz)``: ``(1, gx*gy*gz, D)``."""
        if tuple(grid) == self.base_grid:
            return self.pos_embed
        pe = tokens_to_grid(self.pos_embed, self.base_grid)
        pe = F.interpolate(pe, size=tuple(grid), mode="trilinear", align_corners=False)
        return grid_to_tokens(pe)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Int3]:
        self._check_input(x)
        fmap = self.patch_embed(x)
        grid: Int3 = tuple(fmap.shape[2:])  # type: ignore[assignment]
        return grid_to_tokens(fmap) + self.interpolate_pos_embed(grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B, gx*gy*gz, D)`` normalised tokens in grid order."""
        tokens, _ = self._embed(x)
        for blk in self.blocks:
            tokens = maybe_checkpoint(blk, tokens, enabled=self.grad_checkpointing)
        return self.norm(tokens)

    def default_intermediate_indices(self) -> list[int]:
        """Four evenly spaced blocks ending with the last (UNETR taps blocks 3, 6, 9, 12 of 12)."""
        return sorted({max(0, round(self.depth * k / 4) - 1) for k in (1, 2, 3, 4)})

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Outputs of blocks ``indices`` (negative allowed) as maps ``(B, D, gx, gy, gz)``.

        All maps are at the patch grid; the last block's output is layer-normed as in
        :meth:`forward_features`, the others are raw residual streams.
        """
        want = self.default_intermediate_indices() if indices is None else [i % self.depth for i in indices]
        tokens, grid = self._embed(x)
        taps: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(want) + 1]):
            tokens = maybe_checkpoint(blk, tokens, enabled=self.grad_checkpointing)
            if i in want:
                taps[i] = self.norm(tokens) if i == self.depth - 1 else tokens
        return [tokens_to_grid(taps[i], grid) for i in want]


def _vit_preset(name: str, description: str, **kw) -> None:
    register_encoder(name, ViT3D, description, **kw)


_vit_preset("vit3d_tiny", "ViT 64-d x 2 blocks, patch 8x8x4 at 32x32x16: tests and CPU demo",
            img_size=(32, 32, 16), patch_size=(8, 8, 4), embed_dim=64, depth=2, num_heads=4)
_vit_preset("vit3d_small", "ViT-S/16x16x8 (384-d, 12 blocks) at 224x224x160",
            embed_dim=384, depth=12, num_heads=6)
_vit_preset("vit3d_base", "ViT-B/16x16x8 (768-d, 12 blocks) at 224x224x160",
            embed_dim=768, depth=12, num_heads=12)
_vit_preset("vit3d_large", "ViT-L/16x16x8 (1024-d, 24 blocks) at 224x224x160",
            embed_dim=1024, depth=24, num_heads=16)
