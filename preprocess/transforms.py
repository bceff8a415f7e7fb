"""Image -> cached array: RAS+ canonical reorientation, resampling, intensity scaling, crop/pad.

Every step is bookkept in one 4x4 matrix, ``cached_to_orig`` (cached index -> original
continuous index), so for any cached voxel ``affine = orig_affine @ cached_to_orig``
and predictions map back to the original grid with :func:`to_original`.

What "RAS+ canonical" means here (also for oblique acquisitions): the array axes are
permuted/flipped so that axis 0 points closest to Right, 1 to Anterior and 2 to
Superior (``nibabel.orientations.io_orientation``). Pixels are *not* rotated onto
the world axes: an oblique series keeps its exact rotation in the cached ``affine``
(which is then not diagonal) and gets the flag ``OBLIQUE``. Resampling is therefore
a pure per-axis zoom in the canonical frame, which is exact, invertible and fast
(separable 1D interpolation, and only the voxels inside the final crop are computed).

The resampled grid keeps the physical extent of the image centred: along an axis of
``n`` voxels of spacing ``s`` resampled to spacing ``t``, the new grid has
``m = max(1, round(n * s / t))`` voxels and new index ``r`` sits at canonical index
``(t / s) * r + ((n - 1) - (t / s) * (m - 1)) / 2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage, sparse

from preprocess import geometry
from preprocess.config import PreprocessConfig
from preprocess.reasons import LABEL_MISMATCH, PROCESSING_ERROR, TOO_LARGE
from preprocess.types import Frames, Image, SeriesError

#: Flag of an acquisition whose axes are not the world axes (rotation kept in the affine).
FLAG_OBLIQUE = "OBLIQUE"
#: Flag of an image where no foreground was found (no crop was applied).
FLAG_NO_FOREGROUND = "NO_FOREGROUND"
#: Flag of an image whose foreground (or label) did not fit in ``fixed_size``.
FLAG_FOREGROUND_CLIPPED = "FOREGROUND_CLIPPED"

#: Flag of a CT whose air is not near -1000: raw stored values, or HU rescaled twice (see :func:`_ct_not_hu`).
FLAG_CT_NOT_HU = "CT_NOT_HU"
#: Flag of an oblique case with a box converted from its world box (the enclosing box, larger than the lesion).
FLAG_BOXES_ENCLOSING = "BOXES_ENCLOSING"
#: One sentence per flag that needs a look, appended to the manifest row's ``detail``.
FLAG_NOTES = {
    FLAG_CT_NOT_HU: "CT_NOT_HU: the darkest voxels are not near air (-1000 HU), so the values are probably raw "
    "stored values or HU rescaled twice; check RescaleSlope/RescaleIntercept (or the NIfTI's scl_slope/scl_inter) "
    "of the export",
    FLAG_BOXES_ENCLOSING: "BOXES_ENCLOSING: the series is oblique and some boxes came from world boxes, so they "
    "enclose more than the lesion; pass --lesions DIR (instance maps) for tight boxes",
}

#: CT plausibility: the 0.5th percentile (padding excluded) must lie in this HU range (air is -1000).
_CT_AIR_RANGE = (-2000.0, -500.0)
_CT_LOW_PERCENTILE = 0.5
_AIR_BAND = (-1100.0, -900.0)  # a constant minimum in this band is air, not padding
_OBLIQUE_TOL = 1e-4  # off-axis direction cosine above which a grid counts as oblique
_N_FG_SAMPLES = 1000  # foreground intensities kept per case for the fingerprint


@dataclasses.dataclass
class Prepared:
    """A case ready to be cached, with everything needed to map it back.

    Arrays are in the cached RAS+ canonical grid ``(X, Y, Z)``.
    """

    image: np.ndarray  # float16 (C, X, Y, Z), intensities scaled to 0..1
    label: np.ndarray | None  # uint8 (X, Y, Z) or None
    affine: np.ndarray  # (4, 4) cached index -> RAS+ mm
    orig_shape: tuple[int, int, int]  # spatial shape of the original array
    orig_affine: np.ndarray  # (4, 4) original index -> RAS+ mm
    cached_to_orig: np.ndarray  # (4, 4) cached index -> original continuous index
    crop_box: tuple[
        int, int, int, int, int, int
    ]  # (i0, j0, k0, i1, j1, k1) in the resampled grid, end exclusive
    resampled_shape: tuple[int, int, int]  # the resampled RAS grid before crop/pad
    spacing: tuple[float, float, float]  # mm per cached voxel along X, Y, Z
    modality: str  # "CT" | "MR"
    windows: list[tuple[float, float]]  # per channel: raw intensity mapped to 0 and to 1
    flags: list[str]  # ingest flags + OBLIQUE / NO_FOREGROUND / FOREGROUND_CLIPPED
    foreground: np.ndarray  # bool (X, Y, Z): body mask (threshold only), for the patch index
    fg_samples: (
        np.ndarray
    )  # float32 (K,): original intensities sampled in the foreground (label if any), for the fingerprint
    instances: np.ndarray | None = None  # uint8 (X, Y, Z) lesion instance map (boxes only; not cached)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` of the cached arrays."""
        return tuple(int(n) for n in self.image.shape[1:])  # type: ignore[return-value]

    @property
    def frames(self) -> Frames:
        """The cached arrays' geometry: to world mm and back to the original grid."""
        return Frames(np.asarray(self.affine, float), np.asarray(self.cached_to_orig, float),
                      np.asarray(self.orig_affine, float), tuple(int(n) for n in self.orig_shape))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- small geometry helpers


def translation(offset: Sequence[float]) -> np.ndarray:
    """4x4 matrix adding ``offset`` (3,) to an index (e.g. crop index -> parent index)."""
    m = np.eye(4)
    m[:3, 3] = np.asarray(offset, dtype=float)
    return m


def centred_window(lo: Sequence[float], hi: Sequence[float], size: Sequence[int]) -> np.ndarray:
    """Integer start ``(3,)`` of a window of ``size`` centred on the index range ``[lo, hi)``.

    Shared by the fixed-size crop here and the Dataset's ``input_size`` crop; the start may
    be negative or the window may pass the end (that part is padded).
    """
    lo, hi, size = (np.asarray(v, dtype=np.int64) for v in (lo, hi, size))
    return (lo + hi - size) // 2


def _is_oblique(affine: np.ndarray) -> bool:
    off = np.abs(affine[:3, :3] / geometry.spacing_from_affine(affine))
    off[off.argmax(axis=0), np.arange(3)] = 0  # the one world axis each array axis follows
    return bool(off.max() > _OBLIQUE_TOL)


def _canonical(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Reoriented *view* of ``(C, X, Y, Z)`` (nibabel works on leading axes, so move C last and back)."""
    return np.moveaxis(apply_orientation(np.moveaxis(arr, 0, -1), ornt), -1, 0)


@dataclasses.dataclass
class _Grid:
    """The canonical grid and the resampled grid of one image (all index maps exact)."""

    ornt: np.ndarray  # (3, 2) nibabel orientation: original -> canonical
    orig_from_can: np.ndarray  # (4, 4)
    can_shape: np.ndarray  # (3,)
    scale: np.ndarray  # (3,) canonical voxels per resampled voxel
    offset: np.ndarray  # (3,) canonical index of resampled index 0
    res_shape: np.ndarray  # (3,)

    @property
    def can_from_res(self) -> np.ndarray:
        m = np.diag(np.append(self.scale, 1.0))
        m[:3, 3] = self.offset
        return m


def _grid(affine: np.ndarray, shape: Sequence[int], target: Sequence[float] | None) -> _Grid:
    ornt = io_orientation(affine)
    orig_from_can = inv_ornt_aff(ornt, shape)
    can_affine = affine @ orig_from_can
    can_shape = np.array([shape[int(i)] for i in np.argsort(ornt[:, 0])], dtype=np.int64)
    s = geometry.spacing_from_affine(can_affine)
    t = s.copy() if target is None else np.asarray(target, dtype=float)
    same = np.abs(t - s) <= 1e-6 * s  # keep exact identity (no interpolation) where nothing changes
    scale = np.where(same, 1.0, t / s)
    res_shape = np.where(same, can_shape, np.maximum(1, np.rint(can_shape / scale))).astype(np.int64)
    offset = np.where(same, 0.0, ((can_shape - 1) - scale * (res_shape - 1)) / 2.0)
    return _Grid(ornt, orig_from_can, can_shape, scale, offset, res_shape)


# ----------------------------------------------------------------------------- resampling


def _taps(coords: np.ndarray, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ``(T, m)`` of linear interpolation at ``coords`` (edge-clamped)
    preceded by a gaussian of ``sigma`` voxels (truncated at 3 sigma, edge-clamped).

    The gaussian and the interpolation are one small kernel per output sample, so the
    anti-aliasing costs a few gathers of the *output* size instead of filtering the input.
    """
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.floor(c).astype(np.int64)
    w = c - i0
    radius = int(3.0 * sigma + 0.5) if sigma > 0 else 0
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2) if sigma > 0 else np.ones(1)
    g /= g.sum()
    g = np.concatenate([[0.0], g, [0.0]])  # g[t + radius + 1] = G[t], zero outside [-radius, radius]
    offsets = np.arange(-radius, radius + 2)  # tap t combines G[t] (weight 1 - w) and G[t - 1] (weight w)
    weights = (1 - w)[None] * g[offsets + radius + 1, None] + w[None] * g[offsets + radius, None]
    index = np.clip(i0[None] + offsets[:, None], 0, n - 1)
    return index, weights.astype(np.float32)


def _resample_axis(a: np.ndarray, axis: int, coords: np.ndarray, sigma: float) -> np.ndarray:
    """``a`` resampled along ``axis`` at continuous indices ``coords``: linear, edge-clamped, after a
    gaussian of ``sigma`` voxels when ``sigma > 0`` (anti-aliasing before downsampling)."""
    n = a.shape[axis]
    if sigma == 0 and np.array_equal(coords, np.rint(coords)):  # integer positions: exact copy
        i = np.clip(np.rint(coords).astype(np.int64), 0, n - 1)
        if np.array_equal(i, np.arange(i[0], i[0] + len(i))):
            sl = [slice(None)] * a.ndim
            sl[axis] = slice(int(i[0]), int(i[0]) + len(i))
            return np.ascontiguousarray(a[tuple(sl)])
        return np.take(a, i, axis=axis)
    index, weights = _taps(coords, n, sigma)
    shape = [1] * a.ndim
    shape[axis] = len(coords)
    out = None
    for idx, wt in zip(index, weights, strict=True):
        if not wt.any():
            continue
        part = np.take(a, idx, axis=axis)  # along an outer axis: whole planes/rows copied
        part *= wt.reshape(shape)
        if out is None:
            out = part
        else:
            out += part
    assert out is not None
    return out


def _resample_volume(vol: np.ndarray, coords: Sequence[np.ndarray], sigmas: Sequence[float]) -> np.ndarray:
    """Separable resampling of ``vol`` ``(X, Y, Z)`` at per-axis input ``coords`` -> float32.

    Works in the array's own memory order: the outermost axis goes first, as one sparse
    matrix product over whole planes (a few nonzeros per row), which shrinks the data
    before the inner axes are gathered.
    """
    if vol.flags.f_contiguous and not vol.flags.c_contiguous:  # e.g. straight from nibabel
        return _resample_volume(vol.T, coords[::-1], sigmas[::-1]).T
    a = np.ascontiguousarray(vol, dtype=np.float32)
    n0 = a.shape[0]
    index, weights = _taps(coords[0], n0, sigmas[0])
    rows = np.broadcast_to(np.arange(len(coords[0])), index.shape)
    w = sparse.csr_matrix((weights.ravel(), (rows.ravel(), index.ravel())), shape=(len(coords[0]), n0))
    a = np.asarray(w @ a.reshape(n0, -1), dtype=np.float32).reshape(len(coords[0]), *a.shape[1:])
    for axis in (1, 2):
        a = _resample_axis(a, axis, coords[axis], sigmas[axis])
    return a


def _nearest(coords: np.ndarray, n: int) -> np.ndarray:
    return np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.int64)


# ----------------------------------------------------------------------------- foreground


def _foreground_threshold(sample: np.ndarray, modality: str, cfg: PreprocessConfig) -> float:
    if modality == "CT":
        return cfg.ct_foreground_hu
    lo, hi = np.percentile(sample, cfg.mr_percentiles)
    return float(lo + cfg.mr_foreground_fraction * (hi - lo))


def _body_box(
    sub: np.ndarray, stride: np.ndarray, can_shape: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Canonical index range ``[lo, hi]`` (inclusive) of the largest connected component of the
    mask ``sub``, a strided sample of the canonical array (about one sample per target voxel)."""
    labels, n = ndimage.label(sub)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    objs = ndimage.find_objects(labels)[int(sizes.argmax()) - 1]
    lo = np.array([s.start for s in objs]) * stride - (
        stride - 1
    )  # unseen neighbours of the sample count too
    hi = (np.array([s.stop for s in objs]) - 1) * stride + (stride - 1)
    return np.maximum(lo, 0), np.minimum(hi, can_shape - 1)


def _index_box_to(matrix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index range ``[lo, hi]`` mapped by a 4x4 ``matrix`` (min/max over the 8 corners)."""
    box = geometry.transform_boxes(np.concatenate([lo, hi])[None].astype(float), matrix)[0]
    return box[:3], box[3:]


def _label_box(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if not label.any():
        return None
    lo, hi = [], []
    for ax in range(3):
        hit = np.flatnonzero(label.any(axis=tuple(a for a in range(3) if a != ax)))
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo), np.array(hi)


# ----------------------------------------------------------------------------- intensity


def _ct_not_hu(sample: np.ndarray) -> bool:
    """True when a CT sample's robust low percentile is far from air (-1000 HU).

    A body CT always holds air (outside the body, lungs, bowel); raw stored values put it
    near 0 and a second rescale near -2000. A constant fill outside the reconstruction
    circle (PixelPaddingValue, often -2048 or -3024) is not air, so the minimum value is left
    out when it covers more than 1% of the sample and is not itself air (a phantom's air is
    often exactly -1000).
    """
    vals = np.asarray(sample, dtype=np.float32).ravel()
    if vals.size == 0:
        return False
    lowest = float(vals.min())
    pad = vals == lowest
    if pad.mean() > 0.01 and not pad.all() and not _AIR_BAND[0] <= lowest <= _AIR_BAND[1]:
        vals = vals[~pad]
    low = float(np.percentile(vals, _CT_LOW_PERCENTILE))
    return not _CT_AIR_RANGE[0] <= low <= _CT_AIR_RANGE[1]



def mr_window(values: np.ndarray, cfg: PreprocessConfig) -> tuple[float, float]:
    """The ``(lo, hi)`` raw intensities an MR channel maps to 0 and 1, from its foreground ``values``:
    the ``mr_percentiles``, or (``mr_normalisation: zscore``) mean -/+ ``mr_zscore_clip`` SD."""
    step = max(1, values.size // 1_000_000)  # statistics of a regular subsample: the same to ~0.1%
    sample = np.asarray(values[::step], dtype=np.float64)
    if cfg.mr_normalisation == "zscore":
        mean, sd = float(sample.mean()), float(sample.std())
        lo, hi = mean - cfg.mr_zscore_clip * sd, mean + cfg.mr_zscore_clip * sd
    else:
        lo, hi = (float(v) for v in np.percentile(sample, cfg.mr_percentiles))
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def n4_corrected(volume: np.ndarray, foreground: np.ndarray, spacing: Sequence[float],
                 shrink: int = 2, iterations: int = 50, convergence: float = 0.001) -> np.ndarray:
    """``volume (X, Y, Z)`` divided by the smooth multiplicative bias SimpleITK's N4 finds inside
    ``foreground`` (fitted on a copy shrunk ``shrink`` times, applied at full resolution; three fitting
    levels of at most ``iterations``, each stopping at ``convergence``). Intensities must be positive:
    the volume is shifted to a minimum of 1 first and back after."""
    import SimpleITK as sitk

    vol = np.asarray(volume, dtype=np.float32)
    if not foreground.any():
        return vol
    shift = 1.0 - float(vol.min())
    image = sitk.GetImageFromArray(np.ascontiguousarray((vol + shift).T))  # SimpleITK arrays are (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    mask = sitk.GetImageFromArray(np.ascontiguousarray(foreground.T.astype(np.uint8)))
    mask.CopyInformation(image)
    small, small_mask = (sitk.Shrink(x, [shrink] * 3) if min(vol.shape) >= 4 * shrink else x for x in (image, mask))
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([iterations] * 3)
    n4.SetConvergenceThreshold(float(convergence))
    n4.Execute(small, small_mask)
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).T
    return ((vol + shift) / np.exp(log_bias) - shift).astype(np.float32)


def _scale(raw: np.ndarray, lo: float, hi: float, out: np.ndarray) -> None:
    """``clip((raw - lo) / (hi - lo), 0, 1)`` into the float16 ``out`` (same shape)."""
    tmp = raw - np.float32(lo)
    tmp *= np.float32(1.0 / (hi - lo))
    np.clip(tmp, 0.0, 1.0, out=tmp)
    out[...] = tmp


# ----------------------------------------------------------------------------- prepare


def prepare(
    image: Image, cfg: PreprocessConfig, label: np.ndarray | None = None, instances: np.ndarray | None = None
) -> Prepared:
    """Turn an :class:`Image` (original grid) and optional label into a :class:`Prepared` case.

    Args:
        image: ``array`` float32 ``(X, Y, Z)`` or ``(C, X, Y, Z)`` with ``affine`` (original index -> RAS mm).
        cfg: target spacing, intensity windows, crop and pad settings.
        label: integer map ``(X, Y, Z)`` on the image's original grid (see :func:`align_label`).
        instances: lesion instance map ``(X, Y, Z)`` on the original grid, resampled like ``label``
            (nearest neighbour) for :func:`cached_boxes`; it does not change the crop.

    Returns:
        The cached image float16 ``(C', X', Y', Z')`` (CT: ``C' = C * len(ct_windows)``), label,
        and all geometry (``affine``, ``cached_to_orig``, ``crop_box`` ...).
    """
    arr = np.asarray(image.array)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise SeriesError(
            PROCESSING_ERROR, f"expected an (X, Y, Z) or (C, X, Y, Z) array, got shape {arr.shape}"
        )
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    orig_shape = tuple(int(n) for n in arr.shape[1:])
    for what, vol in (("label", label), ("lesion map", instances)):
        if vol is not None and tuple(vol.shape) != orig_shape:
            raise SeriesError(
                LABEL_MISMATCH, f"{what} shape {tuple(vol.shape)} differs from image shape {orig_shape}"
            )
    modality = (image.modality or cfg.modality_default).upper()
    orig_affine = np.asarray(image.affine, dtype=float)
    g = _grid(orig_affine, orig_shape, cfg.target_spacing)
    can = _canonical(arr, g.ornt)  # view, nothing copied yet
    res_from_can = np.linalg.inv(g.can_from_res)
    flags = list(image.flags)
    if _is_oblique(orig_affine):
        flags.append(FLAG_OBLIQUE)

    # --- where to crop: body box (+ label box) in the resampled grid, computed before resampling
    res_lo, res_hi = np.zeros(3, np.int64), g.res_shape.copy()  # window [lo, hi) by default: everything
    # the body box is found on a sample about two target voxels apart (the margin absorbs it)
    stride = np.maximum(1, np.floor(2 * g.scale)).astype(np.int64)
    every = tuple(slice(None, None, int(st)) for st in stride)
    sub = can[(0, *every)]  # original intensities (a strided view, no interpolation)
    if modality == "CT" and _ct_not_hu(sub):
        flags.append(FLAG_CT_NOT_HU)
    threshold = _foreground_threshold(sub, modality, cfg)
    sub_fg = sub > threshold
    if label is not None:  # nnU-Net's fingerprint samples intensities in the labelled foreground
        lab_sub = apply_orientation(np.asarray(label), g.ornt)[every] > 0
        if lab_sub.any():
            sub_fg = lab_sub
    vals = sub[sub_fg]
    fg_samples = np.random.default_rng(0).choice(vals, size=min(_N_FG_SAMPLES, vals.size), replace=False)
    if cfg.crop_foreground or cfg.fixed_size is not None:
        body = _body_box(sub > threshold, stride, g.can_shape)
        if body is None:
            flags.append(FLAG_NO_FOREGROUND)
        else:
            lo, hi = _index_box_to(res_from_can, *body)
            margin = cfg.crop_margin_mm / (
                g.scale * geometry.spacing_from_affine(orig_affine @ g.orig_from_can)
            )
            lo, hi = lo - margin, hi + margin
            lab_box = _label_box(label) if label is not None else None
            if lab_box is not None:  # never crop labelled voxels away
                llo, lhi = _index_box_to(res_from_can @ np.linalg.inv(g.orig_from_can), *lab_box)
                lo, hi = np.minimum(lo, llo), np.maximum(hi, lhi)
            res_lo = np.clip(np.floor(lo), 0, g.res_shape).astype(np.int64)
            res_hi = np.clip(np.ceil(hi) + 1, res_lo + 1, g.res_shape).astype(np.int64)
    start, stop = res_lo, res_hi
    if cfg.fixed_size is not None:
        size = np.asarray(cfg.fixed_size, dtype=np.int64)
        start = centred_window(res_lo, res_hi, size)
        stop = start + size
        if (start > res_lo).any() or (stop < res_hi).any():
            flags.append(FLAG_FOREGROUND_CLIPPED)
    out_shape = tuple(int(n) for n in stop - start)
    planned = int(np.prod(out_shape, dtype=np.int64)) * arr.shape[0]
    if planned > cfg.ingest.max_voxels:  # e.g. a nonsense PixelSpacing: fail before allocating it
        raise SeriesError(TOO_LARGE, f"resampled to {cfg.target_spacing} mm it would be {out_shape} voxels "
                          f"({planned} with channels), more than ingest.max_voxels ({cfg.ingest.max_voxels}); "
                          "check the spacing in its header, or raise the limit if it is genuine")  # fmt: skip

    # --- resample only the part of the window that lies inside the resampled grid
    in_lo, in_hi = np.maximum(start, 0), np.minimum(stop, g.res_shape)
    if (in_hi <= in_lo).any():
        raise SeriesError(PROCESSING_ERROR, "the crop window misses the image entirely (fixed_size/crop bug)")
    coords = [g.scale[a] * np.arange(in_lo[a], in_hi[a]) + g.offset[a] for a in range(3)]
    factor = g.scale
    sigmas = np.where(cfg.antialias & (factor > cfg.antialias_factor), (factor - 1.0) / 2.0, 0.0)
    # resample in the original memory layout (canonical coordinates mapped back through the
    # flips), then transpose the small result into canonical order
    can_to_orig_axis = np.argsort(g.ornt[:, 0])
    orig_coords: list[np.ndarray] = [np.empty(0)] * 3
    orig_sigmas = [0.0] * 3
    for k, p in enumerate(can_to_orig_axis):
        flipped = g.ornt[p, 1] < 0
        orig_coords[p] = (orig_shape[p] - 1) - coords[k] if flipped else coords[k]
        orig_sigmas[p] = float(sigmas[k])
    raw = np.ascontiguousarray(  # (C, x, y, z) float32 in original units
        np.stack(
            [
                _resample_volume(arr[c], orig_coords, orig_sigmas).transpose(can_to_orig_axis)
                for c in range(arr.shape[0])
            ]
        )
    )
    place = (slice(None),) + tuple(
        slice(int(a), int(b)) for a, b in zip(in_lo - start, in_hi - start, strict=True)
    )

    fg_in = raw[0] > threshold
    foreground = np.zeros(out_shape, dtype=bool)
    foreground[place[1:]] = fg_in

    def nearest_cached(vol: np.ndarray, what: str) -> np.ndarray:
        """An integer map of the original grid on the cached grid (nearest neighbour, 0 outside)."""
        can_vol = apply_orientation(np.asarray(vol), g.ornt)
        idx = [_nearest(c, int(n)) for c, n in zip(coords, g.can_shape, strict=True)]
        out = np.zeros(out_shape, dtype=np.uint8)
        out[place[1:]] = _as_uint8(can_vol[np.ix_(*idx)], what)
        return out

    label_out = None if label is None else nearest_cached(label, "label")

    # --- intensities -> channels in 0..1
    if modality == "CT":
        windows = [w for _ in range(raw.shape[0]) for w in cfg.ct_windows]
        sources = [c for c in range(raw.shape[0]) for _ in cfg.ct_windows]
    else:
        windows, sources = [], list(range(raw.shape[0]))
        for c in sources:
            if cfg.mr_bias_correction:
                raw[c] = n4_corrected(raw[c], fg_in, geometry.spacing_from_affine(orig_affine @ g.orig_from_can)
                                      * g.scale, convergence=cfg.mr_bias_convergence)
            windows.append(mr_window(raw[c][fg_in] if fg_in.any() else raw[c].ravel(), cfg))
    img = np.zeros((len(windows),) + out_shape, dtype=np.float16)
    for ch, (c, (lo, hi)) in enumerate(zip(sources, windows, strict=True)):
        _scale(raw[c], lo, hi, img[(ch,) + place[1:]])

    cached_to_orig = g.orig_from_can @ g.can_from_res @ translation(start)
    affine = orig_affine @ cached_to_orig
    return Prepared(
        image=img,
        label=label_out,
        affine=affine,
        orig_shape=orig_shape,  # type: ignore[arg-type]
        orig_affine=orig_affine,
        cached_to_orig=cached_to_orig,
        crop_box=tuple(int(v) for v in np.concatenate([start, stop])),  # type: ignore[arg-type]
        resampled_shape=tuple(int(n) for n in g.res_shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in geometry.spacing_from_affine(affine)),  # type: ignore[arg-type]
        modality=modality,
        windows=windows,
        flags=flags,
        foreground=foreground,
        fg_samples=np.asarray(fg_samples, dtype=np.float32),
        instances=None if instances is None else nearest_cached(instances, "lesion map"),
    )


def _as_uint8(label: np.ndarray, what: str) -> np.ndarray:
    if label.dtype == np.uint8:
        return label
    if label.size and (label.min() < 0 or label.max() > 255):
        raise SeriesError(
            LABEL_MISMATCH, f"{what} values must be integers 0..255, got {label.min()}..{label.max()}"
        )
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.rint(label)):
        raise SeriesError(LABEL_MISMATCH, f"{what} has non-integer values; a label map holds class numbers")
    return label.astype(np.uint8)


# ----------------------------------------------------------------------------- labels and boxes


def align_label(
    label_array: np.ndarray,
    label_affine: np.ndarray,
    image: Image,
    tol_voxel: float = 0.01,
    what: str = "label",
) -> np.ndarray:
    """Bring a label map stored with its own affine onto ``image``'s original grid.

    Accepts the same grid up to axis permutation and flips (e.g. the mask saved in RAS
    while the image is a DICOM stack); anything else raises ``SeriesError(LABEL_MISMATCH)``
    saying what differs (``what`` names the map in it, e.g. "lesion map"; the caller adds
    which series, see ``preprocess.runner``). Returns uint8 ``(X, Y, Z)`` aligned with ``image.array``.
    """
    lab = np.asarray(label_array)
    while lab.ndim > 3 and lab.shape[-1] == 1:  # (X, Y, Z, 1) as some writers store masks
        lab = lab[..., 0]
    if lab.ndim != 3:
        raise SeriesError(LABEL_MISMATCH, f"{what} must be a 3D map, got shape {lab.shape}")
    img_shape = tuple(int(n) for n in np.shape(image.array)[-3:])
    img_aff = np.asarray(image.affine, dtype=float)
    lab_aff = np.asarray(label_affine, dtype=float)
    ornt = ornt_transform(io_orientation(lab_aff), io_orientation(img_aff))
    moved = apply_orientation(lab, ornt)
    moved_aff = lab_aff @ inv_ornt_aff(ornt, lab.shape)
    if moved.shape != img_shape:
        raise SeriesError(
            LABEL_MISMATCH,
            f"{what} grid {lab.shape} does not match image grid {img_shape} (even after reordering axes)",
        )
    spacing = geometry.spacing_from_affine(img_aff)
    tol = tol_voxel * spacing.min()
    lab_sp = geometry.spacing_from_affine(moved_aff)
    if not np.allclose(lab_sp, spacing, atol=tol):
        raise SeriesError(
            LABEL_MISMATCH,
            f"{what} spacing {np.round(lab_sp, 4)} mm differs from the image's {np.round(spacing, 4)} mm",
        )
    corners = np.array([[0, 0, 0], np.array(img_shape) - 1])
    shift = np.abs(
        geometry.voxel_to_world(moved_aff, corners) - geometry.voxel_to_world(img_aff, corners)
    ).max()
    if not np.allclose(moved_aff[:3, :3], img_aff[:3, :3], atol=tol):
        raise SeriesError(
            LABEL_MISMATCH, f"{what} axes are rotated with respect to the image (different direction cosines)"
        )
    if shift > tol:
        raise SeriesError(
            LABEL_MISMATCH, f"{what} is shifted by {shift:.3f} mm from the image (origin differs)"
        )
    return np.ascontiguousarray(_as_uint8(moved, what))


@dataclasses.dataclass
class CachedBoxes:
    """The finding boxes of one case on its cached grid: what the HDF5 group ``boxes/`` holds."""

    world: np.ndarray  # (N, 6) RAS+ mm
    vox: np.ndarray  # (N, 6) continuous voxel boxes of the cached array, clipped to it
    visible: np.ndarray  # (N,) fraction of each box inside the cached array (0 = cropped away)
    source: list[str]  # per box: "mask" (its instance voxels) or "world_box" (converted from the world box)
    finding: list[str]
    organ: list[str]
    flags: list[str]  # [FLAG_BOXES_ENCLOSING] when an oblique case has a "world_box" box, else []


def cached_boxes(
    boxes: Sequence[dict], prepared: Prepared, instances: np.ndarray | None = None
) -> CachedBoxes:
    """Finding boxes (rows like ``boxes.json``) -> boxes on the cached grid of ``prepared``.

    A box with ``"instance": k`` whose lesion is in ``prepared.instances`` (the instance map
    given to :func:`prepare`, resampled like a label) gets the box of its cached voxels
    (:func:`preprocess.geometry.mask_to_box`) and the world box of that; source "mask". Its
    visible fraction is that of its voxel box on the original grid (``instances``, the same map
    before resampling) mapped through ``cached_to_orig``, which is exact: the two grids differ by
    axis flips, permutation, zoom and shift, never a rotation. Any other box is converted from
    its world box (:func:`boxes_world_to_cached`; source "world_box"): on an oblique grid that
    is the box enclosing an already enclosing world box, larger than the lesion (flag
    ``BOXES_ENCLOSING``).
    """
    n = len(boxes)
    world = geometry.as_boxes([b.get("box_world_ras_mm", b.get("world")) for b in boxes]).reshape(n, 6)
    vox, visible = boxes_world_to_cached(world, prepared)
    source = ["world_box"] * n
    if prepared.instances is not None and n:
        cached = ndimage.find_objects(prepared.instances)
        orig = ndimage.find_objects(np.asarray(instances)) if instances is not None else []
        cached_from_orig = np.linalg.inv(prepared.cached_to_orig)
        for i, b in enumerate(boxes):
            k = b.get("instance")
            if not isinstance(k, int) or not 0 < k <= len(cached) or cached[k - 1] is None:
                continue  # not in the map, or cropped away / too small to keep a cached voxel
            vox[i] = _window_box(prepared.instances, cached[k - 1], k)
            world[i] = geometry.boxes_voxel_to_world(vox[i][None], prepared.affine)[0]
            source[i] = "mask"
            if k <= len(orig) and orig[k - 1] is not None:
                exact = geometry.transform_boxes(_window_box(instances, orig[k - 1], k)[None], cached_from_orig)
                visible[i] = geometry.clip_boxes(exact, prepared.shape)[1][0]
    enclosing = FLAG_OBLIQUE in prepared.flags and "world_box" in source
    return CachedBoxes(
        world=world,
        vox=vox,
        visible=visible,
        source=source,
        finding=[str(b.get("finding", "")) for b in boxes],
        organ=[str(b.get("organ", "")) for b in boxes],
        flags=[FLAG_BOXES_ENCLOSING] if enclosing else [],
    )


def _window_box(instances: np.ndarray, window: tuple[slice, ...], k: int) -> np.ndarray:
    """Voxel box ``(6,)`` of the voxels equal to ``k`` inside ``window`` (from ``find_objects``), in
    the coordinates of the whole ``instances`` array."""
    box = geometry.mask_to_box(instances[window] == k)
    assert box is not None  # find_objects gave a window only because k occurs in it
    return box + np.array([s.start for s in window] * 2, dtype=float)


def boxes_world_to_cached(boxes_mm: np.ndarray, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """World RAS mm boxes ``(N, 6)`` -> cached continuous voxel boxes ``(N, 6)``, clipped to the
    cached array, and the visible fraction ``(N,)`` of each box (0 = entirely cropped away).

    For an oblique image the voxel box is the axis-aligned box enclosing the world box.
    """
    vox = geometry.boxes_world_to_voxel(geometry.as_boxes(boxes_mm), prepared.affine)
    return geometry.clip_boxes(vox, prepared.shape)


def to_original(
    cached_volume: np.ndarray,
    affine: np.ndarray,
    cached_to_orig: np.ndarray,
    orig_shape: Sequence[int],
    order: int = 0,
    *,
    cache_affine: np.ndarray | None = None,
    fill: float = 0,
) -> np.ndarray:
    """Resample a volume on the cached grid (e.g. a predicted mask) back onto the original grid.

    Args:
        cached_volume: ``(X, Y, Z)`` on the cached grid, or on a crop/patch of it.
        affine: the volume's own index -> RAS mm matrix.
        cached_to_orig: the case's cached index -> original index matrix (HDF5 attribute).
        orig_shape: spatial shape of the original image.
        order: 0 nearest (labels) or 1 linear (probabilities).
        cache_affine: the case's cached ``affine`` when ``cached_volume`` is a crop of the cache
            (the Dataset's ``input_size`` crop or a patch); default: the volume *is* the cache grid.
        fill: value of original voxels outside the volume.

    Returns:
        ``(X, Y, Z)`` array on the original grid, aligned with ``orig_affine``.
    """
    vol = np.asarray(cached_volume)
    aff = np.asarray(affine, dtype=float)
    parent = aff if cache_affine is None else np.asarray(cache_affine, dtype=float)
    orig_from_vol = np.asarray(cached_to_orig, dtype=float) @ np.linalg.inv(parent) @ aff
    vol_from_orig = np.linalg.inv(orig_from_vol)
    shape = tuple(int(n) for n in orig_shape)
    m = vol_from_orig[:3, :3]
    src_axis = np.abs(m).argmax(axis=0)  # volume axis feeding each original axis
    separable = np.allclose(np.abs(m).sum(axis=0), np.abs(m).max(axis=0)) and len(set(src_axis.tolist())) == 3
    if order == 0 and separable:
        # signed permutation x scale: one gather with per-axis index vectors
        idx, valid = [], []
        for a in range(3):
            b = int(src_axis[a])
            c = m[b, a] * np.arange(shape[a]) + vol_from_orig[b, 3]
            i = np.floor(c + 0.5).astype(np.int64)
            valid.append((i >= 0) & (i < vol.shape[b]))
            idx.append(np.clip(i, 0, vol.shape[b] - 1))
        perm = np.argsort(src_axis)  # original axis order as volume axes
        inv = np.argsort(perm)
        gathered = vol[np.ix_(*[idx[perm[b]] for b in range(3)])].transpose(inv)
        inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
        return np.where(inside, gathered, np.asarray(fill, dtype=vol.dtype))
    return ndimage.affine_transform(
        vol, vol_from_orig, output_shape=shape, order=order, mode="constant", cval=fill, prefilter=False
    )
