"""Write a synthetic hospital export: DICOM/NIfTI images plus the side tables and ground truth.

Layout and join keys: docs/formats.md section 1; details and figures: docs/synth.md.
Everything is drawn from ``numpy.random.default_rng([seed, ...])`` streams and UIDs
from ``pydicom.uid.generate_uid(entropy_srcs=...)``, so one seed always writes the
same pixel data, UIDs and tables, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from preprocess.errors import ConfigError
from preprocess.geometry import affine_from_dicom, box_corners, boxes_voxel_to_world, mask_to_box
from preprocess.ingest.discover import IGNORE_FILE
from vol3d.synth import brain
from vol3d.synth import phantom as ph
from vol3d.synth import reports as abdomen_reports
from vol3d.synth.reports import finding_sizes, patient_codes

Modality = Literal["ct", "mr"]
AnatomyName = Literal["abdomen", "brain"]


@dataclasses.dataclass
class SynthConfig:
    # Number of studies (cases) to write; some patients have a follow-up study.
    cases: int = 10
    # Seed of every random draw: the same seed writes the same files.
    seed: int = 0
    # "realistic": 384-512 matrix, 0.6-0.9 mm pixels, 1-5 mm slices; "small": ~64-96 voxels at 4-6 mm.
    size: Literal["small", "realistic"] = "realistic"
    # Image modality: CT (HU) or MR (arbitrary units, T1/T2/FLAIR of the head; T1 of the abdomen).
    modality: Modality = "ct"
    # Anatomy: "abdomen" (chest/abdomen) or "brain" (head); null: abdomen for CT, brain for MR.
    anatomy: AnatomyName | None = None
    # Fraction of cases exported as NIfTI (with a JSON sidecar) instead of DICOM.
    nifti_fraction: float = 0.2
    # Worker processes; 0 means one per CPU core (at most 8).
    workers: int = 0

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise ConfigError(f"synth.cases must be >= 1, got {self.cases}")
        if not 0.0 <= self.nifti_fraction <= 1.0:
            raise ConfigError(f"synth.nifti_fraction must be in [0, 1], got {self.nifti_fraction}")
        if self.size not in ("small", "realistic"):
            raise ConfigError(f"synth.size must be 'small' or 'realistic', got {self.size!r}")
        if self.modality not in ("ct", "mr"):
            raise ConfigError(f"synth.modality must be 'ct' or 'mr', got {self.modality!r}")
        if self.anatomy is None:
            self.anatomy = "brain" if self.modality == "mr" else "abdomen"
        if self.anatomy not in ANATOMIES:
            raise ConfigError(f"synth.anatomy must be one of {sorted(ANATOMIES)}, got {self.anatomy!r}")
        if self.workers < 0:
            raise ConfigError(f"synth.workers must be >= 0, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class SizePreset:
    """Acquisition parameters of one ``--size``."""

    matrices: tuple[int, ...]  # in-plane matrix sizes to draw from
    pixel_spacing: tuple[float, float]  # in-plane spacing range (mm); chosen to fit the body
    slice_steps: tuple[float, ...]  # slice spacing = thickness (mm) to draw from
    coronal_steps: tuple[float, ...]
    max_slices: int
    min_lesion_mm: float  # findings stay visible: at least ~2.5 in-plane voxels across
    recon_step: float  # slice step of the thick second reconstruction (mm)
    noise_sd: float  # CT noise (HU); MR noise is scaled from it
    blur_sigma: float  # in-plane partial-volume blur (voxels)
    scout_spacing: float  # scout pixel size (mm)
    nifti_ext: str  # ".nii" at realistic size: gzip of a noisy 100 MB volume costs seconds
    # MR head: slice spacing (mm), in-plane matrices and pixel range (mm) of the 2D T2 and FLAIR series
    # (the T1 uses the fields above)
    sequence_steps: tuple[float, ...] = ()
    sequence_matrices: tuple[int, ...] = ()
    sequence_pixel_spacing: tuple[float, float] = (0.0, 0.0)


PRESETS: dict[str, SizePreset] = {
    "realistic": SizePreset(
        matrices=(512, 512, 512, 512, 384),
        pixel_spacing=(0.6, 0.9),
        slice_steps=(1.0, 1.25, 1.5, 2.0, 2.5, 2.5, 3.0, 3.0, 5.0, 5.0),
        coronal_steps=(2.0, 2.5, 3.0),
        max_slices=250,
        min_lesion_mm=8.0,
        recon_step=5.0,
        noise_sd=12.0,
        blur_sigma=0.6,
        scout_spacing=1.0,
        nifti_ext=".nii",
    ),
    "small": SizePreset(
        matrices=(64, 72, 80, 96),
        pixel_spacing=(4.0, 6.0),
        slice_steps=(5.0, 6.0, 7.0),
        coronal_steps=(5.0, 6.0),
        max_slices=48,
        min_lesion_mm=15.0,
        recon_step=10.0,
        noise_sd=8.0,
        blur_sigma=0.5,
        scout_spacing=4.0,
        nifti_ext=".nii.gz",
    ),
}

#: Size presets of the head: a 3D T1 (near-isotropic) plus thick-slice 2D T2 and FLAIR.
BRAIN_PRESETS: dict[str, SizePreset] = {
    "realistic": SizePreset(
        matrices=(256, 256, 240),
        pixel_spacing=(0.9, 1.0),
        slice_steps=(1.0, 1.0, 1.2),
        coronal_steps=(1.0, 1.2),
        max_slices=224,
        min_lesion_mm=5.0,
        recon_step=0.0,
        noise_sd=12.0,
        blur_sigma=0.6,
        scout_spacing=1.0,
        nifti_ext=".nii",
        sequence_steps=(3.0, 4.0, 5.0),
        sequence_matrices=(384, 448, 512),
        sequence_pixel_spacing=(0.45, 1.0),
    ),
    "small": SizePreset(
        matrices=(64, 72, 80),
        pixel_spacing=(2.6, 3.6),
        slice_steps=(3.0, 3.5, 4.0),
        coronal_steps=(3.0, 4.0),
        max_slices=72,
        min_lesion_mm=9.0,
        recon_step=0.0,
        noise_sd=8.0,
        blur_sigma=0.5,
        scout_spacing=3.0,
        nifti_ext=".nii.gz",
        sequence_steps=(5.0, 6.0),
        sequence_matrices=(64, 72, 80),
        sequence_pixel_spacing=(2.08, 3.6),
    ),
}


@dataclasses.dataclass(frozen=True)
class AnatomyKind:
    """What differs between the synthetic anatomies: tables, patient model, sizes, reports, wording."""

    atlas: ph.Atlas
    sample: Callable[[np.random.Generator, Sequence[str]], ph.Anatomy]
    write_report: Callable[[Sequence[dict], np.random.Generator], tuple[str, str]]
    presets: dict[str, SizePreset]
    planes: dict[str, float]  # share of studies acquired in each plane of the primary series
    study_descriptions: dict[str, tuple[str, ...]]  # by modality
    body_part: str


def _sample_abdomen(rng: np.random.Generator, kinds: Sequence[str]) -> ph.Anatomy:
    return ph.sample_anatomy(rng, spleen_scale=rng.uniform(1.45, 1.7) if "splenomegaly" in kinds else 1.0)


ANATOMIES: dict[str, AnatomyKind] = {
    "abdomen": AnatomyKind(
        ph.ABDOMEN, _sample_abdomen, abdomen_reports.write_report, PRESETS,
        {"axial": 0.5, "axial_ffs": 0.2, "coronal": 0.15, "oblique": 0.15},
        {"CT": ("CT CHEST ABDOMEN W CONTRAST", "CT ABD/PELVIS WITH IV CONTRAST", "CT TORSO PORTAL VENOUS"),
         "MR": ("MR ABDOMEN W/WO CONTRAST", "MRI LIVER PROTOCOL")},
        "ABDOMEN",
    ),
    "brain": AnatomyKind(
        brain.ATLAS, brain.sample_anatomy, brain.write_report, BRAIN_PRESETS,
        {"axial": 0.45, "sagittal": 0.25, "coronal": 0.1, "oblique": 0.2},
        {"CT": ("CT HEAD WITHOUT CONTRAST", "CT BRAIN"),
         "MR": ("MRI BRAIN W/WO CONTRAST", "MR HEAD WITHOUT CONTRAST", "MRI BRAIN PROTOCOL")},
        "HEAD",
    ),
}  # fmt: skip

#: MR sequences of a head study and the DICOM tags a scanner writes for each (TR/TE/TI in ms).
MR_SEQUENCES: dict[str, dict[str, object]] = {
    "T1": {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "ScanOptions": "IR",
           "MRAcquisitionType": "3D", "SequenceName": "*tfl3d1_16ns", "RepetitionTime": "2300",
           "EchoTime": "2.98", "InversionTime": "900", "FlipAngle": "9", "EchoTrainLength": 1},
    "T2": {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "ScanOptions": "",
           "MRAcquisitionType": "2D", "SequenceName": "*tse2d1_15", "RepetitionTime": "5000",
           "EchoTime": "95", "FlipAngle": "150", "EchoTrainLength": 15},
    "FLAIR": {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR",
              "MRAcquisitionType": "2D", "SequenceName": "*tir2d1_21", "RepetitionTime": "9000",
              "EchoTime": "85", "InversionTime": "2500", "FlipAngle": "150", "EchoTrainLength": 21},
}  # fmt: skip

_FIRST = (
    "JANE",
    "JOHN",
    "MARIA",
    "ROBERT",
    "LINDA",
    "JAMES",
    "SUSAN",
    "DAVID",
    "KAREN",
    "MICHAEL",
    "ANNA",
    "PETER",
)
_LAST = (
    "DOE",
    "ROE",
    "SMITHFIELD",
    "MARLOWE",
    "QUILL",
    "HARTWELL",
    "BRANSON",
    "OKAFOR",
    "LINDQVIST",
    "TANAKA",
)


# ----------------------------------------------------------------------------- acquisitions


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """One image grid as a scanner would write it (DICOM conventions, LPS).

    The array is ``(X=columns, Y=rows, Z=slices)`` with slices sorted along the slice
    normal ``row_cos x col_cos`` (the order SimpleITK/GDCM and vol3d's ingest stack them).
    """

    plane: str  # axial | coronal | oblique | localizer
    row_cos: tuple[float, float, float]  # direction of increasing column index (LPS)
    col_cos: tuple[float, float, float]  # direction of increasing row index (LPS)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    step: float  # slice spacing along the normal (mm)
    shape: tuple[int, int, int]  # (columns, rows, slices)
    first_lps: tuple[float, float, float]  # ImagePositionPatient of slice 0
    patient_position: str = "HFS"

    @property
    def orientation(self) -> list[float]:
        return [*self.row_cos, *self.col_cos]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` index -> RAS+ mm, as :func:`preprocess.geometry.affine_from_dicom` gives it."""
        return affine_from_dicom(
            self.first_lps, self.orientation, self.pixel_spacing, self.normal * self.step
        )

    def positions_lps(self) -> np.ndarray:
        """ImagePositionPatient of every slice ``(Z, 3)``."""
        from vol3d.synth.dicom_writer import slice_positions  # pydicom loads only when writing

        return slice_positions(self.first_lps, self.normal * self.step, self.shape[2])


def _ras_box_corners_lps(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a RAS box, in LPS."""
    return box_corners(np.concatenate([lo, hi]))[0] * np.array([-1.0, -1.0, 1.0])


def fit_grid(
    plane: str,
    row_cos: Sequence[float],
    col_cos: Sequence[float],
    spacing: Sequence[float],
    corners_lps: np.ndarray,
    counts: Sequence[int | None] = (None, None, None),
    patient_position: str = "HFS",
) -> Acquisition:
    """The grid with these axes and ``spacing`` (column, row, slice mm) centred on ``corners_lps``.

    An axis with a given count keeps it (e.g. a 512 matrix); otherwise it is sized to
    cover the projection of the corners.
    """
    axes = [np.asarray(row_cos, float), np.asarray(col_cos, float)]
    axes.append(np.cross(axes[0], axes[1]))
    first = np.zeros(3)
    shape = []
    for axis, s, n in zip(axes, spacing, counts, strict=True):
        proj = corners_lps @ axis
        lo, hi = proj.min(), proj.max()
        n = int(n) if n else int(np.ceil((hi - lo) / s)) + 1
        first += ((lo + hi) / 2 - (n - 1) / 2 * s) * axis
        shape.append(n)
    return Acquisition(
        plane,
        tuple(float(v) for v in axes[0]),
        tuple(float(v) for v in axes[1]),
        (float(spacing[1]), float(spacing[0])),
        float(spacing[2]),
        (shape[0], shape[1], shape[2]),
        tuple(float(round(v, 3)) for v in first),
        patient_position,
    )


def plan_primary(
    rng: np.random.Generator,
    anatomy: ph.Anatomy,
    preset: SizePreset,
    plane: str,
    step: float | None = None,
    matrices: Sequence[int] = (),
    pixel_spacing: Sequence[float] = (),
) -> Acquisition:
    """Draw a volume's grid: covers the body and ``anatomy.z_cover``, up to the lungs (or the vertex)
    if slices allow. ``step``, ``matrices`` and ``pixel_spacing`` (lo, hi mm) replace the preset's (the head's
    2D T2/FLAIR series)."""
    body_lo, body_hi = anatomy.body.world_bounds()
    margin = 12.0
    z_lo = anatomy.z_cover[0]
    if step is not None:
        step = float(step)
    elif plane in ("coronal", "sagittal"):
        step = float(rng.choice(preset.coronal_steps))
    else:
        step = float(rng.choice(preset.slice_steps))
    # Extend upwards towards the lung apices as far as the slice budget allows.
    z_budget = z_lo + step * (preset.max_slices - 1) * (0.8 if plane == "oblique" else 1.0)
    z_hi = max(anatomy.z_cover[1], min(anatomy.z_top, z_budget) - rng.uniform(0, 30))
    lo = np.array([body_lo[0] - margin, body_lo[1] - margin, z_lo])
    hi = np.array([body_hi[0] + margin, body_hi[1] + margin, z_hi])
    corners = _ras_box_corners_lps(lo, hi)
    n = int(rng.choice(matrices or preset.matrices))
    need = (hi[1] - lo[1] if plane == "sagittal" else hi[0] - lo[0]) / n
    p_lo, p_hi = pixel_spacing or preset.pixel_spacing
    ps = float(np.round(np.clip(rng.uniform(need, need + 0.1 * p_lo), p_lo, p_hi), 3))
    if plane == "sagittal":  # rows run anterior -> posterior, columns head -> feet; slices right -> left
        return fit_grid(plane, (0, 1, 0), (0, 0, -1), (ps, ps, step), corners, (n, None, None))
    if plane == "coronal":
        return fit_grid(plane, (1, 0, 0), (0, 0, -1), (ps, ps, step), corners, (n, None, None))
    if plane == "oblique":
        t = np.deg2rad(rng.uniform(10, 20) * rng.choice([-1, 1]))
        return fit_grid(plane, (1, 0, 0), (0, np.cos(t), np.sin(t)), (ps, ps, step), corners, (n, None, None))
    if plane == "axial_ffs":
        return fit_grid("axial", (-1, 0, 0), (0, 1, 0), (ps, ps, step), corners, (n, n, None), "FFS")
    return fit_grid("axial", (1, 0, 0), (0, 1, 0), (ps, ps, step), corners, (n, n, None), "HFS")


def plan_recon(primary: Acquisition, step: float) -> Acquisition:
    """A thicker reconstruction of the same slab (same in-plane grid and z range)."""
    nz = int(np.floor((primary.shape[2] - 1) * primary.step / step)) + 1
    return dataclasses.replace(primary, step=step, shape=(primary.shape[0], primary.shape[1], nz))


def plan_scout(anatomy: ph.Anatomy, spacing: float) -> tuple[Acquisition, Acquisition]:
    """``(projection volume, scout plane)``: a coronal localizer whose pixels are the mean along AP."""
    body_lo, body_hi = anatomy.body.world_bounds()
    z_lo, z_hi = anatomy.z_cover[0] - 40, anatomy.z_top + 20
    lo = np.array([body_lo[0] - 20, body_lo[1], z_lo])
    hi = np.array([body_hi[0] + 20, body_hi[1], z_hi])
    corners = _ras_box_corners_lps(lo, hi)
    proj = fit_grid("localizer", (1, 0, 0), (0, 0, -1), (spacing, spacing, max(spacing, 8.0)), corners)
    mid = proj.positions_lps()[proj.shape[2] // 2]
    scout = dataclasses.replace(
        proj, shape=(proj.shape[0], proj.shape[1], 1), first_lps=tuple(float(v) for v in mid)
    )
    return proj, scout


# ----------------------------------------------------------------------------- case plans


@dataclasses.dataclass
class SeriesPlan:
    """One series (or NIfTI file) of a study, and what a correct ingest does with it."""

    role: str  # volume | second_recon | sequence (another MR sequence of the study) | localizer
    acq: Acquisition
    uid: str
    number: int
    description: str
    thickness: float
    dir: str  # folder relative to OUT
    prefix: str  # file name prefix
    extension: str
    descending: bool  # InstanceNumber decreases along the stacking order
    contrast: str = "CT"  # "CT", or the MR sequence ("T1", "T2", "FLAIR")
    gain: float = 1.0  # MR: the series' arbitrary intensity scale
    bias: tuple[float, ...] = ()  # MR: coil bias field coefficients (see _bias_field); () none


@dataclasses.dataclass
class CasePlan:
    """Everything drawn for one study; rendering and writing it needs nothing else."""

    index: int
    name: str
    fmt: str  # dicom | nifti
    modality: str  # CT | MR
    patient: dict[str, str]
    study: dict[str, str]
    anatomy: ph.Anatomy
    findings: list[ph.Finding]
    series: list[SeriesPlan]
    rescale: tuple[float, float]
    padding_hu: float | None  # CT pixels outside the reconstruction circle (PixelPaddingValue)
    follow_up_of: str | None
    preset: SizePreset
    seed: int


def _spread(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Boolean ``(n,)`` with ``round(fraction * n)`` Trues at random places (at least 1 when n >= 4).

    Exact counts instead of independent coin flips, so a few cases already show every variant.
    """
    k = int(round(fraction * n))
    if fraction > 0 and n >= 4:
        k = max(k, 1)
    out = np.zeros(n, dtype=bool)
    out[rng.permutation(n)[:k]] = True
    return out


def _categorical(rng: np.random.Generator, n: int, probs: dict[str, float]) -> list[str]:
    """``n`` labels with counts proportional to ``probs`` (every label at least once when n allows)."""
    names = list(probs)
    p = np.array([probs[k] for k in names])
    counts = np.floor(p * n).astype(int)
    for i in np.argsort(-(p * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    for i in range(len(names)):
        if counts[i] == 0 and n >= len(names) + 2 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    labels = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    return [labels[i] for i in rng.permutation(n)]


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["vol3d-synth", str(seed), *map(str, parts)])


def _patient(rng: np.random.Generator, number: int) -> dict[str, str]:
    sex = str(rng.choice(["F", "M"]))
    first = str(rng.choice(_FIRST))
    year, month, day = int(rng.integers(1940, 2001)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return {
        "PatientName": f"{rng.choice(_LAST)}^{first}",
        "PatientID": f"MRN{number:07d}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "PatientSex": sex,
    }


def _findings(
    rng: np.random.Generator, anatomy: ph.Anatomy, kinds: Sequence[str], min_mm: float
) -> list[ph.Finding]:
    atlas = anatomy.atlas
    out: list[ph.Finding] = []
    for kind in kinds:
        spec = atlas.findings[kind]
        if not atlas.vocab_findings[kind].get("countable", True):  # a condition: the organ itself
            out.append(ph.Finding(kind, spec["organs"][0], None))
            continue
        if atlas is ph.ABDOMEN:  # the draws of earlier versions, so a seed writes the same abdomen data
            count = {"kidney_cyst": int(rng.choice([1, 1, 2]))}.get(kind, int(rng.choice([1, 1, 1, 2, 3])))
        else:
            count = int(rng.choice(spec["counts"]))
        for _ in range(count):
            f = ph.sample_lesion(rng, anatomy, kind, min_mm, avoid=out)
            if f is not None:
                out.append(f)
    return out


def plan_cases(cfg: SynthConfig) -> list[CasePlan]:
    """Draw every case (cheap: no pixels). Variants are spread so that few cases show them all."""
    rng = np.random.default_rng([cfg.seed, 0])
    n = cfg.cases
    kind = ANATOMIES[cfg.anatomy or "abdomen"]
    atlas = kind.atlas
    preset = kind.presets[cfg.size]
    modality = cfg.modality.upper()
    nifti = _spread(rng, n, cfg.nifti_fraction)
    planes = _categorical(rng, n, kind.planes)
    normal = _spread(rng, n, 0.35)
    follow = _spread(rng, n, 0.15)
    follow[0] = False
    dicom_idx = np.flatnonzero(~nifti)
    nd = len(dicom_idx)
    flags = {
        name: np.zeros(n, bool)
        for name in ("scout", "shared", "recon", "noext", "flat", "desc", "pad", "signed")
    }
    for name, frac in (
        ("scout", 0.5),
        ("recon", 0.3),
        ("noext", 0.3),
        ("flat", 0.2),
        ("desc", 0.5),
        ("signed", 0.2),
    ):
        flags[name][dicom_idx] = _spread(rng, nd, frac)
    scouts = np.flatnonzero(flags["scout"])
    flags["shared"][scouts] = _spread(rng, len(scouts), 0.4)
    if modality == "CT":
        flags["pad"][dicom_idx] = _spread(rng, nd, 0.3)
    mrns = rng.choice(9_000_000, size=n, replace=False) + 100_000
    acc0 = int(rng.integers(1000, 5000))
    plans: list[CasePlan] = []
    patients: list[tuple[dict[str, str], ph.Anatomy, list[ph.Finding], str]] = []
    for i in range(n):
        crng = np.random.default_rng([cfg.seed, 1, i])
        name = f"case{i + 1:04d}"
        if follow[i] and patients:
            patient, anatomy, prior, prior_name = patients[-1]
            findings = [ph.grow(f, crng.uniform(1.0, 1.2)) for f in prior]
            follow_up_of = prior_name
        else:
            kinds: list[str] = []
            if not normal[i]:
                n_kinds = int(crng.choice([1, 1, 1, 2, 2, 3]))
                names = list(atlas.findings)
                weights = [atlas.findings[k]["probability"] for k in names]
                kinds = [str(k) for k in crng.choice(names, n_kinds, replace=False, p=weights)]
            anatomy = kind.sample(crng, kinds)
            findings = _findings(crng, anatomy, kinds, preset.min_lesion_mm)
            patient = _patient(crng, int(mrns[i]))
            follow_up_of = None
        patients.append((patient, anatomy, findings, name))
        year = 2024 + i * 3 // max(n, 1)
        study = {
            "StudyInstanceUID": _uid(cfg.seed, i, "study"),
            "FrameOfReferenceUID": _uid(cfg.seed, i, "frame"),
            "AccessionNumber": f"ACC{year}{acc0 + i:04d}",
            "StudyDate": f"{year}{int(crng.integers(1, 13)):02d}{int(crng.integers(1, 29)):02d}",
            "StudyTime": f"{int(crng.integers(7, 19)):02d}{int(crng.integers(0, 60)):02d}00",
            "StudyDescription": str(crng.choice(kind.study_descriptions[modality])),
            "StudyID": str(int(crng.integers(1000, 9999))),
            "ReferringPhysicianName": f"{crng.choice(_LAST)}^{crng.choice(_FIRST)}^^DR",
        }
        fmt = "nifti" if nifti[i] else "dicom"
        primary = plan_primary(crng, anatomy, preset, planes[i])
        if modality == "MR" and atlas.name == "brain":
            study["MagneticFieldStrength"] = str(crng.choice(["1.5", "3"]))
        ext = "" if flags["noext"][i] else ".dcm"
        study_dir = f"dicom/ST{i + 1:04d}"
        thk = primary.step
        kernel = "B30f" if crng.uniform() < 0.5 else "STANDARD"
        desc = {"axial": f"AX {thk:g}mm {kernel}", "coronal": f"COR {thk:g}mm", "oblique": f"OBL {thk:g}mm",
                "sagittal": f"SAG {thk:g}mm"}[
            primary.plane
        ]
        head_mr = modality == "MR" and atlas.name == "brain"
        if head_mr:
            desc = f"T1 MPRAGE {primary.plane.upper()[:3]}"
        elif modality == "MR":
            desc = f"T1 VIBE {primary.plane.upper()} POST"
        if atlas.name == "brain" and modality == "CT":
            desc = f"HEAD {thk:g}mm {'H30s' if kernel == 'B30f' else 'STANDARD'}"
        number = 2 if flags["scout"][i] and not flags["shared"][i] else 1

        def series_dir(num: int, flat: bool = bool(flags["flat"][i]), root: str = study_dir) -> str:
            return root if flat else f"{root}/SE{num:02d}"

        vol_uid = _uid(cfg.seed, i, "series", "volume")
        series = [
            SeriesPlan(
                "volume",
                primary,
                vol_uid,
                number,
                desc,
                thk,
                series_dir(number) if fmt == "dicom" else "nifti",
                f"IM{number:02d}_" if flags["flat"][i] else "IM",
                ext,
                bool(flags["desc"][i]),
                contrast="T1" if modality == "MR" else "CT",
                **(_mr_intensity(crng) if head_mr else {}),
            )
        ]
        if head_mr:  # 2D T2 and FLAIR of the same head, axial (or tilted with an oblique T1), thick slices
            for contrast in ("T2", "FLAIR"):
                num = series[-1].number + 1
                acq = plan_primary(crng, anatomy, preset, "oblique" if primary.plane == "oblique" else "axial",
                                   step=float(crng.choice(preset.sequence_steps)), matrices=preset.sequence_matrices,
                                   pixel_spacing=preset.sequence_pixel_spacing)
                series.append(SeriesPlan(
                    "sequence",
                    acq,
                    _uid(cfg.seed, i, "series", contrast),
                    num,
                    f"{contrast} {'TSE' if contrast == 'T2' else 'TIRM'} {acq.plane.upper()[:3]}",
                    acq.step,
                    series_dir(num) if fmt == "dicom" else "nifti",
                    f"IM{num:02d}_" if flags["flat"][i] else "IM",
                    ext,
                    bool(flags["desc"][i]),
                    contrast=contrast,
                    **_mr_intensity(crng),
                ))  # fmt: skip
        if flags["recon"][i] and primary.step < preset.recon_step:
            recon = plan_recon(primary, preset.recon_step)
            num = number + 1
            series.append(
                SeriesPlan(
                    "second_recon",
                    recon,
                    _uid(cfg.seed, i, "series", "recon"),
                    num,
                    f"AX {preset.recon_step:g}mm {kernel}",
                    preset.recon_step,
                    series_dir(num),
                    f"IM{num:02d}_" if flags["flat"][i] else "IM",
                    ext,
                    bool(flags["desc"][i]),
                    contrast=series[0].contrast,
                )
            )
        if flags["scout"][i]:
            _, scout = plan_scout(anatomy, preset.scout_spacing)
            shared = bool(flags["shared"][i])
            series.append(
                SeriesPlan(
                    "localizer",
                    scout,
                    vol_uid if shared else _uid(cfg.seed, i, "series", "scout"),
                    number if shared else 1,
                    "Topogram 0.6 T20f" if modality == "CT" else "3-plane localizer",
                    float(preset.scout_spacing),
                    series[0].dir if shared else series_dir(1),
                    "SC",
                    ext,
                    False,
                    contrast="CT" if modality == "CT" else "T1",
                )
            )
        plans.append(
            CasePlan(
                index=i,
                name=name,
                fmt=fmt,
                modality=modality,
                patient=patient,
                study=study,
                anatomy=anatomy,
                findings=findings,
                series=series,
                rescale=(1.0, 0.0) if flags["signed"][i] or modality == "MR" else (1.0, -1024.0),
                padding_hu=-3024.0 if flags["pad"][i] and primary.plane == "axial" else None,
                follow_up_of=follow_up_of,
                preset=preset,
                seed=cfg.seed,
            )
        )
    return plans


# ----------------------------------------------------------------------------- rendering


def _blur_inplane(plane: np.ndarray) -> np.ndarray:
    """Partial-volume blur of one slice ``(X, Y)``: binomial [1, 2, 1] / 4 along both axes (edges replicated)."""
    out = plane * np.float32(0.5)
    out[1:] += plane[:-1] * np.float32(0.25)
    out[:-1] += plane[1:] * np.float32(0.25)
    out[0] += plane[0] * np.float32(0.25)
    out[-1] += plane[-1] * np.float32(0.25)
    res = out * np.float32(0.5)
    res[:, 1:] += out[:, :-1] * np.float32(0.25)
    res[:, :-1] += out[:, 1:] * np.float32(0.25)
    res[:, 0] += out[:, 0] * np.float32(0.25)
    res[:, -1] += out[:, -1] * np.float32(0.25)
    return res


def _noise_slab(rng: np.random.Generator, nx: int, ny: int, sd: float, depth: int = 12) -> np.ndarray:
    """Correlated noise planes ``(X, Y, depth)`` with standard deviation ``sd`` (CT noise has texture)."""
    from scipy import ndimage

    slab = rng.standard_normal((nx, ny, depth), dtype=np.float32)
    slab = ndimage.gaussian_filter(slab, (0.7, 0.7, 0.0))
    return np.asfortranarray(slab * np.float32(sd / max(float(slab.std()), 1e-6)))


def _mr_intensity(rng: np.random.Generator) -> dict[str, object]:
    """An MR series' arbitrary scale and coil bias: ``{"gain": g, "bias": (9 coefficients)}``.

    Real MR intensities have no unit: each series is scaled by its receiver gain (here 0.4-2.5x),
    and the coil's sensitivity makes one tissue brighter on one side (a smooth multiplicative field,
    here exp of a quadratic in world mm / 100: about 0.75-1.35 across a head).
    """
    gain = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
    coeffs = np.concatenate([rng.normal(0.0, 0.12, 3), rng.normal(0.0, 0.06, 6)])
    return {"gain": round(gain, 4), "bias": tuple(round(float(c), 4) for c in coeffs)}


def bias_field(coeffs: Sequence[float], points: np.ndarray, centre: Sequence[float]) -> np.ndarray:
    """Multiplicative coil bias at world points ``(..., 3)``: ``exp(c . [x, y, z, x², y², z², xy, yz, xz])``
    in units of 100 mm from ``centre``."""
    x, y, z = np.moveaxis((np.asarray(points, np.float32) - np.asarray(centre, np.float32)) / 100.0, -1, 0)
    terms = (x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
    return np.exp(sum(np.float32(c) * t for c, t in zip(coeffs, terms, strict=True))).astype(np.float32)


def _image(
    plan: CasePlan,
    s: SeriesPlan,
    acq: Acquisition,
    rendered: tuple[np.ndarray, np.ndarray, dict],
    rng: np.random.Generator,
) -> np.ndarray:
    """Final intensities float32 ``(X, Y, Z)`` (Fortran order): tissue means, lesions, blur, noise, range.

    CT: Gaussian noise in HU. MR: the series' coil bias and gain, then Rician noise (the magnitude of
    a complex signal with Gaussian noise in both parts, so air is not zero).

    Works slice by slice so every step runs on cache-sized arrays. Noise comes from one
    small slab of planes reused with random flips per slice: indistinguishable from fresh
    noise for our purposes, and far cheaper than a full-volume random field.
    """
    tissue, instances, windows = rendered
    ct = s.contrast == "CT"
    luts = ph.intensity_luts(plan.anatomy, plan.findings, s.contrast)
    nx, ny, nz = tissue.shape
    slab = _noise_slab(rng, nx, ny, plan.preset.noise_sd * (1.0 if ct else 2.0 * s.gain))
    pick = rng.integers(0, slab.shape[2], nz)
    flip = rng.integers(0, 4, nz)
    pick_imag = pick if ct else rng.integers(0, slab.shape[2], nz)  # (CT keeps the draws of earlier versions)
    lo, hi = (-1024.0, 3071.0) if ct else (0.0, 4095.0)
    outside = None
    if plan.padding_hu is not None and acq.plane == "axial":
        # Scanners write a padding value outside the circular reconstruction field of view.
        i = np.arange(nx) - (nx - 1) / 2
        j = np.arange(ny) - (ny - 1) / 2
        outside = (i[:, None] ** 2 + j[None, :] ** 2) > (min(nx, ny) / 2) ** 2
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij")
    values = np.empty((nx, ny, nz), dtype=np.float32, order="F")
    for k in range(nz):
        plane = _blur_inplane(ph.intensity_slice(k, tissue, instances, windows, luts))
        noise = slab[:, :, pick[k]]
        if flip[k] & 1:
            noise = noise[::-1]
        if flip[k] & 2:
            noise = noise[:, ::-1]
        if ct:
            plane += noise
        else:
            if s.bias:
                world = np.stack([ii, jj, np.full_like(ii, k)], axis=-1) @ acq.affine[:3, :3].T.astype(np.float32)
                world += acq.affine[:3, 3].astype(np.float32)
                plane *= bias_field(s.bias, world, plan.anatomy.body.center)
            plane *= np.float32(s.gain)
            imag = slab[:, :, pick_imag[k]][::-1, ::-1]
            plane = np.sqrt((plane + noise) ** 2 + imag**2)
        np.clip(plane, lo, hi, out=plane)
        if outside is not None:
            plane[outside] = plan.padding_hu
        values[:, :, k] = plane
    return values


def _boxes(
    instances: np.ndarray, windows: dict[int, tuple[slice, ...]], affine: np.ndarray
) -> dict[int, np.ndarray]:
    """``{instance: world RAS+ box (6,)}`` of the voxel extent of each finding present on this grid."""
    out = {}
    for k, win in windows.items():
        box = mask_to_box(instances[win] == k)
        if box is None:
            continue
        vox = box + np.array([s.start for s in win] * 2, dtype=float)
        out[k] = boxes_voxel_to_world(vox[None], affine)[0]
    return out


def _voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid (mL)."""
    return abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0


def _liver_lobe(f: ph.Finding, anatomy: ph.Anatomy) -> str:
    liver = anatomy.shape_of("liver")
    return "right" if f.shape is not None and f.shape.center[0] >= liver.center[0] - 10 else "left"


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _dicom_tags(plan: CasePlan, s: SeriesPlan) -> dict[str, object]:
    tags: dict[str, object] = {
        "PatientPosition": s.acq.patient_position,
        "ReferringPhysicianName": plan.study["ReferringPhysicianName"],
        "InstitutionName": "SYNTHETIC GENERAL HOSPITAL",
        "Manufacturer": "VOL3D SYNTH",
        "BodyPartExamined": "CHEST" if s.role == "localizer" and plan.anatomy.atlas.name == "abdomen"
        else ANATOMIES[plan.anatomy.atlas.name].body_part,
    }
    if plan.modality == "CT":
        tags["ConvolutionKernel"] = s.description.split()[-1] if s.role != "localizer" else "T20f"
        if plan.padding_hu is not None and s.role != "localizer":
            tags["PixelPaddingValue"] = int(plan.padding_hu - plan.rescale[1])
    elif plan.anatomy.atlas.name == "brain":
        field = plan.study.get("MagneticFieldStrength", "1.5")
        tags.update(MR_SEQUENCES["T1" if s.role == "localizer" else s.contrast])
        tags.update(MagneticFieldStrength=field, ImagedNucleus="1H",
                    ImagingFrequency="123.2" if field == "3" else "63.9")
        if s.role == "localizer":
            tags.update(MRAcquisitionType="2D", SequenceName="*fl2d1")
    else:
        tags.update(
            ScanningSequence="GR",
            SequenceVariant="SP",
            ScanOptions="",
            MRAcquisitionType="3D" if s.role != "localizer" else "2D",
            RepetitionTime="4.5",
            EchoTime="2.1",
            EchoTrainLength=1,
            MagneticFieldStrength="1.5",
            ImagedNucleus="1H",
        )
    return tags


def write_case(plan: CasePlan, out: str | Path) -> dict:
    """Render and write every series of one case; return its table rows and truth (plain data)."""
    from vol3d.synth.dicom_writer import write_series

    out = Path(out)
    rng = np.random.default_rng([plan.seed, 2, plan.index])
    text_rng = np.random.default_rng([plan.seed, 3, plan.index])
    series_truth, boxes_rows = [], []
    findings_truth: list[dict] = []
    ct = plan.modality == "CT"
    atlas = plan.anatomy.atlas
    midline = plan.anatomy.body.center[0]
    for s in plan.series:
        acq = s.acq
        key = s.uid if plan.fmt == "dicom" else f"{plan.name}_s{s.number}"
        if s.role == "localizer":
            proj_acq, _ = plan_scout(plan.anatomy, plan.preset.scout_spacing)
            proj = ph.render(plan.anatomy, plan.findings, proj_acq.affine, proj_acq.shape)
            # A projection radiograph: the mean along the antero-posterior rays.
            proj_values = _image(plan, s, proj_acq, proj, rng)
            values = np.asfortranarray(proj_values.mean(axis=2, keepdims=True))
            labels = rendered = None
        else:
            rendered = ph.render(plan.anatomy, plan.findings, acq.affine, acq.shape)
            labels = ph.label_map(*rendered[:2], plan.findings, rendered[2], atlas)
            values = _image(plan, s, acq, rendered, rng)
        if plan.fmt == "nifti":  # plan_cases gives NIfTI cases their volume(s) only, no scout
            stem = key
            ext = plan.preset.nifti_ext
            _write_nifti(
                out / "nifti" / f"{stem}{ext}", values.astype(np.int16 if ct else np.uint16), acq.affine
            )
            sidecar = {
                "Modality": plan.modality,
                "PatientID": plan.patient["PatientID"],
                "PatientName": plan.patient["PatientName"],
                "PatientBirthDate": plan.patient["PatientBirthDate"],
                "AccessionNumber": plan.study["AccessionNumber"],
                "StudyInstanceUID": plan.study["StudyInstanceUID"],
                "SeriesInstanceUID": s.uid,
                "SeriesNumber": s.number,
                "StudyDescription": plan.study["StudyDescription"],
                "SeriesDescription": s.description,
                "SliceThickness": s.thickness,
                "ImageOrientationPatientDICOM": [round(float(v), 6) for v in acq.orientation],
                "PatientPosition": acq.patient_position,
                "ConversionSoftware": "vol3d synth",
            }
            if not ct and atlas.name == "brain":  # as dcm2niix writes them: times in seconds
                seq = MR_SEQUENCES[s.contrast]
                sidecar |= {"MagneticFieldStrength": float(plan.study.get("MagneticFieldStrength", "1.5")),
                            "MRAcquisitionType": seq["MRAcquisitionType"], "SequenceName": seq["SequenceName"],
                            "EchoTime": float(str(seq["EchoTime"])) / 1000,
                            "RepetitionTime": float(str(seq["RepetitionTime"])) / 1000}
                if "InversionTime" in seq:
                    sidecar["InversionTime"] = float(str(seq["InversionTime"])) / 1000
            (out / "nifti" / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
            files = [f"nifti/{stem}{ext}"]
        else:
            nz = acq.shape[2]
            order = list(range(nz, 0, -1)) if s.descending else list(range(1, nz + 1))
            paths = write_series(
                out / s.dir,
                values,
                orientation=acq.orientation,
                pixel_spacing=acq.pixel_spacing,
                positions_lps=acq.positions_lps(),
                patient=plan.patient,
                study=plan.study,
                series_uid=s.uid,
                series_number=s.number,
                series_description=s.description,
                modality=plan.modality,
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
                if s.role == "localizer"
                else ("ORIGINAL", "PRIMARY", "AXIAL"),
                rescale=plan.rescale,
                slice_thickness=s.thickness,
                extension=s.extension,
                file_prefix=s.prefix,
                instance_order=order,
                extra_tags=_dicom_tags(plan, s),
                uid_entropy=["vol3d-synth", str(plan.seed), str(plan.index), s.role],
            )
            files = [p.relative_to(out).as_posix() for p in paths]
        entry = {
            "role": s.role,
            "key": key if s.role != "localizer" else None,
            "series_uid": s.uid,
            "series_number": s.number,
            "plane": acq.plane,
            "patient_position": acq.patient_position,
            "slice_thickness": s.thickness,
            "instance_order": "descending" if s.descending else "ascending",
            "files": files,
            "affine_ras": np.round(acq.affine, 6).tolist(),
            "shape": list(acq.shape),
            "expected": {"status": "skipped", "reason": "LOCALIZER"}
            if s.role == "localizer"
            else {"status": "ok"},
            "labels": None,
            "lesions": None,
            "shares_uid_with_volume": s.role == "localizer" and s.uid == plan.series[0].uid,
            "contrast": s.contrast,
        }
        if labels is not None and rendered is not None:
            instances = rendered[1]
            _write_nifti(out / "labels" / f"{key}.nii.gz", labels, acq.affine)
            _write_nifti(out / "lesions" / f"{key}.nii.gz", instances, acq.affine)
            entry["labels"], entry["lesions"] = f"labels/{key}.nii.gz", f"lesions/{key}.nii.gz"
            for k, world in _boxes(instances, rendered[2], acq.affine).items():
                f = plan.findings[k - 1]
                size = world[3:] - world[:3]
                box_mm = [round(float(v), 3) for v in world]
                size_mm = [round(float(v), 3) for v in size]
                boxes_rows.append(
                    {
                        "key": key,
                        "instance": k,
                        "finding": f.kind,
                        "organ": f.tissue,
                        "box_world_ras_mm": box_mm,
                        "size_mm": size_mm,
                    }
                )
                if s.role == "volume":
                    findings_truth.append(
                        {
                            "instance": k,
                            "finding": f.kind,
                            "organ": f.tissue,
                            "box_world_ras_mm": box_mm,
                            "size_mm": size_mm,
                            "report_sizes_mm": finding_sizes(
                                f.kind, size, atlas.findings,
                                volume_ml=float((instances == k).sum()) * _voxel_ml(acq.affine),
                            ),
                            "center_world_ras_mm": None
                            if f.shape is None
                            else [round(v, 3) for v in f.shape.center],
                            "lobe": _liver_lobe(f, plan.anatomy) if f.kind == "liver_lesion" else None,
                            "side": None if f.shape is None else "right" if f.shape.center[0] >= midline else "left",
                        }
                    )
        series_truth.append(entry)
    report_items = [
        {"finding": f["finding"], "organ": f["organ"], "sizes": f["report_sizes_mm"], "lobe": f["lobe"],
         "side": f["side"]}
        for f in findings_truth
    ]
    text, impression = ANATOMIES[atlas.name].write_report(report_items, text_rng)
    phi = {
        "PatientName": plan.patient["PatientName"],
        "PatientID": plan.patient["PatientID"],
        "PatientBirthDate": plan.patient["PatientBirthDate"],
        "AccessionNumber": plan.study["AccessionNumber"],
        "StudyDescription": plan.study["StudyDescription"],
        "ReferringPhysicianName": plan.study["ReferringPhysicianName"],
        "SeriesDescriptions": sorted({s.description for s in plan.series}),
    }
    truth = {
        "case": plan.name,
        "format": plan.fmt,
        "modality": plan.modality,
        "patient_id": plan.patient["PatientID"],
        "accession": plan.study["AccessionNumber"],
        "study_uid": plan.study["StudyInstanceUID"],
        "follow_up_of": plan.follow_up_of,
        "key": series_truth[0]["key"],
        "rescale": list(plan.rescale),
        "padding_hu": plan.padding_hu,
        "series": series_truth,
        "findings": findings_truth,
        "report": {"findings": text, "impression": impression},
        "phi": phi,
    }
    return {"truth": truth, "boxes": boxes_rows}


# ----------------------------------------------------------------------------- driver


def _workers(cfg: SynthConfig) -> int:
    n = cfg.workers or min(os.cpu_count() or 1, 8)
    return max(1, min(n, cfg.cases))


#: Everything :func:`generate` writes at the top of its folder: all that ``vol3d synth --overwrite`` deletes.
OWN_ENTRIES = ("dicom", "nifti", "labels", "lesions", "boxes.json", "vocab.json", "reports.csv", "ehr_codes.csv",
               "truth.json",
               IGNORE_FILE)  # fmt: skip


def is_export(out: str | Path) -> bool:
    """True when ``out`` holds an export written by :func:`generate`: its ``.vol3dignore`` and a
    ``truth.json`` whose ``generator`` is ``vol3d synth``."""
    out = Path(out)
    if not (out / IGNORE_FILE).is_file() or not (out / "truth.json").is_file():
        return False
    try:
        truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(truth, dict) and truth.get("generator") == "vol3d synth"


def remove_export(out: str | Path) -> None:
    """Delete what :func:`generate` wrote in ``out`` (:data:`OWN_ENTRIES`); any other file stays.
    Raises ``ValueError`` when ``out`` is not such an export (see :func:`is_export`)."""
    import shutil

    out = Path(out)
    if not is_export(out):
        raise ValueError(f"{out} is not a vol3d synth export (no {IGNORE_FILE} and truth.json)")
    # truth.json last: an interrupted removal still leaves a recognisable export behind
    for name in sorted(OWN_ENTRIES, key=lambda n: n == "truth.json"):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def generate(out: str | Path, cfg: SynthConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Write the whole export into ``out`` (which must exist and be empty). Returns truth.json's content.

    ``progress(n)`` is called once per finished case (for a progress bar).
    """
    out = Path(out)
    for sub in ("labels", "lesions", "nifti", "dicom"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plans = plan_cases(cfg)
    results: list[dict] = []
    if _workers(cfg) == 1:
        for p in plans:
            results.append(write_case(p, out))
            if progress:
                progress(1)
    else:
        with ProcessPoolExecutor(_workers(cfg)) as pool:
            for r in pool.map(write_case, plans, [out] * len(plans)):
                results.append(r)
                if progress:
                    progress(1)
    return _write_tables(out, cfg, plans, results)


def _write_tables(out: Path, cfg: SynthConfig, plans: list[CasePlan], results: list[dict]) -> dict:
    """boxes.json, vocab.json, reports.csv, ehr_codes.csv and truth.json (rows in case order: deterministic)."""
    from vol3d.synth.reports import vocabulary

    atlas = ANATOMIES[cfg.anatomy or "abdomen"].atlas
    boxes = [b for r in results for b in r["boxes"]]
    (out / "boxes.json").write_text(json.dumps(boxes, indent=1) + "\n")
    vocab = vocabulary(atlas.labels, atlas.findings, atlas.vocab_findings)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    with open(out / "reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["AccessionNumber", "Findings", "Impression"])
        for r in results:
            t = r["truth"]
            w.writerow([t["accession"], t["report"]["findings"], t["report"]["impression"]])
    # One row per (patient, code): the finding codes of all the patient's studies plus noise codes.
    by_patient: dict[str, list[str]] = {}
    for r in results:
        t = r["truth"]
        by_patient.setdefault(t["patient_id"], []).extend(f["finding"] for f in t["findings"])
    codes: dict[str, list[tuple[str, str]]] = {}
    with open(out / "ehr_codes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "Code", "Description"])
        for pid, kinds in by_patient.items():
            rng = np.random.default_rng([cfg.seed, 4, int(pid[3:])])
            codes[pid] = patient_codes(kinds, rng, atlas.findings)
            for code, desc in codes[pid]:
                w.writerow([pid, code, desc])
    cases = []
    for r in results:
        t = dict(r["truth"])
        t["codes"] = [c for c, _ in codes[t["patient_id"]]]
        cases.append(t)
    phi_strings = sorted(
        {v for c in cases for k, v in c["phi"].items() if k != "SeriesDescriptions"}
        | {d for c in cases for d in c["phi"]["SeriesDescriptions"]}
    )
    truth = {
        "generator": "vol3d synth",
        "config": dataclasses.asdict(cfg) | {"workers": None},
        "labels": list(atlas.labels),
        "report_size_measure": {
            "lesions": "[long, short] = larger and smaller world-box extent along x and y (mm, rounded)",
            "splenomegaly": "[craniocaudal] = world-box extent along z of the spleen mask (mm, rounded)",
            "hydrocephalus": "[volume] = voxels of the ventricles mask x voxel volume (mL, rounded)",
        },
        "label_note": "labels/ and lesions/ exist for every volume and second_recon series; none for localizers",
        "phi_strings": phi_strings,
        "cases": cases,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    # Ground truth sits beside the images, as in a real export: tell `vol3d preprocess OUT` it is not imaging.
    (out / IGNORE_FILE).write_text(
        "# side data of this export, not images (read by vol3d preprocess; see docs/ingest.md)\n"
        + "\n".join(("labels/*", "lesions/*", "boxes.json", "vocab.json", "truth.json", "*.csv"))
        + "\n"
    )
    return truth
