"""Ingest of NIfTI / NRRD / MHA files: shipped real samples, 4D policies, sidecars, mixed exports."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from preprocess import reasons
from preprocess.geometry import apply_affine
from preprocess.ingest import IngestConfig, content_hash, load, scan


def _real_niftis(nibabel_test_data: Path) -> dict[str, Path]:
    import dipy
    import nilearn

    return {
        "anatomical": nibabel_test_data / "anatomical.nii",
        "standard": nibabel_test_data / "standard.nii.gz",
        "aniso_vox": Path(dipy.__file__).parent / "data" / "files" / "aniso_vox.nii.gz",
        "mni": Path(nilearn.__file__).parent
        / "datasets"
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    }


def _assert_world_matches_simpleitk(path: Path, img, points) -> None:
    """Voxel index -> world agrees with SimpleITK's TransformIndexToPhysicalPoint (LPS -> RAS)."""
    ref = sitk.ReadImage(str(path))
    for idx in points:
        world = np.asarray(ref.TransformIndexToPhysicalPoint([int(v) for v in idx])) * [-1, -1, 1]
        np.testing.assert_allclose(apply_affine(img.affine, np.asarray(idx, float)), world, atol=1e-3)


@pytest.mark.parametrize("name", ["anatomical", "standard", "aniso_vox", "mni"])
def test_real_nifti_loads_with_nibabel_geometry(nibabel_test_data, name):
    path = _real_niftis(nibabel_test_data)[name]
    cfg = IngestConfig(min_slices=4)
    (c,) = scan(path, cfg)
    assert (c.kind, c.status, c.key, c.modality) == ("nifti", "ok", path.name.split(".")[0], "")
    img = load(c, cfg)
    ref = nib.load(path)
    assert img.array.dtype == np.float32 and img.array.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_array_equal(img.array, ref.get_fdata(dtype=np.float32))
    last = np.array(ref.shape) - 1
    _assert_world_matches_simpleitk(
        path, img, [(0, 0, 0), tuple(last), tuple(last // 2), (last[0], 0, last[2])]
    )


def test_small_nifti_respects_min_slices(nibabel_test_data):
    (c,) = scan(nibabel_test_data / "standard.nii.gz", IngestConfig())  # shape (4, 5, 7) < 8
    assert (c.status, c.reason) == ("skipped", reasons.TOO_FEW_SLICES)
    assert "pass --ingest.min-slices 4 (or ingest.min_slices: 4 in the config)" in c.detail


@pytest.mark.parametrize("policy", ["split", "first", "reject"])
def test_4d_nifti_policies(nibabel_test_data, policy):
    path = nibabel_test_data / "example4d.nii.gz"
    cfg = IngestConfig(four_d_policy=policy)
    cands = scan(path, cfg)
    ref = nib.load(path)
    if policy == "reject":
        assert [(c.status, c.reason) for c in cands] == [("failed", reasons.REJECTED_4D)]
        assert "pass --ingest.four-d-policy first (or ingest.four_d_policy: first in the config)" in cands[0].detail
        return
    if policy == "first":
        assert [(c.key, c.status, c.reason) for c in cands] == [
            ("example4d", "ok", ""),
            ("example4d#1-1", "skipped", reasons.EXTRA_VOLUME_4D),
        ]
        assert "1 later volume" in cands[1].detail
        assert "pass --ingest.four-d-policy split (or ingest.four_d_policy: split in the config)" in cands[1].detail
    else:
        assert [(c.key, c.status) for c in cands] == [("example4d#0", "ok"), ("example4d#1", "ok")]
    for t, c in enumerate(c for c in cands if c.status == "ok"):
        img = load(c, cfg)
        np.testing.assert_array_equal(img.array, ref.get_fdata(dtype=np.float32)[..., t])
        np.testing.assert_array_equal(img.affine, ref.affine)
    if policy == "split":
        assert content_hash(cands[0]) != content_hash(cands[1])


def _oblique_affine() -> np.ndarray:
    a = np.radians(25)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5]) * [[-1], [1], [1]]
    aff[:3, 3] = [40.0, -12.0, 7.5]
    return aff


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_convert_lps_to_ras(tmp_path, ext):
    """A volume written by nibabel, converted by SimpleITK: same pixels and RAS affine as the NIfTI."""
    vol = np.random.default_rng(0).integers(-500, 500, size=(9, 10, 8)).astype(np.int16)
    nii = tmp_path / "ref" / "vol.nii.gz"
    nii.parent.mkdir()
    nib.save(nib.Nifti1Image(vol, _oblique_affine()), nii)
    out = tmp_path / "in" / f"scan1{ext}"
    out.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(out))
    (out.parent / "scan1.json").write_text(
        json.dumps({"PatientID": "P7", "AccessionNumber": "A9", "Modality": "mr"})
    )
    cands = scan(tmp_path / "in", IngestConfig())
    assert [(c.status, c.kind) for c in cands] == [("ok", "nrrd" if ext == ".nrrd" else "mha")]
    c = cands[0]
    assert (
        c.key == "scan1"
        and c.modality == "MR"
        and c.identity.patient_id == "P7"
        and c.identity.accession == "A9"
    )
    if ext == ".mhd":  # the detached data file belongs to the candidate (and its hash)
        assert c.source == ["scan1.mhd", "scan1.raw"]
    img = load(c, IngestConfig())
    np.testing.assert_array_equal(img.array, vol.astype(np.float32))
    np.testing.assert_allclose(img.affine, _oblique_affine(), atol=1e-5)


def test_mixed_export_rows_and_ignore_rules(tmp_path, nibabel_test_data):
    src = tmp_path / "export"
    (src / "nifti").mkdir(parents=True)
    (src / "other").mkdir()
    shutil.copy(nibabel_test_data / "anatomical.nii", src / "nifti" / "case1.nii")
    (src / "nifti" / "case1.json").write_text(json.dumps({"PatientID": "PX", "Modality": "CT"}))
    shutil.copy(nibabel_test_data / "anatomical.nii", src / "other" / "case1.nii")  # same stem elsewhere
    (src / "nifti" / "broken.nii.gz").write_bytes(b"not gzip at all")
    (src / "reports.csv").write_text("AccessionNumber,Findings\n")
    (src / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (src / ".DS_Store").write_bytes(b"junk")
    (src / "labels").mkdir()
    shutil.copy(nibabel_test_data / "anatomical.nii", src / "labels" / "case1.nii")
    rows = scan(src, IngestConfig(exclude=("labels/*",)))
    got = [(c.source, c.key, c.status, c.reason) for c in rows]
    assert got == [
        (["blob.bin"], "blob.bin", "skipped", reasons.NOT_MEDICAL_FILE),
        (["nifti/broken.nii.gz"], "broken", "failed", reasons.UNREADABLE),
        (["nifti/case1.nii"], "case1", "ok", ""),
        (["other/case1.nii"], "case1@2", "ok", ""),
        (["reports.csv"], "reports.csv", "skipped", reasons.NOT_MEDICAL_FILE),
    ]
    assert rows[2].modality == "CT" and rows[2].identity.patient_id == "PX" and rows[3].modality == ""
    assert "nifti/broken.nii.gz" in rows[1].detail


def test_zip_with_nifti_and_dicom(tmp_path, nibabel_test_data, pydicom_test_files):
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as zf:
        zf.write(nibabel_test_data / "anatomical.nii", "imgs/anat.nii")
        zf.write(pydicom_test_files / "rtstruct.dcm", "dicom/rs")
        zf.writestr("../escape.txt", "x")
    cfg = IngestConfig()
    rows = scan(tmp_path / "bundle.zip", cfg, workdir=tmp_path / "stage")
    got = [(c.source[0], c.status, c.reason) for c in rows]
    assert got == [
        ("bundle.zip!/../escape.txt", "failed", reasons.UNREADABLE),
        ("bundle.zip!/dicom/rs", "skipped", reasons.NOT_IMAGE),
        ("bundle.zip!/imgs/anat.nii", "ok", ""),
    ]
    assert not (tmp_path / "escape.txt").exists()
    assert load(rows[2], cfg).array.shape == (33, 41, 25)
    assert scan(tmp_path / "bundle.zip", cfg, workdir=tmp_path / "stage")[2].source == rows[2].source  # rerun


def test_a_scan_without_a_work_folder_stages_only_what_it_unzips(tmp_path, nibabel_test_data, monkeypatch):
    """Without ``workdir`` a temporary staging folder is made for the first zip only: a tree without
    zips leaves nothing behind (every such scan used to leave an empty folder in the temp dir)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(nibabel_test_data / "anatomical.nii", tree / "anat.nii")
    rows = scan(tree, IngestConfig())
    assert [c.status for c in rows] == ["ok"] and list(temp.iterdir()) == []
    with zipfile.ZipFile(tree / "bundle.zip", "w") as zf:
        zf.write(nibabel_test_data / "anatomical.nii", "anat2.nii")
    rows = scan(tree, IngestConfig())
    assert [c.status for c in rows] == ["ok", "ok"]
    staged = list(temp.iterdir())
    assert len(staged) == 1 and staged[0].name.startswith("vol3d-ingest-")  # the zip's content, for load()
    assert load(next(c for c in rows if "!/" in c.source[0]), IngestConfig()).array.shape == (33, 41, 25)


def _write_nifti(path: Path, affine: np.ndarray, sform: int, qform: int, qform_affine=None) -> Path:
    arr = np.arange(12 * 10 * 9, dtype=np.int16).reshape(12, 10, 9)
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code=sform)
    img.set_qform(affine if qform_affine is None else qform_affine, code=qform)
    nib.save(img, path)
    return path


def test_nifti_without_orientation_fails_naming_file_and_fix(tmp_path):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    _write_nifti(tmp_path / "noorient.nii.gz", aff, sform=0, qform=0)
    (c,) = scan(tmp_path, IngestConfig())
    assert (c.status, c.reason) == ("failed", reasons.NO_ORIENTATION)
    assert reasons.NO_ORIENTATION in reasons.FAIL_REASONS
    assert "noorient.nii.gz" in c.detail and "sform_code and qform_code are both 0" in c.detail
    assert "re-export" in c.detail
    # either form alone is enough
    for sform, qform in ((1, 0), (0, 1)):
        _write_nifti(tmp_path / "noorient.nii.gz", aff, sform=sform, qform=qform)
        (c,) = scan(tmp_path, IngestConfig())
        assert c.status == "ok"
        img = load(c, IngestConfig())
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        assert img.flags == []


def test_disagreeing_sform_and_qform_use_sform_and_flag(tmp_path):
    sform = np.diag([2.0, 2.0, 3.0, 1.0])
    qform = sform.copy()
    qform[:3, 3] = [0.0, 0.0, 15.0]  # five slices apart
    _write_nifti(tmp_path / "two.nii.gz", sform, sform=1, qform=1, qform_affine=qform)
    (c,) = scan(tmp_path, IngestConfig())
    img = load(c, IngestConfig())
    np.testing.assert_allclose(img.affine, sform, atol=1e-5)
    assert img.flags == ["SFORM_QFORM_DISAGREE"]
    # agreeing forms (up to the qform's float32 rounding): no flag
    _write_nifti(tmp_path / "two.nii.gz", sform, sform=1, qform=1)
    assert load(scan(tmp_path, IngestConfig())[0], IngestConfig()).flags == []


def test_itk_files_use_geometry_affine_from_itk(tmp_path):
    """NRRD/MHA affines come from geometry.affine_from_itk (LPS -> RAS lives in geometry.py only)."""
    import inspect

    from preprocess.ingest import volumes

    src = inspect.getsource(volumes)
    assert "affine_from_itk(" in src and "LPS_TO_RAS" not in src
    img = sitk.GetImageFromArray(np.zeros((9, 10, 12), np.float32))
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    d = np.array([[0, 0, 1], [0.6, 0.8, 0], [-0.8, 0.6, 0]], float).T  # oblique, right-handed columns
    img.SetDirection(d.ravel().tolist())
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    (c,) = scan(tmp_path / "v.nrrd", IngestConfig())
    loaded = load(c, IngestConfig())
    _assert_world_matches_simpleitk(tmp_path / "v.nrrd", loaded, [(0, 0, 0), (11, 9, 8), (3, 4, 5)])


def test_the_mr_brain_preset_on_the_mni152_template(nibabel_test_data):
    """The shipped MR brain preset (N4, z-score) on a real T1 brain (coarsened to 3 mm to stay fast):
    a RAS+ grid whose world positions are the template's, the head's mean intensity at 0.5."""
    import dataclasses

    from preprocess.config import PreprocessConfig
    from preprocess.config_io import load_yaml
    from preprocess.transforms import prepare
    from vol3d.presets import preset_path

    path = _real_niftis(nibabel_test_data)["mni"]
    cfg = dataclasses.replace(load_yaml(PreprocessConfig, preset_path("mr_brain")),
                              target_spacing=(3.0, 3.0, 3.0))
    assert cfg.mr_bias_correction and cfg.mr_normalisation == "zscore"
    (c,) = scan(path, cfg.ingest)
    p = prepare(load(c, cfg.ingest), cfg)
    assert p.modality == "MR" and "CT_NOT_HU" not in p.flags  # the preset's default modality, no HU check
    assert np.all(np.diag(p.affine)[:3] > 0) and np.allclose(p.spacing, 3.0)
    head = p.image[0][p.foreground].astype(np.float32)
    assert head.mean() == pytest.approx(0.5, abs=0.03) and p.image.min() >= 0 and p.image.max() <= 1
    # the cached grid's centre is where the template says it is (world mm)
    centre = (np.array(p.image.shape[1:]) - 1) / 2
    orig_index = apply_affine(p.cached_to_orig, centre)
    np.testing.assert_allclose(apply_affine(p.affine, centre), apply_affine(nib.load(path).affine, orig_index),
                               atol=1e-6)


@pytest.mark.parametrize(("preset", "name", "spacing"), [("mr_brain", "aniso_vox.nii.gz", (3.0, 3.0, 3.0)),
                                                         ("mr_knee", "test_piesno.nii.gz", None)])
def test_the_mr_presets_on_dipys_mr_volumes(preset, name, spacing):
    """dipy's MR volumes (an anisotropic 4 x 4 x 5 mm LPS brain; an axial 96 x 96 x 14 scan) through the
    shipped MR presets: MR without a sidecar (the presets' default), a RAS+ grid, N4 then the preset's
    normalisation into 0..1, world positions kept."""
    import dataclasses

    import dipy

    from preprocess.config import PreprocessConfig
    from preprocess.config_io import load_yaml
    from preprocess.transforms import prepare
    from vol3d.presets import preset_path

    path = Path(dipy.__file__).parent / "data" / "files" / name
    cfg = load_yaml(PreprocessConfig, preset_path(preset))
    if spacing is not None:  # the 1 mm brain grid costs a minute of N4 on 2 cores; 3 mm checks the same
        cfg = dataclasses.replace(cfg, target_spacing=spacing)
    (c,) = scan(path, cfg.ingest)
    assert c.status == "ok"
    p = prepare(load(c, cfg.ingest), cfg)
    assert p.modality == "MR" and "CT_NOT_HU" not in p.flags
    assert np.all(np.diag(p.affine)[:3] > 0) and np.allclose(p.spacing, cfg.target_spacing)
    assert p.image.min() >= 0 and p.image.max() <= 1
    fg = p.image[0][p.foreground].astype(np.float32)
    if cfg.mr_normalisation == "zscore":
        assert fg.mean() == pytest.approx(0.5, abs=0.03)
    else:  # the 0.5-99.5 percentiles of the foreground map to 0 and 1
        assert np.mean(fg <= 0.0) < 0.02 and np.mean(fg >= 1.0) < 0.02
    centre = (np.array(p.image.shape[1:]) - 1) / 2
    np.testing.assert_allclose(apply_affine(p.affine, centre),
                               apply_affine(nib.load(path).affine, apply_affine(p.cached_to_orig, centre)), atol=1e-6)


def test_pydicoms_mr_slice_is_skipped_with_the_reason_and_the_fix():
    """pydicom's MR_small.dcm is one derived 64 x 64 slice: the MR presets skip it saying why and how."""
    from pydicom.data import get_testdata_file

    from preprocess.config import PreprocessConfig
    from preprocess.config_io import load_yaml
    from vol3d.presets import preset_path

    path = Path(get_testdata_file("MR_small.dcm"))
    for preset in ("mr_brain", "mr_knee"):
        cfg = load_yaml(PreprocessConfig, preset_path(preset))
        (c,) = scan(path, cfg.ingest)
        assert (c.status, c.reason) == ("skipped", reasons.DERIVED) and "skip_derived" in c.detail
        cfg.ingest.skip_derived = False
        (c,) = scan(path, cfg.ingest)
        assert c.status == "skipped" and c.reason in (reasons.IMAGE_2D, reasons.TOO_FEW_SLICES)


@pytest.mark.parametrize("image_class", ["Nifti1Image", "Nifti2Image"])
@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
def test_gzipped_nifti_loads_exactly_as_nibabel_reads_it_without_a_copy(tmp_path, image_class, isal, monkeypatch):
    """.nii.gz goes through ISA-L's inflate when isal is installed (and zlib without it): the same
    scaled values and affine as nibabel's own reader, kept in NIfTI's Fortran order (no full copy)."""
    import sys

    if isal:
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)  # as if not installed
    rng = np.random.default_rng(0)
    raw = rng.integers(-1000, 2000, size=(20, 18, 7), dtype=np.int16)
    affine = np.array([[-0.8, 0, 0, 90], [0, -0.9, 0, 100], [0, 0, 2.5, -50], [0, 0, 0, 1]])
    img = getattr(nib, image_class)(raw, affine)
    img.header.set_slope_inter(0.5, -3.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = tmp_path / "v.nii.gz"
    nib.save(img, path)
    (c,) = scan(path, IngestConfig())
    loaded = load(c, IngestConfig())
    ref = nib.load(path)
    np.testing.assert_array_equal(loaded.array, np.asarray(ref.dataobj, dtype=np.float32))
    np.testing.assert_allclose(loaded.affine, ref.affine)
    assert loaded.array.flags.f_contiguous and loaded.array.dtype == np.float32
