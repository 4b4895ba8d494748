"""`vlnflow` command line: one subcommand per job, each defined in the module that owns it.

A subcommand module exposes `add_parser(subparsers)`, which registers the parser and
sets `func` (called with the parsed args, returns an exit code). Modules are imported
only when listed here, so `vlnflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vlnflow import __version__

# (module path) — each registers one or more subcommands.
SUBCOMMAND_MODULES = [
    "vlnflow.data.cli",
    "vlnflow.train.launch",
    "vlnflow.cache.cli",
    "vlnflow.monitor.cli",
    "vlnflow.export.cli",
    "vlnflow.infer.predict",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlnflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlnflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors carry their own message
        from vlnflow.errors import UserError

        if isinstance(exc, UserError):
            print(f"vlnflow: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
