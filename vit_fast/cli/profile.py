"""`vit-fast profile`: torch.profiler over a few training steps; Chrome trace + top ops by self time.

Run torch.profiler over --steps training steps of --model (after --warmup steps), with a
record_function range (and NVTX on CUDA) around each patch-embed, attention, MLP, norm and head
call. Writes trace_<model>_<impl>.json to --out and prints the top ops by self time.
"""

from __future__ import annotations

import argparse

from vit_fast.cli._common import add_model_arguments, command, device_and_dtype, model_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vit-fast profile`."""
    add_model_arguments(p, "vit_tiny_patch16_224", 2)
    p.add_argument("--impl", choices=("fused", "reference"), default="fused")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="profile_out")


def run(args: argparse.Namespace) -> int:

    from vit_fast.perf.profile import profile_training

    device, dtype = device_and_dtype(args)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("--batch and --steps must be >= 1, --warmup >= 0")
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
        **model_overrides(args),
    )
    print(f"{args.model} ({args.impl}), batch {args.batch}, {args.steps} profiled training steps on {device}")
    print(f"top {len(top)} ops by self time:")
    print(table)
    print(f"Chrome trace: {trace}")
    return 0


#: The one-line summary `vit-fast --help` lists.
SUMMARY = "profile a few training steps (ranges per fused op), write a Chrome trace, print top ops"

add_parser = command("profile", SUMMARY, __doc__, add_arguments, run)
