"""A battery of bad and edge inputs against every public op, on every backend.

Bad inputs: each must raise ValueError/TypeError/RuntimeError whose message names the offending
argument, and must do so before any kernel launch. Every kernel of every backend (Triton, C++,
plain PyTorch) runs inside one of our `vit_fast::` custom ops, so "before any launch" is checked
with a dispatch mode that records every `vit_fast::` op reaching the dispatcher: it must see none.

Edge inputs that are valid (T = 1, batch 1, strided / transposed / expanded inputs, channels-last
images, zero-width layers, NaN and inf) must match the float64 reference, forward and gradients,
under the numerics rule (docs/design.md, "Numerics"); NaN and inf must land exactly where the
reference puts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import vit_fast
from vit_fast import ops, reference
from vit_fast.ops import use_backend
from vit_fast.ops.backend import cpu_extension
from vit_fast.testing import check_numerics

BACKENDS = ["triton", "cpu", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu" and cpu_extension() is None:
        pytest.skip("C++ extension not built")
    with use_backend(request.param):
        yield request.param


class _LaunchRecorder(TorchDispatchMode):
    """Records every vit_fast:: custom op that reaches the dispatcher (where all kernels launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.launched: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vit_fast":
            self.launched.append(str(func))
        return func(*args, **(kwargs or {}))


def t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


# Shapes used below: x [B=2, T=5, D=8], qkv width 3*D = 24 with 2 heads, MLP width F = 16.
D, F = 8, 16


def _ln(x=None, w="d", b="d", eps=1e-6, **kw):
    x = t(2, 5, D) if x is None else x
    w = t(D) if isinstance(w, str) else w
    b = t(D) if isinstance(b, str) else b
    return ops.layer_norm(x, w, b, eps, **kw)


def _lnl(x=None, lw="d", lb="d", w="d", b="d", eps=1e-6):
    x = t(2, 5, D) if x is None else x
    lw = t(D) if isinstance(lw, str) else lw
    lb = t(D) if isinstance(lb, str) else lb
    w = t(3 * D, D) if isinstance(w, str) else w
    b = t(3 * D) if isinstance(b, str) else b
    return ops.layer_norm_linear(x, lw, lb, w, b, eps)


def _lr(x=None, w="d", b="d", r=None, **kw):
    x = t(2, 5, D) if x is None else x
    w = t(D, D) if isinstance(w, str) else w
    b = t(D) if isinstance(b, str) else b
    r = t(2, 5, D) if r is None else r
    return ops.linear_residual(x, w, b, r, **kw)


def _mlp(x=None, fc1="d", b1="d", fc2="d", b2="d", eps=1e-6, **kw):
    x = t(2, 5, D) if x is None else x
    fc1 = t(F, D) if isinstance(fc1, str) else fc1
    b1 = t(F) if isinstance(b1, str) else b1
    fc2 = t(D, F) if isinstance(fc2, str) else fc2
    b2 = t(D) if isinstance(b2, str) else b2
    return ops.layer_norm_mlp(x, t(D), t(D), fc1, b1, fc2, b2, eps, **kw)


def _attn(qkv=None, heads=2, **kw):
    return ops.attention(t(2, 5, 3 * D) if qkv is None else qkv, heads, **kw)


def _pe(images=None, weight="d", bias="d", pos="d", cls="d", reg=None, p=4, **kw):
    images = t(2, 3, 8, 8) if images is None else images
    weight = t(D, 3, p, p) if isinstance(weight, str) else weight
    bias = t(D) if isinstance(bias, str) else bias
    pos = t(1, 5, D) if isinstance(pos, str) else pos
    cls = t(1, 1, D) if isinstance(cls, str) else cls
    return ops.patch_embed(images, weight, bias, pos, cls, reg, patch_size=p, **kw)


def _model(images):
    model = vit_fast.create_model(
        "vit_tiny_patch16_224", impl="fused", img_size=16, patch_size=8, depth=1, embed_dim=D, num_heads=2
    )
    return model(images)


def _expanded(*shape: int) -> torch.Tensor:
    """A tensor whose elements alias each other (stride 0)."""
    return t(*shape[1:]).unsqueeze(0).expand(*shape)


# (id, call, exception types, regex the message must match: the argument's name)
BAD: list[tuple[str, Callable[[], object], tuple[type[BaseException], ...], str]] = [
    # layer_norm
    ("ln_x_not_tensor", lambda: _ln(x=[[1.0] * D]), (TypeError,), "x"),
    ("ln_x_int", lambda: _ln(x=torch.ones(2, 5, D, dtype=torch.int32)), (TypeError,), "x"),
    ("ln_x_float64", lambda: _ln(x=t(2, 5, D, dtype=torch.float64)), (TypeError,), "x"),
    ("ln_x_0d", lambda: _ln(x=torch.tensor(1.0)), (ValueError,), "x"),
    ("ln_x_empty_batch", lambda: _ln(x=t(0, 5, D)), (ValueError,), "x"),
    ("ln_weight_shape", lambda: _ln(w=t(D + 1)), (ValueError,), "weight"),
    ("ln_weight_dtype_mixed", lambda: _ln(w=t(D, dtype=torch.bfloat16)), (TypeError,), "weight"),
    ("ln_bias_device", lambda: _ln(b=t(D, device="meta")), (ValueError,), "bias"),
    ("ln_weight_overlapping", lambda: _ln(w=t(1).expand(D)), (ValueError,), "weight"),
    ("ln_eps_zero", lambda: _ln(eps=0.0), (ValueError,), "eps"),
    ("ln_eps_negative", lambda: _ln(eps=-1e-5), (ValueError,), "eps"),
    ("ln_eps_nan", lambda: _ln(eps=math.nan), (ValueError,), "eps"),
    ("ln_eps_inf", lambda: _ln(eps=math.inf), (ValueError,), "eps"),
    ("ln_eps_str", lambda: _ln(eps="1e-6"), (ValueError,), "eps"),
    ("ln_residual_shape", lambda: _ln(residual=t(2, 4, D)), (ValueError,), "residual"),
    # layer_norm_linear
    ("lnl_weight_width", lambda: _lnl(w=t(3 * D, D - 1)), (ValueError,), "weight"),
    ("lnl_weight_1d", lambda: _lnl(w=t(3 * D)), (ValueError,), "weight"),
    ("lnl_weight_none", lambda: _lnl(w=None), (TypeError,), "weight"),
    ("lnl_weight_bf16", lambda: _lnl(w=t(3 * D, D, dtype=torch.bfloat16)), (TypeError,), "weight"),
    ("lnl_bias_length", lambda: _lnl(b=t(3 * D + 1)), (ValueError,), "bias"),
    ("lnl_ln_weight_shape", lambda: _lnl(lw=t(D, 1)), (ValueError,), "ln_weight"),
    ("lnl_ln_bias_fp16", lambda: _lnl(lb=t(D, dtype=torch.float16)), (TypeError,), "ln_bias"),
    ("lnl_weight_overlapping", lambda: _lnl(w=_expanded(3 * D, D)), (ValueError,), "weight"),
    ("lnl_x_empty", lambda: _lnl(x=t(2, 0, D)), (ValueError,), "x"),
    ("lnl_eps_nan", lambda: _lnl(eps=math.nan), (ValueError,), "eps"),
    # linear_residual
    ("lr_weight_width", lambda: _lr(w=t(D, D + 2)), (ValueError,), "weight"),
    ("lr_residual_shape", lambda: _lr(r=t(2, 5, D + 1)), (ValueError,), "residual"),
    ("lr_residual_dtype", lambda: _lr(r=t(2, 5, D, dtype=torch.bfloat16)), (TypeError,), "residual"),
    ("lr_bias_shape", lambda: _lr(b=t(D - 1)), (ValueError,), "bias"),
    ("lr_gamma_shape", lambda: _lr(gamma=t(D + 1)), (ValueError,), "gamma"),
    ("lr_dps_length", lambda: _lr(drop_path_scale=torch.ones(3)), (ValueError,), "drop_path_scale"),
    (
        "lr_dps_int",
        lambda: _lr(drop_path_scale=torch.ones(2, dtype=torch.int64)),
        (TypeError,),
        "drop_path_scale",
    ),
    (
        "lr_dps_2d_x",
        lambda: _lr(x=t(10, D), r=t(10, D), drop_path_scale=torch.ones(10)),
        (ValueError,),
        "drop_path_scale",
    ),
    ("lr_residual_empty", lambda: _lr(w=t(0, D), b=t(0), r=t(2, 5, 0)), (ValueError,), "residual"),
    ("lr_x_int", lambda: _lr(x=torch.ones(2, 5, D, dtype=torch.int64)), (TypeError,), "x"),
    # layer_norm_mlp
    ("mlp_fc1_width", lambda: _mlp(fc1=t(F, D + 1)), (ValueError,), "fc1_weight"),
    ("mlp_fc2_shape", lambda: _mlp(fc2=t(D, F + 1)), (ValueError,), "fc2_weight"),
    ("mlp_fc1_bias", lambda: _mlp(b1=t(F + 1)), (ValueError,), "fc1_bias"),
    ("mlp_fc2_bias", lambda: _mlp(b2=t(D + 1)), (ValueError,), "fc2_bias"),
    ("mlp_fc2_dtype", lambda: _mlp(fc2=t(D, F, dtype=torch.float16)), (TypeError,), "fc2_weight"),
    ("mlp_approximate", lambda: _mlp(approximate="erf"), (ValueError,), "approximate"),
    ("mlp_eps_zero", lambda: _mlp(eps=0.0), (ValueError,), "eps"),
    ("mlp_gamma_shape", lambda: _mlp(gamma=t(F)), (ValueError,), "gamma"),
    ("mlp_fc1_overlapping", lambda: _mlp(fc1=_expanded(F, D)), (ValueError,), "fc1_weight"),
    ("mlp_dps_length", lambda: _mlp(drop_path_scale=torch.ones(5)), (ValueError,), "drop_path_scale"),
    # attention
    ("attn_qkv_2d", lambda: _attn(qkv=t(5, 3 * D)), (ValueError,), "qkv"),
    ("attn_qkv_width", lambda: _attn(qkv=t(2, 5, 3 * D + 1)), (ValueError,), "qkv"),
    ("attn_qkv_int", lambda: _attn(qkv=torch.ones(2, 5, 3 * D, dtype=torch.int32)), (TypeError,), "qkv"),
    ("attn_qkv_float64", lambda: _attn(qkv=t(2, 5, 3 * D, dtype=torch.float64)), (TypeError,), "qkv"),
    ("attn_qkv_empty_tokens", lambda: _attn(qkv=t(2, 0, 3 * D)), (ValueError,), "qkv"),
    ("attn_qkv_empty_batch", lambda: _attn(qkv=t(0, 5, 3 * D)), (ValueError,), "qkv"),
    ("attn_heads_zero", lambda: _attn(heads=0), (ValueError,), "num_heads"),
    ("attn_heads_float", lambda: _attn(heads=2.0), (ValueError,), "num_heads"),
    ("attn_heads_indivisible", lambda: _attn(heads=5), (ValueError,), "num_heads"),
    ("attn_head_dim_too_big", lambda: _attn(qkv=t(1, 2, 3 * 512), heads=1), (ValueError,), "qkv"),
    ("attn_dropout_one", lambda: _attn(dropout_p=1.0), (ValueError,), "dropout_p"),
    ("attn_dropout_negative", lambda: _attn(dropout_p=-0.1), (ValueError,), "dropout_p"),
    ("attn_dropout_nan", lambda: _attn(dropout_p=math.nan), (ValueError,), "dropout_p"),
    ("attn_scale_nan", lambda: _attn(scale=math.nan), (ValueError,), "scale"),
    ("attn_scale_str", lambda: _attn(scale="0.1"), (ValueError,), "scale"),
    # patch_embed
    ("pe_images_3d", lambda: _pe(images=t(3, 8, 8)), (ValueError,), "images"),
    ("pe_not_divisible", lambda: _pe(images=t(2, 3, 8, 10)), (ValueError,), "patch_size"),
    ("pe_channels", lambda: _pe(images=t(2, 4, 8, 8)), (ValueError,), "channels"),
    ("pe_empty_batch", lambda: _pe(images=t(0, 3, 8, 8)), (ValueError,), "images"),
    ("pe_patch_size_zero", lambda: _pe(p=0, weight=t(D, 3, 1, 1)), (ValueError,), "patch_size"),
    ("pe_kernel_mismatch", lambda: _pe(weight=t(D, 3, 2, 2)), (ValueError,), "weight"),
    ("pe_images_int", lambda: _pe(images=torch.ones(2, 3, 8, 8, dtype=torch.uint8)), (TypeError,), "images"),
    ("pe_weight_dtype", lambda: _pe(weight=t(D, 3, 4, 4, dtype=torch.bfloat16)), (TypeError,), "weight"),
    ("pe_bias_shape", lambda: _pe(bias=t(D + 1)), (ValueError,), "bias"),
    ("pe_pos_length", lambda: _pe(pos=t(1, 4, D)), (ValueError,), "pos_embed"),
    ("pe_cls_shape", lambda: _pe(cls=t(1, 2, D)), (ValueError,), "cls_token"),
    ("pe_reg_width", lambda: _pe(reg=t(1, 2, D + 1)), (ValueError,), "reg_tokens"),
    ("pe_images_smaller_than_patch", lambda: _pe(images=t(2, 3, 2, 2)), (ValueError,), "patch_size"),
    # the model
    ("model_channels", lambda: _model(t(1, 4, 16, 16)), (ValueError,), "in_chans"),
    ("model_not_divisible", lambda: _model(t(1, 3, 16, 12)), (ValueError,), "patch size"),
    ("model_empty_batch", lambda: _model(t(0, 3, 16, 16)), (ValueError,), "empty"),
    ("model_wrong_size", lambda: _model(t(1, 3, 24, 24)), (ValueError,), "img_size"),
    # attention dropout past the kernels' int32 Philox counter (fake tensors: no memory)
    (
        "attn_dropout_past_2_31",
        lambda: _fake(lambda: _attn(qkv=t(1, 2**16, 3 * D), dropout_p=0.1)),
        (ValueError,),
        "dropout",
    ),
]


def _fake(fn: Callable[[], object]) -> object:
    with FakeTensorMode():
        return fn()


def test_battery_is_large_and_distinct():
    ids = [case[0] for case in BAD]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_before_any_launch(case, backend):
    _, call, exceptions, match = case
    recorder = _LaunchRecorder()
    with pytest.raises(exceptions, match=match), recorder:
        call()
    assert recorder.launched == [], f"launched {recorder.launched} before rejecting the input"


# ------------------------------------------------------------------------- valid edge inputs


def _grad(*shape: int, **kw) -> torch.Tensor:
    return t(*shape, **kw).requires_grad_(True)


def _edge_cases() -> list[tuple[str, Callable, Callable, list, dict]]:
    """(id, fused op, reference op, args, kwargs); fp32 masters, requires_grad where checked."""
    x_t = t(D, 5, 2).permute(2, 1, 0).requires_grad_(True)  # [2, 5, D], transposed strides
    qkv_slice = t(2, 5, 4 * D)[..., : 3 * D].requires_grad_(True)  # strided along T
    images_cl = t(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    return [
        ("ln_T1", ops.layer_norm, reference.layer_norm, [_grad(1, 1, D), _grad(D), _grad(D), 1e-6], {}),
        ("ln_transposed", ops.layer_norm, reference.layer_norm, [x_t, _grad(D), _grad(D), 1e-5], {}),
        ("ln_no_affine", ops.layer_norm, reference.layer_norm, [_grad(3, D), None, None, 1e-12], {}),
        (
            "ln_expanded_x",
            ops.layer_norm,
            reference.layer_norm,
            [t(1, 5, D).expand(3, 5, D).requires_grad_(False), _grad(D), _grad(D), 1e-6],
            {},
        ),
        (
            "lnl_T1",
            ops.layer_norm_linear,
            reference.layer_norm_linear,
            [_grad(1, 1, D), _grad(D), _grad(D), _grad(3 * D, D), _grad(3 * D), 1e-6],
            {},
        ),
        (
            "lnl_zero_width",
            ops.layer_norm_linear,
            reference.layer_norm_linear,
            [_grad(2, 3, D), _grad(D), _grad(D), _grad(0, D), _grad(0), 1e-6],
            {},
        ),
        (
            "lnl_transposed_weight",
            ops.layer_norm_linear,
            reference.layer_norm_linear,
            [_grad(2, 3, D), None, None, t(D, 3 * D).t().requires_grad_(True), None, 1e-6],
            {},
        ),
        (
            "lr_T1_gamma_dps",
            ops.linear_residual,
            reference.linear_residual,
            [_grad(2, 1, D), _grad(D, D), _grad(D), _grad(2, 1, D)],
            {"gamma": _grad(D), "drop_path_scale": torch.tensor([0.0, 2.0], dtype=torch.float16)},
        ),
        (
            "mlp_zero_width",
            ops.layer_norm_mlp,
            reference.layer_norm_mlp,
            [_grad(2, 3, D), _grad(D), _grad(D), _grad(0, D), _grad(0), _grad(D, 0), _grad(D), 1e-6],
            {"gamma": _grad(D)},
        ),
        (
            "mlp_T1_tanh",
            ops.layer_norm_mlp,
            reference.layer_norm_mlp,
            [_grad(1, 1, D), _grad(D), _grad(D), _grad(F, D), _grad(F), _grad(D, F), _grad(D), 1e-6],
            {"approximate": "tanh"},
        ),
        ("attn_T1", ops.attention, reference.attention, [_grad(1, 1, 3 * D), 2], {}),
        ("attn_strided", ops.attention, reference.attention, [qkv_slice, 2], {"scale": 0.3}),
        (
            "pe_channels_last_batch1",
            ops.patch_embed,
            reference.patch_embed,
            [images_cl, _grad(D, 3, 4, 4), _grad(D), _grad(1, 5, D), _grad(1, 1, D), None],
            {"patch_size": 4},
        ),
        (
            "pe_patch_is_image",
            ops.patch_embed,
            reference.patch_embed,
            [_grad(1, 3, 4, 4), _grad(D, 3, 4, 4), None, None, None, _grad(1, 2, D)],
            {"patch_size": 4},
        ),
    ]


EDGE = _edge_cases()


@pytest.mark.parametrize("case", EDGE, ids=[c[0] for c in EDGE])
def test_valid_edge_input_matches_the_float64_reference(case, backend):
    _, fused, ref, args, kwargs = case
    check_numerics(fused, ref, args, kwargs)


def _nan_inf_cases():
    x = t(2, 4, D)
    x[0, 1, 3] = math.nan
    x[1, 2, 0] = math.inf
    qkv = t(2, 4, 3 * D)
    qkv[1, 2, D + 1] = math.nan  # one key element of sample 1, head 0
    images = t(2, 3, 8, 8)
    images[1, 0, 5, 6] = math.inf
    return [
        ("ln", lambda f: f.layer_norm(x, torch.ones(D), torch.zeros(D), 1e-6)),
        ("lnl", lambda f: f.layer_norm_linear(x, None, None, torch.ones(3, D), None, 1e-6)),
        ("lr", lambda f: f.linear_residual(x, torch.eye(D), None, torch.zeros(2, 4, D))),
        (
            "mlp",
            lambda f: f.layer_norm_mlp(x, None, None, torch.ones(F, D), None, torch.ones(D, F), None, 1e-6),
        ),
        ("attn", lambda f: f.attention(qkv, 2)),
        ("pe", lambda f: f.patch_embed(images, torch.ones(D, 3, 4, 4), None, None, None, None, patch_size=4)),
    ]


@pytest.mark.parametrize("name,call", _nan_inf_cases(), ids=[c[0] for c in _nan_inf_cases()])
def test_nan_and_inf_propagate_where_the_reference_puts_them(name, call, backend):
    with torch.no_grad():
        ours, ref = call(ops), call(reference)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), name
    assert torch.equal(torch.isposinf(ours), torch.isposinf(ref)), name
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), name
    finite = torch.isfinite(ref)
    assert finite.any() and (ours[finite] - ref[finite]).abs().max() <= 1e-4 * ref[finite].abs().max() + 1e-5


def test_float16_on_cpu_runs_every_op_and_a_half_model():
    """No backend forced: float16 CPU tensors reach a backend that computes them (the C++ kernels
    take fp32/bf16, so fp16 runs the plain-PyTorch backend) and agree with the fp32 reference."""
    model = vit_fast.create_model(
        "vit_tiny_patch16_224", impl="fused", img_size=16, patch_size=8, depth=1, embed_dim=D, num_heads=2
    )
    images = t(2, 3, 16, 16)
    ref = model(images)
    out = model.half()(images.half())
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-3


def test_meta_model_forward_and_ops_run_on_fake_kernels():
    with torch.device("meta"):
        model = vit_fast.create_model("vit_small_patch16_224", impl="fused")
        logits = model(torch.empty(2, 3, 224, 224))
    assert logits.device.type == "meta" and logits.shape == (2, 1000)
    recorder = _LaunchRecorder()
    with recorder:
        out = ops.layer_norm_mlp(
            t(2, 5, D, device="meta"),
            None,
            None,
            t(F, D, device="meta"),
            None,
            t(D, F, device="meta"),
            None,
            1e-6,
            drop_path_scale=t(2, device="meta"),
        )
    assert out.shape == (2, 5, D) and out.device.type == "meta"
    assert any("layer_norm_mlp" in name for name in recorder.launched)


def test_shapes_past_2_31_elements_run_under_fake_tensors():
    """Sizes a 141 GB GPU reaches: validation and the fake kernels accept them (the kernels' 64-bit
    indexing is tested in tests/test_int64_indexing.py); nothing is allocated."""
    with FakeTensorMode():
        x = torch.empty(3600, 197, 768)
        out = ops.layer_norm_mlp(
            x, None, None, torch.empty(3072, 768), None, torch.empty(768, 3072), None, 1e-6
        )
        qkv = torch.empty(1, 2**20, 2304)
        o = ops.attention(qkv, 12)
    assert out.shape == x.shape and x.numel() * 4 > 2**31
    assert o.shape == (1, 2**20, 768)
