"""Per-op benchmarks: forward, backward, forward+backward of each fused op vs its reference,
at the block shapes of ViT-Ti/16 (CPU) or ViT-B/16 (CUDA). Saved-for-backward bytes go to extra_info."""

from __future__ import annotations

import pytest
import torch

from vit_fast.perf import bench

SHAPES = {"cpu": bench.OpShape(2, 197, 192, 3, 768), "cuda": bench.OpShape(64, 197, 768, 12, 3072)}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("mode", bench.OP_MODES)
@pytest.mark.parametrize("op", bench.OPS)
def test_op(benchmark, device, dtype, synced, op, mode, impl):
    shape = SHAPES[device.type]
    fn, _ = bench._op_fn(op, impl)
    args, kwargs = bench._op_args(op, shape, device, dtype)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args, **kwargs)
    grad = torch.randn_like(out)
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(*args, **kwargs)

    elif mode == "bwd":
        graph = fn(*args, **kwargs)
        call = lambda: torch.autograd.grad(graph, leaves, grad, retain_graph=True)
    else:
        call = lambda: fn(*args, **kwargs).backward(grad)
    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(
        {"batch": shape.batch, "tokens": shape.tokens, "width": shape.width, "dtype": str(dtype)}
    )
    benchmark.pedantic(synced(call), rounds=5, warmup_rounds=1)
