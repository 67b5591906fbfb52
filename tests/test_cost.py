"""The cost model (vit_fast.perf.cost: tracing, FLOPs, the torch.compile model, the calibrated
predictor, the break-even) and the saved-for-backward recorder (vit_fast.perf.memory).

These check counts that are exact by construction (bytes, FLOPs, launches of tiny programs), the
ViT-B/16 forward FLOPs against the published 35.1 GFLOPs, and eager-vs-fused sanity. No timing.
"""

from __future__ import annotations

import pytest
import torch

from vit_fast.perf import cost
from vit_fast.perf.memory import SavedTensorRecorder, record_saved


def _trace(fn, *shapes, dtype=torch.float32):
    mode = cost.CostMode()
    with cost.fake_mode():
        args = [torch.empty(s, dtype=dtype) for s in shapes]
        with mode:
            fn(*args)
    return mode.records


def test_views_and_metadata_cost_nothing():
    def fn(x):
        y = x.view(8, 4).t().unsqueeze(0).expand(3, 4, 8)
        y.detach()
        torch.empty(5)

    assert _trace(fn, (4, 8)) == []
    # ...but a reshape that must copy (a transposed input) is a real launch.
    records = _trace(lambda x: x.t().reshape(32), (4, 8))
    assert [(r.op, r.launches, r.bytes) for r in records] == [("aten::clone", 1, 2 * 32 * 4)]


def test_elementwise_bytes_count_reads_and_writes_and_broadcast_once():
    records = _trace(lambda x, b: x + b, (16, 32), (32,))
    assert len(records) == 1
    r = records[0]
    assert (r.op, r.launches, r.flops, r.kind) == ("aten::add", 1, 0, "elementwise")
    # read x (16*32) and b (32, broadcast: read once), write the output (16*32), fp32.
    assert r.bytes == (16 * 32 + 32 + 16 * 32) * 4
    assert cost.tensor_bytes(torch.zeros(32).expand(16, 32)) == 32 * 4


def test_mm_flops_bytes_and_roofline():
    records = _trace(lambda a, b: a @ b, (64, 32), (32, 16), dtype=torch.bfloat16)
    assert len(records) == 1
    r = records[0]
    assert r.kind == "gemm" and r.flops == 2 * 64 * 32 * 16
    assert r.bytes == (64 * 32 + 32 * 16 + 64 * 16) * 2
    h100 = cost.GPUS["h100"]
    expected = max(r.flops / 989e12, r.bytes / 3.35e12) + 3e-6
    assert r.time_s(h100) == pytest.approx(expected)
    # Large GEMMs are compute bound in the model: doubling K doubles the FLOP term.
    big = cost.OpRecord("aten::mm", "gemm", "forward", 1, 10**6, 10**15, torch.bfloat16)
    assert big.time_s(h100, 0.0) == pytest.approx(1e15 / 989e12)


def test_backward_phase_and_saved_bytes():
    mode = cost.CostMode()
    with cost.fake_mode():
        w = torch.empty(32, 16, requires_grad=True)
        x = torch.empty(8, 16)
        rec = SavedTensorRecorder([w])
        with mode, rec:
            y = torch.nn.functional.linear(x, w).relu()
        mode.phase = "backward"
        with mode:
            y.sum().backward()
    phases = {r.phase for r in mode.records}
    assert phases == {"forward", "backward"}
    bwd_flops = sum(r.flops for r in mode.records if r.phase == "backward")
    fwd_flops = sum(r.flops for r in mode.records if r.phase == "forward")
    assert fwd_flops == 2 * 8 * 32 * 16
    assert bwd_flops == fwd_flops  # only dW: x does not require grad
    # relu saves its output [8, 32] fp32; mm saves x [8, 16]; w is excluded as a parameter.
    assert rec.result.activation_bytes == (8 * 32 + 8 * 16) * 4
    assert rec.result.param_bytes == 0  # x needs no grad, so w is not saved


def test_saved_recorder_dedupes_by_storage():
    x = torch.randn(64, requires_grad=True)
    with record_saved() as saved:
        y = x.exp()  # saves its result y
        z = y * y  # saves y twice (self and other): same storage, counted once
        w = z[:32].sin()  # saves a view of z: z's whole storage stays alive
    assert saved.count >= 4
    assert saved.activation_bytes == y.nbytes + z.untyped_storage().nbytes()
    del w


def test_every_registered_custom_op_has_a_flop_formula():
    import vit_fast.ops  # noqa: F401  (registers the custom ops)

    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vit_fast::")]
    missing = [n for n in ops if not cost.has_flop_formula(n)]
    assert not missing, f"add FLOP formulas to vit_fast.perf.cost.flops.FAMILY_FLOPS for {missing}"


def test_vit_b16_forward_flops_within_2_percent():
    gflops = cost.forward_gflops_per_image("vit_base_patch16_224", "timm")
    assert abs(gflops - 35.1) / 35.1 < 0.02, gflops


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_vit_b16_forward_flops_ours(impl):
    # The fused model's FLOPs come from our custom-op formulas: they must add up to the same count.
    gflops = cost.forward_gflops_per_image("vit_base_patch16_224", impl)
    assert abs(gflops - 35.1) / 35.1 < 0.02, gflops


def test_training_step_report_structure_and_fused_vs_reference():
    ref = cost.trace_step("vit_tiny_patch16_224", "reference", 2, torch.bfloat16, label="reference")
    fused = cost.trace_step("vit_tiny_patch16_224", "fused", 2, torch.bfloat16, label="fused")
    for rep in (ref, fused):
        d = rep.to_dict()
        assert set(d["phases"]) == {"forward", "backward", "optimizer"}
        tot = d["total"]
        assert tot["launches"] > 0 and tot["bytes"] > 0 and tot["flops"] > 0
        assert all(t > 0 for t in tot["time_s"].values())
        assert rep.saved_bytes > 0
        assert not rep.unknown_ops
        # training FLOPs ~ 3x forward (backward computes dX and dW), within a loose band.
        assert 2.5 < rep.flops() / rep.flops(["forward"]) < 3.5
    table = cost.format_comparison([ref, fused])
    assert table.startswith("MODELED") and "ratio" in table and "TOTAL" in table
    n_custom = sum(r.op.startswith("vit_fast::") for r in fused.records)
    if n_custom == 0:
        pytest.skip("the fused model runs no vit_fast:: custom op yet; nothing fused to compare")
    assert sum(r.op.startswith("vit_fast::") for r in ref.records) == 0
    # Fusion must remove launches and bytes; recomputation in backward must shrink saved activations.
    assert fused.total().launches < ref.total().launches
    assert fused.total().bytes < ref.total().bytes
    assert fused.saved_bytes < ref.saved_bytes


def test_attention_backward_is_2_5x_forward_for_sdpa_and_ours():
    import vit_fast.ops as fused

    def sdpa(q, k, v):
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    mode = cost.CostMode()
    with cost.fake_mode():
        q, k, v = (torch.empty(2, 3, 17, 16, requires_grad=True) for _ in range(3))
        qkv = torch.empty(2, 17, 3 * 48, requires_grad=True)
        with mode:
            sdpa(q, k, v)
            fused.attention(qkv, 3).sum().backward()
    attn = [r for r in mode.records if r.kind.endswith("attention")]
    fwd = 4 * 2 * 17 * 17 * 48  # 4 * B * T^2 * D, for both programs
    assert len(attn) == 4  # forward and backward of each: one launch each, not descended into
    assert sorted(r.flops for r in attn) == sorted([fwd, fwd * 5 // 2, fwd, fwd * 5 // 2])


def test_trace_step_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        cost.trace_step("vit_tiny_patch16_224", "fused", 0)
    with pytest.raises(ValueError, match="dtype"):
        cost.trace_step("vit_tiny_patch16_224", "fused", 1, torch.int8)
    with pytest.raises(ValueError, match="impl"):
        cost.trace_step("vit_tiny_patch16_224", "tensorrt", 1)


# A self-contained custom op with a Triton body, to test kernel-level tracing without depending on
# the shipped kernels: two launches of a scaling kernel plus one aten reduction.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


@torch.library.custom_op("vit_fast_costtest::scale_twice", mutates_args=())
def _scale_twice(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tmp, out = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    _scale_kernel[(triton.cdiv(n, 64),)](x, tmp, n, BLOCK=64)
    _scale_kernel[(triton.cdiv(n, 64),)](tmp, out, n, BLOCK=64)
    return out, out.sum()


@_scale_twice.register_fake
def _(x):
    return torch.empty_like(x), x.new_empty(())


@torch.library.custom_op("vit_fast_costtest::data_dependent", mutates_args=())
def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum())  # reads a value: cannot run on fake tensors


@_data_dependent.register_fake
def _(x):
    return torch.empty_like(x)


def test_kernel_level_counts_triton_launches_and_inner_ops(monkeypatch):
    monkeypatch.setattr(cost.dispatch, "KERNEL_LEVEL_NAMESPACES", {"vit_fast_costtest"})
    mode = cost.CostMode(kernel_level=True)
    with cost.fake_mode():
        x = torch.empty(1000)
        with mode:
            torch.ops.vit_fast_costtest.scale_twice(x)
            torch.ops.vit_fast_costtest.data_dependent(x)
    (traced, fallback) = mode.records
    assert traced.op == "vit_fast_costtest::scale_twice"
    assert traced.launches == 3  # two Triton launches + the sum; the allocations are free
    assert traced.bytes == 2 * (2 * 4000) + (4000 + 4)
    assert fallback.launches == 1 and fallback.bytes == 2 * 4000  # one launch at the op boundary
    assert "vit_fast_costtest::data_dependent" in mode.kernel_level_failed
    assert "vit_fast_costtest::scale_twice" not in mode.kernel_level_failed
