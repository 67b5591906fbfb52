"""vit_fast.ops.patch_embed — placeholder dispatching to the reference until the Triton kernel lands."""

from __future__ import annotations

from torch import Tensor

from vit_fast import reference


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None = None,
    reg_tokens: Tensor | None = None,
    *,
    patch_size: int,
    no_embed_class: bool = False,
) -> Tensor:
    """See `vit_fast.reference.patch_embed`."""
    return reference.patch_embed(
        images,
        weight,
        bias,
        pos_embed,
        cls_token,
        reg_tokens,
        patch_size=patch_size,
        no_embed_class=no_embed_class,
    )
