"""Tracing one step of a model variant under fake tensors into a `CostReport`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vit_fast.perf.cost.dispatch import CostMode
from vit_fast.perf.cost.gpus import LAUNCH_OVERHEAD_S
from vit_fast.perf.cost.report import CostReport

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Model variants `trace_step` can build: "timm" (stock timm, SDPA attention), "timm-math" (stock
#: timm with the attention written out, as timm ran before torch 2.0), "timm-compile" (the timm trace
#: with every chain of memory-bound ops fused into one kernel, GEMMs left to cuBLAS and attention to
#: SDPA flash: a model of torch.compile(timm), see compiled.py), "reference" / "fused" / "auto"
#: (vit_fast.models).
VARIANTS = ("timm", "timm-math", "timm-compile", "reference", "fused", "auto")


def _build(name: str, impl: str, **kwargs: Any) -> torch.nn.Module:
    """`workload.build_model` for a trace variant ("timm-compile" traces the timm model it is derived from)."""
    from vit_fast.perf.workload import build_model

    return build_model(name, "timm" if impl == "timm-compile" else impl, **kwargs)


def meta_model(name: str, impl: str, **kwargs: Any) -> torch.nn.Module:
    """`workload.build_model` on the meta device. Call it OUTSIDE a FakeTensorMode: model init code may read
    values of small CPU tensors (timm's drop-path schedule does), which fake tensors cannot give.
    If the constructor cannot run on meta tensors (it reads a value of a tensor it created), the
    model is built on the CPU for real (memory = its parameters, freed once converted)."""
    try:
        with torch.device("meta"):
            return _build(name, impl, **kwargs)
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err):
            raise
    return _build(name, impl, **kwargs)


def to_fake(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every parameter and buffer of a meta `model` by an uninitialised fake CPU tensor,
    floating ones in `dtype` (call inside a FakeTensorMode)."""

    def convert(t: Tensor) -> Tensor:
        dt = dtype if t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=dt, device="cpu")

    return model._apply(convert)


@contextlib.contextmanager
def fake_mode() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


def trace_step(
    name: str,
    impl: str,
    batch: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    train: bool = True,
    optimizer: str | None = "adamw",
    img_size: int | None = None,
    label: str | None = None,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    kernel_level: bool = False,
    amp: bool = False,
    **model_kwargs: Any,
) -> CostReport:
    """Model one step of `name` built with `impl` at `batch` in `dtype` (parameters in `dtype`).

    train=False: one inference forward. train=True: forward, cross-entropy loss, backward, and the
    optimizer step ("adamw": fused AdamW, one launch per step; None: no optimizer). Also records the
    saved-for-backward bytes of the forward (parameters excluded, deduplicated by storage).
    kernel_level=True: each vit_fast:: op is traced through its Triton launcher (its real number of
    kernels and their operand bytes, see `CostMode._kernel_level`) instead of counting one launch.
    impl="timm-compile": the "timm" trace passed through `compiled.fuse_elementwise_chains`.
    amp=True: automatic mixed precision instead: fp32 parameters and images, the forward and loss
    under autocast to `dtype` (CPU autocast's op lists, which like CUDA's keep LayerNorm and the loss
    in fp32, so the casts and fp32 intermediates AMP costs are traced), fp32 gradients.
    """
    from vit_fast.perf.memory import SavedTensorRecorder

    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")
    if impl not in VARIANTS:
        raise ValueError(f"impl must be one of {VARIANTS}, got {impl!r}")
    if optimizer not in ("adamw", None):
        raise ValueError(f"optimizer must be 'adamw' or None, got {optimizer!r}")
    mode = CostMode(kernel_level=kernel_level)
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    model = meta_model(name, impl, **model_kwargs)
    store = torch.float32 if amp else dtype
    autocast = _cuda_like_autocast(dtype) if amp else contextlib.nullcontext()
    with fake_mode():
        model = to_fake(model, store)
        size = img_size or _model_img_size(model)
        images = torch.empty(batch, 3, size, size, dtype=store)
        labels = torch.zeros(batch, dtype=torch.long)
        model.train(train)
        params = [p for p in model.parameters() if p.requires_grad]
        recorder = SavedTensorRecorder(params)
        if not train:
            with torch.no_grad(), mode, autocast:
                model(images)
        else:
            opt = None
            if optimizer == "adamw":
                opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
                # Create the optimizer state outside the recording: a steady-state step does not
                # allocate exp_avg / exp_avg_sq.
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                opt.zero_grad(set_to_none=True)
            with mode:
                mode.phase = "forward"
                with recorder, autocast:
                    logits = model(images)
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                mode.phase = "backward"
                loss.backward()
                if opt is not None:
                    mode.phase = "optimizer"
                    opt.step()
    records = mode.records
    if impl == "timm-compile":
        from vit_fast.perf.cost.compiled import fuse_elementwise_chains

        records = fuse_elementwise_chains(records)
    return CostReport(
        label=label or impl,
        records=records,
        saved_bytes=recorder.result.activation_bytes,
        batch=batch,
        launch_overhead_s=launch_overhead_s,
        unknown_ops=mode.unknown_ops,
        kernel_level_failed=mode.kernel_level_failed,
    )


@contextlib.contextmanager
def _cuda_like_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CPU autocast to `dtype`, plus the one rule of CUDA's autocast that matters here and CPU's
    lacks: softmax runs in fp32 (CUDA's fp32 list has it), which is what an eager written-out
    attention pays under AMP on a GPU (an fp32 [B, H, T, T] and the casts around it)."""
    tensor_softmax, functional_softmax = torch.Tensor.softmax, torch.nn.functional.softmax

    def softmax(x: Tensor, dim: int, *args: Any, **kwargs: Any) -> Tensor:
        if x.is_floating_point() and x.dtype != torch.float32:
            x = x.float()
        return tensor_softmax(x, dim)

    torch.Tensor.softmax = softmax  # type: ignore[method-assign]
    torch.nn.functional.softmax = softmax
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        torch.Tensor.softmax = tensor_softmax  # type: ignore[method-assign]
        torch.nn.functional.softmax = functional_softmax


def _model_img_size(model: torch.nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return 224
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def forward_gflops_per_image(name: str, impl: str = "timm", dtype: torch.dtype = torch.float32) -> float:
    """Forward FLOPs per image (GFLOPs), from an inference trace at batch 1."""
    rep = trace_step(name, impl, 1, dtype, train=False)
    return rep.flops() / 1e9
