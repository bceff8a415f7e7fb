"""The whole `vol3d predict` path lands masks on the ORIGINAL grid (NIfTI + DICOM SEG).

An oracle model (it returns the cached label of the volume it is given) isolates
geometry from learning: a prediction that matches the world-coordinate truth at the
original resolution proves scan -> load -> prepare -> sliding window -> to_original
-> write is right for axial, feet-first, sagittal and oblique DICOM and a LAS NIfTI.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from segphantom import (
    CLASSES,
    LookupOracle,
    dice_by_class,
    grid_points,
    label_at,
    write_dicom_series,
    write_nifti,
)

from preprocess import geometry
from preprocess.config import PreprocessConfig
from preprocess.errors import InputError
from preprocess.ingest import load, scan
from preprocess.sanitise import crosswalk_path, read_crosswalk
from preprocess.transforms import prepare
from vol3d.seg.config import InferConfig, SegModelConfig
from vol3d.seg.model import SegModel
from vol3d.seg.predict import Predictor, predict

ORIENTATIONS = ["axial", "feet_first", "sagittal", "oblique"]
CFG = PreprocessConfig(target_spacing=(2.5, 3.0, 3.5), crop_margin_mm=6.0, fixed_size=(68, 52, 44))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A folder of four DICOM series and one NIfTI; ``{series UID or stem: orientation}``."""
    root = tmp_path_factory.mktemp("export")
    uids = {write_dicom_series(root / "dicom" / name, name, index=i): name for i, name in enumerate(ORIENTATIONS)}
    (root / "nifti").mkdir()
    write_nifti(root / "nifti" / "case_las.nii.gz")
    (root / "notes.txt").write_text("not an image")
    return root, uids


@pytest.fixture(scope="module")
def oracle_predictions(export, tmp_path_factory):
    root, _ = export
    oracle = LookupOracle(len(CLASSES))
    for c in scan(root, CFG.ingest):
        if c.status == "ok":
            image = load(c, CFG.ingest)
            p = prepare(image, CFG, label=label_at(grid_points(image.affine, image.array.shape)))
            oracle.add(p.image.astype(np.float32), p.label)
    out = tmp_path_factory.mktemp("pred")
    pred = Predictor(oracle, CLASSES, CFG.fixed_size, CFG, InferConfig(overlap=0.0, sw_batch_size=1))
    rows = predict(pred, root, out / "soft", resample="probs")
    hard = predict(pred, root, out / "hard", resample="labels", dicom_seg=False)
    return out, rows, hard


def test_every_input_gets_a_row_and_ok_ones_get_files(oracle_predictions):
    out, rows, _ = oracle_predictions
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) == 5 and sorted(r.kind for r in ok) == ["dicom"] * 4 + ["nifti"]
    assert [r for r in rows if r.status != "ok"] == [r for r in rows if r.kind == "file"]  # notes.txt: skipped
    assert all(r.status == "skipped" for r in rows if r.kind == "file")
    for r in ok:
        assert (out / "soft" / r.nifti).is_file()
        assert (r.dicom_seg is not None) == (r.kind == "dicom")
        assert r.nifti == f"{r.id}.nii.gz" and r.id.startswith("c_")
    listed = [json.loads(line) for line in (out / "soft" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in listed] == sorted(r.id for r in rows)


def test_masks_match_the_truth_on_the_original_grid(oracle_predictions):
    out, rows, hard = oracle_predictions
    by_id = {r.id: r for r in hard}
    for r in rows:
        if r.status != "ok":
            continue
        for folder, exact in (("soft", False), ("hard", True)):
            nii = nib.load(out / folder / r.nifti)
            mask = np.asarray(nii.dataobj)
            truth = label_at(grid_points(nii.affine, mask.shape))  # world truth on the file's own grid
            assert list(mask.shape) == r.shape == by_id[r.id].shape
            if exact:
                assert np.array_equal(mask, truth), r.source[0]
            else:
                assert min(dice_by_class(mask, truth).values()) > 0.97, (r.source[0], dice_by_class(mask, truth))


def test_dicom_outputs_overlay_the_series_instances(export, oracle_predictions):
    """Slice k of the NIfTI sits where the k-th instance (along the stack) sits in the scanner, and the
    DICOM SEG references the series and reproduces the mask, frame by instance."""
    import highdicom as hd

    root, uids = export
    out, rows, _ = oracle_predictions
    for r in rows:
        if r.kind != "dicom" or r.status != "ok":
            continue
        img = nib.load(out / "soft" / r.nifti)
        nii = np.asarray(img.dataobj)
        headers = {}
        for rel in read_crosswalk(crosswalk_path(out / "soft"))[r.id]["source"]:
            ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
            headers[ds.SOPInstanceUID] = ds
        seg = hd.seg.segread(out / "soft" / r.dicom_seg)
        ref_series = seg.ReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID in uids
        assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(headers)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASSES[1:]
        slices = []
        for sop, ds in headers.items():
            first_pixel = geometry.LPS_TO_RAS[:3, :3] @ np.asarray(ds.ImagePositionPatient, float)
            v = geometry.world_to_voxel(img.affine, first_pixel)
            assert np.allclose(v[:2], 0, atol=1e-3)  # column 0, row 0 of every instance
            k = int(round(v[2]))
            assert abs(v[2] - k) < 1e-3
            slices.append(k)
            frame = seg.get_pixels_by_source_instance([sop], combine_segments=True)[0]  # (rows, cols)
            # the truth at this instance's own pixels, from its position and orientation alone
            iop = np.asarray(ds.ImageOrientationPatient, float)
            dr, dc = (float(x) for x in ds.PixelSpacing)
            aff = geometry.affine_from_dicom(ds.ImagePositionPatient, iop, (dr, dc), np.cross(iop[:3], iop[3:]))
            truth = label_at(grid_points(aff, (ds.Columns, ds.Rows, 1)))[:, :, 0].T
            assert frame.shape == truth.shape
            assert (frame == truth).mean() > 0.97
            assert np.array_equal(frame, nii[:, :, k].T)  # the SEG frame is the NIfTI slice of that instance
        assert sorted(slices) == list(range(len(headers)))  # one slice each


def test_no_identifier_in_file_names_or_rows(export, oracle_predictions):
    out, _, _ = oracle_predictions
    names = " ".join(p.name for p in (out / "soft").iterdir())
    rows = (out / "soft" / "predictions.jsonl").read_text()
    for secret in ("PID0", "Doe", "ACC1", "1.2.826.0.1.3680043.8.498.8000", "axial"):
        assert secret not in names and secret not in rows
    assert ".dcm" not in rows.replace("_seg.dcm", "") and ".nii" not in rows.replace(".nii.gz\"", "")  # no input name
    walk = crosswalk_path(out / "soft")  # the link back to the inputs: beside OUT, owner-only
    assert walk.parent == out and (walk.stat().st_mode & 0o777) == 0o600
    listed = [json.loads(line) for line in rows.splitlines()]
    assert all(read_crosswalk(walk)[r["id"]]["manifest_source"] == r["source"] for r in listed)


def test_bad_input_is_a_clear_error(tmp_path, export):
    pred = Predictor(LookupOracle(len(CLASSES)), CLASSES, CFG.fixed_size, CFG)
    with pytest.raises(InputError, match="does not exist"):
        predict(pred, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM series or NIfTI"):
        predict(pred, tmp_path / "docs", tmp_path / "out")


def test_cli_predict_writes_masks_and_exits_3_when_an_input_fails(tmp_path, export):
    from vol3d.cli import main

    root, _ = export
    src = tmp_path / "in"
    shutil.copytree(root / "dicom" / "axial", src / "axial")
    shutil.copy(root / "nifti" / "case_las.nii.gz", src / "good.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    run = tmp_path / "run"
    coarse = PreprocessConfig(target_spacing=(6.0, 6.0, 8.0), fixed_size=(32, 32, 16))  # one window per volume
    model = SegModel(SegModelConfig(encoder="vit3d_tiny", class_names=CLASSES, patch_size=(32, 32, 16),
                                    feature_size=4), preprocess=coarse.public_dict())
    model.save_pretrained(run / "model")
    code = main(["predict", str(run), str(src), "--out", str(tmp_path / "out"), "--overlap", "0"])
    assert code == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    for r in rows:
        if r["status"] == "ok":
            nii = nib.load(tmp_path / "out" / r["nifti"])
            assert list(nii.shape) == r["shape"] and nii.get_data_dtype() == np.uint8
    assert main(["predict", str(tmp_path / "nope"), str(src), "--out", str(tmp_path / "o2")]) == 2
