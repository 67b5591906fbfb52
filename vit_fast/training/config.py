"""Run settings and results of `vit_fast.training.train`, and the names of the files a run writes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vit_fast.data import DATASETS, DatasetInfo
from vit_fast.nn.impl import IMPLS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"
LOSS_CSV = "loss.csv"
EVAL_CSV = "eval.csv"
LOSS_PNG = "loss.png"


@dataclass
class TrainConfig:
    """Everything a run depends on. Model fields left as None keep the named model's configuration.

    `batch_size` is the global batch (split evenly over ranks). `warmup_steps=None` means 10% of
    `steps`. `stop_at` ends the run after that many steps (checkpointing them) while the schedule
    still spans `steps`, as a job that is cut off and resumed later would. `out=None` writes nothing.
    """

    # model
    model: str = "vit_tiny_patch16_224"
    impl: str = "auto"
    img_size: int = 32
    # Defaults: a 2-block D=64 ViT on 32x32 digits with 8x8 patches (16 tokens) and mean pooling
    # reaches ~90% validation accuracy in 200 steps (about 15 s on 2 CPU cores); 4x4 patches (64
    # tokens) and class-token pooling learn markedly slower on this tiny data set.
    patch_size: int | None = 8
    depth: int | None = 2
    embed_dim: int | None = 64
    num_heads: int | None = 2
    mlp_ratio: float | None = None
    drop_path: float = 0.0
    global_pool: str | None = "avg"
    in_chans: int | None = None
    # data
    dataset: str = "digits"
    val_fraction: float = 0.2
    num_train: int = 4096
    num_val: int = 512
    num_workers: int = 0
    # optimisation
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 1.0
    precision: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    fsdp: bool = False
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    out: str | None = "runs/default"
    resume: str | None = None
    eval_every: int = 50
    ckpt_every: int = 100
    log_every: int = 20
    stop_at: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        for name in ("steps", "batch_size", "img_size"):
            positive_int(name)
        for name in ("patch_size", "depth", "embed_dim", "num_heads", "in_chans", "stop_at"):
            positive_int(name, allow_none=True)
        for name in ("eval_every", "ckpt_every", "log_every", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 disables), got {v!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"stop_at must be <= steps={self.steps}, got {self.stop_at}")

    def to_dict(self) -> dict[str, Any]:
        """Primitive-only copy (stored in checkpoints, which must load with weights_only=True)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    """What a run returns: per-step training losses of *this* invocation (global mean over ranks),
    the last evaluation, the trained (unwrapped) model, and where files went."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    val_loss: float | None = None
    val_acc: float | None = None
    final_step: int = 0
    images_per_s: float | None = None
    throughput_includes_warmup: bool = False
    model: nn.Module | None = None
    out_dir: Path | None = None
    info: DatasetInfo | None = None
