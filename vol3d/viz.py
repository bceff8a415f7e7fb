"""Plotting helpers for volumes, boxes, label maps and cache manifests (matplotlib, lazy).

Arrays follow the conventions of :mod:`preprocess.geometry`: volumes are ``(X, Y, Z)``
(or ``(C, X, Y, Z)``) in RAS+ order (``i`` towards patient Right, ``j`` Anterior, ``k``
Superior) and voxel boxes are continuous index boxes ``(x0, y0, z0, x1, y1, z1)`` where
voxel ``i`` covers ``[i-0.5, i+0.5]``.

Slices are displayed the radiological way:

- axial: patient's right on the image left, anterior up;
- coronal: patient's right on the image left, superior up;
- sagittal: anterior on the image left, superior up.

Axes are in voxel index units (so a box is drawn at its own coordinates) with the aspect
ratio set from the spacing, so a millimetre is the same length across and up. A box is
drawn on a slice when the slice plane (through the voxel centres ``k``) cuts it, i.e.
``z0 <= k <= z1`` for an axial slice; other boxes are absent from that slice.

Predicted box ``n`` and true box ``n`` share colour ``BOX_COLORS[n]`` (predicted solid,
true dashed); :func:`highlight_boxes_in_text` colours the ``n``-th box of an answer the
same way, so text and figure match.

Figures are built as :class:`matplotlib.figure.Figure` objects (not through pyplot), so
nothing accumulates in global state and a notebook shows each figure once.
"""

from __future__ import annotations

import dataclasses
import html
import io
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocess.errors import InputError
from preprocess.geometry import as_boxes, boxes_voxel_to_world, parse_boxes

if TYPE_CHECKING:  # matplotlib is imported lazily at run time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colours of box ``n`` (cycled); bright so they read on a grey CT slice.
BOX_COLORS = ("#00e5ff", "#ff3ec9", "#ffd400", "#7cfc00", "#ff8c1a", "#b388ff", "#ff4d4d", "#ffffff")

#: Organ label colours by value (0 background is never drawn); names in ``vol3d.synth.LABELS``.
LABEL_COLORS = (
    "#000000",  # 0 background
    "#c0703a",  # 1 liver
    "#8e44ad",  # 2 spleen
    "#f39c12",  # 3 kidney_left
    "#f7dc6f",  # 4 kidney_right
    "#3498db",  # 5 lung_left
    "#85c1e9",  # 6 lung_right
    "#ecf0f1",  # 7 spine
    "#e74c3c",  # 8 aorta
    "#2ecc71",  # 9 lesion
)


@dataclasses.dataclass(frozen=True)
class _View:
    """How one orthogonal view maps the volume's axes onto the screen."""

    name: str
    axis: int  # array axis the slice is taken along
    h: int  # array axis shown horizontally (displayed decreasing: R, R, A on the left)
    v: int  # array axis shown vertically (increasing upwards: A, S, S)
    letters: tuple[str, str, str, str]  # patient direction at the left, right, top, bottom edges


VIEWS = {
    "axial": _View("axial", axis=2, h=0, v=1, letters=("R", "L", "A", "P")),
    "coronal": _View("coronal", axis=1, h=0, v=2, letters=("R", "L", "S", "I")),
    "sagittal": _View("sagittal", axis=0, h=1, v=2, letters=("A", "P", "S", "I")),
}


# ----------------------------------------------------------------------------- matplotlib set-up


def _matplotlib() -> Any:
    """Import matplotlib, choosing Agg when there is no display (headless servers, CI)."""
    import matplotlib

    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    # A notebook kernel sets MPLBACKEND (inline); respect any explicit choice and never switch after pyplot.
    if headless and "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


def _new_figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, **kwargs)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. ``.png``/``.pdf``), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    return path


# ----------------------------------------------------------------------------- slices and boxes


def _as_volume(volume: np.ndarray, channel: int = 0) -> np.ndarray:
    """``(X, Y, Z)`` or ``(C, X, Y, Z)`` -> float32 ``(X, Y, Z)`` (one channel)."""
    vol = np.asarray(volume)
    if vol.ndim == 4:
        vol = vol[channel]
    if vol.ndim != 3:
        raise InputError(f"expected a volume (X, Y, Z) or (C, X, Y, Z), got shape {tuple(np.shape(volume))}")
    return vol.astype(np.float32, copy=False)


def _window(vol: np.ndarray) -> tuple[float, float]:
    """Display range: the 0.5th..99.9th intensity percentiles (on a subsample: big CTs are slow to sort)."""
    step = max(1, int(round((vol.size / 2e6) ** (1 / 3))))
    lo, hi = np.percentile(vol[::step, ::step, ::step], [0.5, 99.9])
    return float(lo), float(hi if hi > lo else lo + 1)


def _view(name: str) -> _View:
    if name not in VIEWS:
        raise InputError(f"unknown view {name!r}; use one of {', '.join(VIEWS)}")
    return VIEWS[name]


def _cuts(box: np.ndarray, view: _View, index: int) -> bool:
    """Whether the slice plane through voxel centre ``index`` along ``view.axis`` cuts the box."""
    return bool(box[view.axis] <= index <= box[view.axis + 3])


def _box_style(kind: str, n: int) -> dict:
    return {
        "edgecolor": BOX_COLORS[n % len(BOX_COLORS)],
        "linestyle": "-" if kind == "pred" else "--",
        "linewidth": 2.0 if kind == "pred" else 1.6,
    }


def _draw_slice(
    ax: Axes,
    vol: np.ndarray,
    view: _View,
    index: int,
    spacing: Sequence[float],
    boxes: dict[str, np.ndarray],
    window: tuple[float, float],
    label: np.ndarray | None = None,
) -> None:
    """Draw slice ``index`` of ``vol (X, Y, Z)`` in ``view`` with the boxes it cuts.

    ``boxes`` maps ``"pred"``/``"true"`` to voxel boxes ``(N, 6)``. Rectangles carry the
    gid ``"<kind>-<n>"`` so callers (and tests) can find them.
    """
    from matplotlib.patches import Rectangle

    plane = np.take(vol, index, axis=view.axis)  # (n_h, n_v): the remaining axes keep their order
    n_h, n_v = vol.shape[view.h], vol.shape[view.v]
    # Data x = array index, so boxes are drawn at their own coordinates; the inverted x
    # limits below put high indices (patient right / anterior) on the image left.
    extent = (-0.5, n_h - 0.5, -0.5, n_v - 0.5)
    ax.imshow(
        plane.T,
        cmap="gray",
        origin="lower",
        extent=extent,
        vmin=window[0],
        vmax=window[1],
        interpolation="nearest",
    )
    if label is not None:
        _overlay_label(ax, np.take(label, index, axis=view.axis), extent)
    ax.set_xlim(n_h - 0.5, -0.5)
    ax.set_ylim(-0.5, n_v - 0.5)
    ax.set_aspect(float(spacing[view.v]) / float(spacing[view.h]))
    for kind, arr in boxes.items():
        for n, b in enumerate(arr):
            if not _cuts(b, view, index):
                continue
            rect = Rectangle(
                (b[view.h], b[view.v]),
                b[view.h + 3] - b[view.h],
                b[view.v + 3] - b[view.v],
                fill=False,
                **_box_style(kind, n),
            )
            rect.set_gid(f"{kind}-{n}")
            ax.add_patch(rect)
    _orientation_letters(ax, view)
    ax.set_title(f"{view.name}  {'ijk'[view.axis]}={index}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _orientation_letters(ax: Axes, view: _View) -> None:
    left, right, top, bottom = view.letters
    style = {"transform": ax.transAxes, "color": "#ffeb3b", "fontsize": 9, "fontweight": "bold"}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _box_legend_handles(boxes: dict[str, np.ndarray], labels: Sequence[str] | None) -> list:
    from matplotlib.lines import Line2D

    handles = []
    for kind, arr in boxes.items():
        for n in range(len(arr)):
            name = labels[n] if labels is not None and n < len(labels) else f"box {n + 1}"
            style = _box_style(kind, n)
            handles.append(
                Line2D(
                    [],
                    [],
                    color=style["edgecolor"],
                    linestyle=style["linestyle"],
                    linewidth=style["linewidth"],
                    label=f"{'predicted' if kind == 'pred' else 'true'}: {name}",
                )
            )
    return handles


def describe_boxes(
    boxes_vox: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    prefix: str = "box",
) -> list[str]:
    """One line per voxel box ``(N, 6)``: world RAS+ mm corners (when ``affine`` is given) and size in mm."""
    b = as_boxes(boxes_vox)
    size = (b[:, 3:] - b[:, :3]) * np.asarray(spacing, dtype=float)
    world = boxes_voxel_to_world(b, affine) if affine is not None else None
    lines = []
    for n in range(len(b)):
        where = (
            "RAS mm x {:.1f}..{:.1f}, y {:.1f}..{:.1f}, z {:.1f}..{:.1f}".format(
                *world[n, [0, 3, 1, 4, 2, 5]]
            )
            if world is not None
            else "voxels i {:.1f}..{:.1f}, j {:.1f}..{:.1f}, k {:.1f}..{:.1f}".format(
                *b[n, [0, 3, 1, 4, 2, 5]]
            )
        )
        lines.append(
            f"{prefix} {n + 1}: {where}; size {size[n, 0]:.1f} x {size[n, 1]:.1f} x {size[n, 2]:.1f} mm"
        )
    return lines


def _box_dict(boxes_pred: np.ndarray | None, boxes_true: np.ndarray | None) -> dict[str, np.ndarray]:
    return {
        "pred": as_boxes([] if boxes_pred is None else boxes_pred),
        "true": as_boxes([] if boxes_true is None else boxes_true),
    }


def _default_center(vol: np.ndarray, boxes: dict[str, np.ndarray]) -> np.ndarray:
    """Centre of the first predicted box, else of the first true box, else of the volume."""
    for arr in boxes.values():
        if len(arr):
            return (arr[0, :3] + arr[0, 3:]) / 2
    return (np.asarray(vol.shape, dtype=float) - 1) / 2


def _slice_index(vol: np.ndarray, axis: int, coord: float) -> int:
    return int(np.clip(np.rint(coord), 0, vol.shape[axis] - 1))


def show_box_slices(
    volume: np.ndarray,
    boxes_pred: np.ndarray | None,
    boxes_true: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    center: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    ax: Sequence[Axes] | None = None,
    affine: np.ndarray | None = None,
    channel: int = 0,
) -> Figure:
    """Axial, coronal and sagittal slices through ``center`` with predicted and true boxes.

    Args:
        volume: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` in RAS+ array order (``channel`` picks one).
        boxes_pred: predicted voxel boxes ``(N, 6)`` (solid), or None.
        boxes_true: true voxel boxes ``(M, 6)`` (dashed), or None; box ``n`` shares pred ``n``'s colour.
        spacing: ``(sx, sy, sz)`` in mm, for the aspect ratio and box sizes.
        center: continuous voxel index ``(3,)`` the slices pass through; default the first box's centre.
        labels: names of the boxes for the legend (e.g. findings).
        title: figure title.
        ax: three axes to draw into (axial, coronal, sagittal); default a new figure.
        affine: ``(4, 4)`` index -> RAS+ mm; when given, the text gives boxes in world mm.

    Returns:
        The figure; each box rectangle has gid ``"pred-<n>"``/``"true-<n>"``.
    """
    vol = _as_volume(volume, channel)
    boxes = _box_dict(boxes_pred, boxes_true)
    c = np.asarray(center, dtype=float) if center is not None else _default_center(vol, boxes)
    views = [VIEWS["axial"], VIEWS["coronal"], VIEWS["sagittal"]]
    text = [line for kind, arr in boxes.items() for line in describe_boxes(arr, spacing, affine, prefix=kind)]
    if ax is None:
        n_lines = max(len(text), 1)
        fig = _new_figure((12, 4.2 + 0.22 * n_lines), layout="constrained")
        grid = fig.add_gridspec(2, 3, height_ratios=[4.0, 0.35 + 0.22 * n_lines])
        axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
        info_ax = fig.add_subplot(grid[1, :])
        info_ax.axis("off")
    else:
        axes = list(ax)
        if len(axes) != 3:
            raise ValueError(f"ax must be three axes (axial, coronal, sagittal), got {len(axes)}")
        fig = axes[0].figure
        info_ax = None
    window = _window(vol)
    for a, view in zip(axes, views, strict=True):
        _draw_slice(a, vol, view, _slice_index(vol, view.axis, c[view.axis]), spacing, boxes, window)
    handles = _box_legend_handles(boxes, labels)
    if info_ax is not None:
        if handles:
            info_ax.legend(
                handles=handles, loc="upper left", fontsize=8, frameon=False, ncols=min(len(handles), 4)
            )
        info_ax.text(0.0, 0.0, "\n".join(text), ha="left", va="bottom", fontsize=8, family="monospace")
    else:
        if handles:
            axes[-1].legend(handles=handles, loc="lower right", fontsize=7)
        axes[1].set_xlabel("\n".join(text), fontsize=7, family="monospace")
    if title:
        fig.suptitle(title)
    return fig


def match_order(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """True boxes reordered so that true box ``n`` is the one matched to predicted box ``n``
    (:func:`vol3d.eval.metrics.match_pairs`); unmatched true boxes follow. Then box ``n`` shares
    its colour in :func:`show_box_slices`."""
    from vol3d.eval.metrics import match_pairs

    true = as_boxes(true)
    _, cols, _ = match_pairs(pred, true)  # ordered by predicted box
    order = [int(c) for c in cols]
    return true[order + [i for i in range(len(true)) if i not in order]]


def answer_slices(answer: Any, truth: np.ndarray | None, name: str = "finding",
                  center: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """:func:`show_box_slices` of an :class:`~vol3d.inference.Answer`: its boxes (solid) and the true boxes
    ``(N, 6)`` in model-input voxels (dashed, box ``n`` matched to answer box ``n``), labelled
    ``"<name> n"``, on the channel with the most contrast (the soft-tissue window when the preset has one),
    slices through ``center`` (default the first box), boxes in world mm below."""
    pred = answer.model_boxes
    truth = match_order(pred, truth) if truth is not None else None
    n = max(len(pred), 0 if truth is None else len(truth))
    vol = np.asarray(answer.volume, dtype=np.float32)
    return show_box_slices(vol, pred, truth, spacing=answer.input.spacing, center=center,
                           labels=[f"{name} {i + 1}" for i in range(n)], title=title, affine=answer.affine,
                           channel=_contrast_channel(vol))


def _contrast_channel(vol: np.ndarray) -> int:
    """The channel of ``(C, X, Y, Z)`` with the most contrast (the soft-tissue window when the preset has one)."""
    return int(np.argmax(vol.reshape(vol.shape[0], -1).std(axis=1))) if vol.ndim == 4 else 0


def chain_rows(answer: Any, truth: Any = None) -> list[dict[str, Any]]:
    """The steps of an answer's chain beside the true chain's (:func:`vol3d.tasks.reasoning.reason` on
    the case's ground truth): one row per model step with ``step``, ``model``, ``truth`` (the matching
    true step: same kind and organ/finding, in order), ``iou`` (their boxes, model-input voxels) and
    ``error`` (their values)."""
    from preprocess.geometry import box_iou

    pool = list(truth.steps) if truth is not None else []
    rows = []
    for i, st in enumerate(answer.steps, start=1):
        match = next((t for t in pool if t.kind == st.kind and (t.name == st.name or st.kind == "conclusion")), None)
        if match is not None:
            pool.remove(match)
        iou = error = None
        if match is not None and st.box is not None and match.box is not None:
            iou = float(box_iou(st.box.model_vox[None], np.asarray(match.box, float)[None])[0, 0])
        if match is not None and st.value is not None and match.value is not None and st.kind != "conclusion":
            error = float(st.value) - float(match.value)
        rows.append({"step": f"{i}. {st.kind}", "model": st.text, "truth": match.text if match is not None else "",
                     "iou": iou, "error": error})
    return rows


def chain_table(answer: Any, truth: Any = None) -> str:
    """:func:`chain_rows` as a text table (IoU of the boxes, error of the values)."""
    rows = [{**r, "iou": "" if r["iou"] is None else f"{r['iou']:.2f}",
             "error": "" if r["error"] is None else f"{r['error']:+.1f}"} for r in chain_rows(answer, truth)]
    return format_table(rows, ["step", "model", "truth", "iou", "error"])


def step_slices(answer: Any, step: Any, truth_box: np.ndarray | None = None) -> Figure:
    """Three slices through one chain step's box (solid; ``truth_box`` dashed, model-input voxels), titled
    with the step."""
    box = step.box.model_vox[None] if step.box is not None else np.zeros((0, 6))
    true = None if truth_box is None else as_boxes(truth_box)
    vol = np.asarray(answer.volume, dtype=np.float32)
    return show_box_slices(vol, box, true, spacing=answer.input.spacing, labels=[step.name or step.kind],
                           title=f"{step.kind}: {step.text}", affine=answer.affine, channel=_contrast_channel(vol))


def slice_grid(
    volume: np.ndarray,
    boxes_pred: np.ndarray | None,
    boxes_true: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axis: str = "axial",
    n: int = 6,
    ncols: int = 3,
    channel: int = 0,
    labels: Sequence[str] | None = None,
) -> Figure:
    """A static grid of ``n`` slices along ``axis``, evenly spaced over the boxes' extent (or the volume).

    Each slice shows the boxes it cuts (see :func:`show_box_slices` for the display conventions).
    """
    vol = _as_volume(volume, channel)
    view = _view(axis)
    boxes = _box_dict(boxes_pred, boxes_true)
    every = np.concatenate(list(boxes.values()))
    if len(every):
        lo = max(float(every[:, view.axis].min()), 0.0)
        hi = min(float(every[:, view.axis + 3].max()), vol.shape[view.axis] - 1.0)
    else:
        lo, hi = 0.0, vol.shape[view.axis] - 1.0
    indices = sorted({int(i) for i in np.rint(np.linspace(np.ceil(lo), np.floor(max(hi, lo)), n))})
    nrows = -(-len(indices) // ncols)
    fig = _new_figure((3.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    window = _window(vol)
    for i, index in enumerate(indices):
        _draw_slice(fig.add_subplot(nrows, ncols, i + 1), vol, view, index, spacing, boxes, window)
    handles = _box_legend_handles(boxes, labels)
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", fontsize=8, ncols=min(len(handles), 4), frameon=False
        )
    return fig


def _widgets_available() -> bool:
    """True inside a running IPython kernel with ipywidgets installed (a frontend can show widgets)."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def box_slider(
    volume: np.ndarray,
    boxes_pred: np.ndarray | None,
    boxes_true: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axis: str = "axial",
    interactive: bool | None = None,
    channel: int = 0,
    labels: Sequence[str] | None = None,
) -> Any:
    """Scroll through slices along ``axis`` with an ipywidgets slider; boxes appear on slices they cut.

    ``interactive=None`` uses widgets when running in a notebook kernel with ipywidgets;
    otherwise (or with ``interactive=False``) prints a note and returns :func:`slice_grid`'s
    static figure instead. ``labels`` name the boxes in the legend.

    Returns:
        an ``ipywidgets.VBox`` (slider + image), or a matplotlib Figure in the fallback.
    """
    if interactive is None:
        interactive = _widgets_available()
    if interactive:
        try:
            import ipywidgets
        except ImportError:
            interactive = False
    if not interactive:
        print(
            "box_slider: no notebook widget frontend (ipywidgets) here; showing a static grid of slices instead."
        )
        return slice_grid(volume, boxes_pred, boxes_true, spacing, axis=axis, channel=channel, labels=labels)

    vol = _as_volume(volume, channel)
    view = _view(axis)
    boxes = _box_dict(boxes_pred, boxes_true)
    window = _window(vol)
    fig = _new_figure((5.5, 5.0), layout="constrained")
    image = ipywidgets.Image(format="png")
    handles = _box_legend_handles(boxes, labels)

    def render(index: int) -> None:
        # Rendering to PNG bytes works with any matplotlib backend, inline or not.
        fig.clear()
        ax = fig.add_subplot()
        _draw_slice(ax, vol, view, index, spacing, boxes, window)
        if handles:
            ax.legend(handles=handles, loc="lower right", fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        image.value = buf.getvalue()

    start = _slice_index(vol, view.axis, _default_center(vol, boxes)[view.axis])
    slider = ipywidgets.IntSlider(
        value=start, min=0, max=vol.shape[view.axis] - 1, description=f"{axis} {'ijk'[view.axis]}"
    )
    slider.observe(lambda change: render(change["new"]), names="value")
    render(start)
    return ipywidgets.VBox([slider, image])


def show_slider(
    volume: np.ndarray,
    boxes_pred: np.ndarray | None,
    boxes_true: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axis: str = "axial",
    channel: int = 0,
    labels: Sequence[str] | None = None,
) -> None:
    """Display :func:`box_slider` and, under it, :func:`slice_grid`'s static grid of the same slices.

    A static rendering of the notebook (nbconvert HTML, a static viewer, a shared report) cannot
    run the slider's widget, so the grid is what it shows; in a live notebook the grid is the
    overview and the slider the detail."""
    from IPython.display import display
    from matplotlib.figure import Figure

    slider = box_slider(volume, boxes_pred, boxes_true, spacing, axis=axis, channel=channel, labels=labels)
    display(slider)
    if not isinstance(slider, Figure):  # without widgets box_slider gave the static grid already
        display(slice_grid(volume, boxes_pred, boxes_true, spacing, axis=axis, channel=channel, labels=labels))


def explore(run: Any, cache: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Pick a case, type a question, see the answer, its boxes on three slices and the box table,
    updated in place: :func:`vol3d.explorer.explore` (``question``, ``case``, ``interactive``,
    ``device``, ``max_new_tokens``). Returns the :class:`vol3d.explorer.Explorer`."""
    from vol3d.explorer import explore as _explore

    return _explore(run, cache, **kwargs)


# ----------------------------------------------------------------------------- label maps


def label_names(cache_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Label names by value (0 background ...): the cache's ``vocab.json`` ``labels`` (what
    ``vol3d preprocess --vocab`` copied from the export) when it has them, else the synthetic
    phantom's (``vol3d.synth.LABELS``, what ``vol3d synth`` exports)."""
    if cache_dir is not None:
        from preprocess.sidecars import cache_vocabulary

        labels = cache_vocabulary(cache_dir).get("labels") or []
        if labels:
            return tuple(str(n) for n in labels)
    from vol3d.synth import LABELS

    return tuple(LABELS)


def _overlay_label(ax: Axes, plane: np.ndarray, extent: tuple[float, float, float, float]) -> None:
    """Colour the non-zero values of a label slice ``(n_h, n_v)`` with :data:`LABEL_COLORS`."""
    from matplotlib.colors import ListedColormap

    masked = np.ma.masked_equal(np.asarray(plane).T, 0)
    cmap = ListedColormap(LABEL_COLORS)
    ax.imshow(
        masked,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(LABEL_COLORS) - 0.5,
        origin="lower",
        extent=extent,
        alpha=0.45,
        interpolation="nearest",
    )


def mid_slice_gallery(
    items: Sequence[tuple],
    ncols: int = 4,
    axis: str = "axial",
    channel: int = 0,
    names: Sequence[str] | None = None,
) -> Figure:
    """One mid-slice per item with its label map overlaid, and a legend of the label values shown.

    Args:
        items: ``(volume, label | None, title)`` or ``(volume, label | None, title, spacing)``;
            volume ``(X, Y, Z)`` or ``(C, X, Y, Z)``, label ``(X, Y, Z)`` integer label values.
        ncols: panels per row.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        names: label names by value for the legend (default :func:`label_names`).

    Returns:
        A figure with exactly one axes per item.
    """
    from matplotlib.patches import Patch

    if not items:
        raise InputError("mid_slice_gallery needs at least one (volume, label, title) item")
    view = _view(axis)
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    # Panel height follows the first item's physical aspect so rows do not float apart.
    first, first_spacing = (
        _as_volume(items[0][0], channel),
        items[0][3] if len(items[0]) > 3 else (1.0, 1.0, 1.0),
    )
    ratio = (first.shape[view.v] * first_spacing[view.v]) / (first.shape[view.h] * first_spacing[view.h])
    fig = _new_figure(
        (3.0 * ncols, 3.0 * float(np.clip(ratio, 0.3, 3.0)) * nrows + 0.9), layout="constrained"
    )
    seen: set[int] = set()
    for i, item in enumerate(items):
        volume, label, title = item[:3]
        spacing = item[3] if len(item) > 3 else (1.0, 1.0, 1.0)
        vol = _as_volume(volume, channel)
        index = vol.shape[view.axis] // 2
        lab = None if label is None else np.asarray(label)
        if lab is not None:
            if lab.shape != vol.shape:
                raise InputError(f"{title}: label shape {lab.shape} differs from the volume's {vol.shape}")
            seen.update(int(v) for v in np.unique(np.take(lab, index, axis=view.axis)) if v != 0)
        ax = fig.add_subplot(nrows, ncols, i + 1)
        _draw_slice(ax, vol, view, index, spacing, {}, _window(vol), label=lab)
        ax.set_title(str(title), fontsize=9)
    names = tuple(names) if names is not None else label_names()
    handles = [
        Patch(
            facecolor=LABEL_COLORS[v], edgecolor="#555555", label=f"{v} {names[v] if v < len(names) else ''}"
        )
        for v in sorted(seen)
        if v < len(LABEL_COLORS)
    ]
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False
        )
    return fig


# ----------------------------------------------------------------------------- answers


class HighlightedText(str):
    """An answer with HTML-coloured boxes; a ``str`` that notebooks render as HTML."""

    def _repr_html_(self) -> str:
        return str(self)


_BOX_SPAN_RE = re.compile(r"<box>.*?</box>", re.DOTALL)


def highlight_boxes_in_text(answer: str) -> HighlightedText:
    """HTML of ``answer`` with each ``<box>[...]</box>`` coloured like the figure's boxes.

    The ``n``-th well-formed box (as :func:`preprocess.geometry.parse_boxes` reads it) gets
    ``BOX_COLORS[n]``, matching predicted box ``n`` in :func:`show_box_slices`; a malformed
    box is shown grey and struck through. The rest of the text is HTML-escaped, unchanged.
    """
    parts: list[str] = []
    n = 0
    pos = 0
    for m in _BOX_SPAN_RE.finditer(answer):
        parts.append(html.escape(answer[pos : m.start()]))
        box_text = html.escape(m.group(0))
        if parse_boxes(m.group(0)):
            color = BOX_COLORS[n % len(BOX_COLORS)]
            parts.append(
                f'<span class="vol3d-box" data-box="{n}" style="color:{color};background:#222;'
                f'font-weight:bold;padding:0 2px">{box_text}</span>'
            )
            n += 1
        else:
            parts.append(
                f'<span class="vol3d-box-bad" style="color:#888;text-decoration:line-through">{box_text}</span>'
            )
        pos = m.end()
    parts.append(html.escape(answer[pos:]))
    return HighlightedText("".join(parts))


# ----------------------------------------------------------------------------- cache manifests


def manifest_summary(cache_dir: str | os.PathLike) -> dict:
    """What a cache holds, as plain data (no pandas needed).

    Returns a dict with ``rows`` (the latest manifest row per id, as dicts), ``counts`` (list of
    ``{"status", "reason", "n"}`` sorted by status then count), ``ok`` / ``not_ok`` (rows),
    ``spacing`` float ``(N_ok, 3)`` and ``shape`` int ``(N_ok, 3)`` of the ok rows' cached grid, and
    ``source_spacing`` / ``source_shape`` float ``(N_ok, 3)`` of their source images (NaN if unknown).
    """
    from preprocess.manifest import MANIFEST_NAME, compact, read_manifest

    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(
            f"{path} not found: pass a cache directory written by `vol3d preprocess SRC --out CACHE`"
        )
    # A case redone by a later run appends a newer row: keep the latest per id.
    rows = [r.to_dict() for r in compact(read_manifest(path))]
    order = {"ok": 0, "skipped": 1, "failed": 2}
    counter = Counter((r.get("status", ""), r.get("reason", "")) for r in rows)
    counts = [
        {"status": s, "reason": reason, "n": n}
        for (s, reason), n in sorted(
            counter.items(), key=lambda kv: (order.get(kv[0][0], 3), -kv[1], kv[0][1])
        )
    ]
    ok = [r for r in rows if r.get("status") == "ok"]

    def source_values(key: str) -> np.ndarray:
        # The runner records the source grid in ``stats``; NaN where a row has none.
        vals = [(r.get("stats") or {}).get(key) or [np.nan] * 3 for r in ok]
        return np.array(vals, dtype=float).reshape(-1, 3)

    return {
        "rows": rows,
        "counts": counts,
        "ok": ok,
        "not_ok": [r for r in rows if r.get("status") != "ok"],
        "spacing": np.array([r["spacing"] for r in ok], dtype=float).reshape(-1, 3),
        "shape": np.array([r["shape"] for r in ok], dtype=int).reshape(-1, 3),
        "source_spacing": source_values("spacing"),
        "source_shape": source_values("shape"),
    }


def format_table(rows: Sequence[dict], columns: Sequence[str], max_width: int = 60) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns``; long cells are cut."""

    def cell(v: Any) -> str:
        s = ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
        return s if len(s) <= max_width else s[: max_width - 3] + "..."

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def manifest_histograms(summary: dict) -> Figure:
    """Histograms of the ok cases' spacing and shape per axis, source images against the cache.

    ``summary`` comes from :func:`manifest_summary`. A wide spread of source spacings is
    normal; a spread in the cached grid means the preset keeps each image's own spacing/size.
    """
    fig = _new_figure((11, 5.5), layout="constrained")
    axes = fig.subplots(2, 3)
    series = (("source", "#9aa5b1"), ("cached", "#4a90d9"))
    for row, (key, unit) in enumerate((("spacing", "mm"), ("shape", "voxels"))):
        for i, name in enumerate("XYZ"):
            ax = axes[row, i]
            data = {
                label: summary[f"source_{key}" if label == "source" else key][:, i] for label, _ in series
            }
            data = {label: v[np.isfinite(v)] for label, v in data.items()}
            every = np.concatenate(list(data.values()))
            if len(every):
                lo, hi = float(every.min()), float(every.max())
                # Fixed narrow bins, so a few distinct values show as thin bars at those values.
                pad = 0.05 * (hi - lo) if hi > lo else 0.5
                edges = np.linspace(lo - pad, hi + pad, 31)
                for label, color in series:
                    if len(data[label]):
                        ax.hist(
                            data[label], bins=edges, color=color, alpha=0.75, label=label, edgecolor="white"
                        )
            ax.set_xlabel(f"{key} {name} ({unit})")
            ax.set_ylabel("cases")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper right", fontsize=8)
    fig.suptitle(f"{len(summary['ok'])} cached cases: source image grid vs cached grid")
    return fig


def read_cached_case(cache_dir: str | os.PathLike, row: dict) -> dict:
    """Load an ok manifest row's case from its HDF5 file (docs/formats.md section 2).

    Returns ``image`` float32 ``(C, X, Y, Z)``, ``label`` uint8 ``(X, Y, Z)`` or None,
    ``boxes_vox`` ``(N, 6)``, ``findings`` (list of str), ``affine`` ``(4, 4)``, ``spacing`` ``(3,)`` and
    ``frames`` (:class:`preprocess.types.Frames`: back to the original grid).
    """
    from preprocess.store import CaseReader

    path = Path(cache_dir) / str(row.get("h5"))
    if row.get("status") != "ok" or not path.is_file():
        raise InputError(
            f"{path} (case {row.get('id')}, status {row.get('status')}) is missing: "
            "only ok rows have a case file; rerun `vol3d preprocess` to rebuild the cache"
        )
    with CaseReader(path, row.get("key")) as reader:
        boxes = reader.boxes() if "boxes" in reader.group else {"vox": np.zeros((0, 6)), "finding": []}
        return {
            "image": reader.image().astype(np.float32),
            "label": reader.label(),
            "boxes_vox": as_boxes(boxes["vox"]),
            "findings": list(boxes["finding"]),
            "affine": reader.affine,
            "spacing": np.asarray(reader.attrs["spacing"], dtype=float),
            "frames": reader.frames,
        }


def cache_gallery(
    cache_dir: str | os.PathLike,
    rows: Sequence[dict] | None = None,
    max_cases: int = 8,
    ncols: int = 4,
    axis: str = "axial",
) -> Figure:
    """:func:`mid_slice_gallery` of up to ``max_cases`` ok cases of a cache (default: the first ok rows).

    Panel titles give the pseudonymous id, modality, split and cached shape (never an identifier).
    """
    if rows is None:
        rows = manifest_summary(cache_dir)["ok"]
    rows = [r for r in rows if r.get("status") == "ok"][:max_cases]
    if not rows:
        raise InputError(f"{cache_dir}: no ok cases to show; see the manifest's failed rows for why")
    items = []
    for row in rows:
        case = read_cached_case(cache_dir, row)
        shape = "x".join(str(n) for n in case["image"].shape[1:])
        title = f"{row['id'][:10]} {row.get('modality', '')} {row.get('split', '')}\n{shape}"
        items.append((case["image"], case["label"], title, case["spacing"]))
    return mid_slice_gallery(items, ncols=ncols, axis=axis, names=label_names(cache_dir))
