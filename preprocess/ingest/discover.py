"""Find the files of an export: walk folders, unpack zips, sort files into kinds.

Every file ends up in exactly one place: a DICOM file to header-scan, a volume file
(NIfTI/NRRD/MHA) with its sidecar and data files, a row for a non-medical file, or the
documented ignore list (DICOMDIR index files, sidecars, header data files, hidden files,
``IngestConfig.exclude`` patterns). See docs/ingest.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import tempfile
import zipfile
from pathlib import Path

from preprocess import reasons
from preprocess.types import Candidate, Identity

# Extensions of volume files read without DICOM, and the kind they map to (longest first).
VOLUME_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "mha"),
    (".mhd", "mha"),
)
# Extensions that are certainly not DICOM: reported as NOT_MEDICAL_FILE without opening them.
TEXT_OR_OFFICE = frozenset(
    [
        ".txt",
        ".csv",
        ".tsv",
        ".json",
        ".md",
        ".pdf",
        ".xml",
        ".html",
        ".htm",
        ".xls",
        ".xlsx",
        ".doc",
        ".docx",
        ".rtf",
        ".log",
        ".ini",
        ".yaml",
        ".yml",
        ".py",
        ".sh",
        ".bat",
        ".exe",
        ".jpg",
        ".jpeg",
        ".png",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".mp4",
        ".avi",
    ]
)
# Operating-system litter, never part of an export.
OS_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})


@dataclasses.dataclass
class FoundFile:
    """One file of the export: ``path`` on disk (absolute) and ``rel``, the name users see
    (posix, relative to the input root; ``a.zip!/inner/x.dcm`` inside a zip)."""

    path: Path
    rel: str


@dataclasses.dataclass
class Inventory:
    """The export's files, sorted into what ingest does with them."""

    dicom: list[FoundFile] = dataclasses.field(default_factory=list)
    volumes: list[tuple[FoundFile, str]] = dataclasses.field(default_factory=list)  # (file, kind)
    dicomdirs: list[FoundFile] = dataclasses.field(default_factory=list)
    other: list[FoundFile] = dataclasses.field(default_factory=list)  # sniffed as DICOM or not
    rows: list[Candidate] = dataclasses.field(default_factory=list)  # rows decided during discovery
    by_path: dict[Path, FoundFile] = dataclasses.field(default_factory=dict)


def volume_kind(name: str) -> tuple[str, str] | None:
    """``(kind, stem)`` of a NIfTI/NRRD/MHA file name, or None."""
    low = name.lower()
    for ext, kind in VOLUME_EXTENSIONS:
        if low.endswith(ext):
            return kind, name[: -len(ext)]
    return None


def file_row(f: FoundFile, status: str, reason: str, detail: str) -> Candidate:
    """A skipped/failed row for a single file (key = its relative path)."""
    return Candidate(
        kind="file",
        source=[f.rel],
        key=f.rel,
        identity=Identity(),
        status=status,
        reason=reason,
        detail=detail,
        source_files=[f.path],
    )


def not_medical_row(f: FoundFile) -> Candidate:
    """The NOT_MEDICAL_FILE row of a file that is none of the formats ingest reads."""
    return file_row(
        f, "skipped", reasons.NOT_MEDICAL_FILE, f"{f.rel} is not a DICOM, NIfTI, NRRD or MHA file."
    )


def _is_ignored(rel: str, name: str, exclude: tuple[str, ...]) -> bool:
    parts = rel.replace("!/", "/").split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts) or name.lower() in OS_FILES:
        return True
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in exclude)


def _walk(root: Path, prefix: str, single: Path | None) -> list[FoundFile]:
    if single is not None:
        return [FoundFile(single.resolve(), prefix + single.name)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            out.append(FoundFile(p.resolve(), prefix + p.relative_to(root).as_posix()))
    return out


def _extract_zip(f: FoundFile, staging: Path, inv: Inventory) -> Path | None:
    """Unpack ``f`` below ``staging``; members with unsafe paths become UNREADABLE rows."""
    target = staging / re.sub(r"[^A-Za-z0-9._-]+", "_", f.rel)
    try:
        with zipfile.ZipFile(f.path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                dest = (target / info.filename).resolve()
                if not dest.is_relative_to(target.resolve()):
                    inv.rows.append(
                        file_row(
                            FoundFile(f.path, f"{f.rel}!/{info.filename}"),
                            "failed",
                            reasons.UNREADABLE,
                            f"zip member {f.rel}!/{info.filename} points outside the archive and was not "
                            "extracted; re-create the zip with relative paths.",
                        )
                    )
                    continue
                if info.flag_bits & 0x1:
                    raise RuntimeError("it is encrypted")
                dest.parent.mkdir(parents=True, exist_ok=True)
                # Skip re-extraction when a previous run left the same member in the staging folder.
                if dest.exists() and dest.stat().st_size == info.file_size:
                    continue
                with zf.open(info) as src, open(dest, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    except (zipfile.BadZipFile, RuntimeError, OSError, NotImplementedError) as exc:
        inv.rows.append(
            file_row(
                f,
                "failed",
                reasons.UNREADABLE,
                f"zip archive {f.rel} cannot be unpacked ({exc}); re-export it.",
            )
        )
        return None
    return target


#: A file at the root of an export listing glob patterns (one per line, ``#`` comments) of
#: paths that are side data, not images; added to ``IngestConfig.exclude``.
IGNORE_FILE = ".vol3dignore"


def read_ignore_file(src: Path) -> tuple[str, ...]:
    """Patterns from ``src/.vol3dignore`` (empty when ``src`` is a file or has none)."""
    path = Path(src) / IGNORE_FILE
    if not path.is_file():
        return ()
    lines = (line.strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def discover(src: Path, exclude: tuple[str, ...], workdir: Path | None) -> Inventory:
    """Walk ``src`` (a folder, or a single file), unpacking zips (recursively) below ``workdir``.

    Paths matching ``exclude`` or the patterns of ``src/.vol3dignore`` are not looked at.
    """
    src = Path(src)
    if not src.exists():
        from preprocess.errors import InputError

        raise InputError(f"input {src} does not exist; pass a folder, zip, NIfTI, NRRD or MHA file.")
    exclude = tuple(exclude) + read_ignore_file(src)
    inv = Inventory()
    staging = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vol3d-ingest-"))
    queue: list[tuple[Path, str, Path | None]] = [(src.parent, "", src) if src.is_file() else (src, "", None)]
    while queue:
        root, prefix, single = queue.pop(0)
        for f in _walk(root, prefix, single):
            name = f.rel.rsplit("/", 1)[-1]
            if _is_ignored(f.rel, name, exclude):
                continue
            inv.by_path[f.path] = f
            low = name.lower()
            kind = volume_kind(name)
            if low.endswith(".zip"):
                target = _extract_zip(f, staging, inv)
                if target is not None:
                    queue.append((target, f.rel + "!/", None))
            elif low == "dicomdir":
                inv.dicomdirs.append(f)
            elif kind is not None:
                inv.volumes.append((f, kind[0]))
            elif low.endswith(".dcm") or low.endswith(".dicom") or low.endswith(".ima"):
                inv.dicom.append(f)
            else:
                inv.other.append(f)
    return inv


def dicomdir_references(dicomdir: FoundFile) -> tuple[list[Path], str]:
    """Files a DICOMDIR references (absolute paths) and an error message if it cannot be parsed."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(pydicom.dcmread(dicomdir.path, force=True))
        return sorted({Path(inst.path).resolve() for inst in fs}), ""
    except Exception as exc:  # a broken index must not stop the scan: the files are walked anyway
        return [], f"{type(exc).__name__}: {exc}"
