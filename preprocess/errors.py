"""Error types and the process exit codes of every ``vol3d`` command.

Exit codes (documented in README and ``vol3d --help``):

- 0: everything requested was done (series skipped by policy count as done).
- 1: an unexpected internal error (a bug: please report it with the traceback).
- 2: bad arguments or unusable input; nothing was changed. The message names the
  file and the fix.
- 3: partial success: some inputs failed (see the manifest's ``reason``/``detail``),
  everything else was written.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class Vol3DError(Exception):
    """Base class for errors a user can fix; the CLI prints the message, not a traceback."""

    exit_code = EXIT_USAGE


class InputError(Vol3DError, ValueError):
    """Bad input: the message names the offending file (or option) and how to fix it."""


class ConfigError(Vol3DError, ValueError):
    """A config file or flag is invalid: the message names the field and allowed values."""


class WorkerStartError(Vol3DError, RuntimeError):
    """Worker processes died: at once when the calling script has no main guard (see
    :func:`worker_death_hint`), or later, out of memory."""


def worker_death_hint() -> str:
    """Why worker processes may die at once, and the fix, for the message of a broken process pool.

    vol3d starts its worker processes with ``spawn`` (no inherited threads, locks or HDF5 handles),
    which imports the calling script again in every worker: a script that calls vol3d at its top
    level, without ``if __name__ == "__main__":``, runs itself again there and the workers die.
    """
    import sys

    main = getattr(sys.modules.get("__main__"), "__file__", None)
    script = f" ({main})" if main and not str(main).endswith(("vol3d", "__main__.py")) else ""
    return (f"if you call vol3d from a Python script{script}, put the call under `if __name__ == \"__main__\":` "
            "(vol3d starts its worker processes with 'spawn', which imports the script again in each of them); "
            "otherwise a worker may have run out of memory: use fewer workers")
