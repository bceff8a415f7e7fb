"""Ingest and caching of hospital exports (DICOM, DICOMDIR, NIfTI, NRRD, MHA).

This package never imports torch, so it runs on a hospital export machine that
has no deep-learning stack.
"""

__all__: list[str] = []
