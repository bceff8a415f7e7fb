"""Measurements and reasoning chains read from what the perception sees (numpy, torch-free).

A measurement question ("What is the diameter of the largest liver lesion?", "What is the
craniocaudal length of the spleen?", "How far apart are the two largest kidney cysts?") is
parsed into a :class:`Query` and answered from a :class:`~vol3d.tasks.regions.Perceived`: the
regions' boxes give sizes and positions in millimetres, their voxels give volumes in mL. The same
functions read the ground truth of a cached case (:func:`truth_queries`, for evaluation) and the
model's perception (:func:`measure`), so a measurement error is the perception's error only.

A :class:`Chain` lists the steps behind an answer, each one checkable on its own (3DReasonKnee's
box -> reasoning -> graded conclusion; VILA-M3's expert numbers)::

    organ       spleen                      box, 1 020 mL
    measure     craniocaudal length 168 mm
    conclusion  168 mm > 120 mm -> splenomegaly: yes

A finding's step gives its box and size; the conclusion names the threshold it used: the finding's
``criterion`` in the vocabulary (``"craniocaudal > 120 mm"``) when it has one, otherwise the
detection itself (at least one instance found) or, for a condition, its classifier probability.

Sizes follow :func:`vol3d.tasks.regions.size_triple`: the *diameter* of a finding is its long
axial extent, an organ's *length* its craniocaudal extent, a *distance* is between box centres.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vol3d.tasks.findings import (
    Criterion,
    FindingSpec,
    as_vocab,
    coarse_organ,
    finding_named,
    organ_in,
    organ_matches,
    parse_criterion,
)
from vol3d.tasks.regions import (
    LabelSpec,
    Perceived,
    Region,
    organ_text,
    perceived_present,
    size_text,
    size_triple,
)

#: Evaluation tasks scored from the perception rather than from generated text (vol3d.eval.reasoning).
PERCEPTION_TASKS = ("measure", "chain", "detect")

#: What a measurement query asks, with its unit.
QUERY_UNITS = {"diameter": "mm", "length": "mm", "distance": "mm", "volume": "mL"}

#: The question each query kind is asked with in evaluation (``{what}``: "largest liver lesion",
#: "spleen"; ``{plural}``: "liver lesions").
QUESTION_TEMPLATES = {
    "diameter": "What is the diameter of the {what}?",
    "volume": "What is the volume of the {what}?",
    "length": "What is the craniocaudal length of the {what}?",
    "distance": "How far apart are the two largest {plural}?",
}

_YES_NO = {"is", "are", "does", "do", "did", "was", "were", "has", "have", "can", "could", "should", "will"}

_KIND_WORDS = (  # first match wins: "how far" before "how large", "length" before "size"
    ("distance", ("how far", "distance", "apart")),
    ("volume", ("volume", "how many ml", "how many millilitres", "how many milliliters", " ml ")),
    ("length", ("craniocaudal", "length", "how long", "span")),
    ("diameter", ("diameter", "how large", "how big", "size", "measure", "across")),
)


# ----------------------------------------------------------------------------- queries


@dataclasses.dataclass(frozen=True)
class Query:
    """What a measurement question asks: ``kind`` (a :data:`QUERY_UNITS` key) of a ``finding``
    (vocabulary key; its largest instance, or its two largest for a distance) or an ``organ``
    (label name)."""

    kind: str
    finding: str | None = None
    organ: str | None = None

    @property
    def unit(self) -> str:
        return QUERY_UNITS[self.kind]

    def question(self, vocab: Mapping[str, Any] | None) -> str:
        """The evaluation question (:data:`QUESTION_TEMPLATES`)."""
        if self.finding is not None:
            spec = as_vocab(vocab)[self.finding]
            return QUESTION_TEMPLATES[self.kind].format(what=f"largest {spec.text}", plural=spec.plural_text)
        return QUESTION_TEMPLATES[self.kind].format(what=organ_text(self.organ or ""), plural="")


def _words(text: str) -> str:
    """Lower-case words of ``text`` between spaces, special tokens (``<vol>``) dropped."""
    return " " + re.sub(r"[^a-z0-9]+", " ", re.sub(r"<[a-z_/]+>", " ", text.lower())).strip() + " "


def organ_named(question: str, organs: Sequence[str]) -> str | None:
    """The organ label a question names ("the left kidney" -> ``"kidney_left"``): the label whose words
    all occur in the question, the most specific one; None when none does or two equally specific ones do
    ("the kidney" with two kidney labels)."""
    q = _words(question)
    hits = []
    for name in organs:
        forms = {organ_text(name), name.replace("_", " ")}
        for form in forms:
            if all(f" {w} " in q for w in form.lower().split()):
                hits.append((len(form.split()), name))
                break
    if not hits:
        return None
    best = max(n for n, _ in hits)
    top = [name for n, name in hits if n == best]
    return top[0] if len(top) == 1 else None


def parse_question(question: str, vocab: Mapping[str, Any] | None, organs: Sequence[str] = ()) -> Query | None:
    """The measurement a question asks for, or None when it asks for none.

    The kind comes from its words ("how far"/"distance", "volume"/"mL", "length"/"craniocaudal",
    "diameter"/"how large"/"size"); the target is the one vocabulary finding it names, else the one
    organ label it names (``organs``: label names, background excluded). A condition finding
    (splenomegaly) is measured on its organ."""
    vocab = as_vocab(vocab)
    q = _words(question)
    if q.split()[:1] and q.split()[0] in _YES_NO or not any(f" {w} " in q for w in ("what", "how", "measure", "give")):
        return None  # "Is the largest lesion larger than 20 mm?" is a yes/no question; "Describe ..." is open
    kind = next((k for k, words in _KIND_WORDS if any(f" {w.strip()} " in q for w in words)), None)
    if kind is None:
        return None
    finding = finding_named(question, vocab)
    if finding is not None and not vocab[finding].countable:
        finding, organ = None, _organ_label(vocab[finding].organ, organs)
        return Query("length" if kind == "diameter" else kind, organ=organ) if organ and kind != "distance" else None
    if finding is not None:
        return Query(kind, finding=finding)
    organ = organ_named(question, organs)
    if organ is None or kind == "distance":
        return None
    return Query("length" if kind == "diameter" else kind, organ=organ)


def _organ_label(organ: str, organs: Sequence[str]) -> str | None:
    """The label of a vocabulary organ (``"spleen"`` -> ``"spleen"``; ``"kidney"`` -> the first kidney label)."""
    return next((o for o in organs if organ_matches(o, organ)), None)


def measured_organs(vocab: Mapping[str, Any] | None, labels: LabelSpec | None) -> list[str]:
    """Organ labels whose size is asked about: those a vocabulary finding lives in or is a state of."""
    if labels is None:
        return []
    wanted = {coarse_organ(s.organ) for s in as_vocab(vocab).values()}
    return [o for o in labels.organs[1:] if coarse_organ(organ_in(o, wanted)) in wanted]


def truth_queries(perceived: Perceived, vocab: Mapping[str, Any] | None, labels: LabelSpec | None) -> list[Query]:
    """Every measurement question a case's ground truth answers: diameter and volume of the largest
    instance of each present countable finding, the distance of its two largest when there are two,
    and the length and volume of each :func:`measured_organs` organ the label map holds."""
    vocab = as_vocab(vocab)
    out: list[Query] = []
    for name, spec in vocab.items():
        n = perceived.count(name) if spec.countable else 0
        if n:
            out += [Query("diameter", finding=name), Query("volume", finding=name)]
        if n >= 2:
            out.append(Query("distance", finding=name))
    have = {r.name for r in perceived.organs}
    for organ in measured_organs(vocab, labels):
        if organ in have:
            out += [Query("length", organ=organ), Query("volume", organ=organ)]
    return out


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Measurement:
    """A query's value (None: nothing to measure, e.g. no such finding found) and the regions it read."""

    query: Query
    value: float | None
    regions: list[Region]
    text: str  # the answer sentence
    #: read (in part) from candidates below the finding threshold (``Perceived.candidates``): the
    #: question presumes an instance the perception did not call, and the answer says so
    tentative: bool = False


def instances(perceived: Perceived, finding: str) -> list[Region]:
    """A finding's instances, largest (box volume) first: "the largest" of every answer and report."""
    return sorted((r for r in perceived.findings if r.name == finding), key=lambda r: -float(np.prod(r.size_mm)))


def _asked(question: str) -> str:
    """The question itself: the text after the last ``<vol>`` placeholder, stripped."""
    return question.split("<vol>")[-1].strip()


def _yes_no_about(question: str, vocab: Mapping[str, FindingSpec]) -> tuple[str, str] | None:
    """``(the question itself, the one vocabulary finding it names)`` for a yes/no question (its first word
    an auxiliary verb, :data:`_YES_NO`), else None."""
    asked = _asked(question)
    words = _words(asked).split()
    name = finding_named(asked, vocab)
    return (asked, name) if name is not None and words and words[0] in _YES_NO else None


#: Words of a question that asks *where* (English, as the task templates): "Where is the liver lesion?",
#: "Locate the kidney cyst with a bounding box.", "Localise ...".
_WHERE = re.compile(r"\b(where|locate|locali[sz]e|bounding box|box)\b", re.IGNORECASE)


def asks_location(question: str) -> bool:
    """Does the question ask where something is (see :data:`_WHERE`)?"""
    return _WHERE.search(_asked(question)) is not None


#: Words of a question that asks *how many* (English, as the task templates): "How many liver lesions
#: are there?", "What is the number of kidney cysts?", "Count the lung nodules in this scan."
_HOW_MANY = re.compile(r"\b(how many|number of|count)\b", re.IGNORECASE)


def count_answer(question: str, perceived: Perceived, vocab: Mapping[str, Any] | None) -> str | None:
    """The perceived count of the one countable finding a "how many" question (:data:`_HOW_MANY`) names
    (``"2"``), or None for another question: "how many" is answered by the regions, as "where" is
    (:func:`location_answer`)."""
    vocab = as_vocab(vocab)
    name = finding_named(question, vocab)
    if name is None or not vocab[name].countable or _HOW_MANY.search(_asked(question)) is None:
        return None
    return str(perceived.count(name))


#: Words that make a yes/no question about a named finding ask *whether* it is there: "Is there a liver
#: lesion?", "Does this scan show a kidney cyst?", "Is a lung nodule present?", "Do you see any ...?"
#: ("Is the liver lesion benign?" and "Does the liver lesion have a rim?" have none of them: the language
#: model answers those).
_WHETHER = re.compile(r"\b(is there|are there|present|presence|shows?|shown|seen|see|visible|evidence|any|"
                      r"detected|identified)\b", re.IGNORECASE)
#: A length threshold in a question ("larger than 20 mm", "more than 3 cm") and the comparisons.
_THRESHOLD = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)\b", re.IGNORECASE)
_ABOVE = re.compile(r"\b(larger|bigger|greater|more|longer|exceeds?|exceeding|over|above)\b", re.IGNORECASE)
_BELOW = re.compile(r"\b(smaller|less|shorter|under|below)\b", re.IGNORECASE)


def presence_answer(question: str, perceived: Perceived, vocab: Mapping[str, Any] | None,
                    condition_threshold: float = 0.5) -> str | None:
    """``"yes"``/``"no"`` from the regions for a yes/no question asking whether the one vocabulary
    finding it names is there (:data:`_WHETHER`; no number in it, not *where* or *how many*): a
    countable finding is there when one of its regions was found, a condition when its probability
    (after :func:`call_conditions`, when the caller applied it) reaches ``condition_threshold``.
    None for any other question."""
    vocab = as_vocab(vocab)
    about = _yes_no_about(question, vocab)
    if about is None:
        return None
    asked, name = about
    if re.search(r"\d", asked) or _WHETHER.search(asked) is None or asks_location(asked) or _HOW_MANY.search(asked):
        return None
    return "yes" if name in perceived_present(perceived, condition_threshold) else "no"


def size_answer(question: str, perceived: Perceived, vocab: Mapping[str, Any] | None) -> str | None:
    """``"yes"``/``"no"`` from the regions for a yes/no question comparing the largest instance of the
    one countable finding it names with a length ("Is the largest liver lesion larger than 20 mm?",
    "... smaller than 3 cm?"): the largest extent of any perceived instance along any axis (as the
    training answers measure it) against the threshold; "no" when none was found. None for any other
    question (no single threshold, no comparison word, or both kinds)."""
    vocab = as_vocab(vocab)
    about = _yes_no_about(question, vocab)
    if about is None:
        return None
    asked, name = about
    found = _THRESHOLD.findall(asked)
    above, below = _ABOVE.search(asked) is not None, _BELOW.search(asked) is not None
    if not vocab[name].countable or len(found) != 1 or above == below:
        return None
    value, unit = found[0]
    limit = float(value) * (10.0 if unit.lower().startswith("c") else 1.0)
    regions = instances(perceived, name)
    if not regions:
        return "no"
    largest = max(float(np.max(r.size_mm)) for r in regions)
    return "yes" if (largest > limit if above else largest < limit) else "no"


def closed_answer(question: str, perceived: Perceived, vocab: Mapping[str, Any] | None) -> str | None:
    """The answer the regions give to a closed question about a named finding, or None to keep the
    language model's: *how many* (:func:`count_answer`), *whether* (:func:`presence_answer`) and *larger
    than* (:func:`size_answer`), so these agree with the boxes of *where* by construction."""
    for answer in (count_answer, presence_answer, size_answer):
        value = answer(question, perceived, vocab)
        if value is not None:
            return value
    return None


def located_regions(perceived: Perceived, finding: str, vocab: Mapping[str, Any] | None,
                    condition_threshold: float = 0.5) -> list[Region]:
    """The regions a "where is it?" answer points at: a countable finding's instances (ordered by their
    first corner, as the training answers list boxes); for a condition called present, the organ it
    is a state of (both sides of a paired organ); none when the perception did not find it."""
    spec = as_vocab(vocab)[finding]
    if spec.countable:
        return sorted(instances(perceived, finding), key=lambda r: tuple(float(v) for v in r.box[:3]))
    if perceived.conditions.get(finding, 0.0) < condition_threshold:
        return []
    return [r for r in perceived.organs if organ_matches(r.name, spec.organ)]


def location_answer(question: str, answer: str, perceived: Perceived, vocab: Mapping[str, Any] | None,
                    shape: Sequence[int], keep_refusal: bool = False) -> str | None:
    """A "where is it?" answer that agrees with the perception, or None to keep ``answer``.

    For a question naming one vocabulary finding whose answer locates it (the language model wrote a
    ``<box>``, or the question asks where), the answer is one ``<box>[..]</box>`` per region of
    :func:`located_regions` (0..999 of the model input of ``shape``), or "There is no X." when the
    perception found none, so "whether", "where" and "how many" come from one list of regions.
    ``keep_refusal``: when none was found, keep the model's own answer (a caller that forced a box).
    """
    from preprocess.geometry import format_box, normalise_boxes

    vocab = as_vocab(vocab)
    name = finding_named(question, vocab)
    if name is None or ("<box>" not in answer and not asks_location(question)):
        return None
    regions = located_regions(perceived, name, vocab)
    if not regions:
        return None if keep_refusal else f"There is no {vocab[name].text}."
    boxes = normalise_boxes(np.stack([r.box for r in regions]), shape)
    return " ".join(format_box(b) for b in boxes)


def centre_mm(region: Region, spacing: Sequence[float]) -> np.ndarray:
    """Centre of a region's box in mm of the model-input frame ``(3,)``."""
    return (region.box[:3] + region.box[3:]) / 2 * np.asarray(spacing, dtype=np.float64)


def measure(query: Query, perceived: Perceived, vocab: Mapping[str, Any] | None,
            spacing: Sequence[float]) -> Measurement:
    """Answer ``query`` from ``perceived`` (``spacing``: mm per model-input voxel, for distances).

    A finding's measurement presumes its instances (one; two for a distance). Where fewer were found,
    the likeliest candidates below the finding threshold (``perceived.candidates``) stand in, and the
    answer says so (``tentative``); with none there is no value."""
    vocab = as_vocab(vocab)
    if query.finding is not None:
        spec = vocab[query.finding]
        found = instances(perceived, query.finding)
        need = 2 if query.kind == "distance" else 1
        unsure = [r for r in perceived.candidates if r.name == query.finding][:max(need - len(found), 0)]
        if len(found) + len(unsure) < need:  # not even a candidate below the threshold
            if not found:
                return Measurement(query, None, [], f"No {spec.text} is seen, so there is nothing to measure.")
            return Measurement(query, None, found[:1], f"Only one {spec.text} is seen.")
        hedge = _hedge(spec, found, unsure) if unsure else ""
        if query.kind == "distance":
            pair = [*found[:2], *unsure]
            d = float(np.linalg.norm(centre_mm(pair[0], spacing) - centre_mm(pair[1], spacing)))
            what = f"The two largest {spec.plural_text} are" if not unsure else "they are"
            return Measurement(query, d, pair, f"{hedge}{what} {d:.0f} mm apart (centre to centre).",
                               tentative=bool(unsure))
        big = found[0] if found else unsure[0]
        least, edge = _lower_bound(big)
        the = f"The largest {spec.text}" if not unsure else "it"
        if query.kind == "volume":
            return Measurement(query, big.volume_ml, [big],
                               f"{hedge}{the} has a volume of {least}{_ml(big.volume_ml)} mL{edge}.", bool(unsure))
        if query.kind == "length":
            v = float(size_triple(big.size_mm)[2])
            return Measurement(query, v, [big], f"{hedge}{the} is {least}{v:.0f} mm craniocaudally{edge}.", bool(unsure))
        v = float(size_triple(big.size_mm)[0])
        return Measurement(query, v, [big], f"{hedge}{the} measures {least}{v:.0f} mm "
                                            f"({size_text(big.size_mm)}){edge}.", bool(unsure))
    organ = next((r for r in perceived.organs if r.name == query.organ), None)
    name = organ_text(query.organ or "")
    if organ is None:
        return Measurement(query, None, [], f"The {name} is not seen in this volume.")
    least, edge = _lower_bound(organ)
    if query.kind == "volume":
        return Measurement(query, organ.volume_ml, [organ],
                           f"The {name} has a volume of {least}{_ml(organ.volume_ml)} mL{edge}.")
    v = float(size_triple(organ.size_mm)[2])
    return Measurement(query, v, [organ], f"The {name} measures {least}{v:.0f} mm craniocaudally{edge}.")


def _hedge(spec: FindingSpec, found: Sequence[Region], unsure: Sequence[Region]) -> str:
    """The opening of a measurement that reads candidates below the finding threshold: what was seen
    clearly, and which candidates stand in (their scores), so the number is not taken for a finding."""
    scores = " and ".join(f"{r.score:.2f}" for r in unsure)
    if found:
        return (f"Only one {spec.text} is seen clearly; with the likeliest second one (score {scores}, below the "
                "finding threshold): ")
    if len(unsure) > 1:
        return (f"No {spec.text} is seen clearly; the two likeliest candidates (scores {scores}, below the "
                "finding threshold): ")
    return f"No {spec.text} is seen clearly; the likeliest candidate (score {scores}, below the finding threshold): "


def _ml(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


#: What a measurement of a region that reaches the border of the volume says of itself.
EDGE_NOTE = " (it reaches the edge of the volume)"


def _lower_bound(region: Region) -> tuple[str, str]:
    """``("at least ", EDGE_NOTE)`` for a region cut by the border of the volume, else empty strings."""
    return ("at least ", EDGE_NOTE) if region.at_edge else ("", "")


def criterion_value(criterion: Criterion, region: Region) -> float:
    """The value of ``region`` a criterion compares (mm or mL)."""
    if criterion.measure == "volume":
        return float(region.volume_ml)
    t = size_triple(region.size_mm)
    return float(t[2] if criterion.measure == "craniocaudal" else t[0])


def call_conditions(perceived: Perceived, vocab: Mapping[str, Any] | None, labels: LabelSpec | None) -> Perceived:
    """``perceived`` with each condition that has a vocabulary criterion (``"craniocaudal > 120 mm"``)
    called by it on the perceived organ: probability 1.0 when it holds, 0.0 when it does not, the
    classifier's where a lower bound (an organ cut by the border of the volume) does not settle it.
    An organ the perception segments (a label of ``labels``) but did not find calls its condition
    0.0: there is no organ in the volume to be enlarged, and the classifier, which pools the organ's
    features, reads nothing there (on a volume of zeros it had said splenomegaly, 0.53). The
    criterion is what the export calls the condition by, so the presence answer, the digest, the
    report and the chain's conclusion agree; the classifier's probabilities stay in
    ``perceived.classifier``. Without a criterion, or an organ label to look for, the classifier's
    probability stands."""
    vocab = as_vocab(vocab)
    organs = list(labels.organs[1:]) if labels is not None else []
    calls = dict(perceived.conditions)
    for name in perceived.conditions:
        spec = vocab.get(name)
        criterion = parse_criterion(spec.criterion, where=f"finding {name!r}") if spec is not None else None
        label = _organ_label(spec.organ, organs) if criterion is not None else None
        if criterion is None or label is None:
            continue
        organ = next((r for r in perceived.organs if r.name == label), None)
        if organ is None:
            calls[name] = 0.0
            continue
        holds = criterion.holds(criterion_value(criterion, organ))
        if holds or not organ.at_edge:
            calls[name] = 1.0 if holds else 0.0
    if calls == perceived.conditions:
        return perceived
    return dataclasses.replace(perceived, conditions=calls, classifier=dict(perceived.conditions))


# ----------------------------------------------------------------------------- chains


@dataclasses.dataclass
class Step:
    """One checkable step of a chain."""

    kind: str  # "organ", "finding", "measure", "expert" or "conclusion"
    text: str
    box: np.ndarray | None = None  # (6,) model-input voxels, where the step has a place
    value: float | None = None  # a number, where the step has one
    unit: str = ""
    name: str = ""  # the organ label or finding the step is about
    call: dict[str, Any] | None = None  # an expert step: which model was asked what, and its result


@dataclasses.dataclass
class Chain:
    """The steps behind an answer and its conclusion (``present``: whether the finding is called)."""

    finding: str | None
    steps: list[Step]
    present: bool | None
    answer: str

    @property
    def conclusion(self) -> Step | None:
        return next((s for s in reversed(self.steps) if s.kind == "conclusion"), None)


def _organ_step(perceived: Perceived, organ: str | None) -> Step | None:
    region = next((r for r in perceived.organs if r.name == organ), None) if organ else None
    if region is None:
        return None
    return Step("organ", f"{organ_text(region.name)}: {size_text(region.size_mm)}, {_ml(region.volume_ml)} mL"
                         + _lower_bound(region)[1], region.box.copy(), region.volume_ml, "mL", region.name)


def reason(question: str, perceived: Perceived, vocab: Mapping[str, Any] | None, labels: LabelSpec | None,
           spacing: Sequence[float], condition_threshold: float = 0.5) -> Chain | None:
    """The chain of steps for a question about one vocabulary finding or one measurement, or None
    when the question names neither.

    Countable finding: organ -> each instance found (box, size) -> the largest one's measurement ->
    conclusion (present when one is found, and its measurement passes the finding's criterion if it
    has one). Condition: organ -> the organ's measurement -> conclusion by the criterion (or, without
    one, by the condition's probability). A measurement question adds its :func:`measure` step.
    """
    vocab = as_vocab(vocab)
    organs = list(labels.organs[1:]) if labels is not None else []
    query = parse_question(question, vocab, organs)
    finding = (query.finding if query is not None else None) or finding_named(question, vocab)
    if finding is None:
        if query is None:
            return None
        steps = [s for s in [_organ_step(perceived, query.organ)] if s is not None]
        return Chain(None, steps, None, _add_measurement(steps, measure(query, perceived, vocab, spacing)))
    spec: FindingSpec = vocab[finding]
    criterion = parse_criterion(spec.criterion, where=f"finding {finding!r}")
    organ_label = _organ_label(spec.organ, organs)
    steps: list[Step] = []
    if spec.countable:
        found = instances(perceived, finding)
        homes = list(dict.fromkeys(r.organ for r in found if r.organ)) or [organ_label]
        steps += [s for s in (_organ_step(perceived, o) for o in homes) if s is not None]
        if not found:
            steps.append(Step("finding", f"no {spec.text} found", name=finding, value=0.0))
        for i, r in enumerate(found, start=1):
            where = f" in the {organ_text(r.organ)}" if r.organ else ""
            steps.append(Step("finding", f"{spec.text} {i} of {len(found)}: {size_text(r.size_mm)}{where} "
                                         f"(score {r.score:.2f}){_lower_bound(r)[1]}", r.box.copy(),
                              float(size_triple(r.size_mm)[0]), "mm", finding))
        value = criterion_value(criterion, found[0]) if found and criterion else (
            float(size_triple(found[0].size_mm)[0]) if found else None)
        if found:
            what, unit = (criterion.measure, criterion.unit) if criterion else ("diameter", "mm")
            least, edge = _lower_bound(found[0])
            steps.append(Step("measure", f"largest {spec.text}: {what} {least}{value:.0f} {unit}{edge}",
                              found[0].box.copy(), value, unit, finding))
        if not found:
            present, why = False, f"no {spec.text} detected"
        elif criterion is not None:
            present = criterion.holds(value)
            why = _verdict(criterion, value, present, found[0])
        else:
            present, why = True, f"{len(found)} detected"
    else:
        organ_step = _organ_step(perceived, organ_label)
        if organ_step is not None:
            steps.append(organ_step)
        organ = next((r for r in perceived.organs if r.name == organ_label), None)
        p = float(perceived.classifier.get(finding, perceived.conditions.get(finding, 0.0)))
        if criterion is not None and organ is not None:
            value = criterion_value(criterion, organ)
            least, edge = _lower_bound(organ)
            steps.append(Step("measure", f"{organ_text(organ.name)} {criterion.measure} {least}{value:.0f} "
                                         f"{criterion.unit}{edge}", organ.box.copy(), value, criterion.unit, organ.name))
            present = criterion.holds(value)
            why = _verdict(criterion, value, present, organ)
            if finding in perceived.conditions and (p >= condition_threshold) != present:
                why += f"; the classifier {p:.2f} disagrees"
        else:  # the call of call_conditions where it made one (its organ not found), else the classifier's
            called = float(perceived.conditions.get(finding, p))
            present = called >= condition_threshold
            why = (f"no {organ_text(organ_label)} found" if called != p and organ_label else
                   f"probability {p:.2f} {'>=' if present else '<'} {condition_threshold:g}")
    steps.append(Step("conclusion", f"{why} -> {spec.text}: {'yes' if present else 'no'}",
                      value=float(present), name=finding))
    answer = f"{spec.text.capitalize()}: {'yes' if present else 'no'} ({why})."
    if query is not None:
        answer = _add_measurement(steps, measure(query, perceived, vocab, spacing))
    return Chain(finding, steps, present, answer)


def _add_measurement(steps: list[Step], m: Measurement) -> str:
    """Put a measurement's step before the conclusion (unless a step already has its value); its answer."""
    if m.value is not None and not any(s.kind == "measure" and s.value == m.value for s in steps):
        q = m.query
        box = m.regions[0].box.copy() if q.kind != "distance" and m.regions else None
        at = len(steps) - 1 if steps and steps[-1].kind == "conclusion" else len(steps)
        steps.insert(at, Step("measure", m.text.rstrip("."), box, m.value, q.unit, q.finding or q.organ or ""))
    return m.text


def _verdict(criterion: Criterion, value: float, holds: bool, region: Region) -> str:
    """``"168 mm > 120 mm"`` / ``"100 mm <= 120 mm"``, saying when the value is only a lower bound that
    does not settle it (a region cut by the border that does not pass a ``>`` threshold)."""
    op = criterion.op if holds else {">": "<=", ">=": "<", "<": ">=", "<=": ">"}[criterion.op]
    text = f"{value:.0f} {criterion.unit} {op} {criterion.value:g} {criterion.unit}"
    if region.at_edge and (holds != (criterion.op in (">", ">="))):
        text += " (a lower bound: it reaches the edge of the volume)"
    return text


__all__ = [
    "PERCEPTION_TASKS", "QUERY_UNITS", "QUESTION_TEMPLATES", "Chain", "Measurement", "Query", "Step", "asks_location",
    "centre_mm", "closed_answer", "count_answer", "criterion_value", "instances", "located_regions",
    "location_answer", "measure", "measured_organs", "organ_named", "parse_question", "presence_answer", "reason",
    "size_answer", "truth_queries",
]
