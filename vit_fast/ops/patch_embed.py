"""vit_fast.ops.patch_embed: image -> tokens (patch projection + bias + class/register tokens +
position embedding) as one fused op, with its backward.

Layers:
  * `patch_embed` (public): validates every argument (raising before any launch), applies autocast,
    then calls the custom op `vit_fast::patch_embed`.
  * `vit_fast::patch_embed` / `vit_fast::patch_embed_backward`: torch.library custom ops with fake
    kernels and autograd; their bodies dispatch by `select_backend(device, "patch_embed")` to the
    Triton kernels (`vit_fast.kernels.patch_embed`), the C++ extension (`vit_fast._C`), or the
    pure-PyTorch `reference_patch_embed_forward/backward` below. All three implement the functions
    of docs/backend_contract.md, family `patch_embed`.

Saved for backward: `images` and `weight` only (the patches are gathered again from the image for
dweight; bias / pos / cls / reg need nothing but the upstream gradient).
"""

from typing import Any

import torch
from torch import Tensor

from vit_fast.ops._checks import autocast_args, autocast_off, check_nonempty, check_shape, check_tensor
from vit_fast.ops.backend import cpu_extension, tuned_backend

__all__ = [
    "patch_embed",
    "reference_patch_embed_backward",
    "reference_patch_embed_forward",
]

_FAMILY = "patch_embed"


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch backend (contract functions).


def _patches(images: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B*Np, C*p*p], rows row-major over the grid, columns in Conv2d weight order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * (H // p) * (W // p), C * p * p)


def reference_patch_embed_forward(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None,
    reg_tokens: Tensor | None,
    patch_size: int,
    no_embed_class: bool,
) -> Tensor:
    """Reference backend of `patch_embed_forward`: fp32 math, result in the images' dtype."""
    B, _, H, W = images.shape
    p = patch_size
    Np = (H // p) * (W // p)
    D = weight.shape[0]
    x = (_patches(images.float(), p) @ weight.float().reshape(D, -1).t()).reshape(B, Np, D)
    if bias is not None:
        x = x + bias.float()
    prefix = [t.float().expand(B, -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    if pos_embed is not None and no_embed_class:
        x = x + pos_embed.float()
    if prefix:
        x = torch.cat([*prefix, x], dim=1)
    if pos_embed is not None and not no_embed_class:
        x = x + pos_embed.float()
    return x.to(images.dtype)


def reference_patch_embed_backward(
    grad: Tensor,
    images: Tensor,
    weight: Tensor,
    has_bias: bool,
    has_pos: bool,
    has_cls: bool,
    num_reg: int,
    patch_size: int,
    no_embed_class: bool,
    needs_image_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Reference backend of `patch_embed_backward` (fp32 reductions, grads in the weight's dtype)."""
    B, C, H, W = images.shape
    p = patch_size
    gh, gw = H // p, W // p
    D = weight.shape[0]
    prefix = int(has_cls) + num_reg
    g = grad.float()
    gp = g[:, prefix:].reshape(B * gh * gw, D)
    dweight = (gp.t() @ _patches(images.float(), p)).reshape(weight.shape).to(weight.dtype)
    dbias = gp.sum(0).to(weight.dtype) if has_bias else None
    gsum = g.sum(0, keepdim=True)  # [1, T, D]
    dpos = (gsum[:, prefix:] if no_embed_class else gsum).to(weight.dtype) if has_pos else None
    dcls = gsum[:, :1].to(weight.dtype) if has_cls else None
    dreg = gsum[:, int(has_cls) : prefix].to(weight.dtype) if num_reg else None
    dimages = None
    if needs_image_grad:
        dx = (gp @ weight.float().reshape(D, -1)).reshape(B, gh, gw, C, p, p)
        dx = dx.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        dimages = torch.empty_like(images).copy_(dx)
    # Distinct storage per output: custom ops must not return aliasing tensors.
    return tuple(None if t is None else t.clone() for t in (dimages, dweight, dbias, dpos, dcls, dreg))


# ---------------------------------------------------------------------------------------------
# Backend dispatch.


def _choose(args: tuple[Any, ...], op: str, run: Any) -> str:
    """select_backend's answer, refined by measurement (vit_fast.tuning.ops) when nothing is forced."""
    return tuned_backend(args[0].device, _FAMILY, op, args, run, args[0].dtype)


def _backend_forward(*args: Any) -> Tensor:
    def run(backend: str) -> Tensor:
        return _run_forward(backend, *args)

    return run(_choose(args, "patch_embed_forward", run))


def _run_forward(backend: str, *args: Any) -> Tensor:
    if backend == "triton":
        from vit_fast.kernels.patch_embed import patch_embed_forward

        return patch_embed_forward(*args)
    if backend == "cpu":
        return cpu_extension().patch_embed_forward(*args)
    # The reference does its own fp32 math: keep an enclosing autocast from re-casting it.
    with autocast_off(args[0].device.type):
        return reference_patch_embed_forward(*args)


def _backend_backward(*args: Any) -> tuple[Tensor | None, ...]:
    def run(backend: str) -> tuple[Tensor | None, ...]:
        return _run_backward(backend, *args)

    return run(_choose(args, "patch_embed_backward", run))


def _run_backward(backend: str, *args: Any) -> tuple[Tensor | None, ...]:
    if backend == "triton":
        from vit_fast.kernels.patch_embed import patch_embed_backward

        return patch_embed_backward(*args)
    if backend == "cpu":
        return tuple(cpu_extension().patch_embed_backward(*args))
    with autocast_off(args[0].device.type):
        return reference_patch_embed_backward(*args)


# ---------------------------------------------------------------------------------------------
# torch.library registration. The backward op cannot return optional tensors (schema limit), so
# absent gradients travel as empty tensors and are turned back into None by the autograd formula.


@torch.library.custom_op("vit_fast::patch_embed", mutates_args=())
def _patch_embed_op(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None,
    reg_tokens: Tensor | None,
    patch_size: int,
    no_embed_class: bool,
) -> Tensor:
    return _backend_forward(
        images, weight, bias, pos_embed, cls_token, reg_tokens, patch_size, no_embed_class
    )


def _num_tokens(images: Tensor, patch_size: int, cls_token: Tensor | None, reg_tokens: Tensor | None) -> Any:
    n = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    return n + (cls_token is not None) + (0 if reg_tokens is None else reg_tokens.shape[1])


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token, reg_tokens, patch_size, no_embed_class):
    T = _num_tokens(images, patch_size, cls_token, reg_tokens)
    return images.new_empty((images.shape[0], T, weight.shape[0]))


@torch.library.custom_op("vit_fast::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(
    grad: Tensor,
    images: Tensor,
    weight: Tensor,
    has_bias: bool,
    has_pos: bool,
    has_cls: bool,
    num_reg: int,
    patch_size: int,
    no_embed_class: bool,
    needs_image_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backend_backward(
        grad,
        images,
        weight,
        has_bias,
        has_pos,
        has_cls,
        num_reg,
        patch_size,
        no_embed_class,
        needs_image_grad,
    )
    empty = weight.new_empty(0)
    return tuple(empty.clone() if g is None else g for g in grads)  # type: ignore[return-value]


@_patch_embed_backward_op.register_fake
def _(
    grad, images, weight, has_bias, has_pos, has_cls, num_reg, patch_size, no_embed_class, needs_image_grad
):
    D = weight.shape[0]
    T = grad.shape[1]
    prefix = int(has_cls) + num_reg

    def maybe(flag: bool, shape: tuple) -> Tensor:
        return weight.new_empty(shape if flag else (0,))

    dimages = torch.empty_like(images) if needs_image_grad else weight.new_empty(0)
    return (
        dimages,
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        maybe(has_bias, (D,)),
        maybe(has_pos, (1, T - prefix if no_embed_class else T, D)),
        maybe(has_cls, (1, 1, D)),
        maybe(num_reg > 0, (1, num_reg, D)),
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
    dimages, dweight, dbias, dpos, dcls, dreg = _patch_embed_backward_op(
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


torch.library.register_autograd("vit_fast::patch_embed", _backward, setup_context=_setup_context)


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
    return _patch_embed_op(
        images, weight, bias, pos_embed, cls_token, reg_tokens, int(patch_size), bool(no_embed_class)
    )
