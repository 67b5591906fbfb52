"""`vit-fast bench`: measured per-op and whole-model timings, fused vs stock timm (eager and
torch.compile) and the reference, with the GEMM floor of the step on this machine."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="measure per-op and whole-model speed and memory: fused vs timm, torch.compile(timm), reference",
        description=(
            "Benchmarks on the device present. Per op (forward, backward, forward+backward) at the "
            "block shapes of --model, the whole model (inference and training step), and sweeps over "
            "tokens, batch and width; medians with IQR, saved-for-backward bytes, CUDA peak memory, "
            "samples/s. The whole model is also timed as stock timm (eager, SDPA attention) when timm is "
            "installed, and as torch.compile(timm) on CUDA or with --compile; speedups are ratios from "
            "the same run, and the GEMM floor (the step's GEMMs alone at the best library speed measured "
            "here per shape) shows how much of it each impl reaches. Writes bench.csv, bench.json and "
            "bench_sweep.png to --out. The defaults finish in about a minute on a 2-core CPU. "
            "torch.compile is off by default on CPU (compiling takes minutes there): add --compile."
        ),
    )
    p.add_argument("--model", default="vit_tiny_patch16_224")
    add_zoo_arguments(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    p.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--ops", default=",".join(_ops()), help="comma list of ops, or 'none'")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model cases")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweeps (and the plot)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(timm) and the torch.compile'd reference (default on CUDA)",
    )
    p.add_argument("--no-compile", action="store_true", help="never time torch.compile'd models or ops")
    p.add_argument("--no-timm", action="store_true", help="skip the stock timm baselines")
    p.add_argument("--no-reference", action="store_true", help="skip vit_fast's own reference impl")
    p.add_argument("--no-floor", action="store_true", help="skip the GEMM floor measurement")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend for the compiled impl"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "cpu", "reference"),
        default="auto",
        help="force the fused ops' backend",
    )
    p.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per case (0.1 on CPU, 0.5 on CUDA)"
    )
    p.add_argument(
        "--model-runs",
        type=int,
        default=5,
        help="whole-model cases: at least this many timed runs each (their median is reported)",
    )
    p.add_argument(
        "--cpu-gemm",
        choices=("tuned", "auto", "onednn", "aten"),
        default=None,
        help="GEMM library of the C++ backend: tuned = measured per shape (default; VIT_FAST_CPU_GEMM "
        "forces one), auto = oneDNN for float32",
    )
    p.add_argument("--sweep-tokens", default="50,197,257")
    p.add_argument("--sweep-batch", default="1,2,4")
    p.add_argument("--sweep-width", default="96,192,384")
    p.add_argument("--out", default="bench_out", help="directory for bench.csv, bench.json, bench_sweep.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plain", action="store_true", help="plain-text table instead of rich")
    p.set_defaults(func=run)
    return p


def _ops() -> tuple[str, ...]:
    from vit_fast.perf.bench import OPS

    return OPS


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--zoo",
        default=None,
        help="instead of the suite: comma list of Hugging Face / torchvision / open_clip models "
        "(hf-vit-b16, clip-vit-b16, tv-vit-b16, oc-vit-b16, or any vit_fast.integrations.zoo name with "
        "--zoo-size), built from configs with random weights, stock vs vit_fast.patch'ed in the same run",
    )
    p.add_argument("--zoo-size", default="base", help="size of the --zoo models: base (ViT-B/16) or tiny")


#: --zoo aliases for the ViT-B/16 cases.
ZOO_ALIASES = {
    "hf-vit-b16": "hf-vit",
    "clip-vit-b16": "hf-clip",
    "tv-vit-b16": "tv-vit",
    "oc-vit-b16": "oc-vit",
}


def run_zoo(args: argparse.Namespace) -> int:
    """`vit-fast bench --zoo ...`: each model stock vs patched, inference and training step, fp32."""
    import torch

    from vit_fast.integrations.zoo import ZOO
    from vit_fast.perf import bench

    names = [ZOO_ALIASES.get(n.strip(), n.strip()) for n in args.zoo.split(",") if n.strip()]
    for n in names:
        if n not in ZOO:
            known = ", ".join([*ZOO_ALIASES, *ZOO])
            raise SystemExit(f"--zoo: unknown model {n!r}; known: {known}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, size {args.zoo_size}"
    )
    results = []
    for n in names:
        print(f"  {n} ...", file=sys.stderr, flush=True)
        results += bench.bench_zoo(
            n, args.batch, args.zoo_size, device=device,
            min_run_time=args.min_run_time if args.min_run_time is not None else 0.1, min_reps=args.model_runs,
        )  # fmt: skip
    print(bench.format_zoo(results))
    paths = bench.write_outputs(results, args.out, {"zoo": names, "zoo_size": args.zoo_size})
    print("wrote " + ", ".join(paths.values()))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"FAILED {r.name} {r.impl} {r.mode}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    import contextlib
    import time

    import torch

    if getattr(args, "zoo", None):
        return run_zoo(args)

    from vit_fast.cli.check import environment
    from vit_fast.ops.backend import use_backend
    from vit_fast.perf import bench
    from vit_fast.perf.cost import DTYPES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.model_runs < 1:
        raise SystemExit(f"--model-runs must be >= 1, got {args.model_runs}")
    if args.cpu_gemm is not None:
        from vit_fast.ops.backend import cpu_extension

        ext = cpu_extension()
        if ext is None or not hasattr(ext, "set_gemm_backend"):
            raise SystemExit("--cpu-gemm needs the C++ extension (vit_fast._C), which is not built")
        try:
            ext.set_gemm_backend(args.cpu_gemm)
        except RuntimeError as err:
            raise SystemExit(f"--cpu-gemm: {err}") from None
    ops = () if args.ops == "none" else tuple(o.strip() for o in args.ops.split(",") if o.strip())
    for op in ops:
        if op not in bench.OPS:
            raise SystemExit(f"--ops: unknown op {op!r}; known: {', '.join(bench.OPS)}")
    compile_too = (args.compile or on_cuda) and not args.no_compile
    impls: tuple[str, ...] = ("fused",)
    if bench.timm_available() and not args.no_timm:
        impls += ("timm", "timm_compiled") if compile_too else ("timm",)
    if not args.no_reference:
        impls += ("reference", "compiled") if compile_too else ("reference",)
    cfg = bench.BenchConfig(
        model=args.model,
        batch=args.batch,
        impls=impls,
        ops=ops,
        device=device,
        dtype=dtype,
        min_run_time=args.min_run_time if args.min_run_time is not None else (0.5 if on_cuda else 0.1),
        sweep=not args.no_sweep,
        sweep_tokens=_ints(args.sweep_tokens),
        sweep_batch=_ints(args.sweep_batch),
        sweep_width=_ints(args.sweep_width),
        run_ops=bool(ops),
        run_model=not args.no_model,
        model_min_reps=args.model_runs,
        gemm_floor=not args.no_floor,
        model_kwargs={k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None},
    )
    bench.COMPILE_BACKEND = args.compile_backend
    env = environment()
    print(
        f"device {env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, {cfg.dtype}, "
        f"impls {', '.join(impls)}, fused backends {env.get('backends_cuda' if on_cuda else 'backends_cpu')}"
        + ("" if on_cuda else f", cpu GEMMs {env.get('cpu_gemm')}")
    )
    if not on_cuda and not compile_too:
        print("torch.compile skipped on CPU (compiling takes minutes here); add --compile to include it")
    if not bench.timm_available():
        print("timm is not installed: no stock-timm baselines (pip install timm)")
    start = time.perf_counter()
    forced = use_backend(args.backend) if args.backend != "auto" else contextlib.nullcontext()
    with forced:
        results = bench.run_suite(cfg, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    if args.plain or not bench.print_rich_table(results):
        print(bench.format_table(results))
    print()
    print(bench.format_speedups(bench.speedups(results)))
    fractions = bench.floor_fractions(results)
    if fractions:
        from vit_fast.tuning import device_model

        print()
        print(f"{bench.format_floor_fractions(fractions)}\n(device: {device_model(device)})")
    paths = bench.write_outputs(results, args.out, env | {"backend_forced": args.backend, "impls": impls})
    if not args.no_plot:
        png = bench.plot(results, args.out)
        if png:
            paths["plot"] = png
    if not on_cuda:
        import resource

        # Whole-process peak resident memory (Linux reports KiB): a coarse upper bound covering all
        # cases above; the per-case activation memory is the saved-bytes column.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"process peak RSS {rss:.0f} MiB (all cases together)")
    print(f"measured in {time.perf_counter() - start:.1f} s; wrote " + ", ".join(paths.values()))
    failed = [r for r in results if r.error]
    if failed:
        print(f"FAILED: {len(failed)} case(s) raised; see the error column", file=sys.stderr)
        return 1
    return 0
