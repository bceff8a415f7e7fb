"""`vol3d predict`: segment volumes and write masks in the original geometry (NIfTI, DICOM SEG)"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "segment volumes and write masks in the original geometry (NIfTI, DICOM SEG)"
DESCRIPTION = """Run a segmentation run on a NIfTI file, a DICOM series folder or a folder of them;
masks are written in each input's original geometry (NIfTI, and DICOM SEG for DICOM input)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("predict")
