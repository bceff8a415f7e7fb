"""Find the files of an export: walk folders, unpack zips, sort files into kinds.

Every file ends up in exactly one place: a DICOM file to header-scan, a volume file
(NIfTI/NRRD/MHA) with its sidecar and data files, a row for a non-medical file, or the
documented ignore list (DICOMDIR index files, sidecars, header data files, hidden files,
``IngestConfig.exclude`` patterns). See docs/ingest.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from preprocess import reasons
from preprocess.ingest.config import IngestConfig
from preprocess.types import Candidate, Identity

# Extensions of volume files read without DICOM, and the kind they map to (longest first). The
# nibabel kinds (NIBABEL_KINDS in volumes.py) name the header; its data file is a companion.
VOLUME_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "mha"),
    (".mhd", "mha"),
    (".mgz", "mgh"),  # FreeSurfer
    (".mgh", "mgh"),
    (".mnc", "minc"),  # MINC 1 (NetCDF) and MINC 2 (HDF5)
    (".par", "parrec"),  # Philips PAR header, data in .REC
    (".head", "afni"),  # AFNI HEAD, data in .BRIK(.gz)
    (".hdr", "analyze"),  # Analyze 7.5 / NIfTI pair header, data in .img
)
# Neuroimaging files that are not image volumes, recognised so their row says what they are
# (longest suffix first; matched before VOLUME_EXTENSIONS, since CIFTI files end in .nii).
NOT_VOLUMES: tuple[tuple[str, str], ...] = tuple(
    [(f".{k}.nii", "CIFTI-2 grayordinate data (values on the cortical surface and subcortical voxels)")
     for k in ("dconn", "dtseries", "dscalar", "dlabel", "dpconn", "pconn", "ptseries", "pscalar", "pdconn",
               "dfan", "fiberTEMP")]
    + [(".trk", "a TrackVis tractogram (streamlines)"), (".tck", "an MRtrix tractogram (streamlines)"),
       (".trx", "a TRX tractogram (streamlines)"), (".gii", "a GIFTI surface or surface data")]
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


def not_volume(name: str) -> str | None:
    """What a neuroimaging file that is not an image volume is (:data:`NOT_VOLUMES`), or None."""
    low = name.lower()
    return next((what for ext, what in NOT_VOLUMES if low.endswith(ext.lower())), None)


def volume_kind(name: str) -> tuple[str, str] | None:
    """``(kind, stem)`` of a volume file name (:data:`VOLUME_EXTENSIONS`), or None."""
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
    return file_row(f, "skipped", reasons.NOT_MEDICAL_FILE, f"{f.rel} is not a DICOM file nor a volume format vol3d "
                    "reads (NIfTI, NRRD, MHA/MHD, MGH/MGZ, MINC, PAR/REC, AFNI, Analyze).")


def _is_ignored(rel: str, name: str, exclude: tuple[str, ...]) -> bool:
    parts = rel.replace("!/", "/").split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts) or name.lower() in OS_FILES:
        return True
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in exclude)


def _not_regular_row(rel: str, path: Path, what: str) -> Candidate:
    return file_row(FoundFile(path, rel), "skipped", reasons.NOT_REGULAR_FILE,
                    f"{rel} is {what}; it was not read.")  # fmt: skip


def _walk(root: Path, prefix: str, single: Path | None, inv: Inventory) -> list[FoundFile]:
    """Regular files below ``root`` in sorted order, without recursion (any depth).

    Symlinks are followed only to targets inside ``root``, and a folder is entered once (a
    symlink loop ends there). Named pipes, sockets, devices and links out of ``root`` get a
    skipped ``NOT_REGULAR_FILE`` row and are never opened (opening a pipe would block).
    """
    if single is not None:
        return [FoundFile(single.resolve(), prefix + single.name)]
    top = root.resolve()
    out: list[FoundFile] = []
    visited: dict[Path, str] = {}  # folder -> the relative path it was read under
    seen_files: dict[Path, str] = {}
    links_to_files: list[tuple[Path, str, Path]] = []
    stack: list[tuple[Path, str]] = [(top, "")]  # real folders, depth first in sorted order
    links: list[tuple[Path, str, str]] = []  # folders reached through a symlink: read after every real one
    while stack or links:
        if stack:
            folder, rel_dir = stack.pop()
        else:
            folder, rel_dir, link = links.pop(0)
            if folder in visited:  # the real folder (or another link to it) was read already
                inv.rows.append(_not_regular_row(link, folder, f"a link to {visited[folder] or '.'}, which was read"))
                continue
        if folder in visited:
            continue
        visited[folder] = rel_dir.rstrip("/")
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            inv.rows.append(_not_regular_row(prefix + (rel_dir or "."), folder,
                                             f"a folder that cannot be listed ({exc.strerror or exc})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith(".") or e.name == "__MACOSX":  # ignored anyway (see _is_ignored)
                continue
            rel = prefix + rel_dir + e.name
            path = Path(e.path)
            is_link = e.is_symlink()
            try:
                if is_link:
                    target = path.resolve(strict=True)
                    if not target.is_relative_to(top):
                        inv.rows.append(_not_regular_row(rel, path, "a symlink to a place outside the input folder"))
                        continue
                else:
                    target = path  # canonical already: its folder is, and it is no link
                mode = target.stat().st_mode
            except (OSError, RuntimeError):  # dangling link, symlink loop, permission
                inv.rows.append(_not_regular_row(rel, path, "a broken or looping symlink, or cannot be read"))
                continue
            if stat.S_ISDIR(mode):
                if is_link:
                    links.append((target, rel_dir + e.name + "/", rel))
                else:
                    subdirs.append((target, rel_dir + e.name + "/"))
            elif stat.S_ISREG(mode):
                if target in seen_files:  # read each file once
                    inv.rows.append(_not_regular_row(rel, path, f"a link to {seen_files[target]}, which was read"))
                elif is_link:  # a link to a file: read under the real name when the walk gets there
                    links_to_files.append((target, rel, path))
                else:
                    seen_files[target] = rel
                    out.append(FoundFile(target, rel))
            elif not _is_ignored(rel, e.name, ()):
                inv.rows.append(_not_regular_row(rel, path, "not a regular file (a named pipe, socket or device)"))
        stack.extend(reversed(subdirs))
    for target, rel, path in links_to_files:
        if target in seen_files:
            inv.rows.append(_not_regular_row(rel, path, f"a link to {seen_files[target]}, which was read"))
        else:  # the only way to this file
            seen_files[target] = rel
            out.append(FoundFile(target, rel))
    return out


def _staging_name(rel: str) -> str:
    """A folder name unique per archive: readable stem plus a hash of the full relative path
    (``patient A.zip`` and ``patient_A.zip`` must never share one)."""
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.rsplit("/", 1)[-1])[:40] + "-" + digest


class _LimitExceeded(Exception):
    pass


def _extract_zip(f: FoundFile, staging: Path, inv: Inventory, limits: IngestConfig, depth: int) -> Path | None:
    """Unpack ``f`` below ``staging`` within the archive limits of ``limits``.

    Members with unsafe paths become UNREADABLE rows; a zip over a limit (total unpacked size,
    unpacked/packed ratio, member count, nesting depth) is failed ``ARCHIVE_LIMIT`` and what was
    unpacked of it removed. The counts are enforced on the bytes actually inflated, not on the
    sizes the zip declares.
    """
    target = staging / _staging_name(f.rel)
    try:
        if depth > limits.max_archive_depth:
            raise _LimitExceeded(f"it is nested {depth} zips deep (ingest.max_archive_depth "
                                 f"{limits.max_archive_depth})")
        with zipfile.ZipFile(f.path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) > limits.max_archive_members:
                raise _LimitExceeded(f"it has {len(members)} members (ingest.max_archive_members "
                                     f"{limits.max_archive_members})")
            total = 0
            for info in members:
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
                allowed = max(info.compress_size, 1) * limits.max_archive_ratio
                written = 0
                with zf.open(info) as src, open(dest, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        total += len(chunk)
                        if total > limits.max_archive_bytes:
                            raise _LimitExceeded(f"it unpacks to more than {limits.max_archive_bytes} bytes "
                                                 "(ingest.max_archive_bytes)")
                        if written > (1 << 20) and written > allowed:
                            raise _LimitExceeded(f"member {info.filename} inflates more than "
                                                 f"{limits.max_archive_ratio:g} times (ingest.max_archive_ratio)")
                        out.write(chunk)
    except _LimitExceeded as exc:
        shutil.rmtree(target, ignore_errors=True)
        inv.rows.append(file_row(f, "failed", reasons.ARCHIVE_LIMIT,
                                 f"zip archive {f.rel} was not unpacked: {exc}; unpack it yourself if it is "
                                 "genuine, or raise the limit in the config."))  # fmt: skip
        return None
    except Exception as exc:  # any failure of one archive (bad zip, CRC, unsupported method, disk) is its row
        shutil.rmtree(target, ignore_errors=True)
        inv.rows.append(
            file_row(
                f,
                "failed",
                reasons.UNREADABLE,
                f"zip archive {f.rel} cannot be unpacked ({type(exc).__name__}: {exc}); re-export it.",
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


def discover(src: Path, exclude: tuple[str, ...], workdir: Path | None,
             limits: IngestConfig | None = None) -> Inventory:  # fmt: skip
    """Walk ``src`` (a folder, or a single file), unpacking zips (recursively, within the archive
    limits of ``limits``) below ``workdir``, each into a folder of its own (without ``workdir``: into a
    temporary folder made for the first zip, which the caller removes once the candidates are loaded;
    a tree without zips leaves nothing behind).

    Paths matching ``exclude`` or the patterns of ``src/.vol3dignore`` are not looked at.
    """
    limits = limits or IngestConfig()
    src = Path(src)
    if not src.exists():
        from preprocess.errors import InputError

        raise InputError(f"input {src} does not exist; pass a folder, zip, or a DICOM, NIfTI, NRRD, MHA, MGH/MGZ, "
                         "MINC, PAR/REC, AFNI or Analyze file.")
    exclude = tuple(exclude) + read_ignore_file(src)
    inv = Inventory()
    staging = Path(workdir) if workdir is not None else None  # a temporary folder only once a zip needs one
    queue: list[tuple[Path, str, Path | None, int]] = [
        (src.parent, "", src, 0) if src.is_file() else (src, "", None, 0)
    ]
    while queue:
        root, prefix, single, depth = queue.pop(0)
        for f in _walk(root, prefix, single, inv):
            name = f.rel.rsplit("/", 1)[-1]
            if _is_ignored(f.rel, name, exclude):
                continue
            inv.by_path[f.path] = f
            low = name.lower()
            kind = volume_kind(name)
            if low.endswith(".zip"):
                if staging is None:
                    staging = Path(tempfile.mkdtemp(prefix="vol3d-ingest-"))
                target = _extract_zip(f, staging, inv, limits, depth + 1)
                if target is not None:
                    queue.append((target, f.rel + "!/", None, depth + 1))
            elif low == "dicomdir":
                inv.dicomdirs.append(f)
            elif (what := not_volume(name)) is not None:
                inv.rows.append(file_row(f, "skipped", reasons.NOT_IMAGE, f"{f.rel} is {what}, not an image volume."))
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
