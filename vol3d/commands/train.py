"""`vol3d train`: train the vision-language model from a preprocessed cache"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "train the vision-language model from a preprocessed cache"
DESCRIPTION = """Train encoder -> token reducer -> projector -> causal LM on report generation,
VQA, grounded boxes and EHR codes from a cache, with checkpointing and exact resume."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("train")
