"""Reinforcement fine-tuning (GRPO) vs more supervised training at equal compute, on the held-out split.

From one trained run (``scripts/bench_quality.py --out OUT`` leaves ``OUT/run`` and ``OUT/cache``),
two arms continue for the same wall-clock budget each, in one process, one after the other:

- ``sft``: ``vol3d finetune --task report`` (configs/finetune/report.yaml): cross-entropy on the
  reference reports, after the ground truth's findings digest;
- ``grpo``: ``vol3d finetune --task grpo`` (configs/finetune/grpo.yaml): sampled reports after the
  model's own digest, rewarded by their finding F1 against the reference (vol3d.train.rl).

The base run and both arms are then scored on the held-out split: report finding F1 (micro, with its
bootstrap interval) of the LM's own reports and of the reports reconciled with the perception
(vol3d.tasks.reports), ROUGE-L and closed VQA, with the same questions (seed) for all three. Both arms
keep the learning rate of their preset without decay (the clock, not a step count, ends them) and
the encoder frozen (their presets' ``freeze: [encoder]``).

    python scripts/bench_rl.py --out /tmp/bq6 --budget-min 8

Writes OUT/rl.json and OUT/rl.md; record the figures in docs/benchmarks/quality.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a bench_quality.py output folder (run/ and cache/)")
    p.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes of each arm (default 8)")
    p.add_argument("--arms", nargs="+", default=["sft", "grpo"], choices=["sft", "grpo"])
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation questions")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def run_arm(arm: str, out: Path, seconds: float) -> dict:
    """Fine-tune ``out/run`` with the arm's preset until ``seconds`` pass; the step reached."""
    from preprocess.config_io import load_yaml
    from vol3d.train.config import TrainConfig
    from vol3d.train.run import train_within

    preset = ROOT / "configs" / "finetune" / ("report.yaml" if arm == "sft" else "grpo.yaml")
    cfg = load_yaml(TrainConfig, preset)
    run = out / f"rl_{arm}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = dataclasses.replace(cfg, init=str(out / "run"), run_dir=str(run), max_steps=100_000, val_every=0,
                              ckpt_every=100_000, progress=False, tensorboard=False,
                              optim=dataclasses.replace(cfg.optim, min_lr_ratio=1.0),
                              data=dataclasses.replace(cfg.data, cache_dir=str(out / "cache"), num_workers=0))

    t0 = time.perf_counter()
    step, _ = train_within(cfg, seconds)
    return {"run": str(run), "steps": step, "seconds": round(time.perf_counter() - t0, 1)}


def score(run: Path, cache: Path, seed: int) -> dict:
    from vol3d.demo import held_out
    from vol3d.inference import load

    pipe = load(run, device="cpu", preprocess_config=cache)
    _, split = held_out(cache, pipe.input_shape)
    res = pipe.evaluate(cache, split=split, tasks=["report", "vqa_closed"], seed=seed, samples_per_case=1)
    f = res["report"]["findings"]
    out = {"report_f1": f["micro_f1"], "report_f1_ci": f.get("micro_f1_ci"), "rougeL": res["report"]["rougeL"],
           "closed_vqa": res["vqa_closed"]["exact_match"], "n_cases": res["meta"]["n_cases"], "split": split}
    if getattr(pipe.model.config, "reports_from_perception", False):  # the LM's own reports, before reconciling
        pipe.model.config.reports_from_perception = False
        raw = pipe.evaluate(cache, split=split, tasks=["report"], seed=seed, samples_per_case=1)["report"]
        out.update(raw_report_f1=raw["findings"]["micro_f1"], raw_report_f1_ci=raw["findings"].get("micro_f1_ci"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out
    if not (out / "run" / "model").is_dir() or not (out / "cache" / "manifest.jsonl").is_file():
        raise SystemExit(f"{out} has no run/model and cache/: run scripts/bench_quality.py --out {out} first")
    info = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "load_avg_start": [round(v, 2) for v in os.getloadavg()], "budget_min": args.budget_min}
    results = {"base": {"steps": 0, **score(out / "run", out / "cache", args.seed)}}
    for arm in args.arms:
        trained = run_arm(arm, out, args.budget_min * 60)
        results[arm] = {**trained, **score(Path(trained["run"]), out / "cache", args.seed)}
        print(arm, results[arm], flush=True)
    info["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    (out / "rl.json").write_text(json.dumps({"bench": info, "results": results}, indent=2))
    lines = [f"command: {info['command']}", f"load average {info['load_avg_start']} at start, {info['load_avg_end']} at end",
             "", "| arm | steps | LM's own reports: finding F1 [95% CI] | reconciled reports: finding F1 [95% CI] "
             "| ROUGE-L | closed VQA |", "|---|---|---|---|---|---|"]
    nan2 = [float("nan")] * 2
    for arm, r in results.items():
        ci, raw_ci = r.get("report_f1_ci") or nan2, r.get("raw_report_f1_ci") or nan2
        raw = r.get("raw_report_f1", float("nan"))
        lines.append(f"| {arm} | {r['steps']} | {raw:.3f} [{raw_ci[0]:.2f}, {raw_ci[1]:.2f}] | {r['report_f1']:.3f} "
                     f"[{ci[0]:.2f}, {ci[1]:.2f}] | {r['rougeL']:.3f} | {r['closed_vqa']:.3f} |")
    (out / "rl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
