"""The scan index: a rerun reads only changed headers; the index is PHI, outside the cache, signed;
--scan-only then shards that read it; header reading across processes gives the same rows."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from preprocess import ingest
from preprocess.config import PreprocessConfig
from preprocess.errors import InputError
from preprocess.ingest import dicom as dicom_mod
from preprocess.ingest.config import IngestConfig
from preprocess.runner import RunOptions, run_preprocess
from vol3d.synth import SynthConfig, generate

KEY = "passphrase:a key for the scan index tests"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scanidx") / "export"
    truth = generate(out, SynthConfig(cases=4, seed=4, size="small", nifti_fraction=0.0, workers=1))
    return out, truth


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every header read from a file, by its name."""
    seen: list[str] = []
    real = dicom_mod.read_header

    def read_header(f, known):
        seen.append(f.rel)
        return real(f, known)

    monkeypatch.setattr(dicom_mod, "read_header", read_header)
    monkeypatch.setenv("VOL3D_ID_KEY", KEY)
    return seen


def _cfg() -> PreprocessConfig:
    return PreprocessConfig(target_spacing=(6.0, 6.0, 6.0), workers=1)


def _rows(cache: Path) -> list[dict]:
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    return sorted(({k: r[k] for k in ("id", "status", "reason", "source_hash")} for r in rows), key=lambda r: r["id"])


def test_a_rerun_reads_only_the_headers_of_changed_files(export, counted, tmp_path):
    src, _ = export
    cache = tmp_path / "cache"
    opts = RunOptions(progress=False)
    run_preprocess(src, cache, _cfg(), opts=opts)
    n_files = len(counted)
    assert n_files > 50
    index = tmp_path / "cache.scan.sqlite"
    assert index.is_file() and not index.is_relative_to(cache)  # PHI: beside the cache, never in it
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    first = _rows(cache)

    counted.clear()
    run_preprocess(src, cache, _cfg(), opts=opts)
    assert counted == []  # every header from the index
    assert _rows(cache) == first

    one = next(p for p in sorted(src.rglob("*.dcm")))
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 10**9))  # touched: read again
    counted.clear()
    run_preprocess(src, cache, _cfg(), opts=opts)
    assert counted == [one.relative_to(src).as_posix()]
    assert _rows(cache) == first


def test_entries_that_do_not_verify_are_read_again(export, counted, tmp_path, monkeypatch):
    src, _ = export
    cache = tmp_path / "cache"
    run_preprocess(src, cache, _cfg(), opts=RunOptions(progress=False))
    n_files = len(counted)
    db = sqlite3.connect(tmp_path / "cache.scan.sqlite")
    rel = db.execute("SELECT rel FROM headers LIMIT 1").fetchone()[0]
    db.execute("UPDATE headers SET blob = ? WHERE rel = ?", (b"not a pickle of ours", rel))
    db.commit()
    db.close()
    counted.clear()
    run_preprocess(src, cache, _cfg(), opts=RunOptions(progress=False))
    assert counted == [rel]  # the edited entry is never unpickled
    # another id key: nothing verifies (and the cache itself refuses the key, before any header is read)
    monkeypatch.setenv("VOL3D_ID_KEY", "passphrase:another key for the scan index tests")
    counted.clear()
    run_preprocess(src, tmp_path / "cache2", _cfg(), opts=RunOptions(progress=False,
                                                                     scan_index=tmp_path / "cache.scan.sqlite"))
    assert len(counted) == n_files


def test_the_index_is_refused_inside_the_cache(export, tmp_path, monkeypatch):
    monkeypatch.setenv("VOL3D_ID_KEY", KEY)
    with pytest.raises(InputError, match="must live outside the cache"):
        run_preprocess(export[0], tmp_path / "c", _cfg(),
                       opts=RunOptions(progress=False, scan_index=tmp_path / "c" / "idx.sqlite"))


def test_scan_only_then_shards_read_the_shared_index(export, counted, tmp_path):
    src, _ = export
    shared = tmp_path / "export.scan.sqlite"
    summary = run_preprocess(src, tmp_path / "cache", _cfg(),
                             opts=RunOptions(progress=False, scan_only=True, scan_index=shared))
    assert not (tmp_path / "cache").exists()  # --scan-only writes no cache
    assert summary.counts["ok"] > 0 and summary.total_rows == len(counted)
    mtime = shared.stat().st_mtime_ns
    counted.clear()
    for i in range(2):
        run_preprocess(src, tmp_path / f"cache_{i}", _cfg(),
                       opts=RunOptions(progress=False, shard=(i, 2), scan_index=shared))
    assert counted == [] and shared.stat().st_mtime_ns == mtime  # read, never written by the shards
    single = tmp_path / "single"
    run_preprocess(src, single, _cfg(), opts=RunOptions(progress=False, use_scan_index=False))
    assert not (tmp_path / "single.scan.sqlite").exists()
    ids = sorted(r["id"] for i in range(2) for r in _rows(tmp_path / f"cache_{i}"))
    assert ids == sorted(r["id"] for r in _rows(single))


def test_headers_read_by_processes_give_the_same_candidates(export, monkeypatch):
    src, _ = export
    monkeypatch.setattr(dicom_mod, "PROCESS_SCAN_MIN_FILES", 1)
    threads = ingest.scan(src, IngestConfig(), processes=1)
    procs = ingest.scan(src, IngestConfig(), processes=2)

    def view(cands):
        return [(c.key, c.status, c.reason, c.source, c.label) for c in cands]

    assert view(procs) == view(threads) and len(threads) > 4
