"""Data passed between ingest, transforms and the store (torch-free).

Identifiers (PatientID, AccessionNumber, ...) live only in :class:`Identity`,
which is used to join side tables and compute keyed hashes, and is never written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True, repr=False)
class Identity:
    """Identifiers of a series. Used for joins and keyed hashes only; never written anywhere.

    ``repr`` is redacted so that logging a Candidate cannot leak an identifier.
    """

    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    accession: str = ""
    # only to scrub them from report text (preprocess.sanitise.scrub_report)
    patient_name: str = ""
    birth_date: str = ""  # DICOM DA, YYYYMMDD
    study_date: str = ""

    def __repr__(self) -> str:
        return "Identity(<redacted>)"


@dataclasses.dataclass(frozen=True, eq=False)
class Frames:
    """Where the voxels of an array are: the one geometry type that travels with the pixels, from
    :class:`~preprocess.transforms.Prepared` through the cache (``CaseReader.frames``, the
    ``frames`` of every CacheDataset item) to the model's input (``ModelInput.frames``).

    ``affine`` maps the array's index to RAS+ mm, ``to_orig`` its index to the continuous index of
    the original image (the scanner's grid, ``orig_shape`` voxels with ``orig_affine``). A crop,
    patch or pad of the array moves its frames with :meth:`shifted`; boxes ``(x0, y0, z0, x1, y1,
    z1)`` in its voxels map to world mm or to original voxels with :meth:`boxes_to_world` /
    :meth:`boxes_to_orig`.
    """

    affine: np.ndarray  # (4, 4) array index -> RAS+ mm
    to_orig: np.ndarray  # (4, 4) array index -> original continuous index
    orig_affine: np.ndarray  # (4, 4) original index -> RAS+ mm
    orig_shape: tuple[int, int, int]  # original (X, Y, Z)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frames):
            return NotImplemented
        return (tuple(self.orig_shape) == tuple(other.orig_shape)
                and all(np.array_equal(a, b) for a, b in ((self.affine, other.affine), (self.to_orig, other.to_orig),
                                                           (self.orig_affine, other.orig_affine))))

    __hash__ = None  # type: ignore[assignment]  (arrays: not hashable)

    def shifted(self, origin: np.ndarray | list[int] | tuple[int, ...]) -> Frames:
        """The frames of the sub-array whose voxel 0 is voxel ``origin`` (3,) of this one (negative: padded)."""
        t = np.eye(4)
        t[:3, 3] = np.asarray(origin, dtype=float)
        return dataclasses.replace(self, affine=self.affine @ t, to_orig=self.to_orig @ t)

    def boxes_to_world(self, boxes: np.ndarray) -> np.ndarray:
        """Axis-aligned RAS+ mm boxes ``(N, 6)`` enclosing voxel boxes ``(N, 6)`` of this array."""
        from preprocess.geometry import boxes_voxel_to_world

        return boxes_voxel_to_world(np.asarray(boxes, dtype=float).reshape(-1, 6), self.affine)

    def boxes_to_orig(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(N, 6)`` of this array in continuous voxels of the original image."""
        from preprocess.geometry import transform_boxes

        return transform_boxes(np.asarray(boxes, dtype=float).reshape(-1, 6), self.to_orig)

    def to_dict(self) -> dict[str, list]:
        """Plain JSON data (matrices as nested lists)."""
        return {"affine": np.asarray(self.affine).tolist(), "to_orig": np.asarray(self.to_orig).tolist(),
                "orig_affine": np.asarray(self.orig_affine).tolist(), "orig_shape": [int(n) for n in self.orig_shape]}

    @classmethod
    def from_dict(cls, d: dict) -> Frames:
        return cls(np.asarray(d["affine"], dtype=float), np.asarray(d["to_orig"], dtype=float),
                   np.asarray(d["orig_affine"], dtype=float), tuple(int(n) for n in d["orig_shape"]))  # type: ignore[arg-type]


@dataclasses.dataclass
class Image:
    """A loaded volume in its original grid.

    ``array`` is float32 ``(X, Y, Z)`` (or ``(C, X, Y, Z)``): for DICOM, columns x rows x
    slices in stacking order (sorted along the slice normal); for NIfTI/NRRD/MHA, the
    file's own array order as nibabel/SimpleITK give it. CT values are HU with
    RescaleSlope/Intercept applied exactly once. ``affine`` maps that array's index to
    RAS+ mm (see preprocess.geometry).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = ""
    flags: list[str] = dataclasses.field(default_factory=list)  # e.g. RESAMPLED_GANTRY_TILT


class SeriesError(Exception):
    """A series cannot be used. ``reason`` is a code from preprocess.reasons; ``detail`` a sentence
    that names the series (by its source path, never by an identifier) and the fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class Candidate:
    """One series or file found by a scan, before pixels are read.

    ``status`` is "ok" when it can be loaded, else "skipped"/"failed" with ``reason`` and
    ``detail`` already set. Candidates are plain, picklable data: a worker process turns
    one into an :class:`Image` with ``preprocess.ingest.load(candidate, config)``. ``key`` joins side data: the
    SeriesInstanceUID for DICOM, the file name without extension for NIfTI/NRRD/MHA
    (plus "#t" for the t-th volume of a split 4D file).
    """

    kind: str  # "dicom" | "nifti" | "nrrd" | "mha" | "file" (a row about one non-image/unreadable file)
    source: list[str]  # input paths relative to the scan root (posix), sorted
    key: str
    identity: Identity
    modality: str = ""
    status: str = "ok"
    reason: str = ""
    detail: str = ""
    label: str = ""  # short human description without PHI, e.g. "CT 512x512x180"
    source_files: list[Path] = dataclasses.field(default_factory=list, repr=False)  # absolute paths, read + hashed
    extra: dict = dataclasses.field(default_factory=dict, repr=False)  # ingest's own plain data (slice order ...)
    # SeriesDescription, ProtocolName, SequenceName (DICOM or sidecar): matched by ingest.series_include and
    # ingest.sequence_channels, never written (a description may name the patient)
    names: tuple[str, ...] = dataclasses.field(default=(), repr=False)
