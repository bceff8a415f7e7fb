"""ingest.sequence_channels: the MR sequences of a study as the channels of one case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the cache's Blosc codec)
import numpy as np
import pytest

from preprocess import reasons
from preprocess.config import PreprocessConfig
from preprocess.config_io import load_yaml
from preprocess.errors import ConfigError
from preprocess.ingest.channels import combine, stack
from preprocess.ingest.config import IngestConfig
from preprocess.runner import RunOptions, run_preprocess
from preprocess.sidecars import SideTables
from preprocess.types import Candidate, Identity, Image, SeriesError
from vol3d.presets import preset_path
from vol3d.synth import SynthConfig, brain, generate

PATTERNS = ("t1*", "t2*", "flair*")


def _cand(study: str, desc: str, src: str, status: str = "ok") -> Candidate:
    return Candidate(kind="nifti", source=[src], key=Path(src).stem, identity=Identity(study_uid=study),
                     modality="MR", status=status, label="MR 8x8x8", source_files=[Path("/x") / src],
                     names=(desc, "", ""))


def test_each_complete_study_becomes_one_case_keyed_by_its_first_channel():
    rows = [
        _cand("S1", "FLAIR AX", "s1/flair.nii"), _cand("S1", "T1 MPRAGE", "s1/t1.nii"),
        _cand("S1", "T2 TSE", "s1/t2.nii"), _cand("S1", "DWI b1000", "s1/dwi.nii"),
        _cand("S2", "T1 MPRAGE", "s2/t1.nii"), _cand("S2", "T2 TSE", "s2/t2.nii"),  # no FLAIR
        _cand("S3", "T1 pre", "s3/t1a.nii"), _cand("S3", "T1 post", "s3/t1b.nii"),
        _cand("S3", "T2", "s3/t2.nii"), _cand("S3", "FLAIR", "s3/fl.nii"),
        _cand("S4", "T1", "s4/t1.nii", status="failed"),
    ]
    out = combine(rows, PATTERNS)
    ok = [c for c in out if c.status == "ok"]
    assert len(ok) == 1
    case = ok[0]
    assert case.key == "t1" and case.source == ["s1/t1.nii", "s1/t2.nii", "s1/flair.nii"]
    assert [o.source for o in case.extra["channels"]] == [["s1/t2.nii"], ["s1/flair.nii"]]
    assert case.source_files == [Path("/x") / s for s in case.source]  # every channel's bytes are hashed
    by_src = {c.source[0]: c for c in out if c.status != "ok"}
    assert by_src["s1/dwi.nii"].reason == reasons.NOT_SELECTED
    assert {by_src[s].reason for s in ("s2/t1.nii", "s2/t2.nii")} == {reasons.MISSING_CHANNEL}
    assert "'flair*'" in by_src["s2/t1.nii"].detail and "leave its pattern out" in by_src["s2/t1.nii"].detail
    assert {by_src[s].reason for s in ("s3/t1a.nii", "s3/t1b.nii", "s3/t2.nii", "s3/fl.nii")} == {
        reasons.AMBIGUOUS_CHANNEL}
    assert "narrow the pattern" in by_src["s3/t1a.nii"].detail
    assert by_src["s4/t1.nii"].reason == "" and by_src["s4/t1.nii"].status == "failed"  # passed through
    for c in out:  # a description may name the patient: never in a detail
        assert "MPRAGE" not in c.detail and "TSE" not in c.detail
    assert sum(len(c.source) for c in out) == sum(len(c.source) for c in rows)  # no file lost


def test_stack_resamples_through_world_coordinates():
    """A linear field in world mm, sampled on two different grids (spacing, rotation, offset): the second
    grid's samples resampled onto the first equal the field there (trilinear is exact for linear fields)."""
    def field(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        return (100 + 2 * world[..., 0] - world[..., 1] + 0.5 * world[..., 2]).astype(np.float32)

    ref_aff = np.diag([2.0, 2.0, 3.0, 1.0])
    ref_aff[:3, 3] = (-30, -30, -30)
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    other_aff = np.eye(4)
    other_aff[:3, :3] = rot @ np.diag([1.0, 1.0, 5.0])
    centre = ref_aff[:3, :3] @ np.array([14.5, 14.5, 9.5]) + ref_aff[:3, 3]
    other_aff[:3, 3] = centre - other_aff[:3, :3] @ np.array([59.5, 59.5, 9.5])  # a 120 mm square, same centre
    ref = Image(field(ref_aff, (30, 30, 20)), ref_aff, "MR")
    other = Image(field(other_aff, (120, 120, 20)), other_aff, "MR", flags=["OBLIQUE"])
    out = stack(ref, [other])
    assert out.array.shape == (2, 30, 30, 20) and out.flags == ["OBLIQUE"]
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(out.array[1][inner], ref.array[inner], atol=0.5)
    far = other_aff.copy()
    far[:3, 3] += 500  # another region altogether
    with pytest.raises(SeriesError, match="do not image the same region"):
        stack(ref, [Image(other.array, far, "MR")])


def test_bad_patterns_are_refused():
    with pytest.raises(ConfigError, match="twice"):
        IngestConfig(sequence_channels=("t1*", "T1*"))


def test_hash_is_unchanged_without_channels():
    assert "sequence_channels" not in PreprocessConfig().hashed_fields()["ingest"]  # caches made before keep their hash
    assert PreprocessConfig().params_hash() != PreprocessConfig(
        ingest=IngestConfig(sequence_channels=PATTERNS)).params_hash()


@pytest.fixture(scope="module")
def brain_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("seq")
    export = root / "export"
    truth = generate(export, SynthConfig(cases=5, seed=2, size="small", modality="mr", workers=1))
    # one DICOM study loses its FLAIR: its T1 and T2 must say so, nothing else of it is cached
    def folder(case: dict, contrast: str) -> Path:
        return Path(next(s for s in case["series"] if s["contrast"] == contrast)["files"][0]).parent

    lost = next(c for c in truth["cases"] if c["format"] == "dicom" and folder(c, "FLAIR") != folder(c, "T1"))
    shutil.rmtree(export / folder(lost, "FLAIR"))
    cfg = load_yaml(PreprocessConfig, preset_path("tiny_mr", kind="preprocess"))
    cfg.workers = 1
    side = SideTables.load(reports=export / "reports.csv", codes=export / "ehr_codes.csv", boxes=export / "boxes.json",
                           labels=export / "labels", lesions=export / "lesions", vocab=export / "vocab.json")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VOL3D_ID_KEY", "passphrase:a key for the sequence channel tests")
        run_preprocess(export, cache, cfg, side, RunOptions(progress=False))
    return cache, export, {"truth": truth, "lost": lost}


def test_a_brain_export_caches_one_three_channel_case_per_study(brain_cache):
    cache, _, info = brain_cache
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(info["truth"]["cases"]) - 1
    missing = [r for r in rows if r["reason"] == reasons.MISSING_CHANNEL]
    assert len(missing) == 2 and all("'flair*'" in r["detail"] for r in missing)
    lesion = brain.LABELS.index("lesion")
    wm = brain.LABELS.index("white_matter_left")
    checked = 0
    for r in ok:
        with h5py.File(cache / r["h5"]) as f:
            g = f[r["key"]]
            img, lab = g["image"][...].astype(np.float32), g["label"][...]
        assert img.shape == (3, 64, 64, 32)
        # the T1's labels fit every channel: ventricles are dark on T1 and FLAIR, bright on T2
        vent = lab == brain.LABELS.index("ventricles")
        white = lab == wm
        assert img[0][vent].mean() < img[0][white].mean() and img[1][vent].mean() > img[1][white].mean()
        assert img[2][vent].mean() < img[2][white].mean()
        if (lab == lesion).sum() >= 4:  # lesions stand out on FLAIR, not on T1, wherever the T1's labels say
            flair = img[2][lab == lesion].mean() - img[2][white].mean()
            t1 = img[0][lab == lesion].mean() - img[0][white].mean()
            assert flair > 0.02 and flair > t1 + 0.05
            checked += 1
    assert checked >= 1
