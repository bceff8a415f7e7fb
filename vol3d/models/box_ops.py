"""3D box IoU in torch: what the model's heads and the training losses both need.

Boxes are ``(x0, y0, z0, x1, y1, z1)`` as everywhere in vol3d (:mod:`preprocess.geometry`), in
any frame shared by both sides. IoU is intersection volume over union volume, exactly as
:func:`preprocess.geometry.box_iou` (a test holds them together).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ordered(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper corners ``(N, 3)`` of boxes ``(N, 6)``, whichever way round they were given.

    A regression head can emit ``x0 > x1`` early in training; min/max keeps such a
    box a valid (differentiable) box instead of one with negative volume.
    """
    a, b = boxes[..., :3], boxes[..., 3:]
    return torch.minimum(a, b), torch.maximum(a, b)


def box_iou_giou_3d(pred: Tensor, target: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Paired 3D IoU and generalised IoU of boxes ``(N, 6), (N, 6) -> (N,), (N,)``.

    GIoU (Rezatofighi et al. 2019) is ``IoU - (|C| - |A u B|) / |C|`` with ``C`` the
    smallest box enclosing both; it lies in ``(-1, 1]`` and still has a gradient
    when the boxes do not overlap, which plain IoU lacks.
    """
    p_lo, p_hi = _ordered(pred)
    t_lo, t_hi = _ordered(target)
    vol_p = (p_hi - p_lo).prod(-1)
    vol_t = (t_hi - t_lo).prod(-1)
    inter = (torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo)).clamp(min=0).prod(-1)
    union = vol_p + vol_t - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(p_hi, t_hi) - torch.minimum(p_lo, t_lo)).prod(-1)
    giou = iou - (hull - union) / (hull + eps)
    return iou, giou


def box_iou_3d(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise 3D IoU ``(N, 6), (M, 6) -> (N, M)``; the torch twin of ``preprocess.geometry.box_iou``."""
    n, m = a.shape[0], b.shape[0]
    iou, _ = box_iou_giou_3d(a[:, None].expand(n, m, 6).reshape(-1, 6), b[None].expand(n, m, 6).reshape(-1, 6), eps=0)
    return torch.nan_to_num(iou, nan=0.0).reshape(n, m)
