"""Dense decoders over an encoder's intermediate feature maps, built from MONAI blocks.

One decoder family serves every dense output of vol3d: segmentation (``vol3d finetune --task
seg``) and the perception heads of the vision-language model (:mod:`vol3d.models.perception`).
:meth:`SegDecoder.forward_features` gives the full-resolution feature map the heads read.

Three styles:

- ``unetr`` (single-scale encoders such as the ViT, as MONAI's UNETR): taps of
  several blocks, all at the patch grid, are projected up to the resolutions of
  the U-Net levels by chains of transposed convolutions (``UnetrPrUpBlock``'s
  structure), the deepest tap feeds the decoder path, with a full-resolution skip
  from the input volume (``UnetrBasicBlock``);
- ``unet`` (multi-scale encoders such as the ResNet): the encoder's own stage outputs
  are the skip connections of the same path (``UnetrUpBlock``: upsample, then concatenate; with
  ``upsample="linear"`` interpolation instead of its transposed convolution, :class:`InterpolatingUpBlock`);
- ``monai_unet`` (:class:`vol3d.models.unet3d.ResUNetEncoder`): MONAI ``UNet``'s own up path,
  concatenate at the lower resolution, then a transposed convolution (or interpolation and a
  convolution: ``upsample="linear"``) and a ``ResidualUnit``;
  no full-resolution convolution but the last unit (on a CPU the cheapest and, at small
  budgets, the fastest to learn: docs/benchmarks/seg.md).

Anisotropic patches work: every level records its own per-axis up-sampling factor, e.g.
a ``(8, 8, 4)`` ViT patch gives levels with factors ``(2, 2, 1), (2, 2, 2), (2, 2, 2)``;
as in nnU-Net, the axis that needs fewer halvings skips them at the highest resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import (
    Convolution,
    ResidualUnit,
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrUpBlock,
    UpSample,
)
from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer
from torch import nn

from preprocess.errors import ConfigError

Int3 = tuple[int, int, int]
_NORM = "instance"
UPSAMPLING = ("transposed", "linear")


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def level_factors(total_stride: Sequence[int]) -> list[Int3]:
    """Per-level up-sampling factors whose product is ``total_stride`` per axis.

    Level ``l`` goes from resolution ``l + 1`` to ``l`` (0 = full resolution). An axis
    with fewer prime factors gets factor 1 at the shallow levels.
    """
    per_axis = [sorted(_prime_factors(int(s)), reverse=True) for s in total_stride]
    depth = max((len(f) for f in per_axis), default=0)
    padded = [[1] * (depth - len(f)) + f[::-1] for f in per_axis]  # shallow levels first
    return [tuple(int(padded[a][lvl]) for a in range(3)) for lvl in range(depth)]  # type: ignore[misc]


def _level_channels(feature_size: int, levels: int) -> list[int]:
    """Decoder width per level: doubling from ``feature_size``, capped at 8x (UNETR's deepest width)."""
    return [feature_size * min(2**lvl, 8) for lvl in range(levels)]


STYLES = ("unetr", "unet", "monai_unet")


class UNetPath(nn.Module):
    """The decoder path: from the deepest map up through skips at levels ``L-1 .. 0``.

    Args:
        skip_channels: channels of the skip at each level ``0..L-1`` (projected by a 1x1x1
            convolution when it differs from the level's decoder width, see :func:`_level_channels`).
        deep_channels: channels of the deepest map (level ``L``).
        factors: up-sampling factor ``(fx, fy, fz)`` from level ``l + 1`` to ``l``, per level.
        feature_size: decoder width at full resolution (the channels of the output map).
    """

    def __init__(self, skip_channels: Sequence[int], deep_channels: int, factors: Sequence[Int3],
                 feature_size: int, upsample: str = "transposed") -> None:
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ConfigError(f"decoder up-sampling must be one of {UPSAMPLING}, got {upsample!r}")
        if len(skip_channels) != len(factors):
            raise ValueError(f"{len(skip_channels)} skips need {len(skip_channels)} factors, got {len(factors)}")
        widths = _level_channels(feature_size, len(factors))
        self.project = nn.ModuleList(
            nn.Identity() if c == w else get_conv_layer(3, c, w, kernel_size=1, norm=_NORM, conv_only=False)
            for c, w in zip(skip_channels, widths, strict=True)
        )
        ups, cin = [], deep_channels
        for lvl in reversed(range(len(factors))):
            ups.append(UnetrUpBlock(3, cin, widths[lvl], kernel_size=3, upsample_kernel_size=factors[lvl],
                                    norm_name=_NORM, res_block=True) if upsample == "transposed"
                       else InterpolatingUpBlock(cin, widths[lvl], factors[lvl]))
            cin = widths[lvl]
        self.ups = nn.ModuleList(ups)

    def forward(self, skips: Sequence[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
        """``skips[l]`` ``(B, C_l, ...)`` at level ``l``, ``deep`` at level ``L`` -> features
        ``(B, feature_size, X, Y, Z)`` at level 0."""
        x = deep
        for up, lvl in zip(self.ups, reversed(range(len(self.project))), strict=True):
            x = up(x, self.project[lvl](skips[lvl]))
        return x


class InterpolatingUpBlock(nn.Module):
    """MONAI's ``UnetrUpBlock`` (up-sample, concatenate the skip, a residual block) with its transposed
    convolution replaced by a 1x1x1 convolution and trilinear interpolation (MONAI's ``UpSample``): a
    constant map stays constant, where the transposed convolution (kernel = stride here) stamps its
    kernel's pattern on every block of voxels it makes (see :class:`MonaiUNetPath` for the overlapping
    kind)."""

    def __init__(self, cin: int, cout: int, factor: Int3) -> None:
        super().__init__()
        self.up = UpSample(3, cin, cout, scale_factor=factor, mode="nontrainable", pre_conv="default",
                           interp_mode="trilinear", align_corners=False)
        self.conv_block = UnetResBlock(3, 2 * cout, cout, kernel_size=3, stride=1, norm_name=_NORM)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), skip], dim=1))


class MonaiUNetPath(nn.Module):
    """MONAI ``UNet``'s up path over an encoder's maps ``m_0 .. m_L`` (shallow to deep).

    The deepest map and the one before it share a stride (MONAI's bottom layer does not
    downsample). Going up, level ``l`` concatenates ``m_l`` with what came from below at the
    same resolution, then a transposed convolution (with norm and PReLU) brings it to the
    resolution of ``m_{l-1}`` (of the input for ``l = 0``) with ``m_{l-1}``'s channels
    (``feature_size`` at the top), followed by a one-unit ``ResidualUnit``, as MONAI builds it.

    With ``stem_channels``, the top unit also reads a full-resolution map of that many channels
    (:class:`SegDecoder`'s input stem), concatenated to the output of the last up-sampling.

    ``upsample="linear"`` replaces each transposed convolution by MONAI's ``UpSample`` without
    trainable up-sampling: a 1x1x1 convolution to the new width, trilinear interpolation, then a
    3x3x3 convolution with the same norm and PReLU. A transposed convolution whose kernel overlaps
    unevenly (3 at stride 2) turns a constant map into one that alternates voxel by voxel, and the
    instance norms after it scale that up: an empty volume's maps become a pattern the heads can
    read as findings. Interpolation keeps a constant map constant away from the borders; alone it
    did not make every model read an empty volume as empty and its boxes were looser (round 19);
    with replicate padding (``Vol3DConfig.conv_padding``) a constant volume reads the same at every
    voxel and the boxes held, so ``tiny_cpu`` uses both (docs/benchmarks/quality.md, round 20).

    Args:
        channels: channels of ``m_0 .. m_L``.
        factors: up-sampling factor from ``m_l``'s resolution to the one above, ``l = 0 .. L - 1``
            (``factors[0]``: from ``m_0`` to the input).
        feature_size: channels of the full-resolution output map.
        stem_channels: channels of the full-resolution map the top unit reads too (0: none).
        upsample: ``transposed`` (MONAI's UNet) or ``linear`` (:data:`UPSAMPLING`).
    """

    def __init__(self, channels: Sequence[int], factors: Sequence[Int3], feature_size: int,
                 stem_channels: int = 0, upsample: str = "transposed") -> None:
        super().__init__()
        if len(factors) != len(channels) - 1:
            raise ValueError(f"{len(channels)} maps need {len(channels) - 1} factors, got {len(factors)}")
        if upsample not in UPSAMPLING:
            raise ConfigError(f"decoder up-sampling must be one of {UPSAMPLING}, got {upsample!r}")
        ups, below = [], channels[-1]
        for lvl in reversed(range(len(factors))):
            cout = channels[lvl - 1] if lvl > 0 else feature_size
            extra = stem_channels if lvl == 0 else 0
            ups.append(nn.ModuleList([
                _up(channels[lvl] + below, cout, factors[lvl], upsample),
                # the top unit ends in a plain convolution, as MONAI's: the heads read linear features
                ResidualUnit(3, cout + extra, cout, strides=1, kernel_size=3, subunits=1, last_conv_only=lvl == 0),
            ]))
            below = cout
        self.ups = nn.ModuleList(ups)

    def forward(self, maps: Sequence[torch.Tensor], stem: torch.Tensor | None = None) -> torch.Tensor:
        """``maps[l]`` ``(B, channels[l], ...)`` (and the stem's full-resolution map) -> features
        ``(B, feature_size, X, Y, Z)`` at full resolution."""
        x = maps[-1]
        for (upsample, unit), lvl in zip(self.ups, reversed(range(len(self.ups))), strict=True):
            x = upsample(torch.cat([maps[lvl], x], dim=1))
            if lvl == 0 and stem is not None:
                x = torch.cat([x, stem], dim=1)
            x = unit(x)
        return x


def _up(cin: int, cout: int, factor: Int3, upsample: str) -> nn.Module:
    """One up-sampling step of :class:`MonaiUNetPath` by ``factor``, to ``cout`` channels with norm and PReLU."""
    if upsample == "transposed":
        return Convolution(3, cin, cout, strides=factor, kernel_size=3, is_transposed=True)
    return UpSample(3, cin, cout, scale_factor=factor, mode="nontrainable", pre_conv="default",
                    interp_mode="trilinear", align_corners=False,
                    post_conv=Convolution(3, cout, cout, strides=1, kernel_size=3))


def _project_up(cin: int, cout: int, factors: Sequence[Int3]) -> nn.Sequential:
    """Transposed-convolution chain from the patch grid up by ``factors`` (deepest first).

    The structure of MONAI's ``UnetrPrUpBlock(conv_block=True, res_block=True)``, with a
    per-step factor so anisotropic patches work.
    """
    steps: list[nn.Module] = [get_conv_layer(3, cin, cout, kernel_size=factors[0], stride=factors[0],
                                             conv_only=True, is_transposed=True)]
    for f in factors[1:]:
        steps.append(nn.Sequential(
            get_conv_layer(3, cout, cout, kernel_size=f, stride=f, conv_only=True, is_transposed=True),
            UnetResBlock(3, cout, cout, kernel_size=3, stride=1, norm_name=_NORM),
        ))
    return nn.Sequential(*steps)


class SegDecoder(nn.Module):
    """Decoder over ``forward_intermediates`` maps (see the module docstring).

    :meth:`forward_features` gives the full-resolution feature map every dense head reads;
    :meth:`forward` adds segmentation logits when ``num_classes`` is set.

    Args:
        style: ``unetr``, ``unet`` or ``monai_unet`` (:data:`STYLES`).
        in_chans: channels of the input volume (full-resolution skip of ``unetr``/``unet``).
        feature_channels: channels of each intermediate map, shallow to deep.
        factors: per-level up-sampling factors. ``unetr``/``unet``: ``len = number of levels L``,
            ``unetr`` needs ``L`` maps (levels ``1..L``), ``unet`` one map per level ``1..L``;
            ``monai_unet``: one per map but the deepest (:class:`MonaiUNetPath`).
        feature_size: decoder width at full resolution.
        num_classes: output classes of :meth:`forward` (None: features only).
        stem: ``monai_unet`` only: a full-resolution stem on the input volume (``UnetrBasicBlock``, two
            3x3x3 convolutions to ``feature_size`` channels, as the other styles' input skip) that the
            top unit reads beside the up-sampled features, so decisions about single voxels (a
            lesion's edge, a small lesion) see the input at its own resolution; MONAI's UNet has no
            full-resolution map. It costs time on every voxel (docs/benchmarks/quality.md, round 12).
        upsample: ``monai_unet`` and ``unet``: ``transposed`` (MONAI's) or ``linear`` (:class:`MonaiUNetPath`,
            :class:`InterpolatingUpBlock`); ``unetr`` keeps its transposed convolutions (a ViT's position
            embeddings make an empty volume's tokens differ across it whatever the up path does).
    """

    def __init__(self, style: str, in_chans: int, feature_channels: Sequence[int], factors: Sequence[Int3],
                 feature_size: int, num_classes: int | None = None, stem: bool = False,
                 upsample: str = "transposed") -> None:
        super().__init__()
        if style not in STYLES:
            raise ConfigError(f"decoder style must be one of {STYLES}, got {style!r}")
        if stem and style != "monai_unet":
            raise ConfigError(f"a decoder stem applies to monai_unet decoders (the resunet3d_* encoders); this "
                              f"one is {style}, which has its own full-resolution skip: leave the stem off")
        if upsample != "transposed" and style == "unetr":
            raise ConfigError(f"decoder up-sampling {upsample!r} applies to monai_unet and unet decoders (the "
                              f"resunet3d_* and resnet3d_* encoders); this one is unetr (a ViT): leave it at "
                              f"'transposed'")
        self.style = style
        self.feature_size = feature_size
        # the full-resolution map of the input: the unet/unetr skip, or the monai_unet stem
        self.input_block: nn.Module | None = None
        if stem or style != "monai_unet":
            self.input_block = UnetrBasicBlock(3, in_chans, feature_size, kernel_size=3, stride=1,
                                               norm_name=_NORM, res_block=True)
        if style == "monai_unet":
            self.lift = nn.ModuleList()
            self.path: nn.Module = MonaiUNetPath(feature_channels, factors, feature_size,
                                                 feature_size if stem else 0, upsample)
        else:
            levels = len(factors)
            if len(feature_channels) != levels:
                raise ValueError(f"{levels} levels need {levels} feature maps, got {len(feature_channels)}")
            widths = _level_channels(feature_size, levels)
            if style == "unetr":
                # level l (1..L-1) is reached from the patch grid by the factors of levels L-1 .. l
                self.lift = nn.ModuleList(
                    _project_up(feature_channels[lvl - 1], widths[lvl], list(factors[lvl:])[::-1])
                    for lvl in range(1, levels)
                )
                skip_channels = [feature_size, *widths[1:]]
            else:
                self.lift = nn.ModuleList(nn.Identity() for _ in range(1, levels))
                skip_channels = [feature_size, *feature_channels[:-1]]
            self.path = UNetPath(skip_channels, feature_channels[-1], factors, feature_size, upsample)
        self.out = UnetOutBlock(3, feature_size, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x`` ``(B, C, X, Y, Z)`` and its intermediate maps -> features ``(B, feature_size, X, Y, Z)``."""
        if self.style == "monai_unet":
            return self.path(features, None if self.input_block is None else self.input_block(x))
        assert self.input_block is not None
        skips = [self.input_block(x)] + [lift(f) for lift, f in zip(self.lift, features[:-1], strict=True)]
        return self.path(skips, features[-1])

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x`` ``(B, C, X, Y, Z)`` and its intermediate maps -> logits ``(B, K, X, Y, Z)``."""
        if self.out is None:
            raise ConfigError("this decoder was built without num_classes: use forward_features")
        return self.out(self.forward_features(x, features))


def probe_features(encoder: nn.Module, indices: Sequence[int] | None) -> tuple[list[int], list[Int3]]:
    """Channels and total strides ``(sx, sy, sz)`` of ``encoder.forward_intermediates(x, indices)``.

    Runs one forward pass at twice the smallest valid input (``encoder.patch_size``: instance
    norm needs more than one voxel in the deepest map) in eval mode, so batch-norm
    statistics are untouched.
    """
    probe = tuple(2 * int(p) for p in encoder.patch_size)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, encoder.in_chans, *probe, device=next(encoder.parameters()).device)
            maps = encoder.forward_intermediates(x, indices)
    finally:
        encoder.train(was_training)
    channels = [int(m.shape[1]) for m in maps]
    strides = [tuple(p // int(n) for p, n in zip(probe, m.shape[2:], strict=True)) for m in maps]
    return channels, strides  # type: ignore[return-value]


def vit_taps(depth: int, levels: int) -> list[int]:
    """Blocks tapped for ``levels`` UNETR levels, evenly spread and ending with the last
    (12 blocks, 4 levels -> blocks 3, 6, 9, 12 as in UNETR; 0-based ``[2, 5, 8, 11]``)."""
    return [max(0, round(depth * lvl / levels) - 1) for lvl in range(1, levels + 1)]


def _nested_factors(strides: Sequence[Int3], what: str) -> list[Int3]:
    """Per-map up-sampling factors ``stride_l / stride_{l-1}`` (the input has stride 1)."""
    prev: Int3 = (1, 1, 1)
    factors = []
    for s in strides:
        if any(b % a for a, b in zip(prev, s, strict=True)):
            raise ConfigError(f"encoder strides {list(strides)} are not nested; the {what} decoder cannot use them")
        factors.append(tuple(b // a for a, b in zip(prev, s, strict=True)))  # type: ignore[arg-type]
        prev = s
    return factors


def build_decoder(encoder: nn.Module, style: str, in_chans: int, patch_size: Sequence[int], feature_size: int,
                  num_classes: int | None, indices: Sequence[int] = (), stem: bool = False,
                  upsample: str = "transposed") -> tuple[SegDecoder, list[int] | None]:
    """The decoder for ``encoder`` and the ``forward_intermediates`` indices it consumes.

    ``style="auto"`` picks ``monai_unet`` for an encoder whose two deepest maps share a stride
    (:class:`~vol3d.models.unet3d.ResUNetEncoder`), ``unetr`` when every map has the same stride
    (a plain ViT) and ``unet`` otherwise. ``patch_size`` must be a multiple of the deepest
    stride, so every window maps onto whole feature voxels. ``stem`` and ``upsample``: a
    full-resolution stem (``monai_unet``) and the up-sampling (``monai_unet``, ``unet``) (:class:`SegDecoder`).
    """
    channels, strides = probe_features(encoder, None)
    single_scale = len(set(strides)) == 1
    bottom = len(strides) >= 2 and strides[-1] == strides[-2] and not single_scale
    if style == "auto":
        style = "unetr" if single_scale else ("monai_unet" if bottom else "unet")
    if style == "unetr" and not single_scale:
        raise ConfigError(f"decoder unetr needs a single-scale encoder (ViT); this one has strides {strides}: use unet")
    if style in ("unet", "monai_unet") and single_scale:
        raise ConfigError(f"decoder {style} needs a multi-scale encoder; this one is single-scale: use unetr")
    if style == "monai_unet" and not bottom:
        raise ConfigError(f"decoder monai_unet needs an encoder whose deepest stage does not downsample "
                          f"(MONAI UNet's bottom layer, e.g. resunet3d_*); these strides are {strides}: use unet")
    deepest = strides[-1]
    bad = [p for p, s in zip(patch_size, deepest, strict=True) if p % s]
    if bad:
        raise ConfigError(f"model.patch_size {tuple(patch_size)} must be a multiple of the encoder's total stride "
                          f"{deepest} along every axis")
    if style != "unetr" and indices:
        raise ConfigError("model.intermediate_indices applies to unetr decoders only; leave it empty")
    if style == "unetr":
        factors = level_factors(deepest)
        if not factors:
            raise ConfigError("the encoder's patch size is 1 voxel: there is nothing for a UNETR decoder to upsample")
        taps = list(indices) if indices else vit_taps(int(getattr(encoder, "depth", 1)), len(factors))
        if len(taps) != len(factors):
            raise ConfigError(f"model.intermediate_indices needs {len(factors)} blocks for patch stride {deepest}, "
                              f"got {list(indices)}")
        dim = int(channels[-1])
        return SegDecoder("unetr", in_chans, [dim] * len(taps), factors, feature_size, num_classes, stem,
                          upsample), taps
    if style == "monai_unet":
        factors = _nested_factors(strides[:-1], style)
        return SegDecoder(style, in_chans, channels, factors, feature_size, num_classes, stem, upsample), None
    return SegDecoder("unet", in_chans, channels, _nested_factors(strides, style), feature_size, num_classes,
                      stem, upsample), None
