"""`vit-fast` command line: bench | profile | train | cost | check.

Each subcommand lives in its own module of `vit_fast.cli` (bench.py, cost.py, ...) and registers
itself with `add_parser(subparsers)`, which adds a sub-parser and sets `func` (called with the parsed
namespace, returns the exit code). Adding a command means adding a module; this file does not change.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

#: Commands listed first in --help, in this order; any other module with `add_parser` follows.
_ORDER = ("bench", "profile", "train", "cost", "check")


def _command_modules() -> list[str]:
    import vit_fast.cli as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in ("main", "__main__")]
    names = [n for n in names if not n.startswith("_")]
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-fast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"vit_fast.cli.{name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
