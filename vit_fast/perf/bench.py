"""Benchmark harness: per-op and whole-model timings of fused vs stock timm, torch.compile(timm) and the reference.

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed between reps, quantiles); on CPU
`torch.utils.benchmark.Timer.blocked_autorange` (blocks of calls, per-call medians). Every number is a
median over repetitions with its interquartile range (IQR). Memory: on CUDA the peak allocated bytes
of one forward+backward (`max_memory_allocated`); on any device the saved-for-backward bytes
(`vit_fast.perf.memory`, deduplicated by storage), which is the activation memory a training step holds.

impls: "fused" = `vit_fast.ops` / `create_model(impl="fused")` on the backend `select_backend` picks
(Triton on CUDA, the C++ extension on CPU where built, else the reference inside the custom op);
"reference" = `vit_fast.reference` / `impl="reference"` (plain PyTorch eager); "compiled" =
`torch.compile` of the reference (slow to compile on CPU: opt in there); "timm" = stock timm's model
of the same name (eager, its SDPA attention: what users run), "timm_compiled" = `torch.compile` of it.
The timm impls are whole-model only. Model results come with the GEMM floor of the step on this
machine (vit_fast.perf.gemm_floor): kind "floor" rows, one per mode.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from vit_fast.perf.memory import SavedTensorRecorder

OPS = ("patch_embed", "layer_norm_linear", "attention", "linear_residual", "layer_norm_mlp")
OP_MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("fused", "reference", "compiled", "timm", "timm_compiled")
#: The impls that have per-op cases (timm is a model library: its impls are whole-model only).
OP_IMPLS = ("fused", "reference", "compiled")

#: torch.compile backend for the "compiled" impl ("inductor" is what users run; tests use
#: "aot_eager" to exercise the path without minutes of C++ compilation).
COMPILE_BACKEND = "inductor"


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


def _op_args(
    op: str, s: OpShape, device: torch.device, dtype: torch.dtype
) -> tuple[list[Any], dict[str, Any]]:
    """Inputs (all floating ones require grad, except images) and kwargs of `op` at shape `s`."""

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
    raise ValueError(f"unknown op {op!r}; known: {OPS}")


def _op_fn(op: str, impl: str) -> tuple[Callable[..., Tensor], str]:
    """(callable, backend label) for op `op` in `impl`."""
    import vit_fast.ops as fused
    from vit_fast import reference

    if impl == "fused":
        return getattr(fused, op), "fused"
    if impl == "reference":
        return getattr(reference, op), "eager"
    if impl == "compiled":
        return torch.compile(getattr(reference, op), dynamic=False, backend=COMPILE_BACKEND), COMPILE_BACKEND
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


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
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    bad = [m for m in modes if m not in OP_MODES]
    if bad:
        raise ValueError(f"modes: each mode must be one of {OP_MODES}, got {bad}")
    device = torch.device(device)
    fn, backend = _op_fn(op, impl)
    if impl == "fused":
        backend = _fused_backend(op, device)
    args, kwargs = _op_args(op, shape, device, dtype)
    tensors = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    out = fn(*args, **kwargs)
    grad = torch.randn_like(out)

    def fwd() -> None:
        with torch.no_grad():
            fn(*args, **kwargs)

    def fwd_bwd() -> None:
        for t in tensors:
            t.grad = None
        fn(*args, **kwargs).backward(grad)

    # The op's inputs exist anyway (they are the previous op's outputs or weights): count only what
    # the op itself adds to the activations kept for backward.
    with SavedTensorRecorder([a for a in args if isinstance(a, Tensor)]) as rec:
        kept = fn(*args, **kwargs)
    saved = rec.result.activation_bytes
    del kept
    try:
        peak = peak_memory(fwd_bwd, device)
    except Exception:
        peak = None  # the fwd+bwd case below reports the error
    results = []
    for mode in modes:
        error = ""
        try:
            if mode == "fwd":
                call = fwd
            elif mode == "fwd+bwd":
                call = fwd_bwd
            else:
                graph_out = fn(*args, **kwargs)
                call = lambda g=graph_out: torch.autograd.grad(g, tensors, grad, retain_graph=True)
            med, iqr, reps = measure(call, device, min_run_time, min_reps)
        except Exception as err:  # report the failing case and go on with the others
            med, iqr, reps, error = math.nan, math.nan, 0, _error_text(err)
        results.append(
            BenchResult(
                "op", op, mode, impl, backend, device.type, str(dtype).removeprefix("torch."),
                shape.batch, shape.tokens, shape.width, med * 1e3, iqr * 1e3, reps,
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


def _build_timm(name: str, compiled: bool, **kwargs: Any) -> torch.nn.Module:
    """Stock timm's `name` with random weights (no download), torch.compile'd when `compiled`."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    return torch.compile(model, backend=COMPILE_BACKEND) if compiled else model


def build_model(
    name: str, impl: str, device: torch.device, dtype: torch.dtype, **kwargs: Any
) -> torch.nn.Module:
    """`vit_fast.models.create_model(name, impl=...)` ("compiled": torch.compile of the reference;
    "timm" / "timm_compiled": stock timm's model of that name, eager / torch.compile'd)."""
    from vit_fast.models import create_model

    if impl in ("timm", "timm_compiled"):
        return _build_timm(name, impl == "timm_compiled", **kwargs).to(device=device, dtype=dtype)
    base_impl = "reference" if impl == "compiled" else impl
    model = create_model(name, impl=base_impl, **kwargs).to(device=device, dtype=dtype)
    if impl == "compiled":
        model = torch.compile(model, backend=COMPILE_BACKEND)
    return model


def bench_model(
    name: str,
    impl: str,
    batch: int,
    modes: Iterable[str] = ("inference", "train"),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.5,
    min_reps: int = 5,
    **model_kwargs: Any,
) -> list[BenchResult]:
    """Inference (no-grad forward) and training step (forward, cross-entropy, backward, SGD step)
    of model `name` in `impl` at `batch`: step time (median of at least `min_reps` runs), samples/s,
    saved bytes, CUDA peak memory. `model_kwargs` override the model configuration (e.g. depth, img_size)."""
    modes = tuple(modes)
    bad = [m for m in modes if m not in ("inference", "train")]
    if bad or batch < 1:
        raise ValueError(
            f"modes must be 'inference'/'train' and batch >= 1, got modes={modes}, batch={batch}"
        )
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(name, impl, device, dtype, **model_kwargs)
    base = getattr(model, "_orig_mod", model)
    size = int(base.patch_embed.img_size[0])
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    labels = torch.randint(0, base.num_classes, (batch,), device=device)
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    backend = impl
    if impl == "fused":
        from vit_fast.ops.backend import active_backends

        backend = ",".join(sorted(set(active_backends(device).values())))
    elif impl == "reference":
        backend = "eager"
    elif impl in ("compiled", "timm_compiled"):
        backend = COMPILE_BACKEND
    elif impl == "timm":
        backend = "eager"

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(images)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    saved: int | None = None
    try:
        with SavedTensorRecorder(params) as rec:
            out = model(images)
        saved = rec.result.activation_bytes
        del out
    except Exception:
        pass  # the timed cases below report the error
    results = []
    for mode in modes:
        call = {"inference": infer, "train": train_step}[mode]
        error, peak = "", None
        try:
            peak = peak_memory(call, device)
            med, iqr, reps = measure(call, device, min_run_time, min_reps)
        except Exception as err:  # report the failing case and go on with the others
            med, iqr, reps, error = math.nan, math.nan, 0, _error_text(err)
        results.append(
            BenchResult(
                "model", name, mode, impl, backend, device.type, str(dtype).removeprefix("torch."),
                batch, tokens, base.embed_dim, med * 1e3, iqr * 1e3, reps,
                samples_per_s=batch / med if not error else None,
                saved_bytes=saved if mode == "train" else None, peak_mem_bytes=peak, error=error,
            )
        )  # fmt: skip
    return results


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
                    "op", op, impl, cfg.op_modes, shape, cfg,
                )  # fmt: skip
    if cfg.run_model:
        for impl in cfg.impls:
            say(f"model {cfg.model} {impl}")
            results += _guard(
                partial(
                    bench_model, cfg.model, impl, cfg.batch, cfg.model_modes, device, cfg.dtype,
                    max(cfg.min_run_time, 0.3), cfg.model_min_reps, **cfg.model_kwargs,
                ),
                "model", cfg.model, impl, cfg.model_modes, shape, cfg,
            )  # fmt: skip
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
                    for r in _guard(case, "op", op, impl, ("fwd+bwd",), s, cfg):
                        r.kind, r.extra = "sweep", {"axis": axis}
                        results.append(r)
    return results


def _floor_results(cfg: BenchConfig, shape: OpShape) -> list[BenchResult]:
    """The GEMM floor of the model's step as kind "floor" rows (impl "gemm_floor"; backend: the libraries
    that won; extra: GEMM GFLOP). A failure gives error rows like any other case."""
    from vit_fast.perf.gemm_floor import gemm_floor

    def case() -> list[BenchResult]:
        floors = gemm_floor(cfg.model, cfg.batch, cfg.device, cfg.dtype, cfg.model_modes, **cfg.model_kwargs)
        return [
            BenchResult(
                "floor", cfg.model, mode, "gemm_floor", ",".join(sorted({lib for _, _, lib in fl.rows}))[:60],
                torch.device(cfg.device).type, str(cfg.dtype).removeprefix("torch."), cfg.batch, shape.tokens,
                shape.width, fl.floor_ms, 0.0, 0, extra={"gflop": fl.gflop},
            )
            for mode, fl in floors.items()
        ]  # fmt: skip

    return _guard(case, "floor", cfg.model, "gemm_floor", cfg.model_modes, shape, cfg)


def _guard(
    case: Callable[[], list[BenchResult]],
    kind: str,
    name: str,
    impl: str,
    modes: Iterable[str],
    shape: OpShape,
    cfg: BenchConfig,
) -> list[BenchResult]:
    """Run one case; if its setup raises, return one error row per mode instead of aborting the suite."""
    try:
        return case()
    except Exception as err:
        return [
            BenchResult(
                kind, name, mode, impl, "?", torch.device(cfg.device).type, str(cfg.dtype).removeprefix("torch."),
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
    lines = ["GEMM floor: the step's GEMMs alone at the best measured library speed per shape", head]
    lines.append("-" * len(head))
    for r in rows:
        lines.append(
            f"{r['name'][:22]:22} {r['mode']:9} {r['impl']:14} {r['impl_ms']:10.2f} {r['floor_ms']:10.2f} "
            f"{r['gemm_gflop']:10.2f} {r['fraction']:8.0%}"
        )
    return "\n".join(lines)


def format_speedups(rows: list[dict[str, Any]]) -> str:
    """Plain-text speedup table (impl time / fused time)."""
    head = f"{'kind':6} {'name':22} {'mode':9} {'vs impl':13} {'impl ms':>10} {'fused ms':>10} {'speedup':>8}"
    lines = ["speedup of fused (impl time / fused time, same run; > 1 = fused faster)", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kind']:6} {r['name'][:22]:22} {r['mode']:9} {r['impl']:13} {r['impl_ms']:10.2f} "
            f"{r['fused_ms']:10.2f} {r['speedup']:7.2f}x"
        )
    return "\n".join(lines)


def format_table(results: list[BenchResult]) -> str:
    """Plain-text table of the op and model results (the sweep goes to CSV/plots)."""
    head = (
        f"{'kind':6} {'name':22} {'mode':9} {'impl':13} {'backend':10} {'B':>3} {'T':>4} {'D':>4} "
        f"{'median ms':>10} {'IQR ms':>8} {'samples/s':>10} {'saved MiB':>9} {'peak MiB':>8}"
    )
    lines = [head, "-" * len(head)]
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
    return "\n".join(lines)


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
    patched = patch(copy.deepcopy(stock))
    images = torch.randn(batch, 3, img, img, device=device)
    steps = {}
    for impl, model in (("stock", stock), ("patched", patched)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def infer(model=model) -> None:
            model.eval()
            with torch.no_grad():
                model(images)

        def train_step(model=model, opt=opt) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            _zoo_output(model(images)).float().square().mean().backward()
            opt.step()

        steps[impl] = {"inference": infer, "train": train_step}
    results = []
    # Per mode, stock then patched back to back: on a shared machine the pair sees similar load.
    for mode in modes:
        for impl in ("stock", "patched"):
            error = ""
            try:
                med, iqr, reps = measure(steps[impl][mode], device, min_run_time, min_reps)
            except Exception as err:
                med, iqr, reps, error = math.nan, math.nan, 0, _error_text(err)
            results.append(
                BenchResult(
                    "zoo", name, mode, impl, "eager" if impl == "stock" else "fused", device.type, "float32",
                    batch, 0, 0, med * 1e3, iqr * 1e3, reps,
                    samples_per_s=batch / med if not error else None, error=error,
                )
            )  # fmt: skip
    return results


def format_zoo(results: list[BenchResult]) -> str:
    """stock ms, patched ms and stock / patched per (model, mode)."""
    rows = [
        f"{'model':<16} {'mode':<9} {'batch':>5} {'stock ms':>10} {'patched ms':>10} {'stock/patched':>13}"
    ]
    keys = dict.fromkeys((r.name, r.mode, r.batch) for r in results)
    for name, mode, batch in keys:
        got = {r.impl: r for r in results if (r.name, r.mode, r.batch) == (name, mode, batch)}
        s, p = got.get("stock"), got.get("patched")
        if s is None or p is None:
            continue
        ratio = s.median_ms / p.median_ms if p.median_ms > 0 else math.nan
        rows.append(f"{name:<16} {mode:<9} {batch:>5} {s.median_ms:10.1f} {p.median_ms:10.1f} {ratio:13.2f}")
    return "\n".join(rows)
