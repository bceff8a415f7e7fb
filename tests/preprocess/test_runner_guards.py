"""What ``vol3d preprocess`` refuses or words carefully: a second run on one cache, an input
without images, unexpected errors, side data that does not fit; and tight boxes on an oblique
synthetic series when lesion instance maps are given (``--lesions``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocess import geometry
from preprocess.runner import LOCK_NAME, RunOptions, run_preprocess
from preprocess.sidecars import SideTables
from preprocess.store import read_case
from vol3d.cli import main

REPO = Path(__file__).resolve().parents[2]
KEY = "13579bdf02468ace" * 4


@pytest.fixture(autouse=True)
def _id_key(monkeypatch):
    monkeypatch.setenv("VOL3D_ID_KEY", KEY)


def _tiny_cfg():
    from preprocess.config import PreprocessConfig
    from preprocess.config_io import load_yaml

    return load_yaml(PreprocessConfig, REPO / "configs/preprocess/tiny.yaml")


def _one_nifti(root: Path, stem: str = "case00") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    arr = np.full((24, 20, 16), -1000.0, np.float32)
    arr[4:20, 4:16, 3:13] = 40.0
    img = nib.Nifti1Image(arr, np.diag([3.0, 3.0, 4.0, 1.0]))
    img.set_sform(img.affine, code=1)
    nib.save(img, root / f"{stem}.nii.gz")
    return root / f"{stem}.nii.gz"


def test_a_second_run_on_the_same_cache_exits_2_naming_the_first(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "cache"
    _one_nifti(src)
    holder = subprocess.Popen(  # another process holding the cache, as a running preprocess does
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from preprocess.runner import cache_lock\n"
         "with cache_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["preprocess", str(src), "--out", str(out), "--preset", "tiny", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"another vol3d preprocess (pid {holder.pid}) is writing {out}" in err and "another --out" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of the cache was touched
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder (even killed): the next run goes ahead
    assert main(["preprocess", str(src), "--out", str(out), "--preset", "tiny", "--no-progress"]) == 0
    assert (out / "manifest.jsonl").is_file()


def test_an_input_without_images_exits_2(tmp_path, capsys):
    src = tmp_path / "notes"
    src.mkdir()
    for name in ("readme.txt", "report.pdf", "list.csv"):
        (src / name).write_text("no image here")
    out = tmp_path / "cache"
    assert main(["preprocess", str(src), "--out", str(out), "--preset", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"no image found under {src} (3 files looked at: 3 NOT_MEDICAL_FILE)" in err and "check the path" in err
    assert not (out / "manifest.jsonl").exists() and not (out / "params.json").exists()


def test_unexpected_error_detail_is_generic_and_its_traceback_is_sanitised(tmp_path, monkeypatch, caplog):
    src = tmp_path / "src"
    path = _one_nifti(src, stem="1.2.840.99.7")  # a UID-like key, as a converted series may have

    def boom(*args, **kwargs):
        raise RuntimeError(f"cannot process {path.resolve()} (series 1.2.840.99.7)")

    monkeypatch.setattr("preprocess.transforms.prepare", boom)
    with caplog.at_level(logging.DEBUG, logger="preprocess.runner"):
        summary = run_preprocess(src, tmp_path / "cache", _tiny_cfg(), opts=RunOptions(workers=1, progress=False))
    assert summary.counts["failed"] == 1
    (row,) = [json.loads(line) for line in (tmp_path / "cache/manifest.jsonl").read_text().splitlines()]
    assert (row["reason"], row["detail"]) == ("PROCESSING_ERROR", "unexpected RuntimeError; rerun with -v and report it")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "Traceback" in r.getMessage()]
    assert debug and "RuntimeError: cannot process" in debug[0]
    # the absolute path became the source's keyed name (the manifest's), the key outside it became <id>
    assert f"cannot process {row['source'][0]} (series <id>)" in debug[0] and str(tmp_path) not in debug[0]
    assert row["source"][0].startswith("h_") and "1.2.840.99.7" not in debug[0]
    assert 'File "<path>/runner.py"' in debug[0]  # code files keep their names


def test_label_that_does_not_fit_names_the_series_by_its_source_path(tmp_path):
    src, labels = tmp_path / "src", tmp_path / "labels"
    _one_nifti(src, stem="case00")
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 15), np.uint8), np.diag([3.0, 3.0, 4.0, 1.0])), labels / "case00.nii.gz")
    side = SideTables.load(labels=labels)
    for redact in (False, True):
        out = tmp_path / f"cache{redact}"
        run_preprocess(src, out, _tiny_cfg(), side, RunOptions(workers=1, progress=False, redact_paths=redact))
        (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert row["reason"] == "LABEL_MISMATCH"
        assert row["detail"].startswith(f"the label map joined to {row['source'][0]} does not fit it: ")
        assert "grid (24, 20, 15) does not match image grid (24, 20, 16)" in row["detail"]
        assert ("case00" in row["detail"]) is not redact and str(tmp_path) not in row["detail"]


def _oblique_synth_case(root: Path) -> tuple[Path, dict]:
    """One oblique DICOM case of ``vol3d synth --size small`` (with two lesions), its boxes.json
    rows and its lesion instance map; returns the export folder and the case's truth."""
    from vol3d.synth.export import SynthConfig, plan_cases, write_case

    plans = plan_cases(SynthConfig(cases=6, seed=0, size="small", workers=1))
    plan = next(p for p in plans if any("OBL" in s.description for s in p.series) and p.findings)
    export = root / "export"
    for sub in ("dicom", "labels", "lesions"):
        (export / sub).mkdir(parents=True, exist_ok=True)
    result = write_case(plan, export)
    (root / "boxes.json").write_text(json.dumps(result["boxes"]))
    return export, result["truth"]


def test_oblique_synth_boxes_are_tight_with_lesions_and_enclosing_without(tmp_path):
    export, truth = _oblique_synth_case(tmp_path)
    key = truth["key"]
    n_boxes = sum(b["key"] == key for b in json.loads((tmp_path / "boxes.json").read_text()))
    assert n_boxes >= 1
    opts = RunOptions(workers=1, progress=False)
    cases = {}
    for name, lesions in (("tight", export / "lesions"), ("loose", None)):
        # the lesion maps as labels too: the cached label is then the lesion's cached extent
        side = SideTables.load(boxes=tmp_path / "boxes.json", labels=export / "lesions", lesions=lesions)
        run_preprocess(export / "dicom", tmp_path / name, _tiny_cfg(), side, opts)
        rows = [json.loads(line) for line in (tmp_path / name / "manifest.jsonl").read_text().splitlines()]
        row = next(r for r in rows if r["status"] == "ok" and r["n_boxes"] == n_boxes)
        cases[name] = (row, read_case(tmp_path / name / row["h5"]))
    row, tight = cases["tight"]
    assert "OBLIQUE" in tight["flags"] and "BOXES_ENCLOSING" not in tight["flags"]
    assert tight["boxes"]["source"] == ["mask"] * n_boxes
    lab = tight["label"]
    ious = []
    for k, vox in zip(sorted(set(np.unique(lab)) - {0}), tight["boxes"]["vox"], strict=True):
        extent = geometry.mask_to_box(lab == k)  # the lesion's extent in the cache
        np.testing.assert_allclose(vox, extent, atol=1e-4)
        ious.append(geometry.box_iou(vox[None], extent[None])[0, 0])
    assert min(ious) > 0.9
    row, loose = cases["loose"]
    assert loose["boxes"]["source"] == ["world_box"] * n_boxes
    assert "BOXES_ENCLOSING" in loose["flags"] and "BOXES_ENCLOSING" in row["flags"]
    assert "--lesions" in row["detail"]
    loose_iou = geometry.box_iou(loose["boxes"]["vox"], tight["boxes"]["vox"]).diagonal()
    assert (loose_iou < 0.9).all()  # the enclosing box of the enclosing box is much larger
