"""What several `vit-fast` commands share: registering a command, the model / device arguments and
reading them back (bench, profile, tune, check, cost). Each command module's docstring is its
`--help` description."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: --dtype names -> torch dtype attribute names.
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def command(
    name: str,
    summary: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> Callable[[argparse._SubParsersAction], argparse.ArgumentParser]:
    """The `add_parser(subparsers)` a command module exposes (cli/main.py calls it): registers
    command `name` (`summary` in `vit-fast --help`, `description` in its own --help), adds its
    options with `add_arguments(parser)`, and makes `run(namespace) -> exit code` its entry point."""

    def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=summary, description=description)
        add_arguments(p)
        p.set_defaults(func=run)
        return p

    return add_parser


def add_model_arguments(
    p: argparse.ArgumentParser, model: str, batch: int | None, dtype: str | None = None
) -> None:
    """--model, --batch, --img-size, --depth, --device and --dtype (None: bf16 on CUDA, fp32 on CPU)."""
    p.add_argument("--model", default=model, help=f"a vit_fast / timm model name (default {model})")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    p.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        default=dtype,
        help=f"default {dtype}" if dtype else "bf16 on CUDA, fp32 on CPU",
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) from --device and --dtype (their defaults resolved here)."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return device, getattr(torch, DTYPE_NAMES[name])


def model_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The model configuration overrides given on the command line (--img-size, --depth)."""
    return {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
