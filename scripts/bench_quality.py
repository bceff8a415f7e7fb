"""Quality benchmark: train the ``tiny_cpu`` preset on synthetic cases within a time budget, then
evaluate it and the image-blind baseline (same model, zeroed volumes) on held-out synthetic cases.

    .venv/bin/python scripts/bench_quality.py                      # defaults: 320 cases, up to 2800 steps, 30 min
    .venv/bin/python scripts/bench_quality.py --steps 1500 --set optim.lr=3e-3 --set data.tasks.report=0.5
    .venv/bin/python scripts/bench_quality.py --modality mr --out /tmp/vol3d_bench_quality_mr   # brain MR

The export and cache in ``--out`` are reused between runs (same ``--cases``/``--seed``); the
run directory is rebuilt unless ``--reuse-run``. Training stops at ``--steps`` or when its
share of the time budget is spent (the model of the last step is kept and evaluated; the
table says at which step). Writes ``OUT/quality.json`` (every metric and prediction) and
``OUT/quality.md`` (the table, the machine and the command); prints the table.
Targets (docs/benchmarks/quality.md): grounding Acc@IoU0.5 >= 0.7; report finding F1 >= 0.85
(image-blind <= 0.35); presence >= 0.9 (blind <= 0.6); count exact >= 0.8; EHR AUROC over the
imaging codes >= 0.9; each model CI's lower bound above the image-blind upper bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vol3d import demo  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/vol3d_bench_quality"), help="work folder")
    p.add_argument("--cases", type=int, default=320,
                   help="synthetic studies (default 320: about 300 training series; with 150 the tiny LM "
                        "memorised the reports instead of learning to write them from the digest)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training")
    p.add_argument("--modality", choices=("ct", "mr"), default="ct",
                   help="ct: chest/abdomen CT (tiny preset); mr: brain MR, T1/T2/FLAIR as three channels (tiny_mr)")
    p.add_argument("--steps", type=int, default=2800, help="training steps at most (default 2800)")
    p.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget of the whole run (default 30)")
    p.add_argument("--eval-reserve-min", type=float, default=4.0,
                   help="part of the budget kept for the evaluation (default 4)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients held out for testing")
    p.add_argument("--samples-per-case", type=int, default=2, help="VQA/grounding questions per held-out case")
    p.add_argument("--max-new-tokens", type=int, default=192, help="longest generated answer")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override on top of tiny_cpu (dotted key, YAML value), repeatable")
    p.add_argument("--reuse-run", action="store_true", help="evaluate OUT/run as it is (no training), on OUT/cache as it is when it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is several times faster than 2 on a "
                        "2-core machine that another job shares")
    return p.parse_args(argv)


def overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def preset_choices() -> dict:
    """The preset's own values of what the demo swaps for its five minutes. The configuration is the demo's
    (:func:`vol3d.demo.train_config`: its data, crops drawn by finding type, the run folder), but the demo
    trains a faster model (:data:`vol3d.demo.FIVE_MINUTE_SWAPS`: no perception stem, MONAI's up path and
    zero padding, three quarters perception alone); the benchmark's 30 minutes train ``tiny_cpu``'s.
    ``--set`` still wins over both."""
    from preprocess.config_io import load_yaml
    from vol3d.presets import preset_path
    from vol3d.train.config import TrainConfig

    cfg = load_yaml(TrainConfig, preset_path(demo.TRAIN_PRESET, kind="train"))
    return {key: functools.reduce(getattr, key.split("."), cfg) for key in demo.FIVE_MINUTE_SWAPS}


def machine() -> dict:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def seconds_per_step(opts: demo.DemoOptions, paths: demo.DemoPaths, steps: int = 20) -> tuple[float, float]:
    """Mean wall-clock seconds of one training step of this configuration and of starting a run (building
    the model, the data workers), from a short run, so the learning-rate schedule can span the budget.

    Each stage is timed on its own (``perception_first``: perception-only steps cost about half of the
    others): ``steps`` steps of each, the first ten of them warming up; the mean weighs each stage by
    its share of the run."""
    import csv

    from vol3d.train.run import train

    run = paths.out / "calibrate_run"
    shutil.rmtree(run, ignore_errors=True)
    first = float(demo.train_config(opts, paths).perception_first)
    total = 2 * steps if first > 0 else steps
    cfg = demo.train_config(dataclasses.replace(opts, steps=total, progress=False), paths)
    cfg.run_dir, cfg.log_every, cfg.val_every, cfg.ckpt_every = str(run), 10, 0, 10 * total
    if first > 0:
        cfg.perception_first = 0.5  # half the calibration run in each stage
    t0 = time.time()
    train(cfg)
    with open(run / "metrics.csv") as fh:
        times = {int(r["step"]): float(r["time"]) for r in csv.DictReader(fh) if r["name"] == "train/loss"}
    shutil.rmtree(run, ignore_errors=True)
    last = (times[total] - times[total - 10]) / 10  # the final stage, warmed up
    opening = (times[steps] - times[10]) / (steps - 10)  # the first stage (the same one without stages)
    per_step = first * opening + (1 - first) * last
    return per_step, max(0.0, times[10] - t0 - 10 * opening)


def train_within(opts: demo.DemoOptions, paths: demo.DemoPaths, seconds: float) -> tuple[int, bool]:
    """Train ``opts.steps`` steps or until ``seconds`` pass (the last step is saved): the step reached and
    whether the budget stopped training."""
    from vol3d.train.run import train_within as train_for

    if paths.run.exists():
        shutil.rmtree(paths.run)
    return train_for(demo.train_config(opts, paths), seconds)


def closed_by_type(results: dict) -> str:
    by = results.get("vqa_closed", {}).get("by_type", {})
    return ", ".join(f"{k} {v['exact_match']:.2f} (n={v['n']})" for k, v in sorted(by.items()))


def ehr_by_code(results: dict) -> str:
    """Per-code EHR AUROC, best first: the macro mean hides which codes the image can predict at all
    (e.g. a renal cyst code vs. a depression code)."""
    per = results.get("ehr", {}).get("per_code", {})
    ranked = sorted(per.items(), key=lambda kv: -(kv[1].get("auroc") or 0.0))
    return ", ".join(f"{k} {v['auroc']:.2f} (+{v['positives']})" for k, v in ranked if v.get("auroc") is not None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    budget = args.budget_min * 60
    test = args.test_fraction
    opts = demo.DemoOptions(out=args.out, cases=args.cases, steps=args.steps, seed=args.seed, modality=args.modality,
                            samples_per_case=args.samples_per_case, max_new_tokens=args.max_new_tokens,
                            progress=not args.no_progress, split_fractions=(1 - test - 0.05, 0.05, test),
                            train_overrides={**preset_choices(), **overrides(args.set)})
    paths = demo.DemoPaths(args.out)
    info = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    demo.ensure_id_key()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = args.out / "bench_data.json"
    data_key = {"cases": args.cases, "seed": args.seed, "split": list(opts.split_fractions),
                **({"modality": args.modality} if args.modality != "ct" else {})}  # CT folders made before stay valid
    if stamp.is_file() and json.loads(stamp.read_text()) != data_key:
        shutil.rmtree(paths.export, ignore_errors=True)
        shutil.rmtree(paths.cache, ignore_errors=True)
    stamp.write_text(json.dumps(data_key))

    t0 = time.perf_counter()
    if args.reuse_run and (paths.cache / "manifest.jsonl").is_file():
        print(f"evaluating {paths.run} on the cache as it is: {paths.cache}")  # the run was trained on it
    else:
        demo.step_synth(opts, paths)
        demo.step_preprocess(opts, paths)
    info["data_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    if args.reuse_run:
        step, stopped = demo.trained_step(paths.run) or 0, False
    else:
        per_step, startup = seconds_per_step(opts, paths)
        left = budget - (time.perf_counter() - t_start) - args.eval_reserve_min * 60
        # the learning-rate schedule spans the steps the budget affords (a schedule cut short by the
        # clock never anneals); the clock still stops training if the steps run slower than measured
        # (5% for the periodic validations and checkpoints)
        opts.steps = max(1, min(args.steps, int(0.95 * (left - startup) / per_step)))
        info.update(seconds_per_step=round(per_step, 3), steps_planned=opts.steps)
        step, stopped = train_within(opts, paths, left)
    info.update(train_seconds=round(time.perf_counter() - t0, 1), step_reached=step, stopped_by_budget=stopped)

    from vol3d.data.cache import read_manifest
    from vol3d.inference import load, write_json

    rows = read_manifest(paths.cache)
    info["cases_by_split"] = {s: sum(r.get("split") == s for r in rows) for s in ("train", "val", "test")}
    pipe = load(paths.run, device="cpu", preprocess_config=paths.cache)
    ds, split = demo.held_out(paths.cache, pipe.input_shape)
    t0 = time.perf_counter()
    res = demo.evaluate_pipeline(pipe, ds, baseline=True, samples_per_case=args.samples_per_case,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, progress=opts.progress)
    info.update(eval_seconds=round(time.perf_counter() - t0, 1), eval_split=split,
                total_minutes=round((time.perf_counter() - t_start) / 60, 1),
                load_avg_end=[round(v, 2) for v in os.getloadavg()],
                train_config={"steps": args.steps, **opts.train_overrides})
    res["bench"] = info
    write_json(res, args.out / "quality.json")

    table = demo.headline_table(res, explain=False)
    lines = [
        f"command: {info['command']}",
        f"machine: {info['machine']['cpu_cores']} cores, torch {info['machine']['torch']} "
        f"({info['machine']['torch_threads']} threads), load average {info['machine']['load_avg_start']} at start, "
        f"{info['load_avg_end']} at end",
        f"cases: {info['cases_by_split']} (ok series per split); evaluated on {len(ds)} '{split}' series",
        f"trained {step} steps in {info['train_seconds']:.0f} s"
        + (" (stopped by the time budget)" if stopped else "")
        + f"; data {info['data_seconds']:.0f} s; evaluation {info['eval_seconds']:.0f} s; "
        f"total {info['total_minutes']} min",
        "",
        table,
        "",
        f"closed VQA by type (model): {closed_by_type(res['model'])}",
        f"closed VQA by type (image-blind): {closed_by_type(res['image_blind'])}",
        f"EHR AUROC by code (model; +positives): {ehr_by_code(res['model'])}",
    ]
    text = "\n".join(lines)
    (args.out / "quality.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwrote {args.out / 'quality.json'} and {args.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    from vol3d.train.loop import TrainingInterrupted

    try:
        sys.exit(main())
    except TrainingInterrupted as exc:  # Ctrl-C: the clock's stop goes on to the evaluation, the user's does not
        print(f"bench_quality: interrupted at step {exc.step}; evaluate that model with the same command and "
              "--reuse-run, or start again", file=sys.stderr)
        sys.exit(130)
