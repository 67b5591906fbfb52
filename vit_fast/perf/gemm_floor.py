"""The GEMM floor of a ViT on this machine: the time its GEMMs alone would take at the speed the GEMM
libraries reach here, at exactly the model's shapes.

A forward pass has, per block, the qkv, proj, fc1 and fc2 linears and the two attention matmuls
(Q K^T and P V, batched over samples x heads), plus the patch embedding and the head. A training step
adds, for every linear, the input gradient (dgrad, dY W) and the weight gradient (wgrad, dY^T X;
none for the patch embedding's input: images need no gradient) and four batched matmuls for the
attention backward. Each distinct GEMM is timed on its own (best of the libraries available: torch's
at::mm / F.linear, and on CPU each candidate of the C++ backend's tuned GEMM, csrc/gemm.h), and the
floor is the count-weighted sum. A step cannot be faster than its floor without faster GEMMs; the
fraction `floor / measured step` says how much of the step is GEMM at full library speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a step: out[m, n] = a[m, k] b[k, n], `batch` of them per call, `count` calls per step."""

    name: str
    kind: str  # linear (x W^T), dgrad (dY W), wgrad (dY^T X), bmm
    m: int
    n: int
    k: int
    batch: int = 1
    count: int = 1

    @property
    def flop(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch * self.count


def model_gemms(name: str, batch: int, train: bool, **overrides: Any) -> list[Gemm]:
    """The GEMMs of one inference forward (train=False) or training step of vit_fast model `name`."""
    from vit_fast.models import model_config

    cfg = model_config(name) | overrides
    d = cfg.get("embed_dim", 768)
    depth, heads = cfg.get("depth", 12), cfg.get("num_heads", 12)
    f = int(d * cfg.get("mlp_ratio", 4.0))
    img, p = cfg.get("img_size", 224), cfg.get("patch_size", 16)
    img = img if isinstance(img, int) else img[0]
    patches = (img // p) ** 2
    tokens = patches + (0 if cfg.get("class_token", True) is False else 1) + cfg.get("reg_tokens", 0)
    rows, hd, classes = batch * tokens, d // heads, cfg.get("num_classes", 1000)
    linears = [
        ("qkv", rows, 3 * d, d, depth, True),
        ("proj", rows, d, d, depth, True),
        ("fc1", rows, f, d, depth, True),
        ("fc2", rows, d, f, depth, True),
        ("patch_embed", batch * patches, d, cfg.get("in_chans", 3) * p * p, 1, False),
    ]
    if classes:
        linears.append(("head", batch, classes, d, 1, True))
    out = []
    for nm, m, n, k, count, needs_dgrad in linears:
        out.append(Gemm(nm, "linear", m, n, k, count=count))
        if train:
            if needs_dgrad:
                out.append(Gemm(nm, "dgrad", m, k, n, count=count))
            out.append(Gemm(nm, "wgrad", n, k, m, count=count))
    bh = batch * heads
    out.append(Gemm("attn_qk", "bmm", tokens, tokens, hd, bh, depth))
    out.append(Gemm("attn_pv", "bmm", tokens, hd, tokens, bh, depth))
    if train:  # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
        out.append(Gemm("attn_bwd_tt", "bmm", tokens, tokens, hd, bh, depth))
        out.append(Gemm("attn_bwd_td", "bmm", tokens, hd, tokens, bh, 3 * depth))
    return out


def _median_ms(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=max(25, int(min_run_time * 1000)), return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median * 1e3


def _candidates(g: Gemm, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    """Every library call that computes `g` here, by name."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    if g.kind == "bmm":
        a, b = r(g.batch, g.m, g.k), r(g.batch, g.k, g.n)
        cands = {"torch.bmm": lambda: torch.bmm(a, b)}
        if dtype == torch.bfloat16 and device.type == "cpu":
            # Widened to fp32 and rounded back once: what the C++ attention's fp32 tiles do where the
            # CPU has no bf16 GEMM instructions (torch's bf16 bmm is then ~10x slower than this).
            cands["torch.bmm fp32"] = lambda: torch.bmm(a.float(), b.float()).to(dtype)
        return cands
    if g.kind == "linear":
        a, w = r(g.m, g.k), r(g.n, g.k)  # x W^T with the weight stored [N, K]
        cands = {"F.linear": lambda: torch.nn.functional.linear(a, w)}
        cpp = [("linear", a, w)]
    elif g.kind == "dgrad":
        a, w = r(g.m, g.k), r(g.k, g.n)  # dY W with W stored [N_fwd, K_fwd] = [k, n] here
        cands = {"torch.mm": lambda: torch.mm(a, w)}
        cpp = [("linear", a, w.t())]
    else:  # wgrad: dY^T X with dY [rows, n_fwd], X [rows, k_fwd]; rows = g.k
        dy, x = r(g.k, g.m), r(g.k, g.n)
        cands = {"torch.mm": lambda: torch.mm(dy.t(), x)}
        cpp = [("tn", dy, x)]
    from vit_fast.ops.backend import cpu_extension

    ext = cpu_extension() if device.type == "cpu" else None
    if ext is not None and hasattr(ext, "_gemm_run"):
        for kind, x1, x2 in cpp:
            for name in ext.gemm_candidates()[kind]:
                try:
                    ext._gemm_run(kind, name, x1, x2)
                except RuntimeError:
                    continue  # not offered for this layout or dtype here
                cands[f"C++ {name}"] = lambda kind=kind, name=name, x1=x1, x2=x2: ext._gemm_run(
                    kind, name, x1, x2
                )
    return cands


@dataclass
class Floor:
    """The floor of one mode: total GEMM GFLOP, floor ms, and per GEMM (gemm, best ms, best library)."""

    mode: str
    gflop: float
    floor_ms: float
    rows: list[tuple[Gemm, float, str]]
    #: per GEMM of the step: ms of ONE call in each library that ran it ({library: ms})
    libraries: list[tuple[Gemm, dict[str, float]]] = field(default_factory=list)

    @property
    def tflops(self) -> float:
        return self.gflop / self.floor_ms if self.floor_ms > 0 else math.nan


def gemm_floor(
    name: str,
    batch: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    modes: tuple[str, ...] = ("inference", "train"),
    min_run_time: float = 0.05,
    **overrides: Any,
) -> dict[str, Floor]:
    """The GEMM floor of model `name` at `batch` for each of `modes` ("inference", "train")."""
    device = torch.device(device)
    timed: dict[tuple, dict[str, float]] = {}
    out = {}
    for mode in modes:
        rows, libraries = [], []
        for g in model_gemms(name, batch, mode == "train", **overrides):
            shape = (g.kind, g.m, g.n, g.k, g.batch)
            if shape not in timed:
                times = {}
                for lib, fn in _candidates(g, device, dtype).items():
                    try:
                        times[lib] = _median_ms(fn, device, min_run_time)
                    except RuntimeError:
                        continue
                timed[shape] = times
            times = timed[shape]
            best = min(times, key=times.__getitem__)
            rows.append((g, times[best] * g.count, best))
            libraries.append((g, times))
        gflop = sum(g.flop for g, _, _ in rows) / 1e9
        out[mode] = Floor(mode, gflop, sum(ms for _, ms, _ in rows), rows, libraries)
    return out


def format_libraries(floor: Floor) -> str:
    """The GEMM libraries alone: per GEMM of the step (name, kind, m x n x k, batch), each library's
    GFLOP/s at exactly that shape (measured one call at a time), and the fastest."""
    from vit_fast.perf.tables import text_table

    libs = list(dict.fromkeys(lib for _, times in floor.libraries for lib in times))
    # one column per library, as wide as its name (the C++ candidates are named "C++ <variant>")
    widths = [max(8, len(lib)) for lib in libs]
    head = f"{'GEMM':<18} {'m x n x k (batch)':<22}" + "".join(f" {lib:>{w}}" for lib, w in zip(libs, widths))
    rows = []
    for g, times in floor.libraries:
        flop = 2.0 * g.m * g.n * g.k * g.batch
        cells = "".join(
            f" {flop / times[lib] / 1e6:{w}.0f}" if lib in times else f" {'-':>{w}}"
            for lib, w in zip(libs, widths)
        )
        rows.append(
            f"{g.name + ' ' + g.kind:<18} {f'{g.m}x{g.n}x{g.k} ({g.batch})':<22}{cells}  "
            f"{min(times, key=times.__getitem__)}"
        )
    title = f"GEMM libraries alone, GFLOP/s per call at the step's shapes ({floor.mode}, measured)"
    return text_table(title, head + "  fastest", rows)


def format_floor(floors: dict[str, Floor], measured: dict[tuple[str, str], float], device_model: str) -> str:
    """Text: per mode the GEMM GFLOP, the floor and the fraction of it each measured impl reaches
    (`measured` maps (mode, impl) -> median ms)."""
    lines = [f"GEMM floor on this machine ({device_model}; best library per GEMM shape, measured):"]
    for mode, fl in floors.items():
        reach = [
            f"{impl} {fl.floor_ms / ms:.0%}"
            for (m, impl), ms in sorted(measured.items())
            if m == mode and ms and math.isfinite(ms)
        ]
        lines.append(
            f"  {mode:9} {fl.gflop:8.2f} GFLOP of GEMMs -> floor {fl.floor_ms:9.2f} ms "
            f"({fl.tflops * 1e3:6.0f} GFLOP/s); fraction of the floor reached: {', '.join(reach) or 'n/a'}"
        )
    return "\n".join(lines)
