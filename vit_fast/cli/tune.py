"""`vit-fast tune`: measure every choice a model's fused ops make on this machine, cache the picks
and print them (one row per op and shape: each candidate's median ms and the pick)."""

from __future__ import annotations

import argparse
import json
from typing import Any

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="measure and cache the fastest backend / GEMM library per op and shape for one model",
        description=(
            "Run a fused model's inference forward and training step with every choice measured afresh "
            "(fused backend vs plain PyTorch per op call; on CPU also the GEMM library and layout per "
            "GEMM shape), write the picks to the tuning cache (VIT_FAST_CACHE_DIR, else "
            "$XDG_CACHE_HOME/vit_fast or ~/.cache/vit_fast) and print one row per op and shape."
        ),
    )
    p.add_argument(
        "--model", default="vit_small_patch16_224", help="a vit_fast model name (vit-fast bench --list)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    p.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    p.add_argument("--budget-s", type=float, default=None, help="skip the training step once this is spent")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=run)
    return p


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

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, _DTYPES[args.dtype])
    overrides = {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
    rows = tune_model(args.model, args.batch, dtype, device, budget_s=args.budget_s, **overrides)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"# {args.model} batch {args.batch} {args.dtype} on {device} ({device_model(device)}), "
        f"{torch.get_num_threads() if device.type == 'cpu' else 1} thread(s); cache: {cache_dir()}"
    )
    print(format_rows(rows))
    return 0
