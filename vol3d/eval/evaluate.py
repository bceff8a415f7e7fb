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
``image_blind=True`` zeroes every volume: the score of a model that answers from the
text alone, the floor a grounded model must beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.errors import ConfigError
from vol3d.eval.metrics import ehr_metrics, grounding_metrics, report_metrics, vqa_metrics
from vol3d.tasks.codes import CodeVocab
from vol3d.tasks.findings import as_vocab
from vol3d.tasks.samples import TASKS, Sample, applicable_tasks, sample_one

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
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")


def _case_items(
    ci: int,
    case: Mapping[str, Any],
    tasks: Sequence[str],
    samples_per_case: int,
    seed: int,
    vocab: Any,
    code_vocab: Any,
) -> list[EvalItem]:
    ok = applicable_tasks(case)
    items = []
    for task in tasks:
        if task not in ok:
            continue
        for d in range(1 if task in ("report", "ehr") else samples_per_case):
            rng = np.random.default_rng([seed, ci, TASKS.index(task), d])
            s = sample_one(case, task, rng, vocab=vocab, code_vocab=code_vocab)
            items.append(EvalItem(ci, str(case.get("id", ci)), s))
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
) -> dict[str, Any]:
    """Generate answers for evaluation samples of ``tasks`` on ``cases`` and compute their metrics.

    Cases are read one at a time (``cases`` may be a ``CacheDataset``); the questions about
    one case go to the model together, in batches of ``batch_size`` prompts sharing its volume.

    Args:
        model: object with ``generate`` (and ``__call__`` returning ``ehr_logits`` for ``ehr``).
        cases: case dicts (see :mod:`vol3d.tasks.samples`).
        tasks: subset of ``report, vqa_closed, vqa_open, ground, ehr``.
        vocab: finding vocabulary (default: the synthetic one), for questions and report F1.
        code_vocab: EHR code order of the model's ``ehr_logits``; default ``model.code_vocab``.
        processor: turns prompts into ``input_ids``/``attention_mask`` for the EHR forward pass;
            default ``model.processor`` if it has one.
        samples_per_case: questions per case for VQA and grounding (reports and EHR: one).
        image_blind: zero every volume (image-blind baseline).
        keep_predictions: also return every prompt, reference and prediction.
        locate_prefix: also ask each grounding question about a *present* finding with the
            answer forced to start with this (``vol3d.protocol.LOCATE_PREFIX``; ``model.generate``
            must take ``answer_prefix``) and report ``ground.located_*``: how well the model
            says where a finding is once told that it is there, apart from whether it saw it.

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
    done: dict[str, list[tuple[EvalItem, Any]]] = {t: [] for t in tasks}  # (item, prediction)
    located: list[tuple[EvalItem, str]] = []  # grounding answers forced to start with a box
    n_cases = 0
    with torch.inference_mode():
        for ci, case in enumerate(cases):
            n_cases += 1
            items = _case_items(ci, case, tasks, samples_per_case, seed, vocab, code_vocab)
            vol = _volume(case).to(device)
            if image_blind:
                vol = torch.zeros_like(vol)
            text_items = [it for it in items if it.sample.task != "ehr"]
            for b in range(0, len(text_items), batch_size):
                chunk = text_items[b : b + batch_size]
                volume = vol[None].expand(len(chunk), *vol.shape)  # (B, C, X, Y, Z), no copy
                out = model.generate(
                    volume, [it.sample.prompt for it in chunk], max_new_tokens=max_new_tokens
                )
                if len(out) != len(chunk):
                    raise RuntimeError(f"model.generate returned {len(out)} answers for {len(chunk)} prompts")
                for it, pred in zip(chunk, out, strict=True):
                    done[it.sample.task].append((it, str(pred)))
                present = [it for it in chunk if it.sample.task == "ground" and len(it.sample.extras["boxes_vox"])]
                if locate_prefix and present:
                    out = model.generate(volume[: len(present)], [it.sample.prompt for it in present],
                                         max_new_tokens=max_new_tokens, answer_prefix=locate_prefix)
                    located += [(it, str(pred)) for it, pred in zip(present, out, strict=True)]
            for it in items:
                if it.sample.task == "ehr":
                    done["ehr"].append(
                        (it, _ehr_scores(model, vol[None], it.sample.prompt, processor, code_vocab))
                    )

    results: dict[str, Any] = {}
    for task in tasks:
        pairs = done[task]
        if not pairs:
            results[task] = {"n": 0}
        elif task == "ehr":
            scores = np.stack([p for _, p in pairs])
            targets = np.stack([it.sample.extras["target"] for it, _ in pairs])
            results[task] = ehr_metrics(scores, targets, code_vocab.codes)
        else:
            results[task] = _score(task, [it for it, _ in pairs], [p for _, p in pairs], vocab)
    if located:
        scored = _score("ground", [it for it, _ in located], [p for _, p in located], vocab)
        results["ground"].update({f"located_{k}": scored[k] for k in ("mean_iou", "acc_iou25", "acc_iou50")})
    results["meta"] = {
        "n_cases": n_cases,
        "tasks": list(tasks),
        "samples_per_case": samples_per_case,
        "seed": seed,
        "image_blind": image_blind,
    }
    if keep_predictions:
        results["predictions"] = [
            {
                "task": t,
                "case": it.case_id,
                "prompt": it.sample.prompt,
                "reference": it.sample.answer,
                "prediction": p,
            }
            for t in tasks
            if t != "ehr"
            for it, p in done[t]
        ] + [
            {"task": "ground_located", "case": it.case_id, "prompt": it.sample.prompt,
             "reference": it.sample.answer, "prediction": p}
            for it, p in located
        ]
    return results


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
