"""scripts/bench_detect.py: MONAI's RetinaNet beside vol3d's perception, scored by the same code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from vol3d.tasks.regions import Perceived, Region

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_detect", REPO / "scripts" / "bench_detect.py")
assert _spec is not None and _spec.loader is not None
bench_detect = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench_detect  # its dataclass looks its module up
_spec.loader.exec_module(bench_detect)

SPACING = np.array([2.0, 2.0, 3.0])


def _region(box, name="liver_lesion", score=1.0) -> Region:
    box = np.asarray(box, float)
    return Region("finding", name, box, (box[3:] - box[:3]) * SPACING, 1.0, score=score)


def _case(boxes, names, shape=(32, 32, 16)) -> object:
    """A two-channel volume holding a bright cuboid at each voxel box."""
    image = np.zeros((2, *shape), np.float32)
    for b in boxes:
        lo, hi = (np.asarray(b[:3]) + 0.5).astype(int), (np.asarray(b[3:]) + 0.5).astype(int)
        image[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    truth = Perceived([_region(b, n) for b, n in zip(boxes, names, strict=True)], [], {})
    return bench_detect.Case("c", image, SPACING, truth)


def test_boxes_map_onto_monai_corners_and_back():
    whole = np.array([-0.5, -0.5, -0.5, 31.5, 31.5, 15.5])  # the whole 32 x 32 x 16 volume in vol3d's convention
    assert bench_detect.to_monai_box(whole).tolist() == [0, 0, 0, 32, 32, 16]
    box = np.array([3.5, 4.5, 2.5, 7.5, 9.5, 5.5])
    np.testing.assert_allclose(bench_detect.from_monai_box(bench_detect.to_monai_box(box)), box)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_flipped_volume_keeps_its_boxes_on_its_findings(axis):
    case = _case([[3.5, 4.5, 2.5, 7.5, 9.5, 5.5]], ["liver_lesion"])
    image, target = bench_detect._targets(case, ["kidney_cyst", "liver_lesion"], [axis])
    lo, hi = target["box"][0, :3].numpy(), target["box"][0, 3:].numpy()
    inside = image[0][tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
    assert inside.size == 4 * 5 * 3 and inside.min() == 1.0  # the whole cuboid, and only it
    assert image[0].sum() == inside.sum()
    assert target["label"].tolist() == [1]
    assert not np.array_equal(image, case.image)  # it was flipped


def test_precision_and_recall_count_each_detection_once_per_type():
    truth = Perceived([_region([0, 0, 0, 4, 4, 4]), _region([10, 10, 10, 12, 12, 12], "kidney_cyst")], [], {})
    found = Perceived([_region([0, 0, 0, 4, 4, 4], score=0.9),
                       _region([0, 0, 0, 4, 4, 4], score=0.8),  # a duplicate: a false positive
                       _region([10, 10, 10, 12, 12, 12], "lung_nodule", score=0.7)], [], {})  # wrong type
    assert bench_detect.match_counts(truth, found) == (2, 3, 1)
    op = bench_detect.operating_point([truth], [found])
    assert op["recall_iou50"] == 0.5 and op["precision_iou50"] == pytest.approx(1 / 3)
    assert op["f1_iou50"] == pytest.approx(2 * 1 / 5) and op["detections_per_volume"] == 3


def test_the_threshold_is_the_one_with_the_best_f1():
    cases = [_case([[2.5, 2.5, 2.5, 6.5, 6.5, 5.5]], ["liver_lesion"]) for _ in range(3)]
    true_box, far = np.array([2.5, 2.5, 2.5, 6.5, 6.5, 5.5]), np.array([20.5, 20.5, 10.5, 24.5, 24.5, 13.5])
    dets = [(np.stack([true_box, far]), ["liver_lesion", "liver_lesion"], np.array([0.6, 0.3])) for _ in cases]
    best, f1 = bench_detect.best_threshold(dets, cases)
    assert f1[0.3] == pytest.approx(2 / 3) and f1[0.6] == 1.0 and f1[0.65] == 0.0
    assert best == 0.6  # the highest threshold keeping every true detection and no false one
    kept = bench_detect.above(dets, cases, best)
    assert [len(p.findings) for p in kept] == [1, 1, 1]


def test_coco_ap_is_one_for_exact_boxes_and_zero_for_boxes_elsewhere():
    truth = [Perceived([_region([2, 2, 2, 6, 6, 5]), _region([10, 10, 8, 14, 14, 11], "kidney_cyst")], [], {})]
    exact = [Perceived([_region([2, 2, 2, 6, 6, 5], score=0.9),
                        _region([10, 10, 8, 14, 14, 11], "kidney_cyst", score=0.8)], [], {})]
    elsewhere = [Perceived([_region([20, 20, 2, 24, 24, 5], score=0.9)], [], {})]
    classes = ["kidney_cyst", "liver_lesion"]
    good = bench_detect.coco_ap(truth, exact, classes)
    assert good["ap_iou10"] == pytest.approx(1.0) and good["ap_iou50"] == pytest.approx(1.0)
    bad = bench_detect.coco_ap(truth, elsewhere, classes)
    assert bad["ap_iou10"] == pytest.approx(0.0) and bad["by_finding_ap_iou10"]["liver_lesion"] == pytest.approx(0.0)


def test_retinanet_learns_a_bright_cuboid():
    """MONAI's detector, as the benchmark builds it (no torchvision), finds what it was trained on."""
    import torch

    torch.manual_seed(0)
    cases = [_case([[4.5 + 8 * k, 6.5, 3.5, 10.5 + 8 * k, 12.5, 8.5]], ["liver_lesion"]) for k in range(3)]
    anchors = bench_detect.anchor_shapes(cases)
    assert anchors[1] == [6, 6, 5]  # the median box, in voxels
    detector = bench_detect.build_retinanet(2, 1, anchors, width=8, fpn_channels=16)
    log = bench_detect.train_retinanet(detector, cases, ["liver_lesion"], seconds=20, lr=3e-3, batch_size=3, seed=0,
                                       progress=False)
    assert log["steps"] > 10 and set(log["last_losses"]) == {"classification", "box_regression"}
    dets = bench_detect.retinanet_detections(detector, cases, ["liver_lesion"])
    top = bench_detect.above(dets, cases, 0.0)
    for case, found in zip(cases, top, strict=True):
        assert found.findings and found.findings[0].name == "liver_lesion"
        from preprocess.geometry import box_iou

        assert float(box_iou(found.findings[0].box[None], case.truth.findings[0].box[None])[0, 0]) >= 0.5
