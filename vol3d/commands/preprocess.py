"""`vol3d preprocess`: ingest DICOM/DICOMDIR/zip/NIfTI/NRRD/MHA into a chunked HDF5 cache + manifest"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "ingest DICOM/DICOMDIR/zip/NIfTI/NRRD/MHA into a chunked HDF5 cache + manifest"
DESCRIPTION = """Scan a hospital export, split and validate series, convert to RAS+, rescale HU,
resample to the preset spacing, and write chunked HDF5 patches plus manifest.jsonl.
Resumable (run it again after an interruption); 'vol3d preprocess merge' joins shards."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("preprocess")
