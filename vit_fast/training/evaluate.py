"""Validation loss and accuracy over a dataset, across ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vit_fast.training.distributed import DistEnv
from vit_fast.training.precision import autocast_for


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int, env: DistEnv, precision: torch.dtype | None
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole dataset, split across ranks.

    Rank r takes indices r, r+N, ...; shards are padded to equal length with masked-out samples so
    every rank runs the same number of forward passes (FSDP gathers parameters collectively per
    forward, so unequal counts would hang).
    """
    was_training = model.training
    model.eval()
    n = len(dataset)
    per_rank = math.ceil(n / env.world_size)
    idx = list(range(env.rank, n, env.world_size))
    valid = [1.0] * len(idx) + [0.0] * (per_rank - len(idx))
    idx = idx + [0] * (per_rank - len(idx))
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
    for start in range(0, per_rank, batch_size):
        chunk = idx[start : start + batch_size]
        xs, ys = zip(*(dataset[i] for i in chunk))
        x = torch.stack(xs).to(env.device)
        y = torch.stack(ys).to(env.device)
        w = torch.tensor(valid[start : start + batch_size], dtype=torch.float64, device=env.device)
        with autocast_for(env.device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none").double()
        correct = (logits.argmax(dim=-1) == y).double()
        totals += torch.stack([(loss * w).sum(), (correct * w).sum(), w.sum()])
    if env.distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
