"""The text protocol between vol3d and a language model, defined once (torch-free).

Special tokens:

- ``<vol>``: placeholder the processor expands into the volume tokens (their embeddings are
  replaced by the projected encoder tokens; special: dropped when decoding).
- ``<reg>``: one detected finding (a region); ``<org>``: one organ. Both are placeholders whose
  embeddings are replaced by region tokens (pooled features, type, score, box, size) and stand
  in the *findings digest* (:func:`vol3d.tasks.regions.digest_text`) that precedes every
  question; a grounding answer points at one of them (special: dropped when decoding).
- ``<box>``, ``</box>``: delimit a box ``<box>[x0,y0,z0,x1,y1,z1]</box>``, six integers
  ``0..BOX_SCALE`` in the model-input frame (:mod:`preprocess.geometry` formats, parses and
  maps them back to voxels and millimetres); *not* special, so decoding keeps them. A model
  with a grounding head writes a bare ``<box>`` whose coordinates the head supplies.

Run-directory file names shared by several modules live in :mod:`vol3d.rundir`.
"""

from __future__ import annotations

from preprocess.geometry import BOX_SCALE, format_box, parse_boxes

VOL_TOKEN = "<vol>"
REGION_TOKEN = "<reg>"
ORGAN_TOKEN = "<org>"
BOX_START = "<box>"
BOX_END = "</box>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

#: Placeholders whose embeddings the model replaces (never generated, dropped when decoding).
PLACEHOLDERS = (VOL_TOKEN, REGION_TOKEN, ORGAN_TOKEN)

#: ``answer_prefix`` that makes a model say where a finding is, not whether it is there:
#: the answer starts with a box. A grounding-head model goes on from ``<box>``; a text-mode
#: model spells the coordinates after ``<box>[``. Keyed by "has a grounding head".
LOCATE_PREFIX = {True: BOX_START, False: BOX_START + "["}

__all__ = [
    "BOS_TOKEN", "BOX_END", "BOX_SCALE", "BOX_START", "EOS_TOKEN", "LOCATE_PREFIX", "ORGAN_TOKEN", "PAD_TOKEN",
    "PLACEHOLDERS", "REGION_TOKEN", "VOL_TOKEN", "format_box", "parse_boxes",
]
