"""Which findings a report asserts: a rule-based, negation-aware reader (NegEx style).

:func:`extract_findings` is what the report metric compares (vol3d.eval.metrics.finding_f1), what
the reinforcement reward checks (vol3d.train.rl) and what reconciles a generated report with the
perception (:mod:`vol3d.tasks.reports`), so all three read a report the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vol3d.tasks.findings import FindingSpec, as_vocab

# NegEx-style cues. A pre-cue negates mentions in the following words of its clause; a
# post-cue negates the mention just before it. Pseudo-negations ("no change") are not cues.
_PRE_NEG = (
    "no evidence of",
    "no signs of",
    "no sign of",
    "negative for",
    "free of",
    "absence of",
    "without",
    "no",
    "not",
    "nor",
    "neither",
    "never",
    "denies",
)
_POST_NEG = (
    "is not seen",
    "are not seen",
    "not seen",
    "not identified",
    "not present",
    "is absent",
    "are absent",
    "unremarkable",
    "ruled out",
    "excluded",
    "resolved",
    "has resolved",
)
_PSEUDO_NEG = (
    "no change",
    "no significant change",
    "no interval change",
    "not only",
    "no increase",
    "not changed",
)
# words that end a pre-cue's scope: a contrast, or a new measured/indefinite object
_SCOPE_END = {"but", "however", "although", "though", "whereas", "while", "except", "apart", "a", "an"}
_PRE_WINDOW = 8  # words after a pre-cue that it can negate (NegEx uses 5-6; lists need a few more)
_POST_WINDOW = 3  # words between a mention and a post-cue
_NEAR = 10  # a noun and an organ word count as one mention when at most this many words apart
_CLAUSE = re.compile(r"[;\n!?]|\.(?!\d)")  # sentence/clause ends; "1.5" is not one; "Liver: ..." stays whole


def _term_re(term: str) -> re.Pattern:
    """Whole-word, plural-tolerant, whitespace-flexible pattern for a vocabulary term."""
    words = [re.escape(w) for w in term.lower().split()]
    last = words[-1]
    if last.endswith("y"):
        last = last[:-1] + "(?:y|ies)"
    elif last.endswith("is"):  # metastasis -> metastases
        last = last[:-2] + "(?:is|es)"
    else:
        last += "(?:s|es)?"
    return re.compile(r"\b" + r"\s+".join([*words[:-1], last]) + r"\b")


def _spans(clause: str, terms: Sequence[str]) -> list[tuple[int, int]]:
    return [m.span() for t in terms for m in _term_re(t).finditer(clause)]


def _word_index(clause: str) -> np.ndarray:
    """Word number of every character of ``clause`` (commas count as a word, to stop post-cues)."""
    idx = np.zeros(len(clause) + 1, dtype=int)
    n = 0
    for m in re.finditer(r"[a-z0-9]+(?:\.\d+)?|,", clause):
        idx[m.start() :] = n
        n += 1
    idx[len(clause)] = n
    return idx


_SUBPHRASE = re.compile(r",|\b(?:and|or|with|but)\b")
_PART_OF = re.compile(r"\s+of\s+(?:the\s+)?[a-z]")  # "lobe of the liver": the lobe names no organ of its own


def _mentions(clause: str, spec: FindingSpec, other_organ_words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the finding's mentions in one clause.

    A noun attaches to the nearest organ word (of the whole vocabulary) in its
    sub-phrase (split at commas and and/or/with/but), or in the clause when its
    sub-phrase names no organ; it is a mention of ``spec`` when that organ word is
    one of ``spec.organ_words`` and at most ``_NEAR`` words away. So "renal lesion and
    hepatic cyst" is neither a liver lesion nor a kidney cyst. Organ words followed by
    "of (the)" ("lobe of the liver") are parts, not organs, and are skipped.
    """
    wi = _word_index(clause)
    found = _spans(clause, spec.phrases)

    def organ_spans(terms: Sequence[str]) -> list[int]:
        return [a for a, b in _spans(clause, terms) if not _PART_OF.match(clause, b)]

    own, other = organ_spans(spec.organ_words), organ_spans(other_organ_words)
    cuts = [0, *(m.start() for m in _SUBPHRASE.finditer(clause)), len(clause) + 1]
    for s, e in _spans(clause, spec.nouns):
        lo, hi = max(c for c in cuts if c <= s), min(c for c in cuts if c > s)
        if any(lo <= a < hi for a in own + other):  # the sub-phrase names an organ: use it alone
            own_s, other_s = [a for a in own if lo <= a < hi], [a for a in other if lo <= a < hi]
        else:
            own_s, other_s = own, other
        d_own = min((abs(wi[s] - wi[a]) for a in own_s), default=_NEAR + 1)
        d_other = min((abs(wi[s] - wi[a]) for a in other_s), default=_NEAR + 1)
        if d_own <= _NEAR and d_own <= d_other:
            found.append((s, e))
    return found


def _negated(clause: str, span: tuple[int, int]) -> bool:
    wi = _word_index(clause)
    words = re.findall(r"[a-z0-9]+(?:\.\d+)?|,", clause)
    start, end = wi[span[0]], wi[max(span[1] - 1, span[0])]
    for cue in _PRE_NEG:
        for m in re.finditer(r"\b" + re.escape(cue) + r"\b", clause):
            c_end = wi[m.end() - 1]
            if not (c_end < start <= c_end + _PRE_WINDOW):
                continue
            between = [w for w in words[c_end + 1 : start] if w != ","]
            if not any(w in _SCOPE_END or w[0].isdigit() for w in between):
                return True
    for cue in _POST_NEG:
        for m in re.finditer(r"\b" + re.escape(cue) + r"\b", clause):
            c_start = wi[m.start()]
            if end < c_start <= end + _POST_WINDOW and "," not in words[end + 1 : c_start]:
                return True
    return False


def extract_findings(text: str, vocab: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """Which findings a report asserts: ``{finding: present}`` for every finding of ``vocab``.

    A finding is mentioned by one of its ``phrases``, or by one of its ``nouns`` within a
    few words of one of its ``organ_words`` in the same clause. It is present when at
    least one mention is not negated ("No liver lesion", "without renal cyst", "nodule
    is not seen"); not mentioned means absent ("The spleen is unremarkable"). Hedged
    mentions ("possible liver lesion") count as present.
    """
    vocab = as_vocab(vocab)
    return {name: finding_mentions(text, vocab).get(name, False) for name in vocab}


def finding_mentions(text: str, vocab: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """The findings a text mentions, each with whether it asserts it (True: some mention not negated)
    or denies it (False: every mention negated); findings not mentioned are left out."""
    vocab = as_vocab(vocab)
    out: dict[str, bool] = {}
    lowered = text.lower()
    for pseudo in _PSEUDO_NEG:
        lowered = re.sub(r"\b" + re.escape(pseudo) + r"\b", " ", lowered)
    organ_words = {
        n: [w for o, sp in vocab.items() if o != n for w in sp.organ_words if w not in spec.organ_words]
        for n, spec in vocab.items()
    }
    for clause in _CLAUSE.split(lowered):
        for name, spec in vocab.items():
            if out.get(name):
                continue
            spans = _mentions(clause, spec, organ_words[name])
            if spans:
                out[name] = any(not _negated(clause, sp) for sp in spans)
    return out


__all__ = ["extract_findings", "finding_mentions"]
