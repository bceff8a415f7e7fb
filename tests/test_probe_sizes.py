"""scripts/probe_sizes.py: how a lesion's measured diameter missed, and the intensity oracle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from vol3d.tasks.regions import Region

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_sizes", REPO / "scripts" / "probe_sizes.py")
assert _spec is not None and _spec.loader is not None
probe_sizes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_sizes)

SPACING = np.array([5.5, 4.5, 6.0])


def _region(box) -> Region:
    box = np.asarray(box, float)
    return Region("finding", "liver_lesion", box, (box[3:] - box[:3]) * SPACING, 1.0)


def test_each_answer_is_sorted_by_how_it_missed():
    truth = _region([9.5, 9.5, 4.5, 13.5, 12.5, 6.5])  # 4 x 3 voxels: 22 x 13.5 mm -> 22 mm long
    assert probe_sizes.size_miss(truth, _region(truth.box))["kind"] == "within"
    longer = probe_sizes.size_miss(truth, _region([9.5, 9.5, 4.5, 14.5, 12.5, 6.5]))
    assert longer["kind"] == "longer" and longer["edges"] == [0, 0, 0, 1, 0, 0]
    assert (longer["truth_mm"], longer["pred_mm"]) == (22, 28)
    shorter = probe_sizes.size_miss(truth, _region([10.5, 9.5, 4.5, 13.5, 12.5, 6.5]))
    assert shorter["kind"] == "shorter" and shorter["edges"][0] == 1
    assert probe_sizes.size_miss(truth, _region([30.5, 30.5, 4.5, 33.5, 33.5, 6.5]))["kind"] == "other instance"
    assert probe_sizes.size_miss(truth, None) == {"kind": "missed", "truth_mm": 22, "pred_mm": None}


def test_the_oracle_reads_a_clean_lesion_exactly_and_noise_moves_its_edges():
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 24, 12), bool)
    mask[8:12, 9:12, 4:7] = True
    image = np.stack([np.full(mask.shape, 0.3, np.float32), rng.normal(0.5, 0.01, mask.shape).astype(np.float32)])
    image[0][mask] = 0.6  # the lesion differs in channel 0 only
    truth_mm = probe_sizes.long_diameter(np.array([4, 3, 3]) * SPACING)
    got, cnr = probe_sizes.intensity_oracle(image, mask, mask.astype(np.float32), SPACING)
    assert got == truth_mm and cnr > 100
    noisy = image.copy()
    noisy[0] += rng.normal(0, 0.15, mask.shape).astype(np.float32)  # contrast-to-noise 2: edges go astray
    misses = sum(probe_sizes.intensity_oracle(noisy + rng.normal(0, 0.15, noisy.shape).astype(np.float32), mask,
                                              mask.astype(np.float32), SPACING)[0] != truth_mm for _ in range(10))
    assert misses >= 3
