"""Training augmentations that move boxes and label maps together with the image.

Parameters are drawn from the caller's numpy ``rng`` and applied with TorchIO's
deterministic transforms (``Flip``, ``Affine``, ``Gamma``, ``Noise``), so a case
augments the same way for the same ``rng`` state. Boxes follow the image:

- flips map boxes exactly (voxel ``i`` -> ``n - 1 - i``);
- an affine is applied to one mask per box, the box's finding voxels (the lesion
  label inside the box, else the dominant label inside it, else the whole box),
  resampled with the same nearest-neighbour transform as the label map; the new
  box encloses what is left. When the moved box touches the volume's edge, its
  ``boxes_visible`` fraction is scaled by the voxels kept over the voxels expected
  (count before x scale^3); a box pushed out entirely is removed. ``boxes_world``, when
  present, is recomputed from the new voxel boxes and the case's ``affine``. Tasks then exclude
  boxes below :data:`vol3d.tasks.samples.MIN_VISIBLE` and say so in the answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.errors import ConfigError
from preprocess.geometry import as_boxes, boxes_voxel_to_world, mask_to_box
from vol3d.tasks.samples import BOX_FINDINGS, BOX_ORGANS, BOXES_VISIBLE, _rng, visible_fractions


@dataclasses.dataclass
class AugmentConfig:
    """What :func:`augment` may do, and how strongly."""

    flip_prob: float = 0.0  # per-axis flip probability; 0 by default: flips mirror anatomy (situs inversus)
    flip_axes: tuple[int, ...] = (0, 1, 2)  # array axes (X, Y, Z) that may be flipped
    # label pairs (a, b, c, d: a<->b, c<->d) swapped by an X flip so "left" stays true; None: the
    # pairs the export's label names give (`*_left`/`*_right`, `left_*`/`right_*`; see for_labels)
    lr_swap_labels: tuple[int, ...] | None = None
    affine_prob: float = 0.3  # probability of a small rotation/scale/translation
    max_rotation_deg: float = 5.0  # rotation about each axis drawn in [-d, d] degrees
    max_scale: float = 0.05  # isotropic scale drawn in [1-s, 1+s] (< 1 makes objects smaller)
    max_translation_vox: float = 3.0  # shift along each axis in [-t, t] voxels
    gamma_prob: float = 0.3  # probability of a gamma change of intensities
    max_log_gamma: float = 0.2  # gamma = exp(u), u in [-g, g]
    noise_prob: float = 0.3  # probability of additive Gaussian noise
    noise_std: float = 0.02  # its standard deviation (images are scaled to 0..1)
    # label value of findings, to keep boxes tight under an affine; None: the export's finding label
    # (vocab.json "finding_labels") when known, else the most frequent label inside each box
    lesion_label: int | None = None

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "gamma_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"AugmentConfig.flip_axes must be among 0, 1, 2; got {self.flip_axes}")
        if self.lr_swap_labels is not None and len(self.lr_swap_labels) % 2:
            raise ConfigError("AugmentConfig.lr_swap_labels must list label pairs (an even number of values)")
        if not 0 <= self.max_scale < 1 or self.max_rotation_deg < 0 or self.max_translation_vox < 0:
            raise ConfigError("AugmentConfig: max_scale in [0, 1), rotation and translation >= 0")


def for_labels(cfg: AugmentConfig, label_names: Sequence[str], finding_labels: Sequence[str] = ()) -> AugmentConfig:
    """``cfg`` with what it left open (None) taken from the export's label names (value = index):
    the left/right pairs (``kidney_left``/``kidney_right``, ``left_hippocampus``/``right_hippocampus``)
    and the first finding label. Set values are kept."""
    names = [str(n).lower() for n in label_names]
    pairs: list[int] = []
    if cfg.lr_swap_labels is None:
        for i, name in enumerate(names):
            side = _SIDE.search(name)
            if side is not None and side.group(0) == "left" and swap_laterality(name) in names:
                pairs += [i, names.index(swap_laterality(name))]
    lesion = cfg.lesion_label
    if lesion is None and finding_labels:
        first = str(finding_labels[0]).lower()
        lesion = names.index(first) if first in names else None
    return dataclasses.replace(cfg, lr_swap_labels=tuple(pairs) if cfg.lr_swap_labels is None else cfg.lr_swap_labels,
                               lesion_label=lesion)


_SIDE = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)  # also inside "kidney_left"


def swap_laterality(text: str) -> str:
    """``"left kidney"`` <-> ``"right kidney"``, keeping capitalisation (for X flips)."""

    def repl(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(repl, text)


def flip_boxes(boxes_vox: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Exact image of voxel boxes ``(N, 6)`` under flips of array ``axes`` of ``shape`` (X, Y, Z)."""
    b = as_boxes(boxes_vox).copy()
    for ax in axes:
        n = shape[ax]
        lo, hi = b[:, ax].copy(), b[:, ax + 3].copy()
        b[:, ax], b[:, ax + 3] = n - 1 - hi, n - 1 - lo
    return b


def box_masks(
    boxes_vox: np.ndarray, shape: tuple[int, ...], label: np.ndarray | None, lesion_label: int | None
) -> np.ndarray:
    """One uint8 mask ``(N, X, Y, Z)`` per box: the finding's voxels inside it.

    Inside the box: voxels of ``lesion_label`` if any, else of the most frequent
    non-zero label (e.g. the spleen for a splenomegaly box), else the whole box.
    """
    b = as_boxes(boxes_vox)
    masks = np.zeros((len(b), *shape), dtype=np.uint8)
    for n, box in enumerate(b):
        # voxel i belongs to the box when its centre i lies within [x0, x1]
        lo = np.clip(np.ceil(box[:3]), 0, np.asarray(shape) - 1).astype(int)
        hi = np.clip(np.floor(box[3:]), -1, np.asarray(shape) - 1).astype(int)
        sl = tuple(slice(a, c + 1) for a, c in zip(lo, hi, strict=True))
        region = np.ones([max(c + 1 - a, 0) for a, c in zip(lo, hi, strict=True)], dtype=bool)
        if label is not None and region.size:
            lab = label[sl]
            values, counts = np.unique(lab[lab > 0], return_counts=True)
            if lesion_label is not None and lesion_label in values:
                region = lab == lesion_label
            elif len(values):
                region = lab == values[np.argmax(counts)]
        masks[(n, *sl)] = region
    return masks


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _like(x: np.ndarray, as_torch: bool) -> Any:
    """Return arrays in the container type the caller used (CacheDataset items hold tensors)."""
    if not as_torch:
        return x
    import torch

    return torch.from_numpy(x)


def augment(
    case: Mapping[str, Any], rng: np.random.Generator | int | None, cfg: AugmentConfig | None = None
) -> dict[str, Any]:
    """A new case with ``image`` ``(C, X, Y, Z)``, ``label`` ``(X, Y, Z)`` and ``boxes_vox`` ``(N, 6)``
    transformed together; ``boxes_visible`` records how much of each box is still inside."""
    import torch
    import torchio as tio

    rng = _rng(rng)
    cfg = cfg or AugmentConfig()
    out = dict(case)
    was_torch = hasattr(case["image"], "detach")
    image = _to_numpy(case["image"]).astype(np.float32)
    if image.ndim == 3:
        image = image[None]
    shape = tuple(int(s) for s in image.shape[-3:])
    label = _to_numpy(case["label"]) if case.get("label") is not None else None
    boxes_in = case.get("boxes_vox")
    boxes = as_boxes(
        _to_numpy(boxes_in) if boxes_in is not None else np.zeros((0, 6))
    ).copy()  # never mutate the input
    visible = visible_fractions(case, len(boxes)).copy()
    keep = np.ones(len(boxes), dtype=bool)

    # Draw every parameter first (fixed order), so the rng stream does not depend on the data.
    flips = tuple(ax for ax in cfg.flip_axes if rng.random() < cfg.flip_prob)
    do_affine = rng.random() < cfg.affine_prob
    degrees = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3)
    scale = float(rng.uniform(1 - cfg.max_scale, 1 + cfg.max_scale))
    shift_vox = rng.uniform(-cfg.max_translation_vox, cfg.max_translation_vox, 3)
    do_gamma = rng.random() < cfg.gamma_prob
    gamma = float(np.exp(rng.uniform(-cfg.max_log_gamma, cfg.max_log_gamma)))
    do_noise = rng.random() < cfg.noise_prob
    noise_seed = int(rng.integers(2**31 - 1))

    affine = (
        np.asarray(case["affine"], dtype=float)
        if case.get("affine") is not None
        else np.diag([*np.asarray(case.get("spacing", (1.0, 1.0, 1.0)), dtype=float), 1.0])
    )
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image), affine=affine))
    if label is not None:
        subject.add_image(
            tio.LabelMap(tensor=torch.from_numpy(label.astype(np.int16))[None], affine=affine), "label"
        )

    if flips:
        subject = tio.Flip(axes=flips)(subject)
        boxes = flip_boxes(boxes, shape, flips)
        if 0 in flips:  # mirrored left-right: what was the left kidney is now on the right
            if label is not None:
                lab = subject["label"].data.clone()
                pairs = cfg.lr_swap_labels or ()
                for a, b in zip(pairs[::2], pairs[1::2], strict=True):
                    lab[subject["label"].data == a], lab[subject["label"].data == b] = b, a
                subject["label"].set_data(lab)
            if out.get(BOX_ORGANS) is not None:
                out[BOX_ORGANS] = [swap_laterality(str(o)) for o in out[BOX_ORGANS]]
            if out.get("report"):
                out["report"] = swap_laterality(str(out["report"]))

    if do_affine:
        lab_np = subject["label"].data[0].numpy() if label is not None else None
        if len(boxes):
            masks = box_masks(boxes, shape, lab_np, cfg.lesion_label)
            subject.add_image(tio.LabelMap(tensor=torch.from_numpy(masks), affine=affine), "boxes")
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        subject = tio.Affine(
            scales=(scale,) * 3,
            degrees=tuple(degrees),
            translation=tuple(shift_vox * spacing),
            default_pad_value="minimum",
        )(subject)
        if len(boxes):
            before = masks.reshape(len(boxes), -1).sum(axis=1).astype(float)
            moved = subject["boxes"].data.numpy().astype(bool)
            after = moved.reshape(len(boxes), -1).sum(axis=1).astype(float)
            expected = np.maximum(before * scale**3, 1.0)  # objects grow with the scale's volume factor
            for n in range(len(boxes)):
                new = mask_to_box(moved[n])
                if new is None:
                    keep[n] = False  # pushed out of the volume (or below one voxel): it is gone
                    continue
                boxes[n] = new
                # Only a box cut by the volume's edge lost voxels; elsewhere the count ratio is
                # nearest-neighbour noise, not loss.
                if (new[:3] <= -0.5).any() or (new[3:] >= np.asarray(shape) - 0.5).any():
                    visible[n] *= min(1.0, after[n] / expected[n])
            subject.remove_image("boxes")

    if do_gamma:
        subject = tio.Gamma(gamma=gamma, include=["image"])(subject)
    if do_noise:
        subject = tio.Noise(mean=0.0, std=cfg.noise_std, seed=noise_seed, include=["image"])(subject)

    new_image = subject["image"].data.float()
    out["image"] = new_image if was_torch else new_image.numpy()
    if label is not None:
        out["label"] = _like(
            subject["label"].data[0].numpy().astype(label.dtype), hasattr(case["label"], "detach")
        )
    if "boxes_vox" in case:
        as_torch = hasattr(boxes_in, "detach")
        out["boxes_vox"] = _like(boxes[keep].astype(np.float32), as_torch)
        out[BOXES_VISIBLE] = _like(visible[keep].astype(np.float32), as_torch)
        if "boxes_world" in out:  # the content moved: world boxes follow, or go if there is no affine
            if case.get("affine") is not None:
                world = boxes_voxel_to_world(boxes[keep], np.asarray(_to_numpy(case["affine"]), dtype=float))
                out["boxes_world"] = _like(world.astype(np.float32), as_torch)
            else:
                del out["boxes_world"]
        for key in (BOX_FINDINGS, BOX_ORGANS):
            if key in out and out[key] is not None:
                out[key] = [v for v, k in zip(out[key], keep, strict=True) if k]
    out["augment"] = {
        "flips": list(flips),
        "affine": bool(do_affine),
        "gamma": bool(do_gamma),
        "noise": bool(do_noise),
    }
    return out
