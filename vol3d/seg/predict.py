"""``vol3d predict``: segment NIfTI/DICOM inputs and write masks in each input's ORIGINAL geometry.

For every series or file that :func:`preprocess.ingest.scan` finds under INPUT:

1. load it in its original grid (:func:`preprocess.ingest.load`);
2. prepare it exactly as the training cache was prepared (the run's ``preprocess.json``):
   RAS+ reorientation, resampling, intensity windows, crop/pad;
3. MONAI sliding-window inference on the cached grid;
4. map the result back with :func:`preprocess.transforms.to_original` (undoing crop,
   resampling and reorientation) and write ``OUT/<id>.nii.gz`` with the ORIGINAL affine;
   for DICOM input also ``OUT/<id>_seg.dcm``, a DICOM SEG referencing the source instances.

The NIfTI of a DICOM series stores the array as ingest loads it, ``(column, row, slice)``
in stacking order, with the matching RAS affine, so world coordinates agree with the
DICOM and the mask overlays the series in 3D Slicer or ITK-SNAP. ``<id>`` is the
pseudonymous case id (``c_`` + keyed hash, the same as ``vol3d preprocess`` gives the
series with the same ``VOL3D_ID_KEY`` and input root). ``OUT/predictions.jsonl`` has
one row per series/file found, like the cache manifest: its ``source`` holds keyed hashes
of the input paths, and the crosswalk back to them (PHI) goes to ``<OUT>.crosswalk.jsonl``
beside ``OUT`` (mode 0600), unless ``keep_paths``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from preprocess.config import PreprocessConfig, read_config
from preprocess.errors import InputError
from preprocess.types import Candidate, SeriesError
from vol3d.seg.config import InferConfig

log = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"


@dataclasses.dataclass
class Predictor:
    """A segmentation model with what it needs to read new images like its training cache."""

    model: nn.Module  # (B, C, X, Y, Z) -> logits (B, K, X, Y, Z)
    class_names: list[str]
    roi_size: tuple[int, int, int]  # sliding-window ROI (the training patch)
    preprocess: PreprocessConfig
    infer: InferConfig = dataclasses.field(default_factory=InferConfig)

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", infer: InferConfig | None = None) -> Predictor:
        """Load ``RUN/model`` (a ``vol3d finetune --task seg`` run) onto ``device``."""
        from vol3d.inference import resolve_device
        from vol3d.seg.model import PREPROCESS_NAME, SegModel, model_dir

        directory = model_dir(run)
        model = SegModel.from_pretrained(directory, device=resolve_device(device))
        if not model.preprocess:
            raise InputError(f"{directory} has no preprocess.json, so new images cannot be prepared like its "
                             "training cache; re-save the run with this version of vol3d")
        pcfg = read_config(directory / PREPROCESS_NAME)
        return cls(model, model.class_names, model.config.patch_size, pcfg, infer or InferConfig())


@dataclasses.dataclass
class PredictionRow:
    """One series/file found under INPUT and what became of it (a row of ``predictions.jsonl``)."""

    id: str
    status: str  # ok | skipped | failed
    reason: str
    detail: str
    kind: str
    source: list[str]
    nifti: str | None = None  # file name inside OUT
    dicom_seg: str | None = None
    shape: list[int] | None = None  # original (X, Y, Z)
    voxels: dict[str, int] | None = None  # predicted voxels per foreground class
    seconds: float | None = None


def _case_key() -> bytes:
    from preprocess.ids import resolve_id_key

    return resolve_id_key(None)


def predict_candidate(pred: Predictor, c: Candidate, case_id: str, out: Path, *, resample: str = "probs",
                      dicom_seg: bool = True) -> PredictionRow:
    """Segment one ok candidate and write its outputs; failures become a ``failed`` row."""
    import nibabel as nib

    from preprocess.ingest import load
    from preprocess.reasons import PROCESSING_ERROR
    from preprocess.transforms import prepare
    from vol3d.seg.dicom_seg import SegNotWritable, write_dicom_seg
    from vol3d.seg.inference import labels_to_original, sliding_window_logits

    row = PredictionRow(case_id, "ok", "", "", c.kind, list(c.source))
    start = time.perf_counter()
    try:
        image = load(c, pred.preprocess.ingest)
        prepared = prepare(image, pred.preprocess)
        channels = getattr(getattr(pred.model, "config", None), "in_chans", prepared.image.shape[0])
        if prepared.image.shape[0] != channels:
            raise SeriesError(PROCESSING_ERROR, f"{c.source[0]}: prepared to {prepared.image.shape[0]} channel(s), "
                                                f"the model takes {channels}")
        logits = sliding_window_logits(pred.model, prepared.image, pred.roi_size, pred.infer)
        mask = labels_to_original(logits, prepared, resample)
    except SeriesError as exc:
        row.status, row.reason, row.detail = "failed", exc.reason, exc.detail
        return row
    nii = nib.Nifti1Image(mask.astype(np.uint8), prepared.orig_affine)
    nii.set_qform(prepared.orig_affine, code=1)  # scanner coordinates, as dcm2niix writes them
    nii.set_sform(prepared.orig_affine, code=1)
    row.nifti = f"{case_id}.nii.gz"
    nib.save(nii, out / row.nifti)
    if c.kind == "dicom" and dicom_seg:
        try:
            write_dicom_seg(mask, c, pred.class_names, out / f"{case_id}_seg.dcm")
            row.dicom_seg = f"{case_id}_seg.dcm"
        except SegNotWritable as exc:
            row.detail = f"Note: no DICOM SEG written: {exc}."
    row.shape = [int(n) for n in mask.shape]
    counts = np.bincount(mask.ravel(), minlength=len(pred.class_names))
    row.voxels = {name: int(counts[k]) for k, name in enumerate(pred.class_names) if k > 0}
    row.seconds = round(time.perf_counter() - start, 3)
    return row


def predict(pred: Predictor, inputs: str | Path, out: str | Path, *, resample: str = "probs",
            dicom_seg: bool = True, on_row: Callable[[PredictionRow], None] | None = None,
            keep_paths: bool = False, crosswalk: str | Path | None = None) -> list[PredictionRow]:
    """Segment every series/file under ``inputs`` into ``out``; returns one row per thing found.

    Rows name their inputs by keyed hashes and their details carry no path or identifier; the
    crosswalk ``id -> input paths`` goes to ``crosswalk`` (default ``<out>.crosswalk.jsonl``,
    outside ``out``). ``keep_paths=True`` writes the input paths into the rows instead.
    Raises :class:`InputError` when ``inputs`` does not exist or holds no image at all.
    """
    from preprocess.ids import case_id
    from preprocess.ingest import scan
    from preprocess.sanitise import crosswalk_path, make_sanitiser, path_redactor, write_crosswalk

    inputs, out = Path(inputs), Path(out)
    if not inputs.exists():
        raise InputError(f"{inputs} does not exist; give a NIfTI file, a DICOM series folder or a folder of them")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    walk = Path(crosswalk) if crosswalk is not None else crosswalk_path(out)
    if not keep_paths and walk.resolve().is_relative_to(out.resolve()):
        raise InputError(f"--crosswalk {walk} is inside --out {out}; the crosswalk names patients' files and must "
                         "live outside the output folder")  # fmt: skip
    key = _case_key()
    redact = path_redactor(key, not keep_paths)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[PredictionRow] = []
    with tempfile.TemporaryDirectory(prefix="vol3d-predict-") as work:
        candidates = scan(inputs, pred.preprocess.ingest, workdir=Path(work))
        images = [c for c in candidates if c.kind != "file"]
        if not images:
            raise InputError(f"{inputs}: no DICOM series or NIfTI/NRRD/MHA volume found; give a NIfTI file, a DICOM "
                             "series folder or a folder of them")
        if not keep_paths:
            write_crosswalk(walk, {case_id(key, c): {"id": case_id(key, c), "source": list(c.source),
                                                     "manifest_source": [redact(x) for x in c.source]}
                                   for c in candidates})  # fmt: skip
        for c in candidates:
            cid = case_id(key, c)
            if c.status != "ok":
                row = PredictionRow(cid, c.status, c.reason, c.detail, c.kind, list(c.source))
            else:
                row = predict_candidate(pred, c, cid, out, resample=resample, dicom_seg=dicom_seg)
            sanitise = make_sanitiser(c, redact)
            row.source = [redact(x) for x in c.source]
            row.detail = sanitise(row.detail)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    rows.sort(key=lambda r: r.id)
    (out / PREDICTIONS_NAME).write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows))
    return rows


def summarise(rows: Sequence[PredictionRow]) -> dict[str, Any]:
    """Counts by status (for the command's last line)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts
