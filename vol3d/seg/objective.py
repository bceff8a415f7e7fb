"""The segmentation :class:`~vol3d.train.objectives.Objective`: DiceCE on patches, Dice/HD95 on volumes.

Patches come from :class:`vol3d.data.cache.CacheDataset` in patch mode with the
``label`` sampler (label-balanced: a share of patches is centred on a labelled
voxel); validation runs MONAI sliding-window inference over whole cached volumes
and scores each class with :func:`vol3d.eval.metrics.dice_hd95_per_class`
(nnU-Net's rule: a class absent from both prediction and truth is NaN, skipped by
the means).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vol3d.seg.config import InferConfig, SegLossConfig


class SegObjective:
    """DiceCE training on labelled patches and sliding-window validation.

    Args:
        class_names: output classes, index = label value (0 = background).
        roi_size: sliding-window ROI ``(X, Y, Z)`` (the training patch size).
        loss: Dice / CE weights.
        infer: sliding-window settings for :meth:`validate`.
    """

    def __init__(self, class_names: Sequence[str], roi_size: Sequence[int], loss: SegLossConfig | None = None,
                 infer: InferConfig | None = None) -> None:
        from monai.losses import DiceCELoss

        self.class_names = list(class_names)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.loss_cfg = loss or SegLossConfig()
        self.infer = infer or InferConfig()
        self.loss_fn = DiceCELoss(include_background=self.loss_cfg.include_background, to_onehot_y=True,
                                  batch=self.loss_cfg.batch_dice,
                                  softmax=True, lambda_dice=self.loss_cfg.dice, lambda_ce=self.loss_cfg.ce)

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        """Patches -> ``image (B, C, X, Y, Z)`` float32, ``label (B, 1, X, Y, Z)`` int64."""
        image = torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items])
        label = torch.stack([torch.as_tensor(it["label"], dtype=torch.int64) for it in items])[:, None]
        too_high = int(label.max())
        if too_high >= len(self.class_names):
            raise ValueError(f"a patch of case {items[0].get('id')} has label value {too_high}, but the model has "
                             f"{len(self.class_names)} classes {self.class_names}; set model.class_names")
        return {"image": image, "label": label}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """DiceCE of the logits against the label (computed in fp32 under autocast)."""
        logits = model(batch["image"])
        loss = self.loss_fn(logits.float(), batch["label"])
        fg = (batch["label"] > 0).float().mean()
        return loss, {"label_fraction": fg.detach()}

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]:
        """Per-class Dice/HD95 (cached grid, mm) over whole volumes, NaN-aware means.

        Returns ``dice_mean``, ``hd95_mean`` and ``dice/<class>``, ``hd95/<class>``.
        """
        from vol3d.eval.metrics import aggregate_segmentation
        from vol3d.seg.inference import segment

        per_case = []
        for i in range(len(items)):
            item = items[i]
            if not item.get("has_label", True):
                continue
            pred = segment(model, item["image"], self.roi_size, self.infer)
            per_case.append(score(pred, np.asarray(item["label"]), self.class_names, np.asarray(item["spacing"])))
        if not per_case:
            return {}
        agg = aggregate_segmentation(per_case)
        out = {"dice_mean": agg["mean_dice"], "hd95_mean": agg["mean_hd95"]}
        out.update({f"dice/{k}": v for k, v in agg["dice"].items()})
        out.update({f"hd95/{k}": v for k, v in agg["hd95"].items()})
        return out


def score(pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str], spacing: Sequence[float]) -> dict[str, Any]:
    """Dice and HD95 (mm) of every foreground class of two label maps ``(X, Y, Z)``."""
    from vol3d.eval.metrics import dice_hd95_per_class

    classes = {name: k for k, name in enumerate(class_names) if k > 0}
    return dice_hd95_per_class(pred, truth, classes, spacing)
