"""Datasets for training and benchmarking the ViT: scikit-learn's digits, upsampled, and a synthetic set.

Both are ordinary `torch.utils.data.Dataset`s returning `(image [C, S, S] float32, label int64)`.

- `digits_datasets`: the 1797 8x8 grayscale digits that ship with scikit-learn (no download),
  scaled to [0, 1], bilinearly upsampled to `img_size`, normalised with the *training* split's mean
  and std, and split train/val by a fixed permutation (the split never depends on the training seed,
  so runs with different seeds are evaluated on the same images).
- `SyntheticImages` (`build_datasets("synthetic", ...)` for a train/val pair): random images with a learnable rule (each class has a smooth template; an
  image is its class template plus noise). Sample `i` is generated on the fly from `(seed, i)`, so
  any size costs no memory and every process (DDP ranks, resumed runs) sees identical samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "synthetic")

#: The digits split is fixed by this seed, independent of the training seed.
DIGITS_SPLIT_SEED = 1234


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset."""

    name: str
    in_chans: int
    num_classes: int
    img_size: int
    num_train: int
    num_val: int


def _load_digits_arrays() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a test/bench dependency
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # [N, 8, 8], values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def digits_datasets(
    img_size: int = 32, in_chans: int = 1, val_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """scikit-learn digits as (train, val, info).

    images: [N, in_chans, img_size, img_size] float32, normalised to zero mean / unit std over the
    training split (channels are copies when in_chans > 1, so a 3-channel model can train on them);
    labels: [N] int64 in 0..9. The split is a fixed permutation (DIGITS_SPLIT_SEED).
    """
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8 (digits are 8x8), got {img_size!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    images, labels = _load_digits_arrays()
    x = (images / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_val = round(len(x) * val_fraction)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    # Statistics from the training images only, so nothing of the validation set leaks into training.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = ((x - mean) / std).expand(-1, in_chans, -1, -1).contiguous()
    train = TensorDataset(x[train_idx], labels[train_idx])
    val = TensorDataset(x[val_idx], labels[val_idx])
    info = DatasetInfo("digits", in_chans, 10, img_size, len(train_idx), len(val_idx))
    return train, val, info


class SyntheticImages(Dataset):
    """`num_samples` random images [in_chans, img_size, img_size] float32 with labels [int64].

    Class c has a smooth template (4x4 Gaussian noise, bilinearly upsampled, unit std); sample i is
    `signal * template[label_i] + noise * N(0, 1)` with label_i uniform. Everything about sample i
    is drawn from a generator seeded with (seed, offset + i), so samples are reproducible in any
    order; `offset` gives a disjoint stream with the same templates (the validation set).
    """

    def __init__(
        self,
        num_samples: int,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        signal: float = 1.0,
        noise: float = 1.0,
        offset: int = 0,
    ) -> None:
        for name, v in (("num_samples", num_samples), ("img_size", img_size), ("in_chans", in_chans)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_samples = num_samples
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.seed = seed
        self.noise = noise
        self.offset = offset
        gen = torch.Generator().manual_seed(seed)
        t = torch.randn(num_classes, in_chans, 4, 4, generator=gen)
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False)
        t = t / t.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        self.templates = signal * t

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        # A large odd multiplier keeps (seed, index) pairs from colliding for nearby seeds.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index + 1)
        label = int(torch.randint(self.num_classes, (), generator=gen))
        img = self.templates[label] + self.noise * torch.randn(self.templates.shape[1:], generator=gen)
        return img, torch.tensor(label, dtype=torch.int64)


def build_datasets(
    name: str,
    img_size: int,
    in_chans: int | None = None,
    num_classes: int | None = None,
    *,
    val_fraction: float = 0.2,
    num_train: int = 4096,
    num_val: int = 512,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Dataset by name ('digits' | 'synthetic') -> (train, val, info). None means the dataset's default
    (digits: 1 channel, 10 classes; synthetic: 3 channels, 10 classes). Synthetic train and val
    share the class templates (same seed) and draw disjoint sample streams (validation sample i
    uses the stream of index num_train + i); num_train, num_val and seed are synthetic's only."""
    if name == "digits":
        if num_classes not in (None, 10):
            raise ValueError(f"digits has 10 classes, got num_classes={num_classes}")
        return digits_datasets(img_size, in_chans or 1, val_fraction)
    if name == "synthetic":
        chans, classes = in_chans or 3, num_classes or 10
        train = SyntheticImages(num_train, img_size, chans, classes, seed=seed)
        val = SyntheticImages(num_val, img_size, chans, classes, seed=seed, offset=num_train)
        return train, val, DatasetInfo("synthetic", chans, classes, img_size, num_train, num_val)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
