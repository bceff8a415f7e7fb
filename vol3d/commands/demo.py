"""`vol3d demo`: end-to-end demo on synthetic data: synth, preprocess, train, eval, ask, PNG"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "end-to-end demo on synthetic data: synth, preprocess, train, eval, ask, PNG"
DESCRIPTION = """Synthesise a small hospital export, preprocess it, train the tiny CPU model,
evaluate it on held-out cases (with an image-blind baseline), ask a grounded question
about a held-out case and draw the answer's box next to the true box in OUT/answer.png.

A second run reuses what already exists (an interrupted run resumes, training from
its last checkpoint); --fresh starts over. Guide: docs/demo.md.

example: vol3d demo --out ./vol3d_demo
         vol3d demo --out ./vol3d_demo_mr --modality mr"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vol3d.demo import PREFERRED, PREPROCESS_PRESETS, DemoOptions

    d = DemoOptions()
    parser.add_argument("--out", type=Path, default=d.out, help=f"demo folder (default ./{d.out})")
    parser.add_argument("--cases", type=int, default=d.cases, help=f"synthetic studies to make (default {d.cases})")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help=f"training steps, at most (default {d.steps}; fewer where the time budget affords fewer "
                             "on this machine)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of data and training (default {d.seed})")
    parser.add_argument("--fresh", action="store_true", help="delete a previous demo in --out and start over")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the image-blind baseline evaluation (halves the evaluation time)")
    parser.add_argument("--modality", choices=sorted(PREPROCESS_PRESETS), default=d.modality,
                        help="ct: chest/abdomen CT (default); mr: brain MR with T1, T2 and FLAIR as three channels")
    parser.add_argument("--finding", choices=[n for names in PREFERRED.values() for n in names],
                        help="finding to ask about (default: the first of these a held-out case has)")
    parser.add_argument("--budget-min", type=float, default=d.budget_min,
                        help=f"minutes the whole demo may take (default {d.budget_min:g}): a new run times a few "
                             "steps and trains the ones that fit; training slower than measured ends earlier, "
                             "annealed, or at the budget is stopped, checkpointed (the same command resumes it); "
                             "0 trains every step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from vol3d.demo import DemoOptions, main_exit_code

    opts = DemoOptions(out=args.out, cases=args.cases, steps=args.steps, seed=args.seed, fresh=args.fresh,
                       baseline=not args.no_baseline, progress=not args.no_progress, modality=args.modality,
                       budget_min=args.budget_min)
    return main_exit_code(opts, finding=args.finding)
