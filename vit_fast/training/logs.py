"""Per-step CSV logs, the loss-curve PNG and the progress bar."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from vit_fast.training.config import EVAL_CSV, LOSS_CSV, LOSS_PNG


def truncate_csv(path: Path, header: list[str], keep_until: int) -> None:
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


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a test/bench dependency
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)
