"""Evaluation of vol3d models: metrics for every task and the ``evaluate`` runner.

See ``docs/tasks_and_metrics.md`` for the definitions.
"""

from __future__ import annotations

from vol3d.eval.evaluate import TEXT_TASKS, EvalItem, eval_samples, evaluate
from vol3d.eval.metrics import (
    aggregate_segmentation,
    bleu4,
    dice_hd95_per_class,
    ehr_metrics,
    extract_findings,
    finding_f1,
    format_table,
    grounding_metrics,
    jsonable,
    match_boxes,
    match_pairs,
    normalise_answer,
    report_metrics,
    rouge_l,
    token_f1,
    vqa_metrics,
)

__all__ = [
    "TEXT_TASKS",
    "aggregate_segmentation",
    "bleu4",
    "dice_hd95_per_class",
    "ehr_metrics",
    "EvalItem",
    "eval_samples",
    "evaluate",
    "extract_findings",
    "finding_f1",
    "format_table",
    "grounding_metrics",
    "jsonable",
    "match_boxes",
    "match_pairs",
    "normalise_answer",
    "report_metrics",
    "rouge_l",
    "token_f1",
    "vqa_metrics",
]
