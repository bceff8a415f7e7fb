"""Volume files: NIfTI, MGH/MGZ, MINC 1/2, Philips PAR/REC, AFNI BRIK/HEAD and Analyze/NIfTI pairs
(nibabel), NRRD and MHA/MHD (SimpleITK): header scan, 4D policy, loading.

Arrays keep the file's own axis order as ``(X, Y, Z)``: nibabel's array as stored, and
SimpleITK's ``(z, y, x)`` array transposed. Affines are RAS+: a NIfTI's sform (else its
qform) as nibabel gives it, and a NIfTI with neither fails (``NO_ORIENTATION``: nibabel's
fallback affine knows nothing of the patient); SimpleITK's LPS direction/origin through
:func:`preprocess.geometry.affine_from_itk`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from preprocess import reasons
from preprocess.config_io import flag_hint
from preprocess.geometry import affine_from_itk, spacing_from_affine
from preprocess.ingest.config import IngestConfig
from preprocess.ingest.discover import FoundFile, Inventory, volume_kind
from preprocess.types import Candidate, Identity, Image, SeriesError

#: Flag of a NIfTI whose sform and qform place the image differently (the sform is used).
FLAG_SFORM_QFORM_DISAGREE = "SFORM_QFORM_DISAGREE"
#: sform and qform disagree when a corner voxel lands this many voxels apart.
_FORM_TOL_VOXEL = 0.1

#: Kinds read with ``nibabel.load`` (the NIfTI branch's reading, without its sform/qform checks).
NIBABEL_KINDS = ("nifti", "mgh", "minc", "parrec", "afni", "analyze")
#: Data file endings of the two-file formats (header kind -> endings, tried in order next to the header).
DATA_FILES = {"parrec": (".rec",), "afni": (".brik", ".brik.gz"), "analyze": (".img", ".img.gz")}
#: Modality a format implies (PAR/REC is only ever written by Philips MR scanners).
FORMAT_MODALITY = {"parrec": "MR"}

_DATAFILE_RE = {
    ".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.M),
    ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.M | re.I),
}


def claim_companions(inv: Inventory) -> dict[str, tuple[FoundFile | None, list[FoundFile]]]:
    """Sidecar JSON and detached data files of each volume file, removed from ``inv.other``.

    Returns ``{volume rel: (sidecar or None, data files)}``. A sidecar is ``<stem>.json`` in
    the same folder (as dcm2niix writes it); data files are those an ``.mhd``/``.nhdr``
    header names (``ElementDataFile`` / ``data file``).
    """
    by_rel = {f.rel: f for f in inv.other}
    by_lower = {f.rel.lower(): f for f in inv.other}
    claimed: set[str] = set()
    out: dict[str, tuple[FoundFile | None, list[FoundFile]]] = {}
    for f, kind in inv.volumes:
        folder = f.rel.rsplit("/", 1)[0] + "/" if "/" in f.rel else ""
        stem = volume_kind(f.rel.rsplit("/", 1)[-1])[1]
        sidecar = by_rel.get(f"{folder}{stem}.json")
        data: list[FoundFile] = []
        for ending in DATA_FILES.get(kind, ()):  # case as the scanner wrote it: x.PAR with x.REC
            d = by_lower.get(f"{folder}{stem}{ending}".lower())
            if d is not None:
                data.append(d)
                break
        if kind == "analyze" and f"{folder}{stem}.mat".lower() in by_lower:  # SPM's affine of an Analyze pair
            data.append(by_lower[f"{folder}{stem}.mat".lower()])
        regex = next((r for ext, r in _DATAFILE_RE.items() if f.rel.lower().endswith(ext)), None)
        if regex is not None:
            try:
                text = f.path.read_bytes()[:65536].decode("latin-1")
            except OSError:
                text = ""
            m = regex.search(text)
            if m and m.group(1).split()[0] not in ("LOCAL", "LIST"):
                d = by_rel.get(folder + m.group(1))
                if d is not None:
                    data.append(d)
        claimed.update(x.rel for x in ([sidecar] if sidecar else []) + data)
        out[f.rel] = (sidecar, data)
    inv.other = [f for f in inv.other if f.rel not in claimed]
    return out


def _sidecar(sidecar: FoundFile | None) -> tuple[Identity, str, str, tuple[str, ...]]:
    """``(identity, modality, note, names)`` from a BIDS-style sidecar (note explains a bad sidecar; names
    are its SeriesDescription, ProtocolName and SequenceName)."""
    if sidecar is None:
        return Identity(), "", "", ()
    try:
        meta = json.loads(sidecar.path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return (
            Identity(),
            "",
            f"Note: sidecar {sidecar.rel} cannot be parsed ({exc}); identity and modality left empty.",
            (),
        )

    def get(k: str) -> str:
        v = meta.get(k, "")
        return "" if v is None else str(v)

    ident = Identity(
        get("PatientID"), get("StudyInstanceUID"), get("SeriesInstanceUID"), get("AccessionNumber"),
        get("PatientName"), get("PatientBirthDate"), get("StudyDate"),
    )
    return ident, get("Modality").upper(), "", tuple(get(k) for k in ("SeriesDescription", "ProtocolName",
                                                                      "SequenceName"))


def _pixels_load(path: Path, kind: str, parrec_scaling: str = "dv"):
    """The image whose pixels are read next: a gzipped single-file NIfTI is inflated whole by ISA-L
    (``isal``, 3-4x faster than zlib for CT-sized files) and handed to nibabel as bytes; anything
    else, or without ``isal``, as :func:`_nibabel_load` opens it."""
    if kind == "nifti" and str(path).lower().endswith(".nii.gz"):
        try:
            from isal import igzip
        except ImportError:  # optional: zlib through nibabel instead
            igzip = None
        if igzip is not None:
            import nibabel as nib

            data = igzip.decompress(Path(path).read_bytes())
            sizeof_hdr = int.from_bytes(data[:4], "little")
            if sizeof_hdr not in (348, 540):  # big-endian header
                sizeof_hdr = int.from_bytes(data[:4], "big")
            return (nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image).from_bytes(data)
    return _nibabel_load(path, kind, parrec_scaling)


def _nibabel_load(path: Path, kind: str, parrec_scaling: str = "dv"):
    import nibabel as nib

    if kind == "parrec":  # a truncated REC is damage, not a smaller scan: nibabel refuses it by default
        return nib.load(path, scaling=parrec_scaling)
    return nib.load(path)


def _oriented(img, path: Path) -> bool:
    """False for an image whose header does not say where the patient lies: a NIfTI (or NIfTI pair) with
    ``sform_code == qform_code == 0``, or an Analyze 7.5 header without the SPM ``.mat`` beside it that
    holds its affine (nibabel would guess the axes)."""
    import nibabel as nib

    if isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair):  # NIfTI files and pairs alike
        hdr = img.header
        return int(hdr["sform_code"]) > 0 or int(hdr["qform_code"]) > 0
    if isinstance(img, nib.AnalyzeImage):
        return path.with_suffix(".mat").is_file()
    return True


def _header(path: Path, kind: str, parrec_scaling: str = "dv") -> tuple[tuple[int, ...], int, bool]:
    """``(shape, components, oriented)`` from the header only; shape in ``(X, Y, Z[, T])`` order
    (:func:`_oriented` for the nibabel formats)."""
    if kind in NIBABEL_KINDS:
        img = _nibabel_load(path, kind, parrec_scaling)
        return tuple(int(v) for v in img.shape), 1, _oriented(img, path)
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return tuple(int(v) for v in r.GetSize()), int(r.GetNumberOfComponents()), True


def _forms_disagree(hdr, shape: tuple[int, ...]) -> bool:
    """True when a NIfTI header has both an sform and a qform and they place a corner voxel of
    the ``shape`` grid more than :data:`_FORM_TOL_VOXEL` voxels apart."""
    if int(hdr["sform_code"]) <= 0 or int(hdr["qform_code"]) <= 0:
        return False
    s, q = hdr.get_sform(), hdr.get_qform()
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    dist = np.linalg.norm(corners @ (s[:3, :3] - q[:3, :3]).T + (s[:3, 3] - q[:3, 3]), axis=1).max()
    return bool(dist > _FORM_TOL_VOXEL * spacing_from_affine(s).min())


def volume_candidates(
    f: FoundFile, kind: str, sidecar: FoundFile | None, data: list[FoundFile], cfg: IngestConfig
) -> list[Candidate]:
    """Rows for one volume file: one ok row, or skipped/failed rows, or one per 4D volume (``split``)."""
    stem = volume_kind(f.rel.rsplit("/", 1)[-1])[1]
    identity, modality, note, names = _sidecar(sidecar)
    modality = modality or FORMAT_MODALITY.get(kind, "")
    files = sorted([f] + data, key=lambda x: x.rel)
    scaling = {"parrec_scaling": cfg.parrec_scaling} if kind == "parrec" else {}

    def row(
        status: str = "ok", reason: str = "", detail: str = "", key: str = stem, extra: dict | None = None
    ):
        return Candidate(
            kind=kind,
            source=[x.rel for x in files],
            key=key,
            identity=identity,
            modality=modality,
            status=status,
            reason=reason,
            detail=detail or note,
            label=f"{modality or '??'} " + "x".join(str(v) for v in shape[:3]) if shape else "",
            source_files=[x.path for x in files],
            extra={"file": files.index(f), **scaling, **(extra or {})},
            names=names,
        )

    shape: tuple[int, ...] = ()
    if kind in DATA_FILES and not any(x.rel.lower().endswith(DATA_FILES[kind]) for x in data):
        upper = f.rel.rsplit(".", 1)[-1].isupper()  # x.PAR goes with x.REC
        # the format's own extension in the header's case, a compression suffix as is (x.BRIK.gz)
        want = " or ".join(stem + ("." + e.split(".")[1].upper() + e[len(e.split(".")[1]) + 1:] if upper else e)
                           for e in DATA_FILES[kind])
        return [row("failed", reasons.UNREADABLE, f"{f.rel} is a header whose data file ({want}) is not next to it; "
                    "copy the data file beside the header.")]
    try:
        shape, comps, oriented = _header(f.path, kind, cfg.parrec_scaling)
    except Exception as exc:  # nibabel/SimpleITK raise many types for a corrupt header
        return [
            row(
                "failed",
                reasons.UNREADABLE,
                f"{f.rel} cannot be read ({type(exc).__name__}: {exc}); re-export it.",
            )
        ]
    if not oriented:
        why = ("is an Analyze 7.5 image, a format without orientation (and no SPM .mat beside it)"
               if kind == "analyze" and not _is_nifti_pair(f.path)
               else "has no orientation (sform_code and qform_code are both 0)")
        return [
            row(
                "failed",
                reasons.NO_ORIENTATION,
                f"{f.rel} {why}, so where the patient "
                "lies in it is unknown; re-export it with its orientation (e.g. dcm2niix from the DICOM), "
                "or set the sform with nibabel if you know the true affine.",
            )
        ]
    # Trailing singleton axes (e.g. a NIfTI (X, Y, Z, 1)) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if comps > 1 or len(shape) > 4:
        return [
            row(
                "skipped",
                reasons.NOT_IMAGE,
                f"{f.rel} is a vector/colour or >4D image {shape}; not a scalar volume.",
            )
        ]
    if len(shape) < 3 or min(shape[:3]) == 1:
        return [row("skipped", reasons.IMAGE_2D, f"{f.rel} is a 2D image of shape {shape}, not a volume.")]
    if min(shape[:3]) < cfg.min_slices:
        return [row("skipped", reasons.TOO_FEW_SLICES, f"{f.rel} has shape {shape[:3]}, fewer than ingest.min_slices="
                    f"{cfg.min_slices} along an axis; to include it, "
                    f"{flag_hint('ingest.min_slices', min(shape[:3]))}.")]  # fmt: skip
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels > cfg.max_voxels:
        return [row("failed", reasons.TOO_LARGE, f"{f.rel} has shape {shape[:3]} ({voxels} voxels), more than "
                    f"ingest.max_voxels ({cfg.max_voxels}); check its header, or if the volume is genuine "
                    f"{flag_hint('ingest.max_voxels', voxels)}.")]  # fmt: skip
    if len(shape) == 3:
        return [row()]
    n = shape[3]
    if cfg.four_d_policy == "reject":
        return [row("failed", reasons.REJECTED_4D, f"{f.rel} is 4D with {n} volumes; to use it, "
                    f"{flag_hint('ingest.four_d_policy', 'first')} or split.")]  # fmt: skip
    if cfg.four_d_policy == "first":
        return [
            row(extra={"volume": 0}),
            row("skipped", reasons.EXTRA_VOLUME_4D, f"{f.rel} is 4D: volume 0 was kept and {n - 1} later volume(s) "
                f"dropped; to keep all, {flag_hint('ingest.four_d_policy', 'split')}.", key=f"{stem}#1-{n - 1}"),
        ]  # fmt: skip
    return [row(key=f"{stem}#{t}", extra={"volume": t}) for t in range(n)]


def _is_nifti_pair(path: Path) -> bool:
    """A ``.hdr`` that is a NIfTI pair header (magic ``ni1``/``ni2``) rather than Analyze 7.5."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(348)
    except OSError:
        return False
    return head[344:347] == b"ni1" or head[4:7] == b"ni2"  # NIfTI-1 magic at 344, NIfTI-2 at 4


def load_volume(c: Candidate) -> Image:
    """Pixels of a volume-file candidate as float32 ``(X, Y, Z)`` with its RAS+ affine."""
    path = c.source_files[c.extra.get("file", 0)]
    t = c.extra.get("volume")
    flags: list[str] = []
    try:
        if c.kind in NIBABEL_KINDS:
            import nibabel as nib

            img = _pixels_load(path, c.kind, c.extra.get("parrec_scaling", "dv"))
            proxy = img.dataobj
            # Proxy slicing reads (and scales) only the requested volume.
            arr = np.asarray(proxy[..., t] if t is not None else proxy, dtype=np.float32)
            affine = np.asarray(img.affine, float)  # NIfTI: the sform when set (checked at scan: one of them is)
            if isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair) and _forms_disagree(img.header, arr.shape[:3]):
                flags.append(FLAG_SFORM_QFORM_DISAGREE)
        else:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            full = sitk.GetArrayFromImage(img)  # (T, Z, Y, X) or (Z, Y, X)
            if t is not None:
                full = full[t]  # cast only the kept volume
            arr = np.asarray(full.T, dtype=np.float32)  # -> (X, Y, Z)
            affine = affine_from_itk(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    except Exception as exc:  # a file that read at scan time but not now: changed or corrupt
        raise SeriesError(
            reasons.UNREADABLE, f"{c.source[0]} cannot be read ({type(exc).__name__}: {exc})."
        ) from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise SeriesError(reasons.REJECTED_4D, f"{c.source[0]} has shape {arr.shape}; expected a 3D volume.")
    if not (arr.flags.f_contiguous or arr.flags.c_contiguous):  # NIfTI arrays come Fortran-ordered: kept
        arr = np.ascontiguousarray(arr)  # (the resampler reads either order without a full-volume copy)
    return Image(array=arr, affine=affine, modality=c.modality, flags=flags)
