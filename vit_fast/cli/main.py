"""`vit-fast` command line: bench | profile | train | cost | check | tune | validate.

Each subcommand lives in its own module of `vit_fast.cli` (bench.py, cost.py, ...) and registers
itself with `add_parser(subparsers)`, which adds a sub-parser and sets `func` (called with the parsed
namespace, returns the exit code). Adding a command means adding a module; this file does not change.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

#: Commands listed first in --help, in this order; any other module with `add_parser` follows.
_ORDER = ("bench", "profile", "train", "cost", "check", "tune", "validate")


def _command_modules() -> list[str]:
    import vit_fast.cli as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in ("main", "__main__")]
    names = [n for n in names if not n.startswith("_")]
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-fast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _command_modules():
        try:
            module = importlib.import_module(f"vit_fast.cli.{name}")
        except Exception as err:  # one broken command must not take the others down
            _add_broken(subparsers, name, err)
            continue
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def _add_broken(subparsers: argparse._SubParsersAction, name: str, err: BaseException) -> None:
    """A placeholder for a command whose module failed to import: running it reports why (exit 2)."""
    why = f"{type(err).__name__}: {err}"
    p = subparsers.add_parser(name, help=f"(unavailable: {why[:80]})", add_help=False)

    def fail(args: argparse.Namespace) -> int:
        print(f"vit-fast {name}: the command module failed to import: {why}", file=sys.stderr)
        return 2

    p.set_defaults(func=fail, broken_command=True)


def _quiet_cpu_run() -> None:
    """On a machine without a GPU, a CUDA build of torch logs "No CUDA runtime is found" when
    torch.utils.cpp_extension is imported (torch.utils.benchmark does so): not news on a CPU run."""
    import logging

    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_cpu_run()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "broken_command", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`vit-fast check | head`): stop quietly. As the Python docs advise,
        # point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
