"""A synthetic head for MR (and CT): tissues, findings, reports and codes of ``vol3d synth --modality mr``.

The head is a few quadrics in world RAS+ mm (scalp, skull, cerebrospinal fluid, a cerebrum of grey
matter around two white-matter hemispheres, lateral ventricles, cerebellum and brainstem), rendered
by :func:`vol3d.synth.phantom.render` like the abdomen. Every tissue has a mean per MR sequence, so
T1, T2 and FLAIR images of one head differ in contrast the way real ones do: cerebrospinal fluid is
dark on T1 and FLAIR and bright on T2, white matter brighter than grey on T1 and darker on T2.

Findings (:data:`FINDINGS`), each with the contrast it shows on each sequence:

- ``brain_tumour``: a mass in the cerebral white matter, dark on T1, bright on T2 and FLAIR;
  1-3 per patient (metastases).
- ``white_matter_lesion``: a smaller demyelinating-type lesion in the white matter, bright on T2 and
  FLAIR, barely visible on T1 (so a single T1 cannot tell it from white matter: a reason to give
  the model all sequences as channels).
- ``cerebellar_infarct``: dark on T1, bright on T2 and FLAIR, in the cerebellum.
- ``hydrocephalus``: a condition, enlarged lateral ventricles (no shape of its own); called by its
  vocabulary criterion ``volume > 40 mL`` (normal ventricles here are 10-25 mL).

Reports are integer millimetres from the finding's mask in the primary series, like the abdomen's
(:func:`vol3d.synth.reports.finding_sizes`); hydrocephalus gives the ventricular volume in mL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vol3d.synth.phantom import Anatomy, Atlas, Quadric, Tissue
from vol3d.synth.reports import NUMBER_WORDS, assemble_report, dims, pick

#: Organ label values of the head's ``labels/<key>.nii.gz`` (index = value).
LABELS: tuple[str, ...] = (
    "background",
    "grey_matter",
    "white_matter_left",
    "white_matter_right",
    "ventricles",
    "cerebellum",
    "brainstem",
    "lesion",
)
_L = {name: value for value, name in enumerate(LABELS)}

#: Tissue means per contrast: CT in HU; T1 (MPRAGE-like), T2 (TSE) and FLAIR in arbitrary units.
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0, {"CT": -1000.0, "T1": 0.0, "T2": 0.0, "FLAIR": 0.0}),
    Tissue("scalp", 0, {"CT": -60.0, "T1": 780.0, "T2": 560.0, "FLAIR": 480.0}),
    Tissue("skull", 0, {"CT": 900.0, "T1": 70.0, "T2": 50.0, "FLAIR": 40.0}),
    Tissue("csf", 0, {"CT": 8.0, "T1": 120.0, "T2": 950.0, "FLAIR": 90.0}),
    Tissue("grey_matter", _L["grey_matter"], {"CT": 38.0, "T1": 430.0, "T2": 620.0, "FLAIR": 560.0}),
    Tissue("white_matter_left", _L["white_matter_left"], {"CT": 27.0, "T1": 650.0, "T2": 400.0, "FLAIR": 420.0}),
    Tissue("white_matter_right", _L["white_matter_right"], {"CT": 27.0, "T1": 650.0, "T2": 400.0, "FLAIR": 420.0}),
    Tissue("ventricles", _L["ventricles"], {"CT": 6.0, "T1": 110.0, "T2": 960.0, "FLAIR": 80.0}),
    Tissue("cerebellum", _L["cerebellum"], {"CT": 36.0, "T1": 520.0, "T2": 560.0, "FLAIR": 500.0}),
    Tissue("brainstem", _L["brainstem"], {"CT": 32.0, "T1": 600.0, "T2": 460.0, "FLAIR": 460.0}),
)  # fmt: skip

#: Diameter range (mm) and intensity range per contrast of each lesion type.
LESION_TYPES: dict[str, tuple[float, float, dict[str, tuple[float, float]]]] = {
    "brain_tumour": (12.0, 34.0, {"CT": (18.0, 24.0), "T1": (280.0, 360.0), "T2": (820.0, 900.0),
                                  "FLAIR": (760.0, 840.0)}),
    "white_matter_lesion": (5.0, 14.0, {"CT": (24.0, 27.0), "T1": (600.0, 640.0), "T2": (760.0, 840.0),
                                        "FLAIR": (820.0, 900.0)}),
    "cerebellar_infarct": (10.0, 28.0, {"CT": (12.0, 18.0), "T1": (300.0, 360.0), "T2": (800.0, 880.0),
                                        "FLAIR": (700.0, 780.0)}),
}  # fmt: skip

#: Report vocabulary: the organ labels a finding lies in, its ICD-10 code, what the report measures.
FINDINGS: dict[str, dict] = {
    "brain_tumour": {"organs": ("white_matter_left", "white_matter_right"), "code": "D49.6",
                     "code_description": "Neoplasm of unspecified behavior of brain", "measure": "axial",
                     "probability": 0.3, "counts": (1, 1, 1, 2, 3)},
    "white_matter_lesion": {"organs": ("white_matter_left", "white_matter_right"), "code": "R90.82",
                            "code_description": "White matter disease, unspecified", "measure": "axial",
                            "probability": 0.3, "counts": (1, 2, 2, 3)},
    "cerebellar_infarct": {"organs": ("cerebellum",), "code": "I63.9",
                           "code_description": "Cerebral infarction, unspecified", "measure": "axial",
                           "probability": 0.2, "counts": (1, 1, 2)},
    "hydrocephalus": {"organs": ("ventricles",), "code": "G91.9", "code_description": "Hydrocephalus, unspecified",
                      "measure": "volume", "probability": 0.2, "counts": (1,)},
}  # fmt: skip

#: The export's ``vocab.json`` findings (fields of ``vol3d.tasks.FindingSpec``).
VOCAB_FINDINGS: dict[str, dict] = {
    "brain_tumour": {"text": "brain tumour", "plural": "brain tumours", "organ": "white matter",
                     "nouns": ["mass", "tumour", "tumor", "neoplasm", "metastasis"],
                     "organ_words": ["white matter", "cerebral", "hemisphere"], "code": "D49.6"},
    "white_matter_lesion": {"text": "white matter lesion", "organ": "white matter",
                            "nouns": ["lesion", "hyperintensity"],
                            "organ_words": ["white matter", "periventricular"], "code": "R90.82"},
    "cerebellar_infarct": {"text": "cerebellar infarct", "organ": "cerebellum", "nouns": ["infarct", "infarction"],
                           "organ_words": ["cerebellar", "cerebellum"], "code": "I63.9"},
    "hydrocephalus": {"text": "hydrocephalus", "organ": "ventricles", "phrases": ["hydrocephalus", "ventriculomegaly"],
                      "nouns": ["enlarged", "dilated"], "organ_words": ["ventricles", "ventricular"],
                      "countable": False, "code": "G91.9", "criterion": "volume > 40 mL"},
}  # fmt: skip

ATLAS = Atlas(
    name="brain",
    labels=LABELS,
    tissues=TISSUES,
    shell=frozenset({"scalp", "skull", "csf"}),
    inner="csf",
    lesion_types=LESION_TYPES,
    findings=FINDINGS,
    vocab_findings=VOCAB_FINDINGS,
    contrasts=("CT", "T1", "T2", "FLAIR"),
)

#: Ventricle enlargement (per axis) of hydrocephalus: 1.7-2.0 x per axis is 5-8 x the volume.
HYDROCEPHALUS_SCALE = (1.7, 2.0)


def sample_anatomy(rng: np.random.Generator, kinds: Sequence[str] = ()) -> Anatomy:
    """Draw a plausible adult head; ``"hydrocephalus"`` in ``kinds`` enlarges the ventricles."""
    u = rng.uniform
    a, b, c = u(70, 80), u(88, 100), u(84, 94)  # scalp semi-axes: left-right, antero-posterior, cranio-caudal
    x0, y0 = u(-6, 6), u(-8, 8)
    tilt = u(-8, 8)  # head pitch (degrees about x): real heads are not aligned with the scanner
    head = Quadric.make((x0, y0, 0.0), (a, b, c), (tilt, 0, 0))
    skull = Quadric.make((x0, y0, 0.0), (a - 5, b - 5, c - 5), (tilt, 0, 0))
    csf = Quadric.make((x0, y0, 0.0), (a - 12, b - 12, c - 12), (tilt, 0, 0))
    rot = head.rot
    def at(dx: float, dy: float, dz: float) -> tuple[float, float, float]:  # a point in the head's frame
        v = np.asarray(rot) @ np.array([dx, dy, dz]) + np.array([x0, y0, 0.0])
        return float(v[0]), float(v[1]), float(v[2])
    ac, bc, cc = a - 15, b - 16, u(56, 62)  # cerebrum
    cerebrum = Quadric.make(at(0, 3, c - 14 - cc), (ac, bc, cc), (tilt, 0, 0))
    wm_r = (0.40 * ac, 0.74 * bc, 0.70 * cc)
    zc = c - 14 - cc
    wm = {
        "white_matter_left": Quadric.make(at(-0.47 * ac, 3, zc), wm_r, (tilt, 0, u(-4, 4))),
        "white_matter_right": Quadric.make(at(0.47 * ac, 3, zc), wm_r, (tilt, 0, u(-4, 4))),
    }
    scale = u(*HYDROCEPHALUS_SCALE) if "hydrocephalus" in kinds else u(0.85, 1.15)
    vr = np.array([u(6, 8), u(24, 28), u(9, 11)]) * scale
    ventricles = [
        Quadric.make(at(side * (vr[0] + 2.5), 6, zc + 4), vr, (tilt + u(-6, 6), 0, side * u(4, 10)))
        for side in (-1, 1)
    ]
    cerebellum = Quadric.make(at(0, -0.52 * b, zc - cc + 6), (0.62 * a, 0.30 * b, u(20, 24)), (tilt, 0, 0))
    brainstem = Quadric.make(at(0, -0.14 * b, zc - cc - 10), (12.0, 14.0, 30.0), (tilt + 12, 0, 0), cylinder=True)
    parts = (
        ("scalp", head),
        ("skull", skull),
        ("csf", csf),
        ("grey_matter", cerebrum),
        ("white_matter_left", wm["white_matter_left"]),
        ("white_matter_right", wm["white_matter_right"]),
        ("ventricles", ventricles[0]),
        ("ventricles", ventricles[1]),
        ("cerebellum", cerebellum),
        ("brainstem", brainstem),
    )
    _, hi = head.world_bounds()
    z_low = min(cerebellum.world_bounds()[0][2], brainstem.world_bounds()[0][2] + 20) - 6.0
    z_brain_top = cerebrum.world_bounds()[1][2] + 6.0
    jitter = tuple(float(v) for v in rng.normal(0.0, 4.0, len(TISSUES)))
    return Anatomy(parts, head, (float(z_low), float(z_brain_top)), float(hi[2] + 4.0), jitter, ATLAS)


# ----------------------------------------------------------------------------- reports


def _side(item: dict) -> str:
    return str(item.get("side") or ("left" if str(item["organ"]).endswith("_left") else "right"))


def _tumours(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(rng, ["No intracranial mass.", "There is no mass or mass effect.",
                          "No space-occupying lesion; no mass in the cerebral hemispheres."]), []  # fmt: skip
    if len(items) == 1:
        it = items[0]
        d = dims(it["sizes"], rng)
        text = pick(rng, [
            "There is a mass in the {s} cerebral white matter measuring {d}, T2/FLAIR hyperintense and T1 "
            "hypointense.",
            "A T1 hypointense, T2 hyperintense mass in the {s} cerebral hemisphere white matter measures {d}.",
            "Mass in the {s} hemisphere white matter, {d}, with surrounding FLAIR signal.",
        ]).format(s=_side(it), d=d)  # fmt: skip
        impression = pick(rng, ["{l} mm {s} cerebral mass, suspicious for neoplasm.",
                                "{S} hemisphere white matter mass ({l} mm); neoplasm likely."])  # fmt: skip
        return text, [impression.format(l=it["sizes"][0], s=_side(it), S=_side(it).capitalize())]
    sizes = " and ".join(f"{it['sizes'][0]} x {it['sizes'][1]} mm" for it in items)
    text = pick(rng, ["{n} masses in the cerebral white matter, measuring {dims}.",
                      "{n} T2 hyperintense masses of the cerebral hemisphere white matter measure {dims}."])  # fmt: skip
    largest = max(it["sizes"][0] for it in items)
    return text.format(n=NUMBER_WORDS[len(items)], dims=sizes), [
        f"Multiple cerebral masses, the largest {largest} mm, suspicious for metastases."]


def _white_matter(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(rng, ["No white matter lesion.", "The white matter is unremarkable.",
                          "No periventricular white matter hyperintensity."]), []  # fmt: skip
    if len(items) == 1:
        it = items[0]
        text = pick(rng, ["A FLAIR hyperintense lesion in the {s} periventricular white matter measures {d}.",
                          "There is a T2/FLAIR hyperintensity in the {s} hemisphere white matter, {d}."])  # fmt: skip
        return text.format(d=dims(it["sizes"], rng), s=_side(it)), [
            f"Single {it['sizes'][0]} mm white matter lesion, nonspecific."]
    largest = max(it["sizes"][0] for it in items)
    text = pick(rng, ["{n} FLAIR hyperintense lesions in the periventricular white matter, the largest {l} mm.",
                      "{n} T2/FLAIR white matter hyperintensities, up to {l} mm."])  # fmt: skip
    return text.format(n=NUMBER_WORDS[len(items)], l=largest), [
        pick(rng, ["Multiple white matter lesions; consider demyelinating disease.",
                   "White matter lesions, the largest {l} mm, nonspecific."]).format(l=largest)]  # fmt: skip


def _cerebellum(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(rng, ["The cerebellum is unremarkable.", "No cerebellar infarct.",
                          "Posterior fossa: the cerebellum is normal."]), []  # fmt: skip
    parts, impressions = [], []
    for it in items:
        parts.append(pick(rng, ["There is an infarct in the {s} cerebellar hemisphere measuring {d}.",
                                "T2/FLAIR hyperintense, T1 hypointense infarct of the {s} cerebellum, {d}."])
                     .format(d=dims(it["sizes"], rng), s=_side(it)))  # fmt: skip
        impressions.append(f"{_side(it).capitalize()} cerebellar infarct ({it['sizes'][0]} mm).")
    return " ".join(parts), impressions


def _ventricles(items: list[dict], rng: np.random.Generator) -> tuple[str, list[str]]:
    if not items:
        return pick(rng, ["The ventricles are normal in size and configuration.", "No hydrocephalus.",
                          "Ventricular size is normal."]), []  # fmt: skip
    volume = items[0]["sizes"][0]
    text = pick(rng, ["The lateral ventricles are enlarged (ventricular volume about {v} mL), consistent with "
                      "hydrocephalus.", "Hydrocephalus: the ventricles are dilated, about {v} mL."]).format(v=volume)  # fmt: skip
    return text, [pick(rng, ["Hydrocephalus ({v} mL ventricular volume).",
                             "Enlarged ventricles, {v} mL: hydrocephalus."]).format(v=volume)]  # fmt: skip


_OTHER = (
    "No midline shift.",
    "No extra-axial collection.",
    "No intracranial hemorrhage.",
    "The major intracranial flow voids are preserved.",
    "The orbits and paranasal sinuses are unremarkable.",
)


def write_report(findings: Sequence[dict], rng: np.random.Generator) -> tuple[str, str]:
    """``(findings text, impression)`` of one brain study.

    Args:
        findings: dicts with ``finding`` (a :data:`FINDINGS` key), ``organ`` (label name),
            ``sizes`` (integer mm, or mL for hydrocephalus) and ``side`` ("left"/"right").
    """
    by_kind = {k: [f for f in findings if f["finding"] == k] for k in FINDINGS}
    sections = [
        _tumours(by_kind["brain_tumour"], rng),
        _white_matter(by_kind["white_matter_lesion"], rng),
        _ventricles(by_kind["hydrocephalus"], rng),
        _cerebellum(by_kind["cerebellar_infarct"], rng),
    ]
    return assemble_report(sections, _OTHER, ("No acute intracranial abnormality.", "Normal MRI of the brain.",
                                              "No significant intracranial findings."), rng)


__all__ = ["ATLAS", "FINDINGS", "LABELS", "LESION_TYPES", "TISSUES", "VOCAB_FINDINGS", "sample_anatomy",
           "write_report"]
