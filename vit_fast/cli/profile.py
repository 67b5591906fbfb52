"""`vit-fast profile`: torch.profiler over a few training steps; Chrome trace + top ops by self time."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="profile a few training steps (ranges per fused op), write a Chrome trace, print top ops",
        description=(
            "Run torch.profiler over --steps training steps of --model (after --warmup steps), with a "
            "record_function range (and NVTX on CUDA) around each patch-embed, attention, MLP, norm and "
            "head call. Writes trace_<model>_<impl>.json to --out and prints the top ops by self time."
        ),
    )
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--impl", choices=("fused", "reference"), default="fused")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    p.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="profile_out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from vit_fast.perf.cost import DTYPES
    from vit_fast.perf.profile import profile_training

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")]
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("--batch and --steps must be >= 1, --warmup >= 0")
    overrides = {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
    top, table, trace = profile_training(
        args.model,
        args.impl,
        args.batch,
        args.steps,
        args.warmup,
        device,
        dtype,
        args.out,
        args.top,
        **overrides,
    )
    print(f"{args.model} ({args.impl}), batch {args.batch}, {args.steps} profiled training steps on {device}")
    print(f"top {len(top)} ops by self time:")
    print(table)
    print(f"Chrome trace: {trace}")
    return 0
