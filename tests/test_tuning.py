"""Choice by measurement (vit_fast.tuning): the selector, its disk cache, the switches, the op-level
choice on CPU and for CUDA-like calls (Triton in the interpreter), all with injected timers, and the
C++ backend's per-shape GEMM choice (real timings there, but the assertions are about routing and
numbers, never about which library wins)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from vit_fast.ops import use_backend
from vit_fast.ops.backend import _TunedFns, backend_fns, backend_module, cpu_extension
from vit_fast.plain import mlp as plain_mlp
from vit_fast.testing import compare
from vit_fast.tuning import cache as cache_mod
from vit_fast.tuning import gemm as gemm_tuning
from vit_fast.tuning.cache import VERSION, TuningCache
from vit_fast.tuning.ops import choose_backend, signature, tuning_session
from vit_fast.tuning.selector import Selector, cpu_timer, cuda_timer, default_timer


class QueueTimer:
    """Returns preset milliseconds in call order (candidates are timed in dict order), running each
    candidate once so a broken candidate still fails the way it would under a real timer."""

    def __init__(self, *ms: float) -> None:
        self.ms = list(ms)
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.ms.pop(0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VIT_FAST_TUNE", "on")
    cache_mod.reset_caches()
    yield tmp_path
    cache_mod.reset_caches()


def _selector(cache_dir, timer, model="Test CPU 9000", **kw):
    return Selector("cpu", timer=timer, cache=TuningCache(model, cache_dir), **kw)


CANDS = {"a": lambda: None, "b": lambda: None}


def test_picks_fastest_and_writes_the_cache(cache_dir):
    d = _selector(cache_dir, QueueTimer(3.0, 1.0)).choose("op/x/M=4", CANDS)
    assert (d.pick, d.source, d.ms) == ("b", "measured", {"a": 3.0, "b": 1.0})
    data = json.loads((cache_dir / "tuning-Test_CPU_9000.json").read_text())
    assert (
        data["version"] == VERSION
        and data["device"] == "Test CPU 9000"
        and data["torch"] == torch.__version__
    )
    assert data["entries"]["op/x/M=4"] == {"pick": "b", "ms": {"a": 3.0, "b": 1.0}}
    assert [p.name for p in cache_dir.iterdir()] == ["tuning-Test_CPU_9000.json"]  # no temp file left


def test_cached_pick_is_reused_by_a_new_selector(cache_dir):
    _selector(cache_dir, QueueTimer(3.0, 1.0)).choose("k", CANDS)
    timer = QueueTimer(1.0, 3.0)  # would pick "a"
    d = _selector(cache_dir, timer).choose("k", CANDS)
    assert (d.pick, d.source, timer.calls) == ("b", "cache", 0)


def test_the_default_wins_ties_within_the_margin(cache_dir):
    sel = _selector(cache_dir, QueueTimer(1.0, 0.99, 1.0, 0.9))
    assert sel.choose("k1", CANDS, default="a").pick == "a"  # 1% faster: noise, keep the default
    assert sel.choose("k2", CANDS, default="a").pick == "b"  # 10% faster: switch


def test_new_shape_is_measured_again(cache_dir):
    timer = QueueTimer(3.0, 1.0, 1.0, 3.0)
    sel = _selector(cache_dir, timer)
    assert sel.choose("k/M=4", CANDS).pick == "b"
    assert sel.choose("k/M=4", CANDS).source == "cache"
    d = sel.choose("k/M=8", CANDS)
    assert (d.pick, d.source, timer.calls) == ("a", "measured", 4)


@pytest.mark.parametrize(
    "content", ["{not json", '["a list"]', '{"format": "vit_fast-tuning", "entries": 3}']
)
def test_corrupt_cache_file_is_remeasured_and_rewritten(cache_dir, content):
    path = cache_dir / "tuning-Test_CPU_9000.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="corrupt"):
        d = _selector(cache_dir, QueueTimer(3.0, 1.0)).choose("k", CANDS)
    assert (d.pick, d.source) == ("b", "measured")
    assert json.loads(path.read_text())["entries"] == {"k": {"pick": "b", "ms": {"a": 3.0, "b": 1.0}}}


@pytest.mark.parametrize(
    "field,value", [("version", VERSION + 1), ("torch", "0.0.1"), ("device", "Other CPU")]
)
def test_stale_cache_file_is_remeasured(cache_dir, field, value):
    path = cache_dir / "tuning-Test_CPU_9000.json"
    data = {
        "format": "vit_fast-tuning",
        "version": VERSION,
        "device": "Test CPU 9000",
        "torch": torch.__version__,
    }
    data["entries"] = {"k": {"pick": "a", "ms": {}}}
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="stale"):
        d = _selector(cache_dir, QueueTimer(3.0, 1.0)).choose("k", CANDS)
    assert (d.pick, d.source) == ("b", "measured")
    assert json.loads(path.read_text())[field] == {"version": VERSION, "torch": torch.__version__}.get(
        field, "Test CPU 9000"
    )


def test_a_valid_file_is_read_without_warnings(cache_dir):
    _selector(cache_dir, QueueTimer(3.0, 1.0)).choose("k", CANDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _selector(cache_dir, QueueTimer()).choose("k", CANDS).source == "cache"


def test_cache_is_keyed_per_device_model(cache_dir):
    _selector(cache_dir, QueueTimer(3.0, 1.0), model="CPU A").choose("k", CANDS)
    timer = QueueTimer(1.0, 3.0)
    d = _selector(cache_dir, timer, model="CPU B").choose("k", CANDS)
    assert (d.pick, d.source, timer.calls) == ("a", "measured", 2)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["tuning-CPU_A.json", "tuning-CPU_B.json"]


def test_cpu_identity_tells_generations_and_thread_counts_apart(tmp_path, monkeypatch):
    """VMs report bare model names ("AMD EPYC" for Zen 4 and Zen 5 alike): the cache file's
    identity adds family / model / stepping, the kernel-deciding ISA flags and the thread count."""
    block = "processor\t: {p}\nmodel name\t: AMD EPYC\ncpu family\t: {fam}\nmodel\t\t: {mod}\nstepping\t: 0\nflags\t\t: fpu avx2 avx512f{extra}\n\n"
    seen = []
    for i, (fam, mod, extra) in enumerate(((25, 17, " avx512_bf16"), (26, 2, " avx512_bf16"), (26, 2, ""))):
        path = tmp_path / f"cpuinfo{i}"
        # The first processor's block decides; a different second block must not matter.
        path.write_text(
            block.format(p=0, fam=fam, mod=mod, extra=extra) + block.format(p=1, fam=1, mod=1, extra="")
        )
        monkeypatch.setattr(cache_mod, "CPUINFO", str(path))
        seen.append(cache_mod.cpu_identity())
        assert cache_mod.cpu_model() == "AMD EPYC"
    threads = torch.get_num_threads()
    assert seen[0] == f"AMD EPYC (family 25 model 17 stepping 0; avx2 avx512f avx512_bf16; {threads} threads)"
    assert seen[2] == f"AMD EPYC (family 26 model 2 stepping 0; avx2 avx512f; {threads} threads)"
    assert len(set(seen)) == 3
    try:
        torch.set_num_threads(threads + 1)
        more = cache_mod.cpu_identity()
    finally:
        torch.set_num_threads(threads)
    assert more == seen[2].replace(f"{threads} threads", f"{threads + 1} threads")
    assert cache_mod.device_model("cpu") == seen[2]


def test_forced_choice_and_tuning_off(cache_dir, monkeypatch):
    timer = QueueTimer()
    sel = _selector(cache_dir, timer)
    assert (sel.choose("k", CANDS, force="a").source, sel.choose("k", CANDS, force="a").pick) == (
        "forced",
        "a",
    )
    with pytest.raises(ValueError, match="forced choice 'c'"):
        sel.choose("k", CANDS, force="c")
    monkeypatch.setenv("VIT_FAST_TUNE", "off")
    d = sel.choose("k", CANDS, default="b")
    assert (d.pick, d.source, timer.calls) == ("b", "off", 0)
    assert list(cache_dir.iterdir()) == []  # nothing measured, nothing written
    monkeypatch.setenv("VIT_FAST_TUNE", "maybe")
    with pytest.raises(ValueError, match="VIT_FAST_TUNE"):
        sel.choose("k", CANDS)


def test_failing_candidates_fall_back(cache_dir):
    def broken():
        raise RuntimeError("no kernel for this shape")

    d = _selector(cache_dir, QueueTimer(1.0)).choose("k", {"a": broken, "b": lambda: None})
    assert (d.pick, d.ms) == ("b", {"b": 1.0}) and "no kernel" in d.failed["a"]
    with pytest.warns(UserWarning, match="every candidate failed"):
        d = _selector(cache_dir, QueueTimer()).choose("k2", {"a": broken, "b": broken}, default="b")
    assert d.pick == "b" and "k2" not in TuningCache("Test CPU 9000", cache_dir).entries()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_FAST_CACHE_DIR", str(tmp_path / "x"))
    assert cache_mod.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("VIT_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.cache_dir() == tmp_path / "xdg" / "vit_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_mod.cache_dir() == cache_mod.Path.home() / ".cache" / "vit_fast"


def test_default_timers():
    assert default_timer("cpu") is cpu_timer and default_timer("cuda") is cuda_timer
    calls = []
    assert cpu_timer(lambda: calls.append(1), target_ms=0.0) >= 0.0
    assert len(calls) == 1 + 3  # warm-up + the minimum number of timed blocks


def test_cpu_candidates_are_timed_interleaved():
    """The CPU timer warms every candidate up, then runs rounds of one call of each with the order
    rotated (so drift moves all alike); a candidate that raises is reported, the others timed."""
    from vit_fast.tuning.selector import cpu_times

    calls = []

    def broken():
        calls.append("c")
        raise RuntimeError("no such kernel")

    ms = cpu_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": broken},
        target_ms=0.0,
        min_reps=3,
    )
    warm_up, rounds = calls[:3], calls[3:]
    assert warm_up == ["a", "b", "c"] and rounds == ["a", "b", "b", "a", "a", "b"]
    assert isinstance(ms["c"], RuntimeError) and ms["a"] >= 0.0 and ms["b"] >= 0.0
    assert cpu_times({"x": broken}, target_ms=0.0).keys() == {"x"}


def test_selector_times_cpu_candidates_together(cache_dir, monkeypatch):
    """The default CPU selector hands all candidates to the interleaved timer at once."""
    from vit_fast.tuning import selector as selector_mod

    seen = []
    monkeypatch.setattr(selector_mod, "cpu_times", lambda fns: seen.append(list(fns)) or {"p": 2.0, "q": 1.0})
    chooser = Selector("cpu", cache=TuningCache("Test CPU", cache_dir))
    assert chooser.choose("k", {"p": lambda: None, "q": lambda: None}, default="p").pick == "q"
    assert seen == [["p", "q"]]


# --------------------------------------------------------------------------------------------------
# op level


def _mlp_args(m=12, d=16, f=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    x = r(m, d)
    return (
        x,
        r(d),
        r(d),
        r(f, d, scale=d**-0.5),
        r(f),
        r(d, f, scale=f**-0.5),
        r(d),
        1e-6,
        None,
        None,
        m,
        "none",
    )


def test_signature_keys_shape_dtype_layout():
    a = torch.zeros(4, 6)
    assert signature((a, a.t(), None, 3, "tanh")) == "float32[4x6]c,float32[6x4]s,-,3,'tanh'"


@pytest.mark.skipif(cpu_extension() is None, reason="needs the C++ extension")
def test_cpu_op_choice_routes_to_the_pick(cache_dir, monkeypatch):
    args = _mlp_args()
    ref_calls = []
    real_ref = plain_mlp.mlp_forward
    monkeypatch.setattr(plain_mlp, "mlp_forward", lambda *a: ref_calls.append(1) or real_ref(*a))
    decisions = []
    with tuning_session(timer=QueueTimer(5.0, 1.0), on_decision=decisions.append, model="Test CPU"):
        fns = backend_fns(torch.device("cpu"), "mlp")
        assert isinstance(fns, _TunedFns)
        out = fns.mlp_forward(*args)
        assert [(d.pick, d.source) for d in decisions] == [("reference", "measured")]
        n = len(ref_calls)
        out2 = fns.mlp_forward(*args)  # cached: the reference runs, the C++ kernel does not get timed
        assert len(ref_calls) == n + 1 and decisions[-1].source == "cache"
    torch.testing.assert_close(out, out2)
    # The pick gives the contract's numbers: against the float64 reference, within the rule.
    ref64 = real_ref(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    ours, lp = out[0], cpu_extension().mlp_forward(*args)[0]
    assert compare("mlp_forward out", ours, ref64[0], lp).ok


def test_forced_backend_and_tuning_off_are_not_tuned(cache_dir, monkeypatch):
    with tuning_session(timer=QueueTimer(), model="Test CPU"):
        with use_backend("reference"):
            assert backend_fns(torch.device("cpu"), "mlp") is plain_mlp
        monkeypatch.setenv("VIT_FAST_BACKEND", "reference")
        assert backend_fns(torch.device("cpu"), "mlp") is plain_mlp
        monkeypatch.delenv("VIT_FAST_BACKEND")
    monkeypatch.setenv("VIT_FAST_TUNE", "off")
    with tuning_session(timer=QueueTimer(), model="Test CPU"):
        assert not isinstance(backend_fns(torch.device("cpu"), "mlp"), _TunedFns)
        assert choose_backend(torch.device("cpu"), "mlp", "f", (), lambda b: None, "cpu") == "cpu"


def test_decided_picks_are_memoised_but_tuning_off_and_sessions_still_apply(cache_dir, monkeypatch):
    """A decided call signature is answered from the in-process memo without running anything; a new
    shape is measured; VIT_FAST_TUNE=off still gives the default; a tuning_session starts afresh."""
    from vit_fast.tuning import ops as tuning_ops
    from vit_fast.tuning import selector as selector_mod

    calls = []

    def run(backend):
        calls.append(backend)

    # The default session's timer, made deterministic: "cpu" (timed first) is slow, so "reference" wins.
    monkeypatch.setattr(selector_mod, "default_timer", lambda device: QueueTimer(*[2.0, 1.0] * 4))
    monkeypatch.setattr(tuning_ops, "_selectors", {})  # fresh (and restored afterwards)
    monkeypatch.setattr(tuning_ops, "_picks", {})
    cpu = torch.device("cpu")
    x = torch.zeros(3, 5)
    assert choose_backend(cpu, "mlp", "memo_test", (x, 0.5), run, "cpu") == "reference"
    assert {"cpu", "reference"} <= set(calls) and len(tuning_ops._picks) == 1
    calls.clear()
    assert choose_backend(cpu, "mlp", "memo_test", (torch.ones(3, 5), 0.5), run, "cpu") == "reference"
    assert calls == []  # same signature: nothing measured, nothing run
    assert choose_backend(cpu, "mlp", "memo_test", (torch.ones(4, 5), 0.5), run, "cpu") == "reference"
    assert calls and len(tuning_ops._picks) == 2  # a new shape is a new decision
    monkeypatch.setenv("VIT_FAST_TUNE", "off")
    assert choose_backend(cpu, "mlp", "memo_test", (x, 0.5), run, "cpu") == "cpu"
    monkeypatch.setenv("VIT_FAST_TUNE", "on")
    with tuning_session(timer=QueueTimer(1.0, 2.0), model="Test CPU"):
        assert tuning_ops._picks == {}
        assert choose_backend(cpu, "mlp", "memo_test", (x, 0.5), run, "cpu") == "cpu"
        assert tuning_ops._picks == {}  # a customised session never fills the memo
    assert tuning_ops._picks == {}


@pytest.mark.skipif(cpu_extension() is None, reason="needs the C++ extension")
def test_stand_in_is_kept_and_a_decided_call_skips_the_selector(cache_dir, monkeypatch):
    """backend_fns hands out one stand-in per (device, family, default); once a call signature is
    decided, its calls go to the pick without the selector (made to fail here); a forced backend
    still wins over the kept stand-in, and a new shape is measured again."""
    from vit_fast.tuning import ops as tuning_ops
    from vit_fast.tuning import selector as selector_mod

    monkeypatch.setattr(selector_mod, "default_timer", lambda device: QueueTimer(*[5.0, 1.0] * 4))
    monkeypatch.setattr(tuning_ops, "_selectors", {})
    monkeypatch.setattr(tuning_ops, "_picks", {})
    ref_calls = []
    real_ref = plain_mlp.mlp_forward
    monkeypatch.setattr(plain_mlp, "mlp_forward", lambda *a: ref_calls.append(1) or real_ref(*a))
    cpu = torch.device("cpu")
    fns = backend_fns(cpu, "mlp", torch.float32)
    assert isinstance(fns, _TunedFns) and backend_fns(cpu, "mlp", torch.float32) is fns
    args = _mlp_args()
    out = fns.mlp_forward(*args)  # measured: "cpu" 5 ms, "reference" 1 ms -> reference
    assert len(tuning_ops._picks) == 1

    def no_selector(device):
        raise AssertionError("a decided signature must not reach the selector")

    monkeypatch.setattr(tuning_ops, "selector", no_selector)
    n = len(ref_calls)
    again = fns.mlp_forward(*args)
    assert len(ref_calls) == n + 1  # the pick ran, nothing else
    torch.testing.assert_close(out, again)
    with use_backend("cpu"):
        assert backend_fns(cpu, "mlp", torch.float32) is cpu_extension()
    bigger = (torch.randn(6, args[0].shape[1]), *args[1:])
    with pytest.raises(AssertionError, match="must not reach the selector"):
        fns.mlp_forward(*bigger)  # a new shape is a new decision


def _cuda_like(timer, run, decisions=None, model="Fake GPU 80GB"):
    """A CUDA call's choice (triton vs the plain-PyTorch cuBLAS path) made on CPU tensors: Triton runs
    in the interpreter, the timer and the GPU model are injected."""
    args = _mlp_args()
    with tuning_session(
        timer=timer, model=model, on_decision=None if decisions is None else decisions.append
    ):
        return choose_backend(
            torch.device("cuda"), "mlp", "mlp_forward", args, lambda b: run(b, args), "triton"
        )


def _run_real(backend, args):
    return backend_module("mlp", backend).mlp_forward(*args)


@pytest.mark.parametrize("times,pick", [((1.0, 2.0), "triton"), ((2.0, 1.0), "reference")])
def test_cuda_like_choice_between_triton_and_cublas_path(cache_dir, times, pick):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    decisions = []
    assert _cuda_like(QueueTimer(*times), _run_real, decisions) == pick
    assert decisions[0].ms == dict(zip(("triton", "reference"), times))
    assert (cache_dir / "tuning-Fake_GPU_80GB.json").exists()
    # Both candidates compute the contract's numbers (Triton interpreted), within the rule.
    args = _mlp_args()
    ref64 = plain_mlp.mlp_forward(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    for b in ("triton", "reference"):
        assert compare(f"{b} out", _run_real(b, args)[0], ref64[0], plain_mlp.mlp_forward(*args)[0]).ok


def test_cuda_like_fallbacks(cache_dir):
    def triton_broken(backend, args):
        if backend == "triton":
            raise RuntimeError("out of shared memory")
        return _run_real(backend, args)

    assert _cuda_like(QueueTimer(1.0), triton_broken) == "reference"

    def all_broken(backend, args):
        raise RuntimeError("no")

    with pytest.warns(UserWarning, match="every candidate failed"):
        assert _cuda_like(QueueTimer(), all_broken, model="Fake GPU 2") == "triton"  # the default
    assert not (cache_dir / "tuning-Fake_GPU_2.json").exists()  # a failure is not cached
    # A non-CUDA default (no Triton: the reference) has a single candidate: nothing is measured.
    with tuning_session(timer=QueueTimer(), model="Fake GPU"):
        assert (
            choose_backend(torch.device("cuda"), "mlp", "f", (), lambda b: 1 / 0, "reference") == "reference"
        )


# --------------------------------------------------------------------------------------------------
# the C++ backend's per-shape GEMM choice

_C = cpu_extension()
needs_gemm_table = pytest.mark.skipif(
    not gemm_tuning.supported(_C), reason="needs the C++ extension with the tuned GEMM table"
)


@pytest.fixture
def tuned_gemms():
    """Tuned mode on an empty table, prepacked weights off: a weight called three times would
    otherwise move to its own "/pack=1" key (tested in test_cpu_backend.py)."""
    before, packing = _C.gemm_backend(), _C.prepacking()
    _C.set_gemm_backend("tuned")
    _C.set_prepacking(False)
    _C.clear_gemm_choices()
    _C.reset_gemm_call_counts()
    yield
    _C.clear_gemm_choices()
    _C.set_gemm_backend(before)
    _C.set_prepacking(packing)


@needs_gemm_table
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gemm_candidate_matches_torch(dtype):
    g = torch.Generator().manual_seed(1)
    a, w, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((37, 24), (20, 24), (20,)))
    b_kn = torch.randn(24, 20, generator=g).to(dtype)  # mm(a, b): the weight as a transposed view
    dy = torch.randn(37, 20, generator=g).to(dtype)
    cases = {
        "linear": [(a, w, bias, a.double() @ w.double().t() + bias.double(), torch.addmm(bias, a, w.t()))],
        "linear_kn": [(a, b_kn.t(), None, a.double() @ b_kn.double(), a @ b_kn)],
        "tn": [(dy, a, None, dy.double().t() @ a.double(), dy.t() @ a)],
    }
    names = _C.gemm_candidates()
    ran = 0
    for case, calls in cases.items():
        kind = "tn" if case == "tn" else "linear"
        for x, y, bb, ref64, lp in calls:
            for name in names[kind]:
                try:
                    out = _C._gemm_run(kind, name, x, y, bb)
                except RuntimeError as err:
                    if "does not apply" in str(err):
                        continue  # not offered for this layout
                    # oneDNN has no bf16 inner product without AVX-512 (an AVX2-only Zen 3, say):
                    # only a oneDNN candidate, only in bf16, only on such a CPU may refuse.
                    no_bf16_isa = "avx512f" not in cache_mod._cpuinfo(cache_mod.CPUINFO)[2].split()
                    if "cannot run this call on this CPU" in str(err) and name.startswith("onednn"):
                        assert dtype == torch.bfloat16 and no_bf16_isa, str(err)
                        continue
                    raise
                assert out.dtype == dtype
                c = compare(f"{case}/{name}", out, ref64, lp, atol_rel=1e-6)
                assert c.ok, str(c)
                ran += 1
    assert ran >= 3  # at least at::mm for each case


@needs_gemm_table
def test_gemm_choice_is_measured_per_shape_and_routes(tuned_gemms):
    x, w = torch.randn(8, 16), torch.randn(24, 16)
    _C.layer_norm_linear_forward(x, None, None, w, None, 1e-6)
    table = _C.gemm_choices()
    assert len(table) == 1
    key, (pick, ms, measured) = next(iter(table.items()))
    assert key.startswith("linear/") and "M=8,N=24,K=16" in key and measured
    assert set(ms) <= set(_C.gemm_candidates()["linear"]) and pick == min(ms, key=ms.get)
    # A new shape is a new key, measured at its first use.
    _C.layer_norm_linear_forward(torch.randn(9, 16), None, None, w, None, 1e-6)
    assert len(_C.gemm_choices()) == 2
    # The table's pick is what runs.
    for name in ms:
        _C.set_gemm_choices({key: name})
        _C.reset_gemm_call_counts()
        _C.layer_norm_linear_forward(x, None, None, w, None, 1e-6)
        counts = _C.gemm_call_counts()
        assert counts[name] == 1 and sum(counts.values()) == 1, (name, counts)
        assert _C.gemm_choices()[key][2] is False  # a loaded pick, not a measurement
    assert _C.set_gemm_choices({key: "mkl"}) == [key]  # an unknown candidate is refused


@needs_gemm_table
def test_gemm_choices_round_trip_through_the_disk_cache(tuned_gemms, cache_dir):
    x, w = torch.randn(8, 16), torch.randn(24, 16)
    _C.layer_norm_linear_backward(
        torch.randn(8, 24), x, None, None, w, *_C.layer_norm_forward(x, None, None, 1e-6)[1:], True
    )
    measured = {k: v[0] for k, v in _C.gemm_choices().items() if v[2]}
    assert any(k.startswith("tn/") for k in measured) and any(k.startswith("linear/") for k in measured)
    assert gemm_tuning.save(_C) == len(measured)
    entries = TuningCache(cache_mod.cpu_identity(), cache_dir).entries()
    assert {k.removeprefix("gemm/"): v["pick"] for k, v in entries.items()} == measured
    _C.clear_gemm_choices()
    cache_mod.reset_caches()
    assert gemm_tuning.load(_C) == len(measured)
    assert {k: v[0] for k, v in _C.gemm_choices().items()} == measured
    _C.reset_gemm_call_counts()
    _C.layer_norm_linear_backward(
        torch.randn(8, 24), x, None, None, w, *_C.layer_norm_forward(x, None, None, 1e-6)[1:], True
    )
    assert not any(v[2] for v in _C.gemm_choices().values())  # nothing measured again


@needs_gemm_table
def test_forced_gemm_library_is_not_tuned(tuned_gemms):
    for name in ("aten", "onednn"):
        try:
            _C.set_gemm_backend(name)
        except RuntimeError:
            continue
        _C.reset_gemm_call_counts()
        _C.layer_norm_linear_forward(torch.randn(8, 16), None, None, torch.randn(24, 16), None, 1e-6)
        assert _C.gemm_call_counts()[name] == 1 and _C.gemm_choices() == {}


# --------------------------------------------------------------------------------------------------
# vit-fast tune


def test_tune_command(cache_dir, capsys):
    from vit_fast.cli import main as cli

    argv = [
        "tune",
        "--model",
        "vit_tiny_patch16_224",
        "--batch",
        "1",
        "--depth",
        "1",
        "--img-size",
        "32",
        "--json",
    ]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    ops = [r for r in rows if r["kind"] == "op"]
    if cpu_extension() is not None:  # the C++ backend vs the plain-PyTorch one, per op call shape
        assert {
            "mlp.mlp_forward",
            "attention.attention_forward",
            "layer_norm.layer_norm_linear_backward",
        } <= {r["op"] for r in ops}
        for r in ops:
            best = min(r["ms"], key=r["ms"].get)  # the default ("cpu") keeps ties within 3%
            assert set(r["ms"]) == {"cpu", "reference"}
            assert r["pick"] == best or (r["pick"] == "cpu" and r["ms"]["cpu"] * 0.97 <= r["ms"][best])
    if gemm_tuning.supported(_C):
        gemms = [r for r in rows if r["kind"] == "gemm"]
        # The GEMM kinds and the patch-embed projection (convolution vs gather + GEMM, csrc/patch_embed.cpp).
        assert {r["op"] for r in gemms} == {
            "gemm.linear",
            "gemm.tn",
            "gemm.patch_embed_fwd",
            "gemm.patch_embed_bwd",
        }
        assert all(r["pick"] == min(r["ms"], key=r["ms"].get) for r in gemms)
    entries = TuningCache(cache_mod.cpu_identity(), cache_dir).entries()
    assert {f"op/{r['op'].replace('.', '/', 1)}/{r['shape']}" for r in ops} <= set(entries)
    # The table form: a header and one line per row.
    assert cli.main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "candidates (median ms)" in text and len(text.strip().splitlines()) == 2 + len(rows)


@pytest.mark.skipif(cpu_extension() is None, reason="needs the C++ extension")
def test_attention_forward_and_backward_are_chosen_apart(cache_dir):
    from vit_fast import ops, reference

    qkv = torch.randn(2, 5, 3 * 16, requires_grad=True)
    decisions = []
    # forward: cpu 1 ms, reference 2 ms; backward: cpu 3 ms, reference 1 ms.
    with tuning_session(timer=QueueTimer(1.0, 2.0, 3.0, 1.0), on_decision=decisions.append, model="Test CPU"):
        ops.attention(qkv, 2).sum().backward()
    assert [(d.key.split("/")[2], d.pick) for d in decisions] == [
        ("attention_forward", "cpu"),
        ("attention_backward", "reference"),
    ]
    qkv64 = qkv.detach().double().requires_grad_()
    reference.attention(qkv64, 2).sum().backward()
    qkv32 = qkv.detach().requires_grad_()
    reference.attention(qkv32, 2).sum().backward()
    assert compare("dqkv", qkv.grad, qkv64.grad, qkv32.grad).ok


@pytest.mark.skipif(cpu_extension() is None, reason="needs the C++ extension")
def test_attention_forced_or_with_dropout_is_not_measured(cache_dir):
    from vit_fast import ops

    qkv = torch.randn(2, 5, 3 * 16, requires_grad=True)
    decisions = []
    with tuning_session(timer=QueueTimer(), on_decision=decisions.append, model="Test CPU"):
        with use_backend("cpu"):
            y = ops.attention(qkv, 2)
        y.sum().backward()  # outside the block: still the forward's forced backend, not measured
        ops.attention(qkv, 2, dropout_p=0.3).sum().backward()  # masks are per backend: not measured
    assert decisions == []


# ------------------------------------------------ Triton launch configs (the GEMM autotune space)


class _LaunchSpy:
    """Stands in for _gemm_kernel: records each launch's grid and tile, then launches the real one."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs["BLOCK_M"], kwargs["PERSISTENT"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def gemm_space(monkeypatch, cache_dir):
    """Three interpreter configs for every GEMM (normally one): the default 32x32x32, a 16x16x16 and
    a persistent 16x16x16 (its 2 programs loop over the tiles), and a spy on the launches."""
    from vit_fast.kernels import gemm

    space = [
        gemm.GemmConfig(32, 32, 32, 1, 1),
        gemm.GemmConfig(16, 16, 16, 1, 1),
        gemm.GemmConfig(16, 16, 16, 1, 1, True),
    ]
    monkeypatch.setattr(gemm, "INTERP_CANDIDATES", space)
    spy = _LaunchSpy(gemm._gemm_kernel)
    monkeypatch.setattr(gemm, "_gemm_kernel", spy)
    return gemm, spy


def _gemm_call(gemm, m=40, n=24, k=48):
    a, b = torch.randn(m, k), torch.randn(n, k)
    out = torch.empty(m, n)
    gemm.gemm(a, b, out)
    torch.testing.assert_close(out, a @ b.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("times,pick", [((3.0, 1.0, 2.0), 16), ((3.0, 2.0, 1.0), 16), ((1.0, 2.0, 3.0), 32)])
def test_triton_gemm_config_is_measured_and_cached(triton_backend, gemm_space, times, pick):
    gemm, spy = gemm_space
    timer, decisions = QueueTimer(*times), []
    with tuning_session(timer=timer, model="Fake GPU 80GB", on_decision=decisions.append):
        _gemm_call(gemm)
        chosen = spy.launches[-1]
        assert timer.calls == 3 and len(spy.launches) == 4  # three timed, then the real call
        assert chosen[1] == pick and chosen[2] == (times.index(min(times)) == 2)
        if chosen[2]:
            assert chosen[0] == (2,)  # persistent: 2 programs for 3 x 2 tiles
        _gemm_call(gemm)  # same shape: the cached pick, nothing timed
        assert timer.calls == 3 and spy.launches[-1] == chosen and decisions[-1].source == "cache"
        timer.ms = [1.0, 5.0, 5.0]
        _gemm_call(gemm, m=17)  # a new shape is measured again
        assert timer.calls == 6 and spy.launches[-1][1] == 32
    assert decisions[0].key.startswith("triton/gemm/40x24x48/float32>float32/")


def test_triton_gemm_config_off_and_failing_candidates(triton_backend, gemm_space, monkeypatch):
    gemm, spy = gemm_space
    timer = QueueTimer(9.0, 9.0, 9.0)
    monkeypatch.setenv("VIT_FAST_TUNE", "off")
    with tuning_session(timer=timer, model="Fake GPU 80GB"):
        _gemm_call(gemm)
    assert timer.calls == 0 and [launch[1] for launch in spy.launches] == [32]  # the default
    monkeypatch.setenv("VIT_FAST_TUNE", "on")
    bad = gemm.GemmConfig(16, 16, 0, 1, 1)  # BLOCK_K = 0 cannot compile: skipped, not fatal
    monkeypatch.setattr(gemm, "INTERP_CANDIDATES", [gemm.INTERP_CANDIDATES[0], bad])
    with tuning_session(timer=QueueTimer(5.0, 1.0), model="Fake GPU 80GB"):
        _gemm_call(gemm, m=9)
    assert spy.launches[-1][1] == 32


@pytest.mark.parametrize("persistent", [False, True])
def test_every_triton_gemm_config_computes_the_same(triton_backend, monkeypatch, persistent):
    """An MLP forward + backward (GEMMs with LN and GELU prologues, dGELU and residual epilogues)
    with a 16x16x16 (optionally persistent) config equals the default config's result."""
    from vit_fast import ops
    from vit_fast.kernels import gemm

    args = _mlp_args(m=40, d=32, f=48)
    x = args[0].reshape(5, 8, 32).detach().requires_grad_()

    def run():
        out = ops.layer_norm_mlp(x, *args[1:8])
        (g,) = torch.autograd.grad(out.square().sum(), x)
        return out.detach(), g

    ref = run()
    monkeypatch.setattr(gemm, "INTERP_CANDIDATES", [gemm.GemmConfig(16, 16, 16, 1, 1, persistent)])
    got = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gemm_autotune_space_is_in_the_aot_specs():
    """Every candidate of every arch ships as an AOT spec (the spill check compiles them:
    `python -m vit_fast.perf.aot gemm_`), the default also with 64-bit offsets."""
    from vit_fast.kernels import gemm

    names = {s.name for s in gemm.aot_specs()}
    for (arch, width), configs in gemm.GEMM_CANDIDATES.items():
        if width != 2:
            continue
        assert f"gemm_ln_row_bias_i64_bf16_sm{arch}" in names
        for config in configs[1:]:
            assert f"gemm_ln_row_bias_{config.name}_bf16_sm{arch}" in names
    assert any(c.persistent for configs in gemm.GEMM_CANDIDATES.values() for c in configs)
