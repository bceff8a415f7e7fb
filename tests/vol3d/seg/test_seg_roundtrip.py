"""A ground-truth mask pushed through preprocessing and back lands on the original mask.

Axial, feet-first, sagittal and oblique DICOM series are written, loaded by ingest,
prepared (RAS+ reorientation, resampling, crop/pad) and mapped back with
``labels_to_original`` (``to_original`` of the labels or of each class probability);
the truth is computed from world coordinates only (``segphantom.label_at``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segphantom import CLASSES, dice_by_class, grid_points, label_at, write_dicom_series

from preprocess.config import PreprocessConfig
from preprocess.ingest import IngestConfig, load, scan
from preprocess.transforms import prepare
from vol3d.seg.inference import labels_to_original

ORIENTATIONS = ["axial", "feet_first", "sagittal", "oblique"]
# finer than the series (4 x 4 x 5 mm): every original voxel has a cached voxel of its own
FINE = PreprocessConfig(target_spacing=(2.5, 3.0, 3.5), crop_margin_mm=6.0)
# coarser than the series: what the tiny CPU preset does
COARSE = PreprocessConfig(target_spacing=(5.0, 5.0, 6.0), crop_margin_mm=6.0, fixed_size=(40, 32, 32))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """``{orientation: (Image, truth label on the loaded grid)}``."""
    root = tmp_path_factory.mktemp("dicom")
    for i, name in enumerate(ORIENTATIONS):
        write_dicom_series(root / name, name, index=i)
    out = {}
    for c in scan(root, IngestConfig()):
        assert c.status == "ok", c.detail
        image = load(c, IngestConfig())
        name = c.source[0].split("/")[0]
        out[name] = (image, label_at(grid_points(image.affine, image.array.shape)))
    assert sorted(out) == sorted(ORIENTATIONS)
    return out


def _one_hot(label: np.ndarray) -> torch.Tensor:
    """Logits ``(K, X, Y, Z)`` whose argmax is ``label``."""
    return torch.nn.functional.one_hot(torch.as_tensor(label.astype(np.int64)), len(CLASSES)).permute(3, 0, 1, 2).float()


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_the_phantom_series_is_what_ingest_loads(series, name):
    image, truth = series[name]
    assert {1, 2, 3} <= set(np.unique(truth).tolist())
    # the pixels written from world coordinates are the pixels read back: the grid is right
    assert np.array_equal(image.array >= 50, truth > 0)


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_label_round_trip_is_exact_when_the_cache_is_finer(series, name):
    image, truth = series[name]
    p = prepare(image, FINE, label=truth)
    assert p.shape != truth.shape  # reoriented/resampled/cropped: a real round trip
    back = labels_to_original(_one_hot(p.label), p, resample="labels")  # nearest: to_original(order=0)
    assert back.shape == truth.shape
    assert np.array_equal(back, truth)


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_soft_round_trip_of_one_hot_probabilities(series, name):
    """labels_to_original's linear probabilities (predict's default, smooth when the cache is coarser)
    only move boundary voxels where trilinear weights of a neighbouring class add up to more (its
    nearest-label path is exact: test_label_round_trip_is_exact_when_the_cache_is_finer)."""
    image, truth = series[name]
    p = prepare(image, FINE, label=truth)
    back = labels_to_original(_one_hot(p.label) * 10, p, resample="probs")
    assert min(dice_by_class(back, truth).values()) > 0.97


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_coarse_cache_loses_only_resolution(series, name):
    """A cache coarser than the series cannot be exact, but organs must still overlap closely."""
    image, truth = series[name]
    p = prepare(image, COARSE, label=truth)
    back = labels_to_original(_one_hot(p.label) * 10, p, resample="probs")
    dice = dice_by_class(back, truth)
    assert min(dice.values()) > 0.8, dice
    assert np.mean(list(dice.values())) > 0.85, dice
