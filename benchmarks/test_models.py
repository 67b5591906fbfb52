"""Whole-model benchmarks through the harness's step helper (`vit_fast.perf.workload`: the same
inference and training step, forward + cross-entropy + backward + SGD, that `vit-fast bench` times):
the fused model vs the reference model (ViT-Ti/16 at batch 2 on CPU, ViT-B/16 at batch 64 on CUDA),
and timm's NaFlexVit on a mixed-length batch, stock (SDPA with its mask) vs `vit_fast.patch_timm`."""

from __future__ import annotations

import copy

import pytest
import torch

from vit_fast.perf import bench, workload
from vit_fast.perf.memory import saved_bytes_of_model

CASES = {"cpu": ("vit_tiny_patch16_224", 2), "cuda": ("vit_base_patch16_224", 64)}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_model(benchmark, device, dtype, synced, mode, impl):
    name, batch = CASES[device.type]
    torch.manual_seed(0)
    model = workload.build_model(name, impl, device, dtype)
    images, labels = workload.image_batch(model, batch, device, dtype)
    step = workload.make_steps(model, images, workload.cross_entropy(labels))[mode]
    benchmark.group = f"{name} {mode}"
    benchmark.extra_info.update({"batch": batch, "dtype": str(dtype)})
    if mode == "train":
        benchmark.extra_info["saved_bytes"] = saved_bytes_of_model(model.train(), images).activation_bytes
    benchmark.pedantic(synced(step), rounds=3, warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable (each case then runs once, untimed)
        benchmark.extra_info["samples_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.skipif(not bench.timm_available(), reason="timm not installed")
@pytest.mark.parametrize("impl", ["stock", "patched"])
def test_naflex_train_step(benchmark, device, dtype, synced, impl):
    from vit_fast.integrations.timm import patch_timm

    torch.manual_seed(0)
    model = workload.build_model(bench.NAFLEX_DEFAULT, "timm", device, dtype)
    if impl == "patched":
        model = patch_timm(copy.deepcopy(model))
    grids = workload.naflex_grids(bench.NAFLEX_BATCH, bench.NAFLEX_MAX_PATCHES)
    inputs = workload.naflex_batch(grids, model.embeds.patch_size[0], device=device, dtype=dtype)
    labels = torch.randint(0, model.num_classes, (len(grids),), device=device)
    step = workload.make_steps(model, inputs, workload.cross_entropy(labels))["train"]
    benchmark.group = f"{bench.NAFLEX_DEFAULT} train (mixed lengths)"
    benchmark.extra_info.update({"patches_per_image": [h * w for h, w in grids], "dtype": str(dtype)})
    benchmark.pedantic(synced(step), rounds=3, warmup_rounds=1)
