"""`vit-fast cost`: the modeled GPU cost of a training step, eager vs fused, over fake tensors."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cost",
        help="modeled GPU cost (bytes, FLOPs, launches, saved bytes, roofline time) of eager vs fused",
        description=(
            "Trace a training step (or inference) under fake tensors (no memory is allocated) and model "
            "its cost per kernel launch with a roofline. The times are a MODEL, not a measurement."
        ),
    )
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--gpu", default="h100,a100", help="comma list of h100, a100 (default both)")
    p.add_argument(
        "--variants",
        default="timm,reference,fused",
        help="comma list of timm (stock timm, SDPA attention), timm-math (timm, attention written out), "
        "reference (vit_fast reference model: plain PyTorch, attention written out), fused (vit_fast fused "
        "model); each later variant gets ratio rows against each earlier one",
    )
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--optimizer", choices=("adamw", "none"), default="adamw")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--launch-overhead-us", type=float, default=3.0)
    p.add_argument(
        "--kernel-level",
        action="store_true",
        help="also trace the fused model through its Triton launchers (real kernel count and operand "
        "bytes per fused op) as an extra variant 'fused-kernels'",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the numbers to this file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vit_fast.perf import cost

    gpus = [g.strip().lower() for g in args.gpu.split(",") if g.strip()]
    for g in gpus:
        if g not in cost.GPUS:
            raise SystemExit(f"--gpu: unknown GPU {g!r}; known: {', '.join(cost.GPUS)}")
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in cost.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; known: {', '.join(cost.VARIANTS)}")
    reports = []
    for v in variants:
        reports.append(
            cost.trace_step(
                args.model,
                v,
                args.batch,
                cost.DTYPES[args.dtype],
                train=args.mode == "train",
                optimizer=None if args.optimizer == "none" else args.optimizer,
                img_size=args.img_size,
                label=v,
                launch_overhead_s=args.launch_overhead_us * 1e-6,
            )
        )
    if args.kernel_level and "fused" in variants:
        reports.append(
            cost.trace_step(
                args.model,
                "fused",
                args.batch,
                cost.DTYPES[args.dtype],
                train=args.mode == "train",
                optimizer=None if args.optimizer == "none" else args.optimizer,
                img_size=args.img_size,
                label="fused-kernels",
                launch_overhead_s=args.launch_overhead_us * 1e-6,
                kernel_level=True,
            )
        )
    what = "training step (fwd+bwd" + ("+AdamW" if args.optimizer != "none" else "") + ")"
    if args.mode != "train":
        what = "inference forward"
    print(f"{args.model}, batch {args.batch}, {args.dtype} parameters and activations, {what}")
    fwd = reports[0].flops(["forward"]) / args.batch / 1e9
    print(f"forward GFLOPs per image ({reports[0].label}): {fwd:.2f}")
    print(cost.format_comparison(reports, gpus))
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "modeled": True,
                    "model": args.model,
                    "batch": args.batch,
                    "dtype": args.dtype,
                    "mode": args.mode,
                    "variants": [r.to_dict() for r in reports],
                },
                f,
                indent=1,
            )
    return 0
