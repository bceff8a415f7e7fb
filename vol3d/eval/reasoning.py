"""Scores of measurement answers and reasoning chains (:mod:`vol3d.tasks.reasoning`).

Both are read from the model's perception of a volume and compared with the same functions run on
the case's ground truth (:func:`vol3d.tasks.regions.perceived_from_case`), so every step is scored
against its true counterpart:

- ``measure``: every question of :func:`~vol3d.tasks.reasoning.truth_queries` (diameter and volume
  of the largest instance of each present finding, the distance of the two largest, each measured
  organ's craniocaudal length and volume). A finding the model does not find, not even as a candidate
  below its threshold (``Perceived.candidates``; ``tentative`` counts the answers that read one),
  counts as measured 0 (its whole size is the error). ``mae_mm`` pools the questions in mm, ``mae_ml`` those in mL;
  ``within10`` is the share within 10% of the true value; ``lesions_ge10mm`` the diameters of
  findings of at least 10 mm.
- ``chain``: one "Is there X?" chain per finding per case: the organ step's box IoU with the true
  organ, the largest finding's box IoU (present findings), the measurement step's error, and
  whether the conclusion is right (all cases, present ones, absent ones).
- ``detect``: every true instance of a countable finding against the perceived regions of its type
  (the best box IoU): ``acc_iou50``, per finding, and for ``small`` findings (long axial diameter
  under 10 mm); a model that looks again (:attr:`vol3d.models.Vol3DModel.looks_again`) also gets
  its first look's figures (``first_look``), so the gain of the second look is measured side by side.

The image-blind answer to a measurement is the training split's median of that question (the best
answer without the image under absolute error, :func:`measure_priors`); its chain has no boxes,
that median as measurement, and the training split's majority answer as conclusion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vol3d.eval.metrics import bootstrap_ci
from vol3d.tasks.findings import as_vocab
from vol3d.tasks.reasoning import PERCEPTION_TASKS, Chain, Query, measure, reason, truth_queries
from vol3d.tasks.regions import LabelSpec, Perceived, Region, perceived_from_case

#: Relative error counted as a correct measurement (MedVision's tolerance).
TOLERANCE = 0.10


def query_key(q: Query) -> str:
    """``"diameter:liver_lesion"``, ``"length:spleen"``: one question across cases."""
    return f"{q.kind}:{q.finding or q.organ}"


def presence_question(spec_text: str) -> str:
    return f"Is there {spec_text}?"


@dataclasses.dataclass
class MeasureItem:
    case_index: int
    query: Query
    truth: float
    pred: float  # 0 when the model found nothing to measure
    tentative: bool = False  # read from candidates below the finding threshold (Measurement.tentative)


@dataclasses.dataclass
class ChainItem:
    case_index: int
    finding: str
    present: bool  # the truth
    called: bool  # the chain's conclusion
    organ_iou: float | None  # mean box IoU of the true chain's organ steps (None: it has none)
    finding_iou: float | None  # the largest instance's box IoU (present countable findings)
    measure_truth: float | None
    measure_pred: float | None


@dataclasses.dataclass
class DetectItem:
    case_index: int
    finding: str
    diameter_mm: float  # the true instance's long axial diameter
    iou: float  # best box IoU of a perceived region of its type (0: none)
    first_iou: float | None  # the same at the first look (None: the model looked once)


def perception_rows(task: str, items: Sequence[MeasureItem | ChainItem | DetectItem],
                    case_ids: Mapping[int, str]) -> list[dict[str, Any]]:
    """The items of a perception task as rows of the eval JSON's ``perception_items`` (plain JSON: the
    case's id, then the item's fields; a measurement also names its question and absolute error), so
    a reviewer can find the case behind any figure of ``measure``, ``chain`` or ``detect``."""
    rows = []
    for it in items:
        row: dict[str, Any] = {"task": task, "case": case_ids.get(it.case_index, str(it.case_index))}
        if isinstance(it, MeasureItem):
            q = it.query
            row.update(question=query_key(q), kind=q.kind, finding=q.finding, organ=q.organ, unit=q.unit,
                       reference=it.truth, prediction=it.pred, abs_error=abs(it.pred - it.truth),
                       tentative=it.tentative)
        else:
            row.update({k: v for k, v in dataclasses.asdict(it).items() if k != "case_index"})
        rows.append(row)
    return rows


#: Findings under this long axial diameter (mm) are ``small`` in the ``detect`` section.
SMALL_MM = 10.0


def detect_items(ci: int, truth: Perceived, pred: Perceived | None, first: Perceived | None) -> list[DetectItem]:
    """The ``detect`` items of one case: each true finding instance of ``truth`` (the case's
    :func:`~vol3d.tasks.regions.perceived_from_case`) with its best IoU among the perceived regions of its
    type in ``pred`` (None: image-blind, no regions) and in the first look ``first``."""
    from preprocess.geometry import box_iou

    def best(g: Region, per: Perceived | None) -> float:
        boxes = [r.box for r in per.findings if r.name == g.name] if per is not None else []
        return float(box_iou(np.stack(boxes), g.box[None]).max()) if boxes else 0.0

    return [DetectItem(ci, g.name, float(max(g.size_mm[0], g.size_mm[1])), best(g, pred),
                       best(g, first) if first is not None else None) for g in truth.findings]


def score_detect(items: Sequence[DetectItem], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The ``detect`` section (see the module docstring)."""
    def acc(its: Sequence[DetectItem], at: float = 0.5, first: bool = False) -> float:
        return float(np.mean([(it.first_iou if first else it.iou) >= at for it in its])) if its else math.nan

    small = [it for it in items if it.diameter_mm < SMALL_MM]
    out: dict[str, Any] = {
        "n": len(items), "acc_iou50": acc(items), "acc_iou25": acc(items, 0.25),
        "mean_iou": float(np.mean([it.iou for it in items])) if items else math.nan,
        "small": {"n": len(small), "max_diameter_mm": SMALL_MM, "acc_iou50": acc(small)},
        "by_finding": {},
    }
    for name in dict.fromkeys(it.finding for it in items):
        its = [it for it in items if it.finding == name]
        out["by_finding"][name] = {"n": len(its), "acc_iou50": acc(its)}
    looked = bool(items) and all(it.first_iou is not None for it in items)
    if looked:
        out["first_look"] = {"acc_iou50": acc(items, first=True), "acc_iou25": acc(items, 0.25, first=True),
                             "small_acc_iou50": acc(small, first=True)}
    if bootstrap and items:
        out["acc_iou50_ci"] = bootstrap_ci(_groups(items), acc, bootstrap, seed)
        if small:
            out["small"]["acc_iou50_ci"] = bootstrap_ci(_groups(small), acc, bootstrap, seed)
        if looked:
            out["first_look"]["acc_iou50_ci"] = bootstrap_ci(_groups(items), lambda its: acc(its, first=True),
                                                            bootstrap, seed)
    return out


def measure_priors(cases: Iterable[Mapping[str, Any]], vocab: Mapping[str, Any] | None,
                   labels: LabelSpec | None) -> dict[str, float]:
    """Training-split answers without the image: the median of each :func:`query_key`; per finding,
    ``present:<finding>`` its prevalence and ``chain:<finding>`` the median of its chain's measurement
    where it is present."""
    vocab = as_vocab(vocab)
    values: dict[str, list[float]] = {}
    present: dict[str, list[float]] = {n: [] for n in vocab}
    for case in cases:
        truth, _ = perceived_from_case(case, vocab, labels)
        spacing = np.asarray(case.get("spacing", (1.0, 1.0, 1.0)), dtype=float)
        for q in truth_queries(truth, vocab, labels):
            m = measure(q, truth, vocab, spacing)
            if m.value is not None:
                values.setdefault(query_key(q), []).append(float(m.value))
        for name, spec in vocab.items():
            chain = reason(presence_question(spec.text), truth, vocab, labels, spacing)
            if chain is not None and chain.present is not None:
                present[name].append(float(chain.present))
                steps = _steps(chain, "measure")
                if chain.present and steps and steps[0].value is not None:
                    values.setdefault(f"chain:{name}", []).append(float(steps[0].value))
    out = {k: float(np.median(v)) for k, v in values.items()}
    out.update({f"present:{n}": float(np.mean(v)) for n, v in present.items() if v})
    return out


def _iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    from preprocess.geometry import box_iou

    if a is None or b is None:
        return 0.0
    return float(box_iou(np.asarray(a, float)[None], np.asarray(b, float)[None])[0, 0])


def _steps(chain: Chain | None, kind: str) -> list[Any]:
    return [s for s in chain.steps if s.kind == kind] if chain is not None else []


def case_items(ci: int, case: Mapping[str, Any], pred: Perceived | None, vocab: Mapping[str, Any] | None,
               labels: LabelSpec | None, priors: Mapping[str, float] | None, truth: Perceived | None = None,
               ) -> tuple[list[MeasureItem], list[ChainItem]]:
    """The measurement and chain items of one case; ``pred`` None: image-blind (``priors``' answers);
    ``truth``: the case's :func:`~vol3d.tasks.regions.perceived_from_case`, when the caller has it."""
    vocab = as_vocab(vocab)
    priors = priors or {}
    if truth is None:
        truth, _ = perceived_from_case(case, vocab, labels)
    spacing = np.asarray(case.get("spacing", (1.0, 1.0, 1.0)), dtype=float)
    measures = []
    for q in truth_queries(truth, vocab, labels):
        t = measure(q, truth, vocab, spacing).value
        if t is None:
            continue
        m = measure(q, pred, vocab, spacing) if pred is not None else None
        p = m.value if m is not None else priors.get(query_key(q))
        measures.append(MeasureItem(ci, q, float(t), float(p) if p is not None else 0.0, m is not None and m.tentative))
    chains = []
    for name, spec in vocab.items():
        question = presence_question(spec.text)
        true_chain = reason(question, truth, vocab, labels, spacing)
        if true_chain is None or true_chain.present is None:
            continue
        t_measure = _steps(true_chain, "measure")
        if pred is None:
            called = priors.get(f"present:{name}", 0.0) > 0.5
            chains.append(ChainItem(ci, name, true_chain.present, called, 0.0 if _steps(true_chain, "organ") else None,
                                    0.0 if spec.countable and true_chain.present else None,
                                    t_measure[0].value if t_measure else None, priors.get(f"chain:{name}")))
            continue
        chain = reason(question, pred, vocab, labels, spacing)
        assert chain is not None and chain.present is not None
        mine = {s.name: s.box for s in _steps(chain, "organ")}
        organ_steps = _steps(true_chain, "organ")
        organ_iou = float(np.mean([_iou(s.box, mine.get(s.name)) for s in organ_steps])) if organ_steps else None
        finding_iou = None
        if spec.countable and true_chain.present:
            t_find, p_find = _steps(true_chain, "finding"), [s for s in _steps(chain, "finding") if s.box is not None]
            finding_iou = _iou(t_find[0].box, p_find[0].box if p_find else None)
        p_measure = _steps(chain, "measure")
        chains.append(ChainItem(ci, name, true_chain.present, chain.present, organ_iou, finding_iou,
                                t_measure[0].value if t_measure else None,
                                p_measure[0].value if p_measure else (0.0 if t_measure else None)))
    return measures, chains


def _mae(items: Sequence[MeasureItem]) -> float:
    return float(np.mean([abs(it.pred - it.truth) for it in items])) if items else math.nan


def _within(items: Sequence[MeasureItem]) -> float:
    return float(np.mean([abs(it.pred - it.truth) <= TOLERANCE * abs(it.truth) for it in items])) if items else math.nan


def _groups(items: Sequence[Any]) -> list[list[Any]]:
    by: dict[int, list[Any]] = {}
    for it in items:
        by.setdefault(it.case_index, []).append(it)
    return list(by.values())


def score_measure(items: Sequence[MeasureItem], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The ``measure`` section (see the module docstring)."""
    mm = [it for it in items if it.query.unit == "mm"]
    ml = [it for it in items if it.query.unit == "mL"]
    big = [it for it in mm if it.query.kind == "diameter" and it.truth >= 10.0]
    out: dict[str, Any] = {"n": len(items), "mae_mm": _mae(mm), "within10_mm": _within(mm), "mae_ml": _mae(ml),
                           "within10_ml": _within(ml), "tentative": sum(it.tentative for it in items),
                           "lesions_ge10mm": {"n": len(big), "mae_mm": _mae(big), "within10": _within(big)},
                           "by_type": {}}
    kinds: dict[str, list[MeasureItem]] = {}
    for it in items:
        target = "finding" if it.query.finding else "organ"
        kinds.setdefault(f"{it.query.kind}_{target}", []).append(it)
    for k, its in sorted(kinds.items()):
        out["by_type"][k] = {"n": len(its), "unit": its[0].query.unit, "mae": _mae(its), "within10": _within(its)}
    if bootstrap and items:
        stat = lambda its: _mae([i for i in its if i.query.unit == "mm"])  # noqa: E731
        out["mae_mm_ci"] = bootstrap_ci(_groups(items), stat, bootstrap, seed)
        out["lesions_ge10mm"]["within10_ci"] = bootstrap_ci(_groups(big), _within, bootstrap, seed)
    return out


def score_chain(items: Sequence[ChainItem], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The ``chain`` section (see the module docstring)."""
    def acc(its: Sequence[ChainItem]) -> float:
        return float(np.mean([it.called == it.present for it in its])) if its else math.nan

    def mean(vals: Sequence[float | None]) -> float:
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else math.nan

    present = [it for it in items if it.present]
    measured = [it for it in items if it.measure_truth is not None and it.measure_pred is not None and it.present]
    out: dict[str, Any] = {
        "n": len(items),
        "conclusion_acc": acc(items),
        "conclusion_acc_present": acc(present),
        "conclusion_acc_absent": acc([it for it in items if not it.present]),
        "organ_iou": mean([it.organ_iou for it in items]),
        "finding_iou": mean([it.finding_iou for it in items]),
        "finding_acc_iou50": mean([None if it.finding_iou is None else float(it.finding_iou >= 0.5) for it in items]),
        "measure_mae": mean([abs(it.measure_pred - it.measure_truth) for it in measured]),  # type: ignore[operator]
        "by_finding": {},
    }
    for name in dict.fromkeys(it.finding for it in items):
        its = [it for it in items if it.finding == name]
        out["by_finding"][name] = {
            "n": len(its), "n_present": sum(it.present for it in its), "conclusion_acc": acc(its),
            "conclusion_acc_present": acc([it for it in its if it.present]),
            "finding_iou": mean([it.finding_iou for it in its]),
            "measure_mae": mean([abs(it.measure_pred - it.measure_truth) for it in its  # type: ignore[operator]
                                 if it.measure_truth is not None and it.measure_pred is not None and it.present])}
    if bootstrap and present:
        out["conclusion_acc_present_ci"] = bootstrap_ci(_groups(present), acc, bootstrap, seed)
    return out


__all__ = ["PERCEPTION_TASKS", "SMALL_MM", "TOLERANCE", "ChainItem", "DetectItem", "MeasureItem", "case_items",
           "detect_items", "measure_priors", "presence_question", "query_key", "score_chain", "score_detect",
           "score_measure"]
