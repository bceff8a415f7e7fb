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

An objective may also train in stages: an attribute ``stage_starts`` (the optimizer
steps at which the second, third ... stage begins, increasing) makes the loop pass
``step=`` (the optimizer step the batch is for) to ``make_batch`` and restart the
learning-rate warmup and cosine at each stage start (:func:`vol3d.train.loop.staged_schedule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from preprocess.errors import ConfigError
from vol3d.tasks.samples import BOX_TOKEN
from vol3d.train.config import PATCH_BALANCE


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


#: Headline metrics of :func:`vol3d.eval.evaluate` logged at every validation: (log name, path).
TASK_METRICS = (
    ("task/ground_acc_iou50", ("ground", "acc_iou50")),
    ("task/report_finding_f1", ("report", "findings", "micro_f1")),
    ("task/presence_acc", ("vqa_closed", "by_type", "presence", "exact_match")),
    ("task/count_acc", ("vqa_closed", "by_type", "count", "exact_match")),
    ("task/vqa_closed_acc", ("vqa_closed", "exact_match")),
    ("task/ehr_imaging_auroc", ("ehr", "imaging_macro_auroc")),
)


def task_metrics(model: nn.Module, cases: list[Any], code_vocab: Any = None, max_new_tokens: int = 96) -> dict[str, float]:
    """The task metrics of ``model`` on a few validation ``cases`` (one question per task and case,
    no bootstrap): what TensorBoard and metrics.csv show beside the losses during training."""
    import math

    from vol3d.eval import evaluate

    tasks = [t for t in ("report", "vqa_closed", "ground", "ehr") if t != "ehr" or code_vocab is not None]
    res = evaluate(model, cases, tasks, vocab=getattr(model, "vocab", None) or None, code_vocab=code_vocab,
                   samples_per_case=1, max_new_tokens=max_new_tokens, bootstrap=0)  # fmt: skip
    out = {}
    for name, path in TASK_METRICS:
        value: Any = res
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            out[name] = float(value)
    return out


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


def instance_sizes(region_map: np.ndarray) -> np.ndarray:
    """Per voxel, the voxel count of the finding instance it belongs to (``region_map``: instance index
    per voxel, -1 off instances, as :class:`vol3d.tasks.regions.DenseTargets`); 0 off instances."""
    inside = region_map >= 0
    sizes = np.zeros(region_map.shape, np.float32)
    ids = region_map[inside]
    if ids.size:
        sizes[inside] = np.bincount(ids)[ids]
    return sizes


def finding_weights(size: Tensor, target: Tensor, balance: float) -> Tensor:
    """Per-voxel weights of the finding terms (``LossConfig.finding_instance_balance``): 1 off findings;
    a finding voxel of an instance of ``n`` voxels weighs ``n ** -balance``, then the finding voxels are
    scaled to average 1 over the batch, so the positives' total weight is that of the unweighted loss and
    only its split between instances changes (``balance`` 1: every instance counts alike, however small;
    a finding voxel outside every instance, e.g. of a cut lesion, weighs the average)."""
    pos = target > 0.5
    weight = torch.ones_like(target, dtype=torch.float32)
    if not bool(pos.any()):
        return weight
    sized = pos & (size > 0)
    raw = torch.ones_like(weight)
    if bool(sized.any()):
        raw[sized] = size[sized].float() ** -balance
        raw[pos & ~sized] = raw[sized].mean()
    weight[pos] = raw[pos] / raw[pos].mean()
    return weight


def class_balanced_bce(logit: Tensor, target: Tensor, weight: Tensor | None, share: float) -> Tensor:
    """BCE of a sparse 0/1 map as ``share`` x its mean over the target voxels (``weight``ed: e.g.
    every instance alike, :func:`finding_weights`) + ``1 - share`` x its mean over the others.

    Averaged over every voxel (with ``pos_weight``), a finding's share of the loss follows its voxel
    count: a 14-voxel nodule is 0.005% of the voxels of eight 32^3 crops, and once the model calls it
    background with confidence its gradient is lost among those of the other terms. Here each side keeps its
    share however few voxels it has. A side with no voxel in the batch contributes 0.
    """
    import torch.nn.functional as F

    pos = target > 0.5
    per_voxel = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    zero = logit.sum() * 0.0
    w = weight if weight is not None else torch.ones_like(per_voxel)
    on = (per_voxel * w)[pos].sum() / w[pos].sum() if bool(pos.any()) else zero
    off = per_voxel[~pos].mean() if bool((~pos).any()) else zero
    return share * on + (1.0 - share) * off


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
        perception: ``(finding vocabulary, LabelSpec)`` of a model with perception: every prompt is
            preceded by the case's findings digest (from its ground truth, so the LM learns to read
            the digest faithfully; at inference the perception writes it), and the perception heads
            learn organs, findings and conditions (:meth:`_perception_targets`).
        prevalence: share of the training cases with each finding: presence and count questions
            balance yes/no per finding over the dataset (:func:`vol3d.tasks.samples.prevalence`).
        patch_size: with perception, the decoder learns on ``patches_per_case`` crops of this size per
            case instead of the whole volumes, each centred on a finding with ``finding_probability``,
            else anywhere: nnU-Net's foreground oversampling. Several times more finding voxels per
            second of CPU than whole volumes (docs/benchmarks/quality.md). None: whole volumes.
        patch_balance: how a crop's finding is drawn. ``"case"``: each case's crops from its own
            findings, an instance uniformly. ``"type"``: a finding type uniformly among those in the
            batch, then one of its instances in the batch (nnU-Net draws a foreground class uniformly):
            a rare type (a lung nodule beside three liver lesions per case) gets its share of crops
            early; better at short budgets, not at long ones (docs/benchmarks/quality.md, round 10).
        perception_steps: with perception, the first optimizer steps train the dense perception alone
            (organ, finding and finding-type maps on the crops; no text, no language model), a stage of
            its own (:attr:`stage_starts`); the later steps train every task.
    """

    def __init__(self, processor: Any, mix: Any, weights: Any, code_vocab: Any = None, augment: Any = None,
                 max_length: int = 512, val_batch_size: int = 2, box_tokens: bool = False,
                 perception: tuple[Any, Any] | None = None, prevalence: dict[str, float] | None = None,
                 patch_size: Any = None, patches_per_case: int = 2, finding_probability: float = 0.7,
                 perception_steps: int = 0, patch_balance: str = "case") -> None:
        if patch_balance not in PATCH_BALANCE:
            raise ConfigError(f"patch_balance must be one of {PATCH_BALANCE}, got {patch_balance!r}")
        if perception_steps and perception is None:
            raise ValueError("perception_steps needs a perception model (perception=(vocab, labels))")
        self.processor = processor
        self.mix = mix
        self.weights = weights
        self.code_vocab = code_vocab
        self.augment = augment
        self.max_length = max_length
        self.val_batch_size = val_batch_size
        self.box_tokens = box_tokens
        self.perception = perception
        self.prevalence = prevalence
        self.patch_size = tuple(int(v) for v in patch_size) if patch_size else None
        self.patches_per_case = patches_per_case
        self.finding_probability = finding_probability
        self.patch_balance = patch_balance
        self.perception_steps = int(perception_steps)
        self.task_metric_cases = 0  # validate(): task metrics (vol3d.eval) on this many validation cases
        self._dice_ce = None

    @property
    def stage_starts(self) -> tuple[int, ...]:
        """The step at which every task joins the perception-only stage (none without that stage)."""
        return (self.perception_steps,) if self.perception_steps > 0 else ()

    def make_batch(self, items: list[dict[str, Any]], rngs: list[np.random.Generator],
                   step: int | None = None) -> dict[str, Any]:
        """The batch of optimizer step ``step`` (None: of the last stage, every task)."""
        from vol3d.models.processor import IGNORE_INDEX
        from vol3d.tasks import augment, build_samples

        cases = list(items)  # vol3d.tasks reads CacheDataset items as they are
        if self.augment is not None:
            cases = [augment(c, r, self.augment) for c, r in zip(cases, rngs, strict=True)]
        if step is not None and step < self.perception_steps:
            return self._perception_batch(cases, rngs)
        box_format = "token" if self.box_tokens or self.perception is not None else "text"
        vocab = self.perception[0] if self.perception is not None else None
        # mix.samples_per_case questions per case; the encoder sees each volume once
        per_case = [build_samples(c, r, self.mix, vocab=vocab, code_vocab=self.code_vocab, box_format=box_format,
                                  prevalence=self.prevalence)
                    for c, r in zip(cases, rngs, strict=True)]
        samples = [s for group in per_case for s in group]
        volume_index = torch.tensor([i for i, group in enumerate(per_case) for _ in group], dtype=torch.long)
        contexts, found = None, None
        if self.perception is not None:
            from vol3d.tasks.regions import digest_text, perceived_from_case

            found = [perceived_from_case(c, *self.perception) for c in cases]
            contexts = [digest_text(found[int(i)][0], vocab) for i in volume_index]
        enc = self.processor([s.prompt for s in samples], [s.answer for s in samples], max_length=self.max_length,
                             contexts=contexts)
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
        if found is not None:
            batch.update(self._perception_targets(found, samples, volume_index, enc["labels"],
                                                  tuple(batch["volume"].shape[2:])))
            if self.patch_size is not None:
                batch.update(self._patches(batch, found, rngs))
        if self.weights.contrastive > 0:
            batch["texts"] = [str(c.get("report") or "") for c in cases]
        return batch

    def _perception_batch(self, cases: list[dict[str, Any]], rngs: list[np.random.Generator]) -> dict[str, Any]:
        """A batch of the perception-only stage: the crops and their dense targets, no text."""
        from vol3d.tasks.regions import perceived_from_case

        found = [perceived_from_case(c, *self.perception) for c in cases]  # type: ignore[misc]
        volume = torch.stack([torch.as_tensor(np.asarray(c["image"]), dtype=torch.float32) for c in cases])
        batch = {"volume": volume, **self._dense_targets([t for _, t in found], tuple(volume.shape[2:]))}
        if self.patch_size is not None:
            batch.update(self._patches(batch, found, rngs))
        else:
            batch["patches"] = volume
        del batch["volume"]
        batch["perception_only"] = True
        return batch

    def _dense_targets(self, targets: list[Any], shape: tuple[int, ...]) -> dict[str, Tensor]:
        """The organ and finding maps of each case (see :meth:`_perception_targets`)."""
        zeros_long = np.zeros(shape, np.int64)
        out = {
            "organ_target": torch.from_numpy(np.stack([t.organ if t.organ is not None else zeros_long
                                                       for t in targets])),
            "organ_mask": torch.tensor([t.organ is not None for t in targets]),
            "finding_target": torch.from_numpy(np.stack([t.finding if t.finding is not None
                                                         else np.zeros(shape, np.float32) for t in targets])),
            "finding_type": torch.from_numpy(np.stack([t.finding_type if t.finding_type is not None
                                                       else np.full(shape, -100, np.int64) for t in targets])),
            "finding_mask": torch.tensor([t.finding is not None for t in targets]),
        }
        if self.weights.finding_instance_balance > 0:
            out["finding_size"] = torch.from_numpy(np.stack([instance_sizes(t.region_map) for t in targets]))
        return out

    def _perception_targets(self, found: list[Any], samples: list[Any], volume_index: Tensor, labels: Tensor,
                            shape: tuple[int, ...]) -> dict[str, Any]:
        """The regions of each case (what its digest lists), the perception heads' targets, and the
        pointer targets of the grounding answers' ``<box>`` tokens.

        ``organ_target (B, X, Y, Z)`` with ``organ_mask (B,)`` (cases with a label map);
        ``finding_target (B, X, Y, Z)`` 0/1, ``finding_type (B, X, Y, Z)`` (-100 off findings) with
        ``finding_mask (B,)`` (cases with finding annotations); ``condition_target (B, C)`` with
        ``condition_mask (B,)``; ``box_index (Q, 2)`` and ``pointer_target (Q, R)``: for each ``<box>``
        of a grounding answer, the regions whose box is one of the answer's true boxes.
        """
        from vol3d.models.vlm import box_token_index
        from vol3d.tasks.regions import matching_regions, pack_regions

        vocab, label_spec = self.perception  # type: ignore[misc]
        perceived = [p for p, _ in found]
        targets = [t for _, t in found]
        packed = pack_regions(perceived, [t.region_map for t in targets], [t.organ for t in targets], shape,
                              vocab, label_spec)
        n_cond = sum(not spec.countable for spec in vocab.values())
        out: dict[str, Any] = {
            "regions": {k: torch.from_numpy(v) for k, v in packed.items()},
            **self._dense_targets(targets, shape),
            "condition_target": torch.from_numpy(np.stack([t.conditions if t.conditions is not None
                                                           else np.zeros(n_cond, np.float32) for t in targets])
                                                 .reshape(len(targets), n_cond)),
            "condition_mask": torch.tensor([t.conditions is not None for t in targets]),
        }
        box_id = int(self.processor.tokenizer.convert_tokens_to_ids(BOX_TOKEN))
        where = box_token_index(labels, box_id)
        r = packed["kind"].shape[1]
        keep, rows = [], []
        for q, row in enumerate(where[:, 0].tolist()):
            s = samples[row]
            if s.task != "ground" or not len(s.extras["boxes_vox"]):
                continue
            hit = matching_regions(perceived[int(volume_index[row])], s.extras["boxes_vox"])
            if hit:
                target = np.zeros(r, np.float32)
                target[hit] = 1.0
                keep.append(q)
                rows.append(target)
        out["box_index"] = where[keep]
        out["pointer_target"] = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, r), np.float32))
        return out

    def _patches(self, batch: dict[str, Any], found: list[Any], rngs: list[np.random.Generator]) -> dict[str, Any]:
        """Crops of the volumes and of their dense targets for the decoder (see ``patch_size``):
        ``patches (P, C, x, y, z)`` and the ``organ_target``/``finding_target``/``finding_type`` of the
        patches (replacing the volumes'), each patch keeping its case's masks."""
        assert self.patch_size is not None
        shape = tuple(batch["volume"].shape[2:])
        size = np.minimum(self.patch_size, shape)
        slices, owner = [], []
        for c, k, rng in self._patch_findings(found, rngs):
            centre = None
            if k is not None:
                voxels = np.argwhere(found[c][1].region_map == k)
                if len(voxels):
                    centre = voxels[int(rng.integers(len(voxels)))]
            if centre is None:
                centre = np.array([int(rng.integers(n)) for n in shape])
            jitter = np.array([int(rng.integers(-(s // 4), s // 4 + 1)) for s in size])
            lo = np.clip(centre - size // 2 + jitter, 0, np.asarray(shape) - size)
            slices.append(tuple(slice(int(a), int(a + s)) for a, s in zip(lo, size, strict=True)))
            owner.append(c)
        own = torch.tensor(owner, dtype=torch.long)

        def crop(t: Tensor, extra: int) -> Tensor:
            return torch.stack([t[i][(slice(None),) * extra + sl] for i, sl in zip(owner, slices, strict=True)])

        out = {"patches": crop(batch["volume"], 1), "organ_target": crop(batch["organ_target"], 0),
               "finding_target": crop(batch["finding_target"], 0), "finding_type": crop(batch["finding_type"], 0),
               "organ_mask": batch["organ_mask"][own], "finding_mask": batch["finding_mask"][own]}
        if "finding_size" in batch:
            out["finding_size"] = crop(batch["finding_size"], 0)
        return out

    def _patch_findings(self, found: list[Any], rngs: list[np.random.Generator],
                        ) -> Iterator[tuple[int, int | None, np.random.Generator]]:
        """``(case, finding index or None, rng)`` of each perception crop of a batch (``patches_per_case``
        per case), one at a time (the caller draws the crop's voxel and jitter from ``rng`` before the
        next): with ``finding_probability`` a finding drawn as ``patch_balance`` says, else None (a crop
        anywhere in the case)."""
        if self.patch_balance == "case":
            for c, ((perceived, _), rng) in enumerate(zip(found, rngs, strict=True)):
                for _ in range(self.patches_per_case):
                    k = None
                    if perceived.findings and rng.random() < self.finding_probability:
                        k = int(rng.integers(len(perceived.findings)))
                    yield c, k, rng
            return
        by_type: dict[str, list[tuple[int, int]]] = {}
        for c, (perceived, _) in enumerate(found):
            for k, region in enumerate(perceived.findings):
                by_type.setdefault(region.name, []).append((c, k))
        types = sorted(by_type)
        rng = rngs[0]  # one stream for the batch's draws
        for c in range(len(found)):
            for _ in range(self.patches_per_case):
                if types and rng.random() < self.finding_probability:
                    instances = by_type[types[int(rng.integers(len(types)))]]
                    yield (*instances[int(rng.integers(len(instances)))], rng)
                else:
                    yield c, None, rng

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
        if batch.get("perception_only"):
            out = model(None, None, patches=batch["patches"])  # through the (DDP) wrapper: gradients sync
            terms = self.dense_losses(out, batch)
            total = sum(getattr(w, k) * v for k, v in terms.items())
            return total, {k: v.detach() for k, v in terms.items()}
        out = model(batch["volume"], batch["input_ids"], batch["attention_mask"], texts=batch.get("texts"),
                    box_index=batch.get("box_index"), volume_index=batch.get("volume_index"),
                    regions=batch.get("regions"), patches=batch.get("patches"))
        terms: dict[str, Tensor] = {"lm": lm_cross_entropy(out["logits"], batch["labels"],
                                                            average=w.lm_average)}
        logs: dict[str, Any] = {}
        if "ehr_target" in batch:
            terms["ehr"] = ehr_bce(out["ehr_logits"], batch["ehr_target"], w.ehr_pos_weight)
        if "box_target" in batch:
            box = grounding_losses(out, batch["box_target"], batch["box_target_mask"])
            logs["box_iou"] = box.pop("box_iou")
            terms.update(box)
        if "organ_target" in batch:
            perception = self.perception_losses(out, batch)
            logs["pointer_acc"] = perception.pop("pointer_acc")
            terms.update(perception)
        if "texts" in batch and "text_embed" in out:
            scale = out.get("logit_scale", 1.0 / w.temperature)
            terms["contrastive"] = clip_infonce(out["vol_embed"], out["text_embed"], scale)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        logs.update({k: v.detach() for k, v in terms.items()})
        return total, logs

    def perception_losses(self, out: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        """Losses of the perception heads and the region pointer (weights: ``LossConfig.organ``,
        ``finding``, ``finding_type``, ``condition``, ``pointer``).

        ``organ``: MONAI DiceCE (soft Dice over the batch, as nnU-Net's batch Dice) on the cases
        with a label map; ``finding``: BCE (``finding_pos_weight`` for the rare finding voxels, or
        :func:`class_balanced_bce` with ``finding_positive_share``) plus
        soft Dice over the batch; ``finding_type``: cross-entropy of the type on finding voxels;
        ``condition``: BCE; ``pointer``: cross-entropy of each ``<box>``'s pointer against the regions
        that are its answer's true boxes (spread evenly: any instance is right). A term without
        targets in the batch is a zero that keeps its head in the graph (DDP needs every gradient).
        """
        import torch.nn.functional as F

        terms = self.dense_losses(out, batch)
        zero = out["organ_logits"].sum() * 0.0 + out["finding_logits"].sum() * 0.0 + out["condition_logits"].sum() * 0.0
        m = batch["condition_mask"]
        cond = out["condition_logits"]
        terms["condition"] = (F.binary_cross_entropy_with_logits(cond[m], batch["condition_target"][m].float())
                              if bool(m.any()) and cond.shape[1] else zero)
        target = batch["pointer_target"].float()
        if "pointer_logits" in out and len(target):
            logp = torch.log_softmax(out["pointer_logits"].float(), dim=-1)
            logp = logp.masked_fill(~torch.isfinite(logp), 0.0)
            terms["pointer"] = -((target / target.sum(-1, keepdim=True)) * logp).sum(-1).mean()
            pick = out["pointer_pick"]
            hit = target.gather(1, pick.clamp(min=0)[:, None])[:, 0] * (pick >= 0)
            terms["pointer_acc"] = hit.mean().detach()
        else:
            terms["pointer"] = zero  # no <box> in this batch (under DDP: ddp_find_unused for the pointer)
            terms["pointer_acc"] = zero.detach()
        return terms

    def dense_losses(self, out: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        """The ``organ``, ``finding`` and ``finding_type`` terms of :meth:`perception_losses` (the dense maps)."""
        import torch.nn.functional as F

        w = self.weights
        organ_logits, finding_logits = out["organ_logits"], out["finding_logits"]
        zero = organ_logits.sum() * 0.0 + finding_logits.sum() * 0.0
        terms: dict[str, Tensor] = {}
        m = batch["organ_mask"]
        if bool(m.any()):
            if self._dice_ce is None:
                from monai.losses import DiceCELoss

                self._dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
            terms["organ"] = self._dice_ce(organ_logits[m], batch["organ_target"][m][:, None])
        else:
            terms["organ"] = zero
        m = batch["finding_mask"]
        if bool(m.any()):
            logit, target = finding_logits[m, 0], batch["finding_target"][m].float()
            weight = own = None  # own: the weights of the cases with finding annotations
            if "finding_size" in batch:
                weight = finding_weights(batch["finding_size"], batch["finding_target"], w.finding_instance_balance)
                own = weight[m]
            if w.finding_positive_share is None:
                pos = torch.tensor(w.finding_pos_weight, device=logit.device)
                bce = F.binary_cross_entropy_with_logits(logit, target, pos_weight=pos, weight=own)
            else:
                bce = class_balanced_bce(logit, target, own, w.finding_positive_share)
            p = torch.sigmoid(logit)
            if own is None:
                dice = 1.0 - (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
            else:  # the finding voxels weighted, false positives as they are
                wt = target * own
                dice = 1.0 - (2.0 * (p * wt).sum() + 1.0) / ((p * (1.0 - target)).sum() + (p * wt).sum() + wt.sum() + 1.0)
            terms["finding"] = bce + dice
            typed = batch["finding_type"] >= 0
            if not bool(typed.any()) or finding_logits.shape[1] < 2:
                terms["finding_type"] = zero
            elif weight is None:
                terms["finding_type"] = F.cross_entropy(finding_logits[:, 1:], batch["finding_type"], ignore_index=-100)
            else:
                ce = F.cross_entropy(finding_logits[:, 1:], batch["finding_type"], ignore_index=-100, reduction="none")
                terms["finding_type"] = (ce * weight * typed).sum() / (weight * typed).sum()
        else:
            terms["finding"] = terms["finding_type"] = zero
        return terms

    def validate(self, model: nn.Module, items: Any) -> dict[str, float]:
        """Mean loss terms on ``items`` without augmentation (same task draws every time)."""
        plain = VLMObjective(self.processor, self.mix, self.weights, self.code_vocab, None, self.max_length,
                             self.val_batch_size, self.box_tokens, self.perception, self.prevalence,
                             self.patch_size, self.patches_per_case, self.finding_probability)
        out = batched_validation(plain, model, items, self.val_batch_size)
        if self.task_metric_cases and hasattr(model, "generate"):
            cases = [items[i] for i in range(min(self.task_metric_cases, len(items)))]
            out.update(task_metrics(model, cases, self.code_vocab))
        return out
