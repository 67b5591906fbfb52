"""Ahead-of-time compile report: every shipped Triton kernel config, compiled for sm_80 and sm_90
without a GPU, with registers, spills and shared memory read from the cubin by `cuobjdump`.

Each module in `vit_fast.kernels` that ships kernels defines `aot_specs() -> list[KernelSpec]`, one
spec per (kernel, config) it can launch (`KernelSpec` and the arch list live in
`vit_fast.kernels._common`). Must run in a process where TRITON_INTERPRET is not 1 (interpreted
kernels cannot be compiled); `report()` spawns one when needed. Builds are independent, so they
are compiled in parallel worker processes (one per CPU by default) and reported as they finish.

    python -m vit_fast.perf.aot [--jobs N] [--json | --jsonl] [name_filter]
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

from vit_fast.kernels._common import ARCHS, KernelSpec

__all__ = [
    "ARCHS",
    "SHARED_LIMIT",
    "CompileResult",
    "KernelSpec",
    "all_specs",
    "builds",
    "compile_all",
    "report",
    "run_all",
]

#: Max dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class CompileResult:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    error: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    """Compile one spec for one architecture and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = CompileResult(
        spec.name,
        arch,
        spec.num_warps,
        spec.num_stages,
        config={k: v for k, v in spec.constexprs.items() if isinstance(v, (int, float, bool, str))},
    )
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as err:
        res.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    res.registers = usage.get("REG", -1)
    res.spill_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    # cuobjdump reports static shared memory; Triton's kernels use dynamic shared memory (metadata).
    res.shared_bytes = max(usage.get("SHARED", 0), int(kernel.metadata.shared))
    return res


def all_specs() -> list[KernelSpec]:
    """Collect `aot_specs()` from every module of vit_fast.kernels. A (name, arch) pair must be
    unique: workers find a build by it (one name may have one spec per arch)."""
    import vit_fast.kernels as pkg

    specs: list[KernelSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"vit_fast.kernels.{info.name}")
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    keys = [(s.name, a) for s in specs for a in s.archs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate AOT (spec name, arch) pairs: {dup}")
    return specs


def default_jobs() -> int:
    """Worker processes for the builds: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_worker_specs: dict[tuple[str, int], KernelSpec] = {}


def _compile_named(name: str, arch: int) -> CompileResult:
    """Worker entry point: specs hold kernel objects, which do not pickle, so each worker collects
    the specs once and compiles the one named, for `arch`."""
    if not _worker_specs:
        _worker_specs.update(((s.name, a), s) for s in all_specs() for a in s.archs)
    spec = _worker_specs[(name, arch)]
    try:
        return compile_spec(spec, arch)
    except Exception as err:  # e.g. cuobjdump failing: report it as this build's error
        return CompileResult(
            spec.name, arch, spec.num_warps, spec.num_stages, error=f"{type(err).__name__}: {err}"[:300]
        )


def builds(name_filter: str = "") -> list[tuple[KernelSpec, int]]:
    """(spec, arch) for every spec whose name contains name_filter and each of its archs."""
    return [(s, a) for s in all_specs() if name_filter in s.name for a in s.archs]


def compile_all(todo: list[tuple[KernelSpec, int]], jobs: int | None = None) -> Iterator[CompileResult]:
    """Compile the builds in this process (jobs=1) or in `jobs` worker processes (default: one
    per CPU), yielding each result as it finishes (not in order)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "AOT compilation needs TRITON_INTERPRET unset; use report(), which spawns a process"
        )
    jobs = min(jobs or default_jobs(), len(todo))
    if jobs <= 1:
        for spec, arch in todo:
            yield compile_spec(spec, arch)
        return
    # spawn, not fork: the parent may hold torch/Triton threads and state that fork would copy.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_compile_named, spec.name, arch) for spec, arch in todo]
        for fut in as_completed(futures):
            yield fut.result()


def _in_spec_order(results: list[CompileResult], name_filter: str) -> list[CompileResult]:
    order = {(s.name, a): i for i, (s, a) in enumerate(builds(name_filter))}
    return sorted(results, key=lambda r: order.get((r.name, r.arch), len(order)))


def run_all(name_filter: str = "", jobs: int | None = 1) -> list[CompileResult]:
    """Compile every spec (whose name contains name_filter) for each of its archs, in this process
    (jobs=1, the default) or in `jobs` workers; results in spec order."""
    return _in_spec_order(list(compile_all(builds(name_filter), jobs)), name_filter)


def report(
    name_filter: str = "",
    jobs: int | None = None,
    progress: Callable[[int, int, CompileResult | None], None] | None = None,
) -> list[CompileResult]:
    """Run the builds in a fresh process with TRITON_INTERPRET unset (using `jobs` workers, default
    one per CPU) and return the results in spec order. `progress(done, total, result)` is called
    once with (0, total, None) when the build list is known and after every finished build."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "vit_fast.perf.aot", "--jsonl", "--jobs", str(jobs or default_jobs())]
    # stderr goes to a file: a pipe that nobody reads while stdout streams could fill and block.
    with (
        tempfile.TemporaryFile("w+") as errf,
        subprocess.Popen(
            [*cmd, name_filter], stdout=subprocess.PIPE, stderr=errf, text=True, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        total: int | None = None  # stays None if the process fails before listing its builds
        rows: list[CompileResult] = []
        for line in proc.stdout:
            if not line.startswith("{"):  # anything else a compiler prints to stdout
                continue
            item = json.loads(line)
            if "total" in item:
                total = item["total"]
                if progress:
                    progress(0, total, None)
                continue
            rows.append(CompileResult(**item))
            if progress and total is not None:
                progress(len(rows), total, rows[-1])
        proc.wait()
        errf.seek(0)
        err = errf.read()
    if proc.returncode not in (0, 1) or total is None or len(rows) != total:
        raise RuntimeError(f"AOT report process failed (exit {proc.returncode}):\n{err[-4000:]}")
    return _in_spec_order(rows, name_filter)


def format_table(results: list[CompileResult]) -> str:
    lines = [
        f"{'kernel':44} {'arch':>5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>6} {'smem':>8}  status"
    ]
    for r in results:
        status = "ok" if r.ok else (r.error or ("SPILLS" if r.spill_bytes else "SMEM>LIMIT"))
        lines.append(
            f"{r.name:44} sm_{r.arch:<2} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>5} "
            f"{r.spill_bytes:>6} {r.shared_bytes:>8}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vit_fast.perf.aot", description=__doc__.splitlines()[0])
    parser.add_argument("name_filter", nargs="?", default="", help="only specs whose name contains this")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON list of all results")
    out.add_argument(
        "--jsonl", action="store_true", help="a {'total': n} line, then one result per line as it finishes"
    )
    args = parser.parse_args(argv)
    results: list[CompileResult] = []
    todo = builds(args.name_filter)
    if args.jsonl:
        print(json.dumps({"total": len(todo)}), flush=True)
    for r in compile_all(todo, args.jobs):
        results.append(r)
        if args.jsonl:
            print(json.dumps(asdict(r)), flush=True)
    results = _in_spec_order(results, args.name_filter)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    elif not args.jsonl:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
