"""`vit-fast validate`: one command that checks a machine end to end and writes a report.

On CUDA: the CUDA test tier, every fused op and its gradients against the float64 reference on the
device, the tuning (when `vit_fast.tuning` is installed), and measured ViT-S/16 and ViT-B/16 inference
and training steps in bf16 (timm eager with SDPA, torch.compile(timm), vit_fast fused; and per op),
all with the `vit-fast bench` harness. On a CPU machine the same flow runs on the CPU (the Triton
kernels in the interpreter) with tiny models, which the report says. `--budget-s` bounds the whole
run: parts are run in a fixed order and the least important ones are skipped first when the time
left would not also cover the more important parts still to come. Needs no network and no C++
build; writes validate.json and validate.md to --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

#: The parts, in run order: (name, importance (1 = cut last), minimum seconds on CUDA, on CPU).
PARTS: tuple[tuple[str, int, float, float], ...] = (
    ("numerics", 1, 20.0, 20.0),
    ("tests", 3, 60.0, 60.0),
    ("tune", 4, 30.0, 20.0),
    ("models", 2, 150.0, 30.0),
    ("ops", 5, 20.0, 10.0),
)

#: The most a part may take of the budget (seconds), so that one slow part leaves time for the
#: later ones beyond their bare minimum (torch.compile of two models takes minutes on a GPU).
MAX_SHARE = {"tests": 180.0, "tune": 60.0, "ops": 60.0}

#: Kernel test files the "tests" part runs (each uses the `device` fixture of tests/conftest.py).
TEST_FILES = (
    "tests/test_layer_norm.py",
    "tests/test_mlp.py",
    "tests/test_attention.py",
    "tests/test_patch_embed.py",
    "tests/test_fused_model.py",
)

#: The model sizes used on a CPU (or with --tiny): enough to run every op, small enough for minutes.
TINY = {"depth": 2, "img_size": 64}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="validate this machine: CUDA test tier, fused ops vs float64, tuning, timm/compile/fused "
        "benchmarks; writes a markdown + JSON report",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument(
        "--budget-s", type=float, default=None, help="time budget (default 480 on CUDA, 540 on CPU)"
    )
    p.add_argument("--out", default="validate_out", help="directory for validate.json and validate.md")
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=None, help="model batch (default 64 on CUDA, 2 on CPU)")
    p.add_argument(
        "--tiny", action="store_true", help=f"models with {TINY} (always on a CPU): a smoke, not a benchmark"
    )
    p.add_argument(
        "--skip", default="", help=f"comma list of parts to skip: {', '.join(n for n, *_ in PARTS)}"
    )
    p.set_defaults(func=run)
    return p


@dataclass
class Planner:
    """Decides, before each part, whether it still fits in the budget.

    A part runs only if the time left covers its own minimum plus the minimums of every MORE
    important part that has not run yet; otherwise it is skipped (so the least important go first)."""

    budget_s: float
    minimum: dict[str, float]
    importance: dict[str, int]
    start: float

    def left(self, now: float | None = None) -> float:
        return self.budget_s - ((time.monotonic() if now is None else now) - self.start)

    def allows(self, part: str, pending: list[str], now: float | None = None) -> bool:
        reserve = sum(self.minimum[p] for p in pending if self.importance[p] < self.importance[part])
        return self.left(now) >= self.minimum[part] + reserve

    def share(self, part: str, pending: list[str], now: float | None = None) -> float:
        """Seconds `part` may use: what is left minus the minimums reserved for the other pending parts."""
        reserve = sum(self.minimum[p] for p in pending if p != part)
        return min(MAX_SHARE.get(part, math.inf), max(self.minimum[part], self.left(now) - reserve))


def run(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if not on_cuda and not any(m.startswith("vit_fast.kernels") for m in sys.modules):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    budget = args.budget_s if args.budget_s is not None else (480.0 if on_cuda else 540.0)
    if not budget > 0:
        raise SystemExit(f"--budget-s must be > 0, got {budget}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = skip - {n for n, *_ in PARTS}
    if bad:
        raise SystemExit(f"--skip: unknown part(s) {sorted(bad)}; known: {', '.join(n for n, *_ in PARTS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tiny = args.tiny or not on_cuda
    batch = args.batch or (64 if on_cuda else 2)
    if batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {batch}")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    planner = Planner(
        budget,
        {n: (c if on_cuda else p) for n, _, c, p in PARTS},
        {n: i for n, i, *_ in PARTS},
        time.monotonic(),
    )
    report: dict[str, Any] = {
        "environment": _environment(device),
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "budget_s": budget,
            "models": models,
            "batch": batch,
            "model_overrides": TINY if tiny else {},
            "tiny": tiny,
            "note": "" if not tiny else (
                f"TINY: models with {TINY} and batch {batch}"
                + ("" if on_cuda else ", on the CPU in fp32 (numerics: the Triton kernels in the "
                   "interpreter, and the C++ backend where built); torch.compile with the aot_eager backend")
                + ": a smoke of the flow, not a benchmark"
            ),
        },
        "parts": {},
    }  # fmt: skip
    pending = [n for n, *_ in PARTS if n not in skip]
    for name, *_ in PARTS:
        if name in skip:
            report["parts"][name] = {"status": "skipped (--skip)"}
            continue
        pending.remove(name)
        if not planner.allows(name, pending):
            report["parts"][name] = {"status": f"skipped (budget: {planner.left():.0f} s left)"}
            print(f"[validate] {name}: skipped, budget", flush=True)
            continue
        share = planner.share(name, pending)
        print(f"[validate] {name} (up to {share:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            result = _PART_FUNCS[name](device, dtype, models, batch, tiny, share)
        except Exception as err:  # one broken part must not hide the others' results
            result = {"status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["parts"][name] = result
    report["total_seconds"] = round(time.monotonic() - planner.start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "validate.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = format_markdown(report)
    with open(os.path.join(args.out, "validate.md"), "w") as f:
        f.write(md)
    print(f"[validate] wrote {args.out}/validate.json and validate.md")
    print(format_summary(report))
    failed = any(p.get("status") in ("fail", "error") for p in report["parts"].values())
    return 1 if failed else 0


def _environment(device: Any) -> dict[str, Any]:
    import torch

    from vit_fast.cli.check import environment

    info = environment()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cuda_runtime"] = torch.version.cuda
        info["driver"] = _driver_version()
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi not found)"


# ----------------------------------------------------------------------------------------------
# Parts. Each returns a dict with "status" ("pass" / "fail" / "error" / "done" / "not available").
# ----------------------------------------------------------------------------------------------


def _numerics(device: Any, dtype: Any, models: list, batch: int, tiny: bool, share: float) -> dict:
    """Every fused op, output and gradients, against the float64 reference on `device`, on every
    backend that can run there (Triton; on a CPU also the C++ extension when built)."""
    import torch

    from vit_fast.kernels._common import triton_interpreting

    if device.type == "cpu" and not triton_interpreting():
        # On a CPU the Triton kernels run in the interpreter, which must be on before their modules
        # are imported; importing vit_fast imported them already: check in a fresh process.
        return _numerics_in_fresh_process(dtype, share)

    from vit_fast import reference
    from vit_fast.ops.backend import cpu_extension, use_backend
    from vit_fast.perf import bench
    from vit_fast.testing import check_numerics

    backends = ["triton"] + (["cpu"] if device.type == "cpu" and cpu_extension() is not None else [])
    # ViT-S/16 block width with a short sequence (the interpreter on a CPU runs every program in Python).
    shape = (
        bench.OpShape(2, 197, 384, 6, 1536, 16)
        if device.type == "cuda"
        else bench.OpShape(1, 17, 64, 2, 256, 4)
    )
    rows = []
    for backend in backends:
        for op in bench.OPS:
            torch.manual_seed(0)
            args, kwargs = bench.op_inputs(op, shape, device, torch.float32)
            fused_fn = getattr(__import__("vit_fast.ops", fromlist=[op]), op)
            row: dict[str, Any] = {"op": op, "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
            try:
                with use_backend(backend):
                    comps = check_numerics(fused_fn, getattr(reference, op), args, kwargs, dtype=dtype)
                row |= {
                    "ok": True,
                    "worst_ratio": max(c.err_ours / c.bound if c.bound else 0.0 for c in comps),
                }
            except AssertionError as err:
                row |= {"ok": False, "error": str(err)[:600]}
            except Exception as err:
                row |= {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            rows.append(row)
    ok = all(r["ok"] for r in rows)
    return {"status": "pass" if ok else "fail", "shape": shape.__dict__, "checks": rows}


def _numerics_in_fresh_process(dtype: Any, share: float) -> dict:
    """`_numerics` on the CPU in a new interpreter with TRITON_INTERPRET=1; its result as JSON."""
    code = (
        "import json, torch; from vit_fast.cli.validate import _numerics; "
        f"print(json.dumps(_numerics(torch.device('cpu'), torch.{str(dtype).removeprefix('torch.')}, "
        f"[], 0, True, {share!r})))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=share
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"stopped after {share:.0f} s (budget)"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"status": "error", "why": out.stderr[-600:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tests(device: Any, dtype: Any, models: list, batch: int, tiny: bool, share: float) -> dict:
    """The kernel test files' fast tier on `device` (VIT_FAST_TEST_DEVICE), in a subprocess with a
    timeout of this part's share of the budget."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = [f for f in TEST_FILES if os.path.exists(os.path.join(root, f))]
    if not files:
        return {
            "status": "not available",
            "why": "tests/ not found (an installed package without the repository)",
        }
    env = dict(os.environ, VIT_FAST_TEST_DEVICE=device.type)
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *files]
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=share)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "timeout", "why": f"stopped after {share:.0f} s (budget)", "tail": tail}
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    status = "pass" if out.returncode == 0 else "fail"
    return {"status": status, "command": " ".join(cmd[1:]), "summary": summary, "tail": out.stdout[-3000:]}


def _tune(device: Any, dtype: Any, models: list, batch: int, tiny: bool, share: float) -> dict:
    try:
        from vit_fast.perf.tune import tune_model
    except ImportError:
        return {"status": "not available", "why": "tuning: not available (vit_fast.tuning is not installed)"}
    results = []
    for name in models:
        results += tune_model(name, batch, dtype, device, share / max(1, len(models)))
    return {"status": "done", "results": results}


def _models(device: Any, dtype: Any, models: list, batch: int, tiny: bool, share: float) -> dict:
    """Inference and training step of each model: timm eager (SDPA), torch.compile(timm), fused."""
    from vit_fast.perf import bench

    overrides = TINY if tiny else {}
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    min_run = 0.5 if device.type == "cuda" else 0.05
    reps = 5 if device.type == "cuda" else 2
    rows: list[dict] = []
    deadline = time.monotonic() + share
    for name in models:
        for impl, bench_impl in (("timm", "timm"), ("timm-compile", "timm_compiled"), ("fused", "fused")):
            if time.monotonic() > deadline:
                rows.append({"model": name, "impl": impl, "error": "skipped (budget)"})
                continue
            res = bench.bench_model(
                name, bench_impl, batch, ("inference", "train"), device, dtype, min_run, reps,
                compile_backend=compile_backend, **overrides,
            )  # fmt: skip
            rows += [
                _model_row(r.name, impl, r.mode, r.median_ms, r.iqr_ms, r.samples_per_s, r.error, batch)
                for r in res
            ]
    ok = all(not r.get("error") for r in rows)
    return {"status": "done" if ok else "fail", "compile_backend": compile_backend, "rows": rows}  # fmt: skip


def _model_row(
    model: str, impl: str, mode: str, med: float, iqr: float, sps: Any, error: str, batch: int
) -> dict:
    return {"model": model, "impl": impl, "mode": mode, "batch": batch, "median_ms": med, "iqr_ms": iqr,
            "samples_per_s": sps, "error": error}  # fmt: skip


def _ops(device: Any, dtype: Any, models: list, batch: int, tiny: bool, share: float) -> dict:
    """Per op forward+backward at the first model's block shape: fused vs reference (vs compiled on CUDA)."""
    from vit_fast.perf import bench

    shape = bench.model_shape(models[0], batch, **(TINY if tiny else {}))
    impls = ("fused", "reference") + (("compiled",) if device.type == "cuda" else ())
    rows = []
    deadline = time.monotonic() + share
    for op in bench.OPS:
        for impl in impls:
            if time.monotonic() > deadline:
                rows.append({"op": op, "impl": impl, "error": "skipped (budget)"})
                continue
            for r in bench.bench_op(
                op, impl, shape, ("fwd+bwd",), device, dtype, 0.2 if device.type == "cuda" else 0.02
            ):
                rows.append({"op": op, "impl": impl, "backend": r.backend, "mode": r.mode, "median_ms": r.median_ms,
                             "iqr_ms": r.iqr_ms, "error": r.error})  # fmt: skip
    return {"status": "done", "shape": shape.__dict__, "rows": rows}


_PART_FUNCS = {"numerics": _numerics, "tests": _tests, "tune": _tune, "models": _models, "ops": _ops}


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------


def _ms(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-"


def format_summary(report: dict) -> str:
    """The short table printed last: each part's status, then model times and ratios to timm."""
    lines = ["part       status"]
    for name, part in report["parts"].items():
        extra = part.get("summary") or part.get("why") or part.get("error") or ""
        lines.append(f"{name:10} {part.get('status', '?')}{'  ' + str(extra)[:70] if extra else ''}")
    rows = report["parts"].get("models", {}).get("rows", [])
    if rows:
        lines.append("")
        lines.append(
            f"{'model':24} {'mode':9} {'timm ms':>9} {'compile ms':>11} {'fused ms':>9} {'fused/timm':>10}"
        )
        keys = sorted({(r["model"], r.get("mode", "")) for r in rows if r.get("mode")})
        for model, mode in keys:
            t = {r["impl"]: r.get("median_ms") for r in rows if r["model"] == model and r.get("mode") == mode}
            ratio = "-"
            if all(isinstance(t.get(k), float) and not math.isnan(t[k]) for k in ("timm", "fused")):
                ratio = f"{t['fused'] / t['timm']:.3f}"
            lines.append(
                f"{model[:24]:24} {mode:9} {_ms(t.get('timm')):>9} {_ms(t.get('timm-compile')):>11} "
                f"{_ms(t.get('fused')):>9} {ratio:>10}"
            )
    note = report["settings"].get("note")
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    out = ["# vit-fast validate", ""]
    if s.get("note"):
        out += [f"**{s['note']}**", ""]
    out += ["## Environment", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in env.items()]
    out += ["", f"Settings: {json.dumps(s)}", "", f"Total: {report.get('total_seconds')} s", ""]
    for name, part in report["parts"].items():
        out += [f"## {name}: {part.get('status')}", ""]
        if "seconds" in part:
            out += [f"{part['seconds']} s", ""]
        for key in ("why", "error", "summary", "command", "compile_backend"):
            if part.get(key):
                out += [f"- {key}: `{part[key]}`"]
        table = part.get("checks") or part.get("rows") or part.get("results")
        if table:
            cols = list(dict.fromkeys(k for row in table for k in row))
            out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in table:
                cells = [
                    _ms(row.get(c)) if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols
                ]
                out.append(
                    "| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:200] for c in cells) + " |"
                )
        if part.get("tail") and part.get("status") != "pass":
            out += ["", "```", part["tail"][-2000:], "```"]
        out.append("")
    return "\n".join(out)
