"""The GELU variants and LN eps values the model zoo needs, in the fused MLP op: exact, tanh
(SigLIP) and quick (`x * sigmoid(1.702 x)`, CLIP), forward and every gradient, on the Triton
(interpreted) and C++ backends against the float64 reference; LN eps from 1e-12 (HF ViT) to 1e-5
(CLIP) in layer_norm_linear and layer_norm_mlp."""

from __future__ import annotations

import pytest
import torch

from vit_fast import ops, reference
from vit_fast.ops import use_backend
from vit_fast.ops.backend import cpu_extension
from vit_fast.testing import check_numerics

BACKENDS = ["triton", pytest.param("cpu", marks=pytest.mark.skipif(cpu_extension() is None, reason="no _C"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _mlp_args(b: int, t: int, d: int, f: int, eps: float):
    x = (2.0 * torch.randn(b, t, d)).requires_grad_()  # wide pre-activations: both GELU tails matter
    lw = (1.0 + 0.1 * torch.randn(d)).requires_grad_()
    lb = (0.1 * torch.randn(d)).requires_grad_()
    w1 = (2.0 * torch.randn(f, d) / d**0.5).requires_grad_()
    b1 = (0.1 * torch.randn(f)).requires_grad_()
    w2 = (torch.randn(d, f) / f**0.5).requires_grad_()
    b2 = (0.1 * torch.randn(d)).requires_grad_()
    return [x, lw, lb, w1, b1, w2, b2, eps]


def test_reference_quick_gelu_matches_its_formula():
    """The oracle and the plain-PyTorch backend's explicit derivative against autograd through the
    formula in float64."""
    from vit_fast.plain.mlp import gelu_backward

    x = torch.linspace(-12, 12, 301, dtype=torch.float64, requires_grad=True)
    want = x * torch.sigmoid(1.702 * x)
    (g,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(reference.gelu(x, "quick"), want)
    torch.testing.assert_close(gelu_backward(torch.ones_like(x), x.detach(), "quick"), g)


@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_mlp_gelu_variants(backend, approximate, dtype):
    args = _mlp_args(2, 5, 32, 64, 1e-6)
    kw = {"approximate": approximate, "gamma": (0.5 + torch.rand(32)).requires_grad_()}
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, kw, dtype=dtype)


def test_quick_differs_from_exact(backend):
    """The variant really reaches the kernel (quick and exact GELU give different outputs)."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _mlp_args(1, 3, 32, 64, 1e-6)]
    quick = ops.layer_norm_mlp(*args, approximate="quick")
    exact = ops.layer_norm_mlp(*args, approximate="none")
    assert (quick - exact).abs().max() > 1e-3
    torch.testing.assert_close(
        quick, reference.layer_norm_mlp(*args, approximate="quick"), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.1])
def test_any_positive_eps(backend, eps):
    """HF ViT/DeiT use 1e-12, CLIP 1e-5; rows with a tiny variance make eps visible."""
    args = _mlp_args(2, 4, 32, 64, eps)
    x = args[0].detach()
    x[0, 0] = 3.0 + 1e-4 * x[0, 0]  # variance ~1e-8: 1e-12 and 1e-5 give different rstd
    args[0] = x.requires_grad_()
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, {"approximate": "quick"})
    lin = [args[0], args[1], args[2], args[3], args[4], eps]
    check_numerics(ops.layer_norm_linear, reference.layer_norm_linear, lin)


def test_bad_approximate_names_the_argument():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _mlp_args(1, 2, 32, 64, 1e-6)]
    with pytest.raises(ValueError, match="approximate"):
        ops.layer_norm_mlp(*args, approximate="sigmoid")
