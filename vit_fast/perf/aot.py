"""Ahead-of-time compile report: every shipped Triton kernel config, compiled for sm_80 and sm_90
without a GPU, with registers, spills and shared memory read from the cubin by `cuobjdump`.

Each module in `vit_fast.kernels` that ships kernels defines `aot_specs() -> list[KernelSpec]`, one
spec per (kernel, config) it can launch. Must run in a process where TRITON_INTERPRET is not 1
(interpreted kernels cannot be compiled); `report()` spawns one when needed.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

#: Max dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)


@dataclass
class KernelSpec:
    """One kernel at one config. `signature` maps every argument to a Triton type ('*fp16', 'i32',
    'fp32', 'constexpr'); `constexprs` gives the constexpr values; `divisible_by_16` names the
    pointer/int args that the launcher guarantees divisible by 16 (as the JIT would specialise)."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple[str, ...] = ()
    archs: tuple[int, ...] = ARCHS


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
    """Collect `aot_specs()` from every module of vit_fast.kernels."""
    import vit_fast.kernels as pkg

    specs: list[KernelSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"vit_fast.kernels.{info.name}")
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


def run_all(name_filter: str = "") -> list[CompileResult]:
    """Compile every spec (whose name contains name_filter) for each of its archs, in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "AOT compilation needs TRITON_INTERPRET unset; use report(), which spawns a process"
        )
    return [compile_spec(s, a) for s in all_specs() if name_filter in s.name for a in s.archs]


def report(name_filter: str = "") -> list[CompileResult]:
    """Run `run_all` in a fresh process with TRITON_INTERPRET unset and return its results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "vit_fast.perf.aot", "--json", name_filter],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"AOT report process failed:\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [CompileResult(**r) for r in rows]


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
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    rest = [a for a in argv if a != "--json"]
    results = run_all(rest[0] if rest else "")
    if as_json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
