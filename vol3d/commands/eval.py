"""`vol3d eval`: evaluate a run: grounding IoU, report BLEU/ROUGE/finding F1, VQA, EHR AUROC"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a run: grounding IoU, report BLEU/ROUGE/finding F1, VQA, EHR AUROC"
DESCRIPTION = """Evaluate a run on a cache split: grounding Acc@IoU 0.25/0.5 with true 3D IoU and
the unparseable rate, report BLEU-4/ROUGE-L and finding-level precision/recall/F1,
VQA accuracy, EHR macro AUROC (runs with an EHR head). Prints a table and writes
JSON (default RUN/eval.json; RUN/eval_blind.json with --blind).

--blind zeroes every volume: the image-blind baseline a grounded model must beat.
Metric definitions: docs/tasks_and_metrics.md; guide: docs/inference.md.

example: vol3d eval runs/tiny --cache cache/tiny --split test --limit 50"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vol3d.tasks.reasoning import PERCEPTION_TASKS  # torch-free
    from vol3d.tasks.samples import TASKS

    parser.add_argument("run", type=Path, metavar="RUN", help="run directory of `vol3d train` / `vol3d finetune`")
    parser.add_argument("--cache", type=Path, required=True, metavar="CACHE", help="cache made by `vol3d preprocess`")
    parser.add_argument("--split", default="test", help="manifest split to evaluate (default test; 'all' = every case)")
    parser.add_argument("--tasks", nargs="+", choices=[*TASKS, *PERCEPTION_TASKS], default=None,
                        help="tasks to score (default: the text tasks, plus ehr when the run has an EHR head, "
                             "plus measure, chain and detect when it has perception)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N cases")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON",
                        help="results file (default RUN/eval.json, or RUN/eval_blind.json with --blind)")
    parser.add_argument("--blind", action="store_true",
                        help="image-blind baseline: every volume zeroed (measure and chain: the training "
                             "split's median answers)")
    parser.add_argument("--samples-per-case", type=int, default=2, help="VQA/grounding questions per case (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the questions drawn (same seed, same questions)")
    parser.add_argument("--predictions", action="store_true", help="also store every prompt, reference and answer, and every measurement, chain and detection item")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if present)")
    parser.add_argument("--preprocess-config", type=Path, default=None, metavar="PATH",
                        help="preprocessing of the training data when the run does not record it")


def run(args: argparse.Namespace) -> int:
    from preprocess.errors import InputError
    from vol3d.eval import format_table
    from vol3d.inference import load, write_json

    for name in ("limit", "samples_per_case", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (args.cache / "manifest.jsonl").is_file():
        raise InputError(f"{args.cache} is not a vol3d cache (no manifest.jsonl); make one with `vol3d preprocess`")
    pipe = load(args.run, device=args.device, preprocess_config=args.preprocess_config)
    results = pipe.evaluate(
        args.cache, split=None if args.split == "all" else args.split, tasks=args.tasks, limit=args.limit,
        image_blind=args.blind, samples_per_case=args.samples_per_case, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, keep_predictions=args.predictions,
    )
    out = args.out or Path(args.run) / ("eval_blind.json" if args.blind else "eval.json")
    write_json(results, out)
    print(format_table({k: v for k, v in results.items() if k not in ("predictions", "perception_items")}))
    print(f"\nwrote {out}")
    return 0
