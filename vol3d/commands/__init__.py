"""One module per ``vol3d`` subcommand: ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``, ``run(args)``."""

from __future__ import annotations

from preprocess.errors import Vol3DError


class NotYetAvailable(Vol3DError):
    """Raised by subcommands whose implementation has not landed yet."""


def not_yet(name: str) -> NotYetAvailable:
    return NotYetAvailable(f"`vol3d {name}` is not yet available in this version")
