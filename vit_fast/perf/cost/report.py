"""Summaries of a traced program: totals per phase and kind, roofline times, the comparison table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vit_fast.perf.cost.dispatch import OpRecord
from vit_fast.perf.cost.gpus import GPUS, LAUNCH_OVERHEAD_S
from vit_fast.perf.tables import text_table


@dataclass
class KindCost:
    kind: str
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    time_s: dict[str, float] = field(default_factory=dict)


@dataclass
class CostReport:
    """The modeled cost of one program (e.g. a training step of one model variant)."""

    label: str
    records: list[OpRecord]
    saved_bytes: int = 0
    batch: int = 1
    launch_overhead_s: float = LAUNCH_OVERHEAD_S
    unknown_ops: set[str] = field(default_factory=set)
    kernel_level_failed: dict[str, str] = field(default_factory=dict)
    #: GPUs whose roofline times `total` / `by_kind` carry (any GPU works for modeled_ms/predicted_ms).
    gpus: tuple[str, ...] = ("h100", "a100")

    def select(self, phases: Iterable[str] | None = None) -> list[OpRecord]:
        phases = None if phases is None else set(phases)
        return [r for r in self.records if phases is None or r.phase in phases]

    def total(self, phases: Iterable[str] | None = None) -> KindCost:
        tot = KindCost("total")
        for r in self.select(phases):
            _add(tot, r, self.launch_overhead_s, self.gpus)
        return tot

    def by_kind(self, phases: Iterable[str] | None = None) -> dict[str, KindCost]:
        kinds: dict[str, KindCost] = {}
        for r in self.select(phases):
            _add(kinds.setdefault(r.kind, KindCost(r.kind)), r, self.launch_overhead_s, self.gpus)
        first = self.gpus[0] if self.gpus else ""
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1].time_s.get(first, 0.0)))

    def flops(self, phases: Iterable[str] | None = None) -> int:
        return sum(r.flops for r in self.select(phases))

    def modeled_ms(self, gpu: str) -> float:
        """The roofline time at 100% of `gpu`'s spec peaks, ms (a lower bound, not a prediction)."""
        return sum(r.time_s(GPUS[gpu], self.launch_overhead_s) for r in self.records) * 1e3

    def predicted_ms(self, gpu: str, efficiency: Any = None) -> float:
        """The calibrated model's time on `gpu`, ms (see predict.py; still a model)."""
        from vit_fast.perf.cost.predict import predict_s

        return predict_s(self.records, GPUS[gpu], efficiency) * 1e3

    def to_dict(self) -> dict[str, Any]:
        phases = sorted({r.phase for r in self.records})
        return {
            "label": self.label,
            "batch": self.batch,
            "saved_bytes": self.saved_bytes,
            "launch_overhead_s": self.launch_overhead_s,
            "unknown_ops": sorted(self.unknown_ops),
            "kernel_level_failed": dict(self.kernel_level_failed),
            "phases": {p: _kc_dict(self.total([p])) for p in phases},
            "total": _kc_dict(self.total()),
            "by_kind": {k: _kc_dict(v) for k, v in self.by_kind().items()},
            "modeled_ms": {g: self.modeled_ms(g) for g in self.gpus},
            "predicted_ms": {g: self.predicted_ms(g) for g in self.gpus},
        }


def _add(acc: KindCost, r: OpRecord, overhead: float, gpus: Iterable[str]) -> None:
    acc.launches += r.launches
    acc.bytes += r.bytes
    acc.flops += r.flops
    for key in gpus:
        acc.time_s[key] = acc.time_s.get(key, 0.0) + r.time_s(GPUS[key], overhead)


def _kc_dict(k: KindCost) -> dict[str, Any]:
    return {"launches": k.launches, "bytes": k.bytes, "flops": k.flops, "time_s": dict(k.time_s)}


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def format_comparison(reports: list[CostReport], gpus: Iterable[str] = ("h100", "a100")) -> str:
    """A plain-text table: totals per variant, ratios to the first variant, and per-kind rows.

    Labelled MODELED: these are roofline estimates, not measurements.
    """
    gpus = list(gpus)
    for rep in reports:  # the per-kind times below are kept for the report's GPUs: add these
        rep.gpus = tuple(dict.fromkeys((*rep.gpus, *gpus)))
    base = reports[0]
    head = (
        f"{'variant':24} {'kind':28} {'launches':>9} {'GB r+w':>10} {'GFLOP':>10} {'saved GB':>9}"
        + "".join(f" {'ms ' + g.upper():>10}" for g in gpus)
    )
    lines = [
        "MODELED (roofline over fake tensors, not measured): "
        f"launch overhead {base.launch_overhead_s * 1e6:.1f} us, "
        + ", ".join(
            f"{GPUS[g].name} {GPUS[g].peak(torch.bfloat16) / 1e12:.0f} TFLOP/s {GPUS[g].bandwidth / 1e12:.2f} TB/s"
            for g in gpus
        ),
        head,
        "-" * len(head),
    ]
    for rep in reports:
        tot = rep.total()
        lines.append(
            f"{rep.label:24} {'TOTAL':28} {tot.launches:>9,} {_gb(tot.bytes):>10} {tot.flops / 1e9:>10,.1f} "
            f"{_gb(rep.saved_bytes):>9}" + "".join(f" {tot.time_s[g] * 1e3:>10.2f}" for g in gpus)
        )
        for kind, kc in rep.by_kind().items():
            lines.append(
                f"{'':24} {kind[:28]:28} {kc.launches:>9,} {_gb(kc.bytes):>10} {kc.flops / 1e9:>10,.1f} "
                f"{'':>9}" + "".join(f" {kc.time_s[g] * 1e3:>10.2f}" for g in gpus)
            )
    if len(reports) > 1:
        lines.append("-" * len(head))
        ratio = lambda a, c: f"{a / c:.3f}" if c else "n/a"
        # every later variant against every earlier one (e.g. fused vs timm and fused vs reference)
        for j, rep in enumerate(reports[1:], start=1):
            for other in reports[:j]:
                t, b = rep.total(), other.total()
                lines.append(
                    f"{rep.label[:24]:24} {'ratio vs ' + other.label[:19]:28} {ratio(t.launches, b.launches):>9} "
                    f"{ratio(t.bytes, b.bytes):>10} {ratio(t.flops, b.flops):>10} "
                    f"{ratio(rep.saved_bytes, other.saved_bytes):>9}"
                    + "".join(f" {ratio(t.time_s[g], b.time_s[g]):>10}" for g in gpus)
                )
    for rep in reports:
        for op, why in sorted(rep.kernel_level_failed.items()):
            lines.append(f"{rep.label}: {op} not traced at kernel level (counted as 1 launch): {why}")
    unknown = sorted(set().union(*(r.unknown_ops for r in reports)))
    if unknown:
        lines.append(f"ops without a FLOP formula (counted as 0 FLOPs): {', '.join(unknown)}")
    return "\n".join(lines)


def format_predicted(reports: list[CostReport], gpus: Iterable[str], efficiency: Any = None) -> str:
    """Per variant and GPU: the roofline `modeled_ms` beside the calibrated `predicted_ms`, and the
    predicted time relative to the first variant's."""
    from vit_fast.perf.cost.predict import FITTED, describe

    eff = FITTED if efficiency is None else efficiency
    gpus = list(gpus)
    ref = reports[0].label[:12]
    head = f"{'variant':24} {'gpu':8} {'modeled_ms':>11} {'predicted_ms':>13} {'pred vs ' + ref:>21}"
    lines = []
    for rep in reports:
        for g in gpus:
            pred, base = rep.predicted_ms(g, eff), reports[0].predicted_ms(g, eff)
            lines.append(
                f"{rep.label[:24]:24} {g:8} {rep.modeled_ms(g):>11.2f} {pred:>13.2f} {pred / base:>21.3f}"
            )
    return text_table(
        "PREDICTED (a MODEL calibrated on published timm throughput, not a measurement): " + describe(eff),
        head,
        lines,
        [f"spec sheet, {g}: {GPUS[g].note}" for g in gpus if GPUS[g].note],
    )
