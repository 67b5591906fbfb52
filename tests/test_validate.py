"""`vit-fast validate`: the budget planner, and a smoke of the whole flow on the CPU (tiny models).

The smoke runs the numerics part (every fused op and its gradients against float64, Triton in the
interpreter and the C++ backend where built) and the model benchmarks (timm eager, torch.compile with
aot_eager, fused) at tiny sizes; it checks the report's structure, not any timing.
"""

from __future__ import annotations

import json

import pytest

from vit_fast.cli import main as cli
from vit_fast.cli import validate


def _planner(budget: float) -> validate.Planner:
    minimum = {n: cpu for n, _, _, cpu in validate.PARTS}
    importance = {n: i for n, i, *_ in validate.PARTS}
    return validate.Planner(budget, minimum, importance, start=0.0)


def test_planner_cuts_the_least_important_parts_first():
    names = [n for n, *_ in validate.PARTS]
    minimum = {n: cpu for n, _, _, cpu in validate.PARTS}
    # Enough for everything: every part runs.
    plan = _planner(sum(minimum.values()) + 1)
    assert all(plan.allows(n, names[names.index(n) + 1 :], now=0.0) for n in names)
    # Only enough for the most important part ("numerics") plus the models: the tests, the tuning
    # and the per-op benchmarks are cut, although the tests come before the models.
    plan = _planner(minimum["numerics"] + minimum["models"] + 1)
    assert plan.allows("numerics", names[1:], now=0.0)
    spent = minimum["numerics"]  # the numerics took their minimum
    assert not plan.allows("tests", names[2:], now=spent)  # would eat the models' reserve
    assert not plan.allows("tune", names[3:], now=spent)
    assert plan.allows("models", names[4:], now=spent)
    assert not plan.allows("ops", [], now=spent + minimum["models"])
    # A part's share leaves the other pending parts their minimums.
    plan = _planner(200.0)
    assert plan.share("tests", ["tune", "models", "ops"], now=0.0) == 200.0 - (
        minimum["tune"] + minimum["models"] + minimum["ops"]
    )
    # ... and never more than its cap.
    assert _planner(5000.0).share("tests", [], now=0.0) == validate.MAX_SHARE["tests"]


def test_validate_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--skip"):
        cli.main(["validate", "--device", "cpu", "--skip", "everything"])
    with pytest.raises(SystemExit, match="--budget-s"):
        cli.main(["validate", "--device", "cpu", "--budget-s", "0"])


@pytest.mark.slow  # compiles timm with inductor (cold cache: 1-5 min on 2 cores)
def test_validate_smoke_on_cpu(tmp_path, capsys):
    out_dir = tmp_path / "report"
    argv = ["validate", "--device", "cpu", "--models", "vit_small_patch16_224", "--batch", "1"]
    rc = cli.main([*argv, "--skip", "tests,tune,ops", "--budget-s", "300", "--out", str(out_dir)])
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "validate.json").read_text())
    assert rc == 0, report["parts"]
    assert (out_dir / "validate.md").read_text().startswith("# vit-fast validate")
    env = report["environment"]
    assert {"torch", "triton", "device"} <= set(env)
    assert report["settings"]["tiny"] is True and "TINY" in report["settings"]["note"]
    numerics = report["parts"]["numerics"]
    assert numerics["status"] == "pass"
    from vit_fast.perf.bench import OPS

    assert {c["op"] for c in numerics["checks"]} == set(OPS)
    assert all(c["ok"] for c in numerics["checks"])
    rows = report["parts"]["models"]["rows"]
    got = {(r["impl"], r["mode"]) for r in rows}
    assert got == {(i, m) for i in ("timm", "timm-compile", "fused") for m in ("inference", "train")}
    assert all(r["median_ms"] > 0 and not r["error"] for r in rows)
    for part in ("tests", "tune", "ops"):
        assert report["parts"][part]["status"] == "skipped (--skip)"
    # the short table comes last
    assert "fused/timm" in printed.strip().splitlines()[-4] or "fused/timm" in printed
    assert printed.strip().splitlines()[-1].startswith("TINY")


def test_numerics_in_a_fresh_process_runs_the_interpreter():
    """`vit-fast validate` started from the console script has imported the kernels compiled
    (importing vit_fast does), so on a CPU the numerics part re-runs in a process started with
    TRITON_INTERPRET=1: every op passes there on Triton and on the C++ backend."""
    import torch

    result = validate._numerics_in_fresh_process(torch.float32, 300.0)
    assert result["status"] == "pass", result
    assert {c["backend"] for c in result["checks"]} >= {"triton"}
    assert all(c["ok"] for c in result["checks"])
