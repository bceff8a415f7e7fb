"""Geometry of prepare(): every grid of the same world phantom gives the same cached data."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from preprocess import geometry as g
from preprocess.config import PreprocessConfig
from preprocess.reasons import LABEL_MISMATCH
from preprocess.transforms import (
    FLAG_FOREGROUND_CLIPPED,
    FLAG_OBLIQUE,
    align_label,
    boxes_world_to_cached,
    prepare,
    to_original,
)
from preprocess.types import Image, SeriesError

BODY = np.array([90.0, 70.0, 60.0])  # ellipsoid radii, mm, centred on the world origin
LESION_C, LESION_R = np.array([20.0, -10.0, 5.0]), 18.0
BLOB_C = np.array([-30.0, 15.0, -12.0])


def phantom(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and label at world points (..., 3): air, a soft-tissue body, a lesion, a smooth blob."""
    body = ((world / BODY) ** 2).sum(-1) < 1
    lesion = ((world - LESION_C) ** 2).sum(-1) < LESION_R**2
    blob = 600.0 * np.exp(-((world - BLOB_C) ** 2).sum(-1) / (2 * 6.0**2))
    hu = np.where(body, 40.0, -1000.0) + np.where(lesion, 60.0, 0.0) + blob
    return hu.astype(np.float32), lesion.astype(np.uint8)


def grid(
    kind: str, spacing=(2.0, 2.0, 2.5), extent=(200.0, 170.0, 150.0)
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, shape) of a grid covering ``extent`` mm around the origin, stored in different ways."""
    cols = {
        "ras": np.eye(3),
        "lps": np.diag([-1.0, -1.0, 1.0]),  # DICOM axial head-first as read into RAS
        "feet_first": np.diag([-1.0, -1.0, -1.0]),
        "permuted": np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]]),  # sagittal: axes (-A?, -S, R)
        "oblique": Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
        @ np.diag([-1.0, -1.0, 1.0]),
    }[kind]
    world_axis = np.abs(cols).argmax(axis=0)  # which world extent each array axis covers
    shape = tuple(int(extent[w] / s) for w, s in zip(world_axis, spacing, strict=True))
    aff = np.eye(4)
    aff[:3, :3] = cols * np.asarray(spacing)
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2) + [0.3, -0.2, 0.1]
    return aff, shape


def sample(kind: str, **kw) -> tuple[Image, np.ndarray]:
    aff, shape = grid(kind, **kw)
    world = g.voxel_to_world(aff, np.indices(shape).reshape(3, -1).T)
    hu, lab = phantom(world)
    return Image(hu.reshape(shape), aff, "CT"), lab.reshape(shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


KEEP = PreprocessConfig(target_spacing=None, crop_foreground=False)


def test_lps_and_permuted_storage_give_the_same_canonical_array():
    ras, _ = sample("ras", spacing=(2.0, 2.0, 2.0))
    base = prepare(ras, KEEP)
    for kind in ("lps", "feet_first", "permuted"):
        img, _ = sample(kind, spacing=(2.0, 2.0, 2.0))
        p = prepare(img, KEEP)
        assert p.image.shape == base.image.shape, kind
        assert np.array_equal(p.image, base.image), kind
        assert np.allclose(p.affine, base.affine), kind
        assert np.allclose(np.diag(p.affine)[:3], [2, 2, 2])  # RAS+: positive diagonal
        assert np.allclose(img.affine @ p.cached_to_orig, p.affine)


def test_cached_affine_says_where_a_world_point_lands_after_resampling():
    cfg = PreprocessConfig(target_spacing=(3.0, 2.5, 4.0), crop_foreground=True, fixed_size=(64, 64, 40))
    for kind in ("lps", "feet_first", "permuted", "oblique"):
        img, _ = sample(kind)
        p = prepare(img, cfg)
        blob = np.clip(p.image[0].astype(float) - 0.55, 0, None)  # the blob rises above the body (0.52)
        com = np.array(ndimage.center_of_mass(blob))
        err = np.linalg.norm(g.voxel_to_world(p.affine, com) - BLOB_C)
        assert err < 0.5, (kind, err)  # mm, well under one voxel
        assert np.allclose(p.spacing, [3.0, 2.5, 4.0])
        assert (FLAG_OBLIQUE in p.flags) == (kind == "oblique")


def test_hu_windows_map_to_zero_and_one_and_make_channels():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    arr = np.zeros((4, 3, 2), np.float32)
    arr[0], arr[1], arr[2], arr[3] = -1000, 1000, 0, -3000
    cfg = PreprocessConfig(
        target_spacing=None, crop_foreground=False, ct_windows=[(-1000, 1000), (-160, 240)]
    )
    p = prepare(Image(arr, aff, "CT"), cfg)
    assert p.image.dtype == np.float16 and p.image.shape == (2, 4, 3, 2)
    assert np.all(p.image[0, 0] == 0) and np.all(p.image[0, 1] == 1) and np.all(p.image[0, 3] == 0)
    assert np.allclose(p.image[0, 2], 0.5) and np.allclose(p.image[1, 2], 0.4)
    assert p.windows == [(-1000, 1000), (-160, 240)]


def test_cached_to_orig_maps_cached_voxels_onto_the_original_positions():
    cfg = PreprocessConfig(
        target_spacing=(2.7, 3.1, 3.6), antialias=False, fixed_size=(60, 50, 40), ct_windows=[(-1100, 1100)]
    )
    for kind in ("lps", "permuted", "oblique"):
        img, _ = sample(kind)
        p = prepare(img, cfg)
        assert np.allclose(p.orig_affine @ p.cached_to_orig, p.affine)
        idx = np.indices(p.shape).reshape(3, -1).T[::97]
        orig = g.apply_affine(p.cached_to_orig, idx)
        inside = np.all((orig >= 0) & (orig <= np.array(p.orig_shape) - 1), axis=1)
        expect = ndimage.map_coordinates(img.array, orig[inside].T, order=1)
        got = p.image[0][tuple(idx[inside].T)].astype(float) * 2200 - 1100
        assert inside.mean() > 0.5
        assert np.abs(got - expect).max() < 2.0, kind  # HU; float16 rounding only


@pytest.mark.parametrize("kind", ["lps", "feet_first", "permuted", "oblique"])
def test_label_round_trips_through_the_cache(kind):
    img, lab = sample(kind)
    same = prepare(img, PreprocessConfig(target_spacing=None, fixed_size=(120, 100, 80)), label=lab)
    back = to_original(same.label, same.affine, same.cached_to_orig, same.orig_shape)
    assert np.array_equal(back, lab)  # no resampling: exact
    p = prepare(img, PreprocessConfig(target_spacing=(2.5, 2.5, 3.0), fixed_size=(96, 80, 64)), label=lab)
    back = to_original(p.label, p.affine, p.cached_to_orig, p.orig_shape)
    assert back.shape == lab.shape and dice(back > 0, lab > 0) > 0.9


def test_to_original_of_a_crop_of_the_cache():
    img, lab = sample("lps")
    p = prepare(img, PreprocessConfig(target_spacing=None, crop_foreground=False), label=lab)
    lo = np.array([10, 20, 5])
    crop = p.label[10:90, 20:70, 5:50]
    crop_affine = p.affine.copy()
    crop_affine[:3, 3] = g.voxel_to_world(p.affine, lo)
    back = to_original(crop, crop_affine, p.cached_to_orig, p.orig_shape, cache_affine=p.affine)
    full = to_original(p.label, p.affine, p.cached_to_orig, p.orig_shape)
    inside = (
        to_original(np.ones_like(crop), crop_affine, p.cached_to_orig, p.orig_shape, cache_affine=p.affine)
        > 0
    )
    assert np.array_equal(back[inside], full[inside]) and not back[~inside].any()


def test_foreground_crop_keeps_the_body_and_records_the_box():
    img, lab = sample("lps")
    p = prepare(img, PreprocessConfig(target_spacing=(4.0, 4.0, 5.0), crop_margin_mm=8.0), label=lab)
    lo, hi = g.voxel_to_world(p.affine, [-0.5] * 3), g.voxel_to_world(p.affine, np.array(p.shape) - 0.5)
    assert np.all(lo <= -BODY) and np.all(hi >= BODY)  # the whole body is inside
    assert np.all(lo >= -BODY - 8.0 - 10.0) and np.all(hi <= BODY + 8.0 + 10.0)  # and little else
    assert tuple(np.subtract(p.crop_box[3:], p.crop_box[:3])) == p.shape
    assert p.foreground.shape == p.shape and 0.2 < p.foreground.mean() < 0.8


def test_fixed_size_pads_and_crops_centred_and_flags_clipping():
    img, _ = sample("lps")
    big = prepare(img, PreprocessConfig(target_spacing=(4.0, 4.0, 5.0), fixed_size=(64, 64, 40)))
    assert big.shape == (64, 64, 40) and FLAG_FOREGROUND_CLIPPED not in big.flags
    centre = g.voxel_to_world(big.affine, (np.array(big.shape) - 1) / 2)
    assert np.all(np.abs(centre) < 5.0)  # the body is centred
    assert big.crop_box[0] < 0  # padded: the window starts before the resampled grid
    small = prepare(img, PreprocessConfig(target_spacing=(4.0, 4.0, 5.0), fixed_size=(16, 64, 40)))
    assert small.shape == (16, 64, 40) and FLAG_FOREGROUND_CLIPPED in small.flags


def test_mr_percentile_normalisation_maps_foreground_percentiles_to_0_and_1():
    img, _ = sample("lps")
    world = g.voxel_to_world(img.affine, np.indices(img.array.shape).reshape(3, -1).T).reshape(
        img.array.shape + (3,)
    )
    tissue = 300.0 + 100.0 * np.sin(world[..., 0] / 7.0) + 50.0 * np.cos(world[..., 2] / 5.0)
    mr = Image(np.where(img.array > -500, tissue, 2.0).astype(np.float32), img.affine, "MR")
    p = prepare(mr, PreprocessConfig(target_spacing=None, mr_percentiles=(1.0, 99.0)))
    assert p.image.min() >= 0 and p.image.max() <= 1
    body = p.image[0][p.foreground].astype(float)
    assert 0.005 < (body >= 1).mean() < 0.02 and 0.005 < (body <= 0).mean() < 0.02
    assert 0.3 < np.median(body) < 0.7
    lo, hi = p.windows[0]
    assert 150 < lo < hi < 450


def test_multichannel_input_keeps_channels():
    img, _ = sample("lps")
    two = Image(np.stack([img.array, img.array]), img.affine, "CT")
    p = prepare(
        two, PreprocessConfig(target_spacing=(4.0, 4.0, 5.0), ct_windows=[(-1000, 1000), (-160, 240)])
    )
    assert p.image.shape[0] == 4 and np.array_equal(p.image[0], p.image[2])


def test_align_label_accepts_a_reordered_copy_and_rejects_others():
    img, lab = sample("lps")
    ras_img, ras_lab = sample("ras")  # the same label saved in RAS order with its own affine
    aligned = align_label(ras_lab, ras_img.affine, img)
    assert np.array_equal(aligned, lab)
    perm, perm_lab = sample("permuted", spacing=(2.0, 2.0, 2.5))
    with pytest.raises(SeriesError) as err:
        align_label(perm_lab, perm.affine, img)  # different spacing per world axis
    assert err.value.reason == LABEL_MISMATCH
    shifted = ras_img.affine.copy()
    shifted[:3, 3] += [0, 0, 2.5]
    with pytest.raises(SeriesError, match="shifted by 2.500 mm"):
        align_label(ras_lab, shifted, img)
    with pytest.raises(SeriesError, match="does not match image grid"):
        align_label(ras_lab[:-1], ras_img.affine, img)
    with pytest.raises(SeriesError, match="rotated"):
        align_label(lab, img.affine @ _rot(3.0), img)


def _rot(deg: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("z", deg, degrees=True).as_matrix()
    return m


def test_boxes_world_to_cached_match_the_cached_label_and_report_visibility():
    img, lab = sample("feet_first")
    world = g.boxes_voxel_to_world(g.mask_to_box(lab)[None], img.affine)
    p = prepare(img, PreprocessConfig(target_spacing=(2.0, 2.0, 2.5)), label=lab)
    vox, vis = boxes_world_to_cached(world, p)
    assert g.box_iou(vox, g.mask_to_box(p.label)[None])[0, 0] > 0.85 and vis[0] == 1.0
    away = world + np.array([0, 0, 1000.0] * 2)  # far above the crop
    half = world.copy()
    half[0, 2] = -half[0, 5] + 2 * (g.voxel_to_world(p.affine, [0, 0, -0.5])[2])  # straddles the lower edge
    _, vis2 = boxes_world_to_cached(np.concatenate([away, half]), p)
    assert vis2[0] == 0 and 0 < vis2[1] < 1


def test_memory_order_of_the_input_does_not_matter():
    img, lab = sample("oblique")
    cfg = PreprocessConfig(target_spacing=(3.3, 2.9, 4.1), fixed_size=(64, 64, 40))
    c = prepare(img, cfg, label=lab)
    f = prepare(Image(np.asfortranarray(img.array), img.affine, "CT"), cfg, label=np.asfortranarray(lab))
    # the passes run in the other order: float rounding only
    assert np.allclose(c.image, f.image, atol=1e-3) and np.array_equal(c.label, f.label)
    assert np.array_equal(c.affine, f.affine)


def test_ct_not_hu_flags_raw_or_twice_rescaled_values_but_not_padding():
    from preprocess.transforms import FLAG_CT_NOT_HU, FLAG_NOTES

    img, _ = sample("lps")
    cfg = PreprocessConfig(target_spacing=(4.0, 4.0, 5.0))
    assert FLAG_CT_NOT_HU not in prepare(img, cfg).flags
    padded = img.array.copy()
    padded[:12, :12] = -3024.0  # PixelPaddingValue outside the reconstruction circle, not air
    assert FLAG_CT_NOT_HU not in prepare(Image(padded, img.affine, "CT"), cfg).flags
    noisy = img.array + np.random.default_rng(0).normal(0, 20, img.array.shape).astype(np.float32)
    for values in (noisy + 1024, noisy - 1024, padded + 1024):  # stored values; intercept applied twice
        p = prepare(Image(values, img.affine, "CT"), cfg)
        assert FLAG_CT_NOT_HU in p.flags  # a flag, not a failure: the case is still prepared
        assert p.image.shape[0] == 1
    assert "RescaleSlope" in FLAG_NOTES[FLAG_CT_NOT_HU]
    assert FLAG_CT_NOT_HU not in prepare(Image(noisy + 1024, img.affine, "MR"), cfg).flags


def test_oblique_boxes_from_instance_maps_are_tight_and_world_boxes_are_flagged():
    """boxes.json holds the world box enclosing an oblique lesion's voxel box; converting that back
    encloses it again. With the instance map the cached box is the lesion's own (IoU > 0.9)."""
    from preprocess.transforms import FLAG_BOXES_ENCLOSING, cached_boxes

    img, lab = sample("oblique")
    instances = lab.astype(np.uint8) * 3  # lesion instance 3
    world = g.boxes_voxel_to_world(g.mask_to_box(instances == 3)[None], img.affine)[0]  # as vol3d synth writes
    rows = [
        {"box_world_ras_mm": world.tolist(), "instance": 3, "finding": "liver_lesion", "organ": "liver"},
        {"box_world_ras_mm": world.tolist(), "finding": "no instance", "organ": ""},  # no map value: world box
    ]
    p = prepare(img, PreprocessConfig(target_spacing=(3.0, 3.0, 3.5)), label=instances, instances=instances)
    assert FLAG_OBLIQUE in p.flags and np.array_equal(p.instances, p.label)  # the label's resampling
    truth = g.mask_to_box(p.label == 3)  # the lesion's extent in the cache (nearest neighbour)
    tight = cached_boxes(rows, p, instances)
    assert tight.source == ["mask", "world_box"] and tight.flags == [FLAG_BOXES_ENCLOSING]
    np.testing.assert_array_equal(tight.vox[0], truth)
    assert np.allclose(tight.visible, 1.0)
    np.testing.assert_allclose(tight.world[0], g.boxes_voxel_to_world(tight.vox[:1], p.affine)[0], atol=1e-6)
    p = prepare(img, PreprocessConfig(target_spacing=(3.0, 3.0, 3.5)), label=instances)
    loose = cached_boxes(rows[:1], p)  # no instance map: the enclosing box, flagged
    assert loose.source == ["world_box"] and loose.flags == [FLAG_BOXES_ENCLOSING]
    assert g.box_iou(loose.vox, truth[None])[0, 0] < 0.75
    assert (loose.vox[0, :3] <= tight.vox[0, :3] + 1e-6).all() and (loose.vox[0, 3:] >= tight.vox[0, 3:] - 1e-6).all()
    # a non-oblique grid: the world box is exact, no flag
    img, lab = sample("lps")
    p = prepare(img, PreprocessConfig(target_spacing=(3.0, 3.0, 3.5)), label=lab, instances=lab)
    world = g.boxes_voxel_to_world(g.mask_to_box(lab)[None], img.affine)[0]
    row = {"box_world_ras_mm": world.tolist(), "instance": 1}
    straight = cached_boxes([{k: v for k, v in row.items() if k != "instance"}], p)
    assert straight.flags == [] and g.box_iou(straight.vox, cached_boxes([row], p, lab).vox)[0, 0] > 0.85


def test_mr_zscore_normalisation_maps_the_foreground_mean_to_one_half():
    rng = np.random.default_rng(0)
    arr = np.full((40, 40, 30), 2.0, np.float32)  # background
    arr[8:32, 8:32, 6:24] = rng.normal(300.0, 40.0, (24, 24, 18))  # tissue, arbitrary MR units
    cfg = PreprocessConfig(target_spacing=None, crop_foreground=False, mr_normalisation="zscore", mr_zscore_clip=4.0)
    p = prepare(Image(arr, np.eye(4), "MR"), cfg)
    (lo, hi), = p.windows
    fg = arr[8:32, 8:32, 6:24]
    assert lo == pytest.approx(fg.mean() - 4 * fg.std(), rel=0.02) and hi == pytest.approx(fg.mean() + 4 * fg.std(), rel=0.02)
    cached = p.image[0].astype(np.float32)[8:32, 8:32, 6:24]
    assert cached.mean() == pytest.approx(0.5, abs=0.01) and cached.std() == pytest.approx(1 / 8, rel=0.05)
    with pytest.raises(Exception, match="mr_normalisation"):
        PreprocessConfig(mr_normalisation="minmax")
    # a default-valued new field leaves the parameters' hash of older caches alone; a set one changes it
    assert PreprocessConfig().params_hash() == PreprocessConfig(mr_bias_correction=False).params_hash()
    assert PreprocessConfig().params_hash() != cfg.params_hash()


def test_n4_bias_correction_evens_out_one_tissue_under_a_coil_bias():
    from preprocess.transforms import n4_corrected

    x, y, z = np.meshgrid(np.arange(48), np.arange(48), np.arange(32), indexing="ij")
    body = ((x - 24) ** 2 / 20**2 + (y - 24) ** 2 / 20**2 + (z - 16) ** 2 / 13**2) <= 1
    bias = 0.65 + 0.7 * (x / 47.0)  # a smooth left-right gain, 0.65 .. 1.35
    noise = np.random.default_rng(1).normal(0, 3, body.shape)
    arr = np.where(body, 200.0 * bias + noise, 5.0).astype(np.float32)
    inner = ndimage.binary_erosion(body, iterations=2)
    # on the raw intensities: one tissue, one intensity again (coefficient of variation 0.12 -> noise's 0.015)
    fixed = n4_corrected(arr, body, (2.0, 2.0, 3.0))
    assert arr[inner].std() / arr[inner].mean() > 0.1 and fixed[inner].std() / fixed[inner].mean() < 0.03
    # through prepare: the cached intensity no longer follows the coil's gradient (left-right)
    plain = PreprocessConfig(target_spacing=None, crop_foreground=False)
    n4 = PreprocessConfig(target_spacing=None, crop_foreground=False, mr_bias_correction=True)
    corr = {}
    for name, cfg in (("plain", plain), ("n4", n4)):
        cached = prepare(Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]), "MR"), cfg).image[0].astype(np.float32)
        corr[name] = np.corrcoef(cached[inner], x[inner])[0, 1]
    assert corr["plain"] > 0.95 and abs(corr["n4"]) < 0.3
