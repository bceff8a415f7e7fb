"""Instruction data for vol3d training: report, VQA, grounding and EHR samples, and augmentations.

See ``docs/tasks_and_metrics.md`` for the templates, answer formats and how to pass
your own finding vocabulary.
"""

from __future__ import annotations

from vol3d.tasks.augment import AugmentConfig, augment, flip_boxes
from vol3d.tasks.codes import CodeVocab
from vol3d.tasks.findings import DEFAULT_VOCAB, FindingSpec, as_vocab, load_vocab
from vol3d.tasks.samples import (
    MIN_VISIBLE,
    TASKS,
    TEMPLATES,
    VOL,
    Sample,
    TaskMix,
    applicable_tasks,
    build_samples,
    corpus_texts,
    finding_truth,
    sample_one,
)

__all__ = [
    "DEFAULT_VOCAB",
    "MIN_VISIBLE",
    "TASKS",
    "TEMPLATES",
    "VOL",
    "AugmentConfig",
    "CodeVocab",
    "FindingSpec",
    "Sample",
    "TaskMix",
    "applicable_tasks",
    "as_vocab",
    "augment",
    "build_samples",
    "corpus_texts",
    "finding_truth",
    "flip_boxes",
    "load_vocab",
    "sample_one",
]
