"""Segmentation benchmark: bounded CPU fine-tune on synthetic organs, held-out Dice at the ORIGINAL
resolution, tuned vs frozen encoder, sliding-window inference time per volume.

    python scripts/bench_seg.py --workdir /tmp/bench_seg --cases 24 --steps 300 [--init RUN] [--json out.json]

1. ``vol3d synth`` (small) + ``vol3d preprocess`` (configs/preprocess/tiny.yaml) of the DICOM series;
2. two fine-tunes of one preset that differ only in ``model.tune``: ``full`` and ``frozen``
   (the frozen encoder is ``--init RUN``'s, or a random one when no run is given: then the
   frozen variant measures what the decoder alone makes of untrained features);
3. ``vol3d predict`` over every series; Dice/HD95 per organ against ``labels/<uid>.nii.gz`` on
   the original grid, for the series of the held-out splits (val + test: never trained on);
4. inference time per volume: the sliding window alone on the cached grid, and the whole
   predict path (load, prepare, sliding window, back to the original grid, write).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "lung_left", "lung_right", "spine", "aorta"]


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vol3d.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def prepare_data(work: Path, cases: int) -> Path:
    export, cache = work / "export", work / "cache"
    if not (export / "truth.json").is_file():
        sh("synth", str(export), "--cases", str(cases), "--size", "small", "--nifti-fraction", "0", "--overwrite")
    if not (cache / "manifest.jsonl").is_file():
        sh("preprocess", str(export / "dicom"), "--labels", str(export / "labels"), "--config",
           str(ROOT / "configs/preprocess/tiny.yaml"), "--out", str(cache))
    return cache


def train(cache: Path, run: Path, preset: str, steps: int, tune: str, init: str | None) -> float:
    from preprocess.config_io import load_yaml
    from vol3d.seg.config import SegConfig
    from vol3d.seg.finetune import finetune

    cfg = load_yaml(SegConfig, ROOT / "configs/finetune" / f"{preset}.yaml", {
        "run_dir": str(run), "max_steps": steps, "val_every": 0, "ckpt_every": steps, "progress": False,
        "tensorboard": False, "device": "cpu", "data.cache_dir": str(cache), "model.tune": tune, "init": init,
    })
    start = time.perf_counter()
    finetune(cfg)
    return time.perf_counter() - start


def held_out(cache: Path) -> set[str]:
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"] for r in rows if r["status"] == "ok" and r["split"] in ("val", "test")}


def evaluate(run: Path, export: Path, out: Path, ids: set[str]) -> dict:
    import nibabel as nib
    import pydicom
    import torch

    from preprocess.transforms import align_label, prepare
    from preprocess.types import Image
    from vol3d.eval.metrics import aggregate_segmentation, dice_hd95_per_class
    from vol3d.seg.inference import sliding_window_logits
    from vol3d.seg.predict import Predictor, predict

    torch.set_num_threads(os.cpu_count() or 1)
    pred = Predictor.from_run(run, device="cpu")
    rows = predict(pred, export / "dicom", out, resample="probs", dicom_seg=False)
    per_case, total_s, window_s = [], [], []
    classes = {n: k for k, n in enumerate(pred.class_names) if n in ORGANS + ["lesion"]}
    for r in rows:
        if r.status != "ok" or r.id not in ids:
            continue
        nii = nib.load(out / r.nifti)
        mask = np.asarray(nii.dataobj)
        uid = pydicom.dcmread(export / "dicom" / r.source[0], stop_before_pixels=True).SeriesInstanceUID
        lab = nib.load(export / "labels" / f"{uid}.nii.gz")
        truth = align_label(np.asarray(lab.dataobj), lab.affine, Image(mask, nii.affine))
        spacing = np.sqrt((nii.affine[:3, :3] ** 2).sum(0))
        per_case.append(dice_hd95_per_class(mask, truth, classes, spacing))
        total_s.append(r.seconds)
    # the sliding window alone, on one cached-grid volume (no I/O, no resampling)
    image = nib.load(out / next(r.nifti for r in rows if r.status == "ok"))
    prepared = prepare(Image(np.asarray(image.dataobj, np.float32) * 0 - 1000, image.affine, "CT"), pred.preprocess)
    for _ in range(3):
        t = time.perf_counter()
        sliding_window_logits(pred.model, prepared.image, pred.roi_size, pred.infer)
        window_s.append(time.perf_counter() - t)
    agg = aggregate_segmentation(per_case)
    organ = [agg["dice"][o] for o in ORGANS if o in agg["dice"]]
    return {"cases": len(per_case), "dice": agg["dice"], "hd95": agg["hd95"],
            "mean_organ_dice": float(np.nanmean(organ)), "lesion_dice": agg["dice"].get("lesion"),
            "predict_s_per_volume": float(np.median(total_s)), "window_s_per_volume": float(np.median(window_s)),
            "cached_shape": list(prepared.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_seg"))
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="seg_resnet_tiny", help="configs/finetune/<preset>.yaml")
    ap.add_argument("--init", default=None, help="vol3d run whose encoder both variants start from")
    ap.add_argument("--variants", nargs="+", default=["full", "frozen"], choices=["full", "frozen", "lora"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("VOL3D_ID_KEY", "bench-key-not-secret-0123")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = prepare_data(args.workdir, args.cases)
    data_s = time.perf_counter() - t0
    ids = held_out(cache)
    results: dict = {"machine": f"{os.cpu_count()}-core CPU", "preset": args.preset, "steps": args.steps,
                     "cases": args.cases, "held_out_series": len(ids), "data_s": round(data_s, 1), "variants": {}}
    for tune in args.variants:
        run = args.workdir / f"run_{tune}"
        if not (run / "model").is_dir():
            train_s = train(cache, run, args.preset, args.steps, tune, args.init)
        else:
            train_s = float("nan")
        res = evaluate(run, args.workdir / "export", args.workdir / f"pred_{tune}", ids)
        res["train_s"] = round(train_s, 1)
        results["variants"][tune] = res
        print(f"{tune:>6}: mean organ Dice {res['mean_organ_dice']:.3f} (lesion {res['lesion_dice']}), "
              f"train {train_s:.0f} s, predict {res['predict_s_per_volume']:.2f} s/volume, "
              f"sliding window {res['window_s_per_volume']:.2f} s/volume", flush=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    v = results["variants"]
    print("\n| organ | " + " | ".join(v) + " |\n|---|" + "---|" * len(v))
    for o in [*ORGANS, "lesion"]:
        print(f"| {o} | " + " | ".join(f"{v[t]['dice'].get(o, float('nan')):.3f}" for t in v) + " |")
    print("| **mean organ** | " + " | ".join(f"**{v[t]['mean_organ_dice']:.3f}**" for t in v) + " |")
    if "full" in v and "frozen" in v:
        print(f"\nfrozen / full mean organ Dice: {v['frozen']['mean_organ_dice'] / v['full']['mean_organ_dice']:.2f}; "
              f"train time ratio {v['frozen']['train_s'] / max(v['full']['train_s'], 1e-9):.2f}")
    target = v.get("full", next(iter(v.values())))["mean_organ_dice"] >= 0.85
    print(f"target mean organ Dice >= 0.85 {'REACHED' if target else 'NOT reached'}; total {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
