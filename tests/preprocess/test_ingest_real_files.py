"""Ingest of real sample files that ship inside pydicom, nibabel, dipy and nilearn (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from preprocess import reasons
from preprocess.geometry import affine_from_itk, apply_affine
from preprocess.ingest import IngestConfig, load, scan
from preprocess.ingest import dicom as ingest_dicom
from preprocess.types import SeriesError

# Folder of the pydicom DICOMDIR export -> (status, reason) of every row from it, default config.
# CT2 has 4 slices with a 202 mm jump (slices 1 and 180-182 of a longer scan); CT5N is 5 axial
# slices; CT2N two LOCALIZER images; MR1 three single-slice series; MR2 two tri-plane localizers
# (3 single slices in 3 orientations, one per UID) plus one single slice; MR700 seven radial
# DERIVED/SECONDARY projections; CR1-3 single radiographs; TINY_ALPHA 50 CT headers without pixels.
EXPECTED_DEFAULT = {
    "77654033/CR1": [("skipped", reasons.IMAGE_2D)],
    "77654033/CR2": [("skipped", reasons.IMAGE_2D)],
    "77654033/CR3": [("skipped", reasons.IMAGE_2D)],
    "77654033/CT2": [("skipped", reasons.TOO_FEW_SLICES)],
    "98892001/CT2N": [("skipped", reasons.LOCALIZER)],
    "98892001/CT5N": [("skipped", reasons.TOO_FEW_SLICES)],
    "98892003/MR1": [("skipped", reasons.IMAGE_2D)] * 3,
    "98892003/MR2": [
        ("skipped", reasons.IMAGE_2D),
        ("skipped", reasons.LOCALIZER),
        ("skipped", reasons.LOCALIZER),
    ],
    "98892003/MR700": [("skipped", reasons.DERIVED)],
    "TINY_ALPHA/PT000000/ST000000/SE000000": [("skipped", reasons.NOT_IMAGE)],
    "README.txt": [("skipped", reasons.NOT_MEDICAL_FILE)],
    "TINY_ALPHA/README": [("skipped", reasons.NOT_MEDICAL_FILE)],
}


def _by_folder(cands) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for c in cands:
        folder = c.source[0].rsplit("/", 1)[0] if c.kind == "dicom" else c.source[0]
        out.setdefault(folder, []).append((c.status, c.reason))
    return {k: sorted(v) for k, v in out.items()}


def test_dicomdir_export_every_series_reported(pydicom_test_files):
    root = pydicom_test_files / "dicomdirtests"
    cands = scan(root, IngestConfig())
    assert _by_folder(cands) == {k: sorted(v) for k, v in EXPECTED_DEFAULT.items()}
    # Every DICOM file of the export is in exactly one row; the DICOMDIR index files in none.
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    listed = sorted(s for c in cands for s in c.source)
    assert listed == [f for f in files if not Path(f).name.startswith("DICOMDIR")]
    assert len({c.key for c in cands}) == len(cands)
    assert all(c.detail for c in cands)


def test_dicomdir_export_with_min_slices_two(pydicom_test_files):
    root = pydicom_test_files / "dicomdirtests"
    cfg = IngestConfig(min_slices=2)
    got = _by_folder(scan(root, cfg))
    assert got["77654033/CT2"] == [("failed", reasons.MISSING_SLICES)]  # 161 slices absent between 1 and 180
    assert got["98892001/CT5N"] == [("ok", "")]
    assert got["98892001/CT2N"] == [("skipped", reasons.LOCALIZER)]
    cands = scan(root, IngestConfig(min_slices=2, uneven_policy="resample"))
    ct2 = next(c for c in cands if c.source[0].startswith("77654033/CT2/"))
    assert ct2.status == "ok" and ct2.label == "CT 16x16x165"


def test_dicomdir_ct_series_geometry_matches_simpleitk(pydicom_test_files):
    folder = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    cfg = IngestConfig(min_slices=5)
    (c,) = scan(folder, cfg)
    img = load(c, cfg)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    np.testing.assert_allclose(
        img.affine, affine_from_itk(ref.GetDirection(), ref.GetSpacing(), ref.GetOrigin()), atol=1e-4
    )
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(ref).T)
    # InstanceNumber runs 6..10 while z decreases: slice 0 is the lowest z, not InstanceNumber 6.
    assert c.source_files[c.extra["slices"][0][0]].name == "3353"
    for idx in [(0, 0, 0), (15, 3, 4), (7, 11, 2)]:
        world_ras = np.asarray(ref.TransformIndexToPhysicalPoint(idx)) * [-1, -1, 1]
        np.testing.assert_allclose(apply_affine(img.affine, np.array(idx, float)), world_ras, atol=1e-4)


MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", MR_VARIANTS)
def test_mr_small_transfer_syntaxes_decode_identically(pydicom_test_files, name):
    assert scan(pydicom_test_files / name, IngestConfig())[0].reason == reasons.DERIVED  # ImageType DERIVED
    cfg = IngestConfig(skip_derived=False)
    (ref,) = scan(pydicom_test_files / "MR_small.dcm", cfg)
    (c,) = scan(pydicom_test_files / name, cfg)
    # One 64x64 slice: a 2D image, but it still carries a load plan (used for this comparison).
    assert (c.status, c.reason) == ("skipped", reasons.IMAGE_2D)
    a, b = load(ref, cfg), load(c, cfg)
    assert a.array.shape == (64, 64, 1)
    np.testing.assert_array_equal(b.array, a.array)
    np.testing.assert_allclose(b.affine, a.affine)
    expected = pydicom.dcmread(pydicom_test_files / "MR_small.dcm").pixel_array.T
    np.testing.assert_array_equal(a.array[:, :, 0], expected)


def test_no_decoder_reported_when_plugin_missing(pydicom_test_files, monkeypatch):
    cfg = IngestConfig(skip_derived=False)
    (c,) = scan(pydicom_test_files / "MR_small_jp2klossless.dcm", cfg)
    monkeypatch.setattr(
        ingest_dicom, "decoder_available", lambda ts: not ts.startswith("1.2.840.10008.1.2.4.9")
    )
    with pytest.raises(SeriesError) as err:
        load(c, cfg)
    assert err.value.reason == reasons.NO_DECODER and "pylibjpeg-openjpeg" in err.value.detail


@pytest.mark.parametrize(
    "name, status, reason",
    [
        ("MR_truncated.dcm", "failed", reasons.UNREADABLE),
        ("rtplan.dcm", "skipped", reasons.NOT_IMAGE),
        ("rtstruct.dcm", "skipped", reasons.NOT_IMAGE),
        ("reportsi.dcm", "skipped", reasons.NOT_IMAGE),
        ("rtdose.dcm", "skipped", reasons.NOT_IMAGE),
    ],
)
def test_broken_and_non_image_objects(pydicom_test_files, name, status, reason):
    (c,) = scan(pydicom_test_files / name, IngestConfig())
    assert (c.status, c.reason) == (status, reason), c.detail
    assert name in c.detail


def test_nibabel_siemens_mosaic_pair(nibabel_test_data, tmp_path):
    """0.dcm/1.dcm are Siemens MOSAIC files (ImageType ...MOSAIC): each 256x256 image tiles many
    slices, so stacking the two files is wrong; ingest fails them whatever min_slices is."""
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(nibabel_test_data / name, tmp_path / name)
    for cfg in (IngestConfig(), IngestConfig(min_slices=2)):
        (c,) = scan(tmp_path, cfg)
        assert (c.status, c.reason) == ("failed", reasons.MULTIFRAME_UNSUPPORTED)


def test_nibabel_oblique_pair_as_plain_slices_matches_simpleitk(nibabel_test_data, tmp_path):
    """The same two oblique files with MOSAIC removed from ImageType: a real 2-slice oblique stack."""
    for name in ("0.dcm", "1.dcm"):
        ds = pydicom.dcmread(nibabel_test_data / name)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.save_as(tmp_path / name)
    (c,) = scan(tmp_path, IngestConfig())
    assert (c.status, c.reason) == ("skipped", reasons.TOO_FEW_SLICES)
    cfg = IngestConfig(min_slices=2)
    (c,) = scan(tmp_path, cfg)
    assert c.status == "ok"
    img = load(c, cfg)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    ref = reader.Execute()
    assert img.array.shape == (256, 256, 2)
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(ref).T)
    # SimpleITK's direction is orthonormal (it keeps only the spacing along the normal); ours keeps
    # the exact step between the two positions. They agree on every in-plane axis and on both slices.
    ras = affine_from_itk(ref.GetDirection(), ref.GetSpacing(), ref.GetOrigin())
    np.testing.assert_allclose(img.affine[:3, [0, 1, 3]], ras[:3, [0, 1, 3]], atol=1e-4)
    for idx in [(0, 0, 0), (255, 0, 1), (100, 200, 1)]:
        world = np.asarray(ref.TransformIndexToPhysicalPoint(idx)) * [-1, -1, 1]
        np.testing.assert_allclose(apply_affine(img.affine, np.array(idx, float)), world, atol=0.02)


def test_jpeg_lossless_and_12_bit_extended_decode_with_the_default_install(pydicom_test_files):
    """JPEG Lossless (.70, the common lossless syntax of CT archives) and 12-bit JPEG Extended (.51)
    decode without the GPL libjpeg: pydicom's GDCM plugin, or GDCM directly where pydicom refuses."""
    for ts in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.51"):
        assert ingest_dicom.decoder_available(ts), ts
    lossy = ingest_dicom._read_pixels(pydicom_test_files / "JPEG-lossy.dcm")
    assert lossy.shape == (1024, 256) and lossy[420, 140] == 244 and lossy[230, 120] == 95  # pydicom's reference
    rgb = pydicom_test_files / "SC_rgb_jpeg_gdcm.dcm"  # JPEG Lossless SV1
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(rgb)))  # (1, rows, cols, 3): one frame
    np.testing.assert_array_equal(ingest_dicom._read_pixels(rgb), expected[0])
