"""A NaFlex batch's attention, MODELED: varlen attention on the real tokens vs SDPA with a mask.

A NaFlex batch holds images of different sizes and aspect ratios, so its sequences have different
valid lengths `l_i`, padded to the longest, T. Two ways to run one attention layer over it:

* **varlen** (`vit_fast.ops.attention(qkv, heads, seq_lens=...)`, what `vit_fast.patch_timm` runs for
  NaFlexVit): each sequence attends within its own `l_i` tokens, so the work is sum(l_i^2), never
  B * T^2; padded rows are not read and come out as zeros. Forward one launch, backward three
  (delta, dK/dV, dQ).
* **masked SDPA** (stock timm NaFlexVit): an additive [B, 1, T, T] float mask built from
  `patch_valid` (timm's `create_attention_mask`: both query and key valid), passed to
  `F.scaled_dot_product_attention`. PyTorch's flash kernel takes no mask, so on a GPU SDPA picks the
  memory-efficient kernel (it takes the mask as an additive bias; math would materialise the
  B x H x T x T scores): the MODELED choice is the memory-efficient kernel. It computes every
  (query, key) tile of the padded batch, B * T^2 work, and reads the bias: B * T^2 elements per
  pass, counted once from HBM (the heads share it through L2). The mask is built once per forward
  (4 elementwise launches over B * T^2), shared by all layers.

Bytes are each kernel's compulsory traffic (operands read once, results written once), FLOPs the
two GEMMs of the forward (4 * l^2 * D per sequence; softmax not counted) and 2.5x that for the
backward, as for every attention in this cost model (flops.py). Times: the roofline (`modeled_ms`,
100% of spec peaks plus a launch overhead) and the calibrated predictor (`predicted_ms`, which
charges both kernels at the efficiency fitted for SDPA's flash kernel: optimistic for the
memory-efficient kernel, so the masked side's time is if anything too low). Also not counted, so
the masked side is a lower bound: a padded copy of the mask when PyTorch aligns its last dimension
for the kernel (T not a multiple of 16), and any extra launches of the memory-efficient backward.
A MODEL, not a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vit_fast.perf.cost.dispatch import OpRecord
from vit_fast.perf.cost.gpus import GPUS, LAUNCH_OVERHEAD_S
from vit_fast.perf.cost.predict import FITTED, Efficiency, record_s
from vit_fast.perf.tables import text_table

#: The modeled SDPA kernel for an attention with an arbitrary mask on a GPU (see the module doc).
MASKED_SDPA_KERNEL = "SDPA memory-efficient (additive bias; flash takes no mask)"
VARLEN_KERNEL = "vit_fast varlen (seq_lens)"


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer over a NaFlex batch: valid lengths per sequence (prefix tokens included),
    the padded length T, the width D and heads H."""

    lengths: tuple[int, ...]
    padded: int
    width: int
    heads: int

    def __post_init__(self) -> None:
        if not self.lengths or any(not 0 <= n <= self.padded for n in self.lengths):
            raise ValueError(f"lengths must be in [0, padded={self.padded}], got {list(self.lengths)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def sum_sq(self) -> int:
        return sum(n * n for n in self.lengths)


@dataclass
class AttentionCost:
    """The modeled cost of one way to run the layer: records per phase (forward, backward)."""

    impl: str  # "varlen" | "masked_sdpa" | "mask_build"
    kernel: str
    records: list[OpRecord] = field(default_factory=list)

    def select(self, train: bool) -> list[OpRecord]:
        return [r for r in self.records if train or r.phase == "forward"]

    def flops(self, train: bool = True) -> int:
        return sum(r.flops for r in self.select(train))

    def bytes(self, train: bool = True) -> int:
        return sum(r.bytes for r in self.select(train))

    def launches(self, train: bool = True) -> int:
        return sum(r.launches for r in self.select(train))

    def modeled_ms(self, gpu: str, train: bool = True, launch_overhead_s: float = LAUNCH_OVERHEAD_S) -> float:
        return sum(r.time_s(GPUS[gpu], launch_overhead_s) for r in self.select(train)) * 1e3

    def predicted_ms(self, gpu: str, train: bool = True, eff: Efficiency | None = None) -> float:
        return sum(record_s(r, GPUS[gpu], eff or FITTED) for r in self.select(train)) * 1e3


def _record(phase: str, kind: str, flops: int, nbytes: int, launches: int, dtype: torch.dtype) -> OpRecord:
    return OpRecord(f"naflex {kind} {phase}", kind, phase, launches, nbytes, flops, dtype)


def _attention(
    impl: str,
    kernel: str,
    s: AttentionShape,
    dtype: torch.dtype,
    rows: int,
    pairs: int,
    side: int,
    bwd_launches: int,
) -> AttentionCost:
    """One attention kernel (forward, backward) that reads `rows` rows of qkv (and of out, dout and
    the fp32 per-head statistics in the backward), computes `pairs` (query, key) pairs and reads
    `side` more bytes per pass (the lengths or the mask); out and dqkv are written in full [B, T, .]
    (padded rows as zeros), the forward's lse [B, H, T] in fp32, the backward's delta written and read."""
    e, D, H, B, T = torch.finfo(dtype).bits // 8, s.width, s.heads, s.batch, s.padded
    fwd_flops = 4 * pairs * D
    fwd_bytes = rows * 3 * D * e + side + B * T * D * e + B * H * T * 4
    bwd_bytes = rows * (5 * D * e + 3 * H * 4) + side + B * T * 3 * D * e
    return AttentionCost(
        impl,
        kernel,
        [
            _record("forward", "attention", fwd_flops, fwd_bytes, 1, dtype),
            _record("backward", "attention", fwd_flops * 5 // 2, bwd_bytes, bwd_launches, dtype),
        ],
    )


def varlen_cost(s: AttentionShape, dtype: torch.dtype = torch.bfloat16) -> AttentionCost:
    """Varlen attention over the padded batch [B, T, 3D] with seq_lens [B] (int32): only the valid
    rows are read, sum(len^2) pairs; backward in three launches (delta, dK/dV, dQ)."""
    return _attention("varlen", VARLEN_KERNEL, s, dtype, s.real_tokens, s.sum_sq, 4 * s.batch, 3)


def masked_sdpa_cost(s: AttentionShape, dtype: torch.dtype = torch.bfloat16) -> AttentionCost:
    """SDPA's memory-efficient kernel on the padded batch with an additive [B, 1, T, T] bias: every
    row and every (query, key) pair of the padded batch, the bias read once per pass."""
    B, T, e = s.batch, s.padded, torch.finfo(dtype).bits // 8
    return _attention("masked_sdpa", MASKED_SDPA_KERNEL, s, dtype, B * T, B * T * T, B * T * T * e, 1)


def mask_build_cost(s: AttentionShape, dtype: torch.dtype = torch.bfloat16) -> AttentionCost:
    """timm's `create_attention_mask` (once per forward, shared by every layer): valid_q & valid_k
    (bool write), zeros_like (float write), ~mask (bool read + write), masked_fill_ (bool read,
    float read + write): B * T^2 * (4 + 3 * itemsize) bytes in 4 launches, no FLOPs."""
    e, B, T = torch.finfo(dtype).bits // 8, s.batch, s.padded
    return AttentionCost(
        "mask_build",
        "timm create_attention_mask",
        [_record("forward", "elementwise", 0, B * T * T * (4 + 3 * e), 4, dtype)],
    )


def default_mixes(batch: int, max_patches: int) -> dict[str, tuple[int, ...]]:
    """The length mixes `vit-fast cost --naflex` models (patches per image, before prefix tokens):
    "bench": the `vit-fast bench --naflex` batch (`workload.naflex_grids(batch, max_patches)`);
    "b256": 256 images drawn the same way (seed 1), a training-sized batch where launch costs fade;
    "one-long": one 1024-patch image with fifteen 64-patch ones (padding-heavy);
    "uniform": eight 256-patch images (no padding: the masked path only pays for its mask)."""
    from vit_fast.perf.workload import naflex_grids

    area = lambda grids: tuple(h * w for h, w in grids)
    return {
        "bench": area(naflex_grids(batch, max_patches)),
        "b256": area(naflex_grids(256, 256, seed=1)),
        "one-long": (1024,) + (64,) * 15,
        "uniform": (256,) * 8,
    }


def model_attention_shape(name: str) -> dict[str, int]:
    """width, heads, depth and prefix tokens of timm NaFlexVit `name` (built on the meta device)."""
    from vit_fast.perf.workload import build_model

    with torch.device("meta"):
        model = build_model(name, "timm")
    return {
        "width": model.embed_dim,
        "heads": model.blocks[0].attn.num_heads,
        "depth": len(model.blocks),
        "prefix": model.num_prefix_tokens,
    }


def compare(
    mixes: dict[str, Sequence[int]],
    width: int,
    heads: int,
    prefix: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    gpus: Sequence[str] = ("h100",),
    train: bool = True,
    eff: Efficiency | None = None,
    depth: int = 1,
) -> list[dict[str, Any]]:
    """Per mix ({name: patches per image}): one row per impl (varlen, masked_sdpa, mask_build) with
    FLOPs, HBM bytes, launches, modeled_ms / predicted_ms per GPU of one layer, and on the masked row
    the ratios masked / varlen of one layer (the mask build, once per forward, is a row of its own)
    and, under "model", of all `depth` layers with the one mask build added to the masked side."""
    rows = []
    for mix, patches in mixes.items():
        lengths = tuple(prefix + p for p in patches)
        s = AttentionShape(lengths, max(lengths), width, heads)
        costs = [varlen_cost(s, dtype), masked_sdpa_cost(s, dtype), mask_build_cost(s, dtype)]
        base = {
            "mix": mix,
            "batch": s.batch,
            "padded": s.padded,
            "lengths": list(lengths),
            "real_fraction": s.real_tokens / (s.batch * s.padded),
        }
        for c in costs:
            row = base | {
                "impl": c.impl,
                "kernel": c.kernel,
                "flops": c.flops(train),
                "bytes": c.bytes(train),
                "launches": c.launches(train),
                "modeled_ms": {g: c.modeled_ms(g, train) for g in gpus},
                "predicted_ms": {g: c.predicted_ms(g, train, eff) for g in gpus},
            }
            rows.append(row)
        rows[-2]["ratio"] = _ratios(*rows[-3:], depth, gpus)
    return rows


def _ratios(
    varlen: dict[str, Any], masked: dict[str, Any], mask: dict[str, Any], depth: int, gpus: Sequence[str]
) -> dict[str, Any]:
    """masked / varlen of one layer, and of `depth` layers with the one mask build on the masked side."""
    one = lambda key, g: masked[key][g] / varlen[key][g]
    whole = lambda key, g: (depth * masked[key][g] + mask[key][g]) / (depth * varlen[key][g])
    return {
        "flops": masked["flops"] / varlen["flops"] if varlen["flops"] else None,
        "bytes": masked["bytes"] / varlen["bytes"],
        "modeled_ms": {g: one("modeled_ms", g) for g in gpus},
        "predicted_ms": {g: one("predicted_ms", g) for g in gpus},
        "model": {
            "layers": depth,
            "bytes": (depth * masked["bytes"] + mask["bytes"]) / (depth * varlen["bytes"]),
            "modeled_ms": {g: whole("modeled_ms", g) for g in gpus},
            "predicted_ms": {g: whole("predicted_ms", g) for g in gpus},
        },
    }


def format_compare(rows: list[dict[str, Any]], gpus: Sequence[str], what: str) -> str:
    """The table `vit-fast cost --naflex` prints (labelled MODELED)."""
    head = (
        f"{'mix':10} {'B':>3} {'T':>5} {'real':>5} {'impl':12} {'GFLOP':>8} {'MB HBM':>9} {'launch':>6}"
        + "".join(f" {'ms ' + g.upper():>9} {'pred ' + g.upper():>10}" for g in gpus)
    )
    lines = []
    for r in rows:
        lines.append(
            f"{r['mix'][:10]:10} {r['batch']:>3} {r['padded']:>5} {r['real_fraction']:>5.0%} {r['impl']:12} "
            f"{r['flops'] / 1e9:>8.3f} {r['bytes'] / 1e6:>9.2f} {r['launches']:>6}"
            + "".join(f" {r['modeled_ms'][g]:>9.4f} {r['predicted_ms'][g]:>10.4f}" for g in gpus)
        )
        if "ratio" in r:
            q = r["ratio"]
            flops = f"{q['flops']:.2f}x" if q["flops"] is not None else "n/a"
            lines.append(
                f"{'':10} masked / varlen: FLOPs {flops}, bytes {q['bytes']:.2f}x, "
                + ", ".join(
                    f"{g.upper()} modeled {q['modeled_ms'][g]:.2f}x predicted {q['predicted_ms'][g]:.2f}x"
                    for g in gpus
                )
            )
            m = q["model"]
            lines.append(
                f"{'':10} {m['layers']} layers + 1 mask build, masked / varlen: bytes {m['bytes']:.2f}x, "
                + ", ".join(
                    f"{g.upper()} modeled {m['modeled_ms'][g]:.2f}x predicted {m['predicted_ms'][g]:.2f}x"
                    for g in gpus
                )
            )
    return text_table(
        f"MODELED (not measured), one attention layer, {what}. varlen: {VARLEN_KERNEL}, work on real "
        f"tokens (sum len^2). masked: {MASKED_SDPA_KERNEL}, B*T^2 work + the mask. "
        "ms = roofline at spec peaks, pred = calibrated predictor.",
        head,
        lines,
        ["mask_build: timm's mask, built once per forward and shared by all layers (not in the ratios)."],
    )
