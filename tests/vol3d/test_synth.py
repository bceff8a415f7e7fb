"""`vol3d synth`: the ground truth is consistent with the images it describes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from preprocess.geometry import LPS_TO_RAS, boxes_voxel_to_world, mask_to_box
from vol3d.cli import main
from vol3d.synth import FINDINGS, LABEL_VALUE, NOISE_CODES, SynthConfig, generate
from vol3d.synth.reports import finding_sizes


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    truth = generate(out, SynthConfig(cases=6, seed=7, size="small", nifti_fraction=0.34, workers=1))
    return out, truth


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _volume_series(truth: dict):
    for case in truth["cases"]:
        for s in case["series"]:
            if s["role"] != "localizer":
                yield case, s


def test_export_shows_the_variants_real_exports_have(export):
    out, truth = export
    cases = truth["cases"]
    planes = {s["plane"] for _, s in _volume_series(truth)}
    assert {"axial", "coronal", "oblique"} <= planes
    assert {"HFS", "FFS"} <= {s["patient_position"] for _, s in _volume_series(truth)}
    assert {c["format"] for c in cases} == {"dicom", "nifti"}
    roles = [s["role"] for c in cases for s in c["series"]]
    assert "localizer" in roles
    assert any(not c["findings"] for c in cases) and any(c["findings"] for c in cases)
    files = [f for c in cases if c["format"] == "dicom" for s in c["series"] for f in s["files"]]
    assert any(not f.endswith(".dcm") for f in files) and any(f.endswith(".dcm") for f in files)
    for name in ("boxes.json", "reports.csv", "ehr_codes.csv", "truth.json"):
        assert (out / name).is_file()


def test_each_box_is_the_voxel_extent_of_its_instance_mask(export):
    out, truth = export
    boxes = json.loads((out / "boxes.json").read_text())
    assert boxes, "the fixture should contain findings"
    for b in boxes:
        lesions = nib.load(out / "lesions" / f"{b['key']}.nii.gz")
        labels = np.asarray(nib.load(out / "labels" / f"{b['key']}.nii.gz").dataobj)
        mask = np.asarray(lesions.dataobj) == b["instance"]
        world = boxes_voxel_to_world(mask_to_box(mask)[None], lesions.affine)[0]
        np.testing.assert_allclose(b["box_world_ras_mm"], world, atol=2e-3)
        np.testing.assert_allclose(b["size_mm"], world[3:] - world[:3], atol=2e-3)
        # Every voxel centre of the finding lies inside its box.
        centres = nib.affines.apply_affine(lesions.affine, np.argwhere(mask))
        assert (centres >= world[:3] - 1e-3).all() and (centres <= world[3:] + 1e-3).all()
        expected = LABEL_VALUE["spleen"] if b["finding"] == "splenomegaly" else LABEL_VALUE["lesion"]
        assert (labels[mask] == expected).all()
        assert b["organ"] in FINDINGS[b["finding"]]["organs"]


def test_report_sizes_match_the_masks(export):
    out, truth = export
    reports = {r["AccessionNumber"]: r for r in _rows(out / "reports.csv")}
    for case in truth["cases"]:
        report = reports[case["accession"]]
        text = report["Findings"]
        lesions = np.asarray(nib.load(out / case["series"][0]["lesions"]).dataobj)
        affine = np.asarray(case["series"][0]["affine_ras"])
        for f in case["findings"]:
            world = boxes_voxel_to_world(mask_to_box(lesions == f["instance"])[None], affine)[0]
            sizes = finding_sizes(f["finding"], world[3:] - world[:3])
            assert sizes == f["report_sizes_mm"]
            if len(sizes) == 2:
                assert f"{sizes[0]} x {sizes[1]} mm" in text
            else:
                assert f"{sizes[0]} mm" in text and re.search("spleen|splen", text, re.I)
        if not case["findings"]:
            assert not re.search(r"\d+ x \d+ mm", text)
        for kind, spec in FINDINGS.items():
            words = "|".join(spec["organ_words"])
            assert re.search(words, text, re.I), f"{kind}: the report should mention the organ ({words})"


def _lps_geometry(affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lps = LPS_TO_RAS @ np.asarray(affine_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3], spacing, lps[:3, :3] / spacing


def test_simpleitk_reads_each_dicom_volume_with_the_intended_geometry(export):
    out, truth = export
    checked = 0
    for case, s in _volume_series(truth):
        if case["format"] != "dicom":
            continue
        folder = out / Path(s["files"][0]).parent
        ours = {str(out / f) for f in s["files"]}
        # GDCM sorts along the slice normal; a localizer sharing the UID is filtered out by file list.
        names = [
            n
            for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s["series_uid"])
            if n in ours
        ]
        assert len(names) == s["shape"][2]
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        img = reader.Execute()
        origin, spacing, direction = _lps_geometry(s["affine_ras"])
        np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-3)
        np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-3)
        np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), direction, atol=1e-5)
        assert list(img.GetSize()) == s["shape"]
        # The label map is aligned with the pixels: organs have their expected intensity.
        hu = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        labels = nib.load(out / s["labels"])
        np.testing.assert_allclose(labels.affine, s["affine_ras"], atol=1e-4)
        lab = np.asarray(labels.dataobj)
        assert lab.shape == hu.shape
        assert 60 < np.median(hu[lab == LABEL_VALUE["liver"]]) < 150
        assert np.median(hu[(lab == LABEL_VALUE["lung_left"]) | (lab == LABEL_VALUE["lung_right"])]) < -700
        if (lab == LABEL_VALUE["lesion"]).sum() >= 4:
            lesion_hu = np.median(hu[lab == LABEL_VALUE["lesion"]])
            assert abs(lesion_hu - np.median(hu[lab == LABEL_VALUE["liver"]])) > 40 or lesion_hu > -700
        checked += 1
    assert checked >= 3


def test_nifti_cases_have_the_intended_affine_and_a_sidecar(export):
    out, truth = export
    nifti_cases = [c for c in truth["cases"] if c["format"] == "nifti"]
    assert nifti_cases
    for case in nifti_cases:
        s = case["series"][0]
        img = nib.load(out / s["files"][0])
        np.testing.assert_allclose(img.affine, s["affine_ras"], atol=1e-4)
        assert list(img.shape) == s["shape"]
        stem = s["files"][0].split("/")[-1].split(".nii")[0]
        assert stem == case["key"]
        sidecar = json.loads((out / "nifti" / f"{stem}.json").read_text())
        assert sidecar["PatientID"] == case["patient_id"]
        assert sidecar["AccessionNumber"] == case["accession"]
        lab = nib.load(out / s["labels"])
        assert lab.shape == img.shape
        np.testing.assert_allclose(lab.affine, img.affine)


def test_tables_join_on_accession_and_patient_and_codes_follow_findings(export):
    out, truth = export
    accessions_in_images = set()
    for case in truth["cases"]:
        s = case["series"][0]
        if case["format"] == "dicom":
            ds = pydicom.dcmread(out / s["files"][0], stop_before_pixels=True)
            accessions_in_images.add(ds.AccessionNumber)
            assert ds.PatientID == case["patient_id"]
            assert str(ds.PatientName) == case["phi"]["PatientName"]
            assert ds.PatientBirthDate == case["phi"]["PatientBirthDate"]
        else:
            stem = case["key"]
            accessions_in_images.add(
                json.loads((out / "nifti" / f"{stem}.json").read_text())["AccessionNumber"]
            )
    reports = _rows(out / "reports.csv")
    assert {r["AccessionNumber"] for r in reports} <= accessions_in_images
    assert len(reports) == len(truth["cases"])
    codes: dict[str, set[str]] = {}
    for row in _rows(out / "ehr_codes.csv"):
        codes.setdefault(row["PatientID"], set()).add(row["Code"])
    finding_codes = {spec["code"] for spec in FINDINGS.values()}
    for pid in {c["patient_id"] for c in truth["cases"]}:
        kinds = {f["finding"] for c in truth["cases"] if c["patient_id"] == pid for f in c["findings"]}
        got = codes.get(pid, set())
        assert got & finding_codes == {FINDINGS[k]["code"] for k in kinds}
        assert got - finding_codes <= set(NOISE_CODES)
    for phi in ("PatientName", "PatientID", "AccessionNumber"):
        assert all(c["phi"][phi] in truth["phi_strings"] for c in truth["cases"])


def test_localizers_are_marked_and_expected_to_be_skipped(export):
    out, truth = export
    scouts = [s for c in truth["cases"] for s in c["series"] if s["role"] == "localizer"]
    assert scouts
    for s in scouts:
        assert s["expected"] == {"status": "skipped", "reason": "LOCALIZER"}
        assert len(s["files"]) == 1 and s["labels"] is None
        ds = pydicom.dcmread(out / s["files"][0], stop_before_pixels=True)
        assert "LOCALIZER" in ds.ImageType
        assert ds.SeriesInstanceUID == s["series_uid"]


def test_same_seed_writes_identical_files(tmp_path):
    cfg = SynthConfig(cases=3, seed=11, size="small", nifti_fraction=0.34, workers=1)
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, cfg)
    generate(b, SynthConfig(cases=3, seed=11, size="small", nifti_fraction=0.34, workers=2))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name.endswith(".nii.gz"):  # gzip headers may carry a timestamp: compare the data
            np.testing.assert_array_equal(
                np.asarray(nib.load(a / rel).dataobj), np.asarray(nib.load(b / rel).dataobj)
            )
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = tmp_path / "c"
    generate(c, SynthConfig(cases=3, seed=12, size="small", nifti_fraction=0.34, workers=1))
    assert (c / "reports.csv").read_bytes() != (a / "reports.csv").read_bytes()


def test_cli_refuses_a_non_empty_folder_and_overwrites_only_a_synth_export(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / "dicom").mkdir()  # a name synth also writes: still not a synth export
    argv = ["synth", str(out), "--cases", "1", "--size", "small", "--workers", "1"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite never wipes a folder that is not a previous synth export
    assert main([*argv, "--overwrite"]) == 2
    assert "is not a vol3d synth export" in capsys.readouterr().err
    assert (out / "keep.txt").exists() and (out / "dicom").is_dir()
    (out / "dicom").rmdir()
    (out / "keep.txt").unlink()

    assert main(argv) == 0
    first = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    (out / "notes.txt").write_text("mine")  # a file of the user's next to the export
    (out / "dicom" / "stale.dcm").write_text("old")  # inside synth's own folders: goes with them
    capsys.readouterr()
    assert main([*argv[:3], "2", *argv[4:], "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "dicom" / "stale.dcm").exists()
    assert "kept 1 file(s)" in capsys.readouterr().out
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["cases"]) == 2 and len(first) > 5


def test_export_root_is_preprocessable_without_exclude_flags(tmp_path):
    """The export's .vol3dignore keeps its ground truth (labels, lesions, tables) out of the scan."""
    from preprocess.ingest import scan
    from preprocess.ingest.config import IngestConfig
    from vol3d.synth import SynthConfig, generate

    out = tmp_path / "export"
    out.mkdir()
    generate(out, SynthConfig(cases=2, seed=3, size="small"))
    rows = scan(out, IngestConfig())
    sources = [s for r in rows for s in r.source]
    assert sources, "the scan found nothing"
    assert not [s for s in sources if s.startswith(("labels/", "lesions/")) or s.endswith((".csv", "truth.json"))]
    assert all(r.reason != "NOT_MEDICAL_FILE" for r in rows)
