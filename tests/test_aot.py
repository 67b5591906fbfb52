"""The ahead-of-time compile specs and report (`vit_fast.perf.aot`, `vit-fast check`): signatures
generated from the kernels' own parameter lists, the 64-bit offset variants shipped for every
arch, the parallel report with progress, and `vit-fast check | head` ending quietly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import triton
import triton.language as tl

from vit_fast.kernels._common import ARCHS, KernelSpec, kernel_parameters
from vit_fast.perf import aot


@triton.jit
def _toy_kernel(x_ptr, y_ptr, n, scale, stride_x, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs * stride_x, mask=offs < n)
    tl.store(y_ptr + offs, v * scale if FLAG else v, mask=offs < n)


def test_for_kernel_builds_the_signature_from_the_parameters():
    spec = KernelSpec.for_kernel(
        "toy",
        _toy_kernel,
        {"BLOCK": 64, "FLAG": True, "stride_x": 1},
        ptr="bf16",
        types={"y_ptr": "*fp32", "scale": "fp32"},
    )
    assert spec.signature == {
        "x_ptr": "*bf16",
        "y_ptr": "*fp32",
        "n": "i32",
        "scale": "fp32",
        "stride_x": "constexpr",  # specialised like the JIT does for a unit stride
        "BLOCK": "constexpr",
        "FLAG": "constexpr",
    }
    assert spec.archs == ARCHS


def test_for_kernel_rejects_drift():
    with pytest.raises(ValueError, match="no value"):
        KernelSpec.for_kernel("toy", _toy_kernel, {"BLOCK": 64}, ptr="fp16")
    with pytest.raises(ValueError, match=r"\['stride_y'\] are not parameters"):
        KernelSpec.for_kernel("toy", _toy_kernel, {"BLOCK": 64, "FLAG": 0, "stride_y": 1}, ptr="fp16")
    with pytest.raises(ValueError, match="not parameters"):
        KernelSpec.for_kernel(
            "toy", _toy_kernel, {"BLOCK": 64, "FLAG": 0}, ptr="fp16", divisible_by_16=("z_ptr",)
        )


def test_every_shipped_spec_matches_its_kernel():
    specs = aot.all_specs()  # raises on duplicate names
    assert specs
    for s in specs:
        assert list(s.signature) == list(kernel_parameters(s.fn)), s.name
        consts = {n for n, ty in s.signature.items() if ty == "constexpr"}
        assert consts == set(s.constexprs), s.name
        assert set(s.divisible_by_16) <= set(s.signature) - consts, s.name
        assert set(s.archs) <= set(ARCHS)


def test_int64_variants_ship_for_every_kernel_and_arch():
    """Each kernel with an IDX64 parameter has specs with IDX64 False and True on every arch."""
    seen: dict[str, set] = {}
    for s in aot.all_specs():
        if "IDX64" in s.constexprs:
            for arch in s.archs:
                seen.setdefault(getattr(s.fn, "fn", s.fn).__name__, set()).add((arch, s.constexprs["IDX64"]))
    expected = {"_gemm_kernel", "_fwd_kernel", "_dweight_kernel", "_dimage_kernel", "_batch_sum_kernel"}
    assert expected <= set(seen)
    for name, variants in seen.items():
        assert variants == {(a, w) for a in ARCHS for w in (False, True)}, name


def test_report_in_parallel_with_progress():
    """Two builds on two worker processes; progress sees the total first, then every result."""
    calls = []
    results = aot.report("patch_embed_split_sum_fp16", jobs=2, progress=lambda *a: calls.append(a))
    assert [(r.name, r.arch) for r in results] == [("patch_embed_split_sum_fp16", a) for a in ARCHS]
    assert all(r.ok for r in results), aot.format_table(results)
    assert calls[0] == (0, 2, None)
    assert sorted(c[0] for c in calls[1:]) == [1, 2] and all(c[1] == 2 for c in calls)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name_filter",
    [
        "gemm_wgrad_ln_i64_bf16",
        "gemm_dgrad_dgelu_i64_fp16",
        "patch_embed_fwd_i64_bf16_16bit_p1",
        "patch_embed_dimage_i64",
    ],
)
def test_int64_variants_compile_without_spills(name_filter):
    """A sample (all of them: `python -m vit_fast.perf.aot _i64_`)."""
    results = aot.report(name_filter)
    assert {r.arch for r in results} == set(ARCHS)
    assert all(r.ok for r in results), aot.format_table(results)


def test_check_piped_into_head_ends_quietly():
    """`vit-fast check | head`: the reader closes the pipe while the command still writes. The
    child writes ~1 MB (more than a pipe holds), so it is still writing when the pipe closes."""
    child = textwrap.dedent(
        """
        import sys
        from vit_fast.cli import check, main
        check.environment = lambda: {f"key{i}": "x" * 60 for i in range(15000)}
        sys.exit(main.main(["check", "--no-aot"]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read()
    rc = proc.wait(timeout=60)
    assert head[0] == "environment\n" and head[1].startswith("  key0")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 1
