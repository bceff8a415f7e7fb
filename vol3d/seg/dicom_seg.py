"""DICOM SEG (highdicom) of a predicted label map, referencing the source series' instances.

The label map is on the original DICOM grid as :mod:`preprocess.ingest` loads it:
array ``(X=column, Y=row, Z=slice)`` with slices in the stacking order recorded in
``candidate.extra["slices"]`` (``[file index, frame]`` per slice). Frame ``k`` of the
SEG is therefore ``mask[:, :, k].T`` (rows x columns) and is tied to the source
instance of slice ``k``, so a viewer shows each segment on the right image.

Like any DICOM SEG meant to sit beside its series in a PACS, the object carries the
source's Patient/Study modules (copied by highdicom); vol3d never prints them and
names the file by the pseudonymous case id. Pass ``--no-dicom-seg`` to skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from preprocess.types import Candidate

#: SNOMED CT codes of known class names (segmented property type), else "Anatomical Structure".
_PROPERTY_TYPE = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
    "lung": ("39607008", "Lung"), "spine": ("421060004", "Spine"), "aorta": ("15825003", "Aorta"),
    "lesion": ("52988006", "Lesion"), "heart": ("80891009", "Heart"), "pancreas": ("15776009", "Pancreas"),
    "bladder": ("89837001", "Urinary bladder"), "brain": ("12738006", "Brain"),
}  # fmt: skip
_ANATOMY = ("91723000", "Anatomical Structure")
_ABNORMAL = ("49755003", "Morphologically Abnormal Structure")


class SegNotWritable(Exception):
    """The series' geometry does not let SEG frames map one-to-one onto source instances."""


def _code(value: tuple[str, str]):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value[0], scheme_designator="SCT", meaning=value[1])


def segment_descriptions(class_names: Sequence[str], algorithm_version: str) -> list:
    """One ``SegmentDescription`` per foreground class (segment number = label value)."""
    import highdicom as hd

    algo = hd.AlgorithmIdentificationSequence(name="vol3d", version=algorithm_version,
                                              family=_code(("123109001", "Artificial Intelligence")))  # fmt: skip
    out = []
    for value, name in enumerate(class_names):
        if value == 0:
            continue
        base = name.lower().split("_")[0]
        ptype = _PROPERTY_TYPE.get(base, _ANATOMY)
        category = _ABNORMAL if base == "lesion" else _ANATOMY
        out.append(hd.seg.SegmentDescription(
            segment_number=value, segment_label=name[:64], segmented_property_category=_code(category),
            segmented_property_type=_code(ptype), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        ))
    return out


def source_datasets(candidate: Candidate) -> list:
    """The source instances in stacking order (one per slice of the loaded array), headers only."""
    import pydicom

    ex = candidate.extra
    if ex.get("resample"):
        raise SegNotWritable("the series was resampled onto a regular grid at load (gantry tilt or uneven "
                             "slice spacing), so its slices are not the source instances")
    slices = ex.get("slices") or []
    if any(frame >= 0 for _, frame in slices):
        raise SegNotWritable("multi-frame source images are not supported for DICOM SEG output yet")
    return [pydicom.dcmread(candidate.source_files[fi], stop_before_pixels=True) for fi, _ in slices]


def write_dicom_seg(mask: np.ndarray, candidate: Candidate, class_names: Sequence[str], out_path: Path,
                    algorithm_version: str = "") -> Path:
    """Write a BINARY DICOM SEG of ``mask`` (uint8 ``(X, Y, Z)`` on the original grid) to ``out_path``.

    Raises :class:`SegNotWritable` when frames cannot be tied to source instances.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from vol3d import __version__

    sources = source_datasets(candidate)
    if len(sources) != mask.shape[2]:
        raise SegNotWritable(f"the mask has {mask.shape[2]} slices but the series {len(sources)} instances")
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0)))  # (slices, rows, cols)
    if frames.max() >= len(class_names):
        raise ValueError(f"mask value {int(frames.max())} has no class name (classes: {list(class_names)})")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, algorithm_version or __version__),
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="vol3d",
        manufacturer_model_name="vol3d predict",
        software_versions=__version__,
        device_serial_number="0",
        series_description="vol3d segmentation",
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path
