"""Building blocks shared by the 3D encoders, reducers and the vision-language model.

Tensor layout everywhere: volumes ``(B, C, X, Y, Z)`` (RAS+ cached order, see
``preprocess/geometry.py``), token sequences ``(B, N, D)`` in grid order, i.e. the
C-order flattening of a ``(gx, gy, gz)`` grid (``z`` fastest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from preprocess.errors import ConfigError
from vol3d.attention import Backend, attention
from vol3d.models.config import CONV_PADDING

Int3 = tuple[int, int, int]


def to_3tuple(v: int | Sequence[int]) -> Int3:
    """``4 -> (4, 4, 4)``; a length-3 sequence is returned as a tuple of ints."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints (x, y, z), got {v!r}")
    return t  # type: ignore[return-value]


# ----------------------------------------------------------------------------- token geometry


def grid_centres(
    grid: Sequence[int], stride: Sequence[float], offset: Sequence[float], input_shape: Sequence[int]
) -> torch.Tensor:
    """Token centres in normalised input coordinates, ``(gx*gy*gz, 3)`` in grid order.

    Token ``i`` along an axis is centred on input index ``i * stride + offset``. As in
    :func:`preprocess.geometry.normalise_boxes`, the continuous index range
    ``[-0.5, n - 0.5]`` maps onto ``[0, 1]``, so the centre becomes ``(c + 0.5) / n``.
    """
    axes = [
        (torch.arange(g, dtype=torch.float32) * s + o + 0.5) / n
        for g, s, o, n in zip(grid, stride, offset, input_shape[-3:], strict=True)
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, 3).clamp(0.0, 1.0)


def tokens_to_grid(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, N, D)`` tokens in grid order -> ``(B, D, gx, gy, gz)`` feature map."""
    gx, gy, gz = grid
    return rearrange(tokens, "b (x y z) d -> b d x y z", x=gx, y=gy, z=gz)


def grid_to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """``(B, D, gx, gy, gz)`` feature map -> ``(B, N, D)`` tokens in grid order."""
    return rearrange(fmap, "b d x y z -> b (x y z) d")


def fourier_features(positions: torch.Tensor, num_bands: int) -> torch.Tensor:
    """Sin/cos features of normalised positions: ``(..., 3) -> (..., 6 * num_bands)``.

    Frequencies ``pi * 2**k``: the lowest resolves the whole volume, the highest about
    ``1 / 2**num_bands`` of it, which is finer than any token grid we produce.
    """
    freqs = math.pi * (2.0 ** torch.arange(num_bands, device=positions.device, dtype=positions.dtype))
    ang = positions[..., None] * freqs  # (..., 3, F)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- transformer blocks


class Mlp(nn.Module):
    """Two-layer perceptron with GELU: ``(..., dim) -> (..., out_dim)``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention through :func:`vol3d.attention.attention` (SDPA or xformers)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 backend: Backend = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.backend: Backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        q, k, v = rearrange(self.qkv(x), "b n (t h d) -> t b h n d", t=3, h=self.num_heads)
        out = attention(q, k, v, self.backend, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or with ``p == 0``)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 backend: Backend = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def maybe_checkpoint(fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run ``fn(*args)``, recomputing it in backward when ``enabled`` and grads are needed.

    Non-reentrant checkpointing: works with frozen inputs, keyword-free modules and
    nested autocast, and gives the same gradients as the plain call.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------- 3D convolution


class Conv3dSlicePad(nn.Conv3d):
    """``Conv3d`` with zero padding in-plane (X, Y) and *replicate* padding across slices (Z).

    Why: a 2D network inflated to 3D (:mod:`vol3d.models.inflate`) then maps a stack
    of identical slices to exactly the 2D features at every depth, including the
    first and last slices; zero padding along Z would darken the ends of the volume.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Int3, stride: Int3 = (1, 1, 1),
                 bias: bool = False) -> None:
        kx, ky, kz = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(kx // 2, ky // 2, 0), bias=bias)
        self.z_pad = kz // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.z_pad:
            x = F.pad(x, (self.z_pad, self.z_pad, 0, 0, 0, 0), mode="replicate")
        return super().forward(x)


def set_conv_padding(module: nn.Module, mode: str) -> int:
    """Pad every padded ``Conv3d`` under ``module`` with ``mode`` (``zeros`` or ``replicate``; transposed
    convolutions only pad with zeros and keep it); returns how many were set.

    Why replicate: with zero padding a constant map that is not zero (a bias carried by a residual
    branch) gets borders unlike its inside, and every instance norm after it scales that difference up
    to unit variance, so an empty volume's deepest maps hold a pattern the heads can read. With the
    border voxel repeated a constant map stays constant at every layer. The mode is not saved in the
    weights: the model's config carries it (``Vol3DConfig.conv_padding``).
    """
    if mode not in CONV_PADDING:
        raise ConfigError(f"conv_padding must be one of {CONV_PADDING}, got {mode!r}")
    n = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d) and (conv.padding == "same" if isinstance(conv.padding, str) else any(conv.padding)):
            conv.padding_mode = mode
            n += 1
    return n


def _channels_last_input(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    x = args[0]
    if x.ndim == 5 and not x.is_contiguous(memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return (x, *args[1:])


def use_channels_last(module: nn.Module) -> int:
    """Run the 3D convolutions under ``module`` in channels-last memory order (N, X, Y, Z, C); returns how
    many. Their weights are converted in place (the parameters stay the same objects, so an optimizer
    built before or after sees them) and each convolution converts its input, which is a no-op once
    the activations are channels-last. The same arithmetic up to float rounding. Why: oneDNN's 3D
    convolutions on CPU skip their layout conversions this way; the CPU demo's perception steps took
    26% less (docs/benchmarks/quality.md, round 24). Calling it again changes nothing."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    for conv in convs:
        if getattr(conv, "_channels_last", False):
            continue
        for p in conv.parameters(recurse=False):
            if p.ndim == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        conv.register_forward_pre_hook(_channels_last_input)
        conv._channels_last = True
    return len(convs)


# ----------------------------------------------------------------------------- encoder interface


class VolumeEncoder(nn.Module):
    """Interface shared by every 3D encoder (ViT, ResNet, ...).

    Subclasses set ``embed_dim``, ``in_chans`` and ``patch_size`` (the total stride of
    the token grid in voxels, per axis) and implement :meth:`forward_features`,
    :meth:`forward_intermediates`, :meth:`token_grid` and :meth:`no_weight_decay`.
    """

    embed_dim: int
    in_chans: int
    patch_size: Int3
    #: input index of the centre of token 0 along each axis (receptive-field centre)
    token_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grad_checkpointing: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B, N, D)`` tokens in grid order."""
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Feature maps ``[(B, D_i, gx_i, gy_i, gz_i), ...]`` for segmentation decoders."""
        raise NotImplementedError

    def token_grid(self, input_shape_xyz: Sequence[int]) -> Int3:
        """Token grid ``(gx, gy, gz)`` produced for an input of spatial shape ``(X, Y, Z)``."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names that an optimiser should not decay (norms, biases, embeddings)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in backward to save activation memory."""
        self.grad_checkpointing = enable

    def token_positions(self, input_shape_xyz: Sequence[int]) -> torch.Tensor:
        """Token centres ``(N, 3)`` in normalised input coordinates ``[0, 1]``, grid order."""
        return grid_centres(self.token_grid(input_shape_xyz), self.patch_size, self.token_offset,
                            input_shape_xyz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects a volume (B, {self.in_chans}, X, Y, Z), got shape "
                f"{tuple(x.shape)}; build the encoder with in_chans={x.shape[1] if x.ndim == 5 else '?'} "
                "to match the cache's channels"
            )
