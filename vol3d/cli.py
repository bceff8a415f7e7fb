"""The ``vol3d`` command. Each subcommand lives in ``vol3d/commands/<name>.py``.

Command modules are imported to build their parsers, so they must stay light:
heavy imports (torch, transformers, pydicom, h5py) go inside their ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from preprocess.errors import EXIT_INTERNAL, EXIT_USAGE, Vol3DError

COMMANDS = ("synth", "preprocess", "train", "finetune", "eval", "ask", "predict", "demo", "info")

EPILOG = """exit codes: 0 done; 2 bad arguments or input (nothing changed);
3 partial: some inputs failed, the rest was written (see manifest.jsonl); 1 internal error.
Run `vol3d COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    from vol3d import __version__

    parser = argparse.ArgumentParser(
        prog="vol3d",
        description="Vision-language modelling of 3D CT and MRI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vol3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"vol3d.commands.{name}")
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except Vol3DError as exc:
        print(f"vol3d {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vol3d {args.command}: interrupted; finished work is kept, run again to resume", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"vol3d {args.command}: internal error (a bug); please report the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
