"""Ingest: find every series/file in an export, validate it, load it in its original grid.

Public API (torch-free; see docs/ingest.md for rules and reason codes)::

    cands = scan(src, IngestConfig(), workdir=cache / ".staging")  # headers only
    image = load(cands[0], cfg)        # Image: float32 (X, Y, Z) + RAS+ affine; works in a worker process
    digest = content_hash(cands[0])    # sha256 of the source bytes (+ 4D volume index)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from preprocess import reasons
from preprocess.ingest import channels
from preprocess.ingest.config import IngestConfig
from preprocess.ingest.dicom import Header, dicom_candidates, load_dicom, quiet_pydicom, read_headers
from preprocess.ingest.discover import (
    TEXT_OR_OFFICE,
    FoundFile,
    dicomdir_references,
    discover,
    file_row,
    not_medical_row,
)
from preprocess.ingest.volumes import NIBABEL_KINDS, claim_companions, load_volume, volume_candidates
from preprocess.types import Candidate, Image, SeriesError

__all__ = ["IngestConfig", "scan", "load", "content_hash"]


def scan(
    src: Path, cfg: IngestConfig, workdir: Path | None = None, progress: bool = False, index: Any = None,
    processes: int = 0,
) -> list[Candidate]:
    """Every series/file under ``src`` as a :class:`Candidate` (ok, skipped or failed), without reading pixels.

    Args:
        src: a folder tree, DICOMDIR disc layout, zip (of either), or a single NIfTI/NRRD/MHA/DICOM/zip file.
        workdir: staging folder where zips are unpacked (a temporary folder if None); candidates
            point into it, so keep it until they are loaded.
        progress: show a progress bar while reading DICOM headers.
        index: a :class:`~preprocess.ingest.scan_index.ScanIndex`: headers of files unchanged since it
            recorded them are taken from it, the others read and recorded.
        processes: header-reading processes (0: one per CPU core, at most 8, once there are thousands
            of files; 1: threads in this process).
    Returns:
        Candidates sorted by ``(source[0], key)``; ``source`` paths are relative to ``src``
        (``a.zip!/inner/file`` inside zips). Pixels are read only to compare duplicate slices.
    """
    with quiet_pydicom():  # its validation warnings quote tag values; the rows say what is wrong instead
        return _scan(src, cfg, workdir, progress, index, processes)


def _scan(src: Path, cfg: IngestConfig, workdir: Path | None, progress: bool, index: Any = None,
          processes: int = 0) -> list[Candidate]:
    inv = discover(Path(src), tuple(cfg.exclude), workdir, limits=cfg)
    rows: list[Candidate] = list(inv.rows)

    # DICOMDIR: its references are DICOM for sure; files it does not list are still scanned.
    referenced: set[Path] = set()
    for d in inv.dicomdirs:
        refs, err = dicomdir_references(d)
        if err:
            rows.append(file_row(d, "skipped", reasons.NOT_IMAGE, f"DICOMDIR index {d.rel} cannot be parsed ({err}); "
                                 "the folder's files were scanned without it."))  # fmt: skip
        for ref in refs:
            if ref in inv.by_path:
                referenced.add(ref)
            else:
                rel = (
                    ref.relative_to(d.path.parent).as_posix()
                    if ref.is_relative_to(d.path.parent)
                    else ref.name
                )
                prefix = d.rel[: -len("DICOMDIR")]
                rows.append(file_row(FoundFile(ref, prefix + rel), "failed", reasons.UNREADABLE,
                                     f"DICOMDIR {d.rel} lists {prefix + rel}, which is missing from the export; "
                                     "copy the complete disc."))  # fmt: skip

    companions = claim_companions(inv)
    for f, kind in inv.volumes:
        sidecar, data = companions[f.rel]
        try:
            rows.extend(volume_candidates(f, kind, sidecar, data, cfg))
        except Exception as exc:  # one damaged file is its own failed row, never the end of the scan
            rows.append(file_row(f, "failed", reasons.UNREADABLE,
                                 f"{f.rel} cannot be read ({type(exc).__name__}: {exc}); re-export it."))  # fmt: skip

    to_read: list[tuple[FoundFile, bool]] = [(f, True) for f in inv.dicom]
    for f in inv.other:
        suffix = Path(f.rel).suffix.lower()
        if suffix in TEXT_OR_OFFICE and f.path not in referenced:
            rows.append(not_medical_row(f))
        else:
            to_read.append((f, f.path in referenced))
    known = index.lookup(to_read) if index is not None else {}
    todo = [item for item in to_read if item[0].rel not in known]
    fresh = read_headers(todo, progress=progress, processes=processes)
    if index is not None:
        index.store(zip(todo, fresh, strict=True))
    read = iter(fresh)
    headers: list[Header] = []
    for res in (known[f.rel] if f.rel in known else next(read) for f, _ in to_read):
        if isinstance(res, Header):
            headers.append(res)
        elif res is not None:
            rows.append(res)
    rows.extend(dicom_candidates(headers, cfg))
    if cfg.sequence_channels:
        rows = channels.combine(rows, cfg.sequence_channels)
    _unique_keys(rows)
    rows.sort(key=lambda c: (c.source[0] if c.source else "", c.key))
    return rows


def _unique_keys(rows: list[Candidate]) -> None:
    """Give repeated keys (a UID split into a volume and a scout, two files with one stem) an ``@n`` suffix.

    The row most worth joining keeps the bare key: ok before skipped/failed, then the most
    files, then the first source path.
    """
    by_key: dict[str, list[Candidate]] = defaultdict(list)
    for c in rows:
        by_key[c.key].append(c)
    for key, group in by_key.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda c: (c.status != "ok", -len(c.source), c.source[0] if c.source else ""))
        for i, c in enumerate(group[1:], start=2):
            c.key = f"{key}@{i}"


def load(c: Candidate, cfg: IngestConfig) -> Image:
    """Pixels of a scanned candidate in its original grid (``Image.array`` float32 ``(X, Y, Z)``).

    Needs only the picklable candidate (``source_files``, ``extra``), so it runs in worker
    processes. Raises :class:`SeriesError` (reason code + sentence) when the data cannot be used.
    """
    if c.extra.get("channels"):  # a multi-sequence study (ingest.sequence_channels)
        others = c.extra["channels"]
        n = len(c.source) - sum(len(o.source) for o in others)  # the first channel's files lead
        first = dataclasses.replace(c, source=c.source[:n], source_files=c.source_files[:n],
                                    extra={k: v for k, v in c.extra.items() if k != "channels"})
        return channels.stack(load(first, cfg), [load(o, cfg) for o in others],
                              names=[c.source[0], *(o.source[0] for o in others)])
    try:
        if c.kind == "dicom":
            with quiet_pydicom():
                return load_dicom(c)
        if c.kind in (*NIBABEL_KINDS, "nrrd", "mha"):
            return load_volume(c)
    except SeriesError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # keep one bad series from stopping a batch; the reason says it is a bug
        raise SeriesError(
            reasons.PROCESSING_ERROR, f"{c.source[0] if c.source else c.key}: {type(exc).__name__}: {exc}"
        ) from exc
    raise SeriesError(c.reason or reasons.NOT_MEDICAL_FILE, c.detail or f"{c.key} is not an image candidate")


def content_hash(c: Candidate) -> str:
    """sha256 hex over the bytes of ``c.source_files`` in ``source`` order (+ the 4D volume index).

    A file changed in place changes the hash, a moved or renamed one does not.
    """
    h = hashlib.sha256()
    for path in c.source_files:
        size = Path(path).stat().st_size
        h.update(size.to_bytes(8, "little"))  # length prefix: file boundaries are part of the content
        with open(path, "rb") as fp:
            while chunk := fp.read(1 << 20):
                h.update(chunk)
    if c.extra.get("volume") is not None:
        h.update(f"#{c.extra['volume']}".encode())
    return h.hexdigest()
