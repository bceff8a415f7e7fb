"""Geometry of a stack of 2D slices: sort along the normal, find duplicates, tilt and gaps, resample.

Pure numpy on slice positions (LPS mm) so DICOM single-frame series and enhanced
multi-frame files share one implementation. No pixels are read here except by
:func:`resample_stack`, which ``load`` calls when a policy asked for resampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from preprocess import reasons

#: Positions closer than this along the normal (mm) are "the same slice position".
DUPLICATE_TOL_MM = 0.01

# Flags added to Image.flags when a policy resampled the stack onto a regular grid.
FLAG_TILT = "RESAMPLED_GANTRY_TILT"
FLAG_UNEVEN = "RESAMPLED_UNEVEN_SPACING"
FLAG_MISSING = "RESAMPLED_MISSING_SLICES"


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal ``(3,)`` of ImageOrientationPatient: row cosine x column cosine (LPS)."""
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:6], float)
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two directions in degrees, ignoring their sign (0..90)."""
    c = abs(float(np.dot(a, b))) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, 0.0, 1.0))))


@dataclasses.dataclass
class StackIssue:
    """Why a stack cannot be used as-is: a reason code, a sentence (without the series name) and
    whether a ``resample`` policy could repair it (``policy`` is the config field that decides)."""

    reason: str
    message: str
    policy: str = ""  # "tilt_policy" | "uneven_policy" | "" (not repairable)
    flag: str = ""


@dataclasses.dataclass
class StackGeometry:
    """Result of :func:`analyse_positions` for positions already sorted along the normal.

    ``issues`` is empty for a regular stack. ``step`` is the vector between neighbouring
    slices used in the affine (LPS mm); ``along`` the distance of each slice from the first along
    the normal (mm) and ``inplane`` the in-plane offset of each slice from the first, in pixel
    units ``(N, 2)`` (column index, row index) - what :func:`resample_stack` needs.
    """

    step: np.ndarray
    along: np.ndarray
    inplane: np.ndarray
    issues: list[StackIssue]


def sort_along_normal(positions: np.ndarray, orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of slices by position along the slice normal (never by InstanceNumber).

    Args:
        positions: ``(N, 3)`` ImagePositionPatient (LPS mm).
    Returns:
        ``(order (N,), s (N,))``: indices that sort the slices, and the sorted distances along the normal.
    """
    s = np.asarray(positions, float) @ slice_normal(orientation)
    order = np.argsort(s, kind="stable")
    return order, s[order]


def duplicate_runs(s_sorted: np.ndarray) -> list[list[int]]:
    """Groups (indices into the sorted stack) of slices that share a position; only groups of 2+."""
    runs: list[list[int]] = []
    current = [0]
    for k in range(1, len(s_sorted)):
        if s_sorted[k] - s_sorted[current[0]] <= DUPLICATE_TOL_MM:
            current.append(k)
        else:
            if len(current) > 1:
                runs.append(current)
            current = [k]
    if len(current) > 1:
        runs.append(current)
    return runs


def analyse_positions(
    positions_sorted: np.ndarray,
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    *,
    tilt_tolerance_deg: float,
    spacing_tolerance: float,
) -> StackGeometry:
    """Check a sorted, duplicate-free stack for gantry tilt, irregular placement, gaps and uneven spacing.

    Args:
        positions_sorted: ``(N, 3)`` positions (LPS mm), sorted along the normal, N >= 2.
        pixel_spacing: ``(row spacing, column spacing)`` mm.
    """
    p = np.asarray(positions_sorted, float)
    normal = slice_normal(orientation)
    row_cos = np.asarray(orientation[:3], float)
    col_cos = np.asarray(orientation[3:6], float)
    rel = p - p[0]
    along = rel @ normal  # (N,) distance from the first slice along the normal
    inplane_mm = rel - along[:, None] * normal[None]  # (N, 3)
    inplane = np.stack(
        [inplane_mm @ row_cos / float(pixel_spacing[1]), inplane_mm @ col_cos / float(pixel_spacing[0])], 1
    )
    n = len(p)
    issues: list[StackIssue] = []
    span = rel[-1]
    tilt = angle_deg(span, normal)
    step = span / (n - 1)

    # Shear must be linear in the distance along the normal (a tilt); anything else is not a stack.
    shear_per_mm = inplane_mm[-1] / along[-1]
    resid = np.linalg.norm(inplane_mm - along[:, None] * shear_per_mm[None], axis=1).max()
    if resid > 0.25 * min(float(v) for v in pixel_spacing):
        issues.append(
            StackIssue(
                reasons.UNEVEN_SLICE_SPACING,
                f"slice positions do not lie on a line (in-plane jumps up to {resid:.2f} mm between slices)",
            )
        )
        return StackGeometry(step, along, inplane, issues)
    if tilt > tilt_tolerance_deg:
        issues.append(
            StackIssue(
                reasons.GANTRY_TILT,
                f"has a gantry tilt of {tilt:.1f} degrees (slices sheared along the stack)",
                policy="tilt_policy",
                flag=FLAG_TILT,
            )
        )

    gaps = np.diff(along)
    median = float(np.median(gaps))
    ratio = gaps / median
    off = np.abs(ratio - 1.0) > spacing_tolerance
    if off.any():
        multiples = np.rint(ratio)
        whole = (np.abs(ratio - multiples) <= spacing_tolerance * multiples) & (multiples >= 1)
        if whole.all():
            missing = int((multiples - 1).sum())
            issues.append(
                StackIssue(
                    reasons.MISSING_SLICES,
                    f"has {missing} missing slice(s): {int(off.sum())} gap(s) are whole multiples of the "
                    f"{median:.3g} mm slice spacing",
                    policy="uneven_policy",
                    flag=FLAG_MISSING,
                )
            )
        else:
            issues.append(
                StackIssue(
                    reasons.UNEVEN_SLICE_SPACING,
                    f"has uneven slice spacing: gaps range {gaps.min():.3g}-{gaps.max():.3g} mm "
                    f"(median {median:.3g} mm, tolerance {spacing_tolerance:.0%})",
                    policy="uneven_policy",
                    flag=FLAG_UNEVEN,
                )
            )
    return StackGeometry(step, along, inplane, issues)


def regular_grid(geom: StackGeometry, orientation: Sequence[float]) -> dict:
    """Plan of a regular, untilted grid spanning the stack: plain data for ``Candidate.extra``.

    The output slices are spaced evenly along the normal from the first to the last slice,
    with the median gap (rounded so both end slices are kept).
    """
    along = geom.along
    median = float(np.median(np.diff(along)))
    n_out = int(round(along[-1] / median)) + 1
    step = slice_normal(orientation) * (along[-1] / (n_out - 1))
    return {
        "along": along.tolist(),
        "inplane": geom.inplane.tolist(),
        "n_out": n_out,
        "step": step.tolist(),
    }


def resample_stack(volume: np.ndarray, plan: dict) -> np.ndarray:
    """Resample ``(X, Y, Z)`` slices onto the regular grid of :func:`regular_grid` (trilinear).

    Each output slice at distance ``z`` along the normal takes the continuous source slice
    index interpolated from the slice distances, shifted in-plane by the interpolated shear,
    so a tilted stack becomes orthogonal and uneven gaps become even. Points outside the
    source take its minimum (air for CT). Returns float32 ``(X, Y, n_out)``.
    """
    from scipy.ndimage import map_coordinates

    along = np.asarray(plan["along"], float)
    inplane = np.asarray(plan["inplane"], float)
    n_out = int(plan["n_out"])
    nx, ny, nz = volume.shape
    z = np.linspace(0.0, along[-1], n_out)
    k_src = np.interp(z, along, np.arange(nz))
    di = np.interp(z, along, inplane[:, 0])
    dj = np.interp(z, along, inplane[:, 1])
    src = volume.astype(np.float32, copy=False)
    cval = float(volume.min())
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    out = np.empty((nx, ny, n_out), np.float32)
    for t in range(n_out):  # one output slice at a time: no full-size coordinate grids
        coords = np.stack([ii - di[t], jj - dj[t], np.full((nx, ny), k_src[t])])
        out[:, :, t] = map_coordinates(src, coords, order=1, mode="constant", cval=cval)
    return out
