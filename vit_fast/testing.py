"""The numerics rule of docs/design.md ("Numerics"), as a reusable check for tests and `vit-fast check`.

For every output and gradient, with ref64 = the reference in float64 and ref_lp = the reference in
the op's own dtype:  max|ours - ref64| <= k * max|ref_lp - ref64| + atol,
where atol = atol_rel * max|ref64| (scale-aware) and k = 2 unless a caller states and justifies more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The tiny ViT of the tests and scripts/ddp_check.py, in timm's argument names (for
#: `timm.create_model`, `vit_fast.create_model` and `TrainConfig` alike): 2 blocks of width 32 with
#: 2 heads over a 4 x 4 patch grid, seconds per step on a shared CPU with Triton interpreted.
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}

#: The same at 16 px images (4 px patches: the same grid, less image data), for the training tests.
TINY_VIT_16PX = {**TINY_VIT, "img_size": 16, "patch_size": 4}

#: A tiny hybrid (`vit_base_r50_s16_224` with one bottleneck per ResNet stage, width 64).
TINY_HYBRID = {"depth": 1, "embed_dim": 64, "num_heads": 2, "hybrid_layers": (1, 1, 1)}

#: atol relative to the output scale, per dtype of the op under test.
DEFAULT_ATOL_REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Comparison:
    name: str
    err_ours: float
    err_torch: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err_ours <= self.bound

    def __str__(self) -> str:
        return (
            f"{self.name}: max|ours-ref64|={self.err_ours:.3e}, max|ref_lp-ref64|={self.err_torch:.3e}, "
            f"bound={self.bound:.3e} -> {'ok' if self.ok else 'FAIL'}"
        )


def compare(
    name: str,
    ours: Tensor,
    ref64: Tensor,
    ref_lp: Tensor,
    *,
    k: float = 2.0,
    atol_rel: float = 1e-5,
    atol_abs: float = 0.0,
) -> Comparison:
    """Apply the rule to one tensor; non-finite values in ours where ref64 is finite always fail.

    `atol_abs` is an absolute floor for tensors that are zero in exact arithmetic (their own scale
    is rounding noise, so a scale-relative atol would demand bit-equality with PyTorch's noise)."""
    if ours.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    ref64 = ref64.double()
    if not torch.isfinite(ours).all() and torch.isfinite(ref64).all():
        return Comparison(name, float("inf"), 0.0, 0.0)
    err_ours = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    err_torch = (ref_lp.double() - ref64).abs().max().item() if ours.numel() else 0.0
    scale = ref64.abs().max().item() if ours.numel() else 0.0
    return Comparison(name, err_ours, err_torch, k * err_torch + atol_rel * scale + atol_abs)


def _cast(obj: Any, dtype: torch.dtype, grad_mask: dict[int, bool]) -> Any:
    if isinstance(obj, Tensor) and obj.is_floating_point():
        leaf = obj.detach().to(dtype)
        if grad_mask.get(id(obj), False):
            leaf.requires_grad_(True)
        return leaf
    return obj


def run_with_grads(
    fn: Callable[..., Tensor],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    grad_out: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run fn on copies of the args cast to dtype; return the output and the grads of every arg that
    requires grad (keyed 'arg{i}' or the kwarg name)."""
    mask = {id(a): True for a in [*args, *kwargs.values()] if isinstance(a, Tensor) and a.requires_grad}
    cargs = [_cast(a, dtype, mask) for a in args]
    ckwargs = {k: _cast(v, dtype, mask) for k, v in kwargs.items()}
    named = {f"arg{i}": a for i, a in enumerate(cargs)} | ckwargs
    leaves = {k: v for k, v in named.items() if isinstance(v, Tensor) and v.requires_grad}
    out = fn(*cargs, **ckwargs)
    grads: dict[str, Tensor] = {}
    if leaves and grad_out is not None:
        got = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), got)}
    return out.detach(), grads


def check_numerics(
    fused: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    k: float = 2.0,
    atol_rel: float | None = None,
    backward: bool = True,
    seed: int = 0,
) -> list[Comparison]:
    """Check `fused` against `reference` on output and all gradients; raise AssertionError on failure.

    `args`/`kwargs` hold fp32 (or fp64) master tensors; those with requires_grad=True get gradients
    checked. The reference runs in float64 and in `dtype`, the fused op in `dtype`. The same random
    upstream gradient (seeded) is used for all three runs. Returns the comparisons for reporting.
    """
    kwargs = kwargs or {}
    atol_rel = DEFAULT_ATOL_REL[dtype] if atol_rel is None else atol_rel
    with torch.no_grad():
        probe = reference(
            *[_cast(a, torch.float64, {}) for a in args],
            **{n: _cast(v, torch.float64, {}) for n, v in kwargs.items()},
        )
    gen = torch.Generator().manual_seed(seed)
    grad_out = (
        torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(probe.device) if backward else None
    )
    out64, g64 = run_with_grads(reference, args, kwargs, torch.float64, grad_out)
    out_lp, g_lp = run_with_grads(reference, args, kwargs, dtype, grad_out)
    ours, g_ours = run_with_grads(fused, args, kwargs, dtype, grad_out)
    if ours.dtype != dtype:
        raise AssertionError(f"output dtype {ours.dtype} != input dtype {dtype}")
    results = [compare("out", ours, out64, out_lp, k=k, atol_rel=atol_rel)]
    for name in g64:
        results.append(compare(f"grad[{name}]", g_ours[name], g64[name], g_lp[name], k=k, atol_rel=atol_rel))
    failed = [r for r in results if not r.ok]
    if failed:
        raise AssertionError("numerics rule failed:\n" + "\n".join(str(r) for r in results))
    return results
