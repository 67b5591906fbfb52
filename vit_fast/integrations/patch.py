"""`vit_fast.patch(model)`: fuse the ViT of whichever library built `model`, in place, and back.

Design: nothing in the module tree is replaced. Each transformer layer (and, where the layout is
the stock one, the patch embedding) gets an *instance* `forward` that runs the fused ops on the
layer's own parameters, described by a `BlockSpec`. So the `Parameter` objects, `state_dict` keys,
module types, hooks and `train()`/`eval()` flags are the stock model's (the fused forward reads
`self.training` of the very layer it replaces), and `unpatch` only deletes the instance attributes.
A call the fused path cannot express (an attention mask, attention weights requested, dropout
between the GEMM and the residual active in training, ...) runs the class's stock `forward` for
that call. Parts that cannot be fused at all stay stock, with one warning naming them.

Per layer the fused path is four launches, as in `vit_fast.nn.Block`:
  layer_norm_linear (norm1 + packed qkv) -> attention -> linear_residual (proj, layer-scale,
  drop-path, + x) -> layer_norm_mlp (norm2, fc1, GELU variant, fc2, layer-scale, drop-path, + x).
Separate q/k/v projections (Hugging Face) go to `layer_norm_linear` as row blocks: `patch` moves
the three weights (and biases) into one buffer, each Parameter a view of its rows (same objects,
same values, same `state_dict`), so the op reads them as one [3D, D] weight with no per-call copy
and saves no stacked copy for backward; each Parameter gets its own gradient. If they stop being
adjacent (e.g. `model.to(...)` after patching gives each its own storage) the op stacks them with
one copy per call, still correct.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vit_fast.nn.block import op_namespace
from vit_fast.nn.mlp import drop_path_scale

__all__ = ["BlockSpec", "is_patched", "patch", "unpatch"]

#: Instance attribute on the patched root model: list of (module, attribute name) overridden.
_PATCHED = "_vit_fast_patched"
#: Instance attribute on each patched layer: its BlockSpec.
SPEC_ATTR = "_vit_fast_spec"

#: GELU modules by class name -> the `approximate` value of the fused MLP op. Matched by name so
#: that the libraries need not be importable; each entry's formula is the op's variant:
#: torch nn.GELU (its own `approximate`), HF GELUActivation (erf), GELUTanh / PytorchGELUTanh /
#: NewGELUActivation (tanh form), HF QuickGELUActivation and open_clip QuickGELU (x*sigmoid(1.702x)).
_GELU_BY_NAME = {
    "GELUActivation": "none",
    "GELUTanh": "tanh",
    "PytorchGELUTanh": "tanh",
    "NewGELUActivation": "tanh",
    "QuickGELUActivation": "quick",
    "QuickGELU": "quick",
}


def gelu_variant(act: nn.Module | Callable) -> str | None:
    """The fused op's `approximate` for an activation module, or None if it is not a GELU we fuse."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name = type(act).__name__
    if (
        name == "GELUActivation"
        and getattr(act, "act", torch.nn.functional.gelu) is not torch.nn.functional.gelu
    ):
        # HF's python erf formula (use_gelu_python): the same function
        return "none"
    return _GELU_BY_NAME.get(name)


def layer_norm_blocker(norm: object, name: str, dim: int) -> str | None:
    if not isinstance(norm, nn.LayerNorm):
        return f"{name} is {type(norm).__name__}, not a LayerNorm"
    if tuple(norm.normalized_shape) != (dim,):
        return f"{name} normalises {tuple(norm.normalized_shape)}, not ({dim},)"
    return None


@dataclass(eq=False)
class BlockSpec:
    """Where a stock pre-LN block keeps its parameters: modules and attribute names, read at every
    call (so a Parameter replaced later, e.g. by `load_state_dict(assign=True)`, is the one used).

    The qkv projection is either a packed `nn.MultiheadAttention` (`in_proj_weight` [3D, D],
    `in_proj_bias` [3D]) or three nn.Linear (q, k, v); `layer_scale1/2` are (module, attribute)
    of a [D] layer-scale Parameter, or None; `stock_dropouts` are dropout modules
    of the stock forward that sit where the fused ops have none: while any is active (training,
    p > 0) the call runs the stock forward.
    """

    norm1: nn.LayerNorm
    num_heads: int
    scale: float
    proj: nn.Linear
    norm2: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    approximate: str
    attn_dropout: Callable[[], float]
    packed_qkv: nn.MultiheadAttention | None = None
    separate_qkv: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None
    layer_scale1: tuple[nn.Module, str] | None = None
    layer_scale2: tuple[nn.Module, str] | None = None
    drop_path: float = 0.0
    stock_dropouts: tuple[nn.Module, ...] = ()
    impl: str = "fused"

    def qkv_params(self) -> tuple[Tensor | list[Tensor], Tensor | list[Tensor] | None]:
        """The qkv weight [3D, D] and bias [3D] (q rows, then k, then v: timm's layout): packed
        tensors, or the three projections' as row blocks (`ops.layer_norm_linear` stacks them)."""
        if self.packed_qkv is not None:
            return self.packed_qkv.in_proj_weight, self.packed_qkv.in_proj_bias
        q, k, v = self.separate_qkv
        biases = [q.bias, k.bias, v.bias] if q.bias is not None else None
        return [q.weight, k.weight, v.weight], biases

    @staticmethod
    def gamma(ls: tuple[nn.Module, str] | None) -> Tensor | None:
        return None if ls is None else getattr(*ls)

    def stock_dropout_active(self, training: bool) -> bool:
        return training and any(getattr(d, "p", 0.0) > 0.0 for d in self.stock_dropouts)


def fused_block(spec: BlockSpec, x: Tensor, training: bool) -> Tensor:
    """x [B, T, D] -> [B, T, D]: the pre-LN block of `spec` through the fused ops."""
    f = op_namespace(spec.impl)
    n1, n2 = spec.norm1, spec.norm2
    w_qkv, b_qkv = spec.qkv_params()
    qkv = f.layer_norm_linear(x, n1.weight, n1.bias, w_qkv, b_qkv, n1.eps)
    o = f.attention(qkv, spec.num_heads, scale=spec.scale, dropout_p=spec.attn_dropout() if training else 0.0)
    dps = drop_path_scale(x.shape[0], spec.drop_path, training, x.device)
    x = f.linear_residual(
        o, spec.proj.weight, spec.proj.bias, x, gamma=spec.gamma(spec.layer_scale1), drop_path_scale=dps
    )
    dps = drop_path_scale(x.shape[0], spec.drop_path, training, x.device)
    return f.layer_norm_mlp(
        x,
        n2.weight,
        n2.bias,
        spec.fc1.weight,
        spec.fc1.bias,
        spec.fc2.weight,
        spec.fc2.bias,
        n2.eps,
        gamma=spec.gamma(spec.layer_scale2),
        drop_path_scale=dps,
        approximate=spec.approximate,
    )


def run_block(
    module: nn.Module,
    x: Tensor,
    stock: Callable[[], Tensor],
    *,
    stock_call: bool = False,
    checkpoint: Callable[..., Tensor] | None = None,
) -> Tensor:
    """The instance forward of a patched layer: the fused block on `x` [B, T, D], or `stock()` (the
    class's own forward) for a call the fused path cannot express: `stock_call` (what the adapter
    saw in the call's arguments), an input that is not [B, T, D], or a dropout of the layer active
    in training. `checkpoint(fn, x)`, when given, runs the fused block under activation
    checkpointing (what the stock layer's own forward wrapper would do)."""
    spec: BlockSpec = module.__dict__[SPEC_ATTR]
    if stock_call or x.dim() != 3 or spec.stock_dropout_active(module.training):
        return stock()
    if checkpoint is not None:
        return checkpoint(functools.partial(fused_block, spec, training=module.training), x)
    return fused_block(spec, x, module.training)


@dataclass
class PatchPlan:
    """What a library adapter found: per module, the instance attribute to set and its function
    (bound to the module as a method), plus the parts it leaves stock and why."""

    overrides: list[tuple[nn.Module, str, Callable, object]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(
        self,
        where: str,
        module: nn.Module,
        attr: str,
        fn: Callable,
        spec: object,
        why: list[str] | str | None,
    ) -> None:
        """Override `module.<attr>` with fn (spec: its BlockSpec, or the impl for an embedding) or,
        when `why` gives reasons, leave it stock and note them under `where`."""
        if why:
            self.skipped.append(f"{where}: {why if isinstance(why, str) else '; '.join(why)}")
        else:
            self.overrides.append((module, attr, fn, spec))

    def add_block(
        self,
        where: str,
        block: nn.Module,
        block_type: type,
        block_spec: Callable[[nn.Module, str], tuple[BlockSpec | None, list[str]]],
        forward: Callable,
        impl: str,
    ) -> None:
        """A transformer layer: its forward becomes `forward` when it is exactly `block_type` (not a
        subclass, whose forward may differ) and `block_spec(block, impl)` finds its parameters."""
        if type(block) is not block_type:
            self.add(
                where, block, "forward", forward, None, f"{type(block).__name__} is not {block_type.__name__}"
            )
            return
        spec, why = block_spec(block, impl)
        self.add(where, block, "forward", forward, spec, why)


def _library(model: nn.Module) -> str:
    mod = type(model).__module__
    for prefix, name in (
        ("timm.", "timm"),
        ("transformers.", "hf"),
        ("torchvision.", "torchvision"),
        ("open_clip.", "open_clip"),
    ):
        if mod.startswith(prefix):
            return name
    # A wrapper around a supported model (e.g. a user module holding a CLIP tower): look inside.
    for sub in model.modules():
        sub_mod = type(sub).__module__
        if sub is not model and sub_mod.startswith(("transformers.", "torchvision.", "open_clip.")):
            return _library(sub)
    raise TypeError(
        f"vit_fast.patch: {type(model).__module__}.{type(model).__name__} is not a model from timm, "
        "Hugging Face transformers, torchvision or open_clip"
    )


def _plan(model: nn.Module, impl: str) -> PatchPlan:
    lib = _library(model)
    if lib == "timm":
        raise TypeError(f"vit_fast.patch supports timm's VisionTransformer, got {type(model).__name__}")
    if lib == "hf":
        from vit_fast.integrations import hf as adapter
    elif lib == "torchvision":
        from vit_fast.integrations import torchvision as adapter
    else:
        from vit_fast.integrations import open_clip as adapter
    return adapter.plan(model, impl)


def patch(model: nn.Module, impl: str = "fused") -> nn.Module:
    """Fuse a ViT from timm, Hugging Face transformers, torchvision or open_clip in place.

    Returns the same object. Parameters, `state_dict` keys and module types are unchanged; each
    supported transformer layer (and the stock patch embedding) runs the fused ops. `impl` is
    'fused' (Triton on CUDA, C++ on CPU) or 'reference'. Unsupported parts stay stock, with one
    warning naming them. Patching a patched model is a no-op; `unpatch` undoes it.
    """
    op_namespace(impl)  # validates impl
    if _library(model) == "timm" and type(model).__name__ in ("VisionTransformer", "NaFlexVit"):
        from vit_fast.integrations.timm import patch_timm

        return patch_timm(model, impl)
    if is_patched(model):
        return model
    plan = _plan(model, impl)
    done = []
    for module, attr, fn, spec in plan.overrides:
        if spec is not None:
            object.__setattr__(module, SPEC_ATTR, spec)
            if isinstance(spec, BlockSpec) and spec.separate_qkv is not None:
                for params in zip(*((lin.weight, lin.bias) for lin in spec.separate_qkv)):
                    colocate_rows(list(params))
        object.__setattr__(module, attr, types.MethodType(fn, module))
        done.append((module, attr))
    if not done:
        plan.skipped.insert(0, "nothing could be fused")
    object.__setattr__(model, _PATCHED, done)
    if plan.skipped:
        warnings.warn("vit_fast.patch left these parts stock: " + " | ".join(plan.skipped), stacklevel=2)
    return model


def colocate_rows(params: list[nn.Parameter | None]) -> bool:
    """Give `params` (same dtype and device, stacked along dim 0) one storage, each a view of its
    rows, values unchanged, so `ops.layer_norm_linear` reads them as one tensor without a copy.
    The Parameter objects stay the same (optimizer state, hooks and `state_dict` keys are theirs);
    a parameter with a gradient already, or a mixed set, is left alone. Returns whether it moved."""
    if any(p is None for p in params) or len({(p.dtype, p.device, p.shape[1:]) for p in params}) != 1:
        return False
    if any(p.grad is not None for p in params):
        return False
    with torch.no_grad():
        buffer = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = buffer[start : start + p.shape[0]]
            start += p.shape[0]
    return True


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: every overridden method goes; the stock forwards run again (same parameters)."""
    if _library(model) == "timm" and type(model).__name__ in ("VisionTransformer", "NaFlexVit"):
        from vit_fast.integrations.timm import unpatch_timm

        return unpatch_timm(model)
    done = model.__dict__.pop(_PATCHED, None)
    for module, attr in done or ():
        module.__dict__.pop(attr, None)
        module.__dict__.pop(SPEC_ATTR, None)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` (or `patch_timm`) is in effect on `model`."""
    from vit_fast.integrations.timm import is_patched as timm_is_patched

    return _PATCHED in model.__dict__ or timm_is_patched(model)


def mha_qkv(attn: object) -> tuple[nn.MultiheadAttention | None, list[str]]:
    """A batch-first self-attention `nn.MultiheadAttention` with a packed in-projection
    (`in_proj_weight` [3D, D]), or the reasons it cannot be fused (torchvision and open_clip)."""
    if not isinstance(attn, nn.MultiheadAttention):
        return None, [f"attention is {type(attn).__name__}, not nn.MultiheadAttention"]
    why = []
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        why.append("attention has separate k/v dims")
    if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
        why.append("attention has bias_k/bias_v/add_zero_attn")
    if not attn.batch_first:
        why.append("attention is not batch_first")
    return (None if why else attn), why


def mha_block_spec(
    block: nn.Module,
    attn_attr: str,
    mlp: tuple[nn.Linear, nn.Module, nn.Linear] | None,
    mlp_layout: str,
    impl: str,
    why: list[str],
    **spec: object,
) -> tuple[BlockSpec | None, list[str]]:
    """The BlockSpec of a torchvision or open_clip pre-LN block, or the reasons it cannot be fused.

    Shared: a batch-first `nn.MultiheadAttention` with a packed in-projection at
    `block.<attn_attr>`, LayerNorms `ln_1` / `ln_2`, a GELU-variant MLP. The adapter passes the
    MLP's (fc1, activation, fc2) as it found them (None: the block's mlp is not `mlp_layout`), its
    own reasons against the block (`why`) and its other BlockSpec fields (`spec`: layer scales,
    stock dropouts)."""
    attn, reasons = mha_qkv(getattr(block, attn_attr, None))
    if attn is None:
        return None, reasons
    for name in ("ln_1", "ln_2"):
        bad = layer_norm_blocker(getattr(block, name, None), name, attn.embed_dim)
        if bad:
            reasons.append(bad)
    reasons += why
    if mlp is None:
        return None, [*reasons, f"mlp is not {mlp_layout}"]
    fc1, act, fc2 = mlp
    approximate = gelu_variant(act)
    if approximate is None:
        reasons.append(f"mlp activation is {type(act).__name__}, not a GELU")
    if reasons:
        return None, reasons
    return BlockSpec(
        norm1=block.ln_1,
        num_heads=attn.num_heads,
        scale=attn.head_dim**-0.5,
        proj=attn.out_proj,
        norm2=block.ln_2,
        fc1=fc1,
        fc2=fc2,
        approximate=approximate,
        attn_dropout=lambda: float(attn.dropout),
        packed_qkv=attn,
        impl=impl,
        **spec,
    ), []


def fused_embed(
    module: nn.Module,
    images: Tensor,
    conv: nn.Conv2d,
    pos_embed: Tensor | None,
    cls_token: Tensor | None,
    extra_tokens: Tensor | None,
    no_embed_class: bool = False,
) -> Tensor:
    """The patch embedding of a patched embedding `module` in one `patch_embed` launch of the impl
    stored on it: images [B, C, H, W] (cast to conv's dtype, as the stock embeddings do) ->
    [B, prefix + patches, D] = [cls, extra..., conv(images) as tokens] + pos_embed. conv is a
    p x p, stride-p projection (checked by `patch_conv_blocker`); pos_embed [1, L, D];
    cls_token [1, 1, D]; extra_tokens [1, R, D] (distillation or register tokens)."""
    return op_namespace(module.__dict__[SPEC_ATTR]).patch_embed(
        images.to(conv.weight.dtype),
        conv.weight,
        conv.bias,
        pos_embed,
        cls_token,
        extra_tokens,
        patch_size=conv.kernel_size[0],
        no_embed_class=no_embed_class,
    )


def patch_conv_blocker(conv: object) -> str | None:
    """Why a patch projection is not the p x p, stride-p convolution the fused patch_embed op
    computes (None: it is)."""
    if not isinstance(conv, nn.Conv2d):
        return f"patch projection is {type(conv).__name__}, not Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or conv.stride != k or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1):
        return "patch projection is not a square non-overlapping p x p convolution"
    if conv.groups != 1:
        return "patch projection is grouped"
    return None
