"""The ``pretag`` command line: a thin layer over the Python API.

Each subcommand lives in ``pretag/commands/<name>.py`` and defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Command modules import heavy libraries inside ``run`` so ``--help`` stays instant, and
``main`` declares only the arguments of the command it runs: ``pretag label`` never pays for what another command's
``add_arguments`` imports (``experiment``'s lists the shipped experiments, which imports torch: ~2 s on a loaded
machine, a quarter of a 100k-line PEP8 job).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

# name -> module; the order is the order in `pretag --help`
COMMANDS = {
    "label": "pretag.commands.label",
    "inline": "pretag.commands.inline",
    "tokenize": "pretag.commands.tokenize",
    "train": "pretag.commands.train",
    "generate": "pretag.commands.generate",
    "eval": "pretag.commands.eval",
    "experiment": "pretag.commands.experiment",
    "serve": "pretag.commands.serve",
    "demo": "pretag.commands.demo",
    "interpret": "pretag.commands.interpret",
    "export": "pretag.commands.export",
}


class UserError(Exception):
    """An error caused by the user's input: printed as one clear message, no traceback."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, the other commands are listed (name and help) without their arguments."""
    parser = argparse.ArgumentParser(
        prog="pretag", description="Conditional pretraining with control tags: label, train, control, evaluate."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:  # command not built yet
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def print_json(obj) -> None:
    """The one way commands emit machine-readable output (``--json``)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the first word that is not an option names the command (the top level's only option, -v, takes no value)
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from pretag.folders import FolderError
    from pretag.schema import SchemaError

    try:
        return int(args._run(args) or 0)
    except (UserError, SchemaError, FolderError, FileNotFoundError) as e:
        print(f"pretag {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pretag {args.command}: interrupted; finished work is kept, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
