"""`vit-fast train`: train a small ViT on scikit-learn's digits (upsampled) or a synthetic set.

    vit-fast train --dataset digits --img-size 32 --patch-size 8 --depth 2 --embed-dim 64 --heads 2 \\
        --steps 200 --batch-size 64 --lr 3e-3 --impl auto --out runs/digits [--resume auto]

Multi-process: `torchrun --standalone --nproc_per_node=2 -m vit_fast.cli.train ...` (DDP; add
`--fsdp` for FSDP2). Writes <out>/loss.csv, eval.csv, loss.png and checkpoint.pt (rank 0 only).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vit_fast.data import DATASETS
from vit_fast.training import IMPLS, PRECISIONS, TrainConfig, train

_DEFAULTS = TrainConfig()


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `train` options (shared by the subcommand and the torchrun entry point)."""
    d = _DEFAULTS
    m = p.add_argument_group("model")
    m.add_argument("--model", default=d.model, help="model name (vit_fast.list_models())")
    m.add_argument("--impl", choices=IMPLS, default=d.impl, help="fused ops or the PyTorch reference")
    m.add_argument("--img-size", type=int, default=d.img_size)
    m.add_argument("--patch-size", type=int, default=d.patch_size)
    m.add_argument("--depth", type=int, default=d.depth)
    m.add_argument("--embed-dim", type=int, default=d.embed_dim)
    m.add_argument("--heads", dest="num_heads", type=int, default=d.num_heads)
    m.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio)
    m.add_argument("--drop-path", type=float, default=d.drop_path)
    m.add_argument("--global-pool", choices=("token", "avg"), default=d.global_pool)
    m.add_argument("--in-chans", type=int, default=d.in_chans, help="default: the dataset's channels")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="digits validation share")
    g.add_argument("--num-train", type=int, default=d.num_train, help="synthetic training samples")
    g.add_argument("--num-val", type=int, default=d.num_val, help="synthetic validation samples")
    g.add_argument("--workers", dest="num_workers", type=int, default=d.num_workers)
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps)
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all ranks)")
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--min-lr", type=float, default=d.min_lr)
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="default: 10%% of steps")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--clip-grad", type=_optional_float, default=d.clip_grad, help="max grad norm, or 'none'")
    o.add_argument(
        "--precision", choices=PRECISIONS, default=d.precision, help="auto: bf16/fp16 on CUDA, fp32 on CPU"
    )
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--compile-backend", default=d.compile_backend)
    o.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard (under torchrun)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--device", default=d.device, help="auto | cpu | cuda[:i]")
    r.add_argument("--out", default=d.out, help="output directory (logs, plot, checkpoint)")
    r.add_argument(
        "--resume",
        default=d.resume,
        help="checkpoint path, or 'auto': <out>/checkpoint.pt if it exists (else start fresh)",
    )
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="0: only at the end")
    r.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="0: only at the end")
    r.add_argument("--log-every", type=int, default=d.log_every, help="print a line every N steps")
    r.add_argument("--stop-at", type=int, default=d.stop_at, help="stop (and checkpoint) after this step")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object; the parsed args carry `func=run`."""
    p = subparsers.add_parser(
        "train", help="train a small ViT (digits or synthetic data)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments (fields the namespace lacks keep their defaults)."""
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> int:
    """Train as the arguments say; print a one-line summary (rank 0). Returns the exit code."""
    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        acc = "n/a" if result.val_acc is None else f"{100 * result.val_acc:.2f}%"
        ips = "n/a" if result.images_per_s is None else f"{result.images_per_s:.1f}"
        if result.images_per_s is not None and result.throughput_includes_warmup:
            ips += " (warm-up included: run > 2 steps for a steady rate)"
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        where = f", files in {result.out_dir}" if result.out_dir else ""
        print(f"done: step {result.final_step}, last loss {last}, val acc {acc}, img/s {ips}{where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m vit_fast.cli.train` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="vit-fast train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
