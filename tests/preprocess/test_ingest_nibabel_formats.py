"""Every volume format nibabel reads (MGH/MGZ, MINC 1/2, PAR/REC, AFNI, Analyze/NIfTI pairs) is ingested
with nibabel's own pixels and affine, and neuroimaging files that are not volumes say what they are.
Checked on nibabel's test corpus (its tests/data) and on pairs written here."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocess import reasons
from preprocess.ingest import IngestConfig, load, scan

NIBABEL_FORMATS = (".par", ".mnc", ".head", ".hdr", ".mgz")


@pytest.fixture(scope="module")
def corpus(nibabel_test_data: Path):
    cfg = IngestConfig(min_slices=1)
    return scan(nibabel_test_data, cfg), cfg


def _suffix(c) -> str:
    return Path(c.source[-1] if c.kind == "afni" else c.source[0]).suffix.lower()


def test_no_nibabel_format_is_called_not_medical_and_every_file_has_a_row(corpus, nibabel_test_data):
    rows, _ = corpus
    named = {s for c in rows for s in c.source}
    # nothing silently dropped (dot files are ignored by rule)
    assert {p.name for p in nibabel_test_data.iterdir() if p.is_file() and not p.name.startswith(".")} <= named
    wrong = [c.source for c in rows if c.reason == reasons.NOT_MEDICAL_FILE
             and any(s.lower().endswith(NIBABEL_FORMATS) for s in c.source)]
    assert not wrong
    ok = {c.kind for c in rows if c.status == "ok"}
    assert {"mgh", "minc", "parrec", "afni"} <= ok
    assert sum(c.kind == "minc" and c.status == "ok" for c in rows) == 10  # MINC 1 and 2, every one
    # a header whose data file is missing (nibabel ships 29 PAR headers alone) names the file to copy
    alone = next(c for c in rows if c.source == ["T1.PAR"])
    assert alone.status == "failed" and alone.reason == reasons.UNREADABLE and "(T1.REC) is not next to it" in alone.detail
    afni = next(c for c in rows if c.source == ["bad_datatype+orig.HEAD"])
    assert "bad_datatype+orig.BRIK or bad_datatype+orig.BRIK.gz" in afni.detail
    truncated = next(c for c in rows if c.source[0] == "phantom_truncated.PAR")
    assert truncated.status == "failed" and "phantom_truncated.PAR cannot be read" in truncated.detail


@pytest.mark.parametrize("name, what", [("simple.trk", "TrackVis tractogram"), ("standard.tck", "MRtrix tractogram"),
                                        ("row_major.dconn.nii", "CIFTI-2")])
def test_non_volumes_say_what_they_are(corpus, name, what):
    row = next(c for c in corpus[0] if c.source == [name])
    assert row.status == "skipped" and row.reason == reasons.NOT_IMAGE
    assert what in row.detail and "not an image volume" in row.detail


def test_every_ok_volume_has_nibabels_pixels_and_affine(corpus, nibabel_test_data):
    rows, cfg = corpus
    checked = set()
    for c in rows:
        if c.status != "ok" or c.kind not in ("mgh", "minc", "parrec", "afni"):
            continue
        header = nibabel_test_data / c.source[c.extra.get("file", 0)]
        ref = nib.load(header, scaling="dv") if c.kind == "parrec" else nib.load(header)
        data = np.asarray(ref.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., c.extra.get("volume", 0)]
        image = load(c, cfg)
        np.testing.assert_allclose(image.array, data, rtol=1e-6, err_msg=str(c.source))
        np.testing.assert_allclose(image.affine, ref.affine, atol=1e-6, err_msg=str(c.source))
        assert image.modality == ("MR" if c.kind == "parrec" else "")
        checked.add(c.kind)
    assert checked == {"mgh", "minc", "parrec", "afni"}


def test_par_rec_scaling_is_a_choice(nibabel_test_data, tmp_path):
    for ext in (".PAR", ".REC"):
        shutil.copy(nibabel_test_data / f"phantom_varscale{ext}", tmp_path / f"scan{ext}")
    arrays = {}
    for scaling in ("dv", "fp"):
        cfg = IngestConfig(min_slices=1, parrec_scaling=scaling)
        (c,) = [r for r in scan(tmp_path, cfg) if r.status == "ok"]
        arrays[scaling] = load(c, cfg).array
        ref = np.asarray(nib.load(tmp_path / "scan.PAR", scaling=scaling).dataobj, np.float32)[..., 0]
        np.testing.assert_allclose(arrays[scaling], ref, rtol=1e-6)
    assert not np.allclose(arrays["dv"], arrays["fp"])
    with pytest.raises(Exception, match="parrec_scaling"):
        IngestConfig(parrec_scaling="raw")


def test_analyze_pairs_need_an_orientation(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    nib.AnalyzeImage(data, affine).to_filename(tmp_path / "plain.hdr")  # Analyze 7.5: no orientation
    nib.Spm2AnalyzeImage(data, affine).to_filename(tmp_path / "spm.hdr")  # SPM writes spm.mat beside it
    pair = nib.Nifti1Pair(data, affine)
    pair.set_sform(affine, code=1)
    pair.to_filename(tmp_path / "pair.hdr")  # a NIfTI pair: pair.hdr + pair.img, with its sform
    cfg = IngestConfig(min_slices=1)
    rows = {c.key: c for c in scan(tmp_path, cfg)}
    assert (tmp_path / "spm.mat").is_file() and set(rows) == {"plain", "spm", "pair"}
    assert rows["plain"].status == "failed" and rows["plain"].reason == reasons.NO_ORIENTATION
    assert "Analyze 7.5 image, a format without orientation" in rows["plain"].detail
    for key in ("spm", "pair"):
        files = [f"{key}.hdr", f"{key}.img"] + ([f"{key}.mat"] if key == "spm" else [])
        assert rows[key].status == "ok" and sorted(rows[key].source) == files
        image = load(rows[key], cfg)
        np.testing.assert_array_equal(image.array, data.astype(np.float32))
        np.testing.assert_allclose(image.affine, nib.load(tmp_path / f"{key}.hdr").affine, atol=1e-6)
