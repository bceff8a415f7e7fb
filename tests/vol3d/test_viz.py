import json
import re

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from preprocess.errors import InputError  # noqa: E402
from preprocess.geometry import boxes_voxel_to_world  # noqa: E402
from vol3d import viz  # noqa: E402

SHAPE = (20, 16, 10)  # (X, Y, Z)
SPACING = (0.5, 1.0, 2.0)  # deliberately anisotropic so a wrong aspect shows
BOX = np.array([[10.5, 3.5, 2.5, 15.5, 8.5, 6.5]])  # voxels i 11..15, j 4..8, k 3..6


def _patches(ax, gid):
    return [p for p in ax.patches if p.get_gid() == gid]


def _draw(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255  # (H, W, 3), row 0 at the top


def test_rectangles_sit_at_the_slice_cut_with_radiological_flip_and_aspect():
    fig = viz.show_box_slices(np.zeros(SHAPE), BOX, BOX, spacing=SPACING)
    axial, coronal, sagittal = fig.axes[:3]
    # (rectangle corner, width, height) in each view's (horizontal, vertical) array axes.
    expected = {axial: ((10.5, 3.5), 5, 5), coronal: ((10.5, 2.5), 5, 4), sagittal: ((3.5, 2.5), 5, 4)}
    aspects = {axial: 1.0 / 0.5, coronal: 2.0 / 0.5, sagittal: 2.0 / 1.0}
    for ax, (xy, w, h) in expected.items():
        for gid in ("pred-0", "true-0"):
            (rect,) = _patches(ax, gid)
            assert rect.get_xy() == pytest.approx(xy)
            assert (rect.get_width(), rect.get_height()) == pytest.approx((w, h))
        assert _patches(ax, "pred-0")[0].get_linestyle() == "-"
        assert _patches(ax, "true-0")[0].get_linestyle() == "--"
        assert ax.get_aspect() == pytest.approx(aspects[ax])
        x_left, x_right = ax.get_xlim()
        assert x_left > x_right  # high index (patient right / anterior) on the image left
        assert ax.get_ylim()[0] < ax.get_ylim()[1]  # anterior / superior up

    _draw(fig)
    ax_px = axial.get_window_extent()
    rect_px = _patches(axial, "pred-0")[0].get_window_extent()
    # Flip: the box's high-i edge (15.5) is its left edge on screen, 4 voxels from the left border (19.5).
    assert rect_px.x0 - ax_px.x0 == pytest.approx((19.5 - 15.5) / 20 * ax_px.width, abs=2)
    # Aspect: 5 voxels x 0.5 mm wide against 5 voxels x 1 mm tall.
    assert rect_px.width / rect_px.height == pytest.approx(0.5, rel=0.05)
    cor_px = _patches(coronal, "pred-0")[0].get_window_extent()
    assert cor_px.width / cor_px.height == pytest.approx((5 * 0.5) / (4 * 2.0), rel=0.05)


def test_slices_that_miss_a_box_draw_no_rectangle_for_it():
    far = np.array(
        [1.5, 11.5, 7.5, 3.5, 13.5, 9.5]
    )  # i 2..3, j 12..13, k 8..9: disjoint from BOX on every axis
    fig = viz.show_box_slices(np.zeros(SHAPE), np.stack([BOX[0], far]), None, spacing=SPACING)
    for ax in fig.axes[:3]:
        assert len(_patches(ax, "pred-0")) == 1
        assert _patches(ax, "pred-1") == []
    # The plane through voxel centres cuts z 2.5..6.5 at k=3..6 but not at k=2 or k=7.
    for k, drawn in ((2, False), (3, True), (6, True), (7, False)):
        fig = viz.show_box_slices(np.zeros(SHAPE), BOX, None, spacing=SPACING, center=(13, 6, k))
        assert bool(_patches(fig.axes[0], "pred-0")) is drawn
    # Centred on the far box, that one is drawn and the first is not.
    fig = viz.show_box_slices(
        np.zeros(SHAPE), np.stack([BOX[0], far]), None, spacing=SPACING, center=(2.5, 12.5, 8.5)
    )
    assert _patches(fig.axes[0], "pred-1") and not _patches(fig.axes[0], "pred-0")


def test_box_text_gives_world_mm_and_size():
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-100.0, 20.0, 5.0]
    lines = viz.describe_boxes(BOX, SPACING, affine, prefix="pred")
    world = boxes_voxel_to_world(BOX, affine)[0]
    assert f"x {world[0]:.1f}..{world[3]:.1f}" in lines[0]
    assert "size 2.5 x 5.0 x 8.0 mm" in lines[0]
    fig = viz.show_box_slices(
        np.zeros(SHAPE), BOX, None, spacing=SPACING, affine=affine, labels=["liver_lesion"]
    )
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(lines[0] in t for t in texts)
    legend_labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend_labels == ["predicted: liver_lesion"]


def test_png_has_box_colour_on_the_box_edge_and_bright_voxels_on_image_left(tmp_path):
    vol = np.zeros(SHAPE, np.float32)
    vol[15:, :, :] = 1.0  # the patient's right side (high i) is bright
    fig = viz.show_box_slices(vol, BOX, None, spacing=SPACING)
    rgb = _draw(fig)
    height = rgb.shape[0]
    axial = fig.axes[0]
    ax_px = axial.get_window_extent()
    # Bright voxels (i >= 15) must land in the left quarter of the axial panel.
    row = int(height - (ax_px.y0 + ax_px.height * 0.3))
    left = rgb[row, int(ax_px.x0 + 0.1 * ax_px.width)]
    right = rgb[row, int(ax_px.x0 + 0.9 * ax_px.width)]
    assert left.mean() > 0.9 and right.mean() < 0.1
    # The box's left edge is drawn in box colour 0.
    r = _patches(axial, "pred-0")[0].get_window_extent()
    col, mid = int(round(r.x0)), int(height - (r.y0 + r.y1) / 2)
    edge = rgb[mid - 1 : mid + 2, col - 2 : col + 3].reshape(-1, 3)
    assert np.abs(edge - to_rgb(viz.BOX_COLORS[0])).sum(axis=1).min() < 0.1

    path = viz.save_figure(fig, tmp_path / "sub" / "slices.png")
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 600
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20
    assert (np.abs(img[..., :3] - to_rgb(viz.BOX_COLORS[0])).sum(axis=-1) < 0.05).sum() > 50


def test_channel_first_volume_and_bad_shape():
    fig = viz.show_box_slices(np.zeros((2, *SHAPE)), BOX, None, spacing=SPACING, channel=1)
    assert fig.axes[0].images[0].get_array().shape == (SHAPE[1], SHAPE[0])  # axial shows (Y rows, X cols)
    with pytest.raises(InputError, match="shape"):
        viz.show_box_slices(np.zeros((4, 4)), BOX, None)


def test_gallery_has_one_axes_per_item_and_legend_of_visible_labels():
    vol = np.random.default_rng(0).random(SHAPE)
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:8, 2:8, :] = 1  # liver on every slice
    lab[12:14, 10:12, 0:2] = 9  # lesion away from the mid slice
    items = [(vol, lab, f"case {n}", SPACING) for n in range(5)] + [(vol[None], None, "no label")]
    fig = viz.mid_slice_gallery(items, ncols=4)
    assert len(fig.axes) == len(items)
    assert [ax.get_title() for ax in fig.axes] == [it[2] for it in items]
    assert (
        len(fig.axes[0].images) == 2 and len(fig.axes[-1].images) == 1
    )  # overlay only where a label is given
    overlay = fig.axes[0].images[1].get_array()
    assert overlay.mask.sum() == (lab[:, :, SHAPE[2] // 2] == 0).sum()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["1 liver"]
    brain = viz.mid_slice_gallery(items[:1], names=["background", "hippocampus"])  # an export's own names
    assert [t.get_text() for t in brain.legends[0].get_texts()] == ["1 hippocampus"]
    with pytest.raises(InputError, match="label shape"):
        viz.mid_slice_gallery([(vol, lab[:-1], "bad")])


def test_slider_fallback_is_a_static_grid_through_the_boxes(capsys):
    fig = viz.box_slider(np.zeros(SHAPE), BOX, BOX, SPACING, axis="axial", interactive=False)
    assert "static grid" in capsys.readouterr().out
    slices = [int(ax.get_title().split("=")[1]) for ax in fig.axes]
    assert slices[0] == 3 and slices[-1] == 6  # spans the voxels the box covers
    for ax in fig.axes:
        assert len(_patches(ax, "pred-0")) == 1 and len(_patches(ax, "true-0")) == 1
    with pytest.raises(InputError, match="unknown view"):
        viz.box_slider(np.zeros(SHAPE), BOX, None, SPACING, axis="oblique", interactive=False)


def test_slider_widget_redraws_when_moved():
    pytest.importorskip("ipywidgets")
    box = viz.box_slider(
        np.random.default_rng(0).random(SHAPE), BOX, None, SPACING, axis="coronal", interactive=True
    )
    slider, image = box.children
    assert (slider.min, slider.max, slider.value) == (0, SHAPE[1] - 1, 6)  # starts at the box centre j=6
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    slider.value = 0
    assert image.value != first


def test_highlight_keeps_text_and_wraps_each_box_in_figure_colours():
    answer = "Lesion <box>[1,2,3,40,50,60]</box> & cyst <box>[9,9]</box> and <box>[0,0,0,999,999,999]</box>."
    html = viz.highlight_boxes_in_text(answer)
    assert isinstance(html, str) and html._repr_html_() == html
    plain = re.sub(r"<[^>]+>", "", html).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert plain == answer
    good = re.findall(r'<span class="vol3d-box" data-box="(\d)" style="color:(#[0-9a-f]{6})', html)
    assert good == [("0", viz.BOX_COLORS[0]), ("1", viz.BOX_COLORS[1])]
    assert html.count('class="vol3d-box-bad"') == 1
    assert "<script>" not in viz.highlight_boxes_in_text("<script>x</script>")


def _write_manifest(cache, rows):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_manifest_summary_counts_and_tables(tmp_path):
    ok = {"status": "ok", "reason": "", "detail": "", "shape": [40, 40, 20], "spacing": [1.5, 1.5, 3.0]}
    rows = [
        {**ok, "id": "c_a", "stats": {"spacing": [0.7, 0.7, 2.5], "shape": [512, 512, 100]}},
        {**ok, "id": "c_b", "shape": [50, 40, 20]},
        {"id": "c_c", "status": "skipped", "reason": "LOCALIZER", "detail": "scout", "source": ["dicom/x"]},
        {"id": "c_d", "status": "failed", "reason": "MISSING_SLICES", "detail": "slice 4 of 9 is absent"},
        {"id": "c_e", "status": "failed", "reason": "MISSING_SLICES", "detail": "slice 2 of 9 is absent"},
    ]
    _write_manifest(tmp_path, rows)
    s = viz.manifest_summary(tmp_path)
    assert s["counts"] == [
        {"status": "ok", "reason": "", "n": 2},
        {"status": "skipped", "reason": "LOCALIZER", "n": 1},
        {"status": "failed", "reason": "MISSING_SLICES", "n": 2},
    ]
    assert s["shape"].tolist() == [[40, 40, 20], [50, 40, 20]] and s["spacing"].shape == (2, 3)
    assert [r["id"] for r in s["not_ok"]] == ["c_c", "c_d", "c_e"]
    table = viz.format_table(s["not_ok"], ["id", "status", "reason", "detail", "source"]).splitlines()
    assert table[0].split() == ["id", "status", "reason", "detail", "source"]
    assert len(table) == 2 + 3 and "slice 4 of 9 is absent" in table[3]
    fig = viz.manifest_histograms(s)
    assert len(fig.axes) == 6 and all(len(ax.patches) > 0 for ax in fig.axes)
    assert s["source_spacing"][0].tolist() == [0.7, 0.7, 2.5] and np.isnan(s["source_spacing"][1]).all()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["source", "cached"]


def test_manifest_summary_keeps_the_latest_row_per_id_and_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="manifest.jsonl not found"):
        viz.manifest_summary(tmp_path)
    first = {"id": "c_a", "status": "failed", "reason": "UNREADABLE", "detail": "truncated"}
    redone = {"id": "c_a", "status": "ok", "reason": "", "shape": [4, 4, 4], "spacing": [1, 1, 1]}
    _write_manifest(tmp_path, [first, redone])
    s = viz.manifest_summary(tmp_path)
    assert [r["status"] for r in s["rows"]] == ["ok"] and s["counts"] == [
        {"status": "ok", "reason": "", "n": 1}
    ]
    (tmp_path / "manifest.jsonl").write_text('{"id": "a", "status": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        viz.manifest_summary(tmp_path)


def test_read_cached_case_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    affine = np.diag([*SPACING, 1.0])
    row = {"id": "c_1", "status": "ok", "h5": "cases/c_/c_1.h5", "key": "c_1"}
    (tmp_path / "cases" / "c_").mkdir(parents=True)
    with h5py.File(tmp_path / row["h5"], "w") as f:  # the layout of docs/formats.md section 2
        g = f.create_group("c_1")
        g["image"] = np.ones((1, *SHAPE), np.float16)
        g["label"] = np.zeros(SHAPE, np.uint8)
        g["boxes/vox"] = BOX.astype(np.float32)
        g["boxes/world"] = boxes_voxel_to_world(BOX, affine).astype(np.float32)
        g["boxes/visible"] = np.ones(1, np.float32)
        g["boxes/finding"] = np.array([b"liver_lesion"])
        g["boxes/organ"] = np.array([b"liver"])
        g.attrs["affine"] = affine
        g.attrs["spacing"] = np.array(SPACING)
        g.attrs["orig_affine"] = affine
        g.attrs["cached_to_orig"] = np.eye(4)
        g.attrs["orig_shape"] = np.array(SHAPE)
    case = viz.read_cached_case(tmp_path, row)
    assert case["frames"].orig_shape == tuple(SHAPE) and np.allclose(case["frames"].affine, affine)
    assert case["image"].shape == (1, *SHAPE) and case["label"].shape == SHAPE
    assert np.allclose(case["boxes_vox"], BOX) and case["findings"] == ["liver_lesion"]
    assert np.allclose(case["affine"], affine) and np.allclose(case["spacing"], SPACING)
    with pytest.raises(InputError, match="missing"):
        viz.read_cached_case(tmp_path, {**row, "h5": "cases/nope.h5"})


def test_label_names_come_from_the_caches_vocabulary(tmp_path):
    import json

    assert viz.label_names(tmp_path)[1] == "liver"  # no vocab.json: the synthetic phantom's names
    vocab = {"findings": {"nodule": {"text": "nodule", "organ": "lung"}}, "labels": ["background", "caudate"]}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    assert viz.label_names(tmp_path) == ("background", "caudate")


def test_chain_rows_pair_each_step_with_its_true_one():
    from types import SimpleNamespace as NS

    def step(kind, name, box=None, value=None, text="", answer=False):
        box = None if box is None else (NS(model_vox=np.asarray(box, float)) if answer else np.asarray(box, float))
        return NS(kind=kind, name=name, box=box, value=value, text=text)

    truth = NS(steps=[step("organ", "liver", [0, 0, 0, 10, 10, 10], 900.0), step("finding", "liver_lesion",
                      [2, 2, 2, 4, 4, 4], 20.0), step("conclusion", "liver_lesion", None, 1.0, "1 detected")])
    answer = NS(steps=[step("organ", "liver", [0, 0, 0, 10, 10, 5], 850.0, answer=True),
                       step("finding", "liver_lesion", [2, 2, 2, 4, 4, 4], 24.0, answer=True),
                       step("finding", "liver_lesion", [6, 6, 6, 8, 8, 8], 10.0, answer=True),
                       step("conclusion", "liver_lesion", None, 1.0, "2 detected", answer=True)])
    rows = viz.chain_rows(answer, truth)
    assert [r["iou"] for r in rows[:3]] == [0.5, 1.0, None]  # the second lesion has no true counterpart
    assert rows[0]["error"] == -50.0 and rows[1]["error"] == 4.0 and rows[3]["error"] is None
    assert rows[3]["truth"] == "1 detected"
    table = viz.chain_table(answer, truth)
    assert table.splitlines()[0].split() == ["step", "model", "truth", "iou", "error"] and "+4.0" in table
