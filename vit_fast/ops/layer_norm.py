"""vit_fast.ops LayerNorm family — placeholders dispatching to the reference until the kernels land."""

from __future__ import annotations

from torch import Tensor

from vit_fast import reference


def layer_norm(x, weight, bias, eps=1e-6, *, residual=None):
    """See `vit_fast.reference.layer_norm`."""
    return reference.layer_norm(x, weight, bias, eps, residual=residual)


def layer_norm_linear(x, ln_weight, ln_bias, weight, bias, eps) -> Tensor:
    """See `vit_fast.reference.layer_norm_linear`."""
    return reference.layer_norm_linear(x, ln_weight, ln_bias, weight, bias, eps)


def linear_residual(x, weight, bias, residual, *, gamma=None, drop_path_scale=None) -> Tensor:
    """See `vit_fast.reference.linear_residual`."""
    return reference.linear_residual(x, weight, bias, residual, gamma=gamma, drop_path_scale=drop_path_scale)
