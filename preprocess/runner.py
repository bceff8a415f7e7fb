"""Orchestration of ``vol3d preprocess``: scan, join side data, process cases in parallel, resume.

One run:

1. lock the cache directory (``.vol3d.lock``: one run at a time), validate the side tables
   and the cache directory (exit 2 before any work);
2. ``ingest.scan`` the input (exit 2 when it holds no image at all), unpacking archives into a
   fresh staging folder beside the cache (``.<cache>.staging-*``, mode 0700, removed however the
   run ends); keep this shard's candidates (``--shard i/N``);
3. give every candidate its pseudonymous ids (:mod:`preprocess.ids`) and side data
   (:mod:`preprocess.sidecars`) while the identifiers are at hand;
4. process the ``ok`` candidates in a process pool: each worker hashes the source bytes,
   reuses the case when source, side data and parameters are unchanged, else loads,
   prepares and writes its own HDF5 file (temporary name + rename);
5. append each finished case to ``manifest.jsonl`` (flushed and fsynced), so a run killed
   at any moment resumes where it stopped;
6. compact the manifest (one row per id), write the fingerprint, print a summary.

``merge_caches`` joins shard caches into one.

No identifier reaches the manifest or the log: every ``detail`` goes through one
:class:`~preprocess.sanitise.Sanitiser`, which removes the candidate's key, UIDs, accession and
PatientID and every absolute path, and hashes relative paths (unless ``keep_paths``); the
paths go to the crosswalk beside the cache (:mod:`preprocess.sanitise`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import ids, reasons
from preprocess.config import PreprocessConfig
from preprocess.errors import EXIT_OK, EXIT_PARTIAL, InputError, WorkerStartError, worker_death_hint
from preprocess.ingest.scan_index import index_path
from preprocess.manifest import (
    MANIFEST_NAME,
    ManifestRow,
    ManifestWriter,
    atomic_write_text,
    compact,
    latest_by_id,
    read_manifest,
    write_manifest,
)
from preprocess.sanitise import (
    Sanitiser,
    crosswalk_path,
    make_sanitiser,
    path_redactor,
    read_crosswalk,
    write_crosswalk,
)
from preprocess.sidecars import CaseSide, SideTables
from preprocess.types import Candidate, SeriesError

log = logging.getLogger(__name__)

PARAMS_NAME = "params.json"
FINGERPRINT_NAME = "fingerprint.json"
CASES_DIR = "cases"
WORK_DIR = ".work"  # where earlier versions unpacked zips inside the cache; removed when found
LOCK_NAME = ".vol3d.lock"  # held (flock) by the run writing the cache; holds its pid
FORMAT_VERSION = 1
#: Default split fractions (train, val, test).
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


@dataclasses.dataclass
class RunOptions:
    """How to run (none of this changes what is written for a case)."""

    workers: int = 0  # worker processes; 0 = min(4, CPU cores); 1 = in this process
    shard: tuple[int, int] | None = None  # (i, N): process only shard i of N (0 <= i < N)
    overwrite: bool = False  # discard vol3d's own files in --out first (other files are never touched)
    # keyed hashes instead of input paths in the manifest and its details (the default: hospital
    # exports name folders after patients); the paths go to the crosswalk file, outside the cache
    redact_paths: bool = True
    crosswalk: Path | None = None  # default: <out>.crosswalk.jsonl beside the cache (see crosswalk_path)
    rehash: bool = False  # re-read every source byte on a rerun (default: unchanged size + mtime = unchanged)
    # called with the number of cases written so far, after each row is durable in the manifest
    # (progress reporting; the kill test stops the process at a chosen point with it)
    on_case_written: Callable[[int], None] | None = None
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT
    progress: bool = True  # tqdm progress bar on stderr
    # persistent index of the DICOM headers read (PHI: outside the cache, mode 0600); a rerun reads only
    # files whose size or mtime changed. None: <out>.scan.sqlite beside the cache (see index_path)
    scan_index: Path | None = None
    use_scan_index: bool = True
    scan_only: bool = False  # scan into the index and stop (the first step of a sharded run); no cache written
    scan_processes: int = 0  # header-reading processes (0: one per core, at most 8, for thousands of files)


@dataclasses.dataclass
class Summary:
    """What a run (or merge) did; :meth:`table` renders it for the terminal."""

    out: Path
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # status -> n
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (status, reason) -> n
    written: int = 0  # cases processed and written in this run
    reused: int = 0  # cases already in the cache, unchanged
    no_report: int = 0  # ok cases without a report (only counted when --reports was given)
    total_rows: int = 0  # rows in the compacted manifest (all runs)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.counts["failed"] else EXIT_OK

    def table(self) -> str:
        lines = [f"{'status':<10}{'reason':<28}{'count':>7}", "-" * 45]
        for status in ("ok", "skipped", "failed"):
            if status == "ok" or self.counts[status]:
                lines.append(f"{status:<10}{'':<28}{self.counts[status]:>7}")
            for (st, reason), n in sorted(self.reasons.items()):
                if st == status:
                    lines.append(f"{'':<10}{reason:<28}{n:>7}")
        lines.append("-" * 45)
        lines.append(f"written {self.written}, reused (unchanged) {self.reused}, ok without report {self.no_report}")
        lines.append(f"manifest rows {self.total_rows}; cache {self.out}; {self.seconds:.1f} s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- cache directory


def case_relpath(case_id: str) -> str:
    """Case file relative to the cache: ``cases/<2 hex>/<id>.h5`` (256 folders, none too large)."""
    return f"{CASES_DIR}/{case_id[2:4]}/{case_id}.h5"


def make_params(cfg: PreprocessConfig, key: bytes, split_fractions: Iterable[float]) -> dict[str, Any]:
    """The content of ``params.json``: config (id key blanked), its hash, and a key fingerprint."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("vol3d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": FORMAT_VERSION,
        "vol3d": version,
        "params_hash": cfg.params_hash(),
        "key_check": ids.key_check(key),
        "split_fractions": [float(f) for f in split_fractions],
        "config": cfg.public_dict(),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); restore it, or pass --overwrite to rebuild") from None


def _changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _own_files(out: Path) -> list[Path]:
    """The files vol3d writes in a cache (and only those): what --overwrite may remove."""
    own = [out / n for n in (MANIFEST_NAME, FINGERPRINT_NAME, PARAMS_NAME)]
    own += [out / f"{n}.tmp" for n in (MANIFEST_NAME, FINGERPRINT_NAME, PARAMS_NAME)]
    cases = out / CASES_DIR
    if cases.is_dir():
        # case files c_<hex>.h5 and the temporaries of store.write_case (.c_<hex>.h5.<pid>.tmp)
        own += [p for p in cases.glob("*/*c_*.h5*") if p.is_file()]
    return [p for p in own if p.exists()]


def _remove_own_files(out: Path) -> None:
    for p in _own_files(out):
        p.unlink()
    cases = out / CASES_DIR
    if cases.is_dir():
        for d in sorted(cases.iterdir()):
            with contextlib.suppress(OSError):  # only empty folders go; anything else stays
                d.rmdir()
        with contextlib.suppress(OSError):
            cases.rmdir()
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def _clean_temporaries(out: Path) -> None:
    """Temporary case files left by a killed run (never complete: written files are renamed)."""
    from preprocess import store

    cases = out / CASES_DIR
    if cases.is_dir():
        store.remove_temp_files(cases)  # those of store.write_case
        for p in cases.glob("*/c_*.h5.part"):  # those of _link_or_copy (merge)
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def cache_lock(out: Path):
    """Hold an exclusive ``flock`` on ``out/.vol3d.lock`` (creating ``out``) while the block runs.

    A second run on the same cache would delete the first one's in-flight temporaries and
    interleave manifest rows, so it is refused with :class:`InputError` (exit 2) naming the
    pid that holds the lock. The lock goes with the process (even ``kill -9``); the file stays.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per cache is then the user's business
        out.mkdir(parents=True, exist_ok=True)
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+", encoding="ascii") as fh:  # closing it releases the lock
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            raise InputError(
                f"another vol3d preprocess (pid {pid}) is writing {out}; wait for it or use another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def open_cache(out: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Create ``out`` or check that it is a cache made with the same parameters and id key.

    Refuses (exit 2, nothing changed) a cache made with other parameters or another key,
    and a non-empty folder that is not a vol3d cache, unless ``overwrite``; even then only
    vol3d's own files are removed. Call it while holding :func:`cache_lock`.
    """
    out.mkdir(parents=True, exist_ok=True)
    check_cache(out, params, overwrite)
    if overwrite:
        _remove_own_files(out)
    atomic_write_text(out / PARAMS_NAME, json.dumps(params, indent=2, sort_keys=True) + "\n")
    _clean_temporaries(out)


def check_cache(out: Path, params: dict[str, Any], overwrite: bool) -> None:
    """The checks of :func:`open_cache`, changing nothing (raises :class:`InputError`)."""
    pfile = out / PARAMS_NAME
    if not out.is_dir():
        return
    if overwrite:
        return
    if pfile.exists():
        old = _read_json(pfile)
        if old.get("params_hash") != params["params_hash"]:
            changed = _changed_fields(old.get("config", {}), params["config"]) or ["(unknown)"]
            raise InputError(
                f"{out} holds a cache made with different parameters (changed: {', '.join(changed)}); "
                "write to a new --out, or pass --overwrite to replace vol3d's files there"
            )
        if old.get("key_check") != params["key_check"]:
            raise InputError(
                f"{out} was made with a different id key ({ids.ENV_VAR}), so its pseudonymous ids would not "
                "match; use the original key, a new --out, or --overwrite"
            )
    elif any(p.name not in (WORK_DIR, LOCK_NAME) for p in out.iterdir()):
        raise InputError(
            f"{out} is not empty and is not a vol3d cache (no {PARAMS_NAME}); choose a new or empty --out "
            "(or pass --overwrite to write vol3d's files next to the existing ones)"
        )


# ----------------------------------------------------------------------------- per-case work (worker side)


@dataclasses.dataclass
class CaseTask:
    """Everything a worker needs for one case (plain, picklable)."""

    candidate: Candidate
    row: ManifestRow  # id, patient, study, split, source already filled in
    side: CaseSide
    previous: ManifestRow | None  # the last manifest row of this id, to skip unchanged work
    sanitise: Sanitiser = dataclasses.field(default_factory=Sanitiser)  # for every detail and log line
    hash_key: bytes = b""  # ids.source_hash_key: source and side-data hashes are keyed
    rehash: bool = False  # hash every source byte even when sizes and mtimes are unchanged


def _source_stat(task: CaseTask) -> str:
    """Keyed digest of the sizes and mtimes of a case's files: equal on a rerun means unchanged
    (as rsync and make decide), so a resume does not re-read every source byte."""
    stats = [(st.st_size, st.st_mtime_ns) for st in map(os.stat, task.candidate.source_files)]
    return ids.keyed_source_hash(task.hash_key, json.dumps([stats, task.candidate.extra.get("volume")]))


def _reusable(prev: ManifestRow | None, source_hash: str, side_hash: str, params_hash: str, out: Path) -> bool:
    if prev is None or (prev.source_hash, prev.side_hash, prev.params_hash) != (source_hash, side_hash, params_hash):
        return False
    if prev.status == "ok":
        return prev.h5 is not None and (out / prev.h5).is_file()
    # Deterministic failures would fail again; an unexpected error may be transient (memory).
    return prev.status == "failed" and prev.reason != reasons.PROCESSING_ERROR


def _load_side_map(path: str | None, what: str, series: str, image: Any) -> np.ndarray | None:
    """A label or lesion map of the series at ``series`` (its relative source path), aligned on
    ``image``'s original grid, or None without one. Errors never name the map's file: its name is
    the series' key (a UID)."""
    if path is None:
        return None
    import nibabel as nib

    from preprocess.transforms import align_label

    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a bad file; its message holds the path
        kind = "not a NIfTI file" if isinstance(exc, nib.filebasedimages.ImageFileError) else type(exc).__name__
        raise SeriesError(reasons.LABEL_MISMATCH, f"the {what} joined to {series} cannot be read ({kind}); "
                          "re-export it") from None  # fmt: skip
    try:
        return align_label(arr, img.affine, image, what=what)
    except SeriesError as exc:
        raise SeriesError(exc.reason, f"the {what} joined to {series} does not fit it: {exc.detail}; "
                          "re-export it on the image's grid") from None  # fmt: skip


def process_case(task: CaseTask, cfg: PreprocessConfig, out: Path, params_hash: str) -> tuple[ManifestRow, bool]:
    """Load, prepare and write one case; returns its manifest row and whether it was reused unchanged.

    Never raises for a bad case: a :class:`SeriesError` becomes a ``failed`` row with its
    reason, anything else a ``failed`` row with ``PROCESSING_ERROR`` (a bug to report).
    """
    from preprocess import ingest

    row = dataclasses.replace(task.row)
    side_hash = ids.keyed_source_hash(task.hash_key, task.side.digest())
    try:
        stat = _source_stat(task)
        prev = task.previous
        if not task.rehash and prev is not None and prev.source_stat == stat and prev.source_hash:
            source_hash = prev.source_hash  # same sizes and mtimes: the bytes are not read again
        else:
            source_hash = ids.keyed_source_hash(task.hash_key, ingest.content_hash(task.candidate))
        if _reusable(prev, source_hash, side_hash, params_hash, out):
            assert prev is not None
            # touched but equal bytes: reused, with the new stat (the caller writes a changed row)
            return (prev if prev.source_stat == stat else dataclasses.replace(prev, source_stat=stat)), True
        row.source_hash, row.side_hash, row.params_hash, row.source_stat = source_hash, side_hash, params_hash, stat
        image = ingest.load(task.candidate, cfg.ingest)
        series = task.candidate.source[0] if task.candidate.source else "this series"
        label = _load_side_map(task.side.label_path, "label map", series, image)
        instances = _load_side_map(task.side.lesion_path, "lesion map", series, image)
        from preprocess.transforms import prepare

        prepared = prepare(image, cfg, label=label, instances=instances)
        _write(task, row, prepared, cfg, out, instances)
    except SeriesError as exc:
        _fail(row, exc.reason, task.sanitise(exc.detail))
    except Exception as exc:  # a bug or an exhausted machine: record it, keep going with the other cases
        # the message of an arbitrary exception may quote paths or header values: only its type is kept
        log.debug("unexpected error in case %s:\n%s", row.id, task.sanitise(traceback.format_exc()))
        _fail(row, reasons.PROCESSING_ERROR, f"unexpected {type(exc).__name__}; rerun with -v and report it")
    return row, False


def _fail(row: ManifestRow, reason: str, detail: str) -> None:
    row.status, row.reason, row.detail = "failed", reason, detail
    row.h5 = row.key = row.shape = row.spacing = None
    row.has_label = row.has_report = row.n_boxes = row.n_codes = row.stats = None


def _write(
    task: CaseTask, row: ManifestRow, prepared: Any, cfg: PreprocessConfig, out: Path, instances: Any = None
) -> None:
    from preprocess import store
    from preprocess.transforms import FLAG_NOTES, cached_boxes

    rel = case_relpath(row.id)
    store.write_case(  # adds the boxes' flags to prepared.flags
        out / rel,
        row.id,
        prepared,
        boxes=cached_boxes(task.side.boxes, prepared, instances),
        report={"findings": task.side.findings, "impression": task.side.impression},
        codes=task.side.codes,
        attrs={"source_hash": row.source_hash, "params_hash": row.params_hash, "side_hash": row.side_hash},
        cfg=cfg,
    )
    row.h5, row.key = rel, row.id
    row.shape = [int(n) for n in prepared.shape]
    row.spacing = [round(float(s), 6) for s in prepared.spacing]
    row.flags = list(prepared.flags)
    notes = [FLAG_NOTES[f] for f in row.flags if f in FLAG_NOTES]
    if notes:
        row.detail = " ".join([row.detail, *(f"Note: {n}." for n in notes)]).strip()
    row.has_label = prepared.label is not None
    row.has_report = task.side.has_report
    row.n_boxes = len(task.side.boxes)
    row.n_codes = len(task.side.codes)
    row.stats = _case_stats(prepared)


#: Foreground intensity quantiles kept per case in the manifest (enough for dataset percentiles).
N_STAT_QUANTILES = 101


def _case_stats(prepared: Any) -> dict[str, Any]:
    """The fingerprint summary of a case, with its intensity sample reduced to quantiles so the
    manifest stays small; kept in the manifest so resumed and merged runs can redo the fingerprint."""
    from preprocess import fingerprint

    stats = fingerprint.case_summary(prepared)
    fg = np.asarray(stats["fg_samples"], dtype=float)
    if fg.size > N_STAT_QUANTILES:
        fg = np.quantile(fg, np.linspace(0, 1, N_STAT_QUANTILES))
    stats["fg_samples"] = [round(float(v), 2) for v in fg]
    return stats


# ----------------------------------------------------------------------------- the run (parent side)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/N, e.g. 0/4 for the first of four shards") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need N >= 1 and 0 <= i < N (shards are numbered 0..N-1)")
    return i, n


def shard_of(candidate: Candidate, n: int) -> int:
    """Deterministic shard of a candidate: a hash of its kind, key and sources (not of the id key)."""
    text = "\x1f".join((candidate.kind, candidate.key, *candidate.source))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) % n


def resolve_workers(n: int) -> int:
    """``0`` means min(4, CPU cores): beyond that a CT export is usually disk bound."""
    return n if n > 0 else max(1, min(4, os.cpu_count() or 1))


def _base_row(
    c: Candidate, key: bytes, fractions: tuple[float, float, float], redact, sanitise: Sanitiser
) -> ManifestRow:
    patient = ids.patient_pseudonym(key, c)
    source = [redact(s) for s in c.source]
    return ManifestRow(
        id=ids.case_id(key, c),
        status=c.status,
        reason=c.reason,
        detail=sanitise(c.detail),
        modality=c.modality,
        kind=c.kind,
        source=source,
        patient=patient,
        study=ids.study_pseudonym(key, c),
        split=ids.assign_split(patient, fractions),
    )


class _Progress:
    """tqdm bar with ok / skipped / failed counts in its postfix (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.counts: collections.Counter = collections.Counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="series", desc="preprocess", dynamic_ncols=True)

    def update(self, status: str) -> None:
        self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(ok=self.counts["ok"], skipped=self.counts["skipped"], failed=self.counts["failed"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_tasks(tasks: list[CaseTask], cfg: PreprocessConfig, out: Path, params_hash: str, workers: int):
    """Yield ``(row, reused)`` per task as cases finish, ``workers`` processes at a time."""
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            yield process_case(t, cfg, out, params_hash)
        return
    # spawn: workers start clean (no inherited HDF5 handles or locks), on every OS.
    ctx = multiprocessing.get_context("spawn")
    pending = collections.deque(tasks)
    finished = 0
    while pending:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            in_flight: dict[cf.Future, CaseTask] = {}
            broken = False
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < 2 * workers:  # bounded: memory stays flat
                    t = pending.popleft()
                    in_flight[pool.submit(process_case, t, cfg, out, params_hash)] = t
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    t = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except cf.process.BrokenProcessPool as e:
                        if not finished:  # nothing ever finished: the workers cannot start, retrying is futile
                            raise WorkerStartError(f"the preprocessing workers died before finishing any case: "
                                                   f"{worker_death_hint()} (workers / --workers 1 processes the "
                                                   "cases in this process)") from e
                        broken = True
                        yield _worker_died(t), False
                    else:
                        finished += 1
                        yield result
            if broken:  # every case in flight is lost with the pool; report them, start a new pool
                for t in in_flight.values():
                    yield _worker_died(t), False


def _worker_died(task: CaseTask) -> ManifestRow:
    """The failed row of a case whose worker process died (lost with the pool)."""
    row = dataclasses.replace(task.row)
    _fail(row, reasons.PROCESSING_ERROR,
          "a worker process died while this case was in flight (out of memory?); rerun to retry")  # fmt: skip
    return row


def run_preprocess(
    src: str | Path,
    out: str | Path,
    cfg: PreprocessConfig,
    side: SideTables | None = None,
    opts: RunOptions | None = None,
) -> Summary:
    """Preprocess every series under ``src`` into the cache ``out``; resumable. See module docstring.

    Raises :class:`InputError`/``ConfigError`` (exit 2) before any work for bad input.
    """
    t0 = time.monotonic()
    src, out = Path(src), Path(out)
    side = side or SideTables()
    opts = opts or RunOptions()
    if not src.exists():
        raise InputError(f"input {src} does not exist; pass a DICOM folder, DICOMDIR, zip or image file")
    fractions = tuple(float(f) for f in opts.split_fractions)
    ids.assign_split("p_check", fractions)  # validates the fractions before any work
    walk = Path(opts.crosswalk or crosswalk_path(out)).resolve()
    if opts.redact_paths and walk.is_relative_to(out.resolve()):
        raise InputError(f"--crosswalk {walk} is inside the cache {out}; the crosswalk names patients' files "
                         "and must live outside the cache (the default is <CACHE>.crosswalk.jsonl beside it)")
    index = Path(opts.scan_index or index_path(out)).resolve()
    if opts.use_scan_index and index.is_relative_to(out.resolve()):
        raise InputError(f"--scan-index {index} is inside the cache {out}; the index holds the headers' "
                         "identifiers and must live outside the cache (the default is <CACHE>.scan.sqlite beside it)")
    key = ids.resolve_id_key(cfg.id_key)
    if opts.scan_only:
        return scan_only(src, out, cfg, side, opts, key, t0)
    params = make_params(cfg, key, fractions)
    with cache_lock(out):
        return _run_locked(src, out, cfg, side, opts, key, fractions, params, t0)


def _open_index(out: Path, opts: RunOptions, key: bytes) -> Any:
    """The run's scan index (None when disabled). A shard reads a shared index without writing it, so
    the tasks of an array job do not queue on its lock."""
    if not opts.use_scan_index:
        return None
    from preprocess.ingest.scan_index import ScanIndex

    path = Path(opts.scan_index or index_path(out))
    return ScanIndex(path, ids.source_hash_key(key), readonly=opts.shard is not None and path.is_file())


def scan_only(src: Path, out: Path, cfg: PreprocessConfig, side: SideTables, opts: RunOptions, key: bytes,
              t0: float) -> Summary:
    """``vol3d preprocess SRC --out CACHE --scan-only``: read every header into the scan index (the
    shards of an array job then read it instead of the export's headers); nothing is written to the cache."""
    from preprocess import ingest

    if not opts.use_scan_index:
        raise InputError("--scan-only fills the scan index; it cannot run with --no-scan-index")
    summary = Summary(out=Path(opts.scan_index or index_path(out)))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.scan-staging-", dir=summary.out.parent))
    try:
        with _open_index(out, dataclasses.replace(opts, shard=None), key) as index:
            rows = ingest.scan(src, _scan_config(cfg, src, side), workdir=staging, progress=opts.progress,
                               index=index, processes=opts.scan_processes)
            summary.total_rows = len(index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for c in rows:
        summary.counts[c.status] += 1
        if c.status != "ok":
            summary.reasons[(c.status, c.reason)] += 1
    summary.seconds = time.monotonic() - t0
    return summary


def _run_locked(src: Path, out: Path, cfg: PreprocessConfig, side: SideTables, opts: RunOptions, key: bytes,
                fractions: tuple[float, float, float], params: dict[str, Any], t0: float) -> Summary:  # fmt: skip
    check_cache(out, params, opts.overwrite)  # before the (long) scan; nothing written yet
    # archives unpack beside the cache, never inside it (raw DICOM holds every tag), one fresh
    # folder per run (mode 0700), removed however the run ends
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.staging-*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        return _run_scanned(src, out, cfg, side, opts, key, fractions, params, t0, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_scanned(src: Path, out: Path, cfg: PreprocessConfig, side: SideTables, opts: RunOptions, key: bytes,
                 fractions: tuple[float, float, float], params: dict[str, Any], t0: float,
                 workdir: Path) -> Summary:  # fmt: skip
    from preprocess import ingest

    params_hash = params["params_hash"]
    index = _open_index(out, opts, key)
    try:
        candidates = ingest.scan(src, _scan_config(cfg, src, side), workdir=workdir, progress=opts.progress,
                                 index=index, processes=opts.scan_processes)
    finally:
        if index is not None:
            index.close()
    _require_images(src, candidates, workdir)
    open_cache(out, params, opts.overwrite)
    if side.vocab is not None:
        from preprocess.sidecars import VOCAB_NAME

        atomic_write_text(out / VOCAB_NAME, json.dumps(side.vocab, indent=2, sort_keys=True) + "\n")
    if opts.shard is not None:
        i, n = opts.shard
        candidates = [c for c in candidates if shard_of(c, n) == i]
    redact = path_redactor(key, opts.redact_paths)
    hash_key = ids.source_hash_key(key)
    previous = latest_by_id(read_manifest(out / MANIFEST_NAME))

    summary = Summary(out=out)
    progress = _Progress(len(candidates), opts.progress)
    n_written = 0
    tasks: list[CaseTask] = []
    links: dict[str, dict[str, Any]] = {}
    if opts.redact_paths:  # the link back to the files, written before any case can be killed mid-way
        for c in candidates:
            links[ids.case_id(key, c)] = {"id": ids.case_id(key, c), "source": list(c.source),
                                          "manifest_source": [redact(x) for x in c.source]}  # fmt: skip
        write_crosswalk(opts.crosswalk or crosswalk_path(out), links)
    try:
        with ManifestWriter(out / MANIFEST_NAME) as writer:
            seen: set[str] = set()
            for c in candidates:
                case_side = side.for_case(c) if c.status == "ok" else None
                sanitise = make_sanitiser(c, redact, case_side)
                row = _base_row(c, key, fractions, redact, sanitise)
                if row.id in seen:  # two candidates with identical sources: ingest would be wrong
                    raise RuntimeError(f"duplicate case id {row.id} from the scan")
                seen.add(row.id)
                if case_side is not None:
                    tasks.append(CaseTask(c, row, case_side, previous.get(row.id), sanitise, hash_key, opts.rehash))
                    continue
                if previous.get(row.id) != row:
                    writer.append(row)
                _count(summary, row, side)
                progress.update(row.status)
            for row, reused in _run_tasks(tasks, cfg, out, params_hash, resolve_workers(opts.workers)):
                if reused:
                    summary.reused += 1
                    if previous.get(row.id) != row:  # only its source stat changed
                        writer.append(row)
                else:
                    writer.append(row)
                    summary.written += row.status == "ok"
                    n_written += 1
                    if opts.on_case_written is not None:
                        opts.on_case_written(n_written)
                _count(summary, row, side)
                progress.update(row.status)
                if row.status == "failed":
                    log.warning("case %s failed: %s %s", row.id, row.reason, row.detail)
    finally:
        progress.close()
    summary.total_rows = len(_finish(out, fractions))
    summary.seconds = time.monotonic() - t0
    return summary


def _require_images(src: Path, candidates: list[Candidate], workdir: Path) -> None:
    """Exit 2 (:class:`InputError`) when the scan found no image and no failed file: a wrong path,
    not an export whose every series was skipped by policy."""
    if any(c.kind != "file" or c.status == "failed" for c in candidates):
        return
    shutil.rmtree(workdir, ignore_errors=True)
    by_reason = collections.Counter(c.reason for c in candidates)
    seen = ", ".join(f"{n} {r}" for r, n in by_reason.most_common()) or "none"
    raise InputError(f"no image found under {src} ({len(candidates)} files looked at: {seen}); check the path "
                     "(a DICOM folder, DICOMDIR, zip or NIfTI/NRRD/MHA file)")  # fmt: skip


def _scan_config(cfg: PreprocessConfig, src: Path, side: SideTables) -> Any:
    """The ingest config for the scan: side tables kept inside SRC (labels/, reports.csv ...) are
    side data, not images, so they are excluded. Not part of ``params_hash``: shards and reruns
    that pass the tables from elsewhere give the same cache."""
    extra = []
    for p in side.paths:
        with contextlib.suppress(ValueError):  # outside SRC: nothing to exclude
            rel = p.resolve().relative_to(src.resolve()).as_posix()
            extra.append(f"{rel}/*" if p.is_dir() else rel)
    return dataclasses.replace(cfg.ingest, exclude=(*cfg.ingest.exclude, *extra)) if extra else cfg.ingest


def _count(summary: Summary, row: ManifestRow, side: SideTables | None = None) -> None:
    summary.counts[row.status] += 1
    if row.status != "ok":
        summary.reasons[(row.status, row.reason)] += 1
    elif side is not None and side.reports is not None and not row.has_report:
        summary.no_report += 1


def _finish(
    out: Path, fractions: tuple[float, float, float], rows: Iterable[ManifestRow] | None = None
) -> list[ManifestRow]:
    """Compact ``rows`` (default: the manifest's) to one row per id, sorted, refresh their splits,
    write them as the manifest, write the fingerprint; returns the rows written."""
    rows = compact(read_manifest(out / MANIFEST_NAME) if rows is None else rows)
    for r in rows:
        r.split = ids.assign_split(r.patient, fractions)
    write_manifest(out / MANIFEST_NAME, rows)
    from preprocess import fingerprint

    fingerprint.write_fingerprint(out, [r.stats for r in rows if r.status == "ok" and r.stats])
    return rows


# ----------------------------------------------------------------------------- merge


def _link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` atomically: a hard link when possible (write-once files), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_STATUS_RANK = {"ok": 0, "failed": 1, "skipped": 2}


def merge_caches(shards: list[str | Path], out: str | Path, overwrite: bool = False) -> Summary:
    """Join shard caches (same parameters and id key) into ``out``; case files are hard-linked or copied.

    A case found in several shards keeps its best row (ok over failed over skipped).
    """
    t0 = time.monotonic()
    out = Path(out)
    shard_dirs = [Path(s) for s in shards]
    if not shard_dirs:
        raise InputError("merge needs at least one shard cache: vol3d preprocess merge SHARD... --out CACHE")
    params = None
    for d in shard_dirs:
        if d.resolve() == out.resolve():
            raise InputError(f"--out {out} is also a shard; merge into a new directory")
        p = d / PARAMS_NAME
        if not p.is_file():
            raise InputError(f"{d} is not a vol3d cache (no {PARAMS_NAME}); pass the --out folders of the shard runs")
        this = _read_json(p)
        if params is None:
            params, first = this, d
        elif (this.get("params_hash"), this.get("key_check")) != (params.get("params_hash"), params.get("key_check")):
            what = "parameters" if this.get("params_hash") != params.get("params_hash") else "id keys"
            raise InputError(f"shards {first} and {d} were made with different {what}; they cannot be merged")
    assert params is not None
    with cache_lock(out):
        return _merge_locked(shard_dirs, out, params, overwrite, t0)


def _merge_locked(shard_dirs: list[Path], out: Path, params: dict[str, Any], overwrite: bool, t0: float) -> Summary:
    open_cache(out, params, overwrite)

    best: dict[str, tuple[ManifestRow, Path]] = {}
    for d in shard_dirs:
        for row in compact(read_manifest(d / MANIFEST_NAME)):
            old = best.get(row.id)
            if old is None or _STATUS_RANK[row.status] < _STATUS_RANK[old[0].status]:
                best[row.id] = (row, d)
    for row, d in best.values():
        if row.status == "ok" and row.h5:
            if row.h5 != case_relpath(row.id):  # e.g. "../A/evil.h5": never read or write outside the caches
                raise InputError(f"shard {d} lists case file {row.h5!r} for {row.id}, not {case_relpath(row.id)!r}; "
                                 "the shard's manifest was edited or damaged, rerun that shard")  # fmt: skip
            src = d / row.h5
            if not src.is_file():
                raise InputError(f"shard {d} lists {row.h5} but the file is missing; rerun that shard to finish it")
            dst = out / row.h5
            if not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
                _link_or_copy(src, dst)
    walks: dict[str, dict[str, Any]] = {}
    for d in shard_dirs:  # the shards' crosswalks join into the merged cache's
        walks.update(read_crosswalk(crosswalk_path(d)))
    if walks:
        write_crosswalk(crosswalk_path(out), walks)
    existing = read_manifest(out / MANIFEST_NAME)
    fractions = tuple(params.get("split_fractions", DEFAULT_SPLIT))
    rows = _finish(out, fractions, [*existing, *(r for r, _ in best.values())])
    summary = Summary(out=out, total_rows=len(rows))
    for row in rows:
        _count(summary, row)
    summary.seconds = time.monotonic() - t0
    return summary
