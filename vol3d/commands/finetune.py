"""`vol3d finetune`: fine-tune a run for one task (report, vqa, ground, ehr, seg)"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "fine-tune a run for one task (report, vqa, ground, ehr, seg)"
DESCRIPTION = """Fine-tune from a run dir (--init RUN) on one task; --task seg adds a segmentation
decoder over the encoder's intermediate features (MONAI DiceCE, sliding-window inference)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("finetune")
