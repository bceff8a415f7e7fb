"""`vol3d demo`: end-to-end demo on synthetic data: synth, preprocess, train, eval, ask, PNG"""

from __future__ import annotations

import argparse

from vol3d.commands import not_yet

HELP = "end-to-end demo on synthetic data: synth, preprocess, train, eval, ask, PNG"
DESCRIPTION = """Synthesise a small hospital export, preprocess it, train the tiny CPU model,
evaluate it, ask a grounded question on a held-out case and draw the box on the slices.
A second run reuses what already exists."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise not_yet("demo")
