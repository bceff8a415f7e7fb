"""A generated report made to agree with what the perception found (numpy-free text work).

The language model writes the report after reading the findings digest; measured on the benchmark
(docs/benchmarks/quality.md, round 6), its reports agreed with the digest on 0.74 of the finding
slots while the digest agreed with the reference on 0.87: the prose was the weak link. As closed
answers take their value from the regions and a ``<box>`` takes the box of the region it points
at, :func:`reconcile_report` keeps the model's sentences that agree with the perception, drops the
ones that assert a finding it did not find or deny one it found, and adds a sentence, built from
the regions (count, size, organ), for each perceived finding the report leaves out. Every number
a report states is one the perception measured of what its sentence is about (a small LM copies
the digest's numbers into the wrong places and strings them into fragments: "1. 2. 2 mm. 24 mm.").
Region-guided report generation (RGRG, Reg2RG) writes from detected regions in the same spirit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vol3d.tasks.findings import as_vocab, coarse_organ, organ_matches
from vol3d.tasks.mentions import finding_mentions
from vol3d.tasks.reasoning import instances
from vol3d.tasks.regions import Perceived, Region, organ_text, perceived_present, size_triple

_REQUEST = re.compile(r"\b(?:report|findings|impression)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?;])(\s+)")
_IMPRESSION = re.compile(r"^\s*impression\b", re.I | re.M)
# a section header ("IMPRESSION:", "Findings:"), not an organ's label ("Liver: unremarkable.")
_HEADER = re.compile(r"^\s*((?:findings|impression|conclusions?|summary|assessment)\s*:)", re.I)
# a word written twice in a row ("the adrenal glands glands are"): a small LM's stutter
_STUTTER = re.compile(r"\b([A-Za-z]{2,})(?:\s+\1\b)+", re.I)
# a box the LM wrote into a report ("<box>[546,406,656,609,484,780]</box> There are 3 ..."): reports are
# prose (training reports hold no boxes); where a finding is comes from a "where" answer
_BOX = re.compile(r"\s*<box>(?:\s*\[[^\]]*\])?(?:\s*</box>)?\s*")
# two sentences glued without a space ("No focal lesion.liver There is ..."); not "e.g." or "3.5"
_GLUED = re.compile(r"(?<=[a-z]{2})([.!?;])(?=[A-Za-z]{2})")
# the space a dropped box leaves before a full stop ("3.5 cm <box>." -> "3.5 cm .")
_SPACE_BEFORE_STOP = re.compile(r"\s+([.,;:!?])")
# a number standing alone ("31 x 28 mm", "3.5 cm"), not part of a name ("T2", "L1", "FLAIR2")
_NUMBER = re.compile(r"(?<![A-Za-z\d.])\d+(?:\.\d+)?(?![A-Za-z\d])")
# an untrained LM's token soup ("....alalalalmetricmetric", "BoBoBoBoQQQQ"): a unit of 2-4 letters written three
# times in a row inside a word, or one letter four times; no word of a report does that ("grade III" is three)
_SOUP = re.compile(r"([A-Za-z]{2,4})\1{2,}|([A-Za-z])\2{3,}")
# a word a sentence says something with ("No PE." has one); a fragment without one but units ("1.", "24 x 2.",
# "2 mm.") is a small LM's stray numbers
_WORD = re.compile(r"[A-Za-z]{2,}")
_UNITS = frozenset({"mm", "cm", "ml"})


def is_report_request(prompt: str) -> bool:
    """Whether a prompt asks for a report ("Write the findings ...", "... Write the report.")."""
    return bool(_REQUEST.search(prompt))


def finding_sentence(name: str, perceived: Perceived, vocab: Mapping[str, Any] | None) -> str:
    """One report sentence for a perceived finding, from its regions: count, largest size, organ."""
    spec = as_vocab(vocab)[name]
    found = instances(perceived, name)
    if not found:
        return f"{spec.text[:1].upper()}{spec.text[1:]} is present."
    long, short, _ = size_triple(found[0].size_mm)
    where = f" in the {organ_text(found[0].organ)}" if found[0].organ else ""
    if len(found) == 1:
        return f"There is a {spec.text} measuring {long} x {short} mm{where}."
    return f"There are {len(found)} {spec.plural_text}, the largest measuring {long} x {short} mm{where}."


def _region_numbers(r: Region) -> set[float]:
    """What the perception measured of one region: its size triple (mm) and volume (mL)."""
    return {float(v) for v in size_triple(r.size_mm)} | {float(round(r.volume_ml))}


def measured_numbers(sentence: str, said: Mapping[str, bool], perceived: Perceived,
                     vocab: Mapping[str, Any] | None) -> set[float]:
    """The numbers a report sentence may state: those the perception measured of what it talks about.

    Of each finding it asserts, the count and every instance's size and volume (a condition: its
    organ's); of each organ it names, that organ's size and volume; each also in cm."""
    vocab = as_vocab(vocab)
    nums: set[float] = set()
    for name, asserted in said.items():
        if not asserted or name not in vocab:
            continue
        if vocab[name].countable:
            found = instances(perceived, name)
            nums.add(float(len(found)))
            for r in found:
                nums |= _region_numbers(r)
        else:
            nums |= {v for r in perceived.organs if organ_matches(r.name, vocab[name].organ) for v in _region_numbers(r)}
    words = set(re.findall(r"[a-z]+", sentence.lower()))
    for r in perceived.organs:
        if set(coarse_organ(r.name).split()) <= words:
            nums |= _region_numbers(r)
    return nums | {round(v / 10.0, 1) for v in nums}


def _says_something(sentence: str) -> bool:
    """Whether a sentence has a word other than a unit (not a fragment of numbers such as "24 x 2 mm.")."""
    return any(w.lower() not in _UNITS for w in _WORD.findall(sentence))


def reconcile_report(report: str, perceived: Perceived, vocab: Mapping[str, Any] | None,
                     threshold: float = 0.5) -> str:
    """``report`` made to say what the perception found, in sentences (see the module docstring).

    Dropped: a sentence that contradicts the perception (asserts a finding it did not find or denies
    one it found), one that states a number the perception did not measure of what the sentence is
    about (:func:`measured_numbers`: every count, size and volume in the report is one of the
    regions'), a fragment (no word but units: "1.", "24 x 2 mm."; or starting in lower case), a
    sentence said before, token soup (``....alalalalmetricmetric``, what an untrained LM writes). Added: a sentence, from the regions, for each perceived finding the report
    no longer asserts (before the impression when there is one); "No significant findings." when
    nothing is left. A word written twice in a row is written once, a box the LM wrote into it is
    dropped and sentences it glued together ("lesion.liver") are parted."""
    vocab = as_vocab(vocab)
    present = perceived_present(perceived, threshold)
    text = _SPACE_BEFORE_STOP.sub(r"\1", _GLUED.sub(r"\1 ", _BOX.sub(" ", report))).strip()
    parts = _SENTENCE_END.split(_STUTTER.sub(r"\1", text))  # sentence, whitespace, sentence, ...
    kept: list[str] = []
    seen: set[str] = set()
    for i in range(0, len(parts), 2):
        sentence, gap = parts[i], parts[i + 1] if i + 1 < len(parts) else ""
        said = finding_mentions(sentence, vocab)
        key = " ".join(re.findall(r"[a-z0-9.]+", sentence.lower())).strip(". ")
        header = _HEADER.match(sentence)  # "IMPRESSION: Simple renal cyst." keeps its section
        body = sentence[header.end():] if header is not None else sentence
        numbers = {float(v) for v in _NUMBER.findall(body)}
        if (any(asserted != (name in present) for name, asserted in said.items()) or not _says_something(body)
                or body.lstrip()[:1].islower() or key in seen or _SOUP.search(body)
                or not numbers <= measured_numbers(body, said, perceived, vocab)):
            if header is not None:
                kept += [header.group(1), " "]
            continue
        seen.add(key)
        kept += [sentence, gap]
    text = "".join(kept).strip()
    asserted = {n for n, a in finding_mentions(text, vocab).items() if a}
    missing = [finding_sentence(n, perceived, vocab) for n in vocab if n in present and n not in asserted]
    m = _IMPRESSION.search(text)
    if m is not None and not _HEADER.sub("", text[m.start():]).strip():  # an impression left empty
        names = [vocab[n].text for n in vocab if n in present]
        text = text + " " + ("; ".join(names).capitalize() + "." if names else "No significant findings.")
    if not missing:
        return text or "No significant findings."
    added = " ".join(missing)
    if m is not None:
        return f"{text[: m.start()].rstrip()} {added}\n{text[m.start():].lstrip()}".strip()
    return f"{text} {added}".strip()


__all__ = ["finding_sentence", "is_report_request", "measured_numbers", "perceived_present", "reconcile_report"]
