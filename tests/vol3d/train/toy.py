"""A toy regression task for testing the training loop without the VLM."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vol3d.train.objectives import batched_validation

W_TRUE = np.array([1.5, -2.0, 0.5, 3.0])


def toy_items(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ W_TRUE + 0.5).astype(np.float32)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def toy_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


class ToyObjective:
    """MSE regression; ``make_batch`` jitters x from the per-item RNG so the data path is random too."""

    def __init__(self, jitter: float = 0.01, interrupt_at_call: int | None = None):
        self.jitter = jitter
        self.interrupt_at_call = interrupt_at_call
        self.calls = 0

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        x = np.stack([it["x"] + self.jitter * r.normal(size=4) for it, r in zip(items, rngs, strict=True)])
        y = np.stack([it["y"] for it in items])
        return {"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.as_tensor(y, dtype=torch.float32)}

    def loss(self, model: nn.Module, batch: dict[str, Any]):
        self.calls += 1
        if self.interrupt_at_call is not None and self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        pred = model(batch["x"]).squeeze(-1)
        mse = ((pred - batch["y"]) ** 2).mean()
        return mse, {"mse": mse.detach()}

    def validate(self, model: nn.Module, items) -> dict[str, float]:
        return batched_validation(self, model, items, batch_size=8)
