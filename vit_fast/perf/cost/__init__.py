"""A GPU cost model that runs without a GPU: **modeled numbers, not measurements.**

A training step (or an inference forward) is traced under fake tensors, op by op, into records of
launches, bytes and FLOPs; two time models are put on them:

* `modeled_ms`: a roofline at 100% of the spec-sheet peaks, ``max(flops / peak, bytes / bandwidth)
  + 3 us`` per launch (a lower bound; useful for comparing two programs under the same assumptions);
* `predicted_ms`: the same records with an achieved efficiency per kernel class fitted to published
  measurements of stock timm models (still a model, with its fit error shown beside it).

One module per concern:

* `taxonomy`: which ops are free, op kinds, kernel classes;
* `flops`: FLOP formulas, reading custom-op arguments by schema name;
* `dispatch`: `CostMode`, the TorchDispatchMode that records ops (and, at kernel level, Triton launches);
* `trace`: building a model variant on fake tensors and tracing one step (`trace_step`);
* `compiled`: the torch.compile(timm) model (each memory-bound chain one kernel);
* `gpus`: spec sheets, with sources;
* `predict`: the calibrated predictor; `calibration`: the published rows and the fit;
* `breakeven`: the Triton GEMM efficiency at which the fused step matches stock timm / torch.compile;
* `report`: `CostReport` and the tables.
"""

from vit_fast.perf.cost.dispatch import (
    KERNEL_LEVEL_NAMESPACES,
    CostMode,
    OpRecord,
    tensor_bytes,
)
from vit_fast.perf.cost.flops import (
    CUSTOM_FLOPS,
    CUSTOM_LAUNCHES,
    FAMILY_FLOPS,
    bind_arguments,
    count_flops,
    has_flop_formula,
    register_flops,
)
from vit_fast.perf.cost.gpus import GPUS, LAUNCH_OVERHEAD_S, GPUSpec, parse_gpus
from vit_fast.perf.cost.predict import ASSUMED_TRITON_GEMM_FRACTION, FITTED, Efficiency, predict_s
from vit_fast.perf.cost.report import CostReport, KindCost, format_comparison, format_predicted
from vit_fast.perf.cost.taxonomy import kernel_class, op_kind, op_name
from vit_fast.perf.cost.trace import (
    DTYPES,
    VARIANTS,
    fake_mode,
    forward_gflops_per_image,
    meta_model,
    to_fake,
    trace_step,
)

__all__ = [
    "ASSUMED_TRITON_GEMM_FRACTION",
    "CUSTOM_FLOPS",
    "CUSTOM_LAUNCHES",
    "DTYPES",
    "FAMILY_FLOPS",
    "FITTED",
    "GPUS",
    "KERNEL_LEVEL_NAMESPACES",
    "LAUNCH_OVERHEAD_S",
    "VARIANTS",
    "CostMode",
    "CostReport",
    "Efficiency",
    "GPUSpec",
    "KindCost",
    "OpRecord",
    "bind_arguments",
    "count_flops",
    "fake_mode",
    "format_comparison",
    "format_predicted",
    "forward_gflops_per_image",
    "has_flop_formula",
    "kernel_class",
    "meta_model",
    "op_kind",
    "op_name",
    "parse_gpus",
    "predict_s",
    "register_flops",
    "tensor_bytes",
    "to_fake",
    "trace_step",
]
