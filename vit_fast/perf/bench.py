"""Benchmark harness: per-op and whole-model timings of fused vs stock timm, torch.compile(timm) and the
reference; stock vs patched models (zoo, NaFlexVit) in the same process.

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed between reps, quantiles); on CPU
`torch.utils.benchmark.Timer` (blocks of calls, per-call medians; the whole-model impls' blocks
interleaved round by round, so a machine's drift moves them alike: `bench_models`). Every number is a
median over repetitions with its interquartile range (IQR). Memory: on CUDA the peak allocated bytes
of one forward+backward (`max_memory_allocated`); on any device the saved-for-backward bytes
(`vit_fast.perf.memory`, deduplicated by storage), which is the activation memory a training step holds.

impls: "fused" = `vit_fast.ops` / `create_model(impl="fused")` on the backend `select_backend` picks
(Triton on CUDA, the C++ extension on CPU where built, else the reference inside the custom op);
"reference" = `vit_fast.reference` / `impl="reference"` (plain PyTorch eager); "compiled" =
`torch.compile` of the reference (slow to compile on CPU: opt in there); "timm" = stock timm's model
of the same name (eager, its SDPA attention: what users run), "timm_compiled" = `torch.compile` of it.
The timm impls are whole-model only. Models are built and stepped by `vit_fast.perf.workload` (one
builder, one training step for every tool). Model results come with the GEMM floor of the step on
this machine (vit_fast.perf.gemm_floor): kind "floor" rows, one per mode; `gemm_ablation` adds the
fused model with each C++ GEMM library forced ("fused-aten", "fused-onednn").

Public API for other harnesses (benchmarks/ uses it): `op_callable`, `op_inputs`, `op_mode_calls`
(an op's timed calls), `measure` / `timed`, `bench_op`, `bench_model(s)`, `bench_zoo`, `bench_naflex`,
`run_suite`, `write_outputs`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from vit_fast.perf.memory import SavedTensorRecorder
from vit_fast.perf.tables import text_table
from vit_fast.perf.workload import (
    DEFAULT_COMPILE_BACKEND,
    build_model,
    cross_entropy,
    image_batch,
    make_steps,
    unwrap,
)

OPS = ("patch_embed", "layer_norm_linear", "attention", "linear_residual", "layer_norm_mlp")
OP_MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("fused", "reference", "compiled", "timm", "timm_compiled")
#: The impls that have per-op cases (timm is a model library: its impls are whole-model only).
OP_IMPLS = ("fused", "reference", "compiled")

#: torch.compile backend of the compiled impls when a case names none ("inductor" is what users run;
#: `vit-fast bench --compile-backend` sets it; tests use "aot_eager", which skips code generation).
COMPILE_BACKEND = DEFAULT_COMPILE_BACKEND


@dataclass
class BenchResult:
    """One benchmarked case. Times in milliseconds; bytes in bytes; None where not measured."""

    kind: str  # "op" or "model"
    name: str  # op name or model name
    mode: str  # fwd | bwd | fwd+bwd | inference | train
    impl: str  # fused | reference | compiled
    backend: str  # what ran the fused op (triton / cpu / reference) or "eager" / "inductor"
    device: str
    dtype: str
    batch: int
    tokens: int
    width: int
    median_ms: float
    iqr_ms: float
    reps: int
    samples_per_s: float | None = None
    saved_bytes: int | None = None
    peak_mem_bytes: int | None = None
    error: str = ""  # why this case failed (then median_ms is NaN); "" when it ran
    extra: dict[str, Any] = field(default_factory=dict)


def _error_text(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0] if msg else ''}"[:200]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, min_run_time: float = 0.2, min_reps: int = 1
) -> tuple[float, float, int]:
    """(median seconds, IQR seconds, repetitions) of `fn()` on `device` after one warm-up call.

    On CPU the median is over at least `min_reps` timed blocks: a whole training step can take longer
    than `min_run_time` by itself, and a median of one run is no median."""
    fn()
    _sync(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        rep_ms = max(25, int(min_run_time * 1000))
        q25, q50, q75 = do_bench(fn, warmup=5, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return q50 / 1e3, (q75 - q25) / 1e3, -1
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_reps:
        times.append(timer.timeit(m.number_per_run).median)
    times.sort()
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return statistics.median(times), iqr, m.number_per_run * len(times)


def timed(
    call: Callable[[], Any], device: torch.device, min_run_time: float = 0.2, min_reps: int = 1
) -> tuple[float, float, int, str]:
    """`measure` in milliseconds: (median ms, IQR ms, repetitions, error). A call that raises gives
    NaN times and the error's first line, so a suite reports the failing case and goes on."""
    try:
        med, iqr, reps = measure(call, device, min_run_time, min_reps)
    except Exception as err:
        return math.nan, math.nan, 0, _error_text(err)
    return med * 1e3, iqr * 1e3, reps, ""


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of `fn` on CUDA (None elsewhere)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# ----------------------------------------------------------------------------------------------
# Per-op cases
# ----------------------------------------------------------------------------------------------


@dataclass
class OpShape:
    """Sizes of one transformer block's ops: batch, tokens (incl. cls), width, heads, MLP hidden."""

    batch: int
    tokens: int
    width: int
    heads: int
    mlp_hidden: int
    patch: int = 16

    @property
    def grid(self) -> int:
        # patch_embed: an image whose patch grid gives tokens-1 patches (+ cls); rounds to a square.
        return max(1, round(math.sqrt(self.tokens - 1)))


def op_inputs(
    op: str, s: OpShape, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) of a call of `op` (one of `OPS`) at shape `s`: random inputs, every floating
    one requiring grad except the images of patch_embed (training from pixels needs no image grad)."""

    def p(*shape: int, scale: float = 0.02) -> Tensor:
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    def ones(n: int) -> Tensor:
        return torch.ones(n, device=device, dtype=dtype).requires_grad_()

    B, T, D, H, F = s.batch, s.tokens, s.width, s.heads, s.mlp_hidden
    x = lambda: torch.randn(B, T, D, device=device, dtype=dtype).requires_grad_()
    if op == "patch_embed":
        g = s.grid
        images = torch.randn(B, 3, g * s.patch, g * s.patch, device=device, dtype=dtype)
        return [images, p(D, 3, s.patch, s.patch), p(D), p(1, g * g + 1, D), p(1, 1, D)], {
            "patch_size": s.patch
        }
    if op == "layer_norm_linear":
        return [x(), ones(D), p(D), p(3 * D, D), p(3 * D), 1e-6], {}
    if op == "attention":
        qkv = torch.randn(B, T, 3 * D, device=device, dtype=dtype).requires_grad_()
        return [qkv, H], {}
    if op == "linear_residual":
        return [x(), p(D, D), p(D), x()], {}
    if op == "layer_norm_mlp":
        return [x(), ones(D), p(D), p(F, D), p(F), p(D, F), p(D), 1e-6], {}
    raise ValueError(f"op: unknown op {op!r}; known: {OPS}")


def op_callable(op: str, impl: str) -> tuple[Callable[..., Tensor], str]:
    """(function, backend label) of `op` in `impl` (one of `OP_IMPLS`): "fused" = `vit_fast.ops.<op>`,
    "reference" = `vit_fast.reference.<op>` (eager), "compiled" = torch.compile of the reference
    (backend `COMPILE_BACKEND`). The function takes `op_inputs(op, ...)`'s args and kwargs."""
    import vit_fast.ops as fused
    from vit_fast import reference

    if op not in OPS:
        raise ValueError(f"op: unknown op {op!r}; known: {OPS}")
    if impl == "fused":
        return getattr(fused, op), "fused"
    if impl == "reference":
        return getattr(reference, op), "eager"
    if impl == "compiled":
        return torch.compile(getattr(reference, op), dynamic=False, backend=COMPILE_BACKEND), COMPILE_BACKEND
    raise ValueError(f"impl must be one of {OP_IMPLS}, got {impl!r}")


def op_mode_calls(
    fn: Callable[..., Tensor], args: list[Any], kwargs: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    """The timed call of each of `OP_MODES` for `fn(*args, **kwargs)`: "fwd" a no-grad forward,
    "bwd" the backward of one retained graph (built on its first call), "fwd+bwd" both."""
    leaves = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    grad = torch.randn_like(fn(*args, **kwargs))
    graph: list[Tensor] = []

    def fwd() -> None:
        with torch.no_grad():
            fn(*args, **kwargs)

    def bwd() -> None:
        if not graph:
            graph.append(fn(*args, **kwargs))
        torch.autograd.grad(graph[0], leaves, grad, retain_graph=True)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        fn(*args, **kwargs).backward(grad)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _fused_backend(op: str, device: torch.device) -> str:
    from vit_fast.ops.backend import select_backend

    family = {"layer_norm_linear": "layer_norm", "linear_residual": "mlp", "layer_norm_mlp": "mlp"}.get(
        op, op
    )
    return select_backend(device, family)


def bench_op(
    op: str,
    impl: str,
    shape: OpShape,
    modes: Iterable[str] = OP_MODES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.2,
    min_reps: int = 5,
) -> list[BenchResult]:
    """Time `op` in `impl` at `shape` for each of `modes` (fwd: no-grad forward; bwd: backward of a
    retained graph; fwd+bwd: both), plus saved-for-backward bytes and CUDA peak memory. Each median
    is over at least `min_reps` timed blocks, so the IQR shows a real spread."""
    modes = tuple(modes)
    if op not in OPS:
        raise ValueError(f"op: unknown op {op!r}; known: {OPS}")
    if impl not in OP_IMPLS:
        raise ValueError(f"impl must be one of {OP_IMPLS}, got {impl!r}")
    bad = [m for m in modes if m not in OP_MODES]
    if bad:
        raise ValueError(f"modes: each mode must be one of {OP_MODES}, got {bad}")
    device = torch.device(device)
    fn, backend = op_callable(op, impl)
    if impl == "fused":
        backend = _fused_backend(op, device)
    args, kwargs = op_inputs(op, shape, device, dtype)
    calls = op_mode_calls(fn, args, kwargs)
    # The op's inputs exist anyway (they are the previous op's outputs or weights): count only what
    # the op itself adds to the activations kept for backward.
    with SavedTensorRecorder([a for a in args if isinstance(a, Tensor)]) as rec:
        kept = fn(*args, **kwargs)
    saved = rec.result.activation_bytes
    del kept
    try:
        peak = peak_memory(calls["fwd+bwd"], device)
    except Exception:
        peak = None  # the fwd+bwd case below reports the error
    results = []
    for mode in modes:
        med, iqr, reps, error = timed(calls[mode], device, min_run_time, min_reps)
        results.append(
            BenchResult(
                "op", op, mode, impl, backend, device.type, str(dtype).removeprefix("torch."),
                shape.batch, shape.tokens, shape.width, med, iqr, reps,
                saved_bytes=saved, peak_mem_bytes=peak, error=error,
            )
        )  # fmt: skip
    return results


# ----------------------------------------------------------------------------------------------
# Whole-model cases
# ----------------------------------------------------------------------------------------------


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _ModelCase:
    """One impl's model, its timed steps (`workload.make_steps`) and what the rows report about it."""

    impl: str
    backend: str
    tokens: int
    width: int
    steps: dict[str, Callable[[], Any]]
    saved: int | None


def _model_case(
    name: str, impl: str, batch: int, device: torch.device, dtype: torch.dtype, compile_backend: str,
    **model_kwargs: Any,
) -> _ModelCase:  # fmt: skip
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(0)
    model = build_model(name, impl, device, dtype, compile_backend=compile_backend, **model_kwargs)
    base = unwrap(model)
    images, labels = image_batch(model, batch, device, dtype)
    if impl == "fused":
        from vit_fast.ops.backend import active_backends

        backend = ",".join(sorted(set(active_backends(device).values())))
    else:
        backend = compile_backend if impl in ("compiled", "timm_compiled") else "eager"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    saved: int | None = None
    try:
        with SavedTensorRecorder(params) as rec:
            out = model(images)
        saved = rec.result.activation_bytes
        del out
    except Exception:
        pass  # the timed cases report the error
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    return _ModelCase(
        impl, backend, tokens, base.embed_dim, make_steps(model, images, cross_entropy(labels)), saved
    )


def _block_seconds(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Seconds per call of `fn` over one block of `number` back-to-back calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=1, rep=25, return_mode="median") / 1e3
    # Not torch.utils.benchmark's Timer.timeit: it runs max(number // 100, 2) untimed calls before
    # every block, which triples the cost of a block of one multi-second training step. Like it (and
    # timeit), the garbage collector is off while the block runs.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was_on:
            gc.enable()


def bench_models(
    name: str,
    impls: Iterable[str],
    batch: int,
    modes: Iterable[str] = ("inference", "train"),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    min_reps: int = 5,
    *,
    compile_backend: str | None = None,
    **model_kwargs: Any,
) -> list[BenchResult]:
    """Inference and training step (`workload.make_steps`: forward, cross-entropy, backward, SGD step)
    of model `name` built as each of `impls` (of `IMPLS`, by `workload.build_model`) at `batch`: step
    time (median and IQR over at least `min_reps` timed blocks), samples/s, saved bytes, CUDA peak
    memory. Rows in `impls` order, then `modes` order.

    The impls' blocks are interleaved: round r times one block of each impl, the order rotated by r,
    so a machine that slows down or speeds up during the run (a shared VM: one 2-core EPYC's timm
    training step read 1.68, 1.99 and 2.27 s in a row) moves every impl's samples alike instead of
    deciding the ratio. A block is as many calls as fit in min_run_time / min_reps (at least one).
    An impl whose build or warm-up call raises gets error rows; the others are timed on.
    `model_kwargs` override the model configuration (e.g. depth, img_size); the compiled impls use
    `compile_backend` (default `COMPILE_BACKEND`)."""
    modes, impls = tuple(modes), tuple(impls)
    bad = [m for m in modes if m not in ("inference", "train")]
    if bad or batch < 1 or min_reps < 1:
        raise ValueError(
            f"modes must be 'inference'/'train', batch >= 1 and min_reps >= 1, got modes={modes}, "
            f"batch={batch}, min_reps={min_reps}"
        )
    if bad_impls := [i for i in impls if i not in IMPLS]:
        raise ValueError(f"impl must be one of {IMPLS}, got {bad_impls}")
    device = torch.device(device)
    compile_backend = compile_backend or COMPILE_BACKEND
    cases: dict[str, _ModelCase] = {}
    errors: dict[tuple[str, str], str] = {}
    for impl in impls:
        try:
            cases[impl] = _model_case(name, impl, batch, device, dtype, compile_backend, **model_kwargs)
        except Exception as err:
            errors.update({(impl, mode): _error_text(err) for mode in modes})
    peaks: dict[tuple[str, str], int | None] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    numbers: dict[tuple[str, str], int] = {}
    for mode in modes:
        live = []
        for impl, case in cases.items():
            fn = case.steps[mode]
            try:
                peaks[impl, mode] = peak_memory(fn, device)  # on CPU: None, without a call
                fn()  # warm-up (compiles, tunes, packs), then one call to size the blocks
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                one = time.perf_counter() - t0
            except Exception as err:
                errors[impl, mode] = _error_text(err)
                continue
            numbers[impl, mode] = max(1, int(min_run_time / min_reps / max(one, 1e-9)))
            samples[impl, mode] = []
            live.append(impl)
        for r in range(min_reps if live else 0):
            for impl in live[r % len(live) :] + live[: r % len(live)]:
                if (impl, mode) in errors:
                    continue
                try:
                    samples[impl, mode].append(
                        _block_seconds(cases[impl].steps[mode], device, numbers[impl, mode])
                    )
                except Exception as err:
                    errors[impl, mode] = _error_text(err)
    results = []
    for impl in impls:
        case = cases.get(impl)
        for mode in modes:
            times = sorted(samples.get((impl, mode), [])) if (impl, mode) not in errors else []
            med = statistics.median(times) * 1e3 if times else math.nan
            iqr = math.nan
            if len(times) >= 2:
                q = statistics.quantiles(times, n=4, method="inclusive")
                iqr = (q[2] - q[0]) * 1e3
            elif times:
                iqr = 0.0
            reps = len(times) * numbers.get((impl, mode), 0)
            error = errors.get((impl, mode), "")
            results.append(
                BenchResult(
                    "model", name, mode, impl, case.backend if case else "?", device.type,
                    str(dtype).removeprefix("torch."), batch, case.tokens if case else 0,
                    case.width if case else 0, med, iqr, reps,
                    samples_per_s=batch / med * 1e3 if not error else None,
                    saved_bytes=case.saved if case and mode == "train" else None,
                    peak_mem_bytes=peaks.get((impl, mode)), error=error,
                )
            )  # fmt: skip
    return results


def bench_model(
    name: str,
    impl: str,
    batch: int,
    modes: Iterable[str] = ("inference", "train"),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    min_reps: int = 5,
    *,
    compile_backend: str | None = None,
    **model_kwargs: Any,
) -> list[BenchResult]:
    """`bench_models` of one impl (rows in `modes` order)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return bench_models(
        name, (impl,), batch, modes, device, dtype, min_run_time, min_reps, compile_backend=compile_backend,
        **model_kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Suites, output
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    model: str = "vit_tiny_patch16_224"
    batch: int = 2
    impls: tuple[str, ...] = ("fused", "reference")
    ops: tuple[str, ...] = OPS
    op_modes: tuple[str, ...] = OP_MODES
    model_modes: tuple[str, ...] = ("inference", "train")
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    min_run_time: float = 0.1
    sweep: bool = True
    sweep_ops: tuple[str, ...] = ("attention", "layer_norm_mlp")
    sweep_tokens: tuple[int, ...] = (50, 197, 257)
    sweep_batch: tuple[int, ...] = (1, 2, 4)
    sweep_width: tuple[int, ...] = (96, 192, 384)
    run_ops: bool = True
    run_model: bool = True
    model_min_reps: int = 5
    op_min_reps: int = 5
    gemm_floor: bool = True
    gemm_ablation: bool = False  # CPU: the fused model again with each GEMM library forced
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def model_shape(name: str, batch: int, **overrides: Any) -> OpShape:
    """The block shape of model `name` (with configuration `overrides`) at `batch`."""
    from vit_fast.models import model_config

    cfg = model_config(name) | overrides
    D = cfg.get("embed_dim", 768)
    img, patch = cfg.get("img_size", 224), cfg.get("patch_size", 16)
    img = img if isinstance(img, int) else img[0]
    tokens = (img // patch) ** 2 + 1
    return OpShape(batch, tokens, D, cfg.get("num_heads", 12), int(D * cfg.get("mlp_ratio", 4.0)), patch)


def run_suite(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """Run per-op cases at the model's block shape, the whole model, and the sweeps (fwd+bwd per op
    versus tokens, batch and width) for every impl in `cfg.impls`."""
    say = progress or (lambda msg: None)
    device = torch.device(cfg.device)
    results: list[BenchResult] = []
    shape = model_shape(cfg.model, cfg.batch, **cfg.model_kwargs)
    op_impls = [i for i in cfg.impls if i in OP_IMPLS]
    if cfg.run_ops:
        for op in cfg.ops:
            for impl in op_impls:
                say(f"op {op} {impl}")
                results += _guard(
                    partial(
                        bench_op, op, impl, shape, cfg.op_modes, device, cfg.dtype, cfg.min_run_time,
                        cfg.op_min_reps,
                    ),
                    "op", op, impl, cfg.op_modes, shape, cfg.device, cfg.dtype,
                )  # fmt: skip
    if cfg.run_model:
        say(f"model {cfg.model} {', '.join(cfg.impls)} (interleaved)")
        results += bench_models(
            cfg.model, cfg.impls, cfg.batch, cfg.model_modes, device, cfg.dtype, max(cfg.min_run_time, 0.3),
            cfg.model_min_reps, **cfg.model_kwargs,
        )  # fmt: skip
        if cfg.gemm_ablation:
            results += _gemm_ablation(cfg, shape, say)
        if cfg.gemm_floor:
            say(f"GEMM floor {cfg.model}")
            results += _floor_results(cfg, shape)
    if cfg.sweep:
        points = [
            ("tokens", OpShape(cfg.batch, t, shape.width, shape.heads, shape.mlp_hidden))
            for t in cfg.sweep_tokens
        ]
        points += [
            ("batch", OpShape(b, shape.tokens, shape.width, shape.heads, shape.mlp_hidden))
            for b in cfg.sweep_batch
        ]
        points += [
            ("width", OpShape(cfg.batch, shape.tokens, w, max(1, w // 64), 4 * w)) for w in cfg.sweep_width
        ]
        for axis, s in points:
            for op in cfg.sweep_ops:
                for impl in op_impls:
                    say(f"sweep {axis} {op} {impl}")
                    case = partial(
                        bench_op,
                        op,
                        impl,
                        s,
                        ("fwd+bwd",),
                        device,
                        cfg.dtype,
                        cfg.min_run_time,
                        cfg.op_min_reps,
                    )
                    for r in _guard(case, "op", op, impl, ("fwd+bwd",), s, cfg.device, cfg.dtype):
                        r.kind, r.extra = "sweep", {"axis": axis}
                        results.append(r)
    return results


#: `--gemm-ablation`: impl name -> the C++ backend GEMM library forced for it (csrc/gemm.h).
GEMM_ABLATION = {"fused-aten": "aten", "fused-onednn": "onednn"}


@contextlib.contextmanager
def cpu_gemm_library(name: str) -> Iterator[None]:
    """Force the C++ backend's GEMM library (`set_gemm_backend`) inside the block, then restore it."""
    from vit_fast.ops.backend import cpu_extension

    ext = cpu_extension()
    if ext is None or not hasattr(ext, "set_gemm_backend"):
        raise RuntimeError("the GEMM ablation needs the C++ extension (vit_fast._C), which is not built")
    previous = ext.gemm_backend()
    ext.set_gemm_backend(name)
    try:
        yield
    finally:
        ext.set_gemm_backend(previous)


def _gemm_ablation(cfg: BenchConfig, shape: OpShape, say: Callable[[str], None]) -> list[BenchResult]:
    """The fused model with each of `GEMM_ABLATION`'s libraries forced: impls "fused-aten" (at::mm)
    and "fused-onednn", so the speedup table shows each against the default pick ("fused")."""
    results = []
    for impl, lib in GEMM_ABLATION.items():
        say(f"model {cfg.model} {impl}")

        def case(lib: str = lib, impl: str = impl) -> list[BenchResult]:
            with cpu_gemm_library(lib):
                rows = bench_model(
                    cfg.model, "fused", cfg.batch, cfg.model_modes, cfg.device, cfg.dtype,
                    max(cfg.min_run_time, 0.3), cfg.model_min_reps, **cfg.model_kwargs,
                )  # fmt: skip
            for r in rows:
                r.impl, r.backend = impl, f"cpu/{lib}"
            return rows

        results += _guard(case, "model", cfg.model, impl, cfg.model_modes, shape, cfg.device, cfg.dtype)
    return results


def _floor_results(cfg: BenchConfig, shape: OpShape) -> list[BenchResult]:
    """The GEMM floor of the model's step as kind "floor" rows (impl "gemm_floor"; backend: the libraries
    that won; extra: GEMM GFLOP). A failure gives error rows like any other case."""
    from vit_fast.perf.gemm_floor import gemm_floor

    def case() -> list[BenchResult]:
        # Each library and shape is timed for 0.05 s, or less when the whole run asks for less.
        floor_time = min(cfg.min_run_time, 0.05)
        floors = gemm_floor(
            cfg.model, cfg.batch, cfg.device, cfg.dtype, cfg.model_modes, floor_time, **cfg.model_kwargs
        )
        return [
            BenchResult(
                "floor", cfg.model, mode, "gemm_floor", ",".join(sorted({lib for _, _, lib in fl.rows}))[:60],
                torch.device(cfg.device).type, str(cfg.dtype).removeprefix("torch."), cfg.batch, shape.tokens,
                shape.width, fl.floor_ms, 0.0, 0, extra={"gflop": fl.gflop},
            )
            for mode, fl in floors.items()
        ]  # fmt: skip

    return _guard(case, "floor", cfg.model, "gemm_floor", cfg.model_modes, shape, cfg.device, cfg.dtype)


def _guard(
    case: Callable[[], list[BenchResult]],
    kind: str,
    name: str,
    impl: str,
    modes: Iterable[str],
    shape: OpShape,
    device: torch.device | str,
    dtype: torch.dtype,
) -> list[BenchResult]:
    """Run one case; if its setup raises, return one error row per mode instead of aborting the suite."""
    try:
        return case()
    except Exception as err:
        return [
            BenchResult(
                kind, name, mode, impl, "?", torch.device(device).type, str(dtype).removeprefix("torch."),
                shape.batch, shape.tokens, shape.width, math.nan, math.nan, 0, error=_error_text(err),
            )
            for mode in modes
        ]  # fmt: skip


COLUMNS = [
    "kind", "name", "mode", "impl", "backend", "device", "dtype", "batch", "tokens", "width",
    "median_ms", "iqr_ms", "reps", "samples_per_s", "saved_bytes", "peak_mem_bytes", "axis", "error",
]  # fmt: skip


def _row(r: BenchResult) -> dict[str, Any]:
    d = asdict(r)
    d["axis"] = d.pop("extra").get("axis", "")
    return {k: d.get(k) for k in COLUMNS}


def write_outputs(
    results: list[BenchResult], out_dir: str, env: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write bench.csv and bench.json (with the environment) to `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "bench.csv"), "json": os.path.join(out_dir, "bench.json")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            w.writerow(_row(r))
    with open(paths["json"], "w") as f:
        doc = {
            "environment": env or {},
            "results": [_row(r) for r in results],
            "speedups": speedups(results),
            "ratios": pair_ratios(results),
            "gemm_floor": floor_fractions(results),
        }
        json.dump(doc, f, indent=1, default=str)
    return paths


def plot(results: list[BenchResult], out_dir: str) -> str | None:
    """bench_sweep.png: fwd+bwd time (top) and saved-for-backward MB (bottom) against tokens, batch
    and width, one line per op and impl. None when there are no sweep results."""
    sweep = [r for r in results if r.kind == "sweep"]
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [a for a in ("tokens", "batch", "width") if any(r.extra.get("axis") == a for r in sweep)]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(5 * len(axes_names), 7), squeeze=False)
    for col, axis in enumerate(axes_names):
        pts = [r for r in sweep if r.extra.get("axis") == axis]
        for key in sorted({(r.name, r.impl) for r in pts}):
            line = sorted((getattr(r, axis), r) for r in pts if (r.name, r.impl) == key)
            xs = [x for x, _ in line]
            axes[0][col].plot(xs, [r.median_ms for _, r in line], marker="o", label=f"{key[0]} {key[1]}")
            axes[1][col].plot(
                xs, [(r.saved_bytes or 0) / 2**20 for _, r in line], marker="o", label=f"{key[0]} {key[1]}"
            )
        axes[0][col].set_title(f"fwd+bwd time vs {axis}")
        axes[0][col].set_ylabel("median ms")
        axes[1][col].set_title(f"saved-for-backward vs {axis}")
        axes[1][col].set_ylabel("MiB")
        axes[1][col].set_xlabel(axis)
        axes[0][col].legend(fontsize=7)
    dev = sweep[0].device
    fig.suptitle(f"vit_fast per-op benchmark on {dev} ({sweep[0].dtype}), measured")
    fig.tight_layout()
    path = os.path.join(out_dir, "bench_sweep.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def speedups(results: list[BenchResult]) -> list[dict[str, Any]]:
    """For every op/model case that has a fused result: each other impl's median time divided by the
    fused one, measured in the same run (> 1 means fused is faster)."""

    def key(r: BenchResult) -> tuple:
        return (r.kind, r.name, r.mode, r.device, r.dtype, r.batch, r.tokens, r.width)

    fused = {key(r): r for r in results if r.impl == "fused" and not r.error}
    rows = []
    for r in results:
        f = fused.get(key(r))
        if r.impl == "fused" or r.error or f is None or r.kind in ("sweep", "floor") or not f.median_ms > 0:
            continue
        rows.append(
            {
                "kind": r.kind, "name": r.name, "mode": r.mode, "batch": r.batch, "tokens": r.tokens,
                "impl": r.impl, "impl_ms": r.median_ms, "fused_ms": f.median_ms,
                "speedup": r.median_ms / f.median_ms,
            }
        )  # fmt: skip
    return rows


def floor_fractions(results: list[BenchResult]) -> list[dict[str, Any]]:
    """Per model mode with a GEMM floor: floor ms, GEMM GFLOP and, per impl, the fraction of the floor
    reached (floor ms / measured ms; 1.0 would be a step that is all GEMM at full library speed)."""
    rows = []
    for fl in (r for r in results if r.kind == "floor" and not r.error):
        for r in results:
            if (
                r.kind == "model"
                and r.name == fl.name
                and r.mode == fl.mode
                and not r.error
                and r.median_ms > 0
            ):
                rows.append(
                    {
                        "name": r.name, "mode": r.mode, "impl": r.impl, "impl_ms": r.median_ms,
                        "floor_ms": fl.median_ms, "gemm_gflop": fl.extra.get("gflop"),
                        "fraction": fl.median_ms / r.median_ms,
                    }
                )  # fmt: skip
    return rows


def format_floor_fractions(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of `floor_fractions`."""
    head = f"{'name':22} {'mode':9} {'impl':14} {'impl ms':>10} {'floor ms':>10} {'GEMM GFLOP':>10} {'of floor':>8}"
    title = "GEMM floor: the step's GEMMs alone at the best measured library speed per shape"
    return text_table(
        title,
        head,
        (
            f"{r['name'][:22]:22} {r['mode']:9} {r['impl']:14} {r['impl_ms']:10.2f} {r['floor_ms']:10.2f} "
            f"{r['gemm_gflop']:10.2f} {r['fraction']:8.0%}"
            for r in rows
        ),
    )


def format_speedups(rows: list[dict[str, Any]]) -> str:
    """Plain-text speedup table (impl time / fused time)."""
    head = f"{'kind':6} {'name':22} {'mode':9} {'vs impl':13} {'impl ms':>10} {'fused ms':>10} {'speedup':>8}"
    return text_table(
        "speedup of fused (impl time / fused time, same run; > 1 = fused faster)",
        head,
        (
            f"{r['kind']:6} {r['name'][:22]:22} {r['mode']:9} {r['impl']:13} {r['impl_ms']:10.2f} "
            f"{r['fused_ms']:10.2f} {r['speedup']:7.2f}x"
            for r in rows
        ),
    )


def format_table(results: list[BenchResult]) -> str:
    """Plain-text table of the op and model results (the sweep goes to CSV/plots)."""
    head = (
        f"{'kind':6} {'name':22} {'mode':9} {'impl':13} {'backend':10} {'B':>3} {'T':>4} {'D':>4} "
        f"{'median ms':>10} {'IQR ms':>8} {'samples/s':>10} {'saved MiB':>9} {'peak MiB':>8}"
    )
    lines = []
    for r in results:
        if r.kind == "sweep":
            continue
        sps = f"{r.samples_per_s:10.1f}" if r.samples_per_s else f"{'':10}"
        sav = f"{r.saved_bytes / 2**20:9.2f}" if r.saved_bytes is not None else f"{'':9}"
        peak = f"{r.peak_mem_bytes / 2**20:8.1f}" if r.peak_mem_bytes is not None else f"{'n/a':>8}"
        lines.append(
            f"{r.kind:6} {r.name[:22]:22} {r.mode:9} {r.impl:13} {r.backend[:10]:10} {r.batch:>3} {r.tokens:>4} "
            f"{r.width:>4} {r.median_ms:10.3f} {r.iqr_ms:8.3f} {sps} {sav} {peak}"
            + (f"  ERROR {r.error}" if r.error else "")
        )
    return text_table(None, head, lines)


def print_rich_table(results: list[BenchResult]) -> bool:
    """Print the table with rich when installed; False when it is not (caller prints plain text)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title="vit_fast benchmark (measured: median over repetitions, IQR = spread)")
    cols = ["kind", "name", "mode", "impl", "backend", "B", "T", "D"]
    cols += ["median ms", "IQR ms", "samples/s", "saved MiB", "peak MiB"]
    if any(r.error for r in results):
        cols.append("error")
    for col in cols:
        table.add_column(col, justify="right" if col[0].isupper() or " " in col or "/" in col else "left")
    for r in results:
        if r.kind == "sweep":
            continue
        table.add_row(
            r.kind, r.name, r.mode, r.impl, r.backend, str(r.batch), str(r.tokens), str(r.width),
            f"{r.median_ms:.3f}", f"{r.iqr_ms:.3f}",
            f"{r.samples_per_s:.1f}" if r.samples_per_s else "",
            f"{r.saved_bytes / 2**20:.2f}" if r.saved_bytes is not None else "",
            f"{r.peak_mem_bytes / 2**20:.1f}" if r.peak_mem_bytes is not None else "n/a",
            *([r.error] if "error" in cols else []),
        )  # fmt: skip
    Console(width=200).print(table)
    return True


def wall_clock() -> float:
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Zoo: a Hugging Face / torchvision / open_clip model, patched vs its stock self
# ----------------------------------------------------------------------------------------------


def _zoo_output(out: Any) -> Tensor:
    """The main tensor of a zoo model's output (HF output objects, tuples or a tensor)."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, Tensor):
            return t
    return out[0]


def _stock_vs_patched(
    kind: str,
    name: str,
    models: dict[str, tuple[torch.nn.Module, str]],
    inputs: Any,
    loss: Callable[[Any], Tensor],
    batch: int,
    modes: Iterable[str],
    device: torch.device,
    dtype: torch.dtype,
    min_run_time: float,
    min_reps: int,
    lr: float = 1e-4,
    tokens: int = 0,
    width: int = 0,
) -> list[BenchResult]:
    """Time `workload.make_steps` of each of `models` ({impl: (model, backend label)}) on the same
    `inputs`. Per mode the impls run back to back, so on a shared machine they see similar load."""
    steps = {impl: make_steps(model, inputs, loss, lr=lr) for impl, (model, _) in models.items()}
    results = []
    for mode in modes:
        for impl, (_, backend) in models.items():
            med, iqr, reps, error = timed(steps[impl][mode], device, min_run_time, min_reps)
            results.append(
                BenchResult(
                    kind, name, mode, impl, backend, device.type, str(dtype).removeprefix("torch."),
                    batch, tokens, width, med, iqr, reps,
                    samples_per_s=batch / med * 1e3 if not error else None, error=error,
                )
            )  # fmt: skip
    return results


def bench_zoo(
    name: str,
    batch: int,
    size: str = "base",
    modes: Iterable[str] = ("inference", "train"),
    device: torch.device | str = "cpu",
    min_run_time: float = 0.5,
    min_reps: int = 5,
) -> list[BenchResult]:
    """Model `name` of `vit_fast.integrations.zoo` (random weights, from its config) stock vs
    `vit_fast.patch`ed, same process, fp32: inference (no-grad forward) and training step (forward,
    mean-square loss on the main output, backward, SGD step). impl is 'stock' or 'patched'.
    The two copies start from the same weights; per mode, stock is timed right before patched."""
    from vit_fast.integrations import patch
    from vit_fast.integrations.zoo import build

    device = torch.device(device)
    torch.manual_seed(0)
    stock, img = build(name, size)
    stock = stock.to(device)
    models = {"stock": (stock, "eager"), "patched": (patch(copy.deepcopy(stock)), "fused")}
    images = torch.randn(batch, 3, img, img, device=device)
    loss = lambda out: _zoo_output(out).float().square().mean()
    return _stock_vs_patched(
        "zoo",
        name,
        models,
        images,
        loss,
        batch,
        modes,
        device,
        torch.float32,
        min_run_time,
        min_reps,
        lr=1e-6,
    )


#: `vit-fast bench --naflex` defaults: the NaFlexVit timed when none is named, the batch and the
#: most patches per image of its length mix (`vit-fast cost --naflex` models the same batch).
NAFLEX_DEFAULT = "naflexvit_base_patch16_gap"
NAFLEX_BATCH = 8
NAFLEX_MAX_PATCHES = 256


def bench_naflex(
    name: str = NAFLEX_DEFAULT,
    batch: int = NAFLEX_BATCH,
    max_patches: int = NAFLEX_MAX_PATCHES,
    modes: Iterable[str] = ("inference", "train"),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    min_reps: int = 5,
    *,
    compile: bool = False,
    compile_backend: str | None = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> list[BenchResult]:
    """timm's NaFlexVit `name` (random weights) on a NaFlex batch of mixed resolutions and aspect
    ratios (`workload.naflex_grids(batch, max_patches, seed)`: mixed valid lengths, padded to the
    longest), same process: impl "stock" (timm's own path: an additive [B, 1, T, T] mask from
    patch_valid, passed to SDPA), "patched" (`vit_fast.patch_timm`: the masks become lengths and
    attention runs `vit_fast.ops.attention(..., seq_lens=...)`, no work on padding) and, with
    `compile`, "stock_compiled" (torch.compile(stock), backend `compile_backend`; a failure is an
    error row). Inference and training step (cross-entropy, backward, SGD). `tokens` is the padded
    length; `extra["lengths"]` the valid tokens per image (prefix tokens included)."""
    from vit_fast.integrations.timm import patch_timm
    from vit_fast.perf.workload import naflex_batch, naflex_grids

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = torch.device(device)
    torch.manual_seed(0)
    stock = build_model(name, "timm", device, dtype, **model_kwargs)
    if type(stock).__name__ != "NaFlexVit":
        raise ValueError(f"--naflex: {name!r} is a {type(stock).__name__}, not a timm NaFlexVit")
    models = {"stock": (stock, "eager"), "patched": (patch_timm(copy.deepcopy(stock)), "fused")}
    if compile:
        backend = compile_backend or COMPILE_BACKEND
        models["stock_compiled"] = (torch.compile(copy.deepcopy(stock), backend=backend), backend)
    grids = naflex_grids(batch, max_patches, seed)
    inputs = naflex_batch(grids, stock.embeds.patch_size[0], device=device, dtype=dtype, seed=seed)
    labels = torch.randint(0, stock.num_classes, (batch,), device=device)
    prefix = stock.num_prefix_tokens
    results = _stock_vs_patched(
        "naflex", name, models, inputs, cross_entropy(labels), batch, modes, device, dtype,
        min_run_time, min_reps, tokens=prefix + inputs["patch_valid"].shape[1], width=stock.embed_dim,
    )  # fmt: skip
    for r in results:
        r.extra = {"lengths": [prefix + h * w for h, w in grids]}
    return results


def pair_ratios(results: list[BenchResult]) -> list[dict[str, Any]]:
    """Per (kind, name, mode, batch) of the stock-vs-patched cases (zoo, naflex): the stock time over
    the patched one (> 1 = patched faster) and, where timed, torch.compile(stock) over patched."""
    rows = []
    pairs = [r for r in results if r.kind in ("zoo", "naflex")]
    for key in dict.fromkeys((r.kind, r.name, r.mode, r.batch) for r in pairs):
        got = {r.impl: r for r in pairs if (r.kind, r.name, r.mode, r.batch) == key}
        p = got.get("patched")
        if p is None or p.error or not p.median_ms > 0:
            continue
        row = dict(zip(("kind", "name", "mode", "batch"), key)) | {"patched_ms": p.median_ms}
        if "lengths" in p.extra:
            row["lengths"] = p.extra["lengths"]
        for impl in ("stock", "stock_compiled"):
            r = got.get(impl)
            if r is not None:
                ok = not r.error
                row[f"{impl}_ms"] = r.median_ms if ok else None
                row[f"{impl}/patched"] = r.median_ms / p.median_ms if ok else None
                if r.error:
                    row[f"{impl}_error"] = r.error
        rows.append(row)
    return rows


def format_pairs(results: list[BenchResult]) -> str:
    """stock ms, patched ms and stock / patched per (model, mode); torch.compile(stock) beside them
    when it was timed (its error when it failed)."""
    rows = pair_ratios(results)
    compiled = any("stock_compiled_ms" in r for r in rows)
    head = f"{'model':<28} {'mode':<9} {'batch':>5} {'stock ms':>10} {'patched ms':>10} {'stock/patched':>13}"
    if compiled:
        head += f" {'compiled ms':>11} {'compiled/patched':>16}"
    lines = [head]
    num = lambda v, w, f: f"{v:{w}{f}}" if v is not None else f"{'-':>{w}}"
    for r in rows:
        line = (
            f"{r['name'][:28]:<28} {r['mode']:<9} {r['batch']:>5} {num(r.get('stock_ms'), 10, '.1f')} "
            f"{r['patched_ms']:10.1f} {num(r.get('stock/patched'), 13, '.2f')}"
        )
        if compiled:
            line += f" {num(r.get('stock_compiled_ms'), 11, '.1f')} {num(r.get('stock_compiled/patched'), 16, '.2f')}"
        lines.append(
            line + (f"  compiled: {r['stock_compiled_error']}" if "stock_compiled_error" in r else "")
        )
    return "\n".join(lines)
