"""Write valid CT/MR Image Storage DICOM series from an ``(X, Y, Z)`` array.

Used by ``vol3d synth`` and by tests that inject acquisition defects (gantry tilt,
missing slices, duplicates ...) through ``positions_lps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def slice_positions(first_lps: Sequence[float], step_lps: Sequence[float], n: int) -> np.ndarray:
    """Positions ``(n, 3)`` of evenly spaced slices starting at ``first_lps``."""
    return np.asarray(first_lps, float)[None] + np.arange(n)[:, None] * np.asarray(step_lps, float)[None]


def write_series(
    out_dir: str | Path,
    volume: np.ndarray,
    *,
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    positions_lps: np.ndarray,
    patient: dict[str, str],
    study: dict[str, str],
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    rescale: tuple[float, float] = (1.0, -1024.0),
    slice_thickness: float | None = None,
    extension: str = ".dcm",
    file_prefix: str = "IM",
    instance_order: Sequence[int] | None = None,
    extra_tags: dict[str, object] | None = None,
    uid_entropy: Sequence[str] | None = None,
) -> list[Path]:
    """Write one slice file per ``volume[:, :, k]`` and return the paths.

    Args:
        volume: ``(X=columns, Y=rows, Z=slices)`` values in real units (HU for CT);
            stored as ``round((v - intercept) / slope)`` in uint16 (int16 if negative).
        orientation: ImageOrientationPatient (row cosine, column cosine), LPS.
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` mm.
        positions_lps: ``(Z, 3)`` ImagePositionPatient of each slice.
        patient: PatientName, PatientID, PatientBirthDate, PatientSex.
        study: StudyInstanceUID, AccessionNumber, StudyDate, StudyDescription, StudyID.
        instance_order: InstanceNumber of each slice (default ``1..Z``); lets tests make
            InstanceNumber disagree with position.
        extra_tags: keyword -> value set on every slice (e.g. ``{"GantryDetectorTilt": 12.0}``).
        uid_entropy: when given, every generated UID (SOP instances, frame of reference,
            series if ``series_uid`` is None) is derived from these strings, so the same
            entropy writes byte-identical files; otherwise UIDs are random.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {vol.shape}")
    nx, ny, nz = vol.shape
    positions_lps = np.asarray(positions_lps, float)
    if positions_lps.shape != (nz, 3):
        raise ValueError(f"positions_lps must be ({nz}, 3), got {positions_lps.shape}")
    slope, intercept = rescale
    # Quantise slice by slice (cache-sized arrays); the stored type depends on the global minimum.
    signed = np.rint((float(vol.min()) - intercept) / slope) < 0
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)

    def stored_plane(k: int) -> bytes:
        plane = vol[:, :, k].astype(np.float64 if vol.dtype == np.float64 else np.float32)
        s = np.clip(np.rint((plane - intercept) / slope), info.min, info.max).astype(dtype)
        # pydicom reads pixels as (rows, columns): our (columns, rows) slice transposed.
        return np.ascontiguousarray(s.T).tobytes()

    def uid(*parts: str) -> str:
        if uid_entropy is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[*uid_entropy, *parts])

    series_uid = series_uid or uid("series")
    frame_uid = study.get("FrameOfReferenceUID") or uid("frame")
    order = list(instance_order) if instance_order is not None else list(range(1, nz + 1))
    if len(order) != nz:
        raise ValueError(f"instance_order must have {nz} entries, got {len(order)}")
    sop_class = _SOP_CLASS[modality]
    # One dataset reused for every slice: only the per-slice elements change between saves.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.ImageType = list(image_type)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, key, patient.get(key, ""))
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.AccessionNumber = study.get("AccessionNumber", "")
    ds.StudyDate = study.get("StudyDate", "")
    ds.StudyTime = study.get("StudyTime", "120000")
    ds.StudyDescription = study.get("StudyDescription", "")
    ds.StudyID = study.get("StudyID", "1")
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    ds.PixelSpacing = [round(float(v), 4) for v in pixel_spacing]
    if slice_thickness is not None:
        ds.SliceThickness = round(float(slice_thickness), 4)
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = "120"
    for tag, value in (extra_tags or {}).items():
        setattr(ds, tag, value)
    paths = []
    for k in range(nz):
        path = out_dir / f"{file_prefix}{k + 1:04d}{extension}"
        meta.MediaStorageSOPInstanceUID = uid("sop", str(k))
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = int(order[k])
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions_lps[k]]
        ds.SliceLocation = round(float(positions_lps[k][2]), 4)
        ds.PixelData = stored_plane(k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["write_series", "slice_positions", "generate_uid", "pydicom"]
