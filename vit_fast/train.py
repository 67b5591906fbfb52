"""Training library: a small, honest ViT trainer built only from stock PyTorch pieces.

AdamW with decoupled weight decay (none on biases, norms and embeddings), a linear-warmup + cosine
learning-rate schedule (`torch.optim.lr_scheduler.LambdaLR`), mixed precision through
`torch.autocast` (bf16 on CPU or CUDA, fp16 on CUDA with `torch.amp.GradScaler`), gradient
clipping, a tqdm progress bar, a per-step CSV log, evaluation accuracy, atomic checkpoints that
resume bit-for-bit (model, optimizer, scheduler, scaler, step and every RNG state; loaded with
`torch.load(weights_only=True)`, so they hold only tensors and primitive containers), and a loss
curve written as CSV and PNG.

Distributed: launched by `torchrun`, the trainer reads WORLD_SIZE/RANK/LOCAL_RANK, initialises the
process group (gloo on CPU, nccl on CUDA), wraps the model in DistributedDataParallel (or shards it
with FSDP2 `fully_shard` when asked) and feeds each rank through a DistributedSampler. `batch_size`
is the *global* batch: with N ranks each takes batch_size / N samples, and the N local batches
together are exactly the batch a single process would see at that step, so 1-process and N-process
runs follow the same trajectory (up to floating-point reduction order). Rank 0 writes all files.

Data order is a pure function of (seed, epoch) via DistributedSampler's own generator, and nothing in
the data path draws from the global RNG, which is what makes "save at step k, resume" reproduce an
uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vit_fast.data import DATASETS, DatasetInfo, build_datasets
from vit_fast.models import create_model

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMPLS = ("auto", "fused", "reference")
CHECKPOINT_NAME = "checkpoint.pt"
LOSS_CSV = "loss.csv"
EVAL_CSV = "eval.csv"
LOSS_PNG = "loss.png"


# -- configuration ---------------------------------------------------------------------------------
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


# -- schedule ----------------------------------------------------------------------------------------
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


# -- distributed ------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun) and its device;
    `created_group` says whether the trainer initialised the process group (and so destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK; with more than one process, join (or create) the
    default process group: nccl for CUDA devices, gloo for CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    created = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistEnv(rank, world, local, dev, created)


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 when `fsdp`) around `model` when running on more than one process."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer block, then the root (embeddings, final norm, head), as FSDP2 advises.
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for blk in getattr(model, "blocks", []):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def _all_mean(value: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


# -- data ----------------------------------------------------------------------------------------------
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
        with _autocast(env.device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none").double()
        correct = (logits.argmax(dim=-1) == y).double()
        totals += torch.stack([(loss * w).sum(), (correct * w).sum(), w.sum()])
    if env.distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


# -- precision -------------------------------------------------------------------------------------
def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `name` on `device` (None = plain fp32). 'auto': bf16 on CUDA devices
    that support it, fp16 on older CUDA devices, fp32 on CPU (bf16 on CPU is opt-in: it is slower
    than fp32 on CPUs without bf16 instructions)."""
    if name == "fp32":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (use 'bf16' on CPU)")
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- RNG and checkpoints --------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), Python and NumPy RNG states, as tensors and primitives only."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global stream is what third-party code draws from
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`: a crash
    mid-write leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; weights_only=True, so no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def _model_and_optim_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Full (unsharded) tensors on CPU, so the file is an ordinary state dict timm can load.
        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), opt.state_dict()


def _load_model_and_optim_state(
    model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict, fsdp: bool
) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True, strict=True),
        )  # fmt: skip
        return
    model.load_state_dict(model_sd, strict=True)
    opt.load_state_dict(optim_sd)


# -- logs ------------------------------------------------------------------------------------------
def _truncate_csv(path: Path, header: list[str], keep_until: int) -> None:
    """Start `path` fresh with `header`, keeping rows with step <= keep_until (a resumed run rewrites
    the steps an interrupted run logged after its last checkpoint)."""
    rows: list[list[str]] = []
    if keep_until > 0 and path.is_file():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            rows = [r for r in reader if r and int(r[0]) <= keep_until]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def read_csv(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a log CSV as float lists."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols: dict[str, list[float]] = {k: [] for k in reader.fieldnames or []}
        for row in reader:
            for k, v in row.items():
                cols[k].append(float(v))
    return cols


def plot_loss_curve(out_dir: str | os.PathLike) -> Path:
    """Write loss.png from loss.csv (and eval.csv when present) in `out_dir`; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train = read_csv(out_dir / LOSS_CSV)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    # Markers keep a short run (even one step) visible: a line needs two points.
    marker = "o" if len(train["loss"]) < 20 else None
    ax.plot(train["step"], train["loss"], lw=0.8, alpha=0.5, marker=marker, ms=3, label="train loss")
    if len(train["loss"]) >= 5:
        # An exponential moving average makes the trend readable through batch noise.
        ema, smooth = train["loss"][0], []
        for v in train["loss"]:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(train["step"], smooth, lw=1.5, label="train loss (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    eval_path = out_dir / EVAL_CSV
    if eval_path.is_file():
        ev = read_csv(eval_path)
        if ev.get("step"):
            ax.plot(ev["step"], ev["val_loss"], "o-", ms=3, color="tab:red", label="val loss")
            ax2 = ax.twinx()
            ax2.plot(ev["step"], [100 * a for a in ev["val_acc"]], "s--", ms=3, color="tab:green")
            ax2.set_ylabel("val accuracy (%)")
            ax2.set_ylim(0, 100)
            handles, labels = ax.get_legend_handles_labels()
            handles.append(ax2.lines[0])
            labels.append("val accuracy")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title("vit-fast train")
    fig.tight_layout()
    png = out_dir / LOSS_PNG
    fig.savefig(png)
    plt.close(fig)
    return png


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a test/bench dependency
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)


# -- the loop ------------------------------------------------------------------------------------
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
            _load_model_and_optim_state(raw, opt, ckpt["model"], ckpt["optimizer"], cfg.fsdp)
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
        _truncate_csv(out_dir / LOSS_CSV, ["step", "loss", "lr", "grad_norm", "images_per_s"], start)
        _truncate_csv(out_dir / EVAL_CSV, ["step", "val_loss", "val_acc"], start)

    loader, sampler, steps_per_epoch = make_train_loader(train_ds, cfg, env)
    local_bs = cfg.batch_size // env.world_size
    end = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    result = TrainResult(out_dir=out_dir, info=info, final_step=start)
    bar = _progress(end, start, cfg.progress and env.is_main)
    batches: Iterator | None = None
    timed_images, timed_s = 0, 0.0
    all_images, all_s = 0, 0.0
    model.train()

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = _model_and_optim_state(raw, opt, cfg.fsdp)
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
        with _autocast(env.device, amp_dtype):
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
        loss_val = _all_mean(loss.detach(), env).item()
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
