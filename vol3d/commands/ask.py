"""`vol3d ask`: ask a question about a volume (NIfTI, DICOM folder or cache entry)"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "ask a question about a volume (NIfTI, DICOM folder or cache entry)"
DESCRIPTION = """Answer a question about one volume with a trained run. Boxes in the answer are
reported in the model frame and in the original image's world (mm) and voxel coordinates."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("ask")
