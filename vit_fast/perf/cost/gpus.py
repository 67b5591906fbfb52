"""Spec-sheet numbers of the GPUs the cost model knows, each with the document it comes from.

`tensor16` is the DENSE (no 2:4 sparsity) 16-bit tensor-core rate with FP32 ACCUMULATE, which is what
PyTorch's fp16/bf16 GEMMs use. Data-centre parts run fp32 accumulate at full rate; GeForce parts run it
at half the fp16-accumulate rate that their spec pages headline (and spec pages often quote sparse
numbers, twice the dense ones), so those figures are taken from the architecture whitepapers' tables.
`fp32` is the non-tensor FP32 FMA rate; `bandwidth` the peak DRAM bandwidth. Peaks are at boost clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Assumed fixed cost of one kernel launch for the roofline (`modeled_ms`), seconds. The calibrated
#: predictor (`predicted_ms`) fits its own launch gap instead.
LAUNCH_OVERHEAD_S = 3e-6


@dataclass(frozen=True)
class GPUSpec:
    """Spec-sheet peaks of one GPU (FLOP/s, bytes/s) and where they come from."""

    name: str
    tensor16: float  # dense fp16/bf16 tensor FLOP/s, fp32 accumulate
    fp32: float  # fp32 (non-tensor) FLOP/s
    bandwidth: float  # DRAM bytes/s
    source: str
    note: str = ""  # what is uncertain about these numbers, if anything

    @property
    def peak_flops(self) -> dict[torch.dtype, float]:
        return {torch.bfloat16: self.tensor16, torch.float16: self.tensor16, torch.float32: self.fp32}

    def peak(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s of a GEMM in `dtype` (16-bit: tensor cores; fp32: the FMA units)."""
        return self.peak_flops.get(dtype, self.fp32)


#: One row per GPU: key, name, dense 16-bit tensor FLOP/s (fp32 accumulate), fp32 FLOP/s, DRAM bytes/s,
#: the document the numbers come from, and what is uncertain about them ("" when nothing).
_SPECS: tuple[tuple[str, str, float, float, float, str, str], ...] = (
    ("a100", "A100 SXM4 80GB", 312e12, 19.5e12, 2.039e12, "NVIDIA A100 Tensor Core GPU datasheet (BF16/FP16 tensor 312 TFLOPS dense, 624 sparse; FP32 19.5 TFLOPS; 80GB SXM 2,039 GB/s)", ""),
    ("h100", "H100 SXM5", 989e12, 67e12, 3.35e12, "NVIDIA H100 Tensor Core GPU datasheet, SXM column (BF16/FP16 tensor 1,979 TFLOPS with sparsity, 989 dense; FP32 67 TFLOPS; 3.35 TB/s)", ""),
    ("h200", "H200 SXM", 989e12, 67e12, 4.8e12, "NVIDIA H200 Tensor Core GPU datasheet, SXM column (BF16/FP16 tensor 1,979 TFLOPS with sparsity, 989 dense; FP32 67 TFLOPS; 4.8 TB/s)", ""),
    ("b200", "B200 (HGX, 1000 W)", 2.25e15, 75e12, 8.0e12, "NVIDIA HGX B200 datasheet / Blackwell architecture technical brief (FP16/BF16 tensor 4.5 PFLOPS with sparsity, 2.25 dense; up to 8 TB/s HBM3e)", "FP32 is quoted as 75 or 80 TFLOPS by different sources and bandwidth as 7.7 or 8 TB/s; the 16-bit tensor rate is the dense half of the sparse datasheet figure."),
    ("rtx3090", "GeForce RTX 3090", 71e12, 35.6e12, 936e9, "NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090 column (FP16 tensor with FP32 accumulate 71 TFLOPS dense, 142 with FP16 accumulate; FP32 35.6 TFLOPS; 936 GB/s)", ""),
    ("rtx4090", "GeForce RTX 4090", 165.2e12, 82.6e12, 1008e9, "NVIDIA Ada GPU Architecture whitepaper, RTX 4090 column (FP16 tensor with FP32 accumulate 165.2 TFLOPS dense, 330.3 with FP16 accumulate; FP32 82.6 TFLOPS; 1,008 GB/s)", ""),
    ("rtx5090", "GeForce RTX 5090", 209.5e12, 104.8e12, 1792e9, "NVIDIA RTX Blackwell GPU Architecture whitepaper, RTX 5090 column (FP32 104.8 TFLOPS; 1,792 GB/s; FP16 tensor 838 TFLOPS = sparse with FP16 accumulate)", "the dense fp32-accumulate 16-bit rate (209.5 TFLOPS) assumes GeForce's half-rate fp32 accumulate carries over from Ampere/Ada; not confirmed from the whitepaper table here."),
)  # fmt: skip

GPUS: dict[str, GPUSpec] = {key: GPUSpec(*row) for key, *row in _SPECS}


def parse_gpus(text: str) -> list[str]:
    """GPU keys from a comma list ("h100,a100", "all"); raises ValueError naming `--gpu` on a bad key."""
    keys = [g.strip().lower() for g in text.split(",") if g.strip()]
    if keys == ["all"]:
        return list(GPUS)
    bad = [g for g in keys if g not in GPUS]
    if bad or not keys:
        raise ValueError(f"--gpu: unknown GPU {bad or text!r}; known: all, {', '.join(GPUS)}")
    return keys
