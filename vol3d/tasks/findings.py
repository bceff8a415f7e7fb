"""Finding vocabularies: what a finding is called, where it lives, and how reports mention it.

A vocabulary is a plain ``dict[str, FindingSpec]`` keyed by the finding name used in
the cache's ``box_findings`` strings (e.g. ``"liver_lesion"``). The same vocabulary
drives the instruction templates (:mod:`vol3d.tasks.samples`) and the rule-based
report finding extractor (:func:`vol3d.eval.metrics.extract_findings`), so training
questions and evaluation read findings the same way.

:data:`DEFAULT_VOCAB` describes the synthetic data of ``vol3d synth``. Real users
pass their own, in Python or as a JSON/YAML file (see ``docs/tasks_and_metrics.md``)::

    {"pneumothorax": {"text": "pneumothorax", "organ": "lung", "countable": false,
                      "phrases": ["pneumothorax"]},
     "adrenal_nodule": {"text": "adrenal nodule", "organ": "adrenal",
                        "nouns": ["nodule", "mass"], "organ_words": ["adrenal"],
                        "code": "E27.8"}}
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from preprocess.errors import ConfigError, InputError

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A threshold a finding is called by, e.g. ``craniocaudal > 120 mm`` (splenomegaly) or
    ``diameter >= 6 mm`` (a lung nodule worth reporting)."""

    measure: str  # "diameter" (long axial extent), "craniocaudal" or "volume"
    op: str  # ">", ">=", "<", "<="
    value: float
    unit: str  # "mm" or "mL"

    def holds(self, x: float) -> bool:
        return bool(_OPS[self.op](x, self.value))

    def __str__(self) -> str:
        return f"{self.measure} {self.op} {self.value:g} {self.unit}"


def parse_criterion(text: str, where: str = "criterion") -> Criterion | None:
    """``"craniocaudal > 120 mm"`` -> :class:`Criterion`; ``""`` -> None."""
    if not text or not text.strip():
        return None
    m = re.fullmatch(r"\s*(diameter|craniocaudal|volume)\s*(>=|<=|>|<)\s*([0-9]+(?:\.[0-9]+)?)\s*(mm|ml|mL)\s*",
                     text)
    if m is None:
        raise ConfigError(f"{where}: {text!r} is not a criterion; write '<diameter|craniocaudal|volume> "
                          "<op> <number> <mm|mL>', e.g. 'craniocaudal > 120 mm'")
    measure, op, value, unit = m.groups()
    unit = "mL" if unit.lower() == "ml" else "mm"
    if (measure == "volume") != (unit == "mL"):
        raise ConfigError(f"{where}: {text!r}: a volume is in mL, a diameter or length in mm")
    return Criterion(measure, op, float(value), unit)


@dataclasses.dataclass(frozen=True)
class FindingSpec:
    """How one finding type is named in questions and recognised in report text."""

    text: str  # noun phrase used in questions and answers, e.g. "liver lesion"
    organ: str  # coarse organ it lives in, the canonical answer of "which organ" questions
    nouns: tuple[str, ...] = ()  # head nouns that count as a mention when an organ word is near
    organ_words: tuple[str, ...] = ()  # organ words that must appear near a noun ("liver", "hepatic")
    phrases: tuple[str, ...] = ()  # phrases that are a mention on their own ("splenomegaly")
    countable: bool = True  # False for conditions ("splenomegaly"): no count/size questions
    plural: str = ""  # plural of ``text``; empty means ``text + "s"``
    code: str = ""  # ICD-10 code that usually accompanies the finding (model.ehr_finding_prior: that code reads its score)
    # threshold the finding is called by, e.g. "craniocaudal > 120 mm" (splenomegaly, on its organ) or
    # "diameter >= 6 mm"; reasoning chains state it (:func:`parse_criterion`); "" none
    criterion: str = ""

    def __post_init__(self) -> None:
        if not self.text or not self.organ:
            raise ConfigError("a finding needs a non-empty 'text' and 'organ'")
        if not self.phrases and not (self.nouns and self.organ_words):
            raise ConfigError(
                f"finding {self.text!r}: give 'phrases', or both 'nouns' and 'organ_words', "
                "so reports can be searched for it"
            )
        parse_criterion(self.criterion, where=f"finding {self.text!r}")

    @property
    def plural_text(self) -> str:
        """Plural noun phrase ("liver lesions")."""
        return self.plural or (self.text + "s")

    @property
    def head_noun(self) -> str:
        """The organ-free noun ("lesion") used in "In which organ is the lesion?"."""
        return self.nouns[0] if self.nouns else self.text


FindingVocab = dict[str, FindingSpec]

#: The findings of the synthetic data written by ``vol3d synth`` (its ``vocab.json``; defined once,
#: in ``vol3d.synth.reports.VOCAB_FINDINGS``). Only the demo and tests rely on it: a run reads
#: its vocabulary from the cache's ``vocab.json`` or ``data.vocab``.
DEFAULT_VOCAB: FindingVocab = {}


def as_vocab(obj: Mapping[str, Any] | None, where: str = "finding vocabulary") -> FindingVocab:
    """Coerce ``None`` (-> :data:`DEFAULT_VOCAB`), a dict of specs, or a dict of plain dicts."""
    if obj is None:
        return DEFAULT_VOCAB
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"{where}: expected a non-empty mapping finding -> spec, got {type(obj).__name__}")
    out: FindingVocab = {}
    fields = {f.name for f in dataclasses.fields(FindingSpec)}
    for name, spec in obj.items():
        if isinstance(spec, FindingSpec):
            out[str(name)] = spec
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: finding {name!r} must be a mapping of {sorted(fields)}")
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ConfigError(
                f"{where}: finding {name!r} has unknown keys {unknown}; valid keys are {sorted(fields)}"
            )
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.items()}
        try:
            out[str(name)] = FindingSpec(**kw)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: finding {name!r}: {exc}") from None
    return out


def _synthetic_vocab() -> FindingVocab:
    from vol3d.synth.reports import VOCAB_FINDINGS

    return as_vocab(VOCAB_FINDINGS, where="vol3d.synth.reports.VOCAB_FINDINGS")


def load_vocab(path: str | Path) -> FindingVocab:
    """Read a vocabulary from a ``.json`` or ``.yaml`` file (mapping finding -> spec fields)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"finding vocabulary {path} does not exist; pass a JSON or YAML file")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InputError(f"finding vocabulary {path} could not be parsed: {exc}") from None
    return as_vocab(data, where=str(path))


def coarse_organ(organ: str) -> str:
    """``"kidney_left"`` / ``"left kidney"`` -> ``"kidney"``: laterality-free organ name."""
    words = organ.lower().replace("_", " ").split()
    return " ".join(w for w in words if w not in ("left", "right")) or organ.lower()


def finding_named(question: str, vocab: Mapping[str, FindingSpec]) -> str | None:
    """The one vocabulary finding a question names (its text, plural or phrases, as whole words), or
    None when it names none or several ("Is there a liver lesion?" -> ``"liver_lesion"``)."""

    q = " " + re.sub(r"[^a-z0-9]+", " ", question.lower()) + " "
    named = {name for name, spec in vocab.items()
             for form in (spec.text, spec.plural_text, *spec.phrases)
             if form and f" {re.sub(r'[^a-z0-9]+', ' ', form.lower()).strip()} " in q}
    return named.pop() if len(named) == 1 else None


def organ_in(label: str, organs: Iterable[str]) -> str:
    """The organ of ``organs`` (vocabulary organ names) that a label name is a part of, by words:
    ``"ren_sinister"`` with organs ``{"ren", "hepar"}`` -> ``"ren"``, ``"kidney_left"`` -> ``"kidney"``
    (the longest match); :func:`coarse_organ` of the label when none matches. Exports name the sides
    of paired organs in their own language, so no list of laterality words is assumed."""
    words = set(label.lower().replace("_", " ").split())
    hits = [o for o in organs if o and set(o.lower().replace("_", " ").split()) <= words]
    return max(hits, key=lambda o: (len(o.split()), len(o))) if hits else coarse_organ(label)



def organ_matches(label: str, organ: str) -> bool:
    """Whether the label name ``label`` is vocabulary organ ``organ`` or one side of it (``"kidney_left"``
    of ``"kidney"``, ``"ren_sinister"`` of ``"ren"``)."""
    return coarse_organ(label) == coarse_organ(organ) or organ_in(label, [organ]) == organ

DEFAULT_VOCAB.update(_synthetic_vocab())
