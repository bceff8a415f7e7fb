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
