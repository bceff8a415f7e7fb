"""Evaluation metrics of every vol3d task; numpy/python, with maintained libraries where they exist.

- grounding: true 3D IoU (``preprocess.geometry.box_iou``), Hungarian matching,
  Acc@IoU0.25/0.5, mean IoU, unparseable-answer rate, refusal accuracy;
- reports: BLEU-4 (nltk), ROUGE-L (rouge-score), finding-level P/R/F1 from a
  rule-based extractor with negation handling;
- VQA: exact match after normalisation, token F1;
- EHR: macro/micro AUROC (scikit-learn);
- segmentation: Dice and HD95 per class (MONAI), NaN when a class is empty in both.

Every function returns plain dicts; :func:`jsonable` makes them strict JSON (NaN -> null)
and :func:`format_table` prints them.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.geometry import as_boxes, box_iou, denormalise_boxes, parse_boxes
from vol3d.tasks.findings import as_vocab
from vol3d.tasks.mentions import extract_findings  # the report reader, shared with inference and RL

# ============================================================================ grounding


def match_pairs(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Hungarian assignment of predicted to true boxes that maximises the total IoU.

    Args:
        pred: ``(P, 6)`` boxes; gt: ``(G, 6)`` boxes, same frame.
    Returns:
        ``pred_idx (M,)``, ``gt_idx (M,)`` and ``iou (M,)`` of the ``M = min(P, G)`` matched
        pairs, ordered by ``pred_idx`` (empty when either side has no box).
    """
    from scipy.optimize import linear_sum_assignment

    pred, gt = as_boxes(pred), as_boxes(gt)
    if not (len(pred) and len(gt)):
        empty = np.zeros(0, dtype=int)
        return empty, empty, np.zeros(0)
    iou = box_iou(pred, gt)  # (P, G)
    rows, cols = linear_sum_assignment(-iou)  # rows come sorted
    return rows, cols, iou[rows, cols]


def match_boxes(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of predicted to true boxes (:func:`match_pairs`).

    Args:
        pred: ``(P, 6)`` boxes; gt: ``(G, 6)`` boxes, same frame.
    Returns:
        ``gt_iou (G,)``: IoU of each true box with its matched prediction (0 if unmatched),
        ``pred_iou (P,)``: the same seen from the predictions (0 for extra predictions).
    """
    rows, cols, iou = match_pairs(pred, gt)
    gt_iou, pred_iou = np.zeros(len(as_boxes(gt))), np.zeros(len(as_boxes(pred)))
    gt_iou[cols] = iou
    pred_iou[rows] = iou
    return gt_iou, pred_iou


def _shapes(shape: Any, n: int) -> list[tuple[int, ...]]:
    """One model-input shape for all samples, or a list with one shape per sample."""
    if len(shape) and isinstance(shape[0], (Sequence, np.ndarray)) and not isinstance(shape[0], str):
        if len(shape) != n:
            raise ValueError(f"got {len(shape)} shapes for {n} answers; give one shape or one per answer")
        return [tuple(int(v) for v in s[-3:]) for s in shape]
    return [tuple(int(v) for v in shape[-3:])] * n


def answer_ious(text: str, gt: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """IoU of each true box ``(G,)`` with its matched answer box and of each answer box ``(P,)``
    with its match (0 unmatched) for one grounding answer (boxes 0..999 of model-input ``shape``)."""
    ints = parse_boxes(text)
    pred = denormalise_boxes(np.stack(ints), tuple(int(v) for v in shape[-3:])) if ints else np.zeros((0, 6))
    return match_boxes(pred, as_boxes(gt))


def bootstrap_ci(groups: Sequence[Sequence[Any]], stat: Any, reps: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap confidence interval ``[lo, hi]`` of ``stat(items)`` over *groups* (cases).

    ``groups``: the items of each case (a case's questions are not independent of each other,
    so whole cases are resampled). ``stat(list_of_items) -> float`` (NaN allowed: skipped).
    ``[None, None]`` when no resample gives a number.
    """
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return [None, None]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        pick = rng.integers(len(groups), size=len(groups))
        v = stat([it for i in pick for it in groups[i]])
        if v is not None and math.isfinite(v):
            values.append(float(v))
    if not values:
        return [None, None]
    a = (1.0 - level) / 2
    return [float(np.quantile(values, a)), float(np.quantile(values, 1 - a))]


def grounding_metrics(
    pred_texts: Sequence[str],
    gt_boxes_list: Sequence[np.ndarray],
    shape: Sequence[int] | Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Grounding quality of generated answers against true voxel boxes.

    Args:
        pred_texts: generated answers holding ``<box>[...]</box>`` (0..999, model-input frame).
        gt_boxes_list: per answer, the true boxes ``(G_i, 6)`` in model-input voxels (``G_i = 0``:
            the finding is absent and the right answer is a refusal without boxes).
        shape: the model-input ``(X, Y, Z)`` (or ``(C, X, Y, Z)``), or one such shape per answer.

    Predicted boxes are mapped back to voxels and matched to true boxes one-to-one by the
    Hungarian algorithm on IoU. ``acc_iou25`` / ``acc_iou50`` are the fraction of true boxes
    whose match reaches the threshold (for one box per question this is the usual
    Acc@IoU); ``precision_iou50`` the fraction of predicted boxes that do;
    ``unparseable_rate`` the fraction of answers with no well-formed box where one was
    expected; ``refusal_accuracy`` the fraction of absent-finding questions answered
    without a box.
    """
    if len(pred_texts) != len(gt_boxes_list):
        raise ValueError(f"{len(pred_texts)} answers but {len(gt_boxes_list)} ground-truth box sets")
    shapes = _shapes(shape, len(pred_texts))
    gt_ious: list[float] = []
    pred_ious: list[float] = []
    expected = unparseable = negatives = refused = 0
    for text, gt, shp in zip(pred_texts, gt_boxes_list, shapes, strict=True):
        g, p = answer_ious(text, gt, shp)
        if len(as_boxes(gt)) == 0:
            negatives += 1
            refused += int(len(p) == 0)
        else:
            expected += 1
            unparseable += int(len(p) == 0)
        gt_ious += g.tolist()
        pred_ious += p.tolist()
    g_arr, p_arr = np.asarray(gt_ious), np.asarray(pred_ious)

    def frac(mask: np.ndarray) -> float:
        return float(mask.mean()) if mask.size else math.nan

    return {
        "n": len(pred_texts),
        "n_gt_boxes": int(g_arr.size),
        "n_pred_boxes": int(p_arr.size),
        "mean_iou": frac(g_arr),
        "acc_iou25": frac(g_arr >= 0.25),
        "acc_iou50": frac(g_arr >= 0.5),
        "precision_iou50": frac(p_arr >= 0.5),
        "unparseable_rate": unparseable / expected if expected else math.nan,
        "refusal_accuracy": refused / negatives if negatives else math.nan,
    }


# ============================================================================ report text


def _words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens; keeps decimals ("1.5") as one token."""
    return re.findall(r"\d+(?:\.\d+)?|[a-z]+|[^\sa-z\d]", text.lower())


def bleu4(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> float:
    """Corpus BLEU-4 (nltk, smoothing method 1 so short texts do not score 0 outright)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    _check_pairs(pred_texts, ref_texts)
    refs = [[_words(r)] for r in ref_texts]
    hyps = [_words(p) for p in pred_texts]
    return float(corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method1))


def rouge_l(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming)."""
    import logging

    from rouge_score import rouge_scorer

    _check_pairs(pred_texts, ref_texts)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score announces its default tokenizer at INFO
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(pred_texts, ref_texts, strict=True)]
    return float(np.mean(scores)) if scores else math.nan


def _check_pairs(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")


def finding_f1(
    pred_texts: Sequence[str], ref_texts: Sequence[str], vocab: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Finding-level precision/recall/F1 of generated reports against reference reports.

    Both sides go through :func:`extract_findings`. ``micro_*`` pool all findings;
    ``macro_*`` average the findings that occur in at least one reference (a finding no
    reference has gives no recall to average). ``per_finding`` has every finding with
    its ``support`` (positive references).
    """
    from sklearn.metrics import precision_recall_fscore_support

    _check_pairs(pred_texts, ref_texts)
    vocab = as_vocab(vocab)
    names = list(vocab)
    # extract_findings returns every finding in vocabulary order: one call per text
    y_pred = np.array([list(extract_findings(t, vocab).values()) for t in pred_texts], dtype=int).reshape(
        -1, len(names)
    )
    y_true = np.array([list(extract_findings(t, vocab).values()) for t in ref_texts], dtype=int).reshape(
        -1, len(names)
    )
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    seen = support > 0
    per = {
        n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, n in enumerate(names)
    }
    return {
        "micro_precision": float(mp),
        "micro_recall": float(mr),
        "micro_f1": float(mf),
        "macro_precision": float(p[seen].mean()) if seen.any() else math.nan,
        "macro_recall": float(r[seen].mean()) if seen.any() else math.nan,
        "macro_f1": float(f[seen].mean()) if seen.any() else math.nan,
        "per_finding": per,
    }


def report_metrics(
    pred_texts: Sequence[str], ref_texts: Sequence[str], vocab: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """BLEU-4, ROUGE-L and finding F1 of generated reports."""
    return {
        "n": len(pred_texts),
        "bleu4": bleu4(pred_texts, ref_texts),
        "rougeL": rouge_l(pred_texts, ref_texts),
        "findings": finding_f1(pred_texts, ref_texts, vocab),
    }


# ============================================================================ VQA

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]|\\.(?!\\d)")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation (decimal points kept), no articles, number words -> digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def token_f1(pred: str, ref: str) -> float:
    """Bag-of-words F1 between normalised answers (SQuAD style)."""
    p, r = normalise_answer(pred).split(), normalise_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def vqa_metrics(
    pred_texts: Sequence[str], ref_texts: Sequence[str], groups: Sequence[str] | None = None
) -> dict[str, Any]:
    """Exact-match accuracy and token F1; with ``groups`` (e.g. question types) also per group."""
    _check_pairs(pred_texts, ref_texts)
    em = np.array(
        [normalise_answer(p) == normalise_answer(r) for p, r in zip(pred_texts, ref_texts, strict=True)],
        float,
    )
    f1 = np.array([token_f1(p, r) for p, r in zip(pred_texts, ref_texts, strict=True)], float)
    out: dict[str, Any] = {
        "n": len(em),
        "exact_match": float(em.mean()) if em.size else math.nan,
        "token_f1": float(f1.mean()) if f1.size else math.nan,
    }
    if groups is not None:
        g = np.asarray(groups)
        out["by_type"] = {
            str(k): {"n": int((g == k).sum()), "exact_match": float(em[g == k].mean())}
            for k in sorted(set(groups))
        }
    return out


# ============================================================================ EHR


def ehr_metrics(
    scores: np.ndarray, targets: np.ndarray, codes: Sequence[str] | None = None,
    imaging_codes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """AUROC of EHR code scores ``(N, K)`` (logits or probabilities) against 0/1 targets ``(N, K)``.

    ``macro_auroc`` averages the codes with both classes present (others are undefined
    and listed with ``auroc: NaN``); ``micro_auroc`` pools every (case, code) pair. With
    ``imaging_codes`` (the codes of findings an image can show), ``imaging_macro_auroc`` averages
    those and ``other_macro_auroc`` the rest (a hypertension code has no sign in a CT).
    """
    from sklearn.metrics import roc_auc_score

    s, t = np.asarray(scores, dtype=float), np.asarray(targets).astype(int)
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be (N, K)")
    codes = list(codes) if codes is not None else [str(k) for k in range(s.shape[1])]
    per: dict[str, dict[str, float]] = {}
    aucs = []
    for k, code in enumerate(codes):
        pos = int(t[:, k].sum())
        auc = float(roc_auc_score(t[:, k], s[:, k])) if 0 < pos < len(t) else math.nan
        per[code] = {"auroc": auc, "positives": pos}
        if not math.isnan(auc):
            aucs.append(auc)
    flat = t.ravel()
    micro = float(roc_auc_score(flat, s.ravel())) if 0 < flat.sum() < flat.size else math.nan
    out = {
        "n": int(s.shape[0]),
        "macro_auroc": float(np.mean(aucs)) if aucs else math.nan,
        "micro_auroc": micro,
        "n_codes_scored": len(aucs),
        "per_code": per,
    }
    if imaging_codes is not None:
        imaging = {str(c).strip().upper() for c in imaging_codes}
        for key, keep in (("imaging_macro_auroc", True), ("other_macro_auroc", False)):
            vals = [v["auroc"] for c, v in per.items() if (c in imaging) == keep and not math.isnan(v["auroc"])]
            out[key] = float(np.mean(vals)) if vals else math.nan
        out["imaging_codes"] = sorted(c for c in per if c in imaging)
    return out


# ============================================================================ segmentation


def dice_hd95_per_class(
    pred: Any, gt: Any, classes: Mapping[str, int] | Sequence[int], spacing: Sequence[float] | None = None
) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance (mm) per class of two label maps ``(X, Y, Z)``.

    Uses MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``. As in
    nnU-Net, a class empty in both prediction and truth gets NaN (not 1) and the means
    skip NaN. HD95 is NaN when both are empty and, when only one is, the volume diagonal
    in mm (the largest possible distance, as BraTS does) instead of infinity.
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    names = (
        {str(k): int(v) for k, v in classes.items()}
        if isinstance(classes, Mapping)
        else {str(c): int(c) for c in classes}
    )
    p = torch.as_tensor(np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred))
    g = torch.as_tensor(np.asarray(gt.cpu() if hasattr(gt, "cpu") else gt))
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(
            f"prediction {tuple(p.shape)} and truth {tuple(g.shape)} must be label maps of one (X, Y, Z) shape"
        )
    spacing = [float(v) for v in (spacing if spacing is not None else (1.0, 1.0, 1.0))]
    values = list(names.values())
    p1 = torch.stack([p == v for v in values])[None].float()  # (1, K, X, Y, Z)
    g1 = torch.stack([g == v for v in values])[None].float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p1, g1)[0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty class; we handle them below
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            p1, g1, spacing=spacing
        )[0].numpy()
    p_empty = (p1[0].flatten(1).sum(1) == 0).numpy()
    g_empty = (g1[0].flatten(1).sum(1) == 0).numpy()
    diagonal = float(np.linalg.norm(np.asarray(p.shape) * np.asarray(spacing)))
    dice = np.where(p_empty & g_empty, np.nan, dice)
    hd = np.where(p_empty & g_empty, np.nan, np.where(p_empty ^ g_empty, diagonal, hd))
    return {
        "dice": {n: float(d) for n, d in zip(names, dice, strict=True)},
        "hd95": {n: float(h) for n, h in zip(names, hd, strict=True)},
        "mean_dice": _nanmean(dice),
        "mean_hd95": _nanmean(hd),
    }


def aggregate_segmentation(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """NaN-aware mean over cases of :func:`dice_hd95_per_class` results."""
    out: dict[str, Any] = {"n": len(per_case)}
    for key in ("dice", "hd95"):
        names = list(per_case[0][key]) if per_case else []
        out[key] = {n: _nanmean([c[key][n] for c in per_case]) for n in names}
        out[f"mean_{key}"] = _nanmean(list(out[key].values()))
    return out


def _nanmean(values: Any) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


# ============================================================================ output


def jsonable(obj: Any) -> Any:
    """Strict-JSON copy of a results dict: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows += _flatten(v, key + ".")
        elif not isinstance(v, (list, tuple, np.ndarray)):
            rows.append((key, v))
    return rows


def format_table(results: Mapping[str, Any]) -> str:
    """Readable two-column table of (nested) results: one ``section.metric  value`` row each."""
    rows = _flatten(results)
    if not rows:
        return "(no results)"
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        if isinstance(v, bool) or v is None:
            text = str(v)
        elif isinstance(v, (int, np.integer)):
            text = str(int(v))
        elif isinstance(v, (float, np.floating)):
            text = "n/a" if not math.isfinite(v) else f"{v:.4f}"
        else:
            text = str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


__all__ = [
    "aggregate_segmentation",
    "answer_ious",
    "bleu4",
    "bootstrap_ci",
    "dice_hd95_per_class",
    "ehr_metrics",
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
