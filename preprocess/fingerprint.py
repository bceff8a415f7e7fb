"""Dataset fingerprint (``fingerprint.json``), in the spirit of nnU-Net's.

The runner calls :func:`case_summary` for each ok case (in the worker, on the
:class:`~preprocess.transforms.Prepared` it just wrote) and :func:`write_fingerprint`
once at the end with all summaries. Spacings and shapes are reported along the
RAS+ canonical axes (X, Y, Z), the axes ``target_spacing`` refers to.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import io_orientation

from preprocess import geometry
from preprocess.manifest import atomic_write_text
from preprocess.transforms import Prepared

#: Percentiles reported for spacings, shapes and intensities.
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
#: An axis whose median spacing exceeds this many times the others' counts as very anisotropic.
ANISOTROPY_THRESHOLD = 3.0


def case_summary(prepared: Prepared) -> dict[str, Any]:
    """Plain-JSON facts about one case: original spacing/shape along the canonical axes,
    cached shape, modality, flags and a sample of raw foreground intensities (HU for CT)."""
    ornt = io_orientation(prepared.orig_affine)
    to_can = np.argsort(ornt[:, 0])  # canonical axis a <- original axis to_can[a]
    spacing = geometry.spacing_from_affine(prepared.orig_affine)[to_can]
    shape = np.asarray(prepared.orig_shape)[to_can]
    return {
        "modality": prepared.modality,
        "spacing": [float(s) for s in spacing],
        "shape": [int(n) for n in shape],
        "cached_shape": list(prepared.shape),
        "cached_spacing": list(prepared.spacing),
        "flags": list(prepared.flags),
        "fg_samples": [float(v) for v in prepared.fg_samples],
    }


def suggest_target_spacing(
    spacings: np.ndarray, shapes: np.ndarray, anisotropy: float = ANISOTROPY_THRESHOLD
) -> tuple[float, float, float]:
    """nnU-Net's rule: the median spacing per axis, except for a very anisotropic axis.

    When the coarsest median spacing exceeds ``anisotropy`` times the finest other one
    *and* that axis has ``anisotropy`` times fewer voxels, its 10th percentile is used
    instead (a median would throw away too much in-plane resolution elsewhere), but never
    finer than the other axes.

    Args:
        spacings: ``(N, 3)`` mm per case, canonical axes.
        shapes: ``(N, 3)`` voxels per case, same axes.
    """
    sp = np.asarray(spacings, dtype=float).reshape(-1, 3)
    sh = np.asarray(shapes, dtype=float).reshape(-1, 3)
    target = np.median(sp, axis=0)
    size = np.median(sh, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > anisotropy * max(target[others]) and size[worst] * anisotropy < min(size[others]):
        coarse = float(np.percentile(sp[:, worst], 10))
        target[worst] = max(coarse, float(max(target[others])) + 1e-5)
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def _stats(values: np.ndarray, axis: int | None = 0) -> dict[str, Any]:
    pct = np.percentile(values, PERCENTILES, axis=axis)
    out = {f"p{p}": np.round(v, 4).tolist() for p, v in zip(PERCENTILES, pct, strict=True)}
    out["median"] = np.round(np.median(values, axis=axis), 4).tolist()
    out["mean"] = np.round(np.mean(values, axis=axis), 4).tolist()
    return out


def _intensity_stats(samples: np.ndarray) -> dict[str, float]:
    # the statistics nnU-Net's CT normalisation reads (clip to 0.5/99.5, then z-score)
    if samples.size == 0:
        return {}
    p = np.percentile(samples, [0.5, 50, 99.5])
    return {
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "p0.5": float(p[0]),
        "median": float(p[1]),
        "p99.5": float(p[2]),
        "n_samples": int(samples.size),
    }


def fingerprint(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset fingerprint from :func:`case_summary` rows: counts, spacing/shape statistics,
    foreground intensity statistics and the suggested target spacing, overall and per modality."""
    out: dict[str, Any] = {"n_cases": len(summaries), "by_modality": {}}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(str(s["modality"]), []).append(s)
    for modality, rows in sorted(groups.items()):
        sp = np.array([r["spacing"] for r in rows], dtype=float)
        sh = np.array([r["shape"] for r in rows], dtype=float)
        cached = np.array([r["cached_shape"] for r in rows], dtype=float)
        fg = np.concatenate([np.asarray(r.get("fg_samples", []), dtype=float) for r in rows])
        flags: dict[str, int] = {}
        for r in rows:
            for f in r.get("flags", []):
                flags[f] = flags.get(f, 0) + 1
        out["by_modality"][modality] = {
            "n_cases": len(rows),
            "spacing": _stats(sp),
            "shape": _stats(sh),
            "cached_shape": _stats(cached),
            "foreground_intensity": _intensity_stats(fg),
            "suggested_target_spacing": list(suggest_target_spacing(sp, sh)),
            "flags": flags,
        }
    return out


def write_fingerprint(cache_dir: str | Path, summaries: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``cache_dir/fingerprint.json`` atomically and return its path."""
    path = Path(cache_dir) / "fingerprint.json"
    atomic_write_text(path, json.dumps(fingerprint(summaries), indent=2) + "\n")
    return path
