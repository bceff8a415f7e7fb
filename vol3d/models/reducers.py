"""Token reducers: from an encoder's token grid to the (fewer) tokens the language model reads.

Every reducer maps ``tokens (B, N, D)`` on a ``(gx, gy, gz)`` grid, with token centres
``positions (N, 3)`` or ``(B, N, 3)``, to ``(tokens (B, M, D_out), positions (B, M, 3))``.
Positions are token centres in normalised input coordinates ``[0, 1]`` per axis (the
continuous index range ``[-0.5, n - 0.5]`` maps onto ``[0, 1]``, as in
``preprocess.geometry.normalise_boxes``), so grounding can still refer to space.
``M`` is fixed by the reducer's configuration (``num_tokens(grid)``), never by the
content, so the number of ``<vol>`` placeholders in a prompt never changes.

- ``none``: all tokens (Merlin feeds its 490 tokens unreduced).
- ``pool``: average pooling to a fixed grid (M3D pools 2048 -> 256 tokens).
- ``perceiver``: learned queries cross-attending to the tokens (RadFM: 32, CT-CHAT: 256).
- ``prune``: content-aware selection to a budget: drop air/background tokens, then keep
  the most salient and least slice-redundant ones (Hulu-Med / HiRED ideas), batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.errors import ConfigError
from vol3d.models.layers import Int3, Mlp, fourier_features, grid_to_tokens, to_3tuple, tokens_to_grid

Reduced = tuple[torch.Tensor, torch.Tensor]


def _batch_positions(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """``(N, 3)`` or ``(B, N, 3)`` -> ``(B, N, 3)``."""
    return positions.unsqueeze(0).expand(batch, -1, -1) if positions.ndim == 2 else positions


class TokenReducer(nn.Module):
    """Base class; ``out_dim`` is the width of the returned tokens."""

    out_dim: int

    def num_tokens(self, grid: Sequence[int]) -> int:
        """Number of tokens ``M`` returned for an encoder grid ``(gx, gy, gz)``."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, grid: Sequence[int],
                volume: torch.Tensor | None = None) -> Reduced:
        raise NotImplementedError


class IdentityReducer(TokenReducer):
    """Keeps every token (``M = gx * gy * gz``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def num_tokens(self, grid: Sequence[int]) -> int:
        return math.prod(grid)

    def forward(self, tokens, positions, grid, volume=None) -> Reduced:
        return tokens, _batch_positions(positions, tokens.shape[0])


class PoolReducer(TokenReducer):
    """Adaptive average pooling of the token grid to ``out_grid`` (M3D-like).

    The positions are pooled by the same operator, so each output position is exactly
    the mean of the centres of the tokens it averages.
    """

    def __init__(self, dim: int, out_grid: int | Sequence[int] = (8, 8, 4)) -> None:
        super().__init__()
        self.out_dim = dim
        self.out_grid: Int3 = to_3tuple(out_grid)

    def num_tokens(self, grid: Sequence[int]) -> int:
        return math.prod(self.out_grid)

    def forward(self, tokens, positions, grid, volume=None) -> Reduced:
        pos = _batch_positions(positions, tokens.shape[0]).to(tokens.dtype)
        pooled = F.adaptive_avg_pool3d(tokens_to_grid(tokens, grid), self.out_grid)
        pooled_pos = F.adaptive_avg_pool3d(tokens_to_grid(pos, grid), self.out_grid)
        return grid_to_tokens(pooled), grid_to_tokens(pooled_pos).float()


class _CrossAttentionLayer(nn.Module):
    """Queries attend to tokens; returns new queries and the head-averaged attention ``(B, M, N)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.num_heads
        q = self.q(self.norm_q(queries)).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, M, d)
        k, v = self.kv(self.norm_kv(tokens)).unflatten(-1, (2, h, -1)).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        # explicit softmax (not SDPA): the weights are needed to locate each query in space;
        # M x N is small (<= 256 queries) so this costs little memory
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(2)
        queries = queries + self.proj(out)
        queries = queries + self.mlp(self.norm_mlp(queries))
        return queries, attn.mean(dim=1)


class PerceiverReducer(TokenReducer):
    """``num_queries`` learned queries cross-attend to the tokens (RadFM / CT-CHAT-like).

    Keys carry a Fourier embedding of the token positions; each output position is
    the attention-weighted mean of token centres in the last layer (where the query looked).
    """

    def __init__(self, dim: int, num_queries: int = 64, depth: int = 2, num_heads: int = 4,
                 pos_bands: int = 6) -> None:
        super().__init__()
        self.out_dim = dim
        self.num_queries = num_queries
        self.pos_bands = pos_bands
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.pos_proj = nn.Linear(6 * pos_bands, dim)
        self.layers = nn.ModuleList(_CrossAttentionLayer(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def num_tokens(self, grid: Sequence[int]) -> int:
        return self.num_queries

    def forward(self, tokens, positions, grid, volume=None) -> Reduced:
        pos = _batch_positions(positions, tokens.shape[0]).to(tokens.device)
        kv = tokens + self.pos_proj(fourier_features(pos.to(tokens.dtype), self.pos_bands))
        q = self.queries.expand(tokens.shape[0], -1, -1)
        attn = None
        for layer in self.layers:
            q, attn = layer(q, kv)
        assert attn is not None, "PerceiverReducer needs depth >= 1"
        return self.norm(q), (attn.detach().float() @ pos.float())


class PruneReducer(TokenReducer):
    """Content-aware token selection to a fixed budget, for any batch size.

    Score per token (higher is kept): z-scored *saliency* (distance of the token from
    the sample's mean token, HiRED-like) plus z-scored *novelty* (1 - cosine similarity
    to the token one step below in Z, Hulu-Med's "drop what the previous slice already
    showed"). Tokens whose patch is mostly air/background (mean input intensity below
    ``air_threshold`` on more than ``1 - min_foreground`` of it) rank after every
    foreground token. The top ``num_tokens`` are returned in grid order.

    Args:
        num_tokens: budget ``M`` (fixed so prompts have a fixed number of ``<vol>`` tokens).
        air_threshold: input intensity below which a voxel is background (the cache scales
            HU -1000..1000 to 0..1, so air is ~0).
        min_foreground: fraction of a token's region that must be foreground.
    """

    def __init__(self, dim: int, num_tokens: int = 256, air_threshold: float = 0.05,
                 min_foreground: float = 0.25, novelty_weight: float = 1.0) -> None:
        super().__init__()
        self.out_dim = dim
        self.budget = num_tokens
        self.air_threshold = air_threshold
        self.min_foreground = min_foreground
        self.novelty_weight = novelty_weight

    def num_tokens(self, grid: Sequence[int]) -> int:
        n = math.prod(grid)
        if self.budget > n:
            raise ConfigError(f"prune reducer budget {self.budget} exceeds the encoder's {n} tokens for grid "
                              f"{tuple(grid)}; lower reducer_params.num_tokens or use a larger input")
        return self.budget

    def foreground_fraction(self, volume: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Fraction of non-air voxels under each token: ``(B, C, X, Y, Z) -> (B, N)``."""
        fg = (volume.float().mean(dim=1, keepdim=True) > self.air_threshold).float()
        return F.adaptive_avg_pool3d(fg, tuple(grid)).flatten(1)

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor, grid: Sequence[int], volume: torch.Tensor | None) -> torch.Tensor:
        """Selection score ``(B, N)``; background tokens are pushed below all others."""
        t = tokens.float()

        def zscore(s: torch.Tensor) -> torch.Tensor:
            return (s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, keepdim=True) + 1e-6)

        saliency = (t - t.mean(dim=1, keepdim=True)).norm(dim=-1)
        g = tokens_to_grid(t, grid)  # (B, D, gx, gy, gz)
        prev = torch.cat([g[..., :1], g[..., :-1]], dim=-1)  # first slice compares with itself
        novelty = 1.0 - F.cosine_similarity(g, prev, dim=1).flatten(1)
        score = zscore(saliency) + self.novelty_weight * zscore(novelty)
        if volume is not None:
            background = self.foreground_fraction(volume, grid) < self.min_foreground
            score = score - background.float() * 1e4
        return score

    def select(self, tokens: torch.Tensor, grid: Sequence[int], volume: torch.Tensor | None) -> torch.Tensor:
        """Indices ``(B, M)`` of the kept tokens, ascending (grid order preserved)."""
        k = self.num_tokens(grid)
        idx = self.scores(tokens, grid, volume).topk(k, dim=1).indices
        return idx.sort(dim=1).values

    def forward(self, tokens, positions, grid, volume=None) -> Reduced:
        idx = self.select(tokens, grid, volume)
        pos = _batch_positions(positions, tokens.shape[0]).to(tokens.device)
        kept = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        return kept, pos.gather(1, idx[..., None].expand(-1, -1, 3)).float()


_REDUCERS: dict[str, type[TokenReducer]] = {
    "none": IdentityReducer,
    "pool": PoolReducer,
    "perceiver": PerceiverReducer,
    "prune": PruneReducer,
}


def list_reducers() -> list[str]:
    """Registered reducer names."""
    return sorted(_REDUCERS)


def create_reducer(name: str, dim: int, **params: Any) -> TokenReducer:
    """Build reducer ``name`` for encoder width ``dim``; ``params`` are its keyword arguments."""
    if name not in _REDUCERS:
        raise ConfigError(f"unknown reducer {name!r}; choose one of {list_reducers()}")
    try:
        return _REDUCERS[name](dim, **params)
    except TypeError as exc:
        raise ConfigError(f"reducer {name!r}: {exc}") from None
