"""Benchmark: vol3d preprocess vs the equivalent MONAI transform chain, and patch reads.

Same synthetic CT volumes (a simple torso phantom in HU, stored as NIfTI
int16 in an LPS-like orientation so both pipelines reorient and resample) through

- vol3d: ``preprocess.runner.run_preprocess`` with ``--workers W`` (chunked HDF5 cache);
- MONAI: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd ->
  ScaleIntensityRanged -> CropForegroundd -> SaveImaged (NIfTI), in a torch DataLoader
  with ``num_workers=W``;

then random patch reads (patches/s) from the HDF5 cache, from a MONAI
PersistentDataset (same chain, cached, + RandSpatialCropd) and from the MONAI NIfTI
outputs (nibabel load + crop). Results go to stdout and, with ``--json``, a file.

    .venv/bin/python scripts/bench_preprocess.py --cases 6 --shape 512 512 200 --workers 2
    .venv/bin/python scripts/bench_preprocess.py --format dicom --cases 4 --workers 1   # DICOM series

``--format dicom`` writes the same volumes as DICOM series (one file per slice); MONAI reads each
series folder with its ``PydicomReader``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_SPACING = (1.0, 1.0, 2.0)  # mm; a 512x512x200 CT at 0.7x0.7x1.25 mm becomes about 360x360x125
WINDOW = (-1000.0, 1000.0)  # HU -> 0..1
FG_HU = -500.0  # body threshold
MARGIN_MM = 10.0


def phantom_hu(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """A torso-like CT volume in HU ``(X, Y, Z)``: air, body wall, lungs, liver, spine, noise.

    Deliberately simple (the benchmark measures throughput, not anatomy); the body fills
    about 70% of the field of view as in a real abdominal CT.
    """
    x, y, z = (np.arange(n, dtype=np.float32) * s - n * s / 2 for n, s in zip(shape, spacing, strict=True))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    half = np.array(shape) * np.array(spacing) / 2
    a, b = 0.7 * half[0] * rng.uniform(0.9, 1.0), 0.5 * half[1] * rng.uniform(0.9, 1.0)
    body = (x / a) ** 2 + (y / b) ** 2 <= 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[np.broadcast_to(body, shape)] = 40.0
    lungs = (((np.abs(x) - 0.45 * a) / (0.3 * a)) ** 2 + (y / (0.6 * b)) ** 2 + ((z - half[2] / 2) / half[2]) ** 2) <= 1
    hu[lungs & body] = -850.0
    liver = ((x + 0.3 * a) / (0.35 * a)) ** 2 + (y / (0.55 * b)) ** 2 + ((z + 0.3 * half[2]) / (0.4 * half[2])) ** 2 <= 1
    hu[liver] = 60.0
    spine = (x / 15.0) ** 2 + ((y + 0.7 * b) / 15.0) ** 2 <= 1
    hu[np.broadcast_to(spine, shape)] = 700.0
    hu += rng.normal(0, 12, size=shape).astype(np.float32)
    return hu


def make_volumes(folder: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> list[Path]:
    """``n`` CT volumes as int16 NIfTI (HU), stored LPS-like (x and y flipped) like a converted DICOM."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        extent = np.array(shape) * np.array(spacing)
        affine[:3, 3] = [extent[0] / 2, extent[1] / 2, -extent[2] / 2]
        hu = phantom_hu(shape, spacing, rng)
        img = nib.Nifti1Image(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), affine)
        img.header.set_xyzt_units("mm")
        path = folder / f"case{i:03d}.nii.gz"
        nib.save(img, path)
        paths.append(path)
    return paths


def make_dicom(folder: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
               seed: int) -> list[Path]:
    """The volumes of :func:`make_volumes` as DICOM CT series, one folder each (rescale -1024, uint16)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vol3d.synth.dicom_writer import slice_positions, write_series

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        hu = np.clip(np.rint(phantom_hu(shape, spacing, rng)), -1024, 3071)
        extent = np.array(shape) * np.array(spacing)
        first = [-extent[0] / 2, -extent[1] / 2, -extent[2] / 2]
        path = folder / f"case{i:03d}"
        write_series(path, hu, orientation=[1, 0, 0, 0, 1, 0], pixel_spacing=[spacing[1], spacing[0]],
                     positions_lps=slice_positions(first, [0, 0, spacing[2]], shape[2]),
                     patient={"PatientID": f"P{i}"}, study={"StudyInstanceUID": f"1.2.826.0.1.3680043.99.{i}"},
                     slice_thickness=spacing[2], uid_entropy=["bench-preprocess", str(i)])  # fmt: skip
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- vol3d


def vol3d_config(patch: int):
    from preprocess.config import PreprocessConfig

    return PreprocessConfig(
        target_spacing=TARGET_SPACING,
        ct_windows=[WINDOW],
        crop_foreground=True,
        crop_margin_mm=MARGIN_MM,
        ct_foreground_hu=FG_HU,
        antialias=False,  # MONAI's Spacing does not smooth before downsampling either
        patch_size=(patch, patch, patch),
        compression="lz4",
    )


def bench_vol3d(src: Path, cache: Path, workers: int, patch: int, expected: int) -> float:
    from preprocess.runner import RunOptions, run_preprocess

    os.environ.setdefault("VOL3D_ID_KEY", "b3e7c0de5eed1dea" * 4)
    t0 = time.perf_counter()
    summary = run_preprocess(src, cache, vol3d_config(patch), opts=RunOptions(workers=workers, progress=False))
    seconds = time.perf_counter() - t0
    assert summary.counts["ok"] == expected, summary.table()
    return seconds


# ----------------------------------------------------------------------------- MONAI


def _body(x):  # module level: picklable for DataLoader workers
    return x > (FG_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def monai_transforms(out_dir: Path | None, reader: str | None = None):
    from monai import transforms as mt

    margin = [int(round(MARGIN_MM / s)) for s in TARGET_SPACING]
    chain = [
        mt.LoadImaged(keys="image", image_only=True, reader=reader),
        mt.EnsureChannelFirstd(keys="image"),
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=TARGET_SPACING, mode="bilinear"),
        mt.ScaleIntensityRanged(keys="image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        mt.CropForegroundd(keys="image", source_key="image", select_fn=_body, margin=margin, allow_smaller=True),
    ]
    if out_dir is not None:
        chain.append(
            mt.SaveImaged(keys="image", output_dir=str(out_dir), output_postfix="", separate_folder=False, print_log=False)
        )
    return chain


def bench_monai(files: list[Path], out_dir: Path, workers: int, reader: str | None = None) -> float:
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    torch.set_num_threads(1)  # one thread per worker process, as vol3d's workers
    ds = Dataset([{"image": str(f)} for f in files], Compose(monai_transforms(out_dir, reader)))
    loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=lambda b: len(b))
    t0 = time.perf_counter()
    n = sum(loader)
    seconds = time.perf_counter() - t0
    assert n == len(files)
    return seconds


# ----------------------------------------------------------------------------- patch reads


def _random_start(rng: np.random.Generator, shape, patch: int) -> list[int]:
    return [int(rng.integers(0, max(1, s - patch + 1))) for s in shape]


def bench_h5(cache: Path, n: int, patch: int, seed: int) -> float:
    from preprocess.manifest import read_manifest
    from preprocess.store import CaseReader

    rows = [r for r in read_manifest(cache / "manifest.jsonl") if r.status == "ok"]
    readers = [CaseReader(cache / r.h5, r.key) for r in rows]  # opened once, as in a DataLoader worker
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(n):
        r = readers[int(rng.integers(len(readers)))]
        x = r.image(_random_start(rng, r.shape, patch), (patch,) * 3).astype(np.float32)
        assert x.shape[-3:] == (patch,) * 3
    seconds = time.perf_counter() - t0
    for r in readers:
        r.close()
    return n / seconds


def bench_persistent(files: list[Path], cache_dir: Path, n: int, patch: int, seed: int,
                     reader: str | None = None) -> tuple[float, float]:
    """(patches/s once cached, seconds to build the cache)."""
    import torch
    from monai.data import PersistentDataset
    from monai.transforms import Compose, RandSpatialCropd

    torch.set_num_threads(1)
    chain = Compose([*monai_transforms(None, reader), RandSpatialCropd(keys="image", roi_size=(patch,) * 3, random_size=False)])
    ds = PersistentDataset([{"image": str(f)} for f in files], chain, cache_dir=str(cache_dir))
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    build = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    chain.set_random_state(seed)
    t0 = time.perf_counter()
    for _ in range(n):
        x = ds[int(rng.integers(len(ds)))]["image"]
        assert tuple(x.shape[-3:]) == (patch,) * 3
    return n / (time.perf_counter() - t0), build


def bench_nifti(files: list[Path], n: int, patch: int, seed: int) -> float:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shapes = [nib.load(f).shape for f in files]
    t0 = time.perf_counter()
    for _ in range(n):
        i = int(rng.integers(len(files)))
        s = _random_start(rng, shapes[i][-3:], patch)
        img = nib.load(files[i])  # a dataset without a cache opens the file per item
        x = np.asarray(img.dataobj[s[0] : s[0] + patch, s[1] : s[1] + patch, s[2] : s[2] + patch], dtype=np.float32)
        assert x.ndim == 3
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=6, help="number of CT volumes")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200), help="voxels (X, Y, Z) of each volume")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.25), help="mm of the source volumes")
    ap.add_argument("--workers", type=int, default=2, help="processes for vol3d and DataLoader workers for MONAI")
    ap.add_argument("--patch", type=int, default=96, help="cubic patch edge (voxels) for the read benchmark")
    ap.add_argument("--reads", type=int, default=200, help="random patch reads per method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                    help="source format: gzipped NIfTI files (default) or DICOM series folders")
    args = ap.parse_args()

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        src = tmp / args.format
        t0 = time.perf_counter()
        if args.format == "dicom":
            files = sorted(p for p in src.glob("case*") if p.is_dir()) if src.is_dir() else []
            make = make_dicom
        else:
            files = sorted(src.glob("*.nii.gz")) if src.is_dir() else []
            make = make_volumes
        if len(files) != args.cases:
            shutil.rmtree(src, ignore_errors=True)
            files = make(src, args.cases, tuple(args.shape), tuple(args.spacing), args.seed)
        print(f"data: {args.cases} x {tuple(args.shape)} int16 {'DICOM series' if args.format == 'dicom' else 'NIfTI'} "
              f"({time.perf_counter() - t0:.1f} s to make)")
        for d in ("cache", "monai_out", "persistent"):
            shutil.rmtree(tmp / d, ignore_errors=True)

        reader = "PydicomReader" if args.format == "dicom" else None
        t_monai = bench_monai(files, tmp / "monai_out", args.workers, reader)
        t_vol3d = bench_vol3d(src, tmp / "cache", args.workers, args.patch, len(files))
        monai_files = sorted((tmp / "monai_out").glob("*.nii.gz"))
        r_h5 = bench_h5(tmp / "cache", args.reads, args.patch, args.seed)
        r_pd, pd_build = bench_persistent(files, tmp / "persistent", args.reads, args.patch, args.seed, reader)
        r_nii = bench_nifti(monai_files, args.reads, args.patch, args.seed)

        res = {
            "machine": machine(),
            "cases": args.cases,
            "format": args.format,
            "shape": list(args.shape),
            "spacing": list(args.spacing),
            "workers": args.workers,
            "patch": args.patch,
            "reads": args.reads,
            "vol3d_volumes_per_min": 60 * args.cases / t_vol3d,
            "monai_volumes_per_min": 60 * args.cases / t_monai,
            "preprocess_ratio_vol3d_over_monai": t_monai / t_vol3d,
            "patches_per_s_h5": r_h5,
            "patches_per_s_persistent_dataset": r_pd,
            "patches_per_s_nifti": r_nii,
            "persistent_cache_build_s": pd_build,
            "ratio_h5_over_nifti": r_h5 / r_nii,
            "ratio_h5_over_persistent": r_h5 / r_pd,
            "cache_bytes_h5": sum(p.stat().st_size for p in (tmp / "cache").rglob("*.h5")),
            "cache_bytes_persistent": sum(p.stat().st_size for p in (tmp / "persistent").rglob("*.pt")),
            "bytes_monai_nifti": sum(p.stat().st_size for p in monai_files),
        }
        print(f"machine: {res['machine']}")
        print(f"preprocess  vol3d {res['vol3d_volumes_per_min']:.2f} vol/min   MONAI {res['monai_volumes_per_min']:.2f} vol/min"
              f"   ratio {res['preprocess_ratio_vol3d_over_monai']:.2f}x")
        print(f"patch reads {args.patch}^3  HDF5 {r_h5:.1f}/s   PersistentDataset {r_pd:.1f}/s   NIfTI {r_nii:.1f}/s"
              f"   HDF5/NIfTI {res['ratio_h5_over_nifti']:.1f}x   HDF5/Persistent {res['ratio_h5_over_persistent']:.1f}x")
        print(f"storage     HDF5 {res['cache_bytes_h5'] / 1e6:.0f} MB   Persistent {res['cache_bytes_persistent'] / 1e6:.0f} MB"
              f"   NIfTI {res['bytes_monai_nifti'] / 1e6:.0f} MB")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
