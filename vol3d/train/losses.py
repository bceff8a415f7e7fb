"""Loss functions shared by the training objectives.

Boxes are ``(x0, y0, z0, x1, y1, z1)`` as everywhere in vol3d (see
:mod:`preprocess.geometry`); the box losses work in any frame (voxels, mm, or the
0..1 normalised model-input frame the box head predicts in), as long as
prediction and target share it. IoU is intersection volume over union volume,
exactly as :func:`preprocess.geometry.box_iou` (a test holds them together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vol3d.models.box_ops import box_iou_3d, box_iou_giou_3d

__all__ = ["box_iou_3d", "box_iou_giou_3d", "box_losses", "clip_infonce", "ehr_bce", "lm_cross_entropy"]


def box_losses(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """L1 and GIoU losses of predicted vs target boxes ``(B, 6)``, averaged over ``mask`` ``(B,)``.

    Samples whose mask is 0 (no box to find) contribute nothing but keep the graph
    connected, so DDP sees a gradient for the box head on every step.
    Returns ``{"box_l1": (), "box_giou": (), "box_iou": ()}`` (IoU detached, for logging).
    """
    pred = pred.float()
    target = target.float()
    if mask is None:
        mask = torch.ones(pred.shape[0], device=pred.device)
    mask = mask.float()
    denom = mask.sum().clamp(min=1.0)
    l1 = (F.l1_loss(pred, target, reduction="none").mean(-1) * mask).sum() / denom
    iou, giou = box_iou_giou_3d(pred, target)
    giou_loss = ((1.0 - giou) * mask).sum() / denom
    return {"box_l1": l1, "box_giou": giou_loss, "box_iou": ((iou * mask).sum() / denom).detach()}


def ehr_bce(logits: Tensor, targets: Tensor, pos_weight: float | None = None) -> Tensor:
    """Multi-label BCE for EHR codes: ``logits (B, K)``, multi-hot ``targets (B, K)`` -> scalar.

    ``pos_weight`` (> 1) up-weights the rare positive labels, as Merlin's phecode head does.
    """
    pw = None if pos_weight is None else torch.full((logits.shape[-1],), float(pos_weight), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pw)


def clip_infonce(vol_embed: Tensor, text_embed: Tensor, logit_scale: Tensor | float = 1 / 0.07,
                 gather: bool = True) -> Tensor:
    """Symmetric CLIP InfoNCE over a batch of paired embeddings ``(B, D), (B, D)`` -> scalar.

    Pair ``i`` is the positive of row/column ``i``; all other batch items are the
    negatives, so the loss needs a batch of at least 2 to mean anything.
    ``logit_scale`` is the inverse temperature (CLIP learns it; a float fixes it).

    Under torchrun (``gather`` and a process group of several ranks) the negatives come from
    every rank: the embeddings are all-gathered with their gradients and each rank scores its
    own rows against all columns, so with DDP's gradient averaging the step equals one process
    with the whole global batch (ranks must use equal local batch sizes).
    """
    v = F.normalize(vol_embed.float(), dim=-1)
    t = F.normalize(text_embed.float(), dim=-1)
    offset = 0
    v_all, t_all = v, t
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            from torch.distributed.nn.functional import all_gather

            v_all, t_all = torch.cat(all_gather(v)), torch.cat(all_gather(t))
            offset = torch.distributed.get_rank() * v.shape[0]
    labels = torch.arange(v.shape[0], device=v.device) + offset
    per_volume = logit_scale * (v @ t_all.T)  # local volumes against every text
    per_text = logit_scale * (t @ v_all.T)
    return 0.5 * (F.cross_entropy(per_volume, labels) + F.cross_entropy(per_text, labels))


def lm_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                     average: str = "token") -> Tensor:
    """Next-token cross-entropy over the labelled (answer) tokens.

    ``logits (B, T, V)`` at position ``t`` predict ``labels (B, T)`` at ``t + 1``;
    ``ignore_index`` marks prompt, volume and padding tokens. A batch without any
    labelled token (e.g. only EHR samples) gives 0 instead of HF's NaN.

    ``average="token"`` weights every answer token alike (HF's loss), so a 150-token
    report outweighs a one-token yes/no answer 150 to 1; ``"sample"`` takes the mean
    over each sample's answer tokens first, then the mean over the samples that have
    any, so every sample (a report, a yes/no, a box) counts the same.
    """
    if average not in ("token", "sample"):
        raise ValueError(f"average must be 'token' or 'sample', got {average!r}")
    shift_labels = labels[:, 1:]
    mask = shift_labels != ignore_index  # (B, T-1)
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift_labels.masked_fill(~mask, 0),
                                reduction="none") * mask  # (B, T-1)
    if average == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(dim=1)  # (B,)
    has = counts > 0
    per_sample = per_token.sum(dim=1) / counts.clamp(min=1)
    return (per_sample * has).sum() / has.sum().clamp(min=1)
