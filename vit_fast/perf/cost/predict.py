"""The calibrated predictor: `predicted_ms`, the roofline with an achieved efficiency per kernel class.

Per record (one kernel launch, or one fused op's kernels):

    time = max(flops / (peak(dtype) * e_class), bytes / (bandwidth * e_memory)) + launches * gap

with the class from `taxonomy.kernel_class`:

* cublas_gemm: aten GEMMs and convolutions (what stock timm and torch.compile run);
* triton_gemm: our fused GEMM families; their efficiency is `triton_gemm_fraction` x cublas_gemm.
  Nothing published measures our Triton GEMM, so this fraction is an ASSUMPTION (a CLI flag); the
  break-even (breakeven.py) says how high it must be for the fused model to win;
* flash_attention: SDPA's flash kernel and our attention (assumed to run like SDPA's);
* memory: elementwise, normalisation, reductions, copies, the optimizer (only the bytes term counts);
* gap: a fixed cost per launch (CPU launch cost plus a short kernel's ramp-up and tail).

`FITTED` holds e_cublas_gemm, e_flash_attention, e_memory and the gap fitted by least squares to
published throughput of stock timm models (calibration.py: the rows, their sources, the fit and the
published-vs-predicted table). It is a MODEL: four numbers shared by every GPU and model size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vit_fast.perf.cost.dispatch import OpRecord
from vit_fast.perf.cost.gpus import GPUSpec
from vit_fast.perf.cost.taxonomy import kernel_class

#: The Triton GEMM's efficiency as a fraction of cuBLAS's when nothing else is said: an assumption
#: (no GPU has measured our GEMM yet); `vit-fast cost --triton-gemm-fraction` overrides it.
ASSUMED_TRITON_GEMM_FRACTION = 0.85


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of spec peak per kernel class, and the launch gap (seconds)."""

    cublas_gemm: float
    flash_attention: float
    memory: float
    launch_gap_s: float
    triton_gemm_fraction: float = ASSUMED_TRITON_GEMM_FRACTION

    def compute(self, cls: str) -> float:
        """The compute efficiency of kernel class `cls`."""
        if cls == "triton_gemm":
            return self.cublas_gemm * self.triton_gemm_fraction
        if cls == "flash_attention":
            return self.flash_attention
        return self.cublas_gemm  # cublas_gemm; memory-class records have (almost) no FLOPs

    def with_triton_fraction(self, fraction: float) -> Efficiency:
        if not fraction > 0:
            raise ValueError(f"triton_gemm_fraction must be > 0, got {fraction!r}")
        return replace(self, triton_gemm_fraction=fraction)


#: Fitted by `calibration.fit()` on `calibration.CALIBRATION` (rerun it after changing the tracer:
#: tests/test_cost.py checks that these still predict every row within 15% and match a refit).
FITTED = Efficiency(cublas_gemm=1.0, flash_attention=1.0, memory=1.0, launch_gap_s=42.036e-6)

# What the fit says, plainly: on these GeForce rows the three efficiencies run into their upper
# bound (1.0 of spec peak; unbounded they fit ~1.01: GeForce cards boost above the clock their
# spec sheet is computed at, and small tensors hit the large L2), and the per-launch gap takes up
# the rest. Those rows cannot tell efficiency from clock headroom, so for data-centre parts, which
# run at or below their spec clock (H100 cuBLAS bf16 GEMMs are commonly measured at 60-80% of 989
# TFLOP/s), predicted_ms is optimistic in absolute terms; ratios between variants and the
# break-even depend on it much less.


def describe(eff: Efficiency) -> str:
    return (
        f"efficiency cuBLAS GEMM {eff.cublas_gemm:.2f}, flash attention {eff.flash_attention:.2f}, "
        f"memory-bound {eff.memory:.2f} of spec peak, launch gap {eff.launch_gap_s * 1e6:.1f} us "
        f"(fitted to published timm throughput); Triton GEMM {eff.triton_gemm_fraction:.2f} x cuBLAS "
        "(assumed)"
    )


def record_s(r: OpRecord, gpu: GPUSpec, eff: Efficiency) -> float:
    """Predicted seconds of one record on `gpu`."""
    if r.launches == 0:
        return 0.0
    compute = r.flops / (gpu.peak(r.dtype) * eff.compute(kernel_class(r.kind))) if r.flops else 0.0
    memory = r.bytes / (gpu.bandwidth * eff.memory)
    return max(compute, memory) + r.launches * eff.launch_gap_s


def predict_s(records: list[OpRecord], gpu: GPUSpec, eff: Efficiency | None = None) -> float:
    """Predicted seconds of a traced program on `gpu` (`eff` defaults to `FITTED`)."""
    eff = FITTED if eff is None else eff
    return sum(record_s(r, gpu, eff) for r in records)
