"""The benchmark harness (vit_fast.perf.bench): structure and sanity of its results, never timing.

The fused ops run on the reference backend here (inside their custom ops, with their own autograd):
what autograd saves is decided by the custom op, not by the backend, and the interpreter would only
make the timings slower. Shapes are tiny; min_run_time is a hundredth of a second.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from vit_fast.ops import use_backend
from vit_fast.perf import bench

TINY = bench.OpShape(batch=1, tokens=17, width=32, heads=2, mlp_hidden=128, patch=4)


@pytest.fixture(autouse=True)
def _reference_backend():
    with use_backend("reference"):
        yield


def _check_result(r: bench.BenchResult) -> None:
    assert math.isfinite(r.median_ms) and r.median_ms > 0
    assert r.iqr_ms >= 0
    assert r.reps >= 1
    assert r.device == "cpu" and r.peak_mem_bytes is None  # CUDA-only measurement
    assert r.saved_bytes is None or r.saved_bytes >= 0


def test_measure_returns_positive_median():
    med, iqr, reps = bench.measure(lambda: torch.ones(64).sum(), torch.device("cpu"), 0.01)
    assert med > 0 and iqr >= 0 and reps >= 1


def test_measure_takes_at_least_min_reps_runs():
    calls = []

    def slow():
        calls.append(1)
        sum(range(20000))

    _, _, reps = bench.measure(slow, torch.device("cpu"), min_run_time=0.0, min_reps=7)
    assert reps >= 7 and len(calls) >= 7 + 1  # + the warm-up call


def _result(impl, ms, mode="train", kind="model"):
    return bench.BenchResult(kind, "m", mode, impl, "x", "cpu", "float32", 8, 197, 384, ms, 0.0, 5)


def test_speedups_divide_by_the_fused_time_of_the_same_case():
    results = [
        _result("fused", 100.0),
        _result("reference", 150.0),
        _result("compiled", 120.0),
        _result("reference", 80.0, mode="inference"),  # no fused inference row: no speedup
        _result("fused", 10.0, kind="sweep"),
        _result("reference", 30.0, kind="sweep"),  # sweeps are left to the CSV and the plot
    ]
    rows = bench.speedups(results)
    assert [(r["impl"], r["mode"], round(r["speedup"], 6)) for r in rows] == [
        ("reference", "train", 1.5),
        ("compiled", "train", 1.2),
    ]
    text = bench.format_speedups(rows)
    assert "1.50x" in text and "1.20x" in text


@pytest.mark.parametrize("op", ["attention", "layer_norm_mlp"])
def test_bench_op_fused_saves_less_than_reference(op):
    fused = bench.bench_op(op, "fused", TINY, bench.OP_MODES, min_run_time=0.01)
    ref = bench.bench_op(op, "reference", TINY, bench.OP_MODES, min_run_time=0.01)
    assert [r.mode for r in fused] == list(bench.OP_MODES) == [r.mode for r in ref]
    for r in fused + ref:
        _check_result(r)
        assert (r.kind, r.name, r.batch, r.tokens, r.width) == ("op", op, 1, 17, 32)
    assert fused[0].backend == "reference" and ref[0].backend == "eager"
    # attention: the reference keeps the [B, H, T, T] probabilities, the fused op only out + lse;
    # MLP: the reference keeps LN output, fc1 output and GELU output, the fused op only h_pre + stats.
    assert 0 < fused[0].saved_bytes < ref[0].saved_bytes


@pytest.mark.parametrize("op", ["patch_embed", "layer_norm_linear", "linear_residual"])
def test_bench_op_other_ops_run(op):
    (r,) = bench.bench_op(op, "fused", TINY, ("fwd+bwd",), min_run_time=0.01)
    _check_result(r)


def test_bench_op_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        bench.bench_op("softmax", "fused", TINY)
    with pytest.raises(ValueError, match="impl"):
        bench.bench_op("attention", "cuda-graphs", TINY)
    with pytest.raises(ValueError, match="mode"):
        bench.bench_op("attention", "fused", TINY, ("sideways",), min_run_time=0.01)


def test_bench_model_structure_and_saved_bytes():
    kw = {"depth": 1, "img_size": 32}
    fused = bench.bench_model("vit_tiny_patch16_224", "fused", 2, min_run_time=0.01, **kw)
    ref = bench.bench_model("vit_tiny_patch16_224", "reference", 2, min_run_time=0.01, **kw)
    for res in (fused, ref):
        assert [r.mode for r in res] == ["inference", "train"]
        for r in res:
            _check_result(r)
            assert r.kind == "model" and r.tokens == (32 // 16) ** 2 + 1 and r.width == 192
            assert r.samples_per_s == pytest.approx(2 / (r.median_ms / 1e3))
        assert res[0].saved_bytes is None and res[1].saved_bytes > 0
    assert fused[1].saved_bytes < ref[1].saved_bytes


def test_suite_outputs_csv_json_plot(tmp_path):
    cfg = bench.BenchConfig(
        model="vit_tiny_patch16_224",
        batch=1,
        ops=("attention",),
        op_modes=("fwd",),
        min_run_time=0.01,
        run_model=False,
        sweep_ops=("attention",),
        sweep_tokens=(5, 17),
        sweep_batch=(1, 2),
        sweep_width=(32, 64),
        model_kwargs={"img_size": 32},
    )
    results = bench.run_suite(cfg)
    ops = [r for r in results if r.kind == "op"]
    sweep = [r for r in results if r.kind == "sweep"]
    assert {(r.name, r.impl) for r in ops} == {("attention", "fused"), ("attention", "reference")}
    assert len(sweep) == 2 * (2 + 2 + 2)
    assert {r.extra["axis"] for r in sweep} == {"tokens", "batch", "width"}
    paths = bench.write_outputs(results, str(tmp_path), {"torch": torch.__version__})
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS and len(rows) == len(results)
    assert all(float(r["median_ms"]) > 0 for r in rows)
    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["environment"]["torch"] == torch.__version__ and len(data["results"]) == len(results)
    assert [r["impl"] for r in data["speedups"]] == ["reference"] and data["speedups"][0]["speedup"] > 0
    png = bench.plot(results, str(tmp_path))
    assert png is not None
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table(results)
    assert "median ms" in table and "attention" in table


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward exploded")


def test_failing_case_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(
        bench, "op_callable", lambda op, impl: (lambda qkv, heads: _FailingBackward.apply(qkv), "x")
    )
    fwd, bwd, both = bench.bench_op("attention", "fused", TINY, bench.OP_MODES, min_run_time=0.01)
    assert fwd.error == "" and fwd.median_ms > 0
    for r in (bwd, both):
        assert "backward exploded" in r.error and math.isnan(r.median_ms)
    assert "ERROR" in bench.format_table([fwd, bwd, both])
    # A case whose setup raises becomes error rows too; the suite goes on.
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: 1 / 0)
    cfg = bench.BenchConfig(
        ops=(), run_ops=False, sweep=False, min_run_time=0.01, model_kwargs={"img_size": 32}
    )
    rows = bench.run_suite(cfg)
    models = [r for r in rows if r.kind == "model"]
    assert len(models) == 4 and all("ZeroDivisionError" in r.error for r in models)
    # The GEMM floor still ran (it does not need the model), one row per mode.
    assert [(r.kind, r.mode, r.error) for r in rows if r.kind == "floor"] == [
        ("floor", "inference", ""),
        ("floor", "train", ""),
    ]


def test_model_impls_are_timed_interleaved(monkeypatch):
    """bench_models times one block of each impl per round, the order rotated each round; an impl
    whose setup raises, or whose step raises, gets its error row and the others are timed on."""
    log: list[str] = []

    def fake_case(name, impl, batch, device, dtype, compile_backend, **kw):
        if impl == "compiled":
            raise RuntimeError("no compiler here")

        def step(impl=impl):
            log.append(impl)
            if impl == "timm" and len(log) > 6:
                raise RuntimeError("timm gave up")

        return bench._ModelCase(impl, "x", 5, 192, {"train": step}, None)

    monkeypatch.setattr(bench, "_model_case", fake_case)
    rows = bench.bench_models(
        "vit_tiny_patch16_224",
        ("fused", "reference", "compiled"),
        1,
        ("train",),
        min_run_time=0.0,
        min_reps=4,
    )
    # Two untimed calls each (warm-up, block sizing), then four rounds of one-call blocks.
    assert log == ["fused"] * 2 + ["reference"] * 2 + ["fused", "reference", "reference", "fused"] * 2
    fused, ref, comp = rows
    assert [r.impl for r in rows] == ["fused", "reference", "compiled"]
    assert fused.reps == ref.reps == 4 and fused.error == ref.error == ""
    assert math.isfinite(fused.median_ms) and math.isfinite(ref.iqr_ms)
    assert "no compiler here" in comp.error and math.isnan(comp.median_ms) and comp.reps == 0
    log.clear()
    rows = bench.bench_models(
        "vit_tiny_patch16_224", ("fused", "timm"), 1, ("train",), min_run_time=0.0, min_reps=3
    )
    assert "timm gave up" in rows[1].error and math.isnan(rows[1].median_ms)
    assert rows[0].error == "" and rows[0].reps == 3
    with pytest.raises(ValueError, match="impl"):
        bench.bench_models("vit_tiny_patch16_224", ("fused", "sideways"), 1)


def test_compiled_impl_runs(monkeypatch):
    # The torch.compile'd reference path, with a backend that skips code generation (fast).
    monkeypatch.setattr(bench, "COMPILE_BACKEND", "aot_eager")
    (r,) = bench.bench_op("attention", "compiled", TINY, ("fwd+bwd",), min_run_time=0.01)
    _check_result(r)
    assert r.error == "" and r.backend == "aot_eager"


@pytest.mark.parametrize("train", [False, True])
def test_gemm_floor_counts_the_flops_torch_counts(train):
    # The floor's GEMM list against torch's own FLOP counter on the reference model (mm, addmm, bmm,
    # convolution and their backward): the same total, so no GEMM is missing or counted twice.
    from torch.utils.flop_counter import FlopCounterMode

    from vit_fast.models import create_model
    from vit_fast.perf.gemm_floor import model_gemms

    kw = {"depth": 2, "img_size": 64}
    model = create_model("vit_tiny_patch16_224", impl="reference", **kw)
    images = torch.randn(3, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(images).sum().backward()
        else:
            with torch.no_grad():
                model(images)
    ours = sum(g.flop for g in model_gemms("vit_tiny_patch16_224", 3, train, **kw))
    assert ours == counter.get_total_flops()


def test_gemm_floor_and_fractions():
    from vit_fast.perf.gemm_floor import gemm_floor

    floors = gemm_floor("vit_tiny_patch16_224", 1, min_run_time=0.01, depth=1, img_size=32)
    inf, train = floors["inference"], floors["train"]
    assert 0 < inf.floor_ms < train.floor_ms and 0 < inf.gflop < train.gflop
    assert all(ms > 0 and lib for _, ms, lib in train.rows)
    fl = bench.BenchResult(
        "floor",
        "m",
        "train",
        "gemm_floor",
        "x",
        "cpu",
        "float32",
        1,
        5,
        192,
        2.0,
        0.0,
        0,
        extra={"gflop": 1.0},
    )
    rows = bench.floor_fractions([fl, _result("fused", 4.0), _result("timm", 8.0)])
    assert [(r["impl"], r["fraction"]) for r in rows] == [("fused", 0.5), ("timm", 0.25)]
    assert "of floor" in bench.format_floor_fractions(rows)


@pytest.mark.skipif(not bench.timm_available(), reason="timm not installed")
def test_timm_baselines_run(monkeypatch):
    monkeypatch.setattr(bench, "COMPILE_BACKEND", "aot_eager")
    kw = {"depth": 1, "img_size": 32}
    for impl, backend in (("timm", "eager"), ("timm_compiled", "aot_eager")):
        res = bench.bench_model("vit_tiny_patch16_224", impl, 1, min_run_time=0.01, min_reps=3, **kw)
        assert [r.mode for r in res] == ["inference", "train"]
        for r in res:
            _check_result(r)
            assert r.error == "" and r.backend == backend and r.reps >= 3 and r.width == 192


def test_op_public_api_calls_every_mode():
    # op_callable / op_inputs / op_mode_calls are what the harness times (and benchmarks/ uses).
    fn, label = bench.op_callable("attention", "reference")
    assert label == "eager"
    args, kwargs = bench.op_inputs("attention", TINY)
    qkv = args[0]
    assert qkv.shape == (1, 17, 96) and qkv.requires_grad and args[1] == 2
    calls = bench.op_mode_calls(fn, args, kwargs)
    assert set(calls) == set(bench.OP_MODES)
    calls["fwd"]()
    assert qkv.grad is None  # no-grad forward
    calls["fwd+bwd"]()
    first = qkv.grad.clone()
    calls["fwd+bwd"]()  # gradients are reset between calls, not accumulated
    torch.testing.assert_close(qkv.grad, first)
    calls["bwd"]()
    calls["bwd"]()  # the retained graph can be differentiated again
    images = bench.op_inputs("patch_embed", TINY)[0][0]
    assert not images.requires_grad  # training from pixels: no image gradient
    with pytest.raises(ValueError, match="unknown op"):
        bench.op_callable("softmax", "fused")
    with pytest.raises(ValueError, match="impl"):
        bench.op_callable("attention", "timm")


def test_workload_builds_every_impl_and_one_train_step_changes_weights():
    from vit_fast.perf import workload

    kw = {"depth": 1, "img_size": 32}
    with pytest.raises(ValueError, match="impl"):
        workload.build_model("vit_tiny_patch16_224", "tensorrt")
    model = workload.build_model("vit_tiny_patch16_224", "reference", "cpu", torch.float32, **kw)
    images, labels = workload.image_batch(model, 3)
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3,) and int(labels.max()) < 1000
    steps = workload.make_steps(model, images, workload.cross_entropy(labels), lr=0.1)
    before = model.head.weight.detach().clone()
    steps["inference"]()
    assert torch.equal(model.head.weight, before) and not model.training
    steps["train"]()
    assert model.training and not torch.equal(model.head.weight, before)
    if bench.timm_available():
        math_attn = workload.build_model("vit_tiny_patch16_224", "timm-math", **kw)
        assert all(not m.fused_attn for m in math_attn.modules() if hasattr(m, "fused_attn"))


def test_naflex_grids_and_batch_are_seeded_prefix_padded():
    from vit_fast.perf import workload

    grids = workload.naflex_grids(6, 64, seed=3)
    assert grids == workload.naflex_grids(6, 64, seed=3) != workload.naflex_grids(6, 64, seed=4)
    assert all(1 <= h * w <= 64 for h, w in grids) and len({h * w for h, w in grids}) > 1
    batch = workload.naflex_batch(grids, patch=4)
    n = max(h * w for h, w in grids)
    assert batch["patches"].shape == (6, n, 48) and batch["patch_coord"].shape == (6, n, 2)
    for b, (h, w) in enumerate(grids):
        valid = batch["patch_valid"][b]
        assert valid[: h * w].all() and not valid[h * w :].any()
        assert batch["patch_coord"][b, h * w - 1].tolist() == [h - 1, w - 1]
        assert not batch["patches"][b, h * w :].any()


@pytest.mark.skipif(not bench.timm_available(), reason="timm not installed")
def test_bench_naflex_stock_patched_and_compiled_rows():
    from vit_fast.perf import workload

    kw = {"depth": 1, "embed_dim": 64, "num_heads": 2}
    res = bench.bench_naflex(
        batch=3, max_patches=16, min_run_time=0.001, min_reps=1, compile=True, compile_backend="aot_eager", **kw
    )  # fmt: skip
    assert [(r.mode, r.impl) for r in res] == [
        (m, i) for m in ("inference", "train") for i in ("stock", "patched", "stock_compiled")
    ]
    grids = workload.naflex_grids(3, 16)
    for r in res:
        _check_result(r)
        assert r.error == "" and r.kind == "naflex" and r.width == 64
        assert r.extra["lengths"] == [4 + h * w for h, w in grids]  # + its 4 prefix tokens
        assert r.tokens == 4 + max(h * w for h, w in grids)
    assert {r.backend for r in res} == {"eager", "fused", "aot_eager"}
    rows = bench.pair_ratios(res)
    assert [r["mode"] for r in rows] == ["inference", "train"]
    for row in rows:
        assert row["stock/patched"] == pytest.approx(row["stock_ms"] / row["patched_ms"])
        assert row["stock_compiled/patched"] > 0
    text = bench.format_pairs(res)
    assert "stock/patched" in text and "compiled/patched" in text
    with pytest.raises(ValueError, match="not a timm NaFlexVit"):
        bench.bench_naflex("vit_tiny_patch16_224", batch=1, depth=1)


def test_pair_ratios_show_a_failed_compile():
    def r(impl, ms, error=""):
        return bench.BenchResult(
            "naflex", "m", "train", impl, "x", "cpu", "float32", 2, 9, 8, ms, 0.0, 1, error=error
        )

    rows = bench.pair_ratios(
        [r("stock", 30.0), r("patched", 10.0), r("stock_compiled", math.nan, "Boom: no")]
    )
    assert rows == [
        {
            "kind": "naflex", "name": "m", "mode": "train", "batch": 2, "patched_ms": 10.0, "stock_ms": 30.0,
            "stock/patched": 3.0, "stock_compiled_ms": None, "stock_compiled/patched": None,
            "stock_compiled_error": "Boom: no",
        }
    ]  # fmt: skip
    assert "Boom: no" in bench.format_pairs(
        [r("stock", 30.0), r("patched", 10.0), r("stock_compiled", 1, "Boom: no")]
    )


def _extension():
    from vit_fast.ops.backend import cpu_extension

    ext = cpu_extension()
    return ext if ext is not None and hasattr(ext, "set_gemm_backend") else None


@pytest.mark.skipif(_extension() is None, reason="needs the C++ extension")
def test_gemm_ablation_forces_each_library_and_restores_the_pick():
    ext = _extension()
    before = ext.gemm_backend()
    cfg = bench.BenchConfig(
        impls=("fused",), run_ops=False, sweep=False, gemm_floor=False, gemm_ablation=True,
        min_run_time=0.01, model_min_reps=1, model_kwargs={"img_size": 32, "depth": 1},
    )  # fmt: skip
    with use_backend("cpu"):
        rows = bench.run_suite(cfg)
    assert ext.gemm_backend() == before
    got = {(r.impl, r.mode, r.backend) for r in rows if r.impl != "fused"}
    assert got == {
        (i, m, f"cpu/{lib}") for i, lib in bench.GEMM_ABLATION.items() for m in ("inference", "train")
    }
    assert all(not r.error for r in rows)
    assert {s["impl"] for s in bench.speedups(rows)} == set(bench.GEMM_ABLATION)


def test_gemm_libraries_table_lists_every_library_timed():
    from vit_fast.perf.gemm_floor import format_libraries, gemm_floor

    (fl,) = gemm_floor(
        "vit_tiny_patch16_224", 1, modes=("train",), min_run_time=0.01, depth=1, img_size=32
    ).values()
    assert len(fl.libraries) == len(fl.rows)
    for (g, ms, best), (g2, times) in zip(fl.rows, fl.libraries):
        assert (
            g == g2
            and best == min(times, key=times.__getitem__)
            and ms == pytest.approx(times[best] * g.count)
        )
    text = format_libraries(fl)
    libs = {lib for _, times in fl.libraries for lib in times}
    assert "torch.bmm" in libs and all(lib[:16] in text for lib in libs)
