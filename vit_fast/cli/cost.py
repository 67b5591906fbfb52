"""`vit-fast cost`: the modeled GPU cost of a training step, eager vs fused, over fake tensors."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cost",
        help="modeled GPU cost (bytes, FLOPs, launches, saved bytes, roofline and calibrated time) of "
        "timm, torch.compile(timm) and fused",
        description=(
            "Trace a training step (or inference) under fake tensors (no memory is allocated) and model "
            "its cost per kernel launch: a roofline at spec peaks (modeled_ms) and a model calibrated on "
            "published timm throughput (predicted_ms). Both are a MODEL, not a measurement."
        ),
    )
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument(
        "--gpu",
        default="h100,a100",
        help="comma list of a100, h100, h200, b200, rtx3090, rtx4090, rtx5090, or 'all' (default h100,a100)",
    )
    p.add_argument(
        "--variants",
        default="timm,reference,fused",
        help="comma list of timm (stock timm, SDPA attention), timm-math (timm, attention written out), "
        "timm-compile (a model of torch.compile(timm): each memory-bound chain one kernel), reference "
        "(vit_fast reference model: plain PyTorch, attention written out), fused (vit_fast fused model); "
        "each later variant gets ratio rows against each earlier one",
    )
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--optimizer", choices=("adamw", "none"), default="adamw")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--launch-overhead-us", type=float, default=3.0)
    p.add_argument(
        "--amp",
        action="store_true",
        help="trace automatic mixed precision (fp32 parameters, autocast to --dtype) instead of "
        "parameters in --dtype",
    )
    p.add_argument(
        "--kernel-level",
        action="store_true",
        help="also trace the fused model through its Triton launchers (real kernel count and operand "
        "bytes per fused op) as an extra variant 'fused-kernels'",
    )
    p.add_argument(
        "--triton-gemm-fraction",
        type=float,
        default=None,
        help="our Triton GEMM's efficiency as a fraction of cuBLAS for predicted_ms (an assumption; "
        "default 0.85)",
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="also print the published timm measurements the predictor is fitted to, beside its "
        "predictions (traces 12 programs: ~30 s)",
    )
    p.add_argument(
        "--break-even",
        action="store_true",
        help="also print the Triton GEMM fraction of cuBLAS above which the fused training step is "
        "predicted to beat timm and torch.compile(timm), for --model at --batch on each --gpu",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the numbers to this file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vit_fast.perf import cost
    from vit_fast.perf.cost import breakeven, calibration

    try:
        gpus = cost.parse_gpus(args.gpu)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    eff = cost.FITTED
    if args.triton_gemm_fraction is not None:
        if not args.triton_gemm_fraction > 0:
            raise SystemExit(f"--triton-gemm-fraction must be > 0, got {args.triton_gemm_fraction}")
        eff = eff.with_triton_fraction(args.triton_gemm_fraction)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in cost.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; known: {', '.join(cost.VARIANTS)}")
    common = dict(
        train=args.mode == "train",
        optimizer=None if args.optimizer == "none" else args.optimizer,
        img_size=args.img_size,
        launch_overhead_s=args.launch_overhead_us * 1e-6,
        amp=args.amp,
    )
    dtype = cost.DTYPES[args.dtype]
    reports = [cost.trace_step(args.model, v, args.batch, dtype, label=v, **common) for v in variants]
    if args.kernel_level and "fused" in variants:
        reports.append(
            cost.trace_step(
                args.model, "fused", args.batch, dtype, label="fused-kernels", kernel_level=True, **common
            )
        )
    for rep in reports:
        rep.gpus = tuple(gpus)
    what = "training step (fwd+bwd" + ("+AdamW" if args.optimizer != "none" else "") + ")"
    if args.mode != "train":
        what = "inference forward"
    precision = (
        f"AMP to {args.dtype} (fp32 parameters)" if args.amp else f"{args.dtype} parameters and activations"
    )
    print(f"{args.model}, batch {args.batch}, {precision}, {what}")
    fwd = reports[0].flops(["forward"]) / args.batch / 1e9
    print(f"forward GFLOPs per image ({reports[0].label}): {fwd:.2f}")
    print(cost.format_comparison(reports, gpus))
    print()
    print(cost.format_predicted(reports, gpus, eff))
    calib = None
    if args.calibration:
        calib = calibration.calibration_table(eff)
        print()
        print(calibration.format_calibration(eff))
    be = None
    if args.break_even:
        be = breakeven.break_even(args.model, gpus, args.batch, dtype, eff=eff, img_size=args.img_size)
        print()
        print(breakeven.format_break_even(be))
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "modeled": True,
                    "model": args.model,
                    "batch": args.batch,
                    "dtype": args.dtype,
                    "amp": args.amp,
                    "mode": args.mode,
                    "efficiency": eff.__dict__,
                    "rows": [
                        {
                            "variant": r.label,
                            "gpu": g,
                            "modeled_ms": r.modeled_ms(g),
                            "predicted_ms": r.predicted_ms(g, eff),
                        }
                        for r in reports
                        for g in gpus
                    ],
                    "variants": [r.to_dict() for r in reports],
                    "calibration": calib,
                    "break_even": [b.to_dict() for b in be] if be else None,
                },
                f,
                indent=1,
            )
    return 0
