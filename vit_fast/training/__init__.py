"""Training library: a small, honest ViT trainer built only from stock PyTorch pieces.

One module per concern: `config` (TrainConfig, TrainResult, file names), `schedule` (AdamW +
warmup-cosine), `distributed` (torchrun, DDP, FSDP2), `sampler` (resumable data order), `precision`
(autocast), `checkpoint` (atomic, weights-only, exact resume), `logs` (CSV, PNG, progress),
`evaluate`, and `loop` (the training loop itself).

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

from vit_fast.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vit_fast.training.config import (
    CHECKPOINT_NAME,
    EVAL_CSV,
    IMPLS,
    LOSS_CSV,
    LOSS_PNG,
    PRECISIONS,
    TrainConfig,
    TrainResult,
)
from vit_fast.training.distributed import DistEnv, init_distributed, resolve_device, wrap_model
from vit_fast.training.evaluate import evaluate
from vit_fast.training.logs import plot_loss_curve, read_csv
from vit_fast.training.loop import build_model, train
from vit_fast.training.precision import resolve_precision
from vit_fast.training.sampler import ResumableSampler, make_train_loader
from vit_fast.training.schedule import WarmupCosine, build_optimizer

__all__ = [
    "CHECKPOINT_NAME",
    "EVAL_CSV",
    "IMPLS",
    "LOSS_CSV",
    "LOSS_PNG",
    "PRECISIONS",
    "DistEnv",
    "ResumableSampler",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_model",
    "build_optimizer",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "make_train_loader",
    "plot_loss_curve",
    "read_csv",
    "resolve_device",
    "resolve_precision",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "train",
    "wrap_model",
]
