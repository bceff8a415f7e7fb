"""Synthetic hospital exports with ground truth (``vol3d synth``).

:func:`generate` writes DICOM/NIfTI series of an analytic phantom with findings: a chest/abdomen
for CT (:mod:`vol3d.synth.phantom`), a head with T1, T2 and FLAIR for MR (:mod:`vol3d.synth.brain`),
plus organ/lesion masks, finding boxes, reports, EHR codes and ``truth.json``; see docs/formats.md
section 1 and docs/synth.md.
"""

from vol3d.synth.export import PRESETS, SynthConfig, generate, plan_cases, write_case
from vol3d.synth.phantom import LABEL_VALUE, LABELS
from vol3d.synth.reports import FINDINGS, NOISE_CODES

__all__ = [
    "FINDINGS",
    "LABELS",
    "LABEL_VALUE",
    "NOISE_CODES",
    "PRESETS",
    "SynthConfig",
    "generate",
    "plan_cases",
    "write_case",
]
