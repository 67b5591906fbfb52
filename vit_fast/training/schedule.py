"""The optimizer (AdamW, no weight decay on biases, norms and embeddings) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vit_fast.training.config import TrainConfig


class WarmupCosine:
    """LR multiplier for LambdaLR: linear warmup over `warmup` steps to 1, then cosine decay to
    `min_ratio` at `total`. A plain class (not a closure) so LambdaLR's state_dict stores its fields."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            # (step + 1) so the first update is not wasted at lr = 0.
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay only on matrices (not biases, norm weights, pos/cls/register tokens,
    layer-scale), and the warmup-cosine LambdaLR."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, cfg.steps, cfg.min_lr / cfg.lr))
    return opt, sched
