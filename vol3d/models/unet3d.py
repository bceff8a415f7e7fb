"""Residual U-Net encoder: the down path of MONAI's ``UNet``, as a vol3d encoder.

Stages of MONAI ``ResidualUnit`` blocks (convolution, instance norm, PReLU, with a residual
connection), each strided: the layout of ``monai.networks.nets.UNet``'s encoder half. The
deepest stage does not downsample (MONAI's "bottom" layer), so its map sits beside the stage
before it; :mod:`vol3d.models.decoders` (style ``monai_unet``) then mirrors MONAI's up path.

Why a third family beside the ViT and the inflated ResNet: on a 2-core CPU, for dense outputs
(organ masks, lesions a few voxels across) trained from scratch in minutes, this layout learns
several times faster per step than the ResNet with a U-Net decoder (docs/benchmarks/seg.md),
and the same encoder feeds the language model its tokens (the deepest map), so segmentation,
detection and the vision-language model share one network. GPU presets keep the ViT and ResNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from vol3d.models.layers import Int3, VolumeEncoder, grid_to_tokens, maybe_checkpoint, to_3tuple
from vol3d.models.registry import register_encoder


class ResUNetEncoder(VolumeEncoder):
    """MONAI ``UNet``'s encoder: one ``ResidualUnit`` stage per entry of ``channels``.

    Args:
        channels: output channels of each stage, shallow to deep (MONAI's ``channels``).
        strides: stride of each stage, an int or ``(sx, sy, sz)``; the last is usually 1 (the
            bottom layer), MONAI's ``strides`` plus that 1.
        in_chans: input channels.
        num_res_units: convolutions per stage (MONAI's ``num_res_units``, ``subunits`` of a ``ResidualUnit``).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int | Sequence[int]] = (2, 2, 2, 1), in_chans: int = 1,
                 num_res_units: int = 2) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} need one entry per stage")
        self.in_chans = in_chans
        self.strides: list[Int3] = [to_3tuple(s) for s in strides]
        self.patch_size = tuple(math.prod(s[a] for s in self.strides) for a in range(3))  # type: ignore[assignment]
        self.token_offset = (0.0, 0.0, 0.0)
        self.stage_dims = [int(c) for c in channels]
        self.embed_dim = self.stage_dims[-1]
        self.depth = len(channels)
        stages, cin = [], in_chans
        for c, s in zip(self.stage_dims, self.strides, strict=True):
            stages.append(ResidualUnit(3, cin, c, strides=s, kernel_size=3, subunits=max(1, num_res_units)))
            cin = c
        self.stages = nn.ModuleList(stages)

    def token_grid(self, input_shape_xyz: Sequence[int]) -> Int3:
        # a strided 3x3x3 convolution with padding 1 gives ceil(n / s)
        grid = [int(n) for n in input_shape_xyz[-3:]]
        for st in self.strides:
            grid = [-(-g // s) for g, s in zip(grid, st, strict=True)]
        return tuple(grid)  # type: ignore[return-value]

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Every stage's map ``[(B, channels[i], ...) for i in indices]`` (default: all, shallow to deep)."""
        n = len(self.stages)
        want = list(range(n)) if indices is None else [i % n for i in indices]
        self._check_input(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i > max(want):
                break
            x = maybe_checkpoint(stage, x, enabled=self.grad_checkpointing)
            outs.append(x)
        return [outs[i] for i in want]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B, gx*gy*gz, embed_dim)`` from the deepest stage."""
        return grid_to_tokens(self.forward_intermediates(x, [-1])[0])


register_encoder("resunet3d_tiny", ResUNetEncoder,
                 "MONAI UNet's encoder, channels 16-128, strides 2-2-2-1: the CPU preset's dense perception",
                 channels=(16, 32, 64, 128), strides=(2, 2, 2, 1), num_res_units=2)
register_encoder("resunet3d_base", ResUNetEncoder,
                 "MONAI UNet's encoder, channels 32-512, strides 2-2-2-2-1 (GPU)",
                 channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2, 1), num_res_units=2)
