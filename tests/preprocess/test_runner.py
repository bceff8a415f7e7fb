"""End-to-end runs of ``vol3d preprocess``: rows, side data, geometry, resume, refusal, shards + merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocess import geometry
from preprocess.config import PreprocessConfig
from preprocess.config_io import load_yaml
from preprocess.errors import InputError
from preprocess.manifest import read_manifest
from preprocess.runner import RunOptions, merge_caches, run_preprocess
from preprocess.sanitise import crosswalk_path, read_crosswalk
from preprocess.sidecars import SideTables
from preprocess.store import read_case
from vol3d.cli import main

REPO = Path(__file__).resolve().parents[2]
SPACING = (5.0, 5.0, 6.0)
SHAPE = (40, 36, 24)
LESION_RADIUS_MM = 14.0


def tiny_config(**kw) -> PreprocessConfig:
    cfg = load_yaml(PreprocessConfig, REPO / "configs/preprocess/tiny.yaml")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_nifti_export(root: Path, n: int, seed: int = 0) -> dict:
    """A small hospital-like export: ``n`` CT NIfTI files (two per patient) with BIDS sidecars,
    label maps, lesion boxes, reports (all but the last case) and EHR codes. Returns the truth."""
    rng = np.random.default_rng(seed)
    (root / "nifti").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    truth: dict = {"cases": {}}
    boxes, reports, codes = [], ["AccessionNumber,Findings,Impression"], ["PatientID,Code,Description"]
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1).astype(float)
    for i in range(n):
        stem = f"case{i:02d}"
        # stored LPS-like (x and y flipped), as a converted DICOM would be: the cache must reorient it
        affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        affine[:3, 3] = [100.0 + i, 90.0, -70.0]
        world = geometry.voxel_to_world(affine, idx)
        centre = np.array([100.0 - 100 + i, 0.0, 0.0])
        body = (((world - centre) / [90, 80, 70]) ** 2).sum(-1) <= 1
        lesion_c = centre + rng.uniform(-20, 20, size=3)
        lesion = np.linalg.norm(world - lesion_c, axis=-1) <= LESION_RADIUS_MM
        hu = np.where(body, 40.0, -1000.0) + np.where(lesion, 160.0, 0.0) + rng.normal(0, 5, SHAPE)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), root / "nifti" / f"{stem}.nii.gz")
        pid, acc = f"PAT-{i // 2:04d}", f"ACC{i:05d}"
        sidecar = {"PatientID": pid, "AccessionNumber": acc, "Modality": "CT", "StudyInstanceUID": f"1.2.826.{i}"}
        (root / "nifti" / f"{stem}.json").write_text(json.dumps(sidecar))
        label = body.astype(np.uint8) + 8 * lesion.astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{stem}.nii.gz")
        box = geometry.boxes_voxel_to_world(geometry.mask_to_box(lesion)[None], affine)[0]
        boxes.append({"key": stem, "finding": "liver_lesion", "organ": "liver", "box_world_ras_mm": box.tolist()})
        if i < n - 1:
            reports.append(f'{acc},"Lesion in case {i}, 28 mm.",Impression {i}')
        codes.append(f"{pid},K76.{i % 10},fatty liver")
        truth["cases"][stem] = {"lesion_centre": lesion_c.tolist(), "box": box.tolist(), "report": i < n - 1}
    (root / "boxes.json").write_text(json.dumps(boxes))
    (root / "reports.csv").write_text("\n".join(reports) + "\n")
    (root / "ehr_codes.csv").write_text("\n".join(codes) + "\n")
    return truth


def side_tables(root: Path) -> SideTables:
    return SideTables.load(root / "reports.csv", root / "ehr_codes.csv", root / "boxes.json", root / "labels")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("export")
    return root, make_nifti_export(root, 6)


def _sources(out: Path) -> dict[str, list[str]]:
    """The input paths of each case id, from the crosswalk beside the cache (the manifest has none)."""
    return {i: row["source"] for i, row in read_crosswalk(crosswalk_path(out)).items()}


def _run(root: Path, out: Path, cfg=None, **opts):
    opts.setdefault("workers", 1)
    opts.setdefault("progress", False)
    return run_preprocess(root / "nifti", out, cfg or tiny_config(), side_tables(root), RunOptions(**opts))


def test_rows_side_data_and_geometry(export, tmp_path):
    root, truth = export
    out = tmp_path / "cache"
    summary = _run(root, out)
    assert summary.exit_code == 0 and summary.counts["ok"] == 6 and summary.written == 6
    assert summary.no_report == 1
    rows = read_manifest(out / "manifest.jsonl")
    assert len(rows) == len({r.id for r in rows}) == 6
    sources = _sources(out)
    stems = {sources[r.id][0].removesuffix(".nii.gz"): r for r in rows}
    # two series per patient share the patient pseudonym, hence the split
    assert rows[0].patient.startswith("p_") and len({r.patient for r in rows}) == 3
    for a in ("case00", "case02", "case04"):
        b = f"case{int(a[-1]) + 1:02d}"
        assert stems[a].patient == stems[b].patient and stems[a].split == stems[b].split
    for stem, t in truth["cases"].items():
        row = stems[stem]
        assert row.h5 == f"cases/{row.id[2:4]}/{row.id}.h5" and row.key == row.id
        assert (row.has_report, row.n_boxes, row.n_codes, row.has_label) == (t["report"], 1, 2, True)
        case = read_case(out / row.h5, row.key)
        assert list(case["shape"]) == row.shape and case["image"].shape[1:] == tuple(row.shape)
        if t["report"]:
            assert case["report_findings"] == f"Lesion in case {stem[-1]}, 28 mm."
        else:
            assert case["report_findings"] == "" and case["report_impression"] == ""
        first = int(stem[-2:]) // 2 * 2  # codes join by patient: both series of a patient get both codes
        assert case["codes"] == [f"K76.{first % 10}", f"K76.{(first + 1) % 10}"]
        # boxes in both frames: the stored voxel box maps onto the stored world box via the affine
        b = case["boxes"]
        assert b["finding"] == ["liver_lesion"] and b["visible"][0] == pytest.approx(1.0)
        np.testing.assert_allclose(b["world"][0], t["box"], atol=1e-3)
        np.testing.assert_allclose(geometry.boxes_voxel_to_world(b["vox"], case["affine"])[0], t["box"], atol=1e-2)
        # a known world point (the lesion centre) lands on a lesion voxel of the cached label and image
        ijk = np.rint(geometry.world_to_voxel(case["affine"], np.array(t["lesion_centre"]))).astype(int)
        assert case["label"][tuple(ijk)] == 9
        assert float(case["image"][0][tuple(ijk)]) > 0.55  # 200 HU -> 0.6 in the -1000..1000 window
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["n_cases"] == 6
    params = json.loads((out / "params.json").read_text())
    assert params["params_hash"] == tiny_config().params_hash() and params["config"]["id_key"] is None


def test_resume_reuses_unchanged_and_redoes_changed(export, tmp_path):
    root, _ = export
    src = tmp_path / "src"
    make_nifti_export(src, 4, seed=1)
    out = tmp_path / "cache"
    assert _run(src, out).written == 4
    sources = _sources(out)
    rows = {sources[r.id][0]: r for r in read_manifest(out / "manifest.jsonl")}
    mtimes = {k: (out / r.h5).stat().st_mtime_ns for k, r in rows.items()}

    again = _run(src, out)
    assert (again.written, again.reused) == (0, 4)
    assert {k: (out / r.h5).stat().st_mtime_ns for k, r in rows.items()} == mtimes

    # change one source file in place, and the report of another: exactly those two are redone
    img = nib.load(src / "nifti/case01.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 1, img.affine), src / "nifti/case01.nii.gz")
    text = (src / "reports.csv").read_text().replace("Impression 2", "Impression 2; revised")
    (src / "reports.csv").write_text(text)
    third = _run(src, out)
    assert (third.written, third.reused) == (2, 2)
    redone = {k for k, r in rows.items() if (out / r.h5).stat().st_mtime_ns != mtimes[k]}
    assert redone == {"case01.nii.gz", "case02.nii.gz"}
    final = read_manifest(out / "manifest.jsonl")
    assert len(final) == 4 and len({r.id for r in final}) == 4  # compacted: no duplicate rows


def test_resume_reads_source_bytes_only_when_size_or_mtime_changed(tmp_path, monkeypatch):
    from preprocess import ingest

    src = tmp_path / "src"
    make_nifti_export(src, 3, seed=2)
    out = tmp_path / "cache"
    hashed = []
    real = ingest.content_hash
    monkeypatch.setattr(ingest, "content_hash", lambda c: hashed.append(c.source[0]) or real(c))
    _run(src, out)
    assert len(hashed) == 3
    hashed.clear()
    assert _run(src, out).reused == 3 and hashed == []  # unchanged stats: no byte read
    os.utime(src / "nifti/case00.nii.gz")  # touched (a copy, a backup restore), same bytes
    assert _run(src, out).reused == 3 and hashed == ["case00.nii.gz"]
    hashed.clear()
    assert _run(src, out).reused == 3 and hashed == []  # the new stat was remembered
    assert _run(src, out, rehash=True).reused == 3 and len(hashed) == 3  # --rehash reads everything


def test_refuses_other_params_other_key_and_foreign_folders(export, tmp_path, monkeypatch):
    root, _ = export
    out = tmp_path / "cache"
    _run(root, out)
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="different parameters.*crop_margin_mm"):
        _run(root, out, tiny_config(crop_margin_mm=2.0))
    monkeypatch.setenv("VOL3D_ID_KEY", "02468ace13579bdf" * 4)
    with pytest.raises(InputError, match="different id key"):
        _run(root, out)
    monkeypatch.undo()
    summary = _run(root, out, tiny_config(crop_margin_mm=2.0), overwrite=True)
    assert summary.written == 6 and (out / "my_notes.txt").read_text() == "keep me"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a vol3d cache"):
        _run(root, foreign)


def test_shards_then_merge_equal_a_single_run(export, tmp_path):
    root, _ = export
    single = _run(root, tmp_path / "single")
    parts = [_run(root, tmp_path / f"shard{i}", shard=(i, 3)) for i in range(3)]
    assert sum(p.counts["ok"] for p in parts) == single.counts["ok"] == 6
    assert all(p.counts["ok"] < 6 for p in parts)  # the shards really split the work
    merged = merge_caches([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged")
    assert merged.counts["ok"] == 6

    def rows(d):
        return [r.to_dict() for r in read_manifest(d / "manifest.jsonl")]

    assert rows(tmp_path / "merged") == rows(tmp_path / "single")
    assert json.loads((tmp_path / "merged/fingerprint.json").read_text()) == json.loads(
        (tmp_path / "single/fingerprint.json").read_text()
    )
    for r in read_manifest(tmp_path / "merged/manifest.jsonl"):
        a, b = read_case(tmp_path / "merged" / r.h5), read_case(tmp_path / "single" / r.h5)
        np.testing.assert_array_equal(a["image"], b["image"])
    # merging again is a no-op, and shards made with other parameters are refused
    assert merge_caches([tmp_path / "shard0"], tmp_path / "merged").counts["ok"] == 6
    _run(root, tmp_path / "other", tiny_config(crop_margin_mm=1.0), shard=(0, 3))
    with pytest.raises(InputError, match="different parameters"):
        merge_caches([tmp_path / "shard0", tmp_path / "other"], tmp_path / "merged2")


def test_no_input_path_in_the_cache_and_the_crosswalk_beside_it(export, tmp_path):
    root, _ = export
    out = tmp_path / "cache"
    _run(root, out)
    for f in out.rglob("*"):  # manifest, params, fingerprint, case files: no file name of the export
        if f.is_file():
            data = f.read_bytes()
            assert b"case0" not in data and b".nii" not in data, f
    rows = read_manifest(out / "manifest.jsonl")
    assert all(r.source[0].startswith("h_") for r in rows)
    walk = crosswalk_path(out)
    assert walk.parent == tmp_path and (walk.stat().st_mode & 0o777) == 0o600
    links = read_crosswalk(walk)
    assert {r.id for r in rows} <= set(links)
    assert all(links[r.id]["manifest_source"] == r.source and links[r.id]["source"][0].startswith("case")
               for r in rows)  # fmt: skip
    with pytest.raises(InputError, match="inside the cache"):
        _run(root, out, crosswalk=out / "walk.jsonl")
    kept = tmp_path / "kept"
    _run(root, kept, redact_paths=False)  # --keep-paths: paths in the manifest, no crosswalk
    assert all(r.source[0].startswith("case") for r in read_manifest(kept / "manifest.jsonl"))
    assert not crosswalk_path(kept).exists()


# ----------------------------------------------------------------------------- the command line


def test_cli_bad_side_table_exits_2_before_any_work(export, tmp_path, capsys):
    root, _ = export
    bad = tmp_path / "reports.csv"
    bad.write_text("Accession,Text\nA,b\n")
    out = tmp_path / "cache"
    code = main(["preprocess", str(root / "nifti"), "--out", str(out), "--preset", "tiny", "--reports", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "reports.csv has no column 'AccessionNumber'" in err
    assert not out.exists()
    code = main(["preprocess", str(root / "nifti"), "--out", str(out), "--preset", "nope"])
    assert code == 2 and "available: " in capsys.readouterr().err
    code = main(["preprocess", str(root / "nifti"), "--out", str(out), "--shard", "3/3"])
    assert code == 2 and "0 <= i < N" in capsys.readouterr().err


def test_cli_without_key_refuses_with_instructions(export, tmp_path, monkeypatch, capsys):
    root, _ = export
    monkeypatch.delenv("VOL3D_ID_KEY")
    code = main(["preprocess", str(root / "nifti"), "--out", str(tmp_path / "c"), "--preset", "tiny"])
    assert code == 2 and "export VOL3D_ID_KEY=" in capsys.readouterr().err


def test_cli_dicomdir_export_exit_3_and_merge_word(pydicom_test_files, tmp_path, capsys):
    src = pydicom_test_files / "dicomdirtests"
    out = tmp_path / "cache"
    argv = ["preprocess", str(src), "--out", str(out), "--preset", "tiny", "--no-progress", "--ingest.min-slices", "2"]
    code = main([*argv, "--workers", "2", "--shard", "0/2"])
    code1 = main([*argv[:3], str(tmp_path / "cache1"), *argv[4:], "--shard", "1/2"])
    assert {code, code1} <= {0, 3}
    assert main(["preprocess", "merge", str(out), str(tmp_path / "cache1"), "--out", str(tmp_path / "all")]) == 3
    rows = read_manifest(tmp_path / "all/manifest.jsonl")
    by_status = {s: [r for r in rows if r.status == s] for s in ("ok", "skipped", "failed")}
    assert by_status["ok"] and by_status["skipped"] and by_status["failed"]
    assert {r.reason for r in by_status["failed"]} <= {"MISSING_SLICES", "UNEVEN_SLICE_SPACING", "INCONSISTENT_SHAPE"}
    assert all(r.reason and r.detail for r in rows if r.status != "ok")
    assert all((tmp_path / "all" / r.h5).is_file() for r in by_status["ok"])
    # every file of the disc is accounted for: rows cover all files except the DICOMDIR index variants
    sources = _sources(tmp_path / "all")
    listed = {s for r in rows for s in sources[r.id]}
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and "DICOMDIR" not in p.name}
    assert files <= listed
    code = main(["preprocess", "merge", str(out), "--out", str(tmp_path / "x"), "--reports", "r.csv"])
    assert code == 2 and "merge takes only" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "all/cases")


# ----------------------------------------------------------------------------- a `vol3d synth` export


def test_synth_export_statuses_and_side_data(tmp_path):
    from vol3d.synth.export import SynthConfig, generate

    export = tmp_path / "export"
    truth = generate(export, SynthConfig(cases=4, seed=1, size="small", workers=1))
    cfg = tiny_config()
    cfg.ingest.exclude = ("lesions/*",)  # the lesion instance maps are side data, not images
    side = SideTables.load(export / "reports.csv", export / "ehr_codes.csv", export / "boxes.json", export / "labels")
    out = tmp_path / "cache"
    summary = run_preprocess(export, out, cfg, side, RunOptions(workers=2, progress=False))
    assert summary.exit_code == 0 and summary.no_report == 0
    rows = read_manifest(out / "manifest.jsonl")
    sources = _sources(out)
    by_file = {s: r for r in rows for s in sources[r.id]}
    boxes_by_key: dict[str, list] = {}
    for b in json.loads((export / "boxes.json").read_text()):
        boxes_by_key.setdefault(b["key"], []).append(b)
    n_checked = 0
    for case in truth["cases"]:
        for series in case["series"]:
            row = by_file[series["files"][0]]
            assert sorted(sources[row.id]) == sorted(series["files"])  # one row per series, all its files
            assert (row.status, row.reason) == (series["expected"]["status"], series["expected"].get("reason", ""))
            if row.status != "ok":
                continue
            c = read_case(out / row.h5, row.key)
            # the report of the study's accession, the codes of the patient, the label map
            assert (c["report_findings"], c["report_impression"]) == (case["report"]["findings"], case["report"]["impression"])
            assert sorted(c["codes"]) == sorted({code["code"] if isinstance(code, dict) else code for code in case["codes"]})
            assert row.has_label == (series.get("labels") is not None) and (c["label"] is not None) == row.has_label
            # boxes in both frames; the voxel boxes map onto the world boxes through the stored affine
            expected = boxes_by_key.get(series["key"], [])
            assert row.n_boxes == len(expected) == len(c["boxes"]["finding"])
            if expected:
                np.testing.assert_allclose(c["boxes"]["world"], [b["box_world_ras_mm"] for b in expected], atol=1e-3)
                full = c["boxes"]["visible"] > 0.999
                back = geometry.boxes_voxel_to_world(c["boxes"]["vox"][full], c["affine"])
                np.testing.assert_allclose(back, c["boxes"]["world"][full], atol=1e-2)
            n_checked += 1
    assert n_checked == summary.counts["ok"] >= 4
