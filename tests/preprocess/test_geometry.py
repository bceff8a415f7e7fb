import numpy as np
import pytest

from preprocess import geometry as g


def test_dicom_affine_axial_head_first_maps_pixels_to_ras():
    # axial, rows run posterior (+y LPS), columns run left (+x LPS)
    aff = g.affine_from_dicom([-100.0, -120.0, 50.0], [1, 0, 0, 0, 1, 0], [0.8, 0.7], [0, 0, 2.5])
    # pixel (column 10, row 20, slice 3) in LPS:
    lps = np.array([-100 + 10 * 0.7, -120 + 20 * 0.8, 50 + 3 * 2.5])
    ras = lps * [-1, -1, 1]
    assert np.allclose(g.voxel_to_world(aff, [10, 20, 3]), ras)
    assert np.allclose(g.spacing_from_affine(aff), [0.7, 0.8, 2.5])


def test_world_voxel_round_trip_oblique():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q * [0.7, 0.9, 3.0]
    aff[:3, 3] = [10, -5, 30]
    pts = rng.normal(size=(20, 3)) * 50
    assert np.allclose(g.voxel_to_world(aff, g.world_to_voxel(aff, pts)), pts)


def test_box_world_voxel_round_trip_with_flips():
    aff = np.diag([-0.8, 0.8, 2.0, 1.0])
    aff[:3, 3] = [100, -50, 10]
    box = np.array([[2.5, 3.5, 1.5, 10.5, 7.5, 4.5]])
    world = g.boxes_voxel_to_world(box, aff)
    assert (world[:, :3] <= world[:, 3:]).all()
    assert np.allclose(g.boxes_world_to_voxel(world, aff), box)


def test_mask_to_box_covers_whole_voxels():
    m = np.zeros((10, 10, 10), bool)
    m[2:5, 3, 7:9] = True
    assert np.allclose(g.mask_to_box(m), [1.5, 2.5, 6.5, 4.5, 3.5, 8.5])
    assert np.isclose(g.box_volume(g.mask_to_box(m))[0], m.sum())
    assert g.mask_to_box(np.zeros((3, 3, 3))) is None


def test_iou_is_intersection_over_union_not_enclosing_box():
    a = np.array([0, 0, 0, 2, 2, 2])
    b = np.array([1, 0, 0, 3, 2, 2])
    # intersection 4, union 12 (an enclosing-box "IoU" would give 4/12 too here, so use a diagonal shift)
    assert np.isclose(g.box_iou(a, b)[0, 0], 4 / 12)
    c = np.array([1, 1, 1, 3, 3, 3])
    assert np.isclose(g.box_iou(a, c)[0, 0], 1 / 15)  # enclosing box would give 1/27
    assert g.box_iou(a, np.array([5, 5, 5, 6, 6, 6]))[0, 0] == 0


def test_text_round_trip_and_parse_rejects_malformed():
    shape = (96, 96, 48)
    box = np.array([[10.5, 20.5, 3.5, 40.5, 50.5, 20.5]])
    ints = g.normalise_boxes(box, shape)
    text = "There is a lesion " + g.format_box(ints[0]) + " in the liver."
    parsed = g.parse_boxes(text)
    assert len(parsed) == 1
    back = g.denormalise_boxes(parsed[0], shape)
    # quantisation error at most half a step of 1/999 of the axis
    assert np.abs(back - box).max() <= 0.5 * 96 / 999 + 1e-9
    bad = "<box>[1,2,3]</box> <box>[5,5,5,1,1,1]</box> <box>[1,2,3,4,5,1000]</box> <box>[a,b,c,d,e,f]</box>"
    assert g.parse_boxes(bad) == []
    assert len(g.parse_boxes("<box>[ 1, 2, 3, 4, 5, 6 ]</box><box>[0,0,0,999,999,999]</box>")) == 2


def test_clip_boxes_reports_visible_fraction():
    clipped, frac = g.clip_boxes([[-10.5, 0, 0, 9.5, 4, 4], [20, 20, 20, 30, 30, 30]], (10, 10, 10))
    assert np.isclose(frac[0], 0.5)
    assert frac[1] == 0
    assert clipped[0, 0] == -0.5


@pytest.mark.parametrize("shape", [(8, 9, 10), (128, 128, 64)])
def test_normalise_extremes(shape):
    full = np.array([[-0.5, -0.5, -0.5, shape[0] - 0.5, shape[1] - 0.5, shape[2] - 0.5]])
    assert g.normalise_boxes(full, shape).tolist() == [[0, 0, 0, 999, 999, 999]]


def test_unit_boxes_map_the_index_range_onto_0_1_and_clip():
    """Each axis' edges -0.5 and n - 0.5 map onto 0 and 1; what lies beyond the volume clips."""
    boxes = np.array([[-0.5, 3.5, 0.0, 7.5, 31.5, 15.5], [-3.0, 0.0, 0.0, 40.0, 10.0, 20.0]])
    unit = g.unit_boxes(boxes, (32, 32, 16))
    np.testing.assert_allclose(unit[0], [0, 0.125, 0.03125, 0.25, 1, 1])
    np.testing.assert_allclose(unit[1], [0, 0.015625, 0.03125, 1, 0.328125, 1])  # x and z ends clip


@pytest.mark.parametrize("ndim", [3, 4])
def test_affine_from_itk_matches_simpleitk_physical_points(ndim):
    """affine_from_itk(direction, spacing, origin) = LPS_TO_RAS @ SimpleITK's index -> LPS map."""
    import SimpleITK as sitk

    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    img = sitk.Image([5, 6, 7] + [2] * (ndim - 3), sitk.sitkFloat32)
    direction = np.eye(ndim)
    direction[:3, :3] = rot
    img.SetDirection(direction.ravel().tolist())
    img.SetSpacing([0.7, 0.8, 2.5] + [1.0] * (ndim - 3))
    img.SetOrigin([12.0, -30.0, 45.0] + [0.0] * (ndim - 3))
    aff = g.affine_from_itk(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    for idx in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (1.5, 2.25, 3.5)]:
        lps = img.TransformContinuousIndexToPhysicalPoint([*idx] + [0.0] * (ndim - 3))[:3]
        ras = g.LPS_TO_RAS[:3, :3] @ np.asarray(lps)
        np.testing.assert_allclose(g.apply_affine(aff, np.asarray(idx, float)), ras, atol=1e-9)
    with pytest.raises(ValueError, match="DxD"):
        g.affine_from_itk([1.0, 0.0, 0.0, 1.0], [1, 1], [0, 0])
