"""`vit-fast bench`: measured per-op and whole-model timings, fused vs stock timm (eager and
torch.compile) and the reference, with the GEMM floor of the step on this machine; stock vs patched
zoo models (--zoo) and timm NaFlexVit on mixed-length batches (--naflex); the GEMM libraries alone
(--gemm-libraries).

Benchmarks on the device present. Per op (forward, backward, forward+backward) at the block shapes
of --model, the whole model (inference and training step), and sweeps over tokens, batch and width;
medians with IQR, saved-for-backward bytes, CUDA peak memory, samples/s. The whole model is also
timed as stock timm (eager, SDPA attention) when timm is installed, and as torch.compile(timm) on
CUDA or with --compile; speedups are ratios from the same run, and the GEMM floor (the step's GEMMs
alone at the best library speed measured here per shape) shows how much of it each impl reaches.
Writes bench.csv, bench.json and bench_sweep.png to --out. The defaults finish in about a minute on
a 2-core CPU. torch.compile is off by default on CPU (compiling takes minutes there): add --compile.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vit_fast.cli._common import add_model_arguments, command, device_and_dtype, model_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vit-fast bench`."""
    add_model_arguments(p, "vit_tiny_patch16_224", None)
    add_zoo_arguments(p)
    add_naflex_arguments(p)
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
        "--gemm-ablation",
        action="store_true",
        help="CPU: also time the fused model with each GEMM library of the C++ backend forced "
        "(impls fused-aten = at::mm, fused-onednn = oneDNN) beside the default pick",
    )
    p.add_argument(
        "--gemm-libraries",
        action="store_true",
        help="instead of the suite: the GEMM libraries alone at --model's training-step GEMM shapes "
        "(each library's GFLOP/s per shape and the fastest; the GEMM floor is their best)",
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend for the compiled impls"
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
    p.add_argument(
        "--cpu-tile-gemm",
        choices=("auto", "avx512", "avx2", "blas"),
        default=None,
        help="the C++ attention's tile GEMMs: auto (the AVX-512 micro-kernel where the CPU has it, "
        "else the AVX2 + FMA one), avx512, avx2, or blas (the fallback; an ablation)",
    )
    p.add_argument("--sweep-tokens", default="50,197,257")
    p.add_argument("--sweep-batch", default="1,2,4")
    p.add_argument("--sweep-width", default="96,192,384")
    p.add_argument("--out", default="bench_out", help="directory for bench.csv, bench.json, bench_sweep.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plain", action="store_true", help="plain-text table instead of rich")


def _ops() -> tuple[str, ...]:
    from vit_fast.perf.bench import OPS

    return OPS


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--zoo",
        default=None,
        help="instead of the suite: comma list of Hugging Face / torchvision / open_clip models "
        "(hf-vit-b16, clip-vit-b16, tv-vit-b16, oc-vit-b16, or any vit_fast.integrations.zoo name with "
        "--zoo-size), built from configs with random weights, stock vs vit_fast.patch'ed in the same run",
    )
    p.add_argument("--zoo-size", default="base", help="size of the --zoo models: base (ViT-B/16) or tiny")


def add_naflex_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--naflex",
        nargs="?",
        const="naflexvit_base_patch16_gap",
        default=None,
        metavar="MODELS",
        help="instead of the suite: comma list of timm NaFlexVit models (alone: naflexvit_base_patch16_gap) "
        "on a seeded NaFlex batch of mixed resolutions and aspect ratios (--batch images, default 8), "
        "stock timm (SDPA with its mask) vs vit_fast.patch_timm'ed (varlen attention), plus "
        "torch.compile(stock) on CUDA or with --compile; inference and training step, same run",
    )
    p.add_argument(
        "--max-patches", type=int, default=256, help="with --naflex: most patches per image (default 256)"
    )


#: --zoo aliases for the ViT-B/16 cases.
ZOO_ALIASES = {
    "hf-vit-b16": "hf-vit",
    "clip-vit-b16": "hf-clip",
    "tv-vit-b16": "tv-vit",
    "oc-vit-b16": "oc-vit",
}


def _min_run_time(args: argparse.Namespace, on_cuda: bool) -> float:
    return args.min_run_time if args.min_run_time is not None else (0.5 if on_cuda else 0.1)


def _finish(results: list, out: str, env: dict[str, Any]) -> int:
    """Write bench.csv / bench.json, report failed cases; the exit code (1 if any case failed)."""
    from vit_fast.perf import bench

    paths = bench.write_outputs(results, out, env)
    print("wrote " + ", ".join(paths.values()))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"FAILED {r.name} {r.impl} {r.mode}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def run_zoo(args: argparse.Namespace) -> int:
    """`vit-fast bench --zoo ...`: each model stock vs patched, inference and training step, fp32."""
    import torch

    from vit_fast.integrations.zoo import ZOO
    from vit_fast.perf import bench

    names = [ZOO_ALIASES.get(n, n) for n in _names(args.zoo)]
    for n in names:
        if n not in ZOO:
            known = ", ".join([*ZOO_ALIASES, *ZOO])
            raise SystemExit(f"--zoo: unknown model {n!r}; known: {known}")
    device, _ = device_and_dtype(args)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, size {args.zoo_size}"
    )
    results = []
    for n in names:
        print(f"  {n} ...", file=sys.stderr, flush=True)
        results += bench.bench_zoo(
            n, args.batch or 2, args.zoo_size, device=device,
            min_run_time=args.min_run_time if args.min_run_time is not None else 0.1, min_reps=args.model_runs,
        )  # fmt: skip
    print(bench.format_pairs(results))
    return _finish(results, args.out, {"zoo": names, "zoo_size": args.zoo_size})


def run_naflex(args: argparse.Namespace) -> int:
    """`vit-fast bench --naflex [...]`: timm NaFlexVit stock vs patched (and compiled) on a mixed batch."""
    import torch

    from vit_fast.cli.check import environment
    from vit_fast.perf import bench
    from vit_fast.perf.workload import naflex_grids

    device, dtype = device_and_dtype(args)
    batch = args.batch or bench.NAFLEX_BATCH
    compile_too = (args.compile or device.type == "cuda") and not args.no_compile
    env = environment()
    lengths = [h * w for h, w in naflex_grids(batch, args.max_patches)]
    print(
        f"device {env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, {dtype}; "
        f"NaFlex batch of {batch}, patches per image {lengths} (seed 0, <= {args.max_patches})"
    )
    if not compile_too:
        print("torch.compile(stock) skipped (compiling takes minutes on a CPU); add --compile to include it")
    results = []
    for name in _names(args.naflex):
        print(f"  {name} ...", file=sys.stderr, flush=True)
        results += bench._guard(
            lambda name=name: bench.bench_naflex(
                name, batch, args.max_patches, device=device, dtype=dtype,
                min_run_time=_min_run_time(args, device.type == "cuda"), min_reps=args.model_runs,
                compile=compile_too, compile_backend=args.compile_backend, **model_overrides(args),
            ),
            "naflex", name, "stock", ("inference", "train"), bench.OpShape(batch, 0, 0, 1, 0), device, dtype,
        )  # fmt: skip
    print(bench.format_pairs(results))
    return _finish(results, args.out, env | {"naflex": _names(args.naflex), "patches_per_image": lengths})


def run_gemm_libraries(args: argparse.Namespace) -> int:
    """`vit-fast bench --gemm-libraries`: each GEMM library alone at the model's step shapes."""
    from vit_fast.perf.gemm_floor import format_libraries, gemm_floor
    from vit_fast.tuning import device_model

    device, dtype = device_and_dtype(args)
    min_run = args.min_run_time if args.min_run_time is not None else 0.05
    floors = gemm_floor(
        args.model, args.batch or 2, device, dtype, ("train",), min_run, **model_overrides(args)
    )
    fl = floors["train"]
    print(f"{args.model} batch {args.batch or 2} {dtype} on {device_model(device)}")
    print(format_libraries(fl))
    print(f"GEMM floor of the training step: {fl.gflop:.2f} GFLOP in {fl.floor_ms:.2f} ms (measured)")
    return 0


def _set_cpu_library(flag: str, setter: str, name: str) -> None:
    """`vit_fast._C.<setter>(name)` for command-line option `flag` (--cpu-gemm, --cpu-tile-gemm)."""
    from vit_fast.ops.backend import cpu_extension

    ext = cpu_extension()
    if ext is None or not hasattr(ext, setter):
        raise SystemExit(f"{flag} needs the C++ extension (vit_fast._C), which is not built")
    try:
        getattr(ext, setter)(name)
    except RuntimeError as err:
        raise SystemExit(f"{flag}: {err}") from None


def run(args: argparse.Namespace) -> int:
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.model_runs < 1:
        raise SystemExit(f"--model-runs must be >= 1, got {args.model_runs}")
    if args.cpu_gemm is not None:
        _set_cpu_library("--cpu-gemm", "set_gemm_backend", args.cpu_gemm)
    if args.cpu_tile_gemm is not None:
        _set_cpu_library("--cpu-tile-gemm", "set_tile_gemm_backend", args.cpu_tile_gemm)
    if args.zoo:
        return run_zoo(args)
    if args.naflex:
        return run_naflex(args)
    if args.gemm_libraries:
        return run_gemm_libraries(args)
    return run_suite(args)


def run_suite(args: argparse.Namespace) -> int:
    """The default `vit-fast bench`: per-op cases, the whole model, the sweeps, the GEMM floor."""
    import contextlib
    import time

    import torch

    from vit_fast.cli.check import environment
    from vit_fast.ops.backend import use_backend
    from vit_fast.perf import bench

    device, dtype = device_and_dtype(args)
    on_cuda = device.type == "cuda"
    ops = () if args.ops == "none" else tuple(_names(args.ops))
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
        args.model, args.batch or 2, impls, ops, device=str(device), dtype=dtype,
        min_run_time=_min_run_time(args, on_cuda), sweep=not args.no_sweep,
        sweep_tokens=_ints(args.sweep_tokens), sweep_batch=_ints(args.sweep_batch),
        sweep_width=_ints(args.sweep_width), run_ops=bool(ops), run_model=not args.no_model,
        model_min_reps=args.model_runs, gemm_floor=not args.no_floor,
        gemm_ablation=args.gemm_ablation and not on_cuda, model_kwargs=model_overrides(args),
    )  # fmt: skip
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


#: The one-line summary `vit-fast --help` lists.
SUMMARY = "measure per-op and whole-model speed and memory: fused vs timm, torch.compile(timm), reference"

add_parser = command("bench", SUMMARY, __doc__, add_arguments, run)
