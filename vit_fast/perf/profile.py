"""torch.profiler over a few training steps, with a named range per fused op.

Each step runs inside a `train_step` range (with `backward` and `optimizer` sub-ranges); each call
of a fused op runs inside a `record_function` range `vit_fast.<op>` (`reference.<op>` for the
reference model), mirrored as an NVTX range on CUDA so Nsight Systems shows the same structure. The
custom ops themselves also appear as `vit_fast::<op>_fwd/_bwd` events (the dispatcher records them). Writes a Chrome trace (chrome://tracing,
Perfetto) and returns the top ops by self time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.profiler import record_function

#: The ops that get a range: the functions the model calls from `vit_fast.ops` (fused) or
#: `vit_fast.reference` (reference), looked up at call time, so wrapping the module attribute works.
RANGED_OPS = (
    "patch_embed",
    "layer_norm_linear",
    "attention",
    "linear_residual",
    "layer_norm_mlp",
    "layer_norm",
)


@dataclass
class TopOp:
    name: str
    calls: int
    self_time_us: float
    total_time_us: float


def _ranged(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    nvtx = torch.cuda.is_available()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            if nvtx:
                torch.cuda.nvtx.range_push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                if nvtx:
                    torch.cuda.nvtx.range_pop()

    return wrapper


@contextlib.contextmanager
def op_ranges() -> Iterator[None]:
    """Within the block, every call of a fused op (`vit_fast.ops.X`) or reference op
    (`vit_fast.reference.X`) runs inside a `record_function` range "vit_fast.X" ("reference.X"),
    mirrored as an NVTX range on CUDA. The module attributes are restored on exit."""
    import vit_fast.ops as fused
    from vit_fast import reference

    saved: list[tuple[Any, str, Any]] = []
    try:
        for module, prefix in ((fused, "vit_fast"), (reference, "reference")):
            for op in RANGED_OPS:
                fn = getattr(module, op, None)
                if fn is not None:
                    saved.append((module, op, fn))
                    setattr(module, op, _ranged(fn, f"{prefix}.{op}"))
        yield
    finally:
        for module, op, fn in reversed(saved):
            setattr(module, op, fn)


# Kineto, the profiler's C++ side, logs its own stages straight to file descriptor 2 in this format.
_KINETO_LINE = re.compile(r"^(USDT|STAGE|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d [\d:.]+ \d+:\d+ \S+\.cpp:\d+\]")


@contextlib.contextmanager
def quiet_profiler_logs(gpu_run: bool) -> Iterator[None]:
    """Hold back Kineto's log lines (stage markers; on a CUDA build of torch with no GPU, a failed
    device count) for the duration of the block; any other stderr output is passed through after it.
    On a GPU run, Kineto's warnings and errors are real news and are kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                match = _KINETO_LINE.match(line)
                noise = match is not None and (match.group(1) in ("USDT", "STAGE", "INFO") or not gpu_run)
                if not noise:
                    sys.stderr.write(line)


def profile_training(
    model_name: str = "vit_tiny_patch16_224",
    impl: str = "fused",
    batch: int = 2,
    steps: int = 2,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    out_dir: str = "profile_out",
    top: int = 15,
    **model_kwargs: Any,
) -> tuple[list[TopOp], str, str]:
    """Profile `steps` training steps (after `warmup` unprofiled ones) of `model_name` in `impl`.

    `model_kwargs` override the model configuration (e.g. depth=2, img_size=64 for a quick run).
    Returns (top ops by self time, the key_averages table as text, the Chrome trace path).
    """
    from vit_fast.perf.workload import build_model, cross_entropy, image_batch, make_steps

    device = torch.device(device)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(0)
    model = build_model(model_name, impl, device, dtype, **model_kwargs)
    images, labels = image_batch(model, batch, device, dtype)
    step = make_steps(model, images, cross_entropy(labels), ranges=True)["train"]

    for _ in range(warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    on_gpu = device.type == "cuda"
    os.makedirs(out_dir, exist_ok=True)
    trace = os.path.join(out_dir, f"trace_{model_name}_{impl}.json")
    with quiet_profiler_logs(gpu_run=on_gpu):
        with op_ranges(), torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if on_gpu:
                torch.cuda.synchronize(device)
        prof.export_chrome_trace(trace)
        averages = prof.key_averages()
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    rows = []
    for e in averages:
        self_t = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        total_t = e.device_time_total if on_gpu else e.cpu_time_total
        rows.append(TopOp(e.key, e.count, float(self_t), float(total_t)))
    rows.sort(key=lambda r: -r.self_time_us)
    table = averages.table(sort_by=sort_key, row_limit=top)
    return rows[:top], table, trace
