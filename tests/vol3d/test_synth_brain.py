"""The synthetic head for MR: its anatomy, sequences, MR tags, bias field, reports and codes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from vol3d.synth import SynthConfig, brain, generate
from vol3d.synth import phantom as ph
from vol3d.synth.export import bias_field
from vol3d.tasks.findings import as_vocab
from vol3d.tasks.mentions import extract_findings


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("brain")
    truth = generate(out, SynthConfig(cases=10, seed=5, size="small", modality="mr", workers=1))
    return out, truth


def _dicom_volume(out: Path, series: dict) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """The stored values ``(X, Y, Z)`` of a DICOM series in the order of its truth affine."""
    dss = [pydicom.dcmread(out / f) for f in series["files"]]
    normal = np.cross(dss[0].ImageOrientationPatient[:3], dss[0].ImageOrientationPatient[3:])
    dss.sort(key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))
    return np.stack([d.pixel_array.T.astype(np.float32) for d in dss], axis=-1), dss


def test_mr_means_the_head_with_three_coregistered_sequences(export):
    out, truth = export
    assert truth["config"]["anatomy"] == "brain" and truth["labels"] == list(brain.LABELS)
    planes = set()
    for case in truth["cases"]:
        volumes = [s for s in case["series"] if s["role"] != "localizer"]
        assert [s["contrast"] for s in volumes] == ["T1", "T2", "FLAIR"]
        assert volumes[0]["role"] == "volume" and case["key"] == volumes[0]["key"]
        planes.add(volumes[0]["plane"])
        # anisotropic 2D sequences: thicker slices than in-plane pixels
        for s in volumes[1:]:
            spacing = np.linalg.norm(np.asarray(s["affine_ras"])[:3, :3], axis=0)
            assert spacing[2] >= 1.3 * spacing[:2].max()
    assert len(planes) >= 2  # not every T1 is axial
    vocab = json.loads((out / "vocab.json").read_text())
    assert set(vocab["findings"]) == set(brain.FINDINGS) and vocab["labels"] == list(brain.LABELS)


def test_dicom_series_carry_mr_tags_and_share_the_frame_of_reference(export):
    out, truth = export
    case = next(c for c in truth["cases"] if c["format"] == "dicom")
    frames = set()
    for s in case["series"]:
        if s["role"] == "localizer":
            continue
        ds = pydicom.dcmread(out / s["files"][0])
        assert ds.Modality == "MR" and ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert s["contrast"] in ds.SeriesDescription
        for tag in ("SequenceName", "EchoTime", "RepetitionTime", "MagneticFieldStrength", "ScanningSequence",
                    "MRAcquisitionType", "ImagedNucleus"):
            assert tag in ds, tag
        assert float(ds.EchoTime) == float(brain_te(s["contrast"]))
        assert ("InversionTime" in ds) == (s["contrast"] in ("T1", "FLAIR"))
        frames.add(ds.FrameOfReferenceUID)
    assert len(frames) == 1


def brain_te(contrast: str) -> str:
    from vol3d.synth.export import MR_SEQUENCES

    return str(MR_SEQUENCES[contrast]["EchoTime"])


def test_each_sequence_shows_its_contrast(export):
    """T1: white matter brighter than grey, CSF dark; T2: CSF brightest, white matter darker than grey;
    FLAIR: CSF dark and lesions bright, as on real scanners (medians inside eroded label regions)."""
    out, truth = export
    v = {name: value for value, name in enumerate(brain.LABELS)}
    seen_lesion = 0
    for case in truth["cases"]:
        for s in case["series"]:
            if s["role"] == "localizer" or case["format"] != "dicom":
                continue
            img, _ = _dicom_volume(out, s)
            lab = np.asarray(nib.load(out / s["labels"]).dataobj)
            med = {k: float(np.median(img[lab == v[k]])) for k in ("grey_matter", "white_matter_left", "ventricles")
                   if (lab == v[k]).sum() > 20}
            if len(med) < 3:
                continue
            wm, gm, csf = med["white_matter_left"], med["grey_matter"], med["ventricles"]
            if s["contrast"] == "T1":
                assert wm > gm > csf
            elif s["contrast"] == "T2":
                assert csf > gm > wm
            else:
                assert gm > wm > csf
            lesions = lab == v["lesion"]
            if s["contrast"] == "FLAIR" and lesions.sum() > 10:
                assert np.median(img[lesions]) > 1.3 * wm
                seen_lesion += 1
    assert seen_lesion >= 1


def test_series_have_their_own_scale_and_a_smooth_bias(export):
    out, truth = export
    gains = []
    for case in truth["cases"]:
        if case["format"] != "dicom":
            continue
        s = next(s for s in case["series"] if s["contrast"] == "T1")
        img, _ = _dicom_volume(out, s)
        lab = np.asarray(nib.load(out / s["labels"]).dataobj)
        gains.append(float(np.median(img[lab == brain.LABELS.index("white_matter_left")])))
    assert max(gains) > 1.5 * min(gains)  # arbitrary units: one tissue, very different values per series
    pts = np.stack(np.meshgrid(*[np.linspace(-80, 80, 9)] * 3, indexing="ij"), axis=-1)
    field = bias_field((0.1, -0.05, 0.08, 0.03, 0.02, -0.04, 0.01, 0.0, 0.02), pts, (0, 0, 0))
    assert 0.7 < field.min() < 1.0 < field.max() < 1.4
    assert field[4, 4, 4] == pytest.approx(1.0)


def test_reports_and_codes_follow_the_findings(export):
    out, truth = export
    vocab = as_vocab(brain.VOCAB_FINDINGS)
    n_found = 0
    for case in truth["cases"]:
        kinds = {f["finding"] for f in case["findings"]}
        text = case["report"]["findings"] + " " + case["report"]["impression"]
        read = extract_findings(text, vocab)
        assert {k for k, present in read.items() if present} == kinds, text
        codes = {brain.FINDINGS[k]["code"] for k in kinds}
        assert codes <= set(case["codes"])
        n_found += len(kinds)
        for f in case["findings"]:
            if f["finding"] == "hydrocephalus":
                assert f["report_sizes_mm"][0] > 40  # the vocabulary's criterion, "volume > 40 mL"
    assert n_found >= 4


def test_hydrocephalus_marks_both_ventricles_and_passes_its_criterion():
    rng = np.random.default_rng(3)
    normal = brain.sample_anatomy(rng, ())
    big = brain.sample_anatomy(np.random.default_rng(3), ("hydrocephalus",))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -100
    vol = {}
    for name, anatomy in (("normal", normal), ("big", big)):
        finding = ph.Finding("hydrocephalus", "ventricles", None)
        tissue, instances, _ = ph.render(anatomy, [finding], affine, (100, 100, 100))
        ventricles = tissue == brain.ATLAS.tissue_index["ventricles"]
        assert (instances == 1).sum() == ventricles.sum() > 0  # the whole organ: both lateral ventricles
        left = ventricles[:50].sum()
        assert 0.3 < left / ventricles.sum() < 0.7
        vol[name] = ventricles.sum() * 8 / 1000
    assert vol["normal"] < 40 < vol["big"]


def test_ct_of_the_head_is_available_and_abdomen_mr_still_is(tmp_path):
    truth = generate(tmp_path / "ct", SynthConfig(cases=3, seed=1, size="small", modality="ct", anatomy="brain",
                                                  nifti_fraction=0.0, workers=1))
    s = truth["cases"][0]["series"][0]
    ds = pydicom.dcmread(tmp_path / "ct" / s["files"][0])
    assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
    truth = generate(tmp_path / "mr", SynthConfig(cases=3, seed=1, size="small", modality="mr", anatomy="abdomen",
                                                  workers=1))
    assert truth["labels"] == list(ph.LABELS)
    assert {s["contrast"] for c in truth["cases"] for s in c["series"]} == {"T1"}  # one sequence, its recons too
