"""`vit-fast cost`: the modeled GPU cost of a training step, eager vs fused, over fake tensors.

Trace a training step (or inference) under fake tensors (no memory is allocated) and model its cost
per kernel launch: a roofline at spec peaks (modeled_ms) and a model calibrated on published timm
throughput (predicted_ms). With --naflex: varlen attention vs SDPA with a mask over NaFlex batches
of mixed lengths. All of it is a MODEL, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os

from vit_fast.cli._common import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vit-fast cost`."""
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
    p.add_argument(
        "--naflex",
        action="store_true",
        help="instead of the step tables: one attention layer of --naflex-model over NaFlex batches "
        "(mixed lengths), varlen attention vs SDPA with a mask, for the `vit-fast bench --naflex` batch "
        "and canonical mixes (FLOPs, HBM bytes, modeled ms per --gpu, ratios)",
    )
    p.add_argument("--naflex-model", default="naflexvit_base_patch16_gap", help="timm NaFlexVit for --naflex")
    p.add_argument(
        "--naflex-lengths",
        default=None,
        help="with --naflex: also model this mix, a comma list of patches per image (prefix tokens are added)",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the numbers to this file")


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
    if args.naflex:
        return run_naflex(args, gpus, dtype, eff)
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
        _write_json(
            args.json_path,
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
        )
    return 0


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def run_naflex(args: argparse.Namespace, gpus: list[str], dtype: object, eff: object) -> int:
    """`vit-fast cost --naflex`: varlen attention vs masked SDPA over NaFlex length mixes (modeled)."""
    from vit_fast.perf.bench import NAFLEX_BATCH, NAFLEX_MAX_PATCHES
    from vit_fast.perf.cost import naflex

    try:
        shape = naflex.model_attention_shape(args.naflex_model)
    except Exception as err:
        raise SystemExit(f"--naflex-model: cannot build {args.naflex_model!r}: {err}") from None
    mixes = naflex.default_mixes(NAFLEX_BATCH, NAFLEX_MAX_PATCHES)
    if args.naflex_lengths:
        try:
            custom = tuple(int(v) for v in args.naflex_lengths.split(",") if v.strip())
        except ValueError:
            raise SystemExit(f"--naflex-lengths: not a comma list of ints: {args.naflex_lengths!r}") from None
        if not custom or min(custom) < 0:
            raise SystemExit(f"--naflex-lengths: need patch counts >= 0, got {args.naflex_lengths!r}")
        mixes["custom"] = custom
    train = args.mode == "train"
    rows = naflex.compare(
        mixes, shape["width"], shape["heads"], shape["prefix"], dtype, gpus, train, eff, shape["depth"]
    )
    what = f"{'forward + backward' if train else 'forward'}, {args.dtype}"
    print(
        f"{args.naflex_model}: D {shape['width']}, {shape['heads']} heads, {shape['prefix']} prefix tokens, "
        f"{shape['depth']} layers; 'bench' = the `vit-fast bench --naflex` batch ({NAFLEX_BATCH} images, "
        f"<= {NAFLEX_MAX_PATCHES} patches, seed 0)"
    )
    print(naflex.format_compare(rows, gpus, what))
    if args.json_path:
        _write_json(
            args.json_path,
            {
                "modeled": True,
                "naflex": {
                    "model": args.naflex_model,
                    "dtype": args.dtype,
                    "mode": args.mode,
                    "per": "one attention layer",
                    "masked_kernel": naflex.MASKED_SDPA_KERNEL,
                    "varlen_kernel": naflex.VARLEN_KERNEL,
                    "shape": shape,
                    "rows": rows,
                },
            },
        )
    return 0


#: The one-line summary `vit-fast --help` lists.
SUMMARY = "modeled GPU cost (bytes, FLOPs, launches, saved bytes, roofline and calibrated time) of timm, torch.compile(timm) and fused"

add_parser = command("cost", SUMMARY, __doc__, add_arguments, run)
