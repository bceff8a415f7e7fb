"""Inflated 3D ResNet (I3D style) with torchvision's parameter names.

Parameter names mirror ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...) so a 2D ImageNet state dict maps
onto this network with :func:`vol3d.models.inflate.inflate_resnet_state_dict`, the
way Merlin starts from ImageNet weights. 2D kernels ``k x k`` become ``k x k x z_kernel``
(X, Y in-plane, Z across slices); 1x1 kernels stay 1x1x1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vol3d.models.layers import Conv3dSlicePad, Int3, VolumeEncoder, grid_to_tokens, maybe_checkpoint
from vol3d.models.registry import register_encoder


def _conv(cin: int, cout: int, k: int, stride: Int3, z_kernel: int) -> nn.Conv3d:
    return Conv3dSlicePad(cin, cout, (k, k, z_kernel if k > 1 else 1), stride=stride)


#: Normalisation layers by name. ``batch`` keeps torchvision's names and running statistics (what
#: ImageNet inflation needs); ``instance`` (affine, no running statistics) is what 3D segmentation
#: networks use at batch sizes of 1-4 volumes (nnU-Net, MONAI), where batch statistics are noise.
NORMS = ("batch", "instance")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.BatchNorm3d(channels)


class BasicBlock(nn.Module):
    """Two 3x3(x z_kernel) convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: Int3, z_kernel: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride, z_kernel)
        self.bn1 = _norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, (1, 1, 1), z_kernel)
        self.bn2 = _norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3(x z_kernel, strided) -> 1x1 bottleneck (ResNet-50/101/152, torchvision v1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: Int3, z_kernel: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 1, (1, 1, 1), z_kernel)
        self.bn1 = _norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride, z_kernel)
        self.bn2 = _norm(norm, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, (1, 1, 1), z_kernel)
        self.bn3 = _norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _downsample(cin: int, cout: int, stride: Int3, norm: str = "batch") -> nn.Sequential | None:
    if stride == (1, 1, 1) and cin == cout:
        return None
    return nn.Sequential(nn.Conv3d(cin, cout, kernel_size=1, stride=stride, bias=False), _norm(norm, cout))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet3D(VolumeEncoder):
    """I3D-style ResNet encoder; tokens are the last stage's feature map.

    Args:
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        block: ``basic`` or ``bottleneck``.
        in_chans: input channels.
        width: channels of the first stage (64 in torchvision; smaller for tests).
        z_kernel: kernel size across slices for every k>1 convolution (inflation's ``time_dim``).
        z_strides: stride along Z at the five downsampling points (stem conv, max-pool,
            layer2, layer3, layer4); 1 keeps thick-slice volumes from collapsing in Z. The
            default gives 224x224x160 -> 7x7x10 = 490 tokens, Merlin's count.
        xy_strides: the same in-plane (X and Y). torchvision's ResNet is ``(2, 2, 2, 2, 2)``;
            a stride of 1 at the max-pool drops the pool, which keeps a finer map for dense
            heads (segmentation, detection of lesions a few voxels across).
        stem_kernel: in-plane size of the stem convolution (7 in torchvision; 3 for a
            U-Net-like stem that keeps small structures).
        norm: ``batch`` (torchvision, inflatable from ImageNet weights) or ``instance``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        in_chans: int = 1,
        width: int = 64,
        z_kernel: int = 3,
        z_strides: Sequence[int] = (2, 2, 2, 2, 1),
        xy_strides: Sequence[int] = (2, 2, 2, 2, 2),
        stem_kernel: int = 7,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        for name, strides in (("z_strides", z_strides), ("xy_strides", xy_strides)):
            if len(strides) != 5 or any(s not in (1, 2) for s in strides):
                raise ValueError(f"{name} needs 5 values of 1 or 2, got {strides!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd and >= 1, got {stem_kernel}")
        blk = _BLOCKS[block]
        self.in_chans = in_chans
        self.z_kernel = z_kernel
        self.z_strides = tuple(int(s) for s in z_strides)
        self.xy_strides = tuple(int(s) for s in xy_strides)
        self.strides: list[Int3] = [(x, x, z) for x, z in zip(self.xy_strides, self.z_strides, strict=True)]
        self.patch_size = tuple(math.prod(s[a] for s in self.strides) for a in range(3))  # type: ignore[assignment]
        self.token_offset = (0.0, 0.0, 0.0)  # output i is centred on input index i * stride
        self.conv1 = _conv(in_chans, width, stem_kernel, self.strides[0], z_kernel)
        self.bn1 = _norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        # a pool of stride 1 would only blur: it is left out
        self.maxpool = (nn.MaxPool3d(kernel_size=3, stride=self.strides[1], padding=1)
                        if self.strides[1] != (1, 1, 1) else nn.Identity())
        cin = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            stride = (1, 1, 1) if i == 0 else self.strides[i + 1]
            blocks = []
            for j in range(n):
                blocks.append(blk(cin, planes, stride if j == 0 else (1, 1, 1), z_kernel, norm))
                cin = planes * blk.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embed_dim = cin
        self.stage_dims = [width] + [width * 2**i * blk.expansion for i in range(4)]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def token_grid(self, input_shape_xyz: Sequence[int]) -> Int3:
        # every downsampling layer (odd kernel k, padding k // 2, or 1x1 without padding) gives ceil(n / 2)
        grid = [int(n) for n in input_shape_xyz[-3:]]
        for st in self.strides:
            grid = [-(-g // s) for g, s in zip(grid, st, strict=True)]
        return tuple(grid)  # type: ignore[return-value]

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for blk in stage:
            x = maybe_checkpoint(blk, x, enabled=self.grad_checkpointing)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Multi-scale maps: index 0 = stem, 1..4 = layer1..4 (default strides 2, 4, 8, 16, 32 in-plane).

        Returns ``[(B, stage_dims[i], gx_i, gy_i, gz_i) for i in indices]`` (default: all five).
        """
        want = list(range(5)) if indices is None else [i % 5 for i in indices]
        self._check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        outs = {0: x}
        x = self.maxpool(x)
        for i, stage in enumerate(self._stages(), start=1):
            if i > max(want):
                break
            x = self._run_stage(stage, x)
            outs[i] = x
        return [outs[i] for i in want]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B, gx*gy*gz, embed_dim)`` from the last stage."""
        return grid_to_tokens(self.forward_intermediates(x, [4])[0])


_RESNETS = {
    "resnet3d_tiny": (dict(layers=(1, 1, 1, 1), block="basic", width=8), "ResNet 4 basic blocks, width 8: tests"),
    "resnet3d_18": (dict(layers=(2, 2, 2, 2), block="basic"), "I3D ResNet-18 (512-d)"),
    "resnet3d_50": (dict(layers=(3, 4, 6, 3), block="bottleneck"), "I3D ResNet-50 (2048-d)"),
    "resnet3d_152": (dict(layers=(3, 8, 36, 3), block="bottleneck"), "I3D ResNet-152 (2048-d), Merlin's encoder"),
}
for _name, (_kw, _desc) in _RESNETS.items():
    register_encoder(_name, ResNet3D, _desc, **_kw)
