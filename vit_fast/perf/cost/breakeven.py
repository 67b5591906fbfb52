"""The break-even: how fast our Triton GEMM must be, as a fraction of cuBLAS, for the fused training
step to match stock timm and torch.compile(timm), under the calibrated model (predict.py).

The fused step's predicted time falls as `triton_gemm_fraction` rises (only its triton_gemm records
depend on it); the break-even is the fraction where it equals the other variant's predicted time,
found by bisection. Below it the fused model loses, above it it wins. A fraction above 1 means the
fused step would need a GEMM faster than cuBLAS; outside the searched range [0.05, 4] it is
reported as ">4" or "<0.05".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vit_fast.perf.cost.gpus import GPUS
from vit_fast.perf.cost.predict import FITTED, Efficiency, predict_s
from vit_fast.perf.tables import text_table

_LOW, _HIGH = 0.05, 4.0


@dataclass
class BreakEven:
    model: str
    gpu: str
    batch: int
    dtype: str
    predicted_ms: dict[str, float]  # timm, timm-compile, fused (at the assumed fraction)
    #: vs "timm" and "timm-compile": the fraction, or ">4" (the fused step loses even with a GEMM 4x
    #: faster than cuBLAS) / "<0.05" (it wins even with a GEMM at 5% of cuBLAS)
    break_even: dict[str, float | str]
    assumed_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _solve(fused_records: list, target_s: float, gpu: str, eff: Efficiency) -> float | str:
    def t(f: float) -> float:
        return predict_s(fused_records, GPUS[gpu], eff.with_triton_fraction(f))

    lo, hi = _LOW, _HIGH
    if t(hi) > target_s:
        return f">{_HIGH:g}"
    if t(lo) < target_s:
        return f"<{_LOW:g}"
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if t(mid) <= target_s else (mid, hi)
    return 0.5 * (lo + hi)


def break_even(
    model: str,
    gpus: tuple[str, ...] | list[str] = ("h100",),
    batch: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    *,
    amp: bool = True,
    eff: Efficiency | None = None,
    img_size: int | None = None,
) -> list[BreakEven]:
    """Per GPU in `gpus`: predicted training-step times of timm, torch.compile(timm) and the fused
    model, and the Triton-GEMM fractions of cuBLAS at which the fused step breaks even with each.

    The fused model is traced at kernel level (its real kernels; an op whose launcher cannot run
    on fake tensors counts as one launch). All three run the same step (forward, loss, backward,
    fused AdamW), with AMP to `dtype` when `amp` (how `vit-fast train` and timm users train), else
    with parameters in `dtype`."""
    from vit_fast.perf.cost.trace import trace_step

    bad = [g for g in gpus if g not in GPUS]
    if bad:
        raise ValueError(f"gpus must be among {list(GPUS)}, got {bad}")
    eff = FITTED if eff is None else eff
    kw: dict[str, Any] = {"amp": amp, "img_size": img_size}
    reps = {v: trace_step(model, v, batch, dtype, **kw) for v in ("timm", "timm-compile")}
    # The fused model at kernel level: every kernel its ops launch and their operand bytes.
    reps["fused"] = trace_step(model, "fused", batch, dtype, kernel_level=True, **kw)
    fused = reps["fused"].records
    out = []
    for gpu in gpus:
        times = {v: predict_s(r.records, GPUS[gpu], eff) for v, r in reps.items()}
        out.append(
            BreakEven(
                model=model,
                gpu=gpu,
                batch=batch,
                dtype=str(dtype).removeprefix("torch."),
                predicted_ms={v: t * 1e3 for v, t in times.items()},
                break_even={v: _solve(fused, times[v], gpu, eff) for v in ("timm", "timm-compile")},
                assumed_fraction=eff.triton_gemm_fraction,
            )
        )
    return out


def format_break_even(rows: list[BreakEven]) -> str:
    head = (
        f"{'model':24} {'gpu':6} {'timm ms':>9} {'compile ms':>11} {'fused ms':>9} "
        f"{'b/e vs timm':>12} {'b/e vs compile':>15}"
    )

    def frac(v: float | str) -> str:
        return f"{v:.3f}" if isinstance(v, float) else v

    return text_table(
        "BREAK-EVEN (calibrated MODEL): the Triton GEMM efficiency, as a fraction of cuBLAS, above which "
        "the fused training step is predicted faster",
        head,
        (
            f"{r.model[:24]:24} {r.gpu:6} {r.predicted_ms['timm']:>9.1f} {r.predicted_ms['timm-compile']:>11.1f} "
            f"{r.predicted_ms['fused']:>9.1f} {frac(r.break_even['timm']):>12} {frac(r.break_even['timm-compile']):>15}"
            for r in rows
        ),
        [
            f"fused ms at the assumed Triton GEMM fraction {rows[0].assumed_fraction:.2f} of cuBLAS "
            f"(batch {rows[0].batch}, {rows[0].dtype}, AMP, forward+backward+AdamW)"
        ],
    )
