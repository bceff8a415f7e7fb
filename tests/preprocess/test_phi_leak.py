"""No identifier of the synthetic export reaches any byte vol3d preprocess writes or prints.

Runs the real command (subprocess, two workers, debug logging, all side tables) on a
``vol3d synth --size small`` export, then searches every output file's raw bytes, every
HDF5 attribute and dataset decoded (compressed chunks are decompressed by h5py), every
file name, and the captured stdout/stderr, for every string in ``truth.json``'s PHI list
plus the study/series UIDs, in several encodings and cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/LZ4 filter so compressed datasets decode)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _variants(text: str) -> set[str]:
    """The identifier as it might be rewritten: case, DICOM name parts, ISO dates."""
    out = {text, text.lower(), text.upper(), text.title()}
    if "^" in text:  # DICOM person name FAMILY^GIVEN^^PREFIX: each long part is identifying alone
        parts = [p for p in text.split("^") if len(p) >= 4]
        out |= {" ".join(parts), ", ".join(parts), *parts}
    if len(text) == 8 and text.isdigit():  # a DICOM date
        out.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return {v for v in out if len(v) >= 4}


def _needles(truth: dict) -> dict[bytes, str]:
    strings = set(truth["phi_strings"])
    for case in truth["cases"]:  # UIDs identify the study at the hospital: never written either
        strings.add(case["study_uid"])
        strings |= {s["series_uid"] for s in case.get("series", []) if s.get("series_uid")}
    needles: dict[bytes, str] = {}
    for s in strings:
        for v in _variants(s):
            for enc in ("utf-8", "utf-16-le", "utf-16-be"):
                needles[v.encode(enc)] = s
    return needles


def _h5_blobs(path: Path) -> list[tuple[str, bytes]]:
    """Every attribute and dataset of an HDF5 file, decoded, as bytes to search."""
    blobs: list[tuple[str, bytes]] = []

    def as_bytes(value) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode()
        arr = np.asarray(value)
        if arr.dtype.kind == "O":
            return b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel())
        if arr.dtype.kind == "U":
            return "\0".join(arr.ravel().tolist()).encode()
        return arr.tobytes()

    def visit(name: str, obj) -> None:
        blobs.append((f"{path.name}:{name} (name)", name.encode()))
        for k, v in obj.attrs.items():
            blobs.append((f"{path.name}:{name}@{k}", k.encode() + b"\0" + as_bytes(v)))
        if isinstance(obj, h5py.Dataset):
            blobs.append((f"{path.name}:{name}", as_bytes(obj[()])))

    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            blobs.append((f"{path.name}@{k}", as_bytes(v)))
        f.visititems(visit)
    return blobs


def _haystacks(out: Path, proc) -> list[tuple[str, bytes]]:
    """stdout, stderr, and every file name, file and decoded HDF5 blob under ``out``."""
    haystacks: list[tuple[str, bytes]] = [("stdout", proc.stdout), ("stderr", proc.stderr)]
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        haystacks.append((f"file name {rel}", rel.encode()))
        if p.is_file():
            haystacks.append((rel, p.read_bytes()))
            if p.suffix == ".h5":
                haystacks += _h5_blobs(p)
    return haystacks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vol3d.synth.export import SynthConfig, generate

    root = tmp_path_factory.mktemp("phi")
    export, out = root / "export", root / "cache"
    truth = generate(export, SynthConfig(cases=4, seed=7, size="small", workers=1))
    cmd = [sys.executable, "-m", "vol3d.cli", "-v", "preprocess", str(export), "--out", str(out),
           "--preset", "tiny", "--workers", "2", "--reports", str(export / "reports.csv"),
           "--codes", str(export / "ehr_codes.csv"), "--labels", str(export / "labels"),
           "--boxes", str(export / "boxes.json"), "--ingest.exclude", "lesions/*"]  # fmt: skip
    env = {**os.environ, "VOL3D_ID_KEY": "fedcba9876543210" * 4}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    return truth, out, proc


def test_run_joined_the_identifiers_it_must_not_write(run):
    truth, out, proc = run
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    # the identifiers were used (reports by accession, codes by patient) before being dropped
    assert ok and all(r["has_report"] and r["n_codes"] > 0 and r["has_label"] for r in ok)
    assert len({r["patient"] for r in ok}) <= len({c["patient_id"] for c in truth["cases"]})


def test_no_identifier_in_any_output_byte_name_or_log(run):
    truth, out, proc = run
    needles = _needles(truth)
    assert len(needles) > 50
    # the search does find identifiers where they are: in the export's DICOM headers and tables
    export = out.parent / "export"
    dicom_file = next(p for p in (export / "dicom").rglob("*") if p.is_file())
    for src in (dicom_file, export / "ehr_codes.csv"):
        assert any(n in src.read_bytes() for n in needles), src
    assert any(p.suffix == ".h5" for p in out.rglob("*")) and (out / "fingerprint.json").is_file()
    leaks = sorted({(where, needles[n]) for where, blob in _haystacks(out, proc) for n in needles if n in blob})
    assert not leaks, f"identifiers found: {leaks[:10]}"


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """The same kind of export with a corrupt label map (named by its SeriesInstanceUID) and a
    truncated slice, run in one process at debug level with --redact-paths."""
    from vol3d.synth.export import SynthConfig, generate

    root = tmp_path_factory.mktemp("phi_broken")
    export, out = root / "export", root / "cache"
    truth = generate(export, SynthConfig(cases=3, seed=3, size="small", nifti_fraction=0.0, workers=1))
    dicom_cases = [c for c in truth["cases"] if c["format"] == "dicom"]
    assert len(dicom_cases) >= 2
    (export / dicom_cases[0]["series"][0]["labels"]).write_bytes(b"garbage")  # labels/<uid>.nii.gz
    victim = export / dicom_cases[1]["series"][0]["files"][3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a slice cut in the pixel data
    cmd = [sys.executable, "-m", "vol3d.cli", "-v", "preprocess", str(export), "--out", str(out),
           "--preset", "tiny", "--workers", "1", "--redact-paths", "--no-progress",
           "--reports", str(export / "reports.csv"), "--codes", str(export / "ehr_codes.csv"),
           "--labels", str(export / "labels"), "--boxes", str(export / "boxes.json"),
           "--lesions", str(export / "lesions")]  # fmt: skip
    env = {**os.environ, "VOL3D_ID_KEY": "fedcba9876543210" * 4}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    return truth, export, out, proc


def test_failure_details_and_logs_hold_no_identifier_or_path(broken_run):
    truth, export, out, proc = broken_run
    assert proc.returncode == 3, proc.stderr.decode()[-3000:]  # some series failed, the rest was written
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["reason"] for r in failed} >= {"LABEL_MISMATCH"}, failed
    label_row = next(r for r in failed if r["reason"] == "LABEL_MISMATCH")
    assert "label map joined to" in label_row["detail"] and "cannot be read (not a NIfTI file)" in label_row["detail"]
    assert label_row["source"][0].startswith("h_") and label_row["source"][0] in label_row["detail"]
    # the truncated slice fails its series too (at scan or at load), with a reason and a worded detail
    assert len(failed) >= 2 and all(r["detail"] for r in failed)

    needles = _needles(truth)
    # absolute paths (the export, its parent) and, under --redact-paths, the relative ones too
    for p in {str(export), str(export.resolve()), "dicom/", "labels/"}:
        needles[p.encode()] = p
    haystacks: list[tuple[str, bytes]] = [("stdout", proc.stdout), ("stderr", proc.stderr)]
    for p in out.rglob("*"):
        if p.is_file() and p.suffix != ".h5":
            haystacks.append((p.relative_to(out).as_posix(), p.read_bytes()))
    leaks = sorted({(where, needles[n]) for where, blob in haystacks for n in needles if n in blob})
    assert not leaks, f"identifiers or paths found: {leaks[:10]}"
    assert b"failed: LABEL_MISMATCH the label map joined to h_" in proc.stderr  # the log did report it


def test_series_left_out_by_their_description_leave_no_identifier(run, tmp_path):
    """ingest.series_include reads SeriesDescription/ProtocolName/SequenceName (which can hold a name, as
    the synthetic descriptions do: they are among its identifiers); the NOT_SELECTED rows, the manifest,
    the cache's files and names and the log never repeat them."""
    truth, out, _ = run
    export, cache = out.parent / "export", tmp_path / "selected"
    descriptions = {d for c in truth["cases"] for d in c["phi"]["SeriesDescriptions"]}
    assert descriptions and descriptions <= set(truth["phi_strings"])
    cmd = [sys.executable, "-m", "vol3d.cli", "-v", "preprocess", str(export / "dicom"), "--out", str(cache),
           "--preset", "tiny", "--workers", "1", "--no-progress", "--ingest.series-include", "*no such sequence*"]
    env = {**os.environ, "VOL3D_ID_KEY": "fedcba9876543210" * 4}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    selected_out = [r for r in rows if r["reason"] == "NOT_SELECTED"]
    assert proc.returncode == 0 and selected_out and not [r for r in rows if r["status"] == "ok"], proc.stderr[-2000:]
    needles = _needles(truth)
    leaks = sorted({(where, needles[n]) for where, blob in _haystacks(cache, proc) for n in needles if n in blob})
    assert not leaks, f"identifiers found: {leaks[:10]}"


def test_brain_mr_sequences_as_channels_leave_no_identifier(tmp_path):
    """The MR head export through tiny_mr (each study's T1, T2 and FLAIR combined by their descriptions,
    which hold identifiers in the synthetic export; one study without its FLAIR, so MISSING_CHANNEL rows):
    no identifier or description in the cache, its names or the log; the scan index lies outside."""
    import shutil

    from vol3d.synth.export import SynthConfig, generate

    export, out = tmp_path / "export", tmp_path / "cache"
    truth = generate(export, SynthConfig(cases=3, seed=8, size="small", modality="mr", nifti_fraction=0.0,
                                         workers=1))
    case = truth["cases"][1]
    folders = {s["contrast"]: Path(s["files"][0]).parent for s in case["series"] if s["role"] != "localizer"}
    assert folders["FLAIR"] != folders["T1"]
    shutil.rmtree(export / folders["FLAIR"])
    cmd = [sys.executable, "-m", "vol3d.cli", "-v", "preprocess", str(export), "--out", str(out),
           "--preset", "tiny_mr", "--workers", "1", "--no-progress", "--reports", str(export / "reports.csv"),
           "--codes", str(export / "ehr_codes.csv"), "--labels", str(export / "labels"),
           "--boxes", str(export / "boxes.json"), "--ingest.exclude", "lesions/*"]  # fmt: skip
    env = {**os.environ, "VOL3D_ID_KEY": "fedcba9876543210" * 4}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in rows) == 2 and sum(r["reason"] == "MISSING_CHANNEL" for r in rows) == 2
    assert (tmp_path / "cache.scan.sqlite").is_file()  # the header index is PHI: beside the cache, not in it
    descriptions = {d for c in truth["cases"] for d in c["phi"]["SeriesDescriptions"]}
    assert descriptions <= set(truth["phi_strings"])
    needles = _needles(truth)
    leaks = sorted({(where, needles[n]) for where, blob in _haystacks(out, proc) for n in needles if n in blob})
    assert not leaks, f"identifiers found: {leaks[:10]}"


def test_absolute_paths_with_spaces_are_removed_whole():
    """Hospital folders are named 'DOE JOHN': the path pattern must not stop at the space."""
    from preprocess.sanitise import Sanitiser

    clean = Sanitiser()
    for text in ("pixels of /data/DOE JOHN/ct/x.dcm cannot be decoded", "C:\\exports\\DOE JANE\\a.dcm failed",
                 "opened '/mnt/pacs/MRN 99887766/series 2/IM1'"):  # fmt: skip
        out = clean(text)
        assert "DOE" not in out and "JOHN" not in out and "JANE" not in out and "99887766" not in out, out
        assert "<path>" in out
    assert clean("/data/x.dcm is truncated; re-export it") == "<path> is truncated; re-export it"


def test_report_text_loses_the_identifiers_its_headers_carry():
    from preprocess.sanitise import scrub_report
    from preprocess.types import Identity

    who = Identity(patient_id="MRN-99887766", accession="ACC12345", patient_name="DOE^JANE^Q",
                   birth_date="19700131", study_date="20240105")  # fmt: skip
    text = ("Jane Doe (MRN-99887766), born 1970-01-31, accession acc12345. CT of 01/05/2024 compared with "
            "20240105 and 5.1.2024: 12 mm liver lesion, unchanged since 2023-12-01. Dr. Smith.")  # fmt: skip
    out = scrub_report(text, who)
    for secret in ("Jane", "Doe", "99887766", "1970", "12345", "01/05/2024", "20240105", "5.1.2024"):
        assert secret.lower() not in out.lower(), (secret, out)
    assert "12 mm liver lesion" in out and "2023-12-01" in out and "Dr. Smith" in out  # what it cannot know stays
    assert out.count("<name>") == 2 and out.count("<date>") == 4
    assert scrub_report("No acute findings.", who) == "No acute findings."
