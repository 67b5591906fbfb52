"""`vit-fast tune`: measure every choice a model's fused ops make on this machine, cache the picks
and print them (one row per op and shape: each candidate's median ms and the pick).

Run a fused model's inference forward and training step with every choice measured afresh (fused
backend vs plain PyTorch per op call; on CPU also the GEMM library and layout per GEMM shape), write
the picks to the tuning cache (VIT_FAST_CACHE_DIR, else $XDG_CACHE_HOME/vit_fast or
~/.cache/vit_fast) and print one row per op and shape. (`vit-fast bench --gemm-libraries` shows each
GEMM library alone at the model's shapes.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vit_fast.cli._common import add_model_arguments, command, device_and_dtype, model_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vit-fast tune`."""
    add_model_arguments(p, "vit_small_patch16_224", 8, dtype="fp32")
    p.add_argument("--budget-s", type=float, default=None, help="skip the training step once this is spent")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table `vit-fast tune` prints: op, shape, each candidate's median ms, the pick."""
    if not rows:
        return "(nothing measured: every choice is forced or has a single candidate)"
    lines = []
    op_w = max(len("op"), *(len(r["op"]) for r in rows))
    shape_w = min(90, max(len("shape"), *(len(r["shape"]) for r in rows)))
    lines.append(f"{'op':<{op_w}}  {'shape':<{shape_w}}  {'candidates (median ms)':<44}  pick")
    for r in rows:
        cands = "  ".join(f"{k}={v:.3f}" for k, v in sorted(r["ms"].items(), key=lambda kv: kv[1]))
        shape = r["shape"] if len(r["shape"]) <= shape_w else r["shape"][: shape_w - 3] + "..."
        lines.append(f"{r['op']:<{op_w}}  {shape:<{shape_w}}  {cands:<44}  {r['pick']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from vit_fast.perf.tune import tune_model
    from vit_fast.tuning import cache_dir, device_model

    device, dtype = device_and_dtype(args)
    rows = tune_model(args.model, args.batch, dtype, device, budget_s=args.budget_s, **model_overrides(args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"# {args.model} batch {args.batch} {args.dtype} on {device} ({device_model(device)}), "
        f"{torch.get_num_threads() if device.type == 'cpu' else 1} thread(s); cache: {cache_dir()}"
    )
    print(format_rows(rows))
    return 0


#: The one-line summary `vit-fast --help` lists.
SUMMARY = "measure and cache the fastest backend / GEMM library per op and shape for one model"

add_parser = command("tune", SUMMARY, __doc__, add_arguments, run)
