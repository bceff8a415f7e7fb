"""Segmentation benchmark: vol3d's segmentation vs a plain MONAI UNet on the same cache, each trained
for the same wall-clock budget, both scored on the held-out series at the ORIGINAL resolution through
the same path (``vol3d predict``: prepare, sliding window, probabilities back to the original grid).

    python scripts/bench_seg.py --workdir /tmp/bench_seg --cases 48 --seed 0 --budget-min 15 --json out.json
    python scripts/bench_seg.py ... --init RUN    # also from a `vol3d train` run's encoder, tuned and frozen

1. ``vol3d synth --seed S --cases N --size small`` (DICOM only) and ``vol3d preprocess`` with ``--preprocess`` (default ``tiny_seg``: the tiny grid, no fixed window);
2. each model's seconds per step are measured on a few steps, then it trains for as many steps as fit
   in ``--budget-min`` (the learning-rate schedule sees the real length): vol3d through
   ``vol3d.seg.finetune.finetune`` (``--preset``, default ``configs/finetune/seg_unet_tiny.yaml``),
   the baseline (``monai.networks.nets.UNet``, channels 16-128, 2 residual units) through the same
   loop, data, DiceCE loss, optimiser and schedule, so only the network differs;
3. every held-out series (manifest splits val + test, never trained on) is segmented by
   ``vol3d.seg.predict.predict`` for both and scored against ``labels/<uid>.nii.gz`` on its own grid;
4. with ``--init RUN``: the same vol3d model started from RUN's encoder, tuned and frozen, for the
   same number of steps as from scratch; the validation Dice every fifth of the run is the curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "lung_left", "lung_right", "spine", "aorta"]
BASELINE = "monai.networks.nets.UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)"


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vol3d.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def prepare_data(work: Path, cases: int, seed: int, preprocess: str) -> Path:
    export, cache = work / "export", work / "cache"
    stamp = work / "data.json"
    want = {"cases": cases, "seed": seed, "preprocess": preprocess}
    if not stamp.is_file() or json.loads(stamp.read_text()) != want:
        sh("synth", str(export), "--cases", str(cases), "--seed", str(seed), "--size", "small",
           "--nifti-fraction", "0", "--overwrite")
        sh("preprocess", str(export / "dicom"), "--labels", str(export / "labels"), "--config",
           str(ROOT / "configs/preprocess" / f"{preprocess}.yaml"), "--out", str(cache), "--overwrite")
        stamp.write_text(json.dumps(want))
    return cache


def seg_config(cache: Path, run: Path, preset: str, steps: int, tune: str = "full", init: str | None = None):
    from preprocess.config_io import load_yaml
    from vol3d.seg.config import SegConfig

    return load_yaml(SegConfig, ROOT / "configs/finetune" / f"{preset}.yaml", {
        "run_dir": str(run), "max_steps": steps, "val_every": max(1, steps // 5), "ckpt_every": steps,
        "progress": False, "tensorboard": False, "device": "cpu", "data.cache_dir": str(cache), "model.tune": tune,
        "init": init, "data.max_val_cases": 8, "log_every": max(1, min(20, steps))})


def baseline_model(class_names: list[str], in_chans: int):
    """A plain MONAI UNet, with ``save_pretrained`` so the one loop can save it (safetensors)."""
    import torch
    from monai.networks.nets import UNet

    class Baseline(UNet):
        def save_pretrained(self, directory):
            from safetensors.torch import save_model

            Path(directory).mkdir(parents=True, exist_ok=True)
            save_model(self, str(Path(directory) / "model.safetensors"))

        def num_parameters(self, trainable_only: bool = False) -> int:
            return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    torch.manual_seed(0)
    return Baseline(3, in_chans, len(class_names), channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)


def fit_model(cfg, model=None) -> float:
    """Train (vol3d's own finetune, or ``model`` in the same loop with the same data); seconds taken."""
    from vol3d.seg.finetune import build_datasets, finetune
    from vol3d.seg.objective import SegObjective
    from vol3d.train.loop import fit

    start = time.perf_counter()
    if model is None:
        finetune(cfg)
    else:
        train, val = build_datasets(cfg)
        fit(cfg, model, SegObjective(cfg.model.class_names, cfg.model.patch_size, cfg.loss, cfg.infer), train, val,
            run_dir=Path(cfg.run_dir))
    return time.perf_counter() - start


def steps_in_budget(cache: Path, work: Path, preset: str, budget_s: float, baseline: bool) -> tuple[int, float]:
    """Steps that fit in ``budget_s`` for one model, from the time of steps 3..10 of a short run."""
    import shutil

    run = work / ("calibrate_baseline" if baseline else "calibrate_vol3d")
    shutil.rmtree(run, ignore_errors=True)
    cfg = seg_config(cache, run, preset, 10)
    cfg.val_every, cfg.log_every = 0, 1
    model = baseline_model(cfg.model.class_names, cfg.model.in_chans) if baseline else None
    fit_model(cfg, model)
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    times = {int(r["step"]): float(r["time"]) for r in rows if r["name"] == "train/loss"}
    per_step = (times[10] - times[3]) / 7  # steps 1-2 warm up the allocator and the data workers
    shutil.rmtree(run, ignore_errors=True)
    return max(20, int(budget_s / per_step)), per_step


def held_out(cache: Path) -> set[str]:
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"] for r in rows if r["status"] == "ok" and r["split"] in ("val", "test")}


def evaluate(predictor, export: Path, out: Path, ids: set[str]) -> dict:
    """Dice/HD95 per class of ``predictor`` on the held-out series, on each series' own grid."""
    import nibabel as nib
    import pydicom
    import torch

    from preprocess.transforms import align_label
    from preprocess.types import Image
    from vol3d.eval.metrics import aggregate_segmentation, dice_hd95_per_class
    from vol3d.seg.predict import predict

    torch.set_num_threads(os.cpu_count() or 1)
    rows = predict(predictor, export / "dicom", out, resample="probs", dicom_seg=False, keep_paths=True)  # synthetic
    per_case, seconds = [], []
    classes = {n: k for k, n in enumerate(predictor.class_names) if n in ORGANS + ["lesion"]}
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
        seconds.append(r.seconds)
    agg = aggregate_segmentation(per_case)
    organs = {o: agg["dice"][o] for o in ORGANS if o in agg["dice"]}
    return {"cases": len(per_case), "mean_organ_dice": float(np.nanmean(list(organs.values()))),
            "per_organ": organs, "lesion_dice": agg["dice"].get("lesion"), "hd95": agg["hd95"],
            "predict_s_per_volume": float(np.median(seconds))}


def curve(run: Path) -> list[list[float]]:
    """``[[step, validation mean Dice], ...]`` from RUN/metrics.csv (cached grid, val split)."""
    with open(run / "metrics.csv") as fh:
        return [[int(r["step"]), round(float(r["value"]), 4)] for r in csv.DictReader(fh)
                if r["name"] == "val/dice_mean"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_seg"))
    ap.add_argument("--cases", type=int, default=48, help="synthetic studies (default 48)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ap.add_argument("--budget-min", type=float, default=15.0, help="training wall-clock minutes of EACH model")
    ap.add_argument("--preset", default="seg_unet_tiny", help="configs/finetune/<preset>.yaml of the vol3d side")
    ap.add_argument("--preprocess", default="tiny_seg", help="configs/preprocess/<name>.yaml of the cache (default "
                    "tiny_seg: the tiny grid without its fixed window, which cuts the lungs and spine off)")
    ap.add_argument("--init", default=None, help="a vol3d run: also train from its encoder, tuned and frozen")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    import torch

    os.environ.setdefault("VOL3D_ID_KEY", "b3e7c0de5eed1dea" * 4)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = prepare_data(args.workdir, args.cases, args.seed, args.preprocess)
    ids = held_out(cache)
    load_start = [round(v, 2) for v in os.getloadavg()]
    budget = args.budget_min * 60
    from preprocess.config import read_config
    from vol3d.seg.predict import Predictor

    results: dict = {"budget_min": args.budget_min, "cases": args.cases, "seed": args.seed,
                     "held_out_series": len(ids), "preset": args.preset,
                     "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} threads", "load_avg_start": load_start}
    # vol3d
    steps, per_step = steps_in_budget(cache, args.workdir, args.preset, budget, baseline=False)
    run = args.workdir / "run_vol3d"
    cfg = seg_config(cache, run, args.preset, steps)
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    train_s = fit_model(cfg)
    res = evaluate(Predictor.from_run(run, device="cpu"), args.workdir / "export", args.workdir / "pred_vol3d", ids)
    results["vol3d"] = {**res, "steps": steps, "s_per_step": round(per_step, 3), "train_s": round(train_s, 1),
                        "curve": curve(run)}
    print(f"vol3d ({args.preset}): mean organ Dice {res['mean_organ_dice']:.3f}, {steps} steps in {train_s:.0f} s",
          flush=True)
    # the MONAI baseline, same loop, data, loss and budget
    b_steps, b_per_step = steps_in_budget(cache, args.workdir, args.preset, budget, baseline=True)
    brun = args.workdir / "run_baseline"
    shutil.rmtree(brun, ignore_errors=True)
    bcfg = seg_config(cache, brun, args.preset, b_steps)
    net = baseline_model(bcfg.model.class_names, bcfg.model.in_chans)
    b_train_s = fit_model(bcfg, net)
    net.eval()
    pred = Predictor(net, list(bcfg.model.class_names), bcfg.model.patch_size, read_config(cache), bcfg.infer)
    bres = evaluate(pred, args.workdir / "export", args.workdir / "pred_baseline", ids)
    results["monai_baseline"] = {"name": BASELINE, **bres, "steps": b_steps, "s_per_step": round(b_per_step, 3),
                                 "train_s": round(b_train_s, 1), "curve": curve(brun)}
    print(f"MONAI UNet: mean organ Dice {bres['mean_organ_dice']:.3f}, {b_steps} steps in {b_train_s:.0f} s",
          flush=True)
    if args.init:
        results["from_init"] = {}
        for tune in ("full", "frozen"):
            irun = args.workdir / f"run_init_{tune}"
            shutil.rmtree(irun, ignore_errors=True)
            icfg = seg_config(cache, irun, args.preset, steps, tune=tune, init=args.init)
            i_train_s = fit_model(icfg)
            ires = evaluate(Predictor.from_run(irun, device="cpu"), args.workdir / "export",
                            args.workdir / f"pred_init_{tune}", ids)
            results["from_init"][tune] = {**ires, "steps": steps, "train_s": round(i_train_s, 1), "curve": curve(irun)}
            print(f"from {args.init}, {tune}: mean organ Dice {ires['mean_organ_dice']:.3f}", flush=True)
    results["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["total_s"] = round(time.perf_counter() - t0, 1)
    sides = {"vol3d": results["vol3d"], "MONAI UNet": results["monai_baseline"],
             **{f"init {k}": v for k, v in results.get("from_init", {}).items()}}
    print("\n| organ | " + " | ".join(sides) + " |\n|---|" + "---|" * len(sides))
    for o in ORGANS:
        print(f"| {o} | " + " | ".join(f"{v['per_organ'].get(o, float('nan')):.3f}" for v in sides.values()) + " |")
    print("| **mean organ** | " + " | ".join(f"**{v['mean_organ_dice']:.3f}**" for v in sides.values()) + " |")
    print("| lesion | " + " | ".join(f"{v['lesion_dice'] or float('nan'):.3f}" for v in sides.values()) + " |")
    print("| steps / train s | " + " | ".join(f"{v['steps']} / {v['train_s']:.0f}" for v in sides.values()) + " |")
    v = results["vol3d"]
    ok = v["mean_organ_dice"] >= 0.93 and min(v["per_organ"].values()) >= 0.85
    ok_base = v["mean_organ_dice"] >= results["monai_baseline"]["mean_organ_dice"]
    print(f"\ntarget mean organ Dice >= 0.93, every organ >= 0.85: {'REACHED' if ok else 'NOT reached'}; "
          f">= MONAI baseline: {'yes' if ok_base else 'NO'}; total {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
