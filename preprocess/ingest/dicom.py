"""DICOM: header scan, series splitting and validation, pixel loading.

Scan reads headers only (``stop_before_pixels``, ``specific_tags``); pixels are read at scan
time only to compare slices that share a position. Every file ends up in one candidate row.
Rules and reason codes are documented in docs/ingest.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from preprocess import reasons
from preprocess.config_io import flag_hint
from preprocess.geometry import affine_from_dicom
from preprocess.ingest.config import IngestConfig
from preprocess.ingest.discover import FoundFile, file_row, not_medical_row
from preprocess.ingest.stack import (
    analyse_positions,
    angle_deg,
    duplicate_runs,
    regular_grid,
    resample_stack,
    slice_normal,
    sort_along_normal,
)
from preprocess.types import Candidate, Identity, Image, SeriesError

# Tags read at scan time; everything else (pixels, private groups) is skipped.
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
    "PatientID", "AccessionNumber", "ImageType", "Rows", "Columns", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
    "RescaleIntercept", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "InstanceNumber",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "PatientName", "PatientBirthDate", "StudyDate", "SeriesDescription", "ProtocolName", "SequenceName",
    "DiffusionBValue", "EchoNumbers", "TemporalPositionIdentifier", "TriggerTime", "AcquisitionNumber",
    0x0019100C,  # Siemens private b-value (older DWI exports)
]  # fmt: skip
#: Header values that tell the volumes of a multi-volume series apart (dcm2niix splits on the same),
#: in the order they are tried: ``(label in the key, tags)``.
VOLUME_TAGS: tuple[tuple[str, tuple], ...] = (
    ("b", ("DiffusionBValue", 0x0019100C)),
    ("echo", ("EchoNumbers",)),
    ("t", ("TemporalPositionIdentifier",)),
    ("trigger", ("TriggerTime",)),
    ("acq", ("AcquisitionNumber",)),
)
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
_DIRECTORY_SOP = "1.2.840.10008.1.3.10"

# Modalities whose objects carry no anatomical image (RT dose is a dose grid, not anatomy).
NON_IMAGE_MODALITIES = frozenset(
    [
        "SR",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "PR",
        "KO",
        "SEG",
        "REG",
        "DOC",
        "ECG",
        "HD",
        "AU",
        "RWV",
        "FID",
        "PLAN",
        "RESP",
    ]
)
_NON_IMAGE_SOP_WORDS = (
    " SR ", "Structured Report", "Presentation State", "Structure Set", "RT Plan", "RT Dose", "Segmentation",
    "Registration", "Key Object", "Encapsulated", "Waveform", "Spectroscopy", "Raw Data", "Directory",
)  # fmt: skip
# Projection / 2D modalities: a single image per view, never a volume.
IMAGE_2D_MODALITIES = frozenset(
    [
        "CR",
        "DX",
        "MG",
        "IO",
        "PX",
        "XC",
        "ES",
        "OP",
        "SM",
        "GM",
        "XA",
        "RF",
        "US",
        "RG",
        "DG",
        "BMD",
        "RTIMAGE",
    ]
)
# A group of at most this many slices, tilted by at least SCOUT_ANGLE_DEG from the main stack, is a scout.
SCOUT_MAX_SLICES = 3
SCOUT_ANGLE_DEG = 45.0

# Which package decodes which compressed transfer syntax (for NO_DECODER fixes).
_DECODER_HINT = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


#: JPEG syntaxes GDCM decodes itself where pydicom's plugins cannot (12-bit JPEG Extended, whose
#: only pydicom decoder is the GPL libjpeg): baseline, extended, lossless and lossless SV1.
_GDCM_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                        "1.2.840.10008.1.2.4.70"})  # fmt: skip


def _gdcm_available() -> bool:
    try:
        import gdcm  # noqa: F401  (python-gdcm, BSD licence)
    except ImportError:
        return False
    return True


def decoder_available(transfer_syntax: str) -> bool:
    """Whether the pixel data in ``transfer_syntax`` decodes with the installed packages
    (pydicom's plugins, or GDCM directly for the JPEG family)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    try:
        uid = UID(transfer_syntax or "1.2.840.10008.1.2.1")
        if not uid.is_compressed:
            return True
        if str(uid) in _GDCM_JPEG and _gdcm_available():
            return True
        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError, AttributeError):  # not a transfer syntax at all
        return False


def _decoder_fix(transfer_syntax: str) -> str:
    from pydicom.uid import UID

    pkg = _DECODER_HINT.get(transfer_syntax, "python-gdcm (or pylibjpeg-libjpeg, GPL)")
    return f"{UID(transfer_syntax).name} pixel data needs a decoder: pip install {pkg}"


@dataclasses.dataclass
class Slice:
    """One 2D image: a single-frame file (``frame`` -1) or one frame of a multi-frame file."""

    header: Header
    frame: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    slope: float
    intercept: float


@dataclasses.dataclass
class Header:
    """What the scan knows about one DICOM file, from its header alone."""

    file: FoundFile
    sop_class: str
    modality: str
    series_uid: str
    series_number: str
    identity: Identity
    image_type: tuple[str, ...]
    rows: int
    cols: int
    transfer_syntax: str
    n_frames: int
    samples: int
    has_pixels: bool
    problem: str  # "" or why the pixel data is unusable (truncated ...)
    multiframe_problem: str  # "" or why per-frame geometry is missing
    thickness: float | None
    slices: list[Slice] = dataclasses.field(default_factory=list)
    volume_values: dict[str, str] = dataclasses.field(default_factory=dict)  # VOLUME_TAGS label -> value
    # SeriesDescription, ProtocolName, SequenceName: matched by ingest.series_include, never written out
    # (descriptions can hold identifiers)
    names: tuple[str, ...] = ()

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def is_derived(self) -> bool:
        return (len(self.image_type) > 0 and self.image_type[0] == "DERIVED") or (
            len(self.image_type) > 1 and self.image_type[1] == "SECONDARY"
        )

    @property
    def is_image(self) -> bool:
        from pydicom.uid import UID

        name = f" {UID(self.sop_class).name} " if self.sop_class else ""
        return (
            self.has_pixels
            and self.modality not in NON_IMAGE_MODALITIES
            and not any(w in name for w in _NON_IMAGE_SOP_WORDS)
        )


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _float(value: object, default: float | None) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _pixel_data_check(fp, ds, size: int, transfer_syntax: str) -> tuple[bool, str]:
    """``(has_pixels, problem)`` from the pixel data element header at ``fp``'s position.

    pydicom's ``stop_before_pixels`` leaves the file at the pixel data element, so its
    declared length can be checked against the file size and the image size without
    reading the pixels: this is how truncated files fail at scan time.
    """
    if transfer_syntax == "1.2.840.10008.1.2.1.99":  # deflated: positions refer to the inflated stream
        return True, ""
    head = fp.read(12)
    if len(head) < 8:
        return False, ""
    implicit, little = ds.original_encoding
    e = "<" if little in (True, None) else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return False, ""
    if implicit:
        length, header_len = struct.unpack(e + "I", head[4:8])[0], 8
    elif head[4:6] in _LONG_VRS:
        length, header_len = struct.unpack(e + "I", head[8:12])[0], 12
    else:
        length, header_len = struct.unpack(e + "H", head[6:8])[0], 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed): fragments are checked when decoding
        return True, ""
    present = size - fp.tell() + len(head) - header_len
    bits = int(ds.get("BitsAllocated", 16) or 16)
    expected = (
        int(ds.get("Rows", 0) or 0)
        * int(ds.get("Columns", 0) or 0)
        * int(ds.get("SamplesPerPixel", 1) or 1)
        * int(ds.get("NumberOfFrames", 1) or 1)
    )
    expected = (expected * bits + 7) // 8
    if present < min(length, expected) or length < expected:
        return True, f"is truncated: its pixel data has {min(present, length)} of {expected} bytes"
    return True, ""


def _frames(ds, n_frames: int) -> tuple[list[tuple], str]:
    """Per-frame ``(position, orientation, spacing, slope, intercept)`` of an enhanced multi-frame file."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if not per or len(per) != n_frames:
        return [], "has no per-frame functional groups (PlanePositionSequence) to place its frames"

    def pick(item, seq: str, attr: str):
        for src in (item, shared):
            if src is not None and seq in src and len(src[seq].value) and attr in src[seq].value[0]:
                return src[seq].value[0][attr].value
        return None

    root_slope = _float(ds.get("RescaleSlope"), 1.0)
    root_icpt = _float(ds.get("RescaleIntercept"), 0.0)
    out = []
    for item in per:
        pos = _floats(pick(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(pick(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(pick(item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if pos is None or iop is None or ps is None:
            return [], "lacks per-frame PlanePosition/PlaneOrientation/PixelMeasures"
        slope = _float(pick(item, "PixelValueTransformationSequence", "RescaleSlope"), root_slope)
        icpt = _float(pick(item, "PixelValueTransformationSequence", "RescaleIntercept"), root_icpt)
        out.append((pos, iop, ps, slope, icpt))
    return out, ""


#: First bytes of a DICOM stream without the 128-byte preamble (ACR-NEMA style files): the group
#: 0x0002 / 0x0008 of the first element, little or big endian.
_RAW_DICOM_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def read_header(f: FoundFile, known_dicom: bool) -> Header | Candidate | None:
    """Header of one file, a NOT_MEDICAL_FILE/UNREADABLE row, or None for a DICOMDIR index file.

    ``known_dicom``: the name or a DICOMDIR says it is DICOM, so a parse failure is UNREADABLE
    rather than NOT_MEDICAL_FILE. Other files are parsed only when they look like DICOM (the
    ``DICM`` magic, or a first element of group 0002/0008). Whatever a damaged file makes the
    parser raise becomes that file's row: one file never stops a scan.
    """
    try:
        with open(f.path, "rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        return file_row(f, "failed", reasons.UNREADABLE, f"{f.rel} cannot be opened ({exc.strerror or exc}).")
    magic = head[128:132] == b"DICM"
    if not (magic or known_dicom or head[:2] in _RAW_DICOM_STARTS):
        return not_medical_row(f)
    try:
        return _parse_header(f, magic, known_dicom)
    except Exception as exc:  # noqa: BLE001 - a damaged file is data, not a bug: it gets a row
        if magic or known_dicom:
            return file_row(f, "failed", reasons.UNREADABLE,
                            f"DICOM file {f.rel} cannot be parsed ({type(exc).__name__}: {_short(exc)}); "
                            "re-export it.")  # fmt: skip
        return not_medical_row(f)  # unparsable and nothing says it is DICOM


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(value: object, name: str) -> int:
    """A single non-negative integer header value; anything else (multi-valued, text) is damage."""
    if value is None or value == "":
        return 0
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        raise ValueError(f"{name} holds several values ({value!r})")
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} is negative ({number})")
    return number


def _volume_values(ds) -> dict[str, str]:
    """The :data:`VOLUME_TAGS` values of a header, as canonical text (``1000``, ``2``, ``120.5``)."""
    out = {}
    for label, tags in VOLUME_TAGS:
        for tag in tags:
            got = ds.get(tag)  # a keyword gives the value, a tag number the element
            value = got.value if hasattr(got, "VR") else got
            if isinstance(value, bytes):  # a private tag read without its dictionary
                value = value.decode("latin-1").strip("\0 ")
            number = _float(value, None)
            if number is not None:
                out[label] = f"{number:g}"
                break
    return out


#: A deflated file (transfer syntax 1.2.840.10008.1.2.1.99) is inflated whole by the parser, so one
#: that inflates to more than this many times its size (or :data:`MAX_INFLATED_BYTES`) is refused
#: before parsing: 200 KB of deflated zeros would otherwise take gigabytes per scan thread.
MAX_INFLATE_RATIO = 200
MAX_INFLATED_BYTES = 4 << 30
_DEFLATED = b"1.2.840.10008.1.2.1.99"


def _deflated_start(fp, head: bytes) -> int | None:
    """Where the deflated data set of a DICOM file with the ``DICM`` magic starts (after its file meta
    group), or None when the file is not deflated or its meta group has no length to skip."""
    if head[128:132] != b"DICM":
        return None
    meta = fp.read(12)
    if meta[:4] != b"\x02\x00\x00\x00" or meta[4:6] != b"UL":
        return None
    length = struct.unpack("<I", meta[8:12])[0]
    if length > 1 << 20:  # a meta group is a few hundred bytes
        return None
    group = fp.read(length)
    return 132 + 12 + length if _DEFLATED in group else None


def _inflates_within(fp, start: int, limit: int) -> bool:
    """Whether the raw deflate stream from ``start`` inflates to at most ``limit`` bytes, counted in
    64 KiB steps without keeping the output (memory stays bounded whatever the stream holds)."""
    import zlib

    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        chunk = inflater.unconsumed_tail or fp.read(1 << 16)
        if not chunk:
            break
        total += len(inflater.decompress(chunk, 1 << 16))
        if total > limit:
            return False
    return True


def _parse_header(f: FoundFile, magic: bool, known_dicom: bool) -> Header | Candidate | None:
    import pydicom

    size = f.path.stat().st_size
    with open(f.path, "rb") as fp:
        head = fp.read(132)
        start = _deflated_start(fp, head)
        limit = min(MAX_INFLATED_BYTES, MAX_INFLATE_RATIO * max(size, 1 << 16))
        if start is not None and not _inflates_within(fp, start, limit):
            return file_row(f, "failed", reasons.ARCHIVE_LIMIT,
                            f"deflated DICOM file {f.rel} ({size} bytes) inflates to more than {limit} bytes "
                            f"(over {MAX_INFLATE_RATIO} times its size: a decompression bomb?); it was not read. "
                            "Re-export it uncompressed or with another transfer syntax.")
        fp.seek(0)
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        has_pixels, problem = _pixel_data_check(fp, ds, size, ts)
    if not (magic or known_dicom or sop or "Modality" in ds or "SeriesInstanceUID" in ds):
        return not_medical_row(f)
    if not sop and "Modality" not in ds and "SeriesInstanceUID" not in ds and not has_pixels:
        # named or marked as DICOM, but nothing of a DICOM object could be read from it
        raise ValueError("no DICOM element could be read (empty, or not DICOM after its preamble)")
    if sop == _DIRECTORY_SOP:
        return None
    n_frames = int(_float(ds.get("NumberOfFrames"), 1) or 1)
    h = Header(
        file=f,
        sop_class=sop,
        modality=str(ds.get("Modality", "") or "").upper(),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        identity=Identity(
            patient_id=str(ds.get("PatientID", "") or ""),
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            accession=str(ds.get("AccessionNumber", "") or ""),
            patient_name=str(ds.get("PatientName", "") or ""),
            birth_date=str(ds.get("PatientBirthDate", "") or ""),
            study_date=str(ds.get("StudyDate", "") or ""),
        ),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        rows=_int(ds.get("Rows"), "Rows"),
        cols=_int(ds.get("Columns"), "Columns"),
        transfer_syntax=ts,
        n_frames=n_frames,
        samples=_int(ds.get("SamplesPerPixel"), "SamplesPerPixel") or 1,
        has_pixels=has_pixels,
        problem=problem,
        multiframe_problem="",
        thickness=_float(ds.get("SpacingBetweenSlices"), None) or _float(ds.get("SliceThickness"), None),
        volume_values=_volume_values(ds),
        names=tuple(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName")),
    )
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        frames, h.multiframe_problem = _frames(ds, n_frames)
        h.slices = [Slice(h, i, *fr) for i, fr in enumerate(frames)]
    else:
        h.slices = [
            Slice(
                h,
                -1,
                _floats(ds.get("ImagePositionPatient"), 3),
                _floats(ds.get("ImageOrientationPatient"), 6),
                _floats(ds.get("PixelSpacing"), 2),
                _float(ds.get("RescaleSlope"), 1.0) or 1.0,
                _float(ds.get("RescaleIntercept"), 0.0) or 0.0,
            )
        ]
    return h


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's validation warnings quote tag values (a non-conformant UID holding a patient's name
    is printed as is): off while ingest reads files, which reports what is wrong in its own rows."""
    import pydicom

    logger = logging.getLogger("pydicom")
    mode, level = pydicom.config.settings.reading_validation_mode, logger.level
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            warnings.filterwarnings("ignore", category=UserWarning, message=".*(VR|value|UID|invalid|Invalid).*")
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = mode
        logger.setLevel(level)


#: Files below which headers are read by threads in this process (starting processes costs seconds).
PROCESS_SCAN_MIN_FILES = 4000


def read_headers(
    files: list[tuple[FoundFile, bool]], progress: bool = False, processes: int = 0
) -> list[Header | Candidate | None]:
    """:func:`read_header` over many files, in order.

    Parsing headers is CPU-bound Python (pydicom holds the GIL), so thousands of files are spread
    over ``processes`` worker processes (0: one per CPU core, at most 8), each reading its chunk with
    a few threads (I/O overlap on network shares); memory grows with the number of files (one small
    header each), not with their size. Fewer files, or ``processes`` 1, use threads here only.
    """
    n = processes or min(8, os.cpu_count() or 1)
    if n <= 1 or len(files) < PROCESS_SCAN_MIN_FILES:
        return _read_with_threads(files, progress)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    size = max(64, min(2000, len(files) // (8 * n)))
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    out: list[Header | Candidate | None] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="DICOM headers", unit="file")
    # spawn: a forked child would inherit the parent's threads and locks (and torch, if loaded)
    from concurrent.futures.process import BrokenProcessPool

    from preprocess.errors import WorkerStartError, worker_death_hint

    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
            for part in pool.map(_read_chunk, chunks):
                out.extend(part)
                if bar is not None:
                    bar.update(len(part))
    except BrokenProcessPool as e:
        if bar is not None:
            bar.close()
        raise WorkerStartError(f"a worker process reading DICOM headers died after {len(out)} of {len(files)} files: "
                               f"{worker_death_hint()} (scan_processes / --scan-processes 1 reads them in this "
                               "process)") from e
    if bar is not None:
        bar.close()
    return out


def _read_chunk(files: list[tuple[FoundFile, bool]]) -> list[Header | Candidate | None]:
    with quiet_pydicom():  # a worker process has its own pydicom settings
        return _read_with_threads(files, False, workers=2)


def _read_with_threads(files: list[tuple[FoundFile, bool]], progress: bool,
                       workers: int = 0) -> list[Header | Candidate | None]:
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, 2 * (os.cpu_count() or 2))  # I/O overlap without 16 headers inflating at once
    with ThreadPoolExecutor(max_workers=workers) as pool:  # callers run it under quiet_pydicom (scan)
        it: Iterable = pool.map(lambda a: read_header(*a), files)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(files), desc="DICOM headers", unit="file")
        return list(it)


# ----------------------------------------------------------------------------- series rows


def _where(rels: list[str]) -> str:
    """How a detail sentence names a series: its folder and file count (never an identifier)."""
    if len(rels) == 1:
        return rels[0]
    folder = os.path.commonpath(rels) if len({r.split("/")[0] for r in rels}) == 1 else "."
    return f"series in {folder}/ ({len(rels)} files)"


def _row(
    headers: list[Header], status: str, reason: str, detail: str, slices: list[Slice] | None = None
) -> Candidate:
    hs = sorted({id(h): h for h in headers}.values(), key=lambda h: h.file.rel)
    first = hs[0]
    n = len(slices) if slices is not None else sum(len(h.slices) or 1 for h in hs)
    return Candidate(
        kind="dicom",
        source=[h.file.rel for h in hs],
        key=first.series_uid or first.file.rel,
        identity=first.identity,
        modality=first.modality,
        status=status,
        reason=reason,
        detail=detail,
        label=f"{first.modality or '??'} {first.cols}x{first.rows}x{n}",
        source_files=[h.file.path for h in hs],
        names=first.names,
    )


def _fail(headers: list[Header], reason: str, detail: str) -> Candidate:
    return _row(headers, "failed", reason, detail)


def _skip(headers: list[Header], reason: str, detail: str) -> Candidate:
    return _row(headers, "skipped", reason, detail)


def dicom_candidates(headers: list[Header], cfg: IngestConfig) -> list[Candidate]:
    """Split headers into series (UID + SeriesNumber + localizer flag + image/non-image; each
    multi-frame file alone), then classify each series into ok/skipped/failed rows."""
    bundles: dict[tuple, list[Header]] = defaultdict(list)
    for h in headers:
        uid = h.series_uid or "nouid:" + h.file.rel.rsplit("/", 1)[0]
        mf = h.file.rel if (h.n_frames > 1 or h.multiframe_problem or len(h.slices) > 1) else ""
        bundles[(uid, h.series_number, h.is_localizer, h.is_image, mf)].append(h)
    rows: list[Candidate] = []
    for key in sorted(bundles):
        hs = sorted(bundles[key], key=lambda h: h.file.rel)
        try:
            rows.extend(_classify_bundle(hs, cfg))
        except Exception as exc:  # noqa: BLE001 - nonsense header values fail their series alone
            rows.append(_fail(hs, reasons.UNREADABLE,
                              f"{_where([h.file.rel for h in hs])}: its headers hold values that cannot be used "
                              f"({type(exc).__name__}: {_short(exc)}); re-export it."))  # fmt: skip
    return rows


def _classify_bundle(hs: list[Header], cfg: IngestConfig) -> list[Candidate]:
    from pydicom.uid import UID

    first = hs[0]
    where = _where([h.file.rel for h in hs])
    sop_name = UID(first.sop_class).name if first.sop_class else "unknown SOP class"
    if not first.is_image:
        what = f"is a {sop_name} object" if first.has_pixels else f"has no pixel data ({sop_name})"
        return [_skip(hs, reasons.NOT_IMAGE, f"{where} {what}, not an image; nothing to convert.")]
    bad = next((h for h in hs if h.problem), None)
    if bad is not None:  # a damaged file fails its series even where a policy would skip it
        return [
            _fail(
                hs, reasons.UNREADABLE, f"{where}: file {bad.file.rel} {bad.problem}; re-export or remove it."
            )
        ]
    if first.modality in IMAGE_2D_MODALITIES or ("Secondary Capture" in sop_name and first.n_frames == 1):
        return [
            _skip(
                hs,
                reasons.IMAGE_2D,
                f"{where} holds 2D {first.modality or 'secondary capture'} images, not a volume.",
            )
        ]
    if first.modality not in cfg.modalities:
        return [
            _skip(
                hs,
                reasons.UNSUPPORTED_MODALITY,
                f"{where} is modality {first.modality or '(none)'}; to include it, "
                + flag_hint("ingest.modalities", [*cfg.modalities, first.modality or "OT"])
                + ".",
            )
        ]
    if first.is_localizer:
        return [_skip(hs, reasons.LOCALIZER, f"{where} is a localizer (ImageType LOCALIZER); not a volume.")]
    if cfg.series_include and not any(fnmatch.fnmatch(name.lower(), pattern.lower())
                                      for name in first.names if name for pattern in cfg.series_include):
        return [_skip(hs, reasons.NOT_SELECTED,
                      f"{where}: its series description, protocol and sequence name match none of "
                      f"ingest.series_include {list(cfg.series_include)}; to include it, add a pattern that does.")]
    if cfg.skip_derived and first.is_derived:
        return [
            _skip(
                hs,
                reasons.DERIVED,
                f"{where} is a derived image (ImageType {'/'.join(first.image_type[:3])}); "
                f"to include it, {flag_hint('ingest.skip_derived', False)}.",
            )
        ]
    if "MOSAIC" in first.image_type:
        return [
            _fail(
                hs,
                reasons.MULTIFRAME_UNSUPPORTED,
                f"{where} is a Siemens MOSAIC (several slices tiled in one image); convert it with dcm2niix first.",
            )
        ]
    voxels = max(h.rows * h.cols for h in hs) * max(1, sum(max(1, h.n_frames) for h in hs))
    if voxels > cfg.max_voxels:
        return [_fail(hs, reasons.TOO_LARGE,
                      f"{where} announces {voxels} voxels ({first.cols} x {first.rows} per slice), more than "
                      f"ingest.max_voxels ({cfg.max_voxels}); check its headers, or if the volume is genuine "
                      f"{flag_hint('ingest.max_voxels', voxels)}.")]  # fmt: skip
    broken = [h for h in hs if h.multiframe_problem]
    if broken:
        return [
            _fail(
                hs,
                reasons.MULTIFRAME_UNSUPPORTED,
                f"multi-frame file {broken[0].file.rel} {broken[0].multiframe_problem}; convert it with dcm2niix.",
            )
        ]
    return _split_geometry(hs, cfg)


def _geometry_key(s: Slice) -> tuple:
    o = tuple(round(v, 3) for v in s.orientation) if s.orientation else None
    sp = tuple(round(v, 4) for v in s.spacing) if s.spacing else None
    return (o is None, o or (), s.header.rows, s.header.cols, sp or ())


def _split_geometry(hs: list[Header], cfg: IngestConfig) -> list[Candidate]:
    """Separate scouts sharing the series; fail a series whose slices disagree in orientation/shape/spacing."""
    groups: dict[tuple, list[Slice]] = defaultdict(list)
    for h in hs:
        for s in h.slices:
            groups[_geometry_key(s)].append(s)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0].header.file.rel, g[0].frame))
    main = ordered[0]
    rows: list[Candidate] = []
    if len(ordered) > 1:

        def is_scout(g: list[Slice]) -> bool:
            a, b = g[0].orientation, main[0].orientation
            return (
                len(g) <= SCOUT_MAX_SLICES
                and a is not None
                and b is not None
                and angle_deg(slice_normal(a), slice_normal(b)) >= SCOUT_ANGLE_DEG
            )

        scouts = [g for g in ordered[1:] if is_scout(g)]
        rest = [g for g in ordered[1:] if not is_scout(g)]
        if not rest and len(main) <= SCOUT_MAX_SLICES:
            where = _where([h.file.rel for h in hs])
            return [
                _skip(
                    hs,
                    reasons.LOCALIZER,
                    f"{where} is a multi-plane localizer ({len(ordered)} small stacks in different orientations).",
                )
            ]
        if scouts:
            sh = [s.header for g in scouts for s in g]
            rows.append(
                _skip(
                    sh,
                    reasons.LOCALIZER,
                    f"{_where(sorted({h.file.rel for h in sh}))} is a scout sharing its series with a volume "
                    "(single slice(s) orthogonal to it); the volume is read without it.",
                )
            )
        if rest:
            rows.append(_inconsistent([main] + rest))
            return rows
    volumes = _split_volumes(main)
    if volumes is None:
        rows.append(_check_stack(main, cfg))
        return rows
    label, groups = volumes
    for value, group in groups:  # one row, key and geometry per volume, like dcm2niix
        cand = _check_stack(group, cfg)
        cand.key = f"{cand.key}#{label}={value}"
        note = f"volume {label}={value} of a series of {len(groups)} volumes at the same positions"
        cand.detail = f"{cand.detail} ({note})" if cand.detail else f"Note: {note}."
        rows.append(cand)
    return rows


def _split_volumes(slices: list[Slice]) -> tuple[str, list[tuple[str, list[Slice]]]] | None:
    """``(label, [(value, slices)])`` when several volumes share the slice positions (DWI b-values,
    echoes, time points, acquisitions) and one of :data:`VOLUME_TAGS` tells them apart (each volume
    then has every position once); None for a plain stack."""
    if any(s.frame >= 0 or s.position is None for s in slices):
        return None
    positions = [tuple(round(v, 2) for v in s.position) for s in slices]
    if len(set(positions)) == len(positions):
        return None
    for label, _ in VOLUME_TAGS:
        by_value: dict[str, list[Slice]] = defaultdict(list)
        for s in slices:
            by_value[s.header.volume_values.get(label, "")].append(s)
        if len(by_value) < 2 or "" in by_value:
            continue
        unique = all(
            len({tuple(round(v, 2) for v in s.position) for s in g}) == len(g) for g in by_value.values()
        )
        if unique:
            order = sorted(by_value, key=lambda v: (float(v), v))
            return label, [(v, by_value[v]) for v in order]
    return None


def _inconsistent(groups: list[list[Slice]]) -> Candidate:
    hs = [s.header for g in groups for s in g]
    where = _where(sorted({h.file.rel for h in hs}))
    a, b = groups[0][0], groups[1][0]
    odd = groups[1][0].header.file.rel
    if a.orientation is None or b.orientation is None:
        return _fail(hs, reasons.MISSING_GEOMETRY, f"{where}: some slices (e.g. {odd}) lack ImagePositionPatient/"
                     "ImageOrientationPatient/PixelSpacing; re-export the series with full headers.")  # fmt: skip
    if _geometry_key(a)[1] != _geometry_key(b)[1]:
        ang = angle_deg(slice_normal(a.orientation), slice_normal(b.orientation))
        return _fail(hs, reasons.INCONSISTENT_ORIENTATION, f"{where}: slice orientation differs by {ang:.1f} degrees "
                     f"within the series (e.g. {odd}); remove the odd slices or re-export the series.")  # fmt: skip
    if (a.header.rows, a.header.cols) != (b.header.rows, b.header.cols):
        return _fail(hs, reasons.INCONSISTENT_SHAPE, f"{where}: Rows/Columns differ within the series "
                     f"({a.header.rows}x{a.header.cols} vs {b.header.rows}x{b.header.cols}, e.g. {odd}); "
                     "remove the odd slices or re-export the series.")  # fmt: skip
    return _fail(hs, reasons.INCONSISTENT_SPACING, f"{where}: PixelSpacing differs within the series ({a.spacing} vs "
                 f"{b.spacing}, e.g. {odd}); remove the odd slices or re-export the series.")  # fmt: skip


def _check_stack(slices: list[Slice], cfg: IngestConfig) -> Candidate:
    """Status of one geometrically consistent stack, with the load plan in ``extra`` when usable."""
    hs = [s.header for s in slices]
    where = _where(sorted({h.file.rel for h in hs}))
    geometry_ok = all(s.position and s.orientation and s.spacing for s in slices)
    if len(slices) == 1:
        cand = _skip(hs, reasons.IMAGE_2D, f"{where} is a single 2D image, not a volume.")
        if geometry_ok:
            s = slices[0]
            step = slice_normal(s.orientation) * (s.header.thickness or 1.0)
            _attach_plan(
                cand, slices, affine_from_dicom(s.position, s.orientation, s.spacing, step), None, []
            )
        return cand
    if len(slices) < cfg.min_slices:
        return _skip(hs, reasons.TOO_FEW_SLICES, f"{where} has {len(slices)} slices, fewer than ingest.min_slices="
                     f"{cfg.min_slices}; to include it, {flag_hint('ingest.min_slices', len(slices))}.")  # fmt: skip
    if not geometry_ok:
        return _fail(hs, reasons.MISSING_GEOMETRY, f"{where} lacks ImagePositionPatient/ImageOrientationPatient/"
                     "PixelSpacing, so slices cannot be placed; re-export the series with full headers.")  # fmt: skip
    ts = next((h.transfer_syntax for h in hs if not decoder_available(h.transfer_syntax)), None)
    if ts is not None:
        return _fail(hs, reasons.NO_DECODER, f"{where}: {_decoder_fix(ts)}.")
    orientation, spacing = slices[0].orientation, slices[0].spacing
    order, s_sorted = sort_along_normal(np.array([s.position for s in slices]), orientation)
    stack = [slices[i] for i in order]
    notes: list[str] = []
    for run in reversed(duplicate_runs(s_sorted)):
        dup = [stack[i] for i in run]
        if any(d.frame >= 0 for d in dup):
            return _fail(hs, reasons.MULTIFRAME_UNSUPPORTED, f"{where}: several frames share a position (a temporal "
                         "or multi-stack acquisition); convert it with dcm2niix.")  # fmt: skip
        try:
            pixels = [_slice_pixels(d) for d in dup]
        except SeriesError as exc:
            return _fail(hs, exc.reason, f"{where}: {exc.detail}")
        if any(p.shape != pixels[0].shape or not np.array_equal(p, pixels[0]) for p in pixels[1:]):
            return _fail(hs, reasons.DUPLICATE_SLICES, f"{where}: files {dup[0].header.file.rel} and "
                         f"{dup[1].header.file.rel} share a slice position but differ in pixels; remove the wrong "
                         "copy or re-export the series.")  # fmt: skip
        notes.append(f"{', '.join(d.header.file.rel for d in dup[1:])} duplicate(s) {dup[0].header.file.rel}")
        for i in sorted(run[1:], reverse=True):
            del stack[i]
    if len(stack) == 1:
        return _skip(hs, reasons.IMAGE_2D, f"{where} holds copies of a single 2D image, not a volume.")
    if len(stack) < cfg.min_slices:
        return _skip(hs, reasons.TOO_FEW_SLICES, f"{where} has {len(stack)} distinct slice positions, fewer than "
                     f"ingest.min_slices={cfg.min_slices}.")  # fmt: skip
    positions = np.array([s.position for s in stack])
    geom = analyse_positions(
        positions,
        orientation,
        spacing,
        tilt_tolerance_deg=cfg.tilt_tolerance_deg,
        spacing_tolerance=cfg.spacing_tolerance,
    )
    flags: list[str] = []
    for issue in geom.issues:
        if issue.policy and getattr(cfg, issue.policy) == "resample":
            flags.append(issue.flag)
            notes.append(f"{issue.message}; resampled onto a regular grid")
            continue
        fix = (
            f" to resample it onto a regular grid, {flag_hint(f'ingest.{issue.policy}', 'resample')};"
            if issue.policy
            else ""
        )
        return _fail(hs, issue.reason, f"{where} {issue.message};{fix} or re-export/reconstruct the series.")
    plan = regular_grid(geom, orientation) if flags else None
    step = plan["step"] if plan else geom.step
    affine = affine_from_dicom(positions[0], orientation, spacing, step)
    detail = ("Note: " + "; ".join(notes) + ".") if notes else ""
    cand = _row(hs, "ok", "", detail, slices=stack)
    _attach_plan(cand, stack, affine, plan, flags)
    return cand


def _attach_plan(
    cand: Candidate, stack: list[Slice], affine: np.ndarray, plan: dict | None, flags: list[str]
) -> None:
    """Store what ``load`` needs in the picklable candidate: slice order, rescale, affine, resample plan."""
    index = {p: i for i, p in enumerate(cand.source_files)}
    h0 = stack[0].header
    cand.extra = {
        "slices": [[index[s.header.file.path], s.frame] for s in stack],
        "rescale": [[s.slope, s.intercept] for s in stack],
        "shape": [h0.cols, h0.rows],
        "affine": np.asarray(affine).tolist(),
        "resample": plan,
        "flags": flags,
        "transfer_syntaxes": sorted({s.header.transfer_syntax for s in stack}),
    }
    cand.label = f"{h0.modality} {h0.cols}x{h0.rows}x{plan['n_out'] if plan else len(stack)}"


# ----------------------------------------------------------------------------- pixels


def _read_pixels(path: Path) -> np.ndarray:
    """Stored pixel values of a file: ``(rows, cols)`` or ``(frames, rows, cols)``; no rescale applied.

    Callers check :func:`decoder_available` for the series' transfer syntaxes first.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)  # scan and load run this under quiet_pydicom
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        try:
            # pydicom 3 returns stored values (no modality LUT): rescale is applied once, by the caller.
            return ds.pixel_array
        except Exception:
            if ts in _GDCM_JPEG and _gdcm_available():  # e.g. 12-bit JPEG Extended: GDCM decodes it
                return _gdcm_pixels(path, ds)
            raise
    except Exception as exc:  # any decoder/parser failure means this file's pixels are unusable
        raise SeriesError(reasons.UNREADABLE, f"pixels of {path.name} cannot be decoded ({exc})") from exc


def _gdcm_pixels(path: Path, ds) -> np.ndarray:
    """Stored values of a JPEG-compressed file decoded by GDCM (python-gdcm), shaped like pydicom's."""
    import gdcm

    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()  # GDCM tries its 8-bit codec first and reports that on stderr
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError("GDCM cannot read the file")
    image = reader.GetImage()
    fmt = image.GetPixelFormat()
    dtype = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16,
             (32, 0): np.uint32, (32, 1): np.int32}[(fmt.GetBitsAllocated(), fmt.GetPixelRepresentation())]  # fmt: skip
    buf = image.GetBuffer()
    raw = buf.encode("utf-8", "surrogateescape") if isinstance(buf, str) else bytes(buf)
    arr = np.frombuffer(raw, dtype=dtype)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
    shape = (frames, rows, cols, samples) if samples > 1 else (frames, rows, cols)
    arr = arr[: int(np.prod(shape))].reshape(shape)
    return arr[0] if frames == 1 else arr


def _slice_pixels(s: Slice) -> np.ndarray:
    """Rescaled pixels ``(rows, cols)`` float64 of one slice (used to compare duplicates)."""
    arr = _read_pixels(s.header.file.path)
    if s.frame >= 0 and arr.ndim == 3:
        arr = arr[s.frame]
    return arr.astype(np.float64) * s.slope + s.intercept


def load_dicom(c: Candidate) -> Image:
    """Pixels of a scanned DICOM candidate as float32 ``(X=cols, Y=rows, Z=slices)``, rescaled once."""
    ex = c.extra
    if not ex.get("slices"):
        raise SeriesError(
            c.reason or reasons.PROCESSING_ERROR, c.detail or f"{c.source[0]} has no slice plan"
        )
    cols, rows = ex["shape"]
    for ts in ex["transfer_syntaxes"]:
        if not decoder_available(ts):
            raise SeriesError(reasons.NO_DECODER, f"{_where(c.source)}: {_decoder_fix(ts)}.")
    # Fortran order: each slice (X=cols, Y=rows) is one contiguous block, written in one pass (in C order
    # every slice write strides through the whole volume); the resampler reads either order
    out = np.empty((cols, rows, len(ex["slices"])), np.float32, order="F")
    last, pixels = -1, np.empty(0)  # one file's pixels in memory at a time
    for k, ((fi, frame), (slope, icpt)) in enumerate(zip(ex["slices"], ex["rescale"], strict=True)):
        if fi != last:
            try:
                last, pixels = fi, _read_pixels(c.source_files[fi])
            except SeriesError as exc:
                raise SeriesError(exc.reason, f"{c.source[fi]}: {exc.detail}") from exc
        arr = pixels
        if frame >= 0 and arr.ndim == 3:
            arr = arr[frame]
        if arr.shape != (rows, cols):
            raise SeriesError(reasons.UNREADABLE, f"{c.source[fi]} decodes to {arr.shape}, expected {(rows, cols)}; "
                              "the file changed since the scan or is corrupt.")  # fmt: skip
        out[:, :, k] = arr.T.astype(np.float64) * slope + icpt  # (rows, cols) -> (X=cols, Y=rows)
    if ex.get("resample"):
        out = resample_stack(out, ex["resample"])
    return Image(
        array=out, affine=np.asarray(ex["affine"], float), modality=c.modality, flags=list(ex["flags"])
    )
