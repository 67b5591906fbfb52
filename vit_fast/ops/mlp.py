"""vit_fast.ops.layer_norm_mlp — placeholder dispatching to the reference until the kernels land."""

from __future__ import annotations

from torch import Tensor

from vit_fast import reference


def layer_norm_mlp(
    x,
    ln_weight,
    ln_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    eps,
    *,
    gamma=None,
    drop_path_scale=None,
    approximate: str = "none",
) -> Tensor:
    """See `vit_fast.reference.layer_norm_mlp`."""
    return reference.layer_norm_mlp(
        x,
        ln_weight,
        ln_bias,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        eps,
        gamma=gamma,
        drop_path_scale=drop_path_scale,
        approximate=approximate,
    )
