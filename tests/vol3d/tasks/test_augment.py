"""Augmentations move boxes and label maps exactly with the image."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.errors import ConfigError
from preprocess.geometry import mask_to_box
from vol3d.tasks import AugmentConfig, augment, flip_boxes

SHAPE = (24, 20, 16)
NO_INTENSITY = {"gamma_prob": 0.0, "noise_prob": 0.0}


def make_case():
    """Liver (1) with a lesion (9), spleen (2), left kidney (3), right kidney (4); one box per finding."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:14, 2:12, 2:12] = 1
    label[4:8, 5:9, 3:6] = 9
    label[16:22, 3:9, 4:10] = 2
    label[3:7, 14:18, 8:12] = 3
    label[15:19, 14:18, 8:12] = 4
    image = (label[None] / 10.0).astype(np.float32)
    boxes = np.stack([mask_to_box(label == 9), mask_to_box(label == 2), mask_to_box(label == 3)])
    return {
        "id": "c_aug",
        "image": image,
        "label": label,
        "boxes_vox": boxes,
        "box_findings": ["liver_lesion", "splenomegaly", "kidney_cyst"],
        "box_organs": ["liver", "spleen", "kidney_left"],
        "report": "Simple cyst in the left kidney.",
    }


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1, 2)])
def test_flip_moves_boxes_exactly_where_the_flipped_masks_are(axes):
    case = make_case()
    cfg = AugmentConfig(flip_prob=1.0, flip_axes=axes, affine_prob=0.0, lr_swap_labels=(3, 4), **NO_INTENSITY)
    out = augment(case, 0, cfg)
    assert out["augment"]["flips"] == list(axes)
    lab = out["label"]
    np.testing.assert_array_equal(out["boxes_vox"][0], mask_to_box(lab == 9))
    np.testing.assert_array_equal(out["boxes_vox"][1], mask_to_box(lab == 2))
    kidney = 4 if 0 in axes else 3  # an X flip turns the left kidney into the right one
    np.testing.assert_array_equal(out["boxes_vox"][2], mask_to_box(lab == kidney))
    # image and label stay aligned: the flipped image is the flipped label scaled
    flipped = np.flip(case["label"], axis=axes)
    np.testing.assert_allclose(out["image"][0], flipped / 10.0, atol=1e-6)
    np.testing.assert_array_equal(out["boxes_visible"], [1, 1, 1])


def test_left_right_flip_swaps_laterality_in_labels_boxes_and_report():
    cfg = AugmentConfig(flip_prob=1.0, flip_axes=(0,), affine_prob=0.0, lr_swap_labels=(3, 4), **NO_INTENSITY)
    out = augment(make_case(), 0, cfg)
    assert out["box_organs"][2] == "kidney_right"
    assert out["report"] == "Simple cyst in the right kidney."
    assert (out["label"] == 3).sum() == (make_case()["label"] == 4).sum()


def test_flip_boxes_is_an_involution():
    boxes = np.array([[0.5, 1.5, -0.5, 3.5, 9.5, 2.5]])
    np.testing.assert_array_equal(flip_boxes(flip_boxes(boxes, SHAPE, (0, 2)), SHAPE, (0, 2)), boxes)
    # the whole array maps onto itself
    whole = np.array([[-0.5, -0.5, -0.5, 23.5, 19.5, 15.5]])
    np.testing.assert_array_equal(flip_boxes(whole, SHAPE, (0, 1, 2)), whole)


def test_identity_affine_keeps_boxes():
    cfg = AugmentConfig(
        affine_prob=1.0, max_rotation_deg=0, max_scale=0, max_translation_vox=0, **NO_INTENSITY
    )
    out = augment(make_case(), 0, cfg)
    assert out["augment"]["affine"]
    np.testing.assert_array_equal(out["boxes_vox"], make_case()["boxes_vox"])
    np.testing.assert_array_equal(out["label"], make_case()["label"])


@pytest.mark.parametrize("seed", range(4))
def test_random_affine_boxes_enclose_the_moved_lesion_and_organ(seed):
    cfg = AugmentConfig(
        affine_prob=1.0, max_rotation_deg=8, max_scale=0.1, max_translation_vox=2, **NO_INTENSITY
    )
    out = augment(make_case(), seed, cfg)
    lab = out["label"]
    # box masks and the label map go through the same nearest-neighbour resampling
    np.testing.assert_array_equal(out["boxes_vox"][0], mask_to_box(lab == 9))
    np.testing.assert_array_equal(out["boxes_vox"][1], mask_to_box(lab == 2))
    assert (out["boxes_visible"] == 1).all()  # nothing left the volume


def test_boxes_pushed_out_are_clipped_with_visibility_or_removed():
    case = make_case()
    label = case["label"]
    label[label == 9] = 1
    label[0:3, 5:9, 3:6] = 9  # a lesion on the x edge
    case["boxes_vox"][0] = mask_to_box(label == 9)
    cfg = AugmentConfig(
        affine_prob=1.0, max_rotation_deg=0, max_scale=0, max_translation_vox=2.5, **NO_INTENSITY
    )
    reduced = 0
    for seed in range(12):
        out = augment(case, seed, cfg)
        after = (out["label"] == 9).sum()
        if after == 0:
            assert "liver_lesion" not in out["box_findings"]  # gone entirely: removed, never a stale box
            continue
        assert out["box_findings"][0] == "liver_lesion"
        np.testing.assert_allclose(out["boxes_visible"][0], after / (label == 9).sum(), atol=1e-6)
        np.testing.assert_array_equal(out["boxes_vox"][0], mask_to_box(out["label"] == 9))
        reduced += out["boxes_visible"][0] < 1
    assert reduced > 0


def test_augment_never_mutates_its_input():
    case = make_case()
    cfg = AugmentConfig(flip_prob=1.0, affine_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    augment(case, 3, cfg)
    fresh = make_case()
    for key in ("image", "label", "boxes_vox"):
        np.testing.assert_array_equal(case[key], fresh[key])
    assert case["box_organs"] == fresh["box_organs"] and case["report"] == fresh["report"]


def test_augment_is_deterministic_and_intensity_leaves_geometry_alone():
    cfg = AugmentConfig(gamma_prob=1.0, noise_prob=1.0, affine_prob=0.0)
    a, b = augment(make_case(), 7, cfg), augment(make_case(), 7, cfg)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.allclose(a["image"], make_case()["image"])
    np.testing.assert_array_equal(a["label"], make_case()["label"])
    np.testing.assert_array_equal(a["boxes_vox"], make_case()["boxes_vox"])


def test_cache_dataset_items_tensors_and_plural_keys():
    """CacheDataset items hold tensors."""
    torch = pytest.importorskip("torch")
    case = make_case()
    item = {
        "image": torch.from_numpy(case["image"]),
        "label": torch.from_numpy(case["label"].astype(np.int64)),
        "boxes_vox": torch.from_numpy(case["boxes_vox"].astype(np.float32)),
        "boxes_visible": torch.ones(3),
        "box_findings": case["box_findings"],
        "box_organs": case["box_organs"],
        "spacing": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        "affine": torch.from_numpy(np.diag([2.0, 2.0, 3.0, 1.0])),
        "boxes_world": torch.zeros(3, 6),
    }
    out = augment(item, 0, AugmentConfig(flip_prob=1.0, flip_axes=(0,), affine_prob=0.0, lr_swap_labels=(3, 4)))
    assert isinstance(out["image"], torch.Tensor) and isinstance(out["boxes_vox"], torch.Tensor)
    assert out["image"].shape == (1, *SHAPE)
    assert out["box_organs"][2] == "kidney_right"
    np.testing.assert_array_equal(out["boxes_vox"][2].numpy(), mask_to_box(out["label"].numpy() == 4))
    np.testing.assert_array_equal(out["boxes_visible"].numpy(), [1, 1, 1])
    # world boxes follow the moved content
    np.testing.assert_allclose(out["boxes_world"].numpy(), out["boxes_vox"].numpy() * [2, 2, 3, 2, 2, 3])


def test_config_validation():
    with pytest.raises(ConfigError):
        AugmentConfig(flip_prob=2.0)
    with pytest.raises(ConfigError):
        AugmentConfig(flip_axes=(3,))
    with pytest.raises(ConfigError):
        AugmentConfig(lr_swap_labels=(3, 4, 5))


def test_left_right_pairs_and_finding_label_come_from_the_exports_label_names():
    from vol3d.tasks.augment import for_labels

    synthetic = ["background", "liver", "spleen", "kidney_left", "kidney_right", "lung_left", "lung_right",
                 "spine", "aorta", "lesion"]  # fmt: skip
    cfg = for_labels(AugmentConfig(), synthetic, ["lesion"])
    assert cfg.lr_swap_labels == (3, 4, 5, 6) and cfg.lesion_label == 9
    brain = ["background", "Left_Hippocampus", "Right_Hippocampus", "ventricles", "left-putamen", "right-putamen",
             "tumour"]  # fmt: skip
    cfg = for_labels(AugmentConfig(), brain, ["tumour"])
    assert cfg.lr_swap_labels == (1, 2, 4, 5) and cfg.lesion_label == 6
    assert for_labels(AugmentConfig(lr_swap_labels=(), lesion_label=3), synthetic, ["lesion"]).lr_swap_labels == ()
    assert for_labels(AugmentConfig(), ["background", "liver"]).lr_swap_labels == ()  # nothing to swap
