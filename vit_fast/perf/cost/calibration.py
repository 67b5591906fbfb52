"""Published measurements of stock timm models, and the least-squares fit of `predict.FITTED` to them.

The rows are timm's own benchmark tables (huggingface/pytorch-image-models, results/ folder; made with
timm's benchmark.py: 224 px images, AMP fp16, NCHW, samples/s). Each is traced as the variant that
ran it: "timm" (SDPA attention) and "timm-compile" for torch 2.9.1, "timm-math" (the attention
written out, as timm had no fused attention before torch 2.0) for the torch 1.12 training rows, all
with AMP (`trace_step(amp=True)`: fp32 parameters, autocast to fp16, so the weight casts and the fp32
LayerNorms that AMP runs are in the trace). Training is forward, loss, backward and one
fused-optimizer launch (timm's benchmark used SGD; the optimizer is <1% of these steps either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from vit_fast.perf.cost.gpus import GPUS
from vit_fast.perf.cost.predict import FITTED, Efficiency, predict_s
from vit_fast.perf.cost.taxonomy import kernel_class
from vit_fast.perf.tables import text_table

_TIMM = "huggingface/pytorch-image-models results/"
_INFER_4090 = _TIMM + "benchmark-infer-amp-nchw-pt291-cu128-4090.csv"
_INFER_4090_COMPILE = _TIMM + "benchmark-infer-amp-nchw-pt291-cu128-4090-dynamo.csv"
_TRAIN_3090 = _TIMM + "benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv"


@dataclass(frozen=True)
class CalibrationRow:
    """One published measurement: `samples_per_s` of `model` as `variant` on `gpu`."""

    model: str
    variant: str  # the trace_step variant that models what ran
    train: bool
    batch: int
    gpu: str
    samples_per_s: float
    source: str

    @property
    def step_ms(self) -> float:
        return self.batch / self.samples_per_s * 1e3

    @property
    def label(self) -> str:
        mode = "train" if self.train else "infer"
        return f"{self.model} {self.variant} {mode} b{self.batch} {self.gpu}"


_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")

#: One row per published table: variant, train, GPU, source, then per model of `_MODELS` the batch
#: and the published samples/s.
_TABLES = (
    ("timm", False, "rtx4090", _INFER_4090, (1024, 1024, 1024, 1024), (8214.74, 2992.79, 954.12, 370.78)),
    ("timm-compile", False, "rtx4090", _INFER_4090_COMPILE, (1024, 1024, 1024, 1024), (9948.51, 3375.59, 1035.76, 398.03)),
    ("timm-math", True, "rtx3090", _TRAIN_3090, (384, 192, 64, 16), (1052.92, 390.86, 117.08, 39.94)),
)  # fmt: skip

CALIBRATION: tuple[CalibrationRow, ...] = tuple(
    CalibrationRow(model, variant, train, batch, gpu, rate, source)
    for variant, train, gpu, source, batches, rates in _TABLES
    for model, batch, rate in zip(_MODELS, batches, rates, strict=True)
)


@cache
def traced(row: CalibrationRow) -> list:
    """The records of `row`'s program (traced once per process: ~1 s each)."""
    from vit_fast.perf.cost.trace import trace_step

    return trace_step(row.model, row.variant, row.batch, torch.float16, train=row.train, amp=True).records


def _arrays(row: CalibrationRow) -> dict[str, np.ndarray]:
    """Per-record columns for a vectorised predict (the fit evaluates every row many times)."""
    recs = traced(row)
    gpu = GPUS[row.gpu]
    cls = [kernel_class(r.kind) for r in recs]
    return {
        "flops": np.array([r.flops for r in recs], dtype=float),
        "bytes": np.array([r.bytes for r in recs], dtype=float),
        "launches": np.array([r.launches for r in recs], dtype=float),
        "peak": np.array([gpu.peak(r.dtype) for r in recs]),
        "attn": np.array([c == "flash_attention" for c in cls]),
        "bw": np.array(gpu.bandwidth),
    }


def _predict_vec(a: dict[str, np.ndarray], e_gemm: float, e_attn: float, e_mem: float, gap: float) -> float:
    e = np.where(a["attn"], e_attn, e_gemm)
    compute = a["flops"] / (a["peak"] * e)
    memory = a["bytes"] / (a["bw"] * e_mem)
    return float(np.sum(np.maximum(compute, memory) + a["launches"] * gap))


def fit_cost(eff: Efficiency, rows: tuple[CalibrationRow, ...] = CALIBRATION) -> float:
    """What `fit` minimises: half the sum of squared log(predicted / published step time)."""
    arrays = [_arrays(r) for r in rows]
    pred = np.array(
        [_predict_vec(a, eff.cublas_gemm, eff.flash_attention, eff.memory, eff.launch_gap_s) for a in arrays]
    )
    measured = np.array([r.step_ms / 1e3 for r in rows])
    return float(0.5 * np.sum(np.log(pred / measured) ** 2))


def fit(rows: tuple[CalibrationRow, ...] = CALIBRATION) -> Efficiency:
    """Least squares on log(predicted / published step time) over the efficiencies and the gap.

    Efficiencies are bounded to [0.05, 1] (a fraction of peak) and the gap to [0, 50] us."""
    from scipy.optimize import least_squares

    arrays = [_arrays(r) for r in rows]
    measured = np.array([r.step_ms / 1e3 for r in rows])

    def residuals(p: np.ndarray) -> np.ndarray:
        pred = np.array([_predict_vec(a, p[0], p[1], p[2], p[3] * 1e-6) for a in arrays])
        return np.log(pred / measured)

    sol = least_squares(
        residuals, x0=[0.7, 0.5, 0.7, 5.0], bounds=([0.05, 0.05, 0.05, 0.0], [1.0, 1.0, 1.0, 50.0])
    )
    e_gemm, e_attn, e_mem, gap_us = (float(v) for v in sol.x)
    return Efficiency(round(e_gemm, 4), round(e_attn, 4), round(e_mem, 4), round(gap_us, 3) * 1e-6)


def calibration_table(eff: Efficiency | None = None) -> list[dict]:
    """Per calibration row: published and predicted samples/s and the relative error."""
    eff = FITTED if eff is None else eff
    out = []
    for row in CALIBRATION:
        pred_ms = predict_s(traced(row), GPUS[row.gpu], eff) * 1e3
        out.append(
            {
                "row": row.label,
                "source": row.source,
                "published_samples_per_s": row.samples_per_s,
                "predicted_samples_per_s": row.batch / pred_ms * 1e3,
                "published_ms": row.step_ms,
                "predicted_ms": pred_ms,
                "error": pred_ms / row.step_ms - 1.0,
            }
        )
    return out


def format_calibration(eff: Efficiency | None = None) -> str:
    rows = calibration_table(eff)
    head = f"{'published row (timm results/)':56} {'published/s':>12} {'predicted/s':>12} {'error':>7}"
    return text_table(
        "CALIBRATION (published timm throughput vs the fitted MODEL)",
        head,
        (
            f"{r['row']:56} {r['published_samples_per_s']:>12,.1f} {r['predicted_samples_per_s']:>12,.1f} "
            f"{r['error'] * 100:>+6.1f}%"
            for r in rows
        ),
        ["sources: " + ", ".join(sorted({r["source"].rsplit("/", 1)[-1] for r in rows}))],
    )
