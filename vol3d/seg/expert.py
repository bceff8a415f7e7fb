"""A segmentation run as an expert the vision-language model calls for volumes and lengths.

VILA-M3 lets the VLM call an expert model (e.g. a segmenter) and use its number in the answer. Here
``vol3d ask RUN VOLUME "What is the volume of the liver?" --expert SEG_RUN`` (or
``vol3d.load(RUN, expert=SEG_RUN)``) has the ``vol3d finetune --task seg`` run segment the same
volume, prepared the way *its* training cache was, and measures from its mask: an organ's volume
(voxels x voxel volume) and craniocaudal length (the mask's world extent along z), or the volume of
the lesion component under the finding the perception found. The call and its result are a step
of the answer (``kind: "expert"``, with ``call``), beside the perception's own reading.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.errors import InputError


@dataclasses.dataclass
class ExpertReading:
    """What the expert measured and how it was asked."""

    value: float | None  # None: the expert does not see it
    unit: str
    text: str
    call: dict[str, Any]


class SegExpert:
    """Segments volumes with a ``vol3d finetune --task seg`` run (:class:`vol3d.seg.predict.Predictor`)
    and measures from its masks; the last volume's mask is kept, so several questions about one volume
    segment it once."""

    def __init__(self, predictor: Any, name: str) -> None:
        self.predictor, self.name = predictor, name
        self._last: tuple[str, np.ndarray, np.ndarray] | None = None  # (volume key, labels, affine)

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto") -> SegExpert:
        from vol3d.seg.predict import Predictor

        return cls(Predictor.from_run(run, device=device), Path(run).name)

    @property
    def class_names(self) -> list[str]:
        return list(self.predictor.class_names)

    def segment(self, volume: Any, series: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label map ``(X, Y, Z)`` uint8 on the expert's own prepared grid, and that grid's affine ``(4, 4)``.

        ``volume``: a NIfTI/NRRD/MHA file or DICOM series folder or a loaded ``preprocess.types.Image``
        (prepared with the expert's preprocessing), or ``CACHE_DIR::CASE_ID`` of a cache made with the
        expert's preprocessing."""
        from preprocess.transforms import prepare
        from preprocess.types import Image
        from vol3d.inference import parse_cache_ref, read_image
        from vol3d.seg.inference import segment

        key = f"{volume}#{series}" if isinstance(volume, (str, os.PathLike, tuple)) else f"id{id(volume)}"
        if self._last is not None and self._last[0] == key:
            return self._last[1], self._last[2]
        cfg = self.predictor.preprocess
        ref = parse_cache_ref(volume)
        if ref is not None:
            image, affine = self._cached(*ref)
        else:
            prepared = prepare(volume if isinstance(volume, Image) else read_image(volume, cfg, series), cfg)
            image, affine = prepared.image, prepared.affine
        labels = segment(self.predictor.model, image, self.predictor.roi_size, self.predictor.infer)
        self._last = (key, labels, np.asarray(affine, float))
        return labels, self._last[2]

    def _cached(self, cache_dir: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        import json

        from vol3d.data.cache import CacheDataset

        try:
            cache_hash = json.loads((cache_dir / "params.json").read_text()).get("params_hash")
        except (OSError, ValueError):
            cache_hash = None
        if cache_hash != self.predictor.preprocess.params_hash():
            raise InputError(f"{cache_dir}: this cache was prepared differently from the expert {self.name}'s "
                             "training data, so it cannot read it; give the original file or DICOM folder instead")
        ds = CacheDataset(cache_dir, split=None, mode="volume")
        idx = [i for i, r in enumerate(ds.rows) if str(r["id"]) == case]
        if not idx:
            raise InputError(f"{cache_dir}: no ok case {case!r}")
        item = ds[idx[0]]
        return item["image"].numpy(), item["affine"].numpy()

    def _class(self, name: str) -> int | None:
        return self.class_names.index(name) if name in self.class_names else None

    def read(self, query: Any, volume: Any, series: int | None = None, finding_box_mm: np.ndarray | None = None,
             finding_classes: tuple[str, ...] = ()) -> ExpertReading | None:
        """The expert's value for a :class:`vol3d.tasks.reasoning.Query` of an organ's volume or length,
        or of a finding's volume (the lesion component of ``finding_classes`` overlapping
        ``finding_box_mm``, the perceived finding's world box ``(6,)``); None for a query it cannot answer
        (a distance, a diameter, a class it was not trained on)."""
        from preprocess.geometry import box_iou, boxes_voxel_to_world, mask_to_box, spacing_from_affine
        from vol3d.tasks.regions import organ_text

        target = query.organ if query.organ else None
        classes = [target] if target else [c for c in finding_classes if c in self.class_names]
        if query.kind not in (("volume", "length") if target else ("volume",)) or not classes \
                or self._class(classes[0]) is None:
            return None
        labels, affine = self.segment(volume, series)
        voxel_ml = float(np.prod(spacing_from_affine(affine))) / 1000.0
        call = {"model": "segmentation", "run": self.name, "measure": query.kind, "class": classes[0]}
        mask = labels == self._class(classes[0])
        if not target:  # a finding: the lesion component under the perceived box
            from scipy import ndimage

            comps, n = ndimage.label(mask)
            best, best_iou = 0, 0.0
            for k, sl in enumerate(ndimage.find_objects(comps), start=1):
                if sl is None or finding_box_mm is None:
                    continue
                box = np.array([s.start - 0.5 for s in sl] + [s.stop - 0.5 for s in sl], float)
                iou = float(box_iou(boxes_voxel_to_world(box[None], affine), np.asarray(finding_box_mm)[None])[0, 0])
                if iou > best_iou:
                    best, best_iou = k, iou
            mask = comps == best if best else np.zeros_like(mask)
            call["overlap_iou"] = round(best_iou, 3)
        if not mask.any():
            what = organ_text(target) if target else "finding"
            return ExpertReading(None, "", f"the segmentation expert finds no {what} there", call)
        if query.kind == "volume":
            value, unit = float(mask.sum()) * voxel_ml, "mL"
        else:
            world = boxes_voxel_to_world(mask_to_box(mask)[None], affine)[0]
            value, unit = float(world[5] - world[2]), "mm"
        call["result"], call["unit"] = round(value, 3), unit
        what = f"{organ_text(target)} {'volume' if query.kind == 'volume' else 'craniocaudal length'}" if target \
            else "finding volume"
        return ExpertReading(value, unit, f"segmentation expert {self.name}: {what} {value:.0f} {unit}", call)


def describe(query: Any, vocab: Any) -> str:
    """What a query measures, in words: ``"liver volume"``, ``"largest liver lesion volume"``."""
    from vol3d.tasks.findings import as_vocab
    from vol3d.tasks.regions import organ_text

    what = organ_text(query.organ) if query.organ else f"largest {as_vocab(vocab)[query.finding].text}"
    return f"{what} {'volume' if query.kind == 'volume' else 'craniocaudal length'}"
