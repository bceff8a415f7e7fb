"""Instruction samples built on the fly from cached cases.

A case is the dict a :class:`vol3d.data.cache.CacheDataset` yields:

- ``image`` ``(C, X, Y, Z)``: the model-input volume (its shape defines the text-box frame),
- ``boxes_vox`` ``(N, 6)``: continuous voxel boxes in that frame (``preprocess.geometry``),
- ``box_findings`` / ``box_organs`` ``(N,)`` strings, optional ``boxes_visible`` ``(N,)`` fraction
  visible (one spelling everywhere: :data:`BOX_FINDINGS`, :data:`BOX_ORGANS`, :data:`BOXES_VISIBLE`),
- ``report`` (findings + impression), ``codes`` (ICD-10 strings), optional ``spacing`` (mm),
  ``modality``, ``id``.

Every sample is ``Sample(task, prompt, answer, extras)``; the prompt holds the ``<vol>``
placeholder exactly once (the processor expands it into image tokens). Ground truth for
VQA and grounding comes from the boxes. A box whose visible fraction is below
``MIN_VISIBLE`` (it was mostly cropped away) is never boxed and never counted: the
answer says that it lies mostly outside the volume, and closed questions avoid that
finding altogether because yes/no would be ambiguous.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import as_boxes, format_box, normalise_boxes
from vol3d.protocol import BOX_START, VOL_TOKEN
from vol3d.tasks.codes import CodeVocab, normalise_code
from vol3d.tasks.findings import FindingSpec, FindingVocab, as_vocab, coarse_organ, organ_in

VOL = VOL_TOKEN
BOX_TOKEN = BOX_START
BoxFormat = Literal["text", "token"]
BOX_FORMATS = ("text", "token")
TASKS = ("report", "vqa_closed", "vqa_open", "ground", "ehr")
CLOSED_QTYPES = ("presence", "organ", "count", "size")
#: Boxes less visible than this (after a crop or augmentation) are excluded from answers.
MIN_VISIBLE = 0.5
#: Open and grounding questions ask about a finding the case has with at least this probability
#: (when it has one; otherwise about any finding, present or not). Grounding questions are mostly
#: asked about what is there; refusals are still learned from the rest and from every normal case.
PRESENT_SHARE = 0.75
#: Share of each closed question type (restricted to those a case allows). Fixed, not dependent on
#: what the case has: with dataset-balanced presence and count questions, a case's chance of being
#: asked one must not reveal the answer either.
QTYPE_SHARES = {"presence": 0.35, "count": 0.25, "organ": 0.2, "size": 0.2}
#: Thresholds (mm) of the size-bucket questions.
SIZE_THRESHOLDS_MM = (5, 10, 15, 20, 30, 50, 80)

# Several phrasings per question so the model learns the task, not one string.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "report": (
        "<vol>\nWrite the findings for this {modality}.",
        "<vol>\nGenerate a radiology report for this {modality} scan.",
        "<vol>\nDescribe the findings in this {modality} volume, then give an impression.",
        "<vol>\nWhat does this {modality} show? Write the report.",
    ),
    "presence": (
        "<vol>\nIs there {a_text}?",
        "<vol>\nDoes this scan show {a_text}?",
        "<vol>\nIs {a_text} present? Answer yes or no.",
    ),
    "organ": (
        "<vol>\nIn which organ is the {noun}? Options: {choices}.",
        "<vol>\nWhich organ contains the {noun}? Choose from {choices}.",
    ),
    "count": (
        "<vol>\nHow many {plural} are there?",
        "<vol>\nCount the {plural} in this scan.",
        "<vol>\nWhat is the number of {plural}? Answer with a number.",
    ),
    "size": (
        "<vol>\nIs the largest {text} larger than {mm} mm?",
        "<vol>\nDoes the largest {text} measure more than {mm} mm?",
    ),
    "open": (
        "<vol>\nDescribe the {text}.",
        "<vol>\nTell me about any {text_any} in this scan, with size and location.",
    ),
    "ground": (
        "<vol>\nWhere is the {text}?",
        "<vol>\nLocate the {text} with a bounding box.",
        "<vol>\nGive the bounding box of {text_each}.",
    ),
}


class QuestionDropped(Exception):
    """A dataset-balanced draw dropped this question (:func:`_balanced_pick`); ask something else."""


class Sample(NamedTuple):
    """One instruction sample. ``extras`` carries ground truth the metrics need
    (``qtype``, ``finding``, ``boxes_vox`` ``(n, 6)``, ``shape``, ``codes``, ``target`` ``(K,)``)."""

    task: str
    prompt: str
    answer: str
    extras: dict[str, Any]


@dataclasses.dataclass
class TaskMix:
    """Relative weights of the instruction tasks drawn for each case (need not sum to 1)."""

    report: float = 1.0  # report generation: findings + impression text
    vqa_closed: float = 1.0  # yes/no, multiple-choice, count and size-bucket questions
    vqa_open: float = 0.5  # free-text description of one finding type
    ground: float = 1.0  # "Where is the X?" -> <box>[...]</box> (or a refusal when absent)
    ehr: float = 0.0  # multi-label EHR code prediction (no text; needs an EHR head)
    samples_per_case: int = 1  # questions per case each time it is visited (one encoder pass serves them all)

    def __post_init__(self) -> None:
        w = self.weights()
        if any(v < 0 for v in w.values()):
            raise ConfigError(f"TaskMix weights must be >= 0, got {w}")
        if sum(w.values()) <= 0:
            raise ConfigError("TaskMix: at least one task weight must be > 0")
        if self.samples_per_case < 1:
            raise ConfigError(f"TaskMix.samples_per_case must be >= 1, got {self.samples_per_case}")

    def weights(self) -> dict[str, float]:
        return {t: float(getattr(self, t)) for t in TASKS}


# ----------------------------------------------------------------------------- ground truth


@dataclasses.dataclass
class FindingTruth:
    """Boxes of one finding type in one case."""

    boxes: np.ndarray  # (n, 6) visible boxes in model-input voxels, sorted by (x0, y0, z0)
    organs: list[str]  # box_organs entry of each visible box
    n_partial: int  # boxes that exist but are mostly outside the volume (0 < visible < MIN_VISIBLE)

    @property
    def n(self) -> int:
        return len(self.boxes)

    @property
    def ambiguous(self) -> bool:
        return self.n_partial > 0


#: Per-box keys of a case (what :class:`vol3d.data.cache.CacheDataset` items hold): finding names,
#: organ (label) names and the visible fraction of each of ``boxes_vox``.
BOX_FINDINGS, BOX_ORGANS, BOXES_VISIBLE = "box_findings", "box_organs", "boxes_visible"


def visible_fractions(case: Mapping[str, Any], n: int) -> np.ndarray:
    """``(n,)`` float: how much of each of the case's ``n`` boxes lies in the volume (1 when unsaid)."""
    value = case.get(BOXES_VISIBLE)
    return np.ones(n) if value is None else np.asarray(value, dtype=float).reshape(-1)


def has_boxes(case: Mapping[str, Any]) -> bool:
    """Whether the case carries box annotations (possibly zero boxes: a negative case)."""
    return case.get(BOX_FINDINGS) is not None and case.get("boxes_vox") is not None


def finding_truth(case: Mapping[str, Any], vocab: FindingVocab | None = None) -> dict[str, FindingTruth]:
    """Per finding of ``vocab``: the case's visible boxes (sorted by x0) and partial count."""
    vocab = as_vocab(vocab)
    boxes = as_boxes(np.asarray(case["boxes_vox"]))
    findings = [str(f) for f in case[BOX_FINDINGS]]
    if len(findings) != len(boxes):
        raise InputError(
            f"case {case.get('id', '?')}: {len(boxes)} boxes but {len(findings)} {BOX_FINDINGS} entries"
        )
    unknown = sorted(set(findings) - set(vocab))
    if unknown:
        raise InputError(
            f"case {case.get('id', '?')}: findings {unknown} are not in the finding vocabulary "
            f"({sorted(vocab)}); add them (see docs/tasks_and_metrics.md)"
        )
    organs = [str(o) for o in case.get(BOX_ORGANS) or []] or [vocab[f].organ for f in findings]
    visible = visible_fractions(case, len(boxes))
    out = {}
    for name in vocab:
        sel = [i for i, f in enumerate(findings) if f == name]
        keep = [i for i in sel if visible[i] >= MIN_VISIBLE]
        keep.sort(key=lambda i: tuple(boxes[i, :3]))  # deterministic order: by x0, then y0, z0
        out[name] = FindingTruth(
            boxes=boxes[keep].reshape(-1, 6),
            organs=[organs[i] for i in keep],
            n_partial=sum(1 for i in sel if 0 < visible[i] < MIN_VISIBLE),
        )
    return out


def box_sizes_mm(boxes: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Extent of each box in mm along each axis ``(n, 6) -> (n, 3)``."""
    b = as_boxes(boxes)
    return (b[:, 3:] - b[:, :3]) * np.asarray(spacing, dtype=float)[None]


def _organ_text(organ: str) -> str:
    """``"kidney_left"`` -> ``"left kidney"`` (readable, keeps laterality)."""
    words = organ.lower().replace("_", " ").split()
    side = [w for w in words if w in ("left", "right")]
    return " ".join(side + [w for w in words if w not in ("left", "right")])


def _article(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiou" else "a ") + text


def _fill(spec: FindingSpec, **extra: Any) -> dict[str, Any]:
    return {
        "text": spec.text,
        "plural": spec.plural_text,
        "a_text": _article(spec.text) if spec.countable else spec.text,
        "text_any": spec.plural_text if spec.countable else spec.text,
        "text_each": f"each {spec.text}" if spec.countable else f"the {spec.text}",
        "noun": spec.head_noun if spec.countable else spec.text,
        **extra,
    }


# ----------------------------------------------------------------------------- answers


def _partial_note(spec: FindingSpec, k: int) -> str:
    if k == 0:
        return ""
    if not spec.countable:
        return f"The {spec.organ} lies mostly outside this volume."
    if k == 1:
        return f"One {spec.text} lies mostly outside this volume."
    return f"{k} {spec.plural_text} lie mostly outside this volume."


def describe_answer(spec: FindingSpec, truth: FindingTruth, spacing: Sequence[float] | None) -> str:
    """Open-VQA answer: count, organ and size (of the largest) from the ground-truth boxes."""
    if truth.n == 0:
        note = _partial_note(spec, truth.n_partial)
        return note or f"There is no {spec.text}."
    organs = list(dict.fromkeys(_organ_text(o) for o in truth.organs))
    where = " and ".join(organs)
    size = ""
    if spacing is not None:
        from vol3d.tasks.regions import size_triple

        ext = box_sizes_mm(truth.boxes, spacing)
        big = ext[int(np.argmax(ext.prod(axis=1)))]
        size = " x ".join(str(v) for v in size_triple(big))
    if not spec.countable:
        text = f"There is {spec.text}" + (f"; the {where} measures {size} mm." if size else ".")
    elif truth.n == 1:
        text = f"There is one {spec.text} in the {where}" + (f", measuring {size} mm." if size else ".")
    else:
        text = f"There are {truth.n} {spec.plural_text} in the {where}" + (
            f"; the largest measures {size} mm." if size else "."
        )
    note = _partial_note(spec, truth.n_partial)
    return text + (" " + note if note else "")


def ground_answer(spec: FindingSpec, truth: FindingTruth, shape: Sequence[int], box_format: BoxFormat = "text") -> str:
    """One box per visible box (sorted by x0), or an honest refusal.

    ``box_format="text"``: ``<box>[x0,y0,z0,x1,y1,z1]</box>`` spelled by the LM (as M3D does);
    ``"token"``: a bare ``<box>`` whose coordinates the model's grounding head supplies.
    """
    if box_format not in BOX_FORMATS:
        raise ConfigError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    if truth.n == 0:
        return _partial_note(spec, truth.n_partial) or f"There is no {spec.text}."
    if box_format == "token":
        boxes = " ".join([BOX_TOKEN] * truth.n)
    else:
        boxes = " ".join(format_box(b) for b in normalise_boxes(truth.boxes, shape))
    note = _partial_note(spec, truth.n_partial)
    return boxes + (" " + note if note else "")


# ----------------------------------------------------------------------------- samplers


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _choose(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _balanced_pick(rng: np.random.Generator, pos: list[str], neg: list[str],
                   prevalence: Mapping[str, float] | None = None) -> tuple[str, bool] | None:
    """A finding and whether it is a positive one, or None: ask another kind of question.

    With ``prevalence`` (the share of cases that have each finding, :func:`prevalence`), yes and
    no are balanced *per finding over the dataset*: a finding is drawn uniformly and the question
    is kept with probability ``min(p, 1 - p) / p`` when the case has it, ``/ (1 - p)`` when not,
    else dropped (None), so the question alone says nothing about the answer (an image-blind model
    sits at 0.5). Without it, yes and no are balanced within the case, which lets the question give
    the answer away (the common finding is the "yes").
    """
    if prevalence is None:
        want_pos = bool(rng.random() < 0.5) if pos and neg else bool(pos)
        return _choose(rng, pos if want_pos else neg), want_pos
    name = _choose(rng, [*pos, *neg])
    p = min(max(float(prevalence.get(name, 0.5)), 1e-6), 1 - 1e-6)
    keep = min(p, 1 - p) / (p if name in pos else 1 - p)
    return (name, name in pos) if rng.random() < keep else None


def prevalence(cases: Iterable[Mapping[str, Any]], vocab: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Share of the annotated cases that have each finding (visible), for :func:`_balanced_pick`."""
    vocab = as_vocab(vocab)
    counts = dict.fromkeys(vocab, 0)
    n = 0
    for case in cases:
        if not has_boxes(case):
            continue
        n += 1
        for name, truth in finding_truth(case, vocab).items():
            counts[name] += truth.n > 0
    return {k: v / n for k, v in counts.items()} if n else {}


def _closed_sample(case: Mapping[str, Any], rng: np.random.Generator, vocab: FindingVocab,
                   prevalence: Mapping[str, float] | None = None, qtypes: Sequence[str] = CLOSED_QTYPES) -> Sample:
    truth = finding_truth(case, vocab)
    spacing = case.get("spacing")
    clear = [f for f, t in truth.items() if not t.ambiguous]  # yes/no is unambiguous for these
    pos = [f for f in clear if truth[f].n > 0]
    neg = [f for f in clear if truth[f].n == 0]
    countable = [f for f in clear if vocab[f].countable]
    options = []
    if (pos or neg) and "presence" in qtypes:
        options.append("presence")
    if pos and "organ" in qtypes:
        options.append("organ")
    if countable and "count" in qtypes:
        options.append("count")
    if spacing is not None and any(truth[f].n > 0 for f in countable) and "size" in qtypes:
        options.append("size")
    if not options:
        raise InputError(
            f"case {case.get('id', '?')}: every finding is only partly visible; no closed question"
        )
    allowed = [q for q in CLOSED_QTYPES if q in qtypes]
    shares = np.array([QTYPE_SHARES[q] for q in allowed])
    qtype = allowed[int(rng.choice(len(allowed), p=shares / shares.sum()))]
    if qtype not in options:  # e.g. "which organ" about a case without findings
        if prevalence is not None:  # balanced: another type here would ask normal cases more often
            raise QuestionDropped(qtype)
        qtype = _choose(rng, options)
    picked = None
    if qtype in ("presence", "count"):
        pool = (pos, neg) if qtype == "presence" else ([f for f in countable if f in pos],
                                                       [f for f in countable if f in neg])
        picked = _balanced_pick(rng, *pool, prevalence)
        if picked is None:
            raise QuestionDropped(qtype)
    extras: dict[str, Any] = {"qtype": qtype}
    if qtype == "presence":
        assert picked is not None
        name, yes = picked
        spec = vocab[name]
        prompt, answer = _choose(rng, TEMPLATES["presence"]).format(**_fill(spec)), "yes" if yes else "no"
    elif qtype == "organ":
        name = _choose(rng, pos)
        spec = vocab[name]
        organs = {coarse_organ(s.organ) for s in vocab.values()}
        answer = organ_in(truth[name].organs[0], organs)
        pool = sorted(organs - {answer})
        others = [pool[i] for i in rng.permutation(len(pool))[:3]]
        choices = [str(c) for c in np.asarray([answer, *others])[rng.permutation(len(others) + 1)]]
        # the bare noun is ambiguous when another present finding shares it in another organ
        clash = any(vocab[f].head_noun == spec.head_noun and vocab[f].organ != spec.organ for f in pos)
        fill = _fill(spec, choices=", ".join(choices))
        if clash:
            fill["noun"] = spec.text
        prompt = _choose(rng, TEMPLATES["organ"]).format(**fill)
        extras["choices"] = choices
    elif qtype == "count":
        assert picked is not None
        name, _ = picked
        spec = vocab[name]
        prompt, answer = _choose(rng, TEMPLATES["count"]).format(**_fill(spec)), str(truth[name].n)
    else:
        name = _choose(rng, [f for f in countable if truth[f].n > 0])
        spec = vocab[name]
        largest = float(box_sizes_mm(truth[name].boxes, spacing).max())
        below = [t for t in SIZE_THRESHOLDS_MM if t < largest]  # -> "yes"
        above = [t for t in SIZE_THRESHOLDS_MM if t >= largest]  # -> "no"
        want_yes = bool(rng.random() < 0.5) if below and above else bool(below)
        mm = _choose(rng, below if want_yes else above)
        prompt = _choose(rng, TEMPLATES["size"]).format(**_fill(spec, mm=mm))
        answer = "yes" if largest > mm else "no"
        extras["largest_mm"] = largest
    extras["finding"] = name
    return Sample("vqa_closed", prompt, answer, extras)


def balanced_sample(case: Mapping[str, Any], qtype: str, finding: str, rng: np.random.Generator | int | None,
                    vocab: Mapping[str, Any] | None = None) -> Sample:
    """The closed question ``qtype`` ("presence": "Is there <finding>?", "count": "How many <finding>s?")
    about ``case``, for evaluation sets balanced per finding (:func:`balanced_presence`)."""
    rng, vocab = _rng(rng), as_vocab(vocab)
    truth = finding_truth(case, vocab)[finding]
    if truth.ambiguous:
        raise InputError(f"case {case.get('id', '?')}: {finding} is only partly visible; the answer would be ambiguous")
    if qtype == "presence":
        prompt, answer = _choose(rng, TEMPLATES["presence"]).format(**_fill(vocab[finding])), "yes" if truth.n else "no"
    elif qtype == "count" and vocab[finding].countable:
        prompt, answer = _choose(rng, TEMPLATES["count"]).format(**_fill(vocab[finding])), str(truth.n)
    else:
        raise ConfigError(f"balanced questions are presence or count (of a countable finding), got {qtype} {finding}")
    return Sample("vqa_closed", prompt, answer, {"qtype": qtype, "finding": finding})


def balanced_presence(cases: Iterable[Mapping[str, Any]], vocab: Mapping[str, Any] | None = None,
                      seed: int = 0, qtypes: Sequence[str] = ("presence", "count")) -> dict[int, list[tuple[str, str]]]:
    """Which presence and count questions to ask about which case (by position), balanced per finding.

    For every finding (countable ones for count), as many cases without it as with it (the smaller
    side sets the number; the cases are drawn with ``seed``), skipping cases where it is only partly
    visible. A model that answers from the question alone scores exactly 0.5 on every presence
    finding, and on count cannot do better than always saying "0" on half the questions.
    Returns ``{case position: [(qtype, finding), ...]}``.
    """
    vocab = as_vocab(vocab)
    pos: dict[str, list[int]] = {f: [] for f in vocab}
    neg: dict[str, list[int]] = {f: [] for f in vocab}
    for i, case in enumerate(cases):
        if not has_boxes(case):
            continue
        for name, truth in finding_truth(case, vocab).items():
            if not truth.ambiguous:
                (pos if truth.n > 0 else neg)[name].append(i)
    out: dict[int, list[tuple[str, str]]] = {}
    for q, qtype in enumerate(qtypes):
        rng = np.random.default_rng([seed, 7, q])
        for name, spec in vocab.items():
            if qtype == "count" and not spec.countable:
                continue
            k = min(len(pos[name]), len(neg[name]))
            for side in (pos[name], neg[name]):
                for i in sorted(rng.permutation(side)[:k].tolist()):
                    out.setdefault(int(i), []).append((qtype, name))
    return out


def sample_one(
    case: Mapping[str, Any],
    task: str,
    rng: np.random.Generator | int | None,
    *,
    vocab: Mapping[str, Any] | None = None,
    code_vocab: CodeVocab | None = None,
    box_format: BoxFormat = "text",
    prevalence: Mapping[str, float] | None = None,
    qtypes: Sequence[str] = CLOSED_QTYPES,
) -> Sample:
    """One sample of ``task`` for ``case``; deterministic given ``rng`` (a Generator or a seed).

    ``box_format``: how grounding answers write boxes (:func:`ground_answer`); ``prevalence``:
    balance yes/no per finding over the dataset (:func:`_balanced_pick`); ``qtypes``: the closed
    question types to draw from."""
    rng, vocab = _rng(rng), as_vocab(vocab)
    if task not in applicable_tasks(case):
        raise InputError(
            f"case {case.get('id', '?')}: task {task!r} needs "
            + {"report": "a non-empty 'report'", "ehr": "a 'codes' list"}.get(task, "box annotations")
            + f"; this case supports {applicable_tasks(case)}"
        )
    modality = str(case.get("modality") or "CT")
    if task == "report":
        prompt = _choose(rng, TEMPLATES["report"]).format(modality=modality)
        return Sample("report", prompt, str(case["report"]).strip(), {})
    if task == "ehr":
        codes = sorted({normalise_code(c) for c in case["codes"]})
        extras: dict[str, Any] = {"codes": codes}
        if code_vocab is not None:
            extras["target"] = code_vocab.encode(codes)
        return Sample("ehr", VOL, "", extras)
    if task == "vqa_closed":
        return _closed_sample(case, rng, vocab, prevalence, qtypes)
    truth = finding_truth(case, vocab)
    name = _choose(rng, sorted(truth))
    # favour findings that are present, else the model mostly learns refusals
    present = [f for f in sorted(truth) if truth[f].n > 0 or truth[f].n_partial > 0]
    if present and rng.random() < PRESENT_SHARE:
        name = _choose(rng, present)
    spec, t = vocab[name], truth[name]
    if task == "vqa_open":
        prompt = _choose(rng, TEMPLATES["open"]).format(**_fill(spec))
        return Sample("vqa_open", prompt, describe_answer(spec, t, case.get("spacing")), {"finding": name})
    shape = tuple(int(s) for s in np.shape(case["image"])[-3:])
    prompt = _choose(rng, TEMPLATES["ground"]).format(**_fill(spec))
    extras = {"finding": name, "boxes_vox": t.boxes.copy(), "shape": shape, "n_partial": t.n_partial}
    return Sample("ground", prompt, ground_answer(spec, t, shape, box_format), extras)


def applicable_tasks(case: Mapping[str, Any]) -> list[str]:
    """Tasks this case has ground truth for, in :data:`TASKS` order."""
    ok = []
    for task in TASKS:
        if task == "report":
            good = bool(str(case.get("report") or "").strip())
        elif task == "ehr":
            good = case.get("codes") is not None
        else:
            good = has_boxes(case)
        if good:
            ok.append(task)
    return ok


def build_samples(
    case: Mapping[str, Any],
    rng: np.random.Generator | int | None,
    mix: TaskMix | None = None,
    *,
    vocab: Mapping[str, Any] | None = None,
    code_vocab: CodeVocab | None = None,
    box_format: BoxFormat = "text",
    prevalence: Mapping[str, float] | None = None,
) -> list[Sample]:
    """``mix.samples_per_case`` samples, tasks drawn by ``mix`` weights among those the case supports
    (``prevalence``: see :func:`sample_one`)."""
    rng, mix = _rng(rng), mix or TaskMix()
    weights = mix.weights()
    tasks = [t for t in applicable_tasks(case) if weights[t] > 0]
    if not tasks:
        raise InputError(
            f"case {case.get('id', '?')} has no ground truth for any task with weight > 0 "
            f"(weights {weights}; case supports {applicable_tasks(case)})"
        )
    p = np.array([weights[t] for t in tasks])
    p = p / p.sum()
    out = []
    for _ in range(mix.samples_per_case):
        for attempt in range(8):  # a dataset-balanced question may be dropped: draw the task again
            task = tasks[int(rng.choice(len(tasks), p=p))]
            try:
                out.append(sample_one(case, task, rng, vocab=vocab, code_vocab=code_vocab, box_format=box_format,
                                      prevalence=prevalence if attempt < 7 else None))
                break
            except QuestionDropped:
                continue
    return out


def corpus_texts(
    cases: Iterable[Mapping[str, Any]], vocab: Mapping[str, Any] | None = None, samples_per_task: int = 4
) -> list[str]:
    """Every text a tokenizer must cover: all template phrasings for every finding, the
    canonical short answers, and each case's report plus sampled answers (deterministic)."""
    vocab = as_vocab(vocab)
    organs = sorted({coarse_organ(s.organ) for s in vocab.values()})
    numbers = sorted({*range(21), *SIZE_THRESHOLDS_MM})
    texts: list[str] = [
        "yes",
        "no",
        *organs,
        *(str(i) for i in numbers),
        format_box([0, 0, 0, 999, 999, 999]),
    ]
    modalities = {"CT", "MR"}
    cases = list(cases)
    modalities |= {str(c.get("modality")) for c in cases if c.get("modality")}
    for kind, templates in TEMPLATES.items():
        for tpl in templates:
            if kind == "report":
                texts += [tpl.format(modality=m) for m in sorted(modalities)]
                continue
            for spec in vocab.values():
                texts.append(tpl.format(**_fill(spec, choices=", ".join(organs), mm=SIZE_THRESHOLDS_MM[0])))
                texts.append(f"There is no {spec.text}.")
    for i, case in enumerate(cases):
        rng = np.random.default_rng(i)
        if has_boxes(case):  # every open and grounding answer the case can give, not only the drawn ones
            shape = tuple(int(v) for v in np.shape(case["image"])[-3:])
            for name, truth in finding_truth(case, vocab).items():
                texts.append(describe_answer(vocab[name], truth, case.get("spacing")))
                texts += [ground_answer(vocab[name], truth, shape, f) for f in BOX_FORMATS]
        for task in applicable_tasks(case):
            if task == "ehr":
                texts += [normalise_code(c) for c in case["codes"]]
                continue
            for _ in range(1 if task == "report" else samples_per_task):
                s = sample_one(case, task, rng, vocab=vocab)
                texts += [s.prompt, s.answer]
    return list(dict.fromkeys(texts))  # unique, first-seen order
