"""Backend selection and the shared argument checks."""

import pytest
import torch

from vit_fast.ops import backend
from vit_fast.ops._checks import check_no_overlap, check_tensor, has_internal_overlap


def test_overlap_detection():
    a = torch.randn(4, 5)
    assert not has_internal_overlap(a)
    assert not has_internal_overlap(a.t())
    assert not has_internal_overlap(a[:, ::2])
    assert not has_internal_overlap(torch.randn(2, 3, 4).permute(2, 0, 1))
    assert has_internal_overlap(torch.randn(1, 5).expand(4, 5))
    assert has_internal_overlap(torch.randn(10).as_strided((3, 4), (2, 1)))
    with pytest.raises(ValueError, match="qkv has overlapping memory"):
        check_no_overlap(torch.randn(1, 6).expand(3, 6), "qkv")


def test_check_tensor_names_the_argument():
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        check_tensor([1, 2], "images")
    with pytest.raises(ValueError, match="images must be 4-D"):
        check_tensor(torch.randn(3, 4, 4), "images", ndim=4)
    with pytest.raises(TypeError, match="weight has dtype torch.int64"):
        check_tensor(torch.ones(3, dtype=torch.long), "weight")


def test_forced_backends(monkeypatch):
    cpu = torch.device("cpu")
    with backend.use_backend("reference"):
        assert backend.select_backend(cpu, "attention") == "reference"
    monkeypatch.setenv("VIT_FAST_BACKEND", "reference")
    assert backend.select_backend(cpu, "mlp") == "reference"
    monkeypatch.setenv("VIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VIT_FAST_BACKEND"):
        backend.select_backend(cpu, "mlp")
    monkeypatch.delenv("VIT_FAST_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.select_backend(cpu, "attention")
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.use_backend("cuda").__enter__()


def test_auto_prefers_cpu_extension_when_built():
    fam = "attention"
    want = (
        "cpu" if backend.has_cpu_kernel(fam) else ("triton" if backend.triton_interpreting() else "reference")
    )
    assert backend.select_backend(torch.device("cpu"), fam) == want


def test_package_works_without_the_extension(monkeypatch):
    """As after `VIT_FAST_BUILD_EXT=0` or a failed build: no `cpu` backend; with no backend forced,
    the fused model falls back on its own (to the Triton interpreter when it is on, else to the
    plain-PyTorch backend), still through the vit_fast ops, and matches the reference model."""
    import vit_fast

    monkeypatch.setattr(backend, "cpu_extension", lambda: None)
    # backend_fns keeps its answers per (device, family, dtype, ...): the ones made while the
    # extension is hidden go into a dict of this test's own, or every later test in the process would
    # run the Triton interpreter where it expects the C++ kernels (it did: a 5 s training test took 114).
    monkeypatch.setattr(backend, "_resolved", {})
    monkeypatch.setattr(backend, "_stand_ins", {})
    monkeypatch.delenv("VIT_FAST_BACKEND", raising=False)
    assert backend.select_backend(torch.device("cpu"), "mlp") != "cpu"
    with pytest.raises(RuntimeError, match="no 'mlp' kernels"), backend.use_backend("cpu"):
        backend.select_backend(torch.device("cpu"), "mlp")
    torch.manual_seed(0)
    fused = vit_fast.create_model("vit_tiny_patch16_224", impl="fused", img_size=16, patch_size=8, depth=1)
    ref = vit_fast.create_model("vit_tiny_patch16_224", impl="reference", img_size=16, patch_size=8, depth=1)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 16)
    for interpret, expected in (("0", "reference"), ("1", "triton")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert set(backend.active_backends("cpu").values()) == {expected}
        with torch.no_grad():
            assert torch.allclose(fused(x), ref(x), atol=1e-5), expected


def test_eager_fast_path_only_where_nothing_would_see_the_op():
    """ops._eager.run_op skips the dispatcher only for calls nothing could observe: a gradient to
    record, a dispatch / function mode (fake tensors, FLOP counters), the profiler, meta tensors and
    Tensor[] arguments that need a gradient all take the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from vit_fast.ops._eager import plain_call, run_op
    from vit_fast.ops.layer_norm import _layer_norm_fwd

    x, w = torch.randn(3, 8), torch.randn(8, requires_grad=True)
    assert not plain_call((x, w))
    with torch.no_grad():
        assert plain_call((x, w, None, 1e-6))
        assert not plain_call((x, torch.empty(8, device="meta")))
        with FlopCounterMode(display=False):
            assert not plain_call((x,))
        with TorchDispatchMode():
            assert not plain_call((x,))
        with torch.profiler.profile() as prof:
            assert not plain_call((x,))
            run_op(_layer_norm_fwd, x, w, None, 1e-6)
        assert any("vit_fast::layer_norm_fwd" in e.name for e in prof.events())
        direct = run_op(_layer_norm_fwd, x, w, None, 1e-6)
        via_op = _layer_norm_fwd(x, w, None, 1e-6)
    assert not plain_call(([x, w],))
    for a, b in zip(direct, via_op):
        assert torch.equal(a, b)
