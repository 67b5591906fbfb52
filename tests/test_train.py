"""The training library (vit_fast.training, vit_fast.data) and the `vit-fast train` subcommand module.

Models are tiny (16x16 images, 4x4 patches, D=32, depth 2) so each test takes seconds on 2 shared
CPU cores, including with the Triton kernels in the interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from vit_fast.cli import train as cli_train
from vit_fast.data import SyntheticImages, build_datasets, digits_datasets
from vit_fast.ops import use_backend
from vit_fast.ops.backend import backend_fns, cpu_extension
from vit_fast.testing import TINY_VIT_16PX
from vit_fast.training import (
    CHECKPOINT_NAME,
    EVAL_CSV,
    LOSS_CSV,
    LOSS_PNG,
    TrainConfig,
    WarmupCosine,
    build_model,
    load_checkpoint,
    read_csv,
    save_checkpoint,
    train,
)

TINY = dict(
    **TINY_VIT_16PX,
    batch_size=16,
    device="cpu",
    progress=False,
    log_every=0,
    eval_every=0,
    ckpt_every=0,
)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


# -- data --------------------------------------------------------------------------------------------
def test_digits_split_is_deterministic_normalised_and_disjoint() -> None:
    tr, va, info = digits_datasets(img_size=16, val_fraction=0.2)
    tr2, va2, _ = digits_datasets(img_size=16, val_fraction=0.2)
    assert (info.num_train, info.num_val, info.num_classes, info.in_chans) == (1438, 359, 10, 1)
    x, y = tr.tensors
    assert x.shape == (1438, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, tr2.tensors[0]) and torch.equal(va.tensors[0], va2.tensors[0])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4  # train-split statistics
    assert set(y.tolist()) == set(range(10)) and set(va.tensors[1].tolist()) == set(range(10))
    # No image appears in both splits (digits has a few exact duplicates; compare as a multiset).
    tr_rows = {tuple(r.tolist()) for r in x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in tr_rows for r in va.tensors[0].flatten(1))
    assert overlap <= 5
    rgb, _, info3 = digits_datasets(img_size=16, in_chans=3)
    assert rgb.tensors[0].shape[1] == 3 and info3.in_chans == 3
    assert torch.equal(rgb.tensors[0][:, 1], x[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(img_size=4), "img_size"),
        (dict(img_size=16, in_chans=0), "in_chans"),
        (dict(img_size=16, val_fraction=1.0), "val_fraction"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        digits_datasets(**kwargs)


def test_synthetic_is_reproducible_and_learnable() -> None:
    tr, va, info = build_datasets("synthetic", 16, 3, 5, num_train=200, num_val=100)
    assert info.in_chans == 3 and info.num_classes == 5 and len(tr) == 200 and len(va) == 100
    x0, y0 = tr[7]
    x1, y1 = SyntheticImages(200, 16, 3, 5, seed=0)[7]
    assert x0.shape == (3, 16, 16) and torch.equal(x0, x1) and int(y0) == int(y1)
    assert not torch.equal(tr[0][0], va[0][0])  # validation is a different stream
    assert torch.equal(tr.templates, va.templates)  # ... of the same task
    # The rule is learnable: the nearest-template classifier is far above chance (20%).
    xs, ys = zip(*(va[i] for i in range(len(va))))
    scores = torch.einsum("nchw,kchw->nk", torch.stack(xs), tr.templates)
    acc = (scores.argmax(1) == torch.stack(ys)).float().mean().item()
    assert acc > 0.9
    with pytest.raises(IndexError):
        tr[200]
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticImages(10, num_classes=1)
    with pytest.raises(ValueError, match="dataset"):
        build_datasets("cifar", 16)


# -- configuration and schedule ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("impl", "triton"),
        ("dataset", "mnist"),
        ("precision", "fp8"),
        ("lr", 0.0),
        ("min_lr", 1.0),
        ("warmup_steps", 1000),
        ("clip_grad", 0.0),
        ("stop_at", 10_000),
        ("eval_every", -1),
        ("drop_path", 1.0),
    ],
)
def test_config_rejects_bad_fields(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        train(dataclasses.replace(tiny(), **{field: value}))


def test_unsupported_run_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        train(tiny(precision="fp16", out=None, steps=1))
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny(batch_size=4096, out=None, steps=1))
    with pytest.raises(ValueError, match="fsdp"):
        train(tiny(fsdp=True, out=None, steps=1))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        train(tiny(resume=str(tmp_path / "missing.pt"), out=None, steps=1))


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(20) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 25))


# -- the "Done when": fused and reference train the same ---------------------------------
def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(None, id="auto-backend"),
        pytest.param("triton", id="triton-backend", marks=pytest.mark.slow),
    ],
)
def test_fused_and_reference_converge_identically(backend: str | None) -> None:
    """30 AdamW steps on digits from the same seed: per-step losses and final parameters within 1e-4.

    The fused ops run on whatever backend is active (C++ on CPU when built, else the Triton kernels
    in the interpreter under TRITON_INTERPRET=1); the slow variant forces Triton.
    """
    cfg = tiny(steps=30, lr=3e-3, warmup_steps=3, dataset="digits", out=None, global_pool="token")
    torch.manual_seed(cfg.seed)
    init = _params(build_model(cfg, digits_datasets(cfg.img_size)[2]))
    ref = train(dataclasses.replace(cfg, impl="reference"))
    if backend is None:
        if cpu_extension() is not None:
            # "Whatever backend is active" is the C++ one here: no earlier test may have left the
            # choice cache pointing elsewhere (one did, and this test ran the Triton interpreter).
            for family in ("patch_embed", "attention", "layer_norm", "mlp"):
                assert backend_fns(torch.device("cpu"), family, torch.float32) is cpu_extension(), family
        fused = train(dataclasses.replace(cfg, impl="fused"))
    else:
        with use_backend(backend):
            fused = train(dataclasses.replace(cfg, impl="fused"))
    assert len(ref.losses) == len(fused.losses) == 30
    diffs = [abs(a - b) for a, b in zip(fused.losses, ref.losses)]
    assert max(diffs) <= 1e-4, f"per-step loss differences {diffs}"
    p_ref, p_fused = _params(ref.model), _params(fused.model)
    assert p_ref.keys() == p_fused.keys() == init.keys()
    # The weights moved far more than the tolerance, so agreeing within it is not agreeing on nothing.
    assert max((p_ref[k] - init[k]).abs().max().item() for k in init) > 1e-2
    worst = max((p_fused[k] - p_ref[k]).abs().max().item() for k in p_ref)
    assert worst <= 1e-4, f"final parameters differ by {worst}"


# -- training works ------------------------------------------------------------------------------------
def test_training_on_digits_beats_chance(tmp_path: Path) -> None:
    # 8x8 patches of the 16x16 upsampled digits (4 tokens): learns in seconds; 60 steps x 32 images
    # is 1.3 epochs and reached 82% in a trial run.
    cfg = tiny(
        steps=60, batch_size=32, patch_size=8, lr=1e-2, warmup_steps=5, weight_decay=0.0, clip_grad=None,
        global_pool="avg", impl="reference", out=str(tmp_path),
    )  # fmt: skip
    res = train(cfg)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert res.val_acc is not None and res.val_acc > 0.5  # chance is 0.1
    ev = read_csv(tmp_path / EVAL_CSV)
    assert ev["step"] == [60.0] and ev["val_acc"][0] == pytest.approx(res.val_acc, abs=1e-6)


def test_bf16_autocast_on_cpu_trains() -> None:
    base = tiny(steps=4, dataset="synthetic", num_train=64, num_val=16, out=None, impl="reference")
    fp32 = train(base)
    bf16 = train(dataclasses.replace(base, precision="bf16"))
    assert all(math.isfinite(v) for v in bf16.losses)
    # Same data and init, so bf16 tracks fp32 to bf16 rounding (3 significant digits), not exactly.
    assert bf16.losses != fp32.losses
    assert max(abs(a - b) for a, b in zip(bf16.losses, fp32.losses)) < 0.05


def test_compiled_model_trains_like_eager() -> None:
    # aot_eager traces forward and backward through AOTAutograd (as inductor would) without the
    # C++ compile time, so the test checks the tracing, not inductor's codegen.
    base = tiny(steps=3, dataset="synthetic", num_train=48, num_val=16, out=None, impl="auto")
    eager = train(base)
    compiled = train(dataclasses.replace(base, compile=True, compile_backend="aot_eager"))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=0, atol=1e-5)


class NotAllowed:
    """A class weights_only loading must refuse to rebuild."""


# -- checkpoints, logs, resume ---------------------------------------------------------------------
def test_resume_continues_exactly_and_logs_are_written(tmp_path: Path) -> None:
    # 64 samples / batch 16 = 4 steps per epoch, so the interruption at step 6 is mid-epoch 2; drop
    # path draws from the global RNG every step, so the RNG state must be restored too.
    cfg = tiny(
        steps=10, dataset="synthetic", num_train=64, num_val=16, drop_path=0.2, impl="reference",
        eval_every=5, ckpt_every=3,
    )  # fmt: skip
    full = train(dataclasses.replace(cfg, out=str(tmp_path / "full")))
    cut = train(dataclasses.replace(cfg, out=str(tmp_path / "cut"), stop_at=7))
    assert cut.steps == list(range(1, 8))
    # stop_at=7 checkpoints step 7 (besides the periodic one at 6); simulate a crash after logging
    # step 8 by appending a stale row the resumed run must drop.
    with open(tmp_path / "cut" / LOSS_CSV, "a") as f:
        f.write("8,99.0,0.001,1.0,1.0\n")
    resumed = train(dataclasses.replace(cfg, out=str(tmp_path / "cut"), resume="auto"))
    assert resumed.steps == [8, 9, 10]
    assert cut.losses == full.losses[:7]
    assert resumed.losses == full.losses[7:], (resumed.losses, full.losses[7:])
    for k, v in _params(full.model).items():
        assert torch.equal(_params(resumed.model)[k], v), k

    ck = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert ck["step"] == 10 and set(ck) >= {"model", "optimizer", "scheduler", "rng", "config"}
    assert ck["config"]["drop_path"] == 0.2 and ck["scheduler"]["last_epoch"] == 10
    assert not list((tmp_path / "cut").glob(".*tmp*"))  # the atomic save left no temporary file

    log = read_csv(tmp_path / "cut" / LOSS_CSV)
    assert log["step"] == [float(s) for s in range(1, 11)]
    torch.testing.assert_close(torch.tensor(log["loss"]), torch.tensor(full.losses), rtol=1e-7, atol=0)
    # The cut run evaluated at its last step (7) as well; that row is kept, being before the checkpoint.
    assert read_csv(tmp_path / "cut" / EVAL_CSV)["step"] == [5.0, 7.0, 10.0]
    png = (tmp_path / "cut" / LOSS_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_checkpoint_is_weights_only_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.ones(3), "step": 1})
    save_checkpoint(path, {"a": torch.zeros(3), "step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    # An object that weights_only loading refuses is refused (no arbitrary code from checkpoints).
    torch.save({"obj": NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(tmp_path / "bad.pt")


# -- the CLI subcommand module ---------------------------------------------------------------------
def test_cli_subcommand_trains_and_resumes(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="vit-fast")
    cli_train.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "run"
    common = [
        "train", "--dataset", "synthetic", "--num-train", "32", "--num-val", "16", "--img-size", "16",
        "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--heads", "2", "--batch-size", "16",
        "--lr", "1e-3", "--impl", "reference", "--out", str(out), "--no-progress", "--steps", "4",
        "--clip-grad", "none", "--eval-every", "0",
    ]  # fmt: skip
    args = parser.parse_args([*common, "--stop-at", "2"])
    assert args.func is cli_train.run and args.clip_grad is None and args.num_heads == 2
    assert args.func(args) == 0
    assert "step 2" in capsys.readouterr().out
    args = parser.parse_args([*common, "--resume", "auto"])
    assert args.func(args) == 0
    assert "step 4" in capsys.readouterr().out
    assert read_csv(out / LOSS_CSV)["step"] == [1.0, 2.0, 3.0, 4.0]
    assert (out / LOSS_PNG).is_file() and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--impl", "nope"])


def test_one_step_run_reports_a_rate_and_plots_its_point(tmp_path: Path, monkeypatch) -> None:
    """A run too short for a steady rate still reports one (flagged as including warm-up), as
    loss.csv does, and its loss plot draws the single point (a line alone needs two)."""
    from matplotlib.axes import Axes

    drawn = []
    plot = Axes.plot

    def spy(self, *args, **kwargs):
        lines = plot(self, *args, **kwargs)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(Axes, "plot", spy)
    result = train(tiny(steps=1, dataset="synthetic", num_train=32, num_val=16, out=str(tmp_path)))
    assert result.images_per_s is not None and result.images_per_s > 0
    assert result.throughput_includes_warmup
    assert result.images_per_s == pytest.approx(read_csv(tmp_path / LOSS_CSV)["images_per_s"][0], rel=1e-2)
    train_line = next(line for line in drawn if line.get_label() == "train loss")
    assert len(train_line.get_xdata()) == 1 and train_line.get_marker() not in (None, "None", "")
    assert (tmp_path / LOSS_PNG).is_file()
    longer = train(tiny(steps=4, dataset="synthetic", num_train=32, num_val=16))
    assert not longer.throughput_includes_warmup
