"""What the measuring tools run: one model builder, one synthetic batch, one inference / training step.

`vit-fast bench`, `profile`, `cost`, `validate` and the pytest-benchmark suites in benchmarks/ all
build their models with `build_model` and time the steps `make_steps` returns, so "a training step"
means the same thing everywhere: forward, loss, backward, one SGD step (gradients set to None first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: Model impls `build_model` knows: vit_fast's models ("fused", "reference", "auto"), the
#: torch.compile'd reference ("compiled"), stock timm ("timm": its SDPA attention; "timm-math": the
#: attention written out, as timm ran before torch 2.0) and torch.compile(timm) ("timm_compiled").
MODEL_IMPLS = ("fused", "reference", "auto", "compiled", "timm", "timm-math", "timm_compiled")

#: torch.compile backend of the compiled impls when the caller names none ("inductor" is what users run).
DEFAULT_COMPILE_BACKEND = "inductor"


def build_model(
    name: str,
    impl: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    compile_backend: str = DEFAULT_COMPILE_BACKEND,
    **kwargs: Any,
) -> nn.Module:
    """Model `name` as `impl` (see `MODEL_IMPLS`) with random weights, never downloaded.

    `kwargs` override the model configuration (depth, img_size, ...). The model is moved to
    `device` / `dtype` when given (call it under `torch.device("meta")` for shapes only, as the cost
    model does). The compiled impls return `torch.compile(model, backend=compile_backend)`; the
    module it wraps is `out._orig_mod`.
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}, got {impl!r}")
    if impl in ("timm", "timm-math", "timm_compiled"):
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        if impl == "timm-math":
            for mod in model.modules():
                if hasattr(mod, "fused_attn"):
                    mod.fused_attn = False
    else:
        from vit_fast.models import create_model

        model = create_model(name, impl="reference" if impl == "compiled" else impl, **kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if impl in ("compiled", "timm_compiled"):
        model = torch.compile(model, backend=compile_backend)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper runs (the model itself when it is not compiled)."""
    return getattr(model, "_orig_mod", model)


def image_batch(
    model: nn.Module, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Random images [batch, C, H, W] at the model's image size and class labels [batch] (int64)."""
    base = unwrap(model)
    pe = base.patch_embed
    size = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    chans = getattr(pe, "in_chans", None) or pe.proj.in_channels
    images = torch.randn(batch, chans, int(size[0]), int(size[1]), device=device, dtype=dtype)
    labels = torch.randint(0, max(1, base.num_classes), (batch,), device=device)
    return images, labels


def cross_entropy(labels: Tensor) -> Callable[[Any], Tensor]:
    """The loss of a classifier's logits against `labels` (in float32, as AMP training computes it)."""
    return lambda logits: torch.nn.functional.cross_entropy(logits.float(), labels)


def make_steps(
    model: nn.Module,
    inputs: Any,
    loss: Callable[[Any], Tensor],
    *,
    lr: float = 1e-4,
    ranges: bool = False,
) -> dict[str, Callable[[], None]]:
    """{"inference": no-grad forward in eval mode, "train": one training step} of `model` on `inputs`.

    The training step: train mode, gradients set to None, `loss(model(inputs))`, backward, one SGD
    step (lr `lr`). `ranges=True` wraps it in torch.profiler ranges "train_step", with "backward" and
    "optimizer" inside (what `vit-fast profile` shows)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    region = torch.profiler.record_function if ranges else lambda name: contextlib.nullcontext()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(inputs)

    def train_step() -> None:
        with region("train_step"):
            model.train()
            opt.zero_grad(set_to_none=True)
            value = loss(model(inputs))
            with region("backward"):
                value.backward()
            with region("optimizer"):
                opt.step()

    return {"inference": infer, "train": train_step}


def naflex_grids(batch: int, max_patches: int = 256, seed: int = 0) -> list[tuple[int, int]]:
    """A NaFlex-style mix of image shapes: per image a patch grid (h, w), h drawn in [4, 24), w in
    [4, 24) capped so that h * w <= max_patches (different sizes and aspect ratios), seeded."""
    if batch < 1 or max_patches < 4:
        raise ValueError(f"batch must be >= 1 and max_patches >= 4, got {batch}, {max_patches}")
    gen = torch.Generator().manual_seed(seed)
    grids = []
    for _ in range(batch):
        h = min(int(torch.randint(4, 24, (1,), generator=gen)), max_patches)
        w = max(1, min(int(torch.randint(4, 24, (1,), generator=gen)), max_patches // h))
        grids.append((h, w))
    return grids


def naflex_batch(
    grids: list[tuple[int, int]],
    patch: int,
    in_chans: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """timm NaFlexVit's input for images with patch `grids`: "patches" [B, N, patch * patch * C]
    (random pixels), "patch_coord" [B, N, 2] (row, column; int64), "patch_valid" [B, N] (bool), each
    image's patches first and padding at the end, N = the largest h * w (as timm's NaFlex collator)."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = max(h * w for h, w in grids), patch * patch * in_chans
    patches = torch.zeros(len(grids), n, dim)
    coord = torch.zeros(len(grids), n, 2, dtype=torch.long)
    valid = torch.zeros(len(grids), n, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        patches[b, : h * w] = torch.randn(h * w, dim, generator=gen)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[b, : h * w] = torch.stack((ys.flatten(), xs.flatten()), -1)
        valid[b, : h * w] = True
    return {
        "patches": patches.to(device=device, dtype=dtype),
        "patch_coord": coord.to(device),
        "patch_valid": valid.to(device),
    }
