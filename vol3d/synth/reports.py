"""Radiology report text and ICD-10 codes for synthetic cases.

:data:`FINDINGS` is the vocabulary shared with evaluation code: for each finding type,
the organ label(s) it lives in, its ICD-10 code, and the nouns and organ words that
every report sentence about it contains (so a keyword extractor can find it).
Negative statements start with "No", or say "unremarkable" / "without".

Sizes in reports are integers in mm taken from the finding's mask in the primary
series (see :func:`finding_sizes`): lesions give the axial extent ``long x short``
(the larger and smaller of the world-box extents along x and y); splenomegaly gives
the craniocaudal length (world-box extent along z).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Finding vocabulary. ``organs``: label names the finding lies in; ``measure``: what the report size is.
FINDINGS: dict[str, dict] = {
    "liver_lesion": {
        "text": "liver lesion",
        "organ": "liver",
        "organs": ("liver",),
        "code": "K76.89",
        "code_description": "Other specified diseases of liver",
        "nouns": ("lesion", "mass", "hypodensity"),
        "organ_words": ("liver", "hepatic"),
        "measure": "axial",
        "probability": 0.35,  # weight when an abnormal study draws its finding types
        "counts": (1, 1, 1, 2, 3),  # instances per study, drawn uniformly from these
    },
    "lung_nodule": {
        "text": "lung nodule",
        "organ": "lung",
        "organs": ("lung_left", "lung_right"),
        "code": "R91.1",
        "code_description": "Solitary pulmonary nodule",
        "nouns": ("nodule",),
        "organ_words": ("lung", "pulmonary", "lobe"),
        "measure": "axial",
        "probability": 0.3,  # weight when an abnormal study draws its finding types
        "counts": (1, 1, 1, 2, 3),  # instances per study, drawn uniformly from these
    },
    "kidney_cyst": {
        "text": "kidney cyst",
        "organ": "kidney",
        "organs": ("kidney_left", "kidney_right"),
        "code": "N28.1",
        "code_description": "Cyst of kidney, acquired",
        "nouns": ("cyst",),
        "organ_words": ("kidney", "renal"),
        "measure": "axial",
        "probability": 0.2,  # weight when an abnormal study draws its finding types
        "counts": (1, 1, 2),  # instances per study, drawn uniformly from these
    },
    "splenomegaly": {
        "text": "splenomegaly",
        "organ": "spleen",
        "organs": ("spleen",),
        "code": "R16.1",
        "code_description": "Splenomegaly, not elsewhere classified",
        "nouns": ("splenomegaly", "enlarged spleen"),
        "organ_words": ("spleen", "splenic"),
        "measure": "craniocaudal",
        "probability": 0.15,  # weight when an abnormal study draws its finding types
        "counts": (1,),  # instances per study, drawn uniformly from these
    },
}

#: How the synthetic reports name each finding, as a vocabulary file's ``findings`` entry (the fields of
#: ``vol3d.tasks.FindingSpec``): the question text, the organ, and the words a report uses for it.
VOCAB_FINDINGS: dict[str, dict] = {
    "liver_lesion": {"text": "liver lesion", "organ": "liver", "nouns": ["lesion", "mass", "hypodensity", "metastasis"],
                     "organ_words": ["liver", "hepatic"], "code": "K76.89"},
    "lung_nodule": {"text": "lung nodule", "organ": "lung", "nouns": ["nodule", "opacity"],
                    "organ_words": ["lung", "pulmonary", "lobe"], "code": "R91.1"},
    "kidney_cyst": {"text": "kidney cyst", "organ": "kidney", "nouns": ["cyst"], "organ_words": ["kidney", "renal"],
                    "code": "N28.1"},
    "splenomegaly": {"text": "splenomegaly", "organ": "spleen", "nouns": ["enlarged", "enlargement"],
                     "organ_words": ["spleen", "splenic"], "phrases": ["splenomegaly"], "countable": False,
                     "code": "R16.1", "criterion": "craniocaudal > 120 mm"},
}


def vocabulary(labels: Sequence[str], findings: Mapping[str, dict] | None = None,
               vocab_findings: Mapping[str, dict] | None = None) -> dict:
    """The export's ``vocab.json`` (``vol3d preprocess --vocab``): findings, label names (by value) and
    the label that marks finding voxels. ``findings``/``vocab_findings`` default to the abdomen's."""
    findings = FINDINGS if findings is None else findings
    vocab_findings = VOCAB_FINDINGS if vocab_findings is None else vocab_findings
    if set(vocab_findings) != set(findings):
        raise ValueError("every synthetic finding needs a vocabulary entry")
    return {"findings": dict(vocab_findings), "labels": list(labels), "finding_labels": ["lesion"],
            "codes": {f["code"]: f["code_description"] for f in findings.values()} | dict(NOISE_CODES)}


#: Unrelated chronic diagnoses added to patients' EHR codes as noise: code -> description.
NOISE_CODES: dict[str, str] = {
    "I10": "Essential (primary) hypertension",
    "E11.9": "Type 2 diabetes mellitus without complications",
    "E78.5": "Hyperlipidemia, unspecified",
    "J45.909": "Unspecified asthma, uncomplicated",
    "K21.9": "Gastro-esophageal reflux disease without esophagitis",
    "M54.5": "Low back pain",
    "F32.9": "Major depressive disorder, single episode, unspecified",
    "E66.9": "Obesity, unspecified",
    "Z87.891": "Personal history of nicotine dependence",
}

NUMBER_WORDS = {2: "Two", 3: "Three"}


def finding_sizes(kind: str, size_mm: Sequence[float], findings: Mapping[str, dict] | None = None,
                  volume_ml: float | None = None) -> list[int]:
    """Report sizes (integers) of a finding from its world-box extent ``(dx, dy, dz)``.

    Lesions: ``[long, short]`` axial extent (mm); splenomegaly: ``[craniocaudal]`` (mm); a finding
    measured by volume (hydrocephalus): ``[volume_ml]`` (mL).
    """
    dx, dy, dz = (float(v) for v in size_mm)
    measure = (FINDINGS if findings is None else findings)[kind]["measure"]
    if measure == "craniocaudal":
        return [int(round(dz))]
    if measure == "volume":
        if volume_ml is None:
            raise ValueError(f"{kind} is reported by volume: pass volume_ml")
        return [int(round(volume_ml))]
    return [int(round(max(dx, dy))), int(round(min(dx, dy)))]


def dims(sizes: Sequence[int], rng: np.random.Generator) -> str:
    long_, short = sizes
    return str(rng.choice([f"{long_} x {short} mm", f"{long_} x {short} mm", f"up to {long_} x {short} mm"]))


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _side(organ: str) -> str:
    return "left" if organ.endswith("_left") else "right"


def _liver(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(
            rng,
            [
                "The liver is normal in size and attenuation. No focal hepatic lesion.",
                "Liver: unremarkable, without focal lesion.",
                "No focal liver lesion is identified.",
            ],
        ), []
    parts, impressions = [], []
    if len(items) == 1:
        it = items[0]
        parts.append(
            pick(
                rng,
                [
                    "There is a well-defined hypodense lesion in the {lobe} hepatic lobe measuring {d}.",
                    "A {d} hypoattenuating mass is seen in the {lobe} lobe of the liver.",
                    "Hypodensity in the {lobe} liver lobe, measuring {d}, likely a hemangioma.",
                ],
            ).format(lobe=it["lobe"], d=dims(it["sizes"], rng))
        )
        impressions.append(
            pick(
                rng,
                [
                    "{l} mm hypodense liver lesion, indeterminate.",
                    "Indeterminate {l} mm hepatic lesion; consider MRI.",
                ],
            ).format(l=it["sizes"][0])
        )
    else:
        listed = " and ".join(f"{it['sizes'][0]} x {it['sizes'][1]} mm" for it in items)
        parts.append(
            pick(
                rng,
                [
                    "{n} hypodense liver lesions are present, measuring {dims}.",
                    "{n} hypoattenuating hepatic lesions measuring {dims}.",
                ],
            ).format(n=NUMBER_WORDS[len(items)], dims=listed)
        )
        largest = max(it["sizes"][0] for it in items)
        impressions.append(f"Multiple hypodense liver lesions, the largest {largest} mm.")
    return " ".join(parts), impressions


def _lateral(
    items: list[dict], rng: np.random.Generator, normal: Sequence[str], finding: Sequence[str], impression: Sequence[str]
) -> tuple[str, list[str]]:
    """Report text of a finding in a paired organ (lungs, kidneys): one sentence and one
    impression per item, with its side; ``normal`` when there is none."""
    if not items:
        return pick(rng, normal), []
    parts, impressions = [], []
    for it in items:
        side = _side(it["organ"])
        parts.append(pick(rng, finding).format(s=side, d=dims(it["sizes"], rng)))
        impressions.append(
            pick(rng, impression).format(l=it["sizes"][0], s=side, s_cap=side.capitalize())
        )
    return " ".join(parts), impressions


def _lungs(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    return _lateral(
        items,
        rng,
        normal=(
            "The lung bases are clear. No pulmonary nodule.",
            "Visualized lungs are unremarkable without nodule or consolidation.",
            "No suspicious lung nodule in the imaged lungs.",
        ),
        finding=(
            "A solid nodule in the {s} lower lobe measures {d}.",
            "There is a {d} solid pulmonary nodule in the {s} lower lobe.",
            "Noncalcified nodule at the {s} lung base, measuring {d}.",
        ),
        impression=(
            "{l} mm {s} lower lobe pulmonary nodule; follow-up CT recommended.",
            "{s_cap} lung nodule, {l} mm.",
        ),
    )


def _kidneys(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    return _lateral(
        items,
        rng,
        normal=(
            "The kidneys enhance symmetrically without hydronephrosis or cyst.",
            "Kidneys: unremarkable.",
            "No renal cyst or mass. No hydronephrosis.",
        ),
        finding=(
            "Simple cyst in the {s} kidney measuring {d}.",
            "There is a {d} fluid-attenuation cyst arising from the {s} kidney (Bosniak I).",
            "A simple-appearing {s} renal cyst measures {d}.",
        ),
        impression=(
            "{l} mm simple {s} renal cyst, no follow-up needed.",
            "{s_cap} kidney cyst ({l} mm), benign.",
        ),
    )


def _spleen(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(
            rng, ["The spleen is normal in size.", "Spleen: unremarkable.", "No splenomegaly; normal spleen."]
        ), []
    length = items[0]["sizes"][0]
    text = pick(
        rng,
        [
            "The spleen is enlarged, measuring {l} mm in craniocaudal length.",
            "Splenomegaly with a craniocaudal splenic length of {l} mm.",
            "Enlarged spleen ({l} mm craniocaudal).",
        ],
    ).format(l=length)
    return text, [
        pick(rng, ["Splenomegaly ({l} mm).", "Enlarged spleen, {l} mm craniocaudal."]).format(l=length)
    ]


_OTHER = (
    "The aorta is normal in caliber.",
    "No lymphadenopathy.",
    "Osseous structures are unremarkable.",
    "No free fluid.",
    "The pancreas and adrenal glands are unremarkable.",
)


def write_report(findings: Sequence[dict], rng: np.random.Generator) -> tuple[str, str]:
    """``(findings text, impression)`` of one study.

    Args:
        findings: dicts with ``finding`` (a :data:`FINDINGS` key), ``organ`` (label name),
            ``sizes`` (from :func:`finding_sizes`) and, for liver lesions, ``lobe``.
    """
    by_kind = {k: [f for f in findings if f["finding"] == k] for k in FINDINGS}
    sections = [
        _lungs(by_kind["lung_nodule"], rng),
        _liver(by_kind["liver_lesion"], rng),
        _spleen(by_kind["splenomegaly"], rng),
        _kidneys(by_kind["kidney_cyst"], rng),
    ]
    return assemble_report(sections, _OTHER, ("No acute abnormality.", "Unremarkable examination of the chest and "
                                              "abdomen.", "No significant findings."), rng)


def assemble_report(sections: Sequence[tuple[str, list[str]]], others: Sequence[str], normal: Sequence[str],
                    rng: np.random.Generator) -> tuple[str, str]:
    """``(findings text, impression)`` from per-organ ``(text, impressions)`` sections, one to three of the
    ``others`` sentences, and one of the ``normal`` impressions when no section has one (numbered when
    several do)."""
    extra = [str(s) for s in rng.permutation(list(others))[: int(rng.integers(1, 4))]]
    text = " ".join([s for s, _ in sections] + extra)
    impressions = [i for _, imp in sections for i in imp]
    if not impressions:
        impression = pick(rng, normal)
    elif len(impressions) == 1:
        impression = impressions[0]
    else:
        impression = " ".join(f"{n}. {s}" for n, s in enumerate(impressions, start=1))
    return text, impression


def patient_codes(kinds: Sequence[str], rng: np.random.Generator,
                  findings: Mapping[str, dict] | None = None) -> list[tuple[str, str]]:
    """ICD-10 ``(code, description)`` rows for a patient: one per finding type, plus 0-3 noise codes."""
    findings = FINDINGS if findings is None else findings
    rows = [(findings[k]["code"], findings[k]["code_description"]) for k in findings if k in set(kinds)]
    noise = rng.permutation(sorted(NOISE_CODES))[: int(rng.choice([0, 1, 1, 2, 2, 3]))]
    rows += [(str(c), NOISE_CODES[str(c)]) for c in sorted(noise)]
    return rows
