"""Benchmark: vol3d ``prepare`` vs the equivalent MONAI transform chain on one synthetic CT.

Both start from the same uncompressed NIfTI file (512 x 512 x 200, 0.7 x 0.7 x 1.25 mm,
stored LPS-like as DICOM converters write it) and produce a RAS+ 1.5 x 1.5 x 3 mm volume,
HU -1000..1000 -> 0..1, cropped to the body:

- vol3d: nibabel load + ``preprocess.transforms.prepare`` (float16 output, anti-aliasing on
  and off).
- MONAI: LoadImage, Orientation("RAS"), Spacing(bilinear), ScaleIntensityRange(clip),
  CropForeground (body threshold, same margin).

Usage: ``python scripts/bench_transforms.py [--repeats 3] [--threads 2]``. Prints one line
per pipeline (best of the repeats, seconds) and the ratio MONAI / vol3d.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def synthetic_ct(path: Path, shape=(512, 512, 200)) -> None:
    """A body-shaped ellipse of soft tissue with noise in -1000 HU air, saved as .nii."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    body = ((x - 256) / 200.0) ** 2 + ((y - 270) / 150.0) ** 2 < 1
    rng = np.random.default_rng(0)
    vol = np.full(shape, -1000.0, np.float32)
    vol[body] = 40.0
    vol += rng.normal(0, 20, shape).astype(np.float32)
    aff = np.diag([-0.7, -0.7, 1.25, 1.0])
    aff[:3, 3] = [179.0, 179.0, -125.0]
    nib.save(nib.Nifti1Image(vol, aff), path)


def time_it(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out  # min: the least disturbed run on a shared machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for MONAI")
    args = ap.parse_args()

    import torch
    from monai.transforms import (
        Compose,
        CropForeground,
        LoadImage,
        Orientation,
        ScaleIntensityRange,
        Spacing,
    )

    from preprocess.config import PreprocessConfig
    from preprocess.transforms import prepare
    from preprocess.types import Image

    torch.set_num_threads(args.threads)
    margin_mm = 10.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii"
        synthetic_ct(path)

        def load() -> Image:
            img = nib.load(path)
            return Image(
                np.array(img.dataobj, dtype=np.float32), img.affine, "CT"
            )  # read fully, as MONAI does

        def ours(antialias: bool):
            cfg = PreprocessConfig(
                target_spacing=(1.5, 1.5, 3.0), crop_margin_mm=margin_mm, antialias=antialias
            )
            return lambda: prepare(load(), cfg)

        monai_chain = Compose(
            [
                LoadImage(image_only=True, ensure_channel_first=True),
                Orientation(axcodes="RAS"),
                Spacing(pixdim=(1.5, 1.5, 3.0), mode="bilinear"),
                ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
                CropForeground(select_fn=lambda x: x > 0.25, margin=int(margin_mm / 1.5)),  # > -500 HU
            ]
        )

        rows = []
        t_load, _ = time_it(load, args.repeats)
        rows.append(("nibabel load only", t_load, None))
        t_monai, m = time_it(lambda: monai_chain(str(path)), args.repeats)
        rows.append(("MONAI chain (load..crop)", t_monai, tuple(m.shape)))
        t_ours, p = time_it(ours(True), args.repeats)
        rows.append(("vol3d load + prepare (antialias)", t_ours, p.image.shape))
        t_fast, q = time_it(ours(False), args.repeats)
        rows.append(("vol3d load + prepare (no antialias)", t_fast, q.image.shape))
        for name, t, shape in rows:
            print(f"{name:40s} {t:7.3f} s   {shape if shape is not None else ''}")
        print(f"ratio MONAI / vol3d (antialias):    {t_monai / t_ours:5.2f}x")
        print(f"ratio MONAI / vol3d (no antialias): {t_monai / t_fast:5.2f}x")
        print(
            f"excluding the shared load: {(t_monai - t_load) / (t_ours - t_load):5.2f}x / "
            f"{(t_monai - t_load) / (t_fast - t_load):5.2f}x"
        )


if __name__ == "__main__":
    main()
