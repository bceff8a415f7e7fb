"""The one place where vol3d's coordinate conventions are defined.

Conventions (see docs/formats.md):

- **Arrays** are indexed ``(X, Y, Z)`` (optionally with a leading channel axis).
  In the cache they are stored in RAS+ canonical orientation: index ``i`` grows
  towards the patient's Right, ``j`` towards Anterior, ``k`` towards Superior
  (world +x = Right, +y = Anterior, +z = Superior, as in NIfTI/nibabel).
- **Affines** are 4x4 matrices from array index ``(i, j, k, 1)`` to world
  millimetres in RAS+.
- **DICOM** and **ITK** (SimpleITK: NRRD, MHA/MHD) are LPS. :data:`LPS_TO_RAS` is
  applied only here, in :func:`affine_from_dicom` and :func:`affine_from_itk`, at ingest.
- **Voxel boxes** ``(x0, y0, z0, x1, y1, z1)`` are in *continuous* index
  coordinates where voxel ``i`` is centred on ``i`` and covers ``[i-0.5, i+0.5]``;
  a box covering voxels ``a..b`` inclusive is ``[a-0.5, b+0.5]``. Its volume is
  therefore ``(b-a+1)`` voxels along each axis.
- **World boxes** are axis-aligned boxes in RAS+ mm with ``x0<=x1`` etc.
- **Text boxes** are written ``<box>[x0,y0,z0,x1,y1,z1]</box>`` with integers
  0..999 normalised to the *model-input* array: the continuous index range
  ``[-0.5, n-0.5]`` of an axis of length ``n`` maps onto ``[0, 999]``.
- **IoU** is intersection volume over union volume.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

#: Diagonal flip between DICOM's LPS and NIfTI's RAS world frames (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Upper bound of the integer box coordinates used in text.
BOX_SCALE = 999

_BOX_RE = re.compile(r"<box>\s*\[([^\]]*)\]\s*</box>")


# ----------------------------------------------------------------------------- affines


def affine_from_dicom(
    position_lps: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step_lps: Sequence[float],
) -> np.ndarray:
    """RAS+ affine of a DICOM series stacked as array ``(X=column, Y=row, Z=slice)``.

    Args:
        position_lps: ImagePositionPatient of the first slice in the stack (mm, LPS).
        orientation: ImageOrientationPatient (row cosine then column cosine).
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` in mm.
        slice_step_lps: vector (mm, LPS) from one slice's position to the next.

    Returns:
        ``(4, 4)`` matrix mapping index ``(i, j, k)`` to RAS+ mm, where ``i`` is the
        column index, ``j`` the row index and ``k`` the slice index. The pixel array
        read by pydicom as ``(rows, cols)`` must be transposed to ``(cols, rows)``.
    """
    row_cos = np.asarray(orientation[:3], dtype=float)  # direction of increasing column index
    col_cos = np.asarray(orientation[3:6], dtype=float)  # direction of increasing row index
    lps = np.eye(4)
    lps[:3, 0] = row_cos * float(pixel_spacing[1])
    lps[:3, 1] = col_cos * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(slice_step_lps, dtype=float)
    lps[:3, 3] = np.asarray(position_lps, dtype=float)
    return LPS_TO_RAS @ lps


def affine_from_itk(
    direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """RAS+ affine of a SimpleITK image whose array is taken as ``(X, Y, Z)`` (``GetArrayFromImage(img).T``).

    Args:
        direction: ``img.GetDirection()``, row-major ``(D*D,)`` with D >= 3 (LPS direction cosines,
            column ``a`` = direction of index axis ``a``); only the spatial 3x3 block is used.
        spacing: ``img.GetSpacing()`` (mm per index step, first three used).
        origin: ``img.GetOrigin()`` (LPS mm of index ``(0, 0, 0)``, first three used).

    Returns:
        ``(4, 4)`` matrix mapping index ``(i, j, k)`` to RAS+ mm; equals
        ``LPS_TO_RAS`` applied to ``img.TransformContinuousIndexToPhysicalPoint((i, j, k))``.
    """
    d = np.asarray(direction, dtype=float)
    n = int(round(np.sqrt(d.size)))
    if n * n != d.size or n < 3:
        raise ValueError(f"direction must be a row-major DxD matrix with D >= 3, got {d.size} values")
    lps = np.eye(4)
    lps[:3, :3] = d.reshape(n, n)[:3, :3] * np.asarray(spacing, dtype=float)[:3][None]
    lps[:3, 3] = np.asarray(origin, dtype=float)[:3]
    return LPS_TO_RAS @ lps


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each array axis: the column norms of the 3x3 part."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Transform points ``(..., 3)`` by a 4x4 affine."""
    pts = np.asarray(points, dtype=float)
    return pts @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(..., 3)`` of RAS+ world points ``(..., 3)``."""
    return apply_affine(np.linalg.inv(affine), points_mm)


def voxel_to_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """RAS+ world mm ``(..., 3)`` of continuous voxel indices ``(..., 3)``."""
    return apply_affine(affine, index)


# ----------------------------------------------------------------------------- boxes


def as_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Coerce to a float array ``(N, 6)`` (a single box becomes ``(1, 6)``)."""
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return arr.reshape(0, 6)
    arr = arr.reshape(-1, 6)
    return arr


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners of each box: ``(N, 6) -> (N, 8, 3)``."""
    b = as_boxes(boxes)
    lo, hi = b[:, :3], b[:, 3:]
    sel = np.array([[(c >> d) & 1 for d in range(3)] for c in range(8)], dtype=bool)  # (8, 3)
    return np.where(sel[None], hi[:, None, :], lo[:, None, :])


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Axis-aligned bounding boxes of boxes mapped by a 4x4 ``matrix``: ``(N, 6) -> (N, 6)``.

    Exact when ``matrix`` only permutes/flips/scales axes (the RAS-canonical case);
    otherwise the enclosing axis-aligned box of the transformed corners.
    """
    corners = apply_affine(matrix, box_corners(boxes))
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def boxes_voxel_to_world(boxes_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel boxes ``(N, 6)`` -> world RAS+ mm boxes ``(N, 6)``."""
    return transform_boxes(boxes_vox, affine)


def boxes_world_to_voxel(boxes_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World RAS+ mm boxes ``(N, 6)`` -> continuous voxel boxes ``(N, 6)`` of ``affine``'s grid."""
    return transform_boxes(boxes_mm, np.linalg.inv(affine))


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Voxel box ``(6,)`` enclosing all non-zero voxels of a 3D mask, or None if empty."""
    idx = np.nonzero(np.asarray(mask))
    if len(idx[0]) == 0:
        return None
    lo = np.array([i.min() for i in idx], dtype=float) - 0.5
    hi = np.array([i.max() for i in idx], dtype=float) + 0.5
    return np.concatenate([lo, hi])


def clip_boxes(boxes_vox: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Clip voxel boxes to an array of ``shape``.

    Returns ``(clipped (N, 6), visible_fraction (N,))``; a box entirely outside has
    fraction 0, so callers can drop or flag it instead of keeping a wrong box.
    """
    b = as_boxes(boxes_vox)
    lo_lim = np.full(3, -0.5)
    hi_lim = np.asarray(shape[-3:], dtype=float) - 0.5
    lo = np.clip(b[:, :3], lo_lim, hi_lim)
    hi = np.clip(b[:, 3:], lo_lim, hi_lim)
    clipped = np.concatenate([lo, hi], axis=1)
    vol = box_volume(b)
    frac = np.where(vol > 0, box_volume(clipped) / np.where(vol > 0, vol, 1.0), 0.0)
    return clipped, frac


def box_volume(boxes: np.ndarray) -> np.ndarray:
    """Volume of each box ``(N, 6) -> (N,)`` (0 for degenerate boxes)."""
    b = as_boxes(boxes)
    return np.prod(np.clip(b[:, 3:] - b[:, :3], 0, None), axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise 3D IoU, intersection volume over union volume: ``(N, 6), (M, 6) -> (N, M)``.

    (M3D's grounding metric divides by the box enclosing both; that is not IoU.)
    """
    a, b = as_boxes(a), as_boxes(b)
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = box_volume(a)[:, None] + box_volume(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------- text


def unit_boxes(boxes_vox: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel boxes in the model-input array of ``shape`` -> the continuous 0..1 frame ``(N, 6)``:
    the index range ``[-0.5, n - 0.5]`` of each axis maps onto ``[0, 1]`` (clipped)."""
    b = as_boxes(np.asarray(boxes_vox, dtype=float))
    n = np.tile(np.asarray(shape[-3:], dtype=float), 2)
    return np.clip((b + 0.5) / n, 0.0, 1.0)


def normalise_boxes(boxes_vox: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel boxes in the model-input array of ``shape`` -> integers 0..999 ``(N, 6)`` (:func:`unit_boxes` rounded)."""
    return np.rint(unit_boxes(boxes_vox, shape) * BOX_SCALE).astype(np.int64)


def denormalise_boxes(boxes_int: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`normalise_boxes`: integers 0..999 -> voxel boxes of ``shape``."""
    b = as_boxes(boxes_int)
    n = np.tile(np.asarray(shape[-3:], dtype=float), 2)
    return b / BOX_SCALE * n - 0.5


def format_box(box_int: Sequence[int]) -> str:
    """One normalised box as text: ``<box>[x0,y0,z0,x1,y1,z1]</box>``."""
    vals = [int(v) for v in box_int]
    if len(vals) != 6:
        raise ValueError(f"a box has 6 numbers, got {len(vals)}")
    return "<box>[" + ",".join(str(v) for v in vals) + "]</box>"


def parse_boxes(text: str) -> list[np.ndarray]:
    """All well-formed boxes in ``text`` as int arrays ``(6,)``, in order of appearance.

    A box is well-formed when it has exactly six integers in 0..999 with
    ``x0<=x1, y0<=y1, z0<=z1``; anything else is ignored (count it as unparseable).
    """
    out = []
    for m in _BOX_RE.finditer(text):
        parts = [p.strip() for p in m.group(1).split(",")]
        if len(parts) != 6 or not all(re.fullmatch(r"\d{1,3}", p) for p in parts):
            continue
        vals = np.array([int(p) for p in parts], dtype=np.int64)
        if (vals > BOX_SCALE).any() or (vals[:3] > vals[3:]).any():
            continue
        out.append(vals)
    return out
