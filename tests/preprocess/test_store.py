import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from preprocess import geometry as g
from preprocess.config import PreprocessConfig
from preprocess.store import (
    CaseReader,
    grid_corners,
    patch_index,
    read_case,
    read_window,
    remove_temp_files,
    write_case,
)
from preprocess.transforms import prepare
from preprocess.types import Image


def make_prepared(shape=(40, 36, 24), seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000.0, np.float32)
    arr[5:35, 4:30, 2:22] = rng.normal(40, 20, (30, 26, 20))
    label = np.zeros(shape, np.uint8)
    label[10:16, 8:20, 5:9] = 2
    aff = np.diag([-1.5, -1.5, 3.0, 1.0])
    aff[:3, 3] = [30, 25, -40]
    cfg = PreprocessConfig(target_spacing=None, crop_foreground=False, patch_size=(16, 16, 8))
    return prepare(Image(arr, aff, "CT"), cfg, label=label), cfg


BOXES = [
    {"box_world_ras_mm": [-2.0, -5.0, -20.0, 6.0, 9.0, -5.0], "finding": "liver_lesion", "organ": "liver"},
    {
        "box_world_ras_mm": [500.0, 500.0, 500.0, 510.0, 510.0, 510.0],
        "finding": "lung_nodule",
        "organ": "lung_left",
    },
]


@pytest.mark.parametrize("codec", ["lz4", "zstd", "lzf", "gzip", "none"])
def test_write_read_round_trip(tmp_path, codec):
    p, cfg = make_prepared()
    cfg.compression = codec
    path = write_case(
        tmp_path / "cases" / "c_" / "c_1.h5",
        "c_1",
        p,
        boxes=BOXES,
        report={"findings": "F.", "impression": "I."},
        codes=["K76.0", "E11.9"],
        attrs={"source_hash": "ab" * 32},
        cfg=cfg,
    )
    d = read_case(path)
    assert d["key"] == "c_1"
    assert np.array_equal(d["image"], p.image) and np.array_equal(d["label"], p.label)
    for k in ("affine", "orig_affine", "cached_to_orig"):
        assert np.allclose(d[k], getattr(p, k))
    assert tuple(d["crop_box"]) == p.crop_box and tuple(d["orig_shape"]) == p.orig_shape
    assert tuple(d["shape"]) == p.shape and np.allclose(d["spacing"], p.spacing)
    assert d["modality"] == "CT" and np.allclose(d["windows"], [[-1000, 1000]])
    assert d["report_findings"] == "F." and d["report_impression"] == "I."
    assert d["codes"] == ["K76.0", "E11.9"] and d["flags"] == []
    assert d["source_hash"] == "ab" * 32 and d["params_hash"] == cfg.params_hash()
    b = d["boxes"]
    assert b["finding"] == ["liver_lesion", "lung_nodule"] and b["organ"] == ["liver", "lung_left"]
    assert np.allclose(b["world"], [x["box_world_ras_mm"] for x in BOXES])
    assert np.allclose(g.boxes_voxel_to_world(b["vox"][:1], p.affine), b["world"][:1], atol=1e-4)
    assert b["visible"][0] == 1.0 and b["visible"][1] == 0.0  # the far box is flagged, not kept wrong
    with h5py.File(path) as f:
        assert f["c_1/image"].chunks == (1, 16, 16, 8)
    assert sorted(x.name for x in path.parent.iterdir()) == ["c_1.h5"]  # no temp file left


def test_patch_index_fractions_match_brute_force():
    p, cfg = make_prepared()
    idx = patch_index(p.foreground, p.label, cfg.patch_size)
    assert idx.shape[1] == 5
    size = np.array(cfg.patch_size)
    for row in idx[:: max(1, len(idx) // 9)]:
        i, j, k = row[:3].astype(int)
        sl = (slice(i, i + size[0]), slice(j, j + size[1]), slice(k, k + size[2]))
        assert np.isclose(row[3], p.foreground[sl].sum() / size.prod())
        assert np.isclose(row[4], (p.label[sl] > 0).sum() / size.prod())
    assert idx[:, 4].max() > 0 and (idx[:, 4] == 0).any()


def test_grid_corners_tile_everything_and_centre_short_axes():
    c = grid_corners((40, 36, 5), (16, 16, 8), (16, 16, 8))
    cover = np.zeros((40, 36, 5), bool)
    for i, j, k in c:
        cover[i : i + 16, j : j + 16, max(k, 0) : k + 8] = True
    assert cover.all()
    assert set(c[:, 0]) == {0, 16, 24} and set(c[:, 2]) == {-2}


def test_read_window_pads_outside(tmp_path):
    p, cfg = make_prepared()
    path = write_case(tmp_path / "a.h5", "a", p, cfg=cfg)
    with CaseReader(path) as r:
        win = r.image((-3, 30, 20), (8, 10, 8))
        assert win.shape == (1, 8, 10, 8)
        assert np.array_equal(win[:, 3:, :6, :4], p.image[:, :5, 30:36, 20:24])
        assert not win[:, :3].any() and not win[:, :, 6:].any()
        assert np.array_equal(r.label((0, 0, 0), p.shape), p.label)
    assert np.array_equal(read_window(p.label, (38, 0, 0), (4, 2, 2))[2:], np.zeros((2, 2, 2)))


def test_identifier_like_attributes_are_refused(tmp_path):
    p, cfg = make_prepared()
    with pytest.raises(ValueError, match="identifier"):
        write_case(tmp_path / "a.h5", "a", p, attrs={"PatientID": "123"}, cfg=cfg)
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    p, cfg = make_prepared()
    path = write_case(tmp_path / "a.h5", "a", p, cfg=cfg)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_case(path, "a", p, attrs={"bad": object()}, cfg=cfg)
    assert path.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["a.h5"]


def test_kill_minus_nine_never_leaves_a_corrupt_file(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        from test_store import make_prepared
        from preprocess.store import write_case
        p, cfg = make_prepared(shape=(120, 120, 60))
        cfg.compression = "gzip"
        for i in range(10_000):
            write_case({str(tmp_path / "a.h5")!r}, "a", p, cfg=cfg)
            print(i, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"
        time.sleep(0.37)  # somewhere in the middle of a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    d = read_case(tmp_path / "a.h5")  # the last complete file, readable
    assert d["image"].shape[1:] == (120, 120, 60)
    remove_temp_files(tmp_path)
    assert [x.name for x in tmp_path.iterdir()] == ["a.h5"]


# ----------------------------------------------------------------------------- fingerprint


def test_target_spacing_rule_median_or_tenth_percentile_for_a_very_coarse_axis():
    from preprocess.fingerprint import suggest_target_spacing

    sp = np.array([[0.8, 0.8, z] for z in (3.0, 4.0, 5.0, 5.0, 6.0)])
    thin = np.array([[512, 512, 40]] * 5)
    assert np.allclose(suggest_target_spacing(sp, thin), [0.8, 0.8, 3.4])  # 10th percentile of z
    thick = np.array([[512, 512, 400]] * 5)  # many slices: not "anisotropic voxels", keep the median
    assert np.allclose(suggest_target_spacing(sp, thick), [0.8, 0.8, 5.0])
    iso = np.array([[1.0, 1.1, 1.2], [1.0, 0.9, 1.4], [1.2, 1.0, 1.0]])
    assert np.allclose(suggest_target_spacing(iso, thin[:3]), [1.0, 1.0, 1.2])


def test_fingerprint_from_case_summaries(tmp_path):
    import json

    from preprocess.fingerprint import case_summary, write_fingerprint

    summaries = []
    for c, (mod, perm) in enumerate([("CT", False), ("CT", True), ("MR", False)]):
        arr = np.full((30, 20, 10), -1000.0, np.float32)
        arr[5:25, 4:16, 2:8] = np.random.default_rng(c).normal(50, 10, (20, 12, 6))
        aff = np.diag([0.7, 0.8, 2.5, 1.0])
        if perm:  # stored as (Z, X, Y): spacings must still come out along canonical X, Y, Z
            arr, aff = arr.transpose(2, 0, 1), aff[:, [2, 0, 1, 3]]
        if mod == "MR":
            arr = arr + 1000.0
        p = prepare(Image(arr, aff, mod), PreprocessConfig(target_spacing=(1.4, 1.6, 2.5)))
        summaries.append(case_summary(p))
    assert np.allclose(summaries[1]["spacing"], [0.7, 0.8, 2.5]) and summaries[1]["shape"] == [30, 20, 10]
    fp = json.loads(write_fingerprint(tmp_path, summaries).read_text())
    assert (
        fp["n_cases"] == 3
        and fp["by_modality"]["CT"]["n_cases"] == 2
        and fp["by_modality"]["MR"]["n_cases"] == 1
    )
    ct = fp["by_modality"]["CT"]
    assert np.allclose(ct["spacing"]["median"], [0.7, 0.8, 2.5])
    assert np.allclose(ct["suggested_target_spacing"], [0.7, 0.8, 2.5])
    assert (
        abs(ct["foreground_intensity"]["median"] - 50) < 3
        and 10 < ct["foreground_intensity"]["p99.5"] - 50 < 40
    )
    assert np.allclose(ct["cached_shape"]["median"], summaries[0]["cached_shape"])
