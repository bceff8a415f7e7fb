"""`vol3d synth`: write a synthetic hospital export (DICOM/NIfTI CT with reports, EHR codes, masks, boxes)"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "write a synthetic hospital export (DICOM/NIfTI CT with reports, EHR codes, masks, boxes)"
DESCRIPTION = """Write a deterministic synthetic hospital export: CT DICOM series (with scouts,
feet-first and non-axial acquisitions), some NIfTI cases, organ/lesion masks, finding
boxes in world mm, radiology reports by AccessionNumber and ICD-10 codes by PatientID."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("synth")
