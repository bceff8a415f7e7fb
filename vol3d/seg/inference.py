"""Sliding-window inference on cached-grid volumes and the way back to the original grid.

Inference runs on the cached grid (RAS+ canonical, resampled, cropped: what the model
was trained on) with MONAI's ``sliding_window_inference``; the result is then mapped
onto the original image grid with :func:`preprocess.transforms.to_original`, which
undoes crop/pad, resampling and reorientation exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from preprocess.transforms import Prepared, to_original
from vol3d.seg.config import InferConfig
from vol3d.train.loop import resolve_precision


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """The training loop's ``auto`` precision: bf16 autocast on CUDA cards that support it, nothing elsewhere."""
    dtype = resolve_precision("auto", device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def sliding_window_logits(model: nn.Module, image: torch.Tensor | np.ndarray, roi_size: Sequence[int],
                          infer: InferConfig | None = None) -> torch.Tensor:
    """Blended logits ``(K, X, Y, Z)`` (float32, on the CPU) of a whole volume ``(C, X, Y, Z)``.

    Volumes smaller than ``roi_size`` are padded by MONAI and cropped back.
    """
    from monai.inferers import sliding_window_inference

    infer = infer or InferConfig()
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image)
    x = x.float()[None].to(device)
    with autocast_for(device):
        out = sliding_window_inference(x, tuple(int(r) for r in roi_size), infer.sw_batch_size, model,
                                       overlap=infer.overlap, mode=infer.mode)
    return out[0].float().cpu()


def segment(model: nn.Module, image: torch.Tensor | np.ndarray, roi_size: Sequence[int],
            infer: InferConfig | None = None) -> np.ndarray:
    """Label map uint8 ``(X, Y, Z)`` on the volume's own grid (argmax of the blended logits)."""
    return sliding_window_logits(model, image, roi_size, infer).argmax(0).numpy().astype(np.uint8)


def labels_to_original(logits: torch.Tensor, prepared: Prepared, resample: str = "probs") -> np.ndarray:
    """Cached-grid logits ``(K, X', Y', Z')`` -> label map uint8 ``(X, Y, Z)`` on the original grid.

    ``resample="probs"`` interpolates each class probability linearly onto the original
    grid and takes the argmax there (as nnU-Net does: smooth boundaries when the original
    grid is finer than the cache), one class at a time so memory stays at two original-size
    arrays; ``"labels"`` maps the cached argmax by nearest neighbour (fast). Original voxels
    outside the cached field of view (cropped away) are background.
    """
    frames = prepared.frames
    geom = (frames.affine, frames.to_orig, frames.orig_shape)
    if resample == "labels":
        return to_original(logits.argmax(0).numpy().astype(np.uint8), *geom, order=0)
    if resample != "probs":
        raise ValueError(f"resample must be 'probs' or 'labels', got {resample!r}")
    probs = torch.softmax(logits.float(), dim=0).numpy()
    best = best_p = None
    for k in range(probs.shape[0]):
        p = to_original(probs[k], *geom, order=1, fill=1.0 if k == 0 else 0.0).astype(np.float32)
        if best is None:
            best, best_p = np.zeros(p.shape, np.uint8), p
            continue
        win = p > best_p
        best[win] = k
        best_p = np.where(win, p, best_p)
    assert best is not None
    return best
