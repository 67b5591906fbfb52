"""The training loop: builds the model and data, runs the steps, evaluates, logs and checkpoints."""

from __future__ import annotations

import csv
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vit_fast.data import DatasetInfo, build_datasets
from vit_fast.models import create_model
from vit_fast.training.checkpoint import (
    load_checkpoint,
    load_model_and_optim_state,
    model_and_optim_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vit_fast.training.config import CHECKPOINT_NAME, EVAL_CSV, LOSS_CSV, TrainConfig, TrainResult
from vit_fast.training.distributed import DistEnv, all_mean, init_distributed, wrap_model
from vit_fast.training.evaluate import evaluate
from vit_fast.training.logs import plot_loss_curve, progress_bar, truncate_csv
from vit_fast.training.precision import autocast_for, resolve_precision
from vit_fast.training.sampler import make_train_loader
from vit_fast.training.schedule import build_optimizer


def build_model(cfg: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The ViT of `cfg` for the dataset's channels and classes (None fields keep the model's config)."""
    kwargs: dict[str, Any] = {
        "img_size": cfg.img_size,
        "in_chans": info.in_chans,
        "num_classes": info.num_classes,
        "drop_path_rate": cfg.drop_path,
    }
    for key, name in (
        ("patch_size", "patch_size"),
        ("depth", "depth"),
        ("embed_dim", "embed_dim"),
        ("num_heads", "num_heads"),
        ("mlp_ratio", "mlp_ratio"),
        ("global_pool", "global_pool"),
    ):
        if getattr(cfg, name) is not None:
            kwargs[key] = getattr(cfg, name)
    return create_model(cfg.model, impl=cfg.impl, **kwargs)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by `cfg`; see the module docstring."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        if env.created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    if cfg.fsdp and not env.distributed:
        raise ValueError("fsdp=True shards over processes: launch with torchrun --nproc_per_node >= 2")
    amp_dtype = resolve_precision(cfg.precision, env.device)
    out_dir = Path(cfg.out) if cfg.out else None
    write = env.is_main and out_dir is not None

    train_ds, val_ds, info = build_datasets(
        cfg.dataset,
        cfg.img_size,
        cfg.in_chans,
        None,
        val_fraction=cfg.val_fraction,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
        seed=cfg.seed,
    )
    # Same seed on every rank -> identical initial weights (DDP would broadcast them anyway; FSDP
    # shards whatever each rank built, so they must agree).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info).to(env.device)
    raw = model
    if cfg.compile:
        # In place: parameter names and state-dict keys stay those of the plain model.
        raw.compile(backend=cfg.compile_backend)
    model = wrap_model(raw, env, cfg.fsdp)
    opt, sched = build_optimizer(raw, cfg)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    # Per-rank streams for dropout / drop-path after the shared init.
    torch.manual_seed(cfg.seed + 1 + env.rank)
    random.seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)  # noqa: NPY002

    start = 0
    if cfg.resume:
        ckpt_path = Path(cfg.resume)
        if cfg.resume == "auto":
            ckpt_path = (out_dir or Path(".")) / CHECKPOINT_NAME
        if cfg.resume != "auto" or ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            load_model_and_optim_state(raw, opt, ckpt["model"], ckpt["optimizer"], cfg.fsdp)
            sched.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start = int(ckpt["step"])
            states = ckpt["rng"]
            set_rng_state(states[env.rank] if len(states) == env.world_size else states[0])
            if start >= cfg.steps:
                raise ValueError(
                    f"checkpoint {str(ckpt_path)!r} is at step {start}, nothing left of steps={cfg.steps}"
                )

    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_csv(out_dir / LOSS_CSV, ["step", "loss", "lr", "grad_norm", "images_per_s"], start)
        truncate_csv(out_dir / EVAL_CSV, ["step", "val_loss", "val_acc"], start)

    loader, sampler, steps_per_epoch = make_train_loader(train_ds, cfg, env)
    local_bs = cfg.batch_size // env.world_size
    end = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    result = TrainResult(out_dir=out_dir, info=info, final_step=start)
    bar = progress_bar(end, start, cfg.progress and env.is_main)
    batches: Iterator | None = None
    timed_images, timed_s = 0, 0.0
    all_images, all_s = 0, 0.0
    model.train()

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = model_and_optim_state(raw, opt, cfg.fsdp)
        rngs = [None] * env.world_size
        if env.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if write:
            state = {
                "model": model_sd,
                "optimizer": optim_sd,
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "step": step,
                "rng": rngs,
                "config": cfg.to_dict(),
            }
            save_checkpoint(out_dir / CHECKPOINT_NAME, state)

    for step in range(start, end):
        epoch, within = divmod(step, steps_per_epoch)
        if batches is None or within == 0:
            sampler.set_epoch(epoch, skip=within * local_bs)
            batches = iter(loader)
        x, y = next(batches)
        x = x.to(env.device, non_blocking=True)
        y = y.to(env.device, non_blocking=True)
        t0 = time.perf_counter()
        with autocast_for(env.device, amp_dtype):
            logits = model(x)
        # The loss in fp32 whatever the autocast dtype: log-softmax over classes is precision-sensitive.
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if cfg.clip_grad is not None:
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in raw.parameters() if p.grad is not None])
        lr = opt.param_groups[0]["lr"]
        scaler.step(opt)
        scaler.update()
        sched.step()
        loss_val = all_mean(loss.detach(), env).item()
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        gn = float(grad_norm)
        dt = time.perf_counter() - t0
        if step - start >= 2:  # skip warm-up steps (allocation, compilation) in the throughput
            timed_images += cfg.batch_size
            timed_s += dt
        all_images += cfg.batch_size
        all_s += dt
        ips = cfg.batch_size / dt if dt > 0 else float("nan")
        done = step + 1
        result.steps.append(done)
        result.losses.append(loss_val)
        result.lrs.append(lr)
        result.final_step = done
        if write:
            with open(out_dir / LOSS_CSV, "a", newline="") as f:
                csv.writer(f).writerow([done, f"{loss_val:.8g}", f"{lr:.6g}", f"{gn:.6g}", f"{ips:.2f}"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
        if env.is_main and cfg.log_every and done % cfg.log_every == 0:
            msg = (
                f"step {done}/{cfg.steps} loss {loss_val:.4f} lr {lr:.3e} grad_norm {gn:.3f} img/s {ips:.1f}"
            )
            (bar.write if bar is not None else print)(msg)

        last = done == end
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            vl, va = evaluate(model, val_ds, max(local_bs, 64), env, amp_dtype)
            result.val_loss, result.val_acc = vl, va
            if write:
                with open(out_dir / EVAL_CSV, "a", newline="") as f:
                    csv.writer(f).writerow([done, f"{vl:.8g}", f"{va:.6f}"])
            if env.is_main:
                msg = f"step {done}: val loss {vl:.4f} val acc {100 * va:.2f}%"
                (bar.write if bar is not None else print)(msg)
        if out_dir is not None and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or last):
            checkpoint(done)

    if bar is not None:
        bar.close()
    if write and result.steps:
        plot_loss_curve(out_dir)
    # Runs too short to have steps past the warm-up report their whole-run rate, flagged as such.
    result.throughput_includes_warmup = timed_s <= 0
    if timed_s > 0:
        result.images_per_s = timed_images / timed_s
    elif all_s > 0:
        result.images_per_s = all_images / all_s
    result.model = raw
    return result
