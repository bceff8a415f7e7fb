"""Ingest of synthetic DICOM series with one acquisition defect each (written with write_series)."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from preprocess import reasons
from preprocess.geometry import affine_from_dicom, affine_from_itk, apply_affine
from preprocess.ingest import IngestConfig, content_hash, load, scan
from preprocess.ingest import dicom as ingest_dicom
from vol3d.synth.dicom_writer import generate_uid, slice_positions, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PS = (0.7, 0.8)  # (row spacing, column spacing)
NX, NY, NZ = 6, 5, 10
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-42",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
}
CFG = IngestConfig()


def _study() -> dict[str, str]:
    return {"StudyInstanceUID": generate_uid(), "AccessionNumber": "ACC-7"}


def _volume(seed: int = 0, nz: int = NZ) -> np.ndarray:
    """Integer HU ``(X, Y, Z)`` exactly representable with the writer's default rescale."""
    return np.random.default_rng(seed).integers(-1000, 1000, size=(NX, NY, nz)).astype(np.float32)


def _write(out: Path, vol: np.ndarray, positions: np.ndarray | None = None, **kw) -> list[Path]:
    kw.setdefault("orientation", AXIAL)
    kw.setdefault("pixel_spacing", PS)
    kw.setdefault("study", _study())
    if positions is None:
        positions = slice_positions((-10.0, -20.0, 30.0), (0.0, 0.0, 2.5), vol.shape[2])
    return write_series(out, vol, positions_lps=positions, patient=PATIENT, **kw)


def _only(cands, status: str | None = None):
    rows = [c for c in cands if c.kind == "dicom"]
    assert len(rows) == 1, [(c.status, c.reason, c.source) for c in cands]
    if status is not None:
        assert rows[0].status == status, (rows[0].reason, rows[0].detail)
    return rows[0]


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK/GDCM's reading of a series folder: array ``(X, Y, Z)`` and RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    affine = affine_from_itk(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    return sitk.GetArrayFromImage(img).T.astype(np.float32), affine


def _assert_like_sitk(folder: Path, image) -> None:
    arr, aff = _sitk_read(folder)
    np.testing.assert_allclose(image.affine, aff, atol=1e-3)
    np.testing.assert_array_equal(image.array, arr)


def test_regular_series_exact_pixels_affine_and_identity(tmp_path):
    vol = _volume()
    study = _study()
    _write(tmp_path / "s", vol, study=study, series_uid="1.2.3.4")
    c = _only(scan(tmp_path, CFG), "ok")
    assert c.key == "1.2.3.4" and c.modality == "CT" and c.label == "CT 6x5x10"
    assert c.identity.patient_id == "PID-42" and c.identity.accession == "ACC-7"
    assert c.identity.study_uid == study["StudyInstanceUID"]
    text = c.key + c.detail + c.label + " ".join(c.source) + str(c.extra)
    assert "PID-42" not in text and "Doe" not in text and "ACC-7" not in text
    img = load(c, CFG)
    assert img.array.dtype == np.float32 and img.array.shape == (NX, NY, NZ)
    np.testing.assert_array_equal(img.array, vol)
    expected = affine_from_dicom((-10, -20, 30), AXIAL, PS, (0, 0, 2.5))
    np.testing.assert_allclose(img.affine, expected, atol=1e-6)
    # voxel (i, j, k) = (column, row, slice) lands where DICOM says: IPP + i*dc*row + j*dr*col (LPS -> RAS)
    world = apply_affine(img.affine, np.array([2.0, 3.0, 4.0]))
    np.testing.assert_allclose(world, [-(-10 + 2 * 0.8), -(-20 + 3 * 0.7), 30 + 4 * 2.5], atol=1e-6)
    _assert_like_sitk(tmp_path / "s", img)


def test_shuffled_instance_numbers_sorted_by_position(tmp_path):
    vol = _volume(1)
    order = [7, 2, 9, 1, 10, 4, 3, 8, 6, 5]
    _write(tmp_path / "s", vol, instance_order=order)
    img = load(_only(scan(tmp_path, CFG), "ok"), CFG)
    np.testing.assert_array_equal(img.array, vol)


def test_feet_first_stack_sorted_along_normal(tmp_path):
    vol = _volume(2)
    pos = slice_positions((0.0, 0.0, 100.0), (0.0, 0.0, -2.5), NZ)
    _write(tmp_path / "s", vol, pos)
    img = load(_only(scan(tmp_path, CFG), "ok"), CFG)
    np.testing.assert_array_equal(img.array, vol[:, :, ::-1])
    np.testing.assert_allclose(img.affine, affine_from_dicom(pos[-1], AXIAL, PS, (0, 0, 2.5)), atol=1e-6)
    _assert_like_sitk(tmp_path / "s", img)


@pytest.mark.parametrize("angle", [0.0, 20.0])
def test_coronal_and_oblique_acquisitions(tmp_path, angle):
    a = np.radians(angle)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([0.0, 0.0, -1.0])
    iop = tuple(np.round(np.concatenate([row, col]), 6))
    normal = np.cross(row, col)
    vol = _volume(3)
    pos = slice_positions((5.0, -40.0, 60.0), 3.0 * normal, NZ)
    _write(tmp_path / "s", vol, pos, orientation=iop)
    img = load(_only(scan(tmp_path, CFG), "ok"), CFG)
    np.testing.assert_array_equal(img.array, vol)
    _assert_like_sitk(tmp_path / "s", img)


def test_rescale_slope_two_applied_exactly_once(tmp_path):
    vol = (2 * np.random.default_rng(4).integers(0, 1500, size=(NX, NY, NZ)) - 1024).astype(np.float32)
    _write(tmp_path / "s", vol, rescale=(2.0, -1024.0))
    stored = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[0]).pixel_array
    img = load(_only(scan(tmp_path, CFG), "ok"), CFG)
    np.testing.assert_array_equal(img.array, vol)
    np.testing.assert_array_equal(img.array[:, :, 0].T, stored * 2.0 - 1024.0)
    _assert_like_sitk(tmp_path / "s", img)


def test_files_without_extension(tmp_path):
    vol = _volume(5)
    _write(tmp_path / "s", vol, extension="")
    c = _only(scan(tmp_path, CFG), "ok")
    assert all("." not in s.rsplit("/", 1)[-1] for s in c.source)
    np.testing.assert_array_equal(load(c, CFG).array, vol)


def test_zip_of_series_sources_relative_and_hash_by_content(tmp_path):
    vol = _volume(6)
    files = _write(tmp_path / "plain" / "s", vol)
    src = tmp_path / "in"
    src.mkdir()
    with zipfile.ZipFile(src / "export.zip", "w") as zf:
        for f in files:
            zf.write(f, f"series/{f.name}")
    (src / "notes.csv").write_text("a,b\n")
    cands = scan(src, CFG, workdir=tmp_path / "staging")
    c = _only(cands, "ok")
    assert c.source[0] == "export.zip!/series/IM0001.dcm"
    assert all(str(p).startswith(str(tmp_path / "staging")) for p in c.source_files)
    np.testing.assert_array_equal(load(c, CFG).array, vol)
    plain = _only(scan(tmp_path / "plain", CFG), "ok")
    assert content_hash(plain) == content_hash(c)  # same bytes, different paths
    assert [(x.reason, x.source) for x in cands if x.kind != "dicom"] == [
        (reasons.NOT_MEDICAL_FILE, ["notes.csv"])
    ]


def test_content_hash_detects_changed_file(tmp_path):
    _write(tmp_path / "s", _volume(7))
    c = _only(scan(tmp_path, CFG), "ok")
    before = content_hash(c)
    ds = pydicom.dcmread(c.source_files[3])
    ds.RescaleIntercept = "-1000"
    ds.save_as(c.source_files[3])
    assert content_hash(c) != before


def test_missing_slice_fails_or_resamples(tmp_path):
    x = np.arange(NX, dtype=np.float32)[:, None, None]
    z = np.arange(NZ, dtype=np.float32)[None, None, :]
    vol = np.broadcast_to(10 * x + 100 * z, (NX, NY, NZ)).astype(
        np.float32
    )  # linear in z: exact under linear interp
    files = _write(tmp_path / "s", vol)
    files[4].unlink()
    c = _only(scan(tmp_path, CFG), "failed")
    assert (
        c.reason == reasons.MISSING_SLICES and "1 missing slice" in c.detail and "uneven_policy" in c.detail
    )
    # the fix names the command-line flag as well as the config field
    assert "pass --ingest.uneven-policy resample (or ingest.uneven_policy: resample in the config)" in c.detail
    cfg = IngestConfig(uneven_policy="resample")
    c = _only(scan(tmp_path, cfg), "ok")
    img = load(c, cfg)
    assert img.flags == ["RESAMPLED_MISSING_SLICES"]
    assert img.array.shape == (NX, NY, NZ)
    np.testing.assert_allclose(img.array, vol, atol=1e-3)  # the gap is filled by interpolation
    np.testing.assert_allclose(
        img.affine, affine_from_dicom((-10, -20, 30), AXIAL, PS, (0, 0, 2.5)), atol=1e-6
    )


def test_uneven_spacing_fails_or_resamples_to_regular_grid(tmp_path):
    along = np.array([0, 2, 4, 6.5, 8.5, 10.5, 13, 15, 17, 19.5])
    vol = np.broadcast_to(along[None, None, :] * 3.0, (NX, NY, NZ)).astype(np.float32)  # value = 3 * z(mm)
    pos = np.stack([np.full(NZ, 1.0), np.full(NZ, 2.0), along], 1)
    _write(tmp_path / "s", vol, pos, rescale=(0.5, -1024.0))
    assert _only(scan(tmp_path, CFG), "failed").reason == reasons.UNEVEN_SLICE_SPACING
    cfg = IngestConfig(uneven_policy="resample")
    img = load(_only(scan(tmp_path, cfg), "ok"), cfg)
    assert img.flags == ["RESAMPLED_UNEVEN_SPACING"]
    steps = np.diff(
        apply_affine(
            img.affine, np.stack([np.zeros(img.array.shape[2])] * 2 + [np.arange(img.array.shape[2])], 1)
        ),
        axis=0,
    )
    assert np.allclose(steps, steps[0], atol=1e-9)  # regular grid
    assert abs(steps[0][2] * (img.array.shape[2] - 1) - 19.5) < 1e-6  # first and last slice kept
    z_mm = apply_affine(
        img.affine, np.stack([np.zeros(img.array.shape[2])] * 2 + [np.arange(img.array.shape[2])], 1)
    )[:, 2]
    np.testing.assert_allclose(img.array[0, 0, :], 3.0 * z_mm, atol=0.26)


def test_gantry_tilt_fails_or_resamples_orthogonal(tmp_path):
    tilt = 15.0
    step = np.array([0.0, 2.5 * np.tan(np.radians(tilt)), 2.5])
    pos = slice_positions((-2.0, -1.5, 0.0), step, NZ)
    # A linear function of world LPS coordinates: resampling it must give the function at the new voxels.
    ii, jj, kk = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(NZ), indexing="ij")
    world_y = pos[0, 1] + jj * PS[0] + kk * step[1]
    world_z = kk * step[2]
    vol = (4.0 * world_y + 2.0 * world_z).astype(np.float32)
    _write(tmp_path / "s", vol, pos, rescale=(0.01, -100.0), extra_tags={"GantryDetectorTilt": tilt})
    c = _only(scan(tmp_path, CFG), "failed")
    assert c.reason == reasons.GANTRY_TILT and "15.0 degrees" in c.detail and "tilt_policy" in c.detail
    cfg = IngestConfig(tilt_policy="resample")
    img = load(_only(scan(tmp_path, cfg), "ok"), cfg)
    assert img.flags == ["RESAMPLED_GANTRY_TILT"]
    np.testing.assert_allclose(img.affine[:3, 2], [0, 0, 2.5], atol=1e-6)  # slice axis now along the normal
    world = apply_affine(img.affine, np.stack([ii, jj, kk], -1).astype(float)) @ np.diag(
        [-1, -1, 1]
    )  # RAS -> LPS
    inside = img.array > img.array.min() + 1e-3
    inside &= (jj - kk * step[1] / PS[0] >= 0) & (jj - kk * step[1] / PS[0] <= NY - 1)
    expected = 4.0 * world[..., 1] + 2.0 * world[..., 2]
    assert inside.sum() > 50
    np.testing.assert_allclose(img.array[inside], expected[inside], atol=0.05)


def test_duplicate_positions_different_pixels_fail(tmp_path):
    vol = _volume(8)
    study = _study()
    pos = slice_positions((-10.0, -20.0, 30.0), (0.0, 0.0, 2.5), NZ)
    _write(tmp_path / "s", vol, pos, study=study, series_uid="1.2.9")
    _write(tmp_path / "s", vol[:, :, 3:4] + 5, pos[3:4], study=study, series_uid="1.2.9", file_prefix="DUP")
    c = _only(scan(tmp_path, CFG), "failed")
    assert c.reason == reasons.DUPLICATE_SLICES and "DUP0001.dcm" in c.detail and len(c.source) == NZ + 1


def test_identical_duplicates_keep_one_and_note(tmp_path):
    vol = _volume(9)
    files = _write(tmp_path / "s", vol)
    shutil.copy(files[2], tmp_path / "s" / "copy_of_3.dcm")
    c = _only(scan(tmp_path, CFG), "ok")
    assert len(c.source) == NZ + 1 and "copy_of_3.dcm" in c.detail and "duplicate" in c.detail
    np.testing.assert_array_equal(load(c, CFG).array, vol)


@pytest.mark.parametrize(
    "change, reason",
    [
        (
            {"orientation": (np.cos(0.09), np.sin(0.09), 0.0, -np.sin(0.09), np.cos(0.09), 0.0)},
            reasons.INCONSISTENT_ORIENTATION,
        ),
        ({"pixel_spacing": (0.9, 0.9)}, reasons.INCONSISTENT_SPACING),
        ({"shape": (NX + 2, NY, 1)}, reasons.INCONSISTENT_SHAPE),
    ],
)
def test_inconsistent_slice_fails_series(tmp_path, change, reason):
    vol = _volume(10)
    study = _study()
    _write(tmp_path / "s", vol, study=study, series_uid="1.2.10")
    odd = np.zeros(change.pop("shape", (NX, NY, 1)), np.float32)
    _write(tmp_path / "s", odd, np.array([[-10.0, -20.0, 30.0 + NZ * 2.5]]), study=study, series_uid="1.2.10",
           file_prefix="ODD", **change)  # fmt: skip
    c = _only(scan(tmp_path, CFG), "failed")
    assert c.reason == reason and "ODD0001.dcm" in c.detail and len(c.source) == NZ + 1


def test_scout_sharing_series_uid_is_separated(tmp_path):
    vol = _volume(11)
    study = _study()
    _write(tmp_path / "s", vol, study=study, series_uid="1.2.11")
    _write(tmp_path / "s", np.zeros((NX, NY, 1), np.float32), np.array([[0.0, 0.0, 0.0]]), study=study,
           series_uid="1.2.11", file_prefix="SCOUT", orientation=(1, 0, 0, 0, 0, -1))  # fmt: skip
    cands = scan(tmp_path, CFG)
    by_status = {c.status: c for c in cands}
    assert sorted(c.status for c in cands) == ["ok", "skipped"]
    assert by_status["skipped"].reason == reasons.LOCALIZER and by_status["skipped"].source == [
        "s/SCOUT0001.dcm"
    ]
    assert by_status["ok"].key == "1.2.11" and by_status["skipped"].key == "1.2.11@2"
    np.testing.assert_array_equal(load(by_status["ok"], CFG).array, vol)


def test_localizer_image_type_and_derived_policy(tmp_path):
    _write(tmp_path / "loc", _volume(12), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _write(tmp_path / "mpr", _volume(13), image_type=("DERIVED", "SECONDARY", "MPR"))
    rows = {c.source[0].split("/")[0]: c for c in scan(tmp_path, CFG)}
    assert (rows["loc"].status, rows["loc"].reason) == ("skipped", reasons.LOCALIZER)
    assert (rows["mpr"].status, rows["mpr"].reason) == ("skipped", reasons.DERIVED)
    assert "pass --no-ingest.skip-derived (or ingest.skip_derived: false in the config)" in rows["mpr"].detail
    rows = {c.source[0].split("/")[0]: c for c in scan(tmp_path, IngestConfig(skip_derived=False))}
    assert rows["mpr"].status == "ok" and rows["loc"].reason == reasons.LOCALIZER


def test_too_few_slices_and_unsupported_modality(tmp_path):
    _write(tmp_path / "short", _volume(14, nz=4))
    _write(tmp_path / "mr", _volume(15), modality="MR")
    rows = {c.source[0].split("/")[0]: c for c in scan(tmp_path, IngestConfig(modalities=("CT",)))}
    assert (rows["short"].status, rows["short"].reason) == ("skipped", reasons.TOO_FEW_SLICES)
    assert (rows["mr"].status, rows["mr"].reason) == ("skipped", reasons.UNSUPPORTED_MODALITY)
    assert "pass --ingest.min-slices 4 (or ingest.min_slices: 4 in the config)" in rows["short"].detail
    assert "pass --ingest.modalities CT MR (or ingest.modalities: [CT, MR] in the config)" in rows["mr"].detail
    assert scan(tmp_path / "short", IngestConfig(min_slices=4))[0].status == "ok"


def test_truncated_file_fails_series_at_scan(tmp_path):
    files = _write(tmp_path / "s", _volume(16))
    data = files[5].read_bytes()
    files[5].write_bytes(data[:-20])
    c = _only(scan(tmp_path, CFG), "failed")
    assert c.reason == reasons.UNREADABLE and "IM0006.dcm" in c.detail and "truncated" in c.detail


def test_compressed_series_decodes_or_reports_no_decoder(tmp_path, monkeypatch):
    from pydicom.uid import RLELossless

    vol = _volume(17)
    for f in _write(tmp_path / "s", vol):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(f)
    c = _only(scan(tmp_path, CFG), "ok")
    np.testing.assert_array_equal(load(c, CFG).array, vol)
    monkeypatch.setattr(ingest_dicom, "decoder_available", lambda ts: ts != RLELossless)
    bad = _only(scan(tmp_path, CFG), "failed")
    assert bad.reason == reasons.NO_DECODER and "pylibjpeg-rle" in bad.detail
    with pytest.raises(ingest_dicom.SeriesError) as err:
        load(c, CFG)
    assert err.value.reason == reasons.NO_DECODER


def _enhanced_ct(
    path: Path, vol: np.ndarray, positions: np.ndarray, slopes: list[float], per_frame: bool = True
) -> None:
    """An Enhanced CT Image Storage file with frames in the given (shuffled) order."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SeriesNumber = generate_uid(), generate_uid(), 3
    ds.PatientID = "PID-9"
    nz = vol.shape[2]
    ds.NumberOfFrames, ds.Rows, ds.Columns = nz, vol.shape[1], vol.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm, po = Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = list(PS), 2.5
    po.ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, stored = [], []
    for k in range(nz):
        item = Dataset()
        if per_frame:
            pp, pv = Dataset(), Dataset()
            pp.ImagePositionPatient = [float(v) for v in positions[k]]
            pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = slopes[k], -1024.0, "HU"
            item.PlanePositionSequence, item.PixelValueTransformationSequence = Sequence([pp]), Sequence([pv])
        frames.append(item)
        stored.append(np.rint((vol[:, :, k] + 1024.0) / slopes[k]).astype(np.int16).T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_ct_reads_per_frame_geometry(tmp_path):
    nz = 9
    rng = np.random.default_rng(18)
    vol = (rng.integers(0, 500, size=(NX, NY, nz)) * 2 - 1024).astype(np.float32)
    perm = rng.permutation(nz)
    sorted_pos = slice_positions((4.0, 5.0, -30.0), (0.0, 0.0, 1.25), nz)
    slopes = [1.0 if k % 2 else 2.0 for k in range(nz)]  # per-frame rescale differs
    _enhanced_ct(tmp_path / "enh.dcm", vol[:, :, perm], sorted_pos[perm], [slopes[p] for p in perm])
    c = _only(scan(tmp_path, CFG), "ok")
    img = load(c, CFG)
    np.testing.assert_array_equal(img.array, vol)
    np.testing.assert_allclose(
        img.affine, affine_from_dicom(sorted_pos[0], AXIAL, PS, (0, 0, 1.25)), atol=1e-6
    )
    (tmp_path / "enh.dcm").unlink()
    _enhanced_ct(tmp_path / "flat.dcm", vol, sorted_pos, slopes, per_frame=False)
    assert _only(scan(tmp_path, CFG), "failed").reason == reasons.MULTIFRAME_UNSUPPORTED


def test_candidate_loads_in_worker_process(tmp_path):
    vol = _volume(19)
    _write(tmp_path / "s", vol)
    c = pickle.loads(pickle.dumps(_only(scan(tmp_path, CFG), "ok")))
    with ProcessPoolExecutor(max_workers=1) as pool:
        img = pool.submit(load, c, CFG).result()
    np.testing.assert_array_equal(img.array, vol)


def test_scan_order_is_deterministic(tmp_path):
    for name in ("b", "a", "c"):
        _write(tmp_path / name, _volume(20), extension="")
    (tmp_path / "README.txt").write_text("hello")
    first = [(c.source, c.key, c.status) for c in scan(tmp_path, CFG)]
    assert first == [(c.source, c.key, c.status) for c in scan(tmp_path, CFG)]
    assert [s[0][0].split("/")[0] for s in first] == ["README.txt", "a", "b", "c"]


@pytest.mark.parametrize(("tag", "values", "label"), [
    ("DiffusionBValue", (0, 500, 1000), "b"),
    ("AcquisitionNumber", (1, 2), "acq"),
    ("EchoNumbers", (1, 2), "echo"),
])  # fmt: skip
def test_volumes_sharing_positions_split_into_one_row_each(tmp_path, tag, values, label):
    """A DWI series (b-values) or repeated acquisitions/echoes at the same positions: one volume per
    value, each with its own key, pixels and geometry (as dcm2niix splits them), not DUPLICATE_SLICES."""
    study, uid = _study(), generate_uid()
    vols = {v: _volume(seed=i) for i, v in enumerate(values)}
    for v, vol in vols.items():
        _write(tmp_path / "dwi", vol, study=study, series_uid=uid, file_prefix=f"V{v}_", extra_tags={tag: v})
    cands = [c for c in scan(tmp_path, CFG) if c.kind == "dicom"]
    assert sorted(c.key for c in cands) == sorted(f"{uid}#{label}={v}" for v in values)
    for c in cands:
        assert c.status == "ok", (c.reason, c.detail)
        value = int(c.key.rsplit("=", 1)[1])
        image = load(c, CFG)
        np.testing.assert_array_equal(image.array, vols[value])
        assert all(Path(p).name.startswith(f"V{value}_") for p in c.source_files)


def test_copies_at_the_same_positions_without_a_volume_tag_still_fail(tmp_path):
    study, uid = _study(), generate_uid()
    _write(tmp_path / "s", _volume(seed=1), study=study, series_uid=uid, file_prefix="A_")
    _write(tmp_path / "s", _volume(seed=2), study=study, series_uid=uid, file_prefix="B_")
    c = _only(scan(tmp_path, CFG), "failed")
    assert c.reason == reasons.DUPLICATE_SLICES


def test_series_are_selected_by_description_protocol_or_sequence(tmp_path):
    """An MR study of T1, T2 and FLAIR series: ingest.series_include keeps the ones a cohort wants; the
    others are skipped NOT_SELECTED, and the row does not repeat the description (it may hold identifiers)."""
    study = _study()
    for k, desc in enumerate(("T1 MPRAGE SAG", "t2_tse_tra", "FLAIR AX DOE")):
        _write(tmp_path / f"SE{k}", _volume(k), study=study, series_description=desc, modality="MR",
               series_number=k + 1)
    rows = {c.source[0].split("/")[0]: c for c in scan(tmp_path, IngestConfig(series_include=("*t1*", "*flair*")))
            if c.kind == "dicom"}
    assert {k: (c.status, c.reason) for k, c in rows.items()} == {
        "SE0": ("ok", ""), "SE1": ("skipped", reasons.NOT_SELECTED), "SE2": ("ok", "")}
    assert "t2_tse" not in rows["SE1"].detail and "series_include ['*t1*', '*flair*']" in rows["SE1"].detail
    assert all(c.status == "ok" for c in scan(tmp_path, CFG) if c.kind == "dicom")  # no patterns: every series
