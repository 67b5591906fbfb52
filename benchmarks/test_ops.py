"""Per-op benchmarks: forward, backward, forward+backward of each fused op vs its reference, at the
block shapes of ViT-Ti/16 (CPU) or ViT-B/16 (CUDA), through the harness's public API
(`bench.op_callable`, `bench.op_inputs`, `bench.op_mode_calls`: the calls `vit-fast bench` times)."""

from __future__ import annotations

import pytest

from vit_fast.perf import bench

SHAPES = {"cpu": bench.OpShape(2, 197, 192, 3, 768), "cuda": bench.OpShape(64, 197, 768, 12, 3072)}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("mode", bench.OP_MODES)
@pytest.mark.parametrize("op", bench.OPS)
def test_op(benchmark, device, dtype, synced, op, mode, impl):
    shape = SHAPES[device.type]
    fn, _ = bench.op_callable(op, impl)
    args, kwargs = bench.op_inputs(op, shape, device, dtype)
    call = bench.op_mode_calls(fn, args, kwargs)[mode]
    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(
        {"batch": shape.batch, "tokens": shape.tokens, "width": shape.width, "dtype": str(dtype)}
    )
    benchmark.pedantic(synced(call), rounds=5, warmup_rounds=1)
