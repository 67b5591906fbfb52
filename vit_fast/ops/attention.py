"""vit_fast.ops.attention — placeholder dispatching to the reference until the Triton kernel lands."""

from __future__ import annotations

from torch import Tensor

from vit_fast import reference


def attention(qkv: Tensor, num_heads: int, *, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """See `vit_fast.reference.attention`."""
    return reference.attention(qkv, num_heads, scale=scale, dropout_p=dropout_p)
