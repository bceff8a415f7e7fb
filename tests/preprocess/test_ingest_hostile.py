"""Hostile exports: damaged files (a fuzz over hundreds of copies), trees that loop or go deep,
pipes, zip bombs, colliding archive names, absurd sizes. Every folder gets a row, the good series
is still ok, nothing raises, and the run writes its manifest."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement

from preprocess import reasons
from preprocess.config import PreprocessConfig
from preprocess.ingest import IngestConfig, scan
from preprocess.manifest import read_manifest
from preprocess.runner import RunOptions, run_preprocess
from vol3d.synth.dicom_writer import generate_uid, slice_positions, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-42", "PatientBirthDate": "19700101", "PatientSex": "F"}
NZ = 8


def _series(folder: Path, seed: int = 0) -> list[Path]:
    vol = np.random.default_rng(seed).integers(-1000, 1000, size=(12, 10, NZ)).astype(np.float32)
    return write_series(folder, vol, orientation=AXIAL, pixel_spacing=(2.0, 2.0),
                        positions_lps=slice_positions((-10.0, -20.0, 30.0), (0.0, 0.0, 3.0), NZ),
                        patient=PATIENT, study={"StudyInstanceUID": generate_uid(), "AccessionNumber": "A1"},
                        series_uid=generate_uid())  # fmt: skip


def _set_raw(path: Path, tag: int, vr: str, value: bytes | int | list[int]) -> None:
    """Rewrite one element as a broken modality would, bypassing pydicom's validation: numbers are
    written as given; text is written as a valid placeholder of the same length (letters -> "1"),
    whose bytes are then overwritten in the file with ``value``."""
    ds = pydicom.dcmread(path, force=True)
    if not isinstance(value, bytes):
        ds[tag] = DataElement(tag, vr, value)
        ds.save_as(path)
        return
    ds[tag] = DataElement(tag, vr, re.sub(r"[A-Za-z]", "1", value.decode()))
    ds.save_as(path)
    at = pydicom.dcmread(path, force=True).get_item(tag).value_tell
    data = bytearray(path.read_bytes())
    data[at : at + len(value)] = value
    path.write_bytes(bytes(data))


def _pixel_offset(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data) // 2


def _damage(path: Path, kind: str, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    px = _pixel_offset(bytes(data))
    if kind == "truncate":
        path.write_bytes(bytes(data[: int(rng.integers(0, len(data)))]))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("flip_header", "flip_pixels", "flip_meta"):
        lo, hi = {"flip_header": (132, px), "flip_pixels": (px, len(data)), "flip_meta": (128, 300)}[kind]
        for i in rng.integers(lo, max(lo + 1, hi), size=int(rng.integers(1, 12))):
            data[int(i)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
    elif kind == "bad_vr":  # the VR of (0002,0000) -> 0x55 0xf9
        data[136:138] = b"\x55\xf9"
        path.write_bytes(bytes(data))
    elif kind == "bad_length":  # the length of a random early element -> something large
        at = int(rng.integers(140, min(px, 700)))
        data[at : at + 2] = bytes(rng.integers(0, 256, size=2, dtype=np.uint8))
        path.write_bytes(bytes(data))
    elif kind == "garbage":  # noise after the preamble
        data[132:] = bytes(rng.integers(0, 256, size=len(data) - 132, dtype=np.uint8))
        path.write_bytes(bytes(data))
    elif kind == "rows_multi":
        _set_raw(path, 0x00280010, "US", [12, 12])
    elif kind == "rows_huge":
        _set_raw(path, 0x00280010, "US", 20000)
    elif kind == "position_text":
        _set_raw(path, 0x00200032, "DS", b"abc\\1\\zz")
    elif kind == "spacing_zero":
        _set_raw(path, 0x00280030, "DS", b"0\\0 ")
    elif kind == "spacing_huge":
        _set_raw(path, 0x00280030, "DS", b"1e30\\1e30 ")
    elif kind == "orientation_nan":
        _set_raw(path, 0x00200037, "DS", b"nan\\0\\0\\0\\nan\\0 ")
    elif kind == "transfer_syntax":
        ds = pydicom.dcmread(path, force=True)
        ds.file_meta.TransferSyntaxUID = "1.2.3.4"
        with pydicom.config.disable_value_validation():
            ds.save_as(path, enforce_file_format=False)
    elif kind == "frames_text":
        _set_raw(path, 0x00280008, "IS", b"x7")
    else:
        raise AssertionError(kind)


KINDS = ("truncate", "empty", "flip_header", "flip_pixels", "flip_meta", "bad_vr", "bad_length", "garbage",
         "rows_multi", "rows_huge", "position_text", "spacing_zero", "spacing_huge", "orientation_nan",
         "transfer_syntax", "frames_text")  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_export(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One good series and 160 copies of another, each with one file damaged one way (10 per kind)."""
    root = tmp_path_factory.mktemp("fuzz")
    _series(root / "good", seed=1)
    rng = np.random.default_rng(0)
    kinds = {}
    for i in range(160):  # each its own series (UIDs), as in an export
        kind = KINDS[i % len(KINDS)]
        folder = root / f"bad{i:03d}"
        files = _series(folder, seed=2)
        _damage(files[int(rng.integers(len(files)))], kind, rng)
        kinds[folder.name] = kind
    return root, kinds


def test_fuzz_scan_reports_every_folder_and_never_raises(fuzz_export):
    root, kinds = fuzz_export
    cands = scan(root, IngestConfig())
    folders: dict[str, list] = {}
    for c in cands:
        for name in sorted({s.split("/")[0] for s in c.source}):
            folders.setdefault(name, []).append(c)
    assert set(folders) == {"good", *kinds}  # every folder reported
    good = [c for c in folders["good"] if c.kind == "dicom"]
    assert [c.status for c in good] == ["ok"]
    known = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    assert all(c.status == "ok" or (c.reason in known and c.reason != reasons.PROCESSING_ERROR) for c in cands)
    # the damage is noticed where it must be: an empty or truncated slice never passes as ok
    for name, kind in kinds.items():
        if kind in ("empty", "rows_multi", "garbage", "bad_vr"):
            assert any(c.status == "failed" for c in folders[name]), (kind, [(c.status, c.reason) for c in folders[name]])


def test_fuzz_run_writes_the_manifest_and_keeps_the_good_series(fuzz_export, tmp_path):
    root, kinds = fuzz_export
    out = tmp_path / "cache"
    summary = run_preprocess(root, out, _small_config(), opts=RunOptions(workers=1, progress=False))
    rows = read_manifest(out / "manifest.jsonl")
    assert summary.total_rows == len(rows) > 160
    by_reason = Counter(r.reason for r in rows)
    assert by_reason[reasons.PROCESSING_ERROR] == 0, [r.detail for r in rows if r.reason == reasons.PROCESSING_ERROR]
    assert sum(r.status == "ok" for r in rows) >= 1
    assert not list(tmp_path.glob(".cache.staging-*"))


def _small_config() -> PreprocessConfig:
    cfg = PreprocessConfig()
    cfg.target_spacing = (4.0, 4.0, 6.0)
    cfg.patch_size = (8, 8, 4)
    cfg.ingest.min_slices = 4
    return cfg


# ----------------------------------------------------------------------------- hostile trees


def test_symlink_loops_links_out_of_the_root_deep_trees_and_pipes(tmp_path):
    root = tmp_path / "export"
    _series(root / "a" / "s")
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)  # a loop
    (root / "self").symlink_to(root / "self")  # a link to itself
    outside = tmp_path / "elsewhere"
    _series(outside / "s", seed=3)
    (root / "out_link").symlink_to(outside, target_is_directory=True)
    (root / "inside_link").symlink_to(root / "a" / "s", target_is_directory=True)  # same files again
    deep = root / "deep"
    deep.mkdir()
    old = os.getcwd()
    try:  # 1100 levels, relative to stay under PATH_MAX while making it
        os.chdir(deep)
        for _ in range(1100):
            os.mkdir("d")
            os.chdir("d")
        Path("note.txt").write_text("deep")
    finally:
        os.chdir(old)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.dcm")  # opening it would block forever
    try:
        cands = scan(root, IngestConfig())
    finally:
        _remove_deep(deep)
    dicom = [c for c in cands if c.kind == "dicom"]
    assert [c.status for c in dicom] == ["ok"] and all(s.startswith("a/s/") for s in dicom[0].source)
    skipped = {c.source[0]: c.reason for c in cands if c.kind == "file"}
    assert skipped["out_link"] == reasons.NOT_REGULAR_FILE and skipped["self"] == reasons.NOT_REGULAR_FILE
    assert any(k.endswith("/note.txt") and k.count("/") > 1100 for k in skipped)
    assert skipped["inside_link"] == reasons.NOT_REGULAR_FILE  # a second way to a/s: read once, not twice
    if hasattr(os, "mkfifo"):
        assert skipped["pipe.dcm"] == reasons.NOT_REGULAR_FILE


def _remove_deep(top: Path) -> None:
    """Remove a folder tree too deep for shutil.rmtree (which recurses), bottom-up without recursion."""
    old = os.getcwd()
    try:
        os.chdir(top)
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.remove(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(old)


def _zip(path: Path, files: dict[str, bytes | Path], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            if isinstance(data, Path):
                zf.write(data, name)
            else:
                zf.writestr(name, data)
    return path


def test_archives_with_colliding_names_each_keep_their_series(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fa, fb = _series(a, seed=4), _series(b, seed=5)
    root = tmp_path / "export"
    _zip(root / "patient A.zip", {f"s/{p.name}": p for p in fa})
    _zip(root / "patient_A.zip", {f"s/{p.name}": p for p in fb})
    cands = [c for c in scan(root, IngestConfig(), workdir=tmp_path / "staging") if c.kind == "dicom"]
    assert sorted(c.source[0].split("!")[0] for c in cands) == ["patient A.zip", "patient_A.zip"]
    assert all(c.status == "ok" for c in cands)
    assert len({c.source_files[0].parent for c in cands}) == 2


def test_archive_limits_fail_the_archive_with_a_named_reason(tmp_path):
    root = tmp_path / "export"
    _zip(root / "bomb.zip", {"zeros.dcm": bytes(64 << 20)})  # 64 MiB of zeros, about 64 KiB packed
    inner = _zip(tmp_path / "z0.zip", {"x.txt": b"x"})
    for level in range(1, 6):  # a zip in a zip ... 6 deep
        inner = _zip(tmp_path / f"z{level}.zip", {inner.name: inner})
    shutil.copy(inner, root / "nested.zip")
    _zip(root / "many.zip", {f"m{i}.txt": b"" for i in range(30)})
    cfg = IngestConfig(max_archive_members=20)
    cands = scan(root, cfg, workdir=tmp_path / "staging")
    limited = {c.source[0]: c.detail for c in cands if c.reason == reasons.ARCHIVE_LIMIT}
    assert set(limited) == {"bomb.zip", "many.zip", "nested.zip!/z4.zip!/z3.zip!/z2.zip"}
    assert "max_archive_ratio" in limited["bomb.zip"] and "max_archive_members" in limited["many.zip"]
    assert not any((tmp_path / "staging").rglob("zeros.dcm"))  # the partial inflate was removed
    small = scan(root, IngestConfig(max_archive_bytes=1 << 20, max_archive_ratio=1e9), workdir=tmp_path / "s2")
    assert "max_archive_bytes" in next(c.detail for c in small if c.source[0] == "bomb.zip")


def test_headers_announcing_huge_volumes_fail_before_allocating(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((20000, 20000, 200))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.eye(4), code=1)
    with open(root / "huge.nii", "wb") as f:  # the header alone: reading pixels would need 149 GiB
        hdr.write_to(f)
        f.write(b"\0" * (int(hdr["vox_offset"]) - f.tell()))
    cands = scan(root, IngestConfig())
    assert [(c.status, c.reason) for c in cands] == [("failed", reasons.TOO_LARGE)]
    assert "--ingest.max-voxels" in cands[0].detail


def test_a_huge_pixel_spacing_fails_its_case_not_the_run(tmp_path):
    root = tmp_path / "export"
    files = _series(root / "s")
    for p in files:
        _set_raw(p, 0x00280030, "DS", b"900\\900 ")  # 900 mm pixels: 10.8 km wide, 24M voxels at 4 mm
    _series(root / "good", seed=6)
    out = tmp_path / "cache"
    cfg = _small_config()
    cfg.ingest.max_voxels = 1_000_000  # the header (960 voxels) passes; the planned grid does not
    run_preprocess(root, out, cfg, opts=RunOptions(workers=1, progress=False, redact_paths=False))
    rows = {r.source[0].split("/")[0] if r.source else "": r for r in read_manifest(out / "manifest.jsonl")}
    assert rows["s"].reason == reasons.TOO_LARGE and rows["good"].status == "ok"


def test_a_file_that_is_not_dicom_is_not_parsed(tmp_path, monkeypatch):
    root = tmp_path / "export"
    _series(root / "s")
    (root / "blob.bin").write_bytes(os.urandom(4096))
    parsed = []
    from preprocess.ingest import dicom as ingest_dicom

    real = ingest_dicom._parse_header
    monkeypatch.setattr(ingest_dicom, "_parse_header", lambda f, *a: parsed.append(f.rel) or real(f, *a))
    cands = scan(root, IngestConfig())
    assert "blob.bin" not in parsed and any(c.source == ["blob.bin"] and c.reason == reasons.NOT_MEDICAL_FILE
                                            for c in cands)  # fmt: skip


def test_pydicom_warnings_never_print_tag_values(tmp_path, capfd, caplog):
    """A non-conformant UID holding a name: pydicom's validation would quote it on stderr."""
    files = _series(tmp_path / "s")
    for p in files:
        _set_raw(p, 0x0020000D, "UI", b"1.2.3.DOEJANE.77")
    caplog.clear()
    capfd.readouterr()  # what writing the test files printed
    with caplog.at_level("DEBUG"):
        cands = scan(tmp_path, IngestConfig())
        from preprocess.ingest import load

        load(next(c for c in cands if c.status == "ok"), IngestConfig())
    captured = capfd.readouterr()
    assert "DOEJANE" not in captured.err + captured.out + caplog.text


def test_a_deflated_file_that_inflates_to_gigabytes_is_refused_before_parsing(tmp_path):
    """A deflated transfer syntax file is inflated whole by the parser: its inflated size is counted
    first, in bounded steps, and a decompression bomb fails alone (ARCHIVE_LIMIT) while a normal
    deflated series beside it is read."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    root = tmp_path / "export"
    normal = _series(root / "deflated")
    for p in normal:  # a genuine deflated series: the same slices, re-encoded
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(p, enforce_file_format=True)
    bomb = pydicom.dcmread(normal[0])
    bomb.SeriesInstanceUID = generate_uid()
    bomb.add(DataElement(0x00091010, "OB", bytes(40 << 20)))  # 40 MiB of zeros: about 40 KiB deflated
    (root / "bomb").mkdir()
    bomb.save_as(root / "bomb" / "x.dcm", enforce_file_format=True)
    assert (root / "bomb" / "x.dcm").stat().st_size < 200_000
    cands = scan(root, IngestConfig())  # 40 MiB > 200 x 64 KiB: refused by the ratio
    by = {c.source[0].split("/")[0]: c for c in cands}
    assert by["bomb"].status == "failed" and by["bomb"].reason == reasons.ARCHIVE_LIMIT
    assert "inflates to more than" in by["bomb"].detail and "x.dcm" in by["bomb"].detail
    assert by["deflated"].status == "ok" and len(by["deflated"].source) == NZ


def test_the_deflate_bomb_row_names_no_patient_folder(tmp_path, caplog):
    """Its detail names the file; a hospital folder named after the patient reaches the crosswalk
    beside the cache only, never the manifest, the cache's files or the log."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from preprocess.sanitise import crosswalk_path, read_crosswalk

    root = tmp_path / "export"
    _series(root / "good")
    bomb = pydicom.dcmread(next((root / "good").iterdir()))
    bomb.SeriesInstanceUID = generate_uid()
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.add(DataElement(0x00091010, "OB", bytes(40 << 20)))
    folder = root / "DOE_JANE_MRN-99887766"
    folder.mkdir()
    bomb.save_as(folder / "DOE_JANE_0001.dcm", enforce_file_format=True)
    out = tmp_path / "cache"
    with caplog.at_level("DEBUG"):
        run_preprocess(root, out, _small_config(), opts=RunOptions(workers=1, progress=False))
    rows = read_manifest(out / "manifest.jsonl")
    assert any(r.reason == reasons.ARCHIVE_LIMIT for r in rows) and any(r.status == "ok" for r in rows)
    for secret in ("DOE", "JANE", "99887766"):
        assert secret not in caplog.text
        for p in out.rglob("*"):
            assert secret not in p.name and (not p.is_file() or secret.encode() not in p.read_bytes()), p
    links = read_crosswalk(crosswalk_path(out))
    assert any("DOE_JANE_MRN-99887766/DOE_JANE_0001.dcm" in src for r in links.values() for src in r["source"])
