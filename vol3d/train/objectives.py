"""What a task contributes to the one training loop: an :class:`Objective`.

The loop (:func:`vol3d.train.loop.fit`) is task-agnostic. A task supplies three
things, and nothing else differs between pre-training, report/VQA/grounding/EHR
fine-tuning and (in ``vol3d.seg``) segmentation:

``make_batch(items, rngs) -> dict``
    Turn dataset items (e.g. :class:`vol3d.data.cache.CacheDataset` dicts) into one
    model batch. Runs inside DataLoader workers. ``rngs[i]`` is a NumPy generator
    seeded from the run seed and item ``i``'s global position in the data stream:
    draw every random choice (task, augmentation, patch) from it and the batch is
    reproducible across resume, gradient accumulation and world sizes. Torch's
    global RNG is also re-seeded per batch around this call. Tensors in the
    returned dict (at any nesting depth) are moved to the device by the loop.
``loss(model, batch) -> (loss, logs)``
    Forward pass and scalar loss (under autocast; ``model`` may be DDP-wrapped,
    so call it, do not reach for its methods). ``logs`` maps names to detached
    scalar tensors or floats, averaged over the log window and written as
    ``train/<name>``.
``validate(model, items) -> dict[str, float]``
    Metrics on held-out items (rank 0, ``model.eval()``, ``torch.no_grad()``, RNG
    isolated from training); written as ``val/<name>``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn


@runtime_checkable
class Objective(Protocol):
    """The per-task part of training (see the module docstring)."""

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]: ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]: ...

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]: ...


def batched_validation(objective: Objective, model: nn.Module, items: Any, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Mean of ``objective.loss`` logs over ``items`` in order, with fixed RNGs (a ready-made ``validate``).

    Every batch is weighted by its number of items, so the result does not depend on ``batch_size``.
    """
    device = next(model.parameters()).device
    from vol3d.train.loop import to_device  # local: loop imports this module

    totals: dict[str, float] = {}
    n_total = 0
    for start in range(0, len(items), batch_size):
        chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        rngs = [np.random.default_rng([seed, start + i]) for i in range(len(chunk))]
        batch = to_device(objective.make_batch(chunk, rngs), device)
        loss, logs = objective.loss(model, batch)
        for k, v in {"loss": loss, **logs}.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach() if isinstance(v, Tensor) else v) * len(chunk)
        n_total += len(chunk)
    return {k: v / max(n_total, 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------- vision-language


def main_box(case: dict[str, Any]) -> np.ndarray | None:
    """The largest visible box of a case in the 0..1 model-input frame ``(6,)``, or None.

    The box head sees only pooled volume features, not the prompt, so it is trained
    on one target per case that it can infer from the image alone: the biggest finding.
    """
    from preprocess.geometry import BOX_SCALE, as_boxes, box_volume, normalise_boxes
    from vol3d.tasks import MIN_VISIBLE
    from vol3d.tasks.samples import box_field

    boxes = as_boxes(np.asarray(case.get("boxes_vox", np.zeros((0, 6))), dtype=float))
    visible = np.asarray(box_field(case, "box_visible", np.ones(len(boxes))), dtype=float).reshape(-1)
    boxes = boxes[visible >= MIN_VISIBLE]
    if len(boxes) == 0:
        return None
    shape = tuple(np.shape(case["image"])[-3:])
    return normalise_boxes(boxes[int(np.argmax(box_volume(boxes)))], shape)[0] / BOX_SCALE


class VLMObjective:
    """Instruction tuning of a :class:`vol3d.models.Vol3DModel` on report, VQA, grounding and EHR samples.

    Each item becomes one sample of a task drawn by ``mix`` among those the case has
    ground truth for (:func:`vol3d.tasks.build_samples`), after optional augmentation
    that moves boxes with the image. The loss is a weighted sum (``LossConfig``) of
    LM cross-entropy on answer tokens, EHR-code BCE on every case, L1 + GIoU of the
    box head against the case's largest box, and CLIP InfoNCE of volume vs report.

    Args:
        processor: the model's :class:`~vol3d.models.Vol3DProcessor`.
        mix: task weights (:class:`vol3d.tasks.TaskMix`).
        weights: a :class:`vol3d.train.config.LossConfig`.
        code_vocab: the EHR head's codes (None: no EHR target).
        augment: augmentation of training cases (None: none).
        max_length: token budget per sequence (answers beyond it are truncated).
        val_batch_size: batch size of :meth:`validate`.
    """

    def __init__(self, processor: Any, mix: Any, weights: Any, code_vocab: Any = None, augment: Any = None,
                 max_length: int = 512, val_batch_size: int = 2) -> None:
        self.processor = processor
        self.mix = mix
        self.weights = weights
        self.code_vocab = code_vocab
        self.augment = augment
        self.max_length = max_length
        self.val_batch_size = val_batch_size

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        from vol3d.models.processor import IGNORE_INDEX
        from vol3d.tasks import augment, build_samples

        cases = list(items)  # vol3d.tasks reads CacheDataset items as they are
        if self.augment is not None:
            cases = [augment(c, r, self.augment) for c, r in zip(cases, rngs, strict=True)]
        samples = [build_samples(c, r, self.mix, code_vocab=self.code_vocab)[0]
                   for c, r in zip(cases, rngs, strict=True)]
        enc = self.processor([s.prompt for s in samples], [s.answer for s in samples], max_length=self.max_length)
        for i, s in enumerate(samples):
            if s.task == "ehr":  # no text to learn: the EHR head answers
                enc["labels"][i] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "volume": torch.stack([torch.as_tensor(np.asarray(c["image"]), dtype=torch.float32) for c in cases]),
            **enc,
            "tasks": [s.task for s in samples],
        }
        if self.code_vocab is not None and self.weights.ehr > 0:
            batch["ehr_target"] = torch.stack([torch.from_numpy(self.code_vocab.encode(c.get("codes") or []))
                                               for c in cases])
        if self.weights.box_l1 > 0 or self.weights.box_giou > 0:
            boxes = [main_box(c) for c in cases]
            batch["box_target"] = torch.tensor(np.stack([b if b is not None else np.zeros(6) for b in boxes]),
                                               dtype=torch.float32)
            batch["box_mask"] = torch.tensor([b is not None for b in boxes], dtype=torch.float32)
        if self.weights.contrastive > 0:
            batch["texts"] = [str(c.get("report") or "") for c in cases]
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from vol3d.train.losses import box_losses, clip_infonce, ehr_bce, lm_cross_entropy

        w = self.weights
        out = model(batch["volume"], batch["input_ids"], batch["attention_mask"], texts=batch.get("texts"))
        terms: dict[str, Tensor] = {"lm": lm_cross_entropy(out["logits"], batch["labels"],
                                                            average=getattr(w, "lm_average", "token"))}
        logs: dict[str, Any] = {}
        if "ehr_target" in batch:
            terms["ehr"] = ehr_bce(out["ehr_logits"], batch["ehr_target"], w.ehr_pos_weight)
        if "box_target" in batch:
            box = box_losses(out["box_pred"], batch["box_target"], batch["box_mask"])
            terms["box_l1"], terms["box_giou"] = box["box_l1"], box["box_giou"]
            logs["box_iou"] = box["box_iou"]
        if "texts" in batch and "text_embed" in out:
            scale = out.get("logit_scale", 1.0 / w.temperature)
            terms["contrastive"] = clip_infonce(out["vol_embed"], out["text_embed"], scale)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        logs.update({k: v.detach() for k, v in terms.items()})
        return total, logs

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]:
        """Mean loss terms on ``items`` without augmentation (same task draws every time)."""
        plain = VLMObjective(self.processor, self.mix, self.weights, self.code_vocab, None, self.max_length,
                             self.val_batch_size)
        return batched_validation(plain, model, items, self.val_batch_size)
