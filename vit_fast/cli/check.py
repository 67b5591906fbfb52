"""`vit-fast check`: environment report and the ahead-of-time compile report of every Triton kernel.

Print the environment (torch, triton, device, C++ extension, active backends), then compile every
shipped Triton kernel config for sm_80 and sm_90 without a GPU. Exits 1 if any kernel fails to
compile, spills registers, or exceeds the shared-memory limit.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import TYPE_CHECKING, Any

from vit_fast.cli._common import command

if TYPE_CHECKING:
    from vit_fast.perf.aot import CompileResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vit-fast check`."""
    p.add_argument("--filter", default="", help="only kernels whose name contains this")
    p.add_argument("--no-aot", action="store_true", help="only the environment report")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: one per CPU)")


def environment() -> dict[str, Any]:
    """What `vit-fast check` reports about the environment, as a dict (also used by bench/profile)."""
    import torch

    from vit_fast.kernels._common import triton_interpreting
    from vit_fast.ops.backend import active_backends, cpu_extension
    from vit_fast.ops.contract import FAMILIES

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from vit_fast.tuning.cache import cpu_identity

    ext = cpu_extension()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({cpu_identity()})",  # also the tuning cache's identity (vit_fast.tuning.cache)
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": triton_interpreting(),
        "extension_built": ext is not None,
        "extension_families": [f for f in FAMILIES if ext is not None and hasattr(ext, f"{f}_forward")],
        "backends_cpu": active_backends("cpu"),
        # The library the C++ backend's float32 GEMMs call (csrc/gemm.h): "onednn" or "aten".
        "cpu_gemm": ext.gemm_backend() if ext is not None and hasattr(ext, "gemm_backend") else "n/a",
        # ... and the attention-tile GEMMs (csrc/tile_gemm.h): "avx512", "avx2" or "blas".
        "cpu_attention_tiles": ext.tile_gemm_backend()
        if ext is not None and hasattr(ext, "tile_gemm_backend")
        else "n/a",
        # ... and the bf16 attention kernels this CPU runs ("attn_brgemm" runs on oneDNN's bf16
        # micro-kernel with AMX, else on ours with AVX512-BF16: its name in brackets), with the
        # forced one or "auto" (measured per shape).
        "cpu_bf16_attention": f"{','.join(ext.attention_kernels())} [{ext.bf16_micro_kernel()}]"
        f" ({ext.attention_kernel()})"
        if ext is not None and hasattr(ext, "attention_kernels")
        else "n/a",
        # Prepacked oneDNN weights for inference (csrc/gemm.cpp; VIT_FAST_PREPACK=0 turns them off).
        "cpu_prepack": ("on" if ext.prepacking() else "off")
        if ext is not None and hasattr(ext, "prepacking")
        else "n/a",
    }
    if torch.cuda.is_available():
        info["backends_cuda"] = active_backends("cuda")
    return info


def run(args: argparse.Namespace) -> int:
    info = environment()
    print("environment")
    for k, v in info.items():
        print(f"  {k:20} {v}")
    try:  # executed vs useful attention FLOPs per head dim (the padded tail columns are the waste)
        from vit_fast.kernels.attention import format_head_dim_flops

        print()
        print(format_head_dim_flops())
    except ImportError:  # triton not installed: no Triton kernels to report on
        pass
    if args.no_aot:
        return 0
    from vit_fast.perf import aot

    print(flush=True)
    results = aot.report(args.filter, jobs=args.jobs, progress=_progress_bar(args.jobs or aot.default_jobs()))
    print(f"AOT compile report ({len(results)} kernel x arch builds)")
    if not results:
        print("  no kernels matched" + (f" filter {args.filter!r}" if args.filter else ""))
        return 0
    print(aot.format_table(results))
    bad = [r for r in results if not r.ok]
    if bad:
        print(f"\nFAILED: {len(bad)} build(s) failed to compile, spill, or exceed shared memory")
        return 1
    print(f"\nall {len(results)} builds ok: compiled, 0 spills, shared memory within the arch limit")
    return 0


def _progress_bar(jobs: int):
    """A `report(progress=...)` callback drawing a tqdm bar on stderr (stdout stays the report, so
    `vit-fast check > file` and pipes get clean output). A cold Triton cache takes minutes, so
    a start line is printed even when stderr is not a terminal (tqdm then draws nothing)."""
    from tqdm import tqdm

    bar: list[tqdm] = []

    def update(done: int, total: int, result: CompileResult | None) -> None:
        if not bar and total:
            print(
                f"compiling {total} kernel x arch builds on {min(jobs, total)} process(es) "
                "(several minutes with a cold Triton cache) ...",
                file=sys.stderr,
                flush=True,
            )
        if not bar:
            bar.append(tqdm(total=total, unit="build", file=sys.stderr, disable=None, leave=False))
        if result is not None:
            bar[0].set_postfix_str(f"{result.name} sm_{result.arch}", refresh=False)
            bar[0].update(1)
        if done == total:
            bar[0].close()

    return update


#: The one-line summary `vit-fast --help` lists.
SUMMARY = "environment report + AOT compile report (sm_80/sm_90: registers, spills, shared memory)"

add_parser = command("check", SUMMARY, __doc__, add_arguments, run)
