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

from vol3d.tasks.samples import BOX_TOKEN


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


def centre_targets(target: Tensor, mask: Tensor, anchors: Tensor, cell: Tensor) -> Tensor:
    """Soft targets over cells ``(Q, N)``: for each query, a Gaussian of one cell's width around
    the centre of every true box of its answer ``target (Q, K, 6)`` (``mask (Q, K)``: real boxes),
    each box weighing alike.

    Neighbouring cells of a true centre are nearly right too; a soft target tells the scores
    so (as CenterNet's Gaussian heat maps do) instead of punishing them as hard as a cell
    across the volume. Every instance gets a peak, so the head needs no notion of their order.
    """
    return _soft_centres(_centre_d2(target, anchors, cell), mask)


def _centre_d2(target: Tensor, anchors: Tensor, cell: Tensor) -> Tensor:
    """Squared distances ``(Q, K, N)``, in cells, from every anchor to the centre of every box of ``target``."""
    centre = (target[..., :3] + target[..., 3:]) / 2  # (Q, K, 3)
    return (((anchors[None, None] - centre[:, :, None]) / cell) ** 2).sum(-1)


def _soft_centres(d2: Tensor, mask: Tensor) -> Tensor:
    """:func:`centre_targets` from the distances of :func:`_centre_d2`."""
    per_box = torch.softmax(-d2 / 2, dim=-1) * mask[..., None]
    return per_box.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def grounding_losses(out: dict[str, Tensor], target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Losses of the grounding head for ``Q`` queries, each with the true boxes of its answer
    ``target (Q, K, 6)`` in 0..1 (``mask (Q, K)`` marks the real ones).

    ``box_centre``: cross-entropy of the cell scores against :func:`centre_targets`;
    ``box_l1`` / ``box_giou``: of the box regressed at the cell nearest each true centre, against
    that box (where it is read once the scores are right); ``box_iou`` (logged): IoU of the box
    each query decodes with the nearest true box of its answer. With no query, every term is a
    zero that keeps the head in the graph (DDP needs a gradient for every parameter).
    """
    from vol3d.train.losses import box_iou_giou_3d, box_losses

    logits, cells = out["box_logits"].float(), out["box_cells"]
    if logits.shape[0] == 0:
        zero = logits.sum() + cells.sum() * 0.0
        return {"box_centre": zero, "box_l1": zero, "box_giou": zero, "box_iou": zero.detach()}
    target, mask = target.float(), mask.bool()
    anchors, cell = out["box_anchors"], out["box_cell"]
    d2 = _centre_d2(target, anchors, cell)
    soft = _soft_centres(d2, mask.float())
    centre = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    q, k = mask.nonzero(as_tuple=True)
    nearest = d2[q, k].argmin(-1)
    box = box_losses(cells[q, nearest], target[q, k])
    iou, _ = box_iou_giou_3d(out["box_pred"].detach()[q].float(), target[q, k])
    best = torch.zeros(len(logits), device=logits.device).scatter_reduce(0, q, iou, reduce="amax")
    return {"box_centre": centre, "box_l1": box["box_l1"], "box_giou": box["box_giou"], "box_iou": best.mean()}


class VLMObjective:
    """Instruction tuning of a :class:`vol3d.models.Vol3DModel` on report, VQA, grounding and EHR samples.

    Each item becomes ``mix.samples_per_case`` samples of tasks drawn by ``mix`` among those
    the case has ground truth for (:func:`vol3d.tasks.build_samples`), after optional
    augmentation that moves boxes with the image; they share one encoder pass. The loss is a weighted sum (``LossConfig``) of
    LM cross-entropy on answer tokens, EHR-code BCE on every case, the grounding head's
    losses (:func:`grounding_losses`) for each ``<box>`` token of a grounding answer, and
    CLIP InfoNCE of volume vs report. With a grounding head (``box_tokens``), grounding
    answers are bare ``<box>`` tokens; without, the LM spells the coordinates.

    Args:
        processor: the model's :class:`~vol3d.models.Vol3DProcessor`.
        mix: task weights (:class:`vol3d.tasks.TaskMix`).
        weights: a :class:`vol3d.train.config.LossConfig`.
        code_vocab: the EHR head's codes (None: no EHR target).
        augment: augmentation of training cases (None: none).
        max_length: token budget per sequence (answers beyond it are truncated).
        val_batch_size: batch size of :meth:`validate`.
        box_tokens: the model has a grounding head (``Vol3DConfig.box_head``).
    """

    def __init__(self, processor: Any, mix: Any, weights: Any, code_vocab: Any = None, augment: Any = None,
                 max_length: int = 512, val_batch_size: int = 2, box_tokens: bool = False) -> None:
        self.processor = processor
        self.mix = mix
        self.weights = weights
        self.code_vocab = code_vocab
        self.augment = augment
        self.max_length = max_length
        self.val_batch_size = val_batch_size
        self.box_tokens = box_tokens

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        from vol3d.models.processor import IGNORE_INDEX
        from vol3d.tasks import augment, build_samples

        cases = list(items)  # vol3d.tasks reads CacheDataset items as they are
        if self.augment is not None:
            cases = [augment(c, r, self.augment) for c, r in zip(cases, rngs, strict=True)]
        box_format = "token" if self.box_tokens else "text"
        # mix.samples_per_case questions per case; the encoder sees each volume once
        per_case = [build_samples(c, r, self.mix, code_vocab=self.code_vocab, box_format=box_format)
                    for c, r in zip(cases, rngs, strict=True)]
        samples = [s for group in per_case for s in group]
        volume_index = torch.tensor([i for i, group in enumerate(per_case) for _ in group], dtype=torch.long)
        enc = self.processor([s.prompt for s in samples], [s.answer for s in samples], max_length=self.max_length)
        for i, s in enumerate(samples):
            if s.task == "ehr":  # no text to learn: the EHR head answers
                enc["labels"][i] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "volume": torch.stack([torch.as_tensor(np.asarray(c["image"]), dtype=torch.float32) for c in cases]),
            **enc,
            "tasks": [s.task for s in samples],
        }
        if len(samples) > len(cases):
            batch["volume_index"] = volume_index
        if self.code_vocab is not None and self.weights.ehr > 0:
            batch["ehr_target"] = torch.stack([torch.from_numpy(self.code_vocab.encode(c.get("codes") or []))
                                               for c in cases])
        if self.box_tokens:
            batch.update(self._box_targets(samples, enc["labels"]))
        if self.weights.contrastive > 0:
            batch["texts"] = [str(c.get("report") or "") for c in cases]
        return batch

    def _box_targets(self, samples: list[Any], labels: Tensor) -> dict[str, Tensor]:
        """``box_index (Q, 2)`` of the grounding answers' ``<box>`` tokens, and for each the true
        boxes of its answer, ``box_target (Q, K, 6)`` in the head's frame with ``box_target_mask (Q, K)``.

        Every ``<box>`` of an answer learns all of that answer's boxes (:func:`grounding_losses`);
        a ``<box>`` in another task's answer has no box to learn and is left out.
        """
        from preprocess.geometry import unit_boxes
        from vol3d.models.vlm import box_token_index

        box_id = int(self.processor.tokenizer.convert_tokens_to_ids(BOX_TOKEN))
        where = box_token_index(labels, box_id)
        keep, boxes = [], []
        for q, row in enumerate(where[:, 0].tolist()):
            s = samples[row]
            if s.task == "ground" and len(s.extras["boxes_vox"]):
                keep.append(q)
                boxes.append(unit_boxes(s.extras["boxes_vox"], s.extras["shape"]))
        k = max((len(b) for b in boxes), default=1)
        target = np.zeros((len(boxes), k, 6), np.float32)
        mask = np.zeros((len(boxes), k), bool)
        for i, b in enumerate(boxes):
            target[i, : len(b)], mask[i, : len(b)] = b, True
        return {"box_index": where[keep], "box_target": torch.from_numpy(target),
                "box_target_mask": torch.from_numpy(mask)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from vol3d.train.losses import clip_infonce, ehr_bce, lm_cross_entropy

        w = self.weights
        out = model(batch["volume"], batch["input_ids"], batch["attention_mask"], texts=batch.get("texts"),
                    box_index=batch.get("box_index"), volume_index=batch.get("volume_index"))
        terms: dict[str, Tensor] = {"lm": lm_cross_entropy(out["logits"], batch["labels"],
                                                            average=w.lm_average)}
        logs: dict[str, Any] = {}
        if "ehr_target" in batch:
            terms["ehr"] = ehr_bce(out["ehr_logits"], batch["ehr_target"], w.ehr_pos_weight)
        if "box_target" in batch:
            box = grounding_losses(out, batch["box_target"], batch["box_target_mask"])
            logs["box_iou"] = box.pop("box_iou")
            terms.update(box)
        if "texts" in batch and "text_embed" in out:
            scale = out.get("logit_scale", 1.0 / w.temperature)
            terms["contrastive"] = clip_infonce(out["vol_embed"], out["text_embed"], scale)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        logs.update({k: v.detach() for k, v in terms.items()})
        return total, logs

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]:
        """Mean loss terms on ``items`` without augmentation (same task draws every time)."""
        plain = VLMObjective(self.processor, self.mix, self.weights, self.code_vocab, None, self.max_length,
                             self.val_batch_size, self.box_tokens)
        return batched_validation(plain, model, items, self.val_batch_size)
