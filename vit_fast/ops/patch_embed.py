"""vit_fast.ops.patch_embed: image -> tokens (patch projection + bias + class/register tokens +
position embedding) as one fused op, with its backward.

Layers:
  * `patch_embed` (public): validates every argument (raising before any launch), applies autocast,
    then calls the custom op `vit_fast::patch_embed_fwd`.
  * `vit_fast::patch_embed_fwd` / `vit_fast::patch_embed_bwd`: torch.library custom ops with fake
    kernels and autograd; their bodies dispatch by `select_backend(device, "patch_embed")` to the
    Triton kernels (`vit_fast.kernels.patch_embed`), the C++ extension (`vit_fast._C`), or the
    plain-PyTorch `vit_fast.plain.patch_embed`. All three implement the functions of
    vit_fast/ops/contract.py, family `patch_embed`.

Saved for backward: `images` and `weight` only (the patches are gathered again from the image for
dweight; bias / pos / cls / reg need nothing but the upstream gradient).
"""

from typing import Any

import torch
from torch import Tensor

from vit_fast.ops._checks import autocast_args, autocast_off, check_nonempty, check_shape, check_tensor
from vit_fast.ops._eager import run_op
from vit_fast.ops.backend import backend_fns
from vit_fast.ops.contract import bind, schema

__all__ = ["patch_embed"]

_FAMILY = "patch_embed"


# ---------------------------------------------------------------------------------------------
# torch.library registration, the inputs of each op exactly its contract function's. Backend
# dispatch: the contract function on the backend `backend_fns` picks (measured per call shape when
# nothing is forced), with autocast off inside: every backend does its own fp32 math. The backward
# op cannot return optional tensors (schema limit), so absent gradients travel as empty tensors and
# are turned back into None by the autograd formula.


@torch.library.custom_op(
    "vit_fast::patch_embed_fwd", mutates_args=(), schema=schema("patch_embed_forward", "Tensor")
)
def _patch_embed_fwd(*args: Any) -> Tensor:
    """Inputs: contract `patch_embed_forward` -> tokens [B, T, D]."""
    images = bind("patch_embed_forward", args).images
    with autocast_off(images.device.type):
        return backend_fns(images.device, _FAMILY, images.dtype).patch_embed_forward(*args)


@_patch_embed_fwd.register_fake
def _(*args):
    a = bind("patch_embed_forward", args)
    grid = (a.images.shape[2] // a.patch_size) * (a.images.shape[3] // a.patch_size)
    prefix = (a.cls_token is not None) + (0 if a.reg_tokens is None else a.reg_tokens.shape[1])
    return a.images.new_empty((a.images.shape[0], grid + prefix, a.weight.shape[0]))


@torch.library.custom_op(
    "vit_fast::patch_embed_bwd",
    mutates_args=(),
    schema=schema("patch_embed_backward", "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
)
def _patch_embed_bwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs: contract `patch_embed_backward` -> (dimages, dweight, dbias, dpos_embed, dcls_token,
    dreg_tokens), absent ones as 0-element tensors."""
    a = bind("patch_embed_backward", args)
    with autocast_off(a.images.device.type):
        grads = backend_fns(a.images.device, _FAMILY, a.images.dtype).patch_embed_backward(*args)
    empty = a.weight.new_empty(0)
    return tuple(empty.clone() if g is None else g for g in grads)  # type: ignore[return-value]


@_patch_embed_bwd.register_fake
def _(*args):
    a = bind("patch_embed_backward", args)
    D, T = a.weight.shape[0], a.grad.shape[1]
    prefix = int(a.has_cls) + a.num_reg

    def maybe(flag: bool, shape: tuple) -> Tensor:
        return a.weight.new_empty(shape if flag else (0,))

    return (
        torch.empty_like(a.images) if a.needs_image_grad else a.weight.new_empty(0),
        torch.empty_like(a.weight, memory_format=torch.contiguous_format),
        maybe(a.has_bias, (D,)),
        maybe(a.has_pos, (1, T - prefix if a.no_embed_class else T, D)),
        maybe(a.has_cls, (1, 1, D)),
        maybe(a.num_reg > 0, (1, a.num_reg, D)),
    )


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    images, weight, bias, pos_embed, cls_token, reg_tokens, patch_size, no_embed_class = inputs
    ctx.save_for_backward(images, weight)
    ctx.flags = (
        bias is not None,
        pos_embed is not None,
        cls_token is not None,
        0 if reg_tokens is None else reg_tokens.shape[1],
        patch_size,
        no_embed_class,
    )


def _backward(ctx: Any, grad: Tensor) -> tuple:
    images, weight = ctx.saved_tensors
    has_bias, has_pos, has_cls, num_reg, patch_size, no_embed_class = ctx.flags
    dimages, dweight, dbias, dpos, dcls, dreg = _patch_embed_bwd(
        grad.contiguous(),
        images,
        weight,
        has_bias,
        has_pos,
        has_cls,
        num_reg,
        patch_size,
        no_embed_class,
        ctx.needs_input_grad[0],
    )
    return (
        dimages if ctx.needs_input_grad[0] else None,
        dweight,
        dbias if has_bias else None,
        dpos if has_pos else None,
        dcls if has_cls else None,
        dreg if num_reg else None,
        None,
        None,
    )


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public op.


def _validate(
    images: Any,
    weight: Any,
    bias: Any,
    pos_embed: Any,
    cls_token: Any,
    reg_tokens: Any,
    patch_size: Any,
    no_embed_class: Any,
) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(
            f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)} "
            "(add a batch dim with images.unsqueeze(0) for a single image)"
        )
    check_tensor(images, "images", ndim=4)
    dev, dt = images.device, images.dtype
    B, C, H, W = images.shape
    if B == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(images.shape)})")
    check_nonempty(images, "images")
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"images spatial size ({H}, {W}) is not divisible by patch_size {patch_size}; "
            "resize or pad the images to a multiple of the patch size"
        )
    check_tensor(weight, "weight", ndim=4, device=dev, dtype=dt)
    D = weight.shape[0]
    if weight.shape[2:] != (patch_size, patch_size):
        raise ValueError(
            f"weight must be [D, C, p, p] with square p x p = {patch_size} x {patch_size} kernels "
            f"(patch_size), got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != C:
        raise ValueError(f"weight has {weight.shape[1]} input channels but images has C={C} channels")
    check_nonempty(weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, device=dev, dtype=dt)
        check_shape(bias, "bias", (D,))
    num_patches = (H // patch_size) * (W // patch_size)
    num_reg = 0
    if cls_token is not None:
        check_tensor(cls_token, "cls_token", ndim=3, device=dev, dtype=dt)
        check_shape(cls_token, "cls_token", (1, 1, D))
    if reg_tokens is not None:
        check_tensor(reg_tokens, "reg_tokens", ndim=3, device=dev, dtype=dt)
        if reg_tokens.shape[0] != 1 or reg_tokens.shape[2] != D:
            raise ValueError(f"reg_tokens must have shape (1, R, {D}), got {tuple(reg_tokens.shape)}")
        num_reg = reg_tokens.shape[1]
    if pos_embed is not None:
        check_tensor(pos_embed, "pos_embed", ndim=3, device=dev, dtype=dt)
        prefix = int(cls_token is not None) + num_reg
        L = num_patches if no_embed_class else prefix + num_patches
        if tuple(pos_embed.shape) != (1, L, D):
            raise ValueError(
                f"pos_embed must have shape (1, {L}, {D}) for a {H // patch_size}x{W // patch_size} patch "
                f"grid{'' if no_embed_class else f' plus {prefix} prefix tokens'} "
                f"(no_embed_class={no_embed_class}), got {tuple(pos_embed.shape)}; resample it to the grid first"
            )


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
    """Fused image -> tokens, with the contract of `vit_fast.reference.patch_embed`.

    images [B, C, H, W] (fp32/fp16/bf16; NCHW, channels-last or any strides); weight [D, C, p, p]
    (Conv2d layout); bias [D]; pos_embed [1, L, D] (L = Np when `no_embed_class`, else prefix + Np,
    already resampled to the (H/p, W/p) grid); cls_token [1, 1, D]; reg_tokens [1, R, D]; all in
    the images' dtype and device. Returns [B, T, D] in that dtype, tokens ordered
    [cls, reg..., patches (row-major)...]. Accumulation is fp32. Under autocast, floating inputs
    are cast to the autocast dtype first. Saves `images` and `weight` for backward.
    """
    if isinstance(images, Tensor):
        # Like a Conv2d under autocast: every floating input runs in the autocast dtype.
        images, weight, bias, pos_embed, cls_token, reg_tokens = autocast_args(
            images.device.type,
            *(
                t if isinstance(t, Tensor) else None
                for t in (images, weight, bias, pos_embed, cls_token, reg_tokens)
            ),
        )
    _validate(images, weight, bias, pos_embed, cls_token, reg_tokens, patch_size, no_embed_class)
    if reg_tokens is not None and reg_tokens.shape[1] == 0:
        reg_tokens = None
    return run_op(
        _patch_embed_fwd,
        images,
        weight,
        bias,
        pos_embed,
        cls_token,
        reg_tokens,
        int(patch_size),
        bool(no_embed_class),
    )
