"""Why lesion diameters miss 10%: each miss of a trained run, and what the image itself allows.

    .venv/bin/python scripts/probe_sizes.py /tmp/vol3d_bench_quality    # a bench_quality or demo folder

Reads ``OUT/run`` and the held-out split of ``OUT/cache`` (as ``scripts/bench_quality.py`` and
``vol3d demo`` leave them) and, for the question the evaluation scores (``measure``: the largest
instance of each finding type with a true long axial diameter >= 10 mm), sorts each answer of the
first and of the second look into: within 10%, longer or shorter (with how many voxels each box edge
is off), another instance, or missed. Then an **intensity oracle**: told the true lesion's mean
intensity and its surroundings' (the channel where they differ most, in noise units), it labels
every voxel within one voxel of the lesion by the nearer mean and measures the component: what a
voxel-by-voxel reading of the image gets, with the truth's help. Prints a table and writes
``OUT/probe_sizes.json``. docs/benchmarks/quality.md (round 12) has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vol3d.tasks.reasoning import instances  # noqa: E402
from vol3d.tasks.regions import Perceived, Region, size_triple  # noqa: E402

#: The ``measure`` section's lesions: true long axial diameter at least this (mm).
MIN_MM = 10.0


def long_diameter(size_mm: Sequence[float]) -> int:
    """Whole-mm long axial diameter, as the measurement answers give it."""
    return size_triple(size_mm)[0]


def within10(pred: float, truth: float) -> bool:
    return abs(pred - truth) <= 0.1 * truth


def largest(perceived: Perceived, name: str) -> Region | None:
    found = instances(perceived, name)
    return found[0] if found else None


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:3], b[:3]), np.minimum(a[3:], b[3:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    union = float(np.prod(a[3:] - a[:3]) + np.prod(b[3:] - b[:3])) - inter
    return inter / union if union > 0 else 0.0


def size_miss(truth: Region, pred: Region | None) -> dict[str, Any]:
    """How the answer for ``truth`` (the largest true instance) went: ``kind`` is ``within``,
    ``longer``, ``shorter``, ``other instance`` (box IoU under 0.3) or ``missed``; ``edges`` the
    predicted box's edges minus the true ones in voxels (lo x y z, hi x y z) when it is the lesion."""
    t = long_diameter(truth.size_mm)
    if pred is None:
        return {"kind": "missed", "truth_mm": t, "pred_mm": None}
    p = long_diameter(pred.size_mm)
    out: dict[str, Any] = {"truth_mm": t, "pred_mm": p}
    if within10(p, t):
        out["kind"] = "within"
    elif box_iou(pred.box, truth.box) < 0.3:
        out["kind"] = "other instance"
    else:
        out["kind"] = "longer" if p > t else "shorter"
    if out["kind"] != "other instance":
        out["edges"] = np.round(pred.box - truth.box).astype(int).tolist()
    return out


def intensity_oracle(image: np.ndarray, mask: np.ndarray, finding: np.ndarray, spacing: Sequence[float],
                     ) -> tuple[int | None, float]:
    """Long axial diameter (mm) of the lesion ``mask`` as read voxel by voxel from ``image (C, X, Y, Z)``
    by the nearer of its true mean and its surroundings' mean, and that channel's contrast-to-noise.

    Surroundings: the ring one to two voxels outside the mask, other findings excluded. Voxels within
    one voxel of the mask are labelled; the labelled component that overlaps the mask most is measured.
    """
    from scipy import ndimage

    near = ndimage.binary_dilation(mask, iterations=1)
    ring = ndimage.binary_dilation(mask, iterations=2) & ~near & (finding == 0)
    core = ndimage.binary_erosion(mask)
    inside = core if core.sum() >= 3 else mask
    if not ring.any():
        return None, 0.0
    best = (-1.0, 0, 0.0, 0.0)
    for c in range(image.shape[0]):
        a, b = float(image[c][inside].mean()), float(image[c][ring].mean())
        noise = float(np.sqrt((image[c][inside].var() + image[c][ring].var()) / 2)) + 1e-6
        if abs(a - b) / noise > best[0]:
            best = (abs(a - b) / noise, c, a, b)
    cnr, c, a, b = best
    labelled = near & (np.abs(image[c] - a) < np.abs(image[c] - b))
    comps, n = ndimage.label(labelled)
    if n == 0:
        return None, cnr
    overlap = np.bincount(comps[mask], minlength=n + 1)
    overlap[0] = 0
    sl = ndimage.find_objects((comps == int(overlap.argmax())).astype(np.int32))[0]
    size = np.array([s.stop - s.start for s in sl], float) * np.asarray(spacing, float)
    return long_diameter(size), cnr


def probe(out: Path, progress: bool = True) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from vol3d import demo
    from vol3d.inference import load
    from vol3d.tasks.regions import perceived_from_case

    pipe = load(out / "run", device="cpu", preprocess_config=out / "cache")
    model = pipe.model
    if not pipe.perceives:
        raise SystemExit(f"{out / 'run'} has no perception: nothing to probe")
    cases, split = demo.held_out(out / "cache", pipe.input_shape)
    rows: list[dict[str, Any]] = []
    for i in tqdm(range(len(cases)), desc="probe", disable=not progress):
        case = cases[i]
        image = np.asarray(case["image"], np.float32)
        spacing = np.asarray(case["spacing"], float)
        truth, dense = perceived_from_case(case, model.vocab, model.labels)
        vol = torch.as_tensor(image)[None]
        with torch.inference_mode(), model.reading(vol):  # the volume is encoded once for both looks
            looks = {"first": model.perceive(vol, spacing=spacing, look_again=False)[0],
                     "second": model.perceive(vol, spacing=spacing, look_again=True)[0]}
        for name in sorted({r.name for r in truth.findings}):
            big = largest(truth, name)
            assert big is not None
            if long_diameter(big.size_mm) < MIN_MM:
                continue
            mask = dense.region_map == truth.findings.index(big)
            oracle, cnr = intensity_oracle(image, mask, np.asarray(dense.finding), spacing)
            rows.append({"case": str(case.get("id", i)), "finding": name,
                         **{look: size_miss(big, largest(per, name)) for look, per in looks.items()},
                         "oracle_mm": oracle, "oracle_within": oracle is not None
                         and within10(oracle, long_diameter(big.size_mm)), "contrast_to_noise": round(cnr, 2)})
    n = max(len(rows), 1)
    summary = {look: {"within10": sum(r[look]["kind"] == "within" for r in rows) / n,
                      "kinds": dict(Counter(r[look]["kind"] for r in rows))} for look in ("first", "second")}
    summary["oracle_within10"] = sum(r["oracle_within"] for r in rows) / n
    summary["contrast_to_noise_median"] = float(np.median([r["contrast_to_noise"] for r in rows])) if rows else 0.0
    return {"split": split, "n": len(rows), "summary": summary, "lesions": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a bench_quality or demo folder (run/ and cache/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for need in ("run", "cache"):
        if not (args.out / need).is_dir():
            raise SystemExit(f"{args.out / need} is missing: give the folder of a scripts/bench_quality.py or "
                             "vol3d demo run")
    res = probe(args.out, progress=not args.no_progress)
    s = res["summary"]
    print(f"{res['n']} largest lesions >= {MIN_MM:.0f} mm per type and held-out series ({res['split']} split)")
    for look in ("first", "second"):
        print(f"  {look} look: within 10% {s[look]['within10']:.3f}  {s[look]['kinds']}")
    print(f"  intensity oracle: within 10% {s['oracle_within10']:.3f} (median contrast-to-noise "
          f"{s['contrast_to_noise_median']:.1f})")
    (args.out / "probe_sizes.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out / 'probe_sizes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
