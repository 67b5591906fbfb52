"""Whole-model benchmarks: inference and training step (forward, loss, backward, SGD step) of the
fused model vs the reference model. ViT-Ti/16 at batch 2 on CPU, ViT-B/16 at batch 64 on CUDA."""

from __future__ import annotations

import pytest
import torch

from vit_fast.models import create_model
from vit_fast.perf.memory import saved_bytes_of_model

CASES = {"cpu": ("vit_tiny_patch16_224", 2), "cuda": ("vit_base_patch16_224", 64)}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_model(benchmark, device, dtype, synced, mode, impl):
    name, batch = CASES[device.type]
    torch.manual_seed(0)
    model = create_model(name, impl=impl).to(device=device, dtype=dtype)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer():
        with torch.no_grad():
            return model.eval()(images)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images).float(), labels).backward()
        opt.step()

    benchmark.group = f"{name} {mode}"
    benchmark.extra_info.update({"batch": batch, "dtype": str(dtype)})
    if mode == "train":
        benchmark.extra_info["saved_bytes"] = saved_bytes_of_model(model.train(), images).activation_bytes
    benchmark.pedantic(synced(step if mode == "train" else infer), rounds=3, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = batch / benchmark.stats.stats.median
