"""The data order: a resumable per-rank sampler (a pure function of seed and epoch) and the train loader."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vit_fast.training.config import TrainConfig
from vit_fast.training.distributed import DistEnv


class ResumableSampler(Sampler[int]):
    """This rank's indices of a DistributedSampler epoch, optionally starting `skip` samples in (to
    resume mid-epoch without loading the batches already trained on)."""

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int) -> None:
        # drop_last: every rank gets the same number of samples, so collectives stay in lock-step.
        self.inner = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def make_train_loader(
    dataset: Dataset, cfg: TrainConfig, env: DistEnv
) -> tuple[DataLoader, ResumableSampler, int]:
    """(loader, sampler, steps_per_epoch) with local batch = batch_size / world_size."""
    if cfg.batch_size % env.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {env.world_size}")
    local_bs = cfg.batch_size // env.world_size
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(dataset)})")
    sampler = ResumableSampler(dataset, env, cfg.seed)
    # A private generator: DataLoader draws a base seed from it on every new iterator, and drawing
    # from the global RNG instead would make the model's RNG stream depend on epoch boundaries.
    loader = DataLoader(
        dataset,
        batch_size=local_bs,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=env.device.type == "cuda",
    )
    return loader, sampler, steps_per_epoch
