"""`vol3d eval`: evaluate a run: grounding IoU, report BLEU/ROUGE/finding F1, VQA, EHR AUROC, Dice"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "evaluate a run: grounding IoU, report BLEU/ROUGE/finding F1, VQA, EHR AUROC, Dice"
DESCRIPTION = """Evaluate a run on a cache: grounding Acc@IoU0.25/0.5 with true 3D IoU and the
unparseable rate, report BLEU-4/ROUGE-L and finding-level F1, VQA accuracy, EHR macro AUROC."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("eval")
