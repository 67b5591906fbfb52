"""Multi-process check of the trainer, launched by torchrun (tests/test_ddp.py runs it):

    torchrun --standalone --nproc_per_node=2 scripts/ddp_check.py --out DIR [--fsdp] [--impl auto]

Each rank (1) takes its first local batch from the trainer's own sampler and loader, runs one
forward/backward through the DDP- (or FSDP2-) wrapped model and writes the synchronised gradients,
its sample indices and its local loss to DIR/grads_rank<r>.pt; then (2) runs `vit_fast.training.train`
for a few steps into DIR/run (rank 0 writes loss.csv and checkpoint.pt). The test repeats both on
one process with the concatenated batch and compares.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vit_fast.data import build_datasets
from vit_fast.testing import TINY_VIT_16PX
from vit_fast.training import TrainConfig, build_model, init_distributed, make_train_loader, train, wrap_model


def check_config(impl: str, fsdp: bool) -> TrainConfig:
    """The tiny run both sides use (the test imports this, so the two sides cannot drift apart)."""
    return TrainConfig(
        model="vit_tiny_patch16_224",
        impl=impl,
        dataset="synthetic",
        **TINY_VIT_16PX,
        num_train=64,
        num_val=16,
        batch_size=8,
        steps=5,
        lr=1e-3,
        warmup_steps=1,
        fsdp=fsdp,
        device="cpu",
        out=None,
        eval_every=0,
        ckpt_every=0,
        log_every=0,
        progress=False,
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are sharded DTensors: gather the whole tensor for comparison.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--impl", default="auto")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = check_config(args.impl, args.fsdp)

    env = init_distributed(cfg.device)
    if env.world_size < 2:
        raise SystemExit("run this under torchrun with --nproc_per_node >= 2")
    train_ds, _, info = build_datasets(
        cfg.dataset, cfg.img_size, None, None, num_train=cfg.num_train, num_val=cfg.num_val, seed=cfg.seed
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info)
    wrapped = wrap_model(model, env, cfg.fsdp)
    loader, sampler, _ = make_train_loader(train_ds, cfg, env)
    sampler.set_epoch(0)
    local_bs = cfg.batch_size // env.world_size
    indices = list(sampler)[:local_bs]
    x, y = next(iter(loader))
    loss = F.cross_entropy(wrapped(x), y)
    loss.backward()
    grads = {n: _full(q.grad).detach().clone() for n, q in model.named_parameters()}
    torch.save(
        {"grads": grads, "indices": indices, "loss": loss.item(), "world_size": env.world_size},
        out / f"grads_rank{env.rank}.pt",
    )
    dist.barrier()

    # (2) the real trainer, end to end, in the same process group.
    result = train(dataclasses.replace(cfg, out=str(out / "run"), ckpt_every=cfg.steps))
    if env.rank == 0:
        print("ddp_check losses:", result.losses)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
