"""Run a model on evaluation samples of every task and score them.

The model (or an inference pipeline) needs only this interface:

- ``generate(volume (B, C, X, Y, Z) tensor, prompts: list[str], max_new_tokens=int) -> list[str]``
  for the text tasks (report, vqa_closed, vqa_open, ground);
- ``__call__(volume, input_ids, attention_mask) -> dict`` with ``ehr_logits (B, K)`` for the
  ``ehr`` task. ``input_ids``/``attention_mask`` come from ``processor(prompts)`` (a callable
  returning a dict with those keys, e.g. the model's processor that expands ``<vol>``);
  without a processor they are ``None``.

Samples are drawn with :func:`vol3d.tasks.sample_one` from a seed per (case, task,
draw), so the same cases give the same questions whatever the task list or the model.
Presence questions ("Is there a liver lesion?") can instead come from a set balanced per
finding over the cases (:func:`vol3d.tasks.samples.balanced_presence`), so a model that
answers from the question alone scores 0.5 on them. ``image_blind=True`` zeroes every
volume: the score of a model that answers from the text alone, the floor a grounded model
must beat (SURE-VQA). Every headline metric carries a 95% bootstrap confidence interval over
cases (keys ending in ``_ci``: ``[lo, hi]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.errors import ConfigError
from vol3d.eval.metrics import (
    answer_ious,
    bootstrap_ci,
    ehr_metrics,
    extract_findings,
    grounding_metrics,
    normalise_answer,
    report_metrics,
    token_f1,
    vqa_metrics,
)
from vol3d.eval.reasoning import (
    PERCEPTION_TASKS,
    case_items,
    detect_items,
    perception_rows,
    score_chain,
    score_detect,
    score_measure,
)
from vol3d.tasks.codes import CodeVocab, normalise_code
from vol3d.tasks.findings import as_vocab
from vol3d.tasks.regions import perceived_from_case
from vol3d.tasks.samples import CLOSED_QTYPES, TASKS, Sample, applicable_tasks, balanced_sample, sample_one

#: Bootstrap resamples of the confidence intervals.
BOOTSTRAP_REPS = 1000

#: Tasks evaluated by default: every text task (``ehr`` needs a model with an EHR head).
TEXT_TASKS = ("report", "vqa_closed", "vqa_open", "ground")


@dataclasses.dataclass
class EvalItem:
    """One evaluation question: which case it is about, and the sample (with its reference answer)."""

    case_index: int  # position of the case in the ``cases`` passed in
    case_id: str
    sample: Sample


def _volume(case: Mapping[str, Any]) -> Any:
    """The case's image as a float32 tensor ``(C, X, Y, Z)``."""
    import torch

    img = case["image"]
    t = (
        img.detach().float()
        if hasattr(img, "detach")
        else torch.from_numpy(np.asarray(img, dtype=np.float32))
    )
    return t[None] if t.ndim == 3 else t


def _device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _check_tasks(tasks: Sequence[str]) -> None:
    unknown = sorted(set(tasks) - set(TASKS) - set(PERCEPTION_TASKS))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {[*TASKS, *PERCEPTION_TASKS]}")


def _case_items(
    ci: int,
    case: Mapping[str, Any],
    tasks: Sequence[str],
    samples_per_case: int,
    seed: int,
    vocab: Any,
    code_vocab: Any,
    presence: Sequence[tuple[str, str]] | None = None,
) -> list[EvalItem]:
    """The questions about case ``ci``; with ``presence`` (its balanced ``(qtype, finding)`` questions,
    possibly none) closed draws are of the other question types and those come from it."""
    from preprocess.errors import InputError

    ok = applicable_tasks(case)
    qtypes = CLOSED_QTYPES if presence is None else tuple(q for q in CLOSED_QTYPES if q not in ("presence", "count"))
    items = []
    for task in tasks:
        if task not in ok:
            continue
        for d in range(1 if task in ("report", "ehr") else samples_per_case):
            rng = np.random.default_rng([seed, ci, TASKS.index(task), d])
            try:
                s = sample_one(case, task, rng, vocab=vocab, code_vocab=code_vocab, qtypes=qtypes)
            except InputError:  # no closed question of the allowed types (every finding partly visible)
                continue
            items.append(EvalItem(ci, str(case.get("id", ci)), s))
        if task == "vqa_closed" and presence:
            for n, (qtype, name) in enumerate(presence):
                rng = np.random.default_rng([seed, ci, TASKS.index(task), 1000 + n])
                items.append(EvalItem(ci, str(case.get("id", ci)), balanced_sample(case, qtype, name, rng, vocab)))
    return items


def eval_samples(
    cases: Iterable[Mapping[str, Any]],
    tasks: Sequence[str],
    *,
    samples_per_case: int = 2,
    seed: int = 0,
    vocab: Mapping[str, Any] | None = None,
    code_vocab: CodeVocab | None = None,
) -> dict[str, list[EvalItem]]:
    """The evaluation set: per task, the samples :func:`evaluate` asks (deterministic in ``seed``).

    Each (case, task, draw) has its own seed, so adding a task or a case never changes
    the questions asked of the others.
    """
    _check_tasks(tasks)
    vocab = as_vocab(vocab)
    out: dict[str, list[EvalItem]] = {t: [] for t in tasks}
    for ci, case in enumerate(cases):
        for it in _case_items(ci, case, tasks, samples_per_case, seed, vocab, code_vocab):
            out[it.sample.task].append(it)
    return out


def evaluate(
    model: Any,
    cases: Iterable[Mapping[str, Any]],
    tasks: Sequence[str] = TEXT_TASKS,
    *,
    vocab: Mapping[str, Any] | None = None,
    code_vocab: CodeVocab | None = None,
    processor: Callable[[list[str]], Mapping[str, Any]] | None = None,
    samples_per_case: int = 2,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    image_blind: bool = False,
    keep_predictions: bool = False,
    locate_prefix: str | None = None,
    presence: Mapping[int, Sequence[tuple[str, str]]] | None = None,
    bootstrap: int = BOOTSTRAP_REPS,
    priors: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Generate answers for evaluation samples of ``tasks`` on ``cases`` and compute their metrics.

    Cases are read one at a time (``cases`` may be a ``CacheDataset``); the questions about
    one case go to the model together, in batches of ``batch_size`` prompts sharing its volume.

    Args:
        model: object with ``generate`` (and ``__call__`` returning ``ehr_logits`` for ``ehr``).
        cases: case dicts (see :mod:`vol3d.tasks.samples`).
        tasks: subset of ``report, vqa_closed, vqa_open, ground, ehr`` and, for a model with
            perception (``perceive`` and ``labels``), ``measure``, ``chain``,
            ``detect`` (:mod:`vol3d.eval.reasoning`).
        vocab: finding vocabulary (default: the synthetic one), for questions and report F1.
        code_vocab: EHR code order of the model's ``ehr_logits``; default ``model.code_vocab``.
        processor: turns prompts into ``input_ids``/``attention_mask`` for the EHR forward pass;
            default ``model.processor`` if it has one.
        samples_per_case: questions per case for VQA and grounding (reports and EHR: one).
        image_blind: zero every volume (image-blind baseline).
        keep_predictions: also return every prompt, reference and prediction (``predictions``) and every
            item of the perception tasks with its case (``perception_items``).
        locate_prefix: also ask each grounding question about a *present* finding with the
            answer forced to start with this (``vol3d.protocol.LOCATE_PREFIX``; ``model.generate``
            must take ``answer_prefix``) and report ``ground.located_*``: how well the model
            says where a finding is once told that it is there, apart from whether it saw it.
        presence: case position -> ``(qtype, finding)`` presence and count questions to ask
            (:func:`vol3d.tasks.samples.balanced_presence`, balanced per finding); None draws them
            like the other closed questions.
        bootstrap: resamples of the confidence intervals (0: none).
        priors: the image-blind answers of ``measure``/``chain``
            (:func:`vol3d.eval.reasoning.measure_priors` of the training split), used when
            ``image_blind``; without them the model perceives the zeroed volume.

    Returns:
        ``{task: metrics, ..., "meta": {...}}`` (plus ``"predictions"``); see ``docs/tasks_and_metrics.md``.
    """
    import torch

    _check_tasks(tasks)
    vocab = as_vocab(vocab)
    if "ehr" in tasks:
        code_vocab = code_vocab or getattr(model, "code_vocab", None)
        if code_vocab is None:
            raise ConfigError(
                "task 'ehr' needs the code vocabulary of the model's EHR head: pass code_vocab="
            )
    processor = processor or getattr(model, "processor", None)
    device = _device(model)
    takes_spacing = "spacing" in inspect.signature(model.generate).parameters
    perceiving = [t for t in tasks if t in PERCEPTION_TASKS]
    labels = getattr(model, "labels", None)
    if perceiving and (not hasattr(model, "perceive") or getattr(model, "perception", True) is None):
        raise ConfigError(f"tasks {perceiving} read the model's perception; this model has none (train with "
                          "model.perception: true) or drop them from the tasks")
    answers = _Answers({t: [] for t in tasks})
    n_cases = 0
    with torch.inference_mode():
        for ci, case in enumerate(cases):
            n_cases += 1
            items = _case_items(ci, case, tasks, samples_per_case, seed, vocab, code_vocab,
                                None if presence is None else presence.get(ci, []))
            gen_kw: dict[str, Any] = {}
            if takes_spacing and case.get("spacing") is not None:
                gen_kw["spacing"] = np.asarray(case["spacing"], dtype=float)
            vol = _volume(case).to(device)
            if image_blind:
                vol = torch.zeros_like(vol)
            # every question about the case reads one encoding and perception of it (Vol3DModel.reading)
            with model.reading(vol) if hasattr(model, "reading") else contextlib.nullcontext():
                _generate(model, vol, [it for it in items if it.sample.task != "ehr"], answers, batch_size,
                          max_new_tokens, locate_prefix, gen_kw)
                if perceiving:
                    # image-blind with priors: the training split's answers, not a perception of zeros
                    blind = image_blind and priors is not None
                    _perceive(model, ci, case, vol, answers, "detect" in tasks, vocab, labels, priors, blind, gen_kw)
                for it in items:
                    if it.sample.task == "ehr":
                        answers.done["ehr"].append(
                            (it, _ehr_scores(model, vol[None], it.sample.prompt, processor, code_vocab)))

    results = answers.scores(tasks, vocab, code_vocab, bootstrap, seed)
    results["meta"] = {
        "n_cases": n_cases,
        "tasks": list(tasks),
        "samples_per_case": samples_per_case,
        "seed": seed,
        "image_blind": image_blind,
    }
    if keep_predictions:
        results["predictions"] = answers.predictions(tasks)
        perceived = answers.perception_items(tasks)
        if perceived:
            results["perception_items"] = perceived
    return results


@dataclasses.dataclass
class _Answers:
    """What :func:`evaluate` collected, case by case: each text question with the model's answer,
    the grounding answers forced to start with a box, and the perception's items."""

    done: dict[str, list[tuple[EvalItem, Any]]]  # task -> (item, prediction); ehr: code scores
    located: list[tuple[EvalItem, str]] = dataclasses.field(default_factory=list)
    measured: list[Any] = dataclasses.field(default_factory=list)
    chained: list[Any] = dataclasses.field(default_factory=list)
    detected: list[Any] = dataclasses.field(default_factory=list)
    case_ids: dict[int, str] = dataclasses.field(default_factory=dict)  # case index -> id, for the perception items

    def scores(self, tasks: Sequence[str], vocab: Mapping[str, Any], code_vocab: Any, bootstrap: int,
               seed: int) -> dict[str, Any]:
        """``{task: metrics}`` with their confidence intervals."""
        results: dict[str, Any] = {}
        perception = {"measure": (score_measure, self.measured), "chain": (score_chain, self.chained),
                      "detect": (score_detect, self.detected)}
        for task in tasks:
            pairs = self.done[task]
            if task in perception:
                score, items = perception[task]
                results[task] = score(items, bootstrap, seed)
                continue
            if not pairs:
                results[task] = {"n": 0}
            elif task == "ehr":
                scores = np.stack([p for _, p in pairs])
                targets = np.stack([it.sample.extras["target"] for it, _ in pairs])
                results[task] = ehr_metrics(scores, targets, code_vocab.codes, imaging_codes(vocab))
            else:
                results[task] = _score(task, [it for it, _ in pairs], [p for _, p in pairs], vocab)
            if pairs and bootstrap:
                _merge(results[task], _intervals(task, pairs, vocab, code_vocab, bootstrap, seed))
        located = self.located
        if located:
            scored = _score("ground", [it for it, _ in located], [p for _, p in located], vocab)
            results["ground"].update({f"located_{k}": scored[k] for k in ("mean_iou", "acc_iou25", "acc_iou50")})
        if located and bootstrap:
            stat = _pooled(lambda it, p: answer_ious(p, it.sample.extras["boxes_vox"], it.sample.extras["shape"])[0],
                           lambda g: float(np.mean(g >= 0.5)))
            results["ground"]["located_acc_iou50_ci"] = bootstrap_ci(_by_case(located), stat, bootstrap, seed)
        return results

    def predictions(self, tasks: Sequence[str]) -> list[dict[str, Any]]:
        """Every prompt, reference and prediction of the text tasks (and of the located grounding)."""
        rows = [(t, it, p) for t in tasks if t != "ehr" for it, p in self.done[t]]
        rows += [("ground_located", it, p) for it, p in self.located]
        return [{"task": t, "case": it.case_id, "prompt": it.sample.prompt, "reference": it.sample.answer,
                 "prediction": p} for t, it, p in rows]

    def perception_items(self, tasks: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Every item of the perception tasks asked (``measure``, ``chain``, ``detect``), each with its case
        (:func:`perception_rows`)."""
        items = {"measure": self.measured, "chain": self.chained, "detect": self.detected}
        return {t: perception_rows(t, items[t], self.case_ids) for t in tasks if t in items}


def _generate(model: Any, vol: Any, items: Sequence[EvalItem], answers: _Answers, batch_size: int,
              max_new_tokens: int, locate_prefix: str | None, gen_kw: Mapping[str, Any]) -> None:
    """Answer the text questions ``items`` about one volume ``vol (C, X, Y, Z)``, ``batch_size`` at a time;
    with ``locate_prefix``, ask each grounding question about a present finding again with its answer
    forced to start with a box."""
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        volume = vol[None].expand(len(chunk), *vol.shape)  # (B, C, X, Y, Z), no copy
        out = model.generate(volume, [it.sample.prompt for it in chunk], max_new_tokens=max_new_tokens, **gen_kw)
        if len(out) != len(chunk):
            raise RuntimeError(f"model.generate returned {len(out)} answers for {len(chunk)} prompts")
        for it, pred in zip(chunk, out, strict=True):
            answers.done[it.sample.task].append((it, str(pred)))
        present = [it for it in chunk if it.sample.task == "ground" and len(it.sample.extras["boxes_vox"])]
        if locate_prefix and present:
            out = model.generate(volume[: len(present)], [it.sample.prompt for it in present],
                                 max_new_tokens=max_new_tokens, answer_prefix=locate_prefix, **gen_kw)
            answers.located += [(it, str(pred)) for it, pred in zip(present, out, strict=True)]


def _perceive(model: Any, ci: int, case: Mapping[str, Any], vol: Any, answers: _Answers, detect: bool,
              vocab: Mapping[str, Any], labels: Any, priors: Mapping[str, float] | None, blind: bool,
              gen_kw: Mapping[str, Any]) -> None:
    """The measurement, chain and detection items of case ``ci``: the model's perception of ``vol``
    against the case's truth, or with ``blind`` the ``priors``' answers. With ``detect``, a model that
    looks again is also read with one look (the second look's gain)."""
    pred = first = None
    if not blind:
        pred = model.perceive(vol[None], **gen_kw)[0]
        if detect and getattr(model, "looks_again", False):
            first = model.perceive(vol[None], look_again=False, **gen_kw)[0]
    truth, _ = perceived_from_case(case, vocab, labels)  # read once for every perception task
    answers.case_ids[ci] = str(case.get("id", ci))
    m_items, c_items = case_items(ci, case, pred, vocab, labels, priors, truth)
    answers.measured += m_items
    answers.chained += c_items
    answers.detected += detect_items(ci, truth, pred, first)


def imaging_codes(vocab: Mapping[str, Any]) -> list[str]:
    """The EHR codes of the vocabulary's findings (``FindingSpec.code``): the ones an image can show."""
    return sorted({normalise_code(spec.code) for spec in as_vocab(vocab).values() if spec.code})


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    """Add ``src``'s keys into ``dst``, recursing into dicts both have."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _auroc(target: np.ndarray, score: np.ndarray) -> float:
    """AUROC by the rank-sum (Mann-Whitney) statistic; NaN without both classes (fast, for bootstraps)."""
    from scipy.stats import rankdata

    pos = target > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _by_case(pairs: Sequence[tuple[EvalItem, Any]]) -> list[list[tuple[EvalItem, Any]]]:
    groups: dict[int, list[tuple[EvalItem, Any]]] = {}
    for it, p in pairs:
        groups.setdefault(it.case_index, []).append((it, p))
    return list(groups.values())


def _pooled(per_item: Callable[[EvalItem, Any], np.ndarray], reduce: Callable[[np.ndarray], float]):
    """A bootstrap statistic: ``reduce`` of the values ``per_item`` gives, pooled over the resample
    (computed once per item and cached by identity, so resampling is cheap)."""
    cache: dict[int, np.ndarray] = {}

    def stat(items: list[tuple[EvalItem, Any]]) -> float:
        vals = []
        for it, p in items:
            key = id(it)
            if key not in cache:
                cache[key] = np.atleast_1d(np.asarray(per_item(it, p), dtype=float))
            vals.append(cache[key])
        flat = np.concatenate(vals) if vals else np.zeros(0)
        return reduce(flat) if flat.size else math.nan

    return stat


def _intervals(task: str, pairs: list[tuple[EvalItem, Any]], vocab: Mapping[str, Any], code_vocab: Any,
               reps: int, seed: int) -> dict[str, Any]:
    """``<metric>_ci`` entries of ``task``'s headline metrics, resampling cases."""
    groups = _by_case(pairs)
    out: dict[str, Any] = {}
    if task == "ground":
        ious = _pooled(lambda it, p: answer_ious(p, it.sample.extras["boxes_vox"], it.sample.extras["shape"])[0],
                       lambda g: g)
        out["acc_iou50_ci"] = bootstrap_ci(groups, lambda items: float(np.mean(ious(items) >= 0.5)), reps, seed)
        out["acc_iou25_ci"] = bootstrap_ci(groups, lambda items: float(np.mean(ious(items) >= 0.25)), reps, seed)
    elif task == "report":
        names = list(as_vocab(vocab))
        found = _pooled(lambda it, p: [v for n in names for v in (extract_findings(it.sample.answer, vocab)[n],
                                                                   extract_findings(p, vocab)[n])], lambda a: a)

        def micro_f1(items: list[tuple[EvalItem, Any]]) -> float:
            arr = found(items).reshape(-1, 2)
            tp = float((arr[:, 0] * arr[:, 1]).sum())
            fp = float(((1 - arr[:, 0]) * arr[:, 1]).sum())
            fn = float((arr[:, 0] * (1 - arr[:, 1])).sum())
            return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan

        out["findings"] = {"micro_f1_ci": bootstrap_ci(groups, micro_f1, reps, seed)}
    elif task in ("vqa_closed", "vqa_open"):
        if task == "vqa_closed":
            em = _pooled(lambda it, p: normalise_answer(p) == normalise_answer(it.sample.answer), lambda a: a)
            out["exact_match_ci"] = bootstrap_ci(groups, lambda items: float(np.mean(em(items))), reps, seed)
            by: dict[str, Any] = {}
            for qtype in sorted({it.sample.extras.get("qtype") for it, _ in pairs}):
                sub = [[(it, p) for it, p in g if it.sample.extras.get("qtype") == qtype] for g in groups]
                by[str(qtype)] = {"exact_match_ci": bootstrap_ci(sub, lambda items: float(np.mean(em(items))),
                                                                 reps, seed)}
            out["by_type"] = by
        else:
            f1 = _pooled(lambda it, p: token_f1(p, it.sample.answer), lambda a: a)
            out["token_f1_ci"] = bootstrap_ci(groups, lambda items: float(np.mean(f1(items))), reps, seed)
    elif task == "ehr":
        imaging = set(imaging_codes(vocab))
        codes = list(code_vocab.codes)

        def macro(items: list[tuple[EvalItem, Any]], keep: Callable[[str], bool]) -> float:
            scores = np.stack([p for _, p in items])
            targets = np.stack([it.sample.extras["target"] for it, _ in items])
            vals = [_auroc(targets[:, k], scores[:, k]) for k, c in enumerate(codes) if keep(c)]
            vals = [v for v in vals if not math.isnan(v)]
            return float(np.mean(vals)) if vals else math.nan

        out["macro_auroc_ci"] = bootstrap_ci(groups, lambda items: macro(items, lambda c: True), reps, seed)
        if imaging:
            out["imaging_macro_auroc_ci"] = bootstrap_ci(groups, lambda items: macro(items, lambda c: c in imaging),
                                                         reps, seed)
    return out


def _ehr_scores(model: Any, volume: Any, prompt: str, processor: Any, code_vocab: CodeVocab) -> np.ndarray:
    """EHR logits ``(K,)`` of one volume ``(1, C, X, Y, Z)``."""
    enc = processor([prompt]) if processor is not None else {}
    out = model(volume, enc.get("input_ids"), enc.get("attention_mask"))
    logits = out.get("ehr_logits") if isinstance(out, Mapping) else None
    if logits is None:
        raise ConfigError("task 'ehr': the model returned no 'ehr_logits'; was it trained with an EHR head?")
    if logits.shape[-1] != len(code_vocab):
        raise ConfigError(
            f"task 'ehr': the model scores {logits.shape[-1]} codes but the code vocabulary has {len(code_vocab)}"
        )
    return logits.float().reshape(-1).cpu().numpy()


def _score(task: str, its: list[EvalItem], preds: list[str], vocab: Mapping[str, Any]) -> dict[str, Any]:
    refs = [it.sample.answer for it in its]
    if task == "report":
        return report_metrics(preds, refs, vocab)
    if task == "ground":
        return grounding_metrics(
            preds, [i.sample.extras["boxes_vox"] for i in its], [i.sample.extras["shape"] for i in its]
        )
    if task == "vqa_closed":
        return vqa_metrics(preds, refs, groups=[i.sample.extras["qtype"] for i in its])
    return vqa_metrics(preds, refs)
