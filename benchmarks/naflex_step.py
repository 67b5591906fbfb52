"""One NaFlexVit training step on a mixed-length batch: stock timm (SDPA with its [B, 1, T, T] mask)
vs `patch_naflex` (varlen attention from seq_lens), and torch.compile(stock), in one process.

    python benchmarks/naflex_step.py --model naflexvit_base_patch16_gap --batch 8 --steps 5

Images get random patch grids (aspect ratios and sizes differ, at most --max-patches patches), so
the batch is padded to the longest. Prints median ms per step (forward + backward + SGD) and the
ratio stock / patched. CPU timings on a shared machine are contended: say so when quoting them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def mixed_batch(batch: int, patch: int, max_patches: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """NaFlex input: per image a random (h, w) grid with h * w <= max_patches, padded at the end."""
    grids = []
    for _ in range(batch):
        h = int(torch.randint(4, 24, (1,), generator=gen))
        w = max(1, min(int(torch.randint(4, 24, (1,), generator=gen)), max_patches // h))
        grids.append((h, w))
    n = max(h * w for h, w in grids)
    patches = torch.zeros(batch, n, patch * patch * 3)
    coord = torch.zeros(batch, n, 2, dtype=torch.long)
    valid = torch.zeros(batch, n, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        patches[b, : h * w] = torch.randn(h * w, patch * patch * 3, generator=gen)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[b, : h * w] = torch.stack((ys.flatten(), xs.flatten()), -1)
        valid[b, : h * w] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def time_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(batch).float().logsumexp(-1).mean().backward()
        opt.step()
        if i:  # the first step warms up (allocations, compile)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    import timm

    from vit_fast.integrations.naflex import patch_naflex
    from vit_fast.ops.backend import select_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="naflexvit_base_patch16_gap")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-patches", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(stock)")
    args = ap.parse_args()

    torch.manual_seed(0)
    stock = timm.create_model(args.model, pretrained=False).train()
    patched = patch_naflex(copy.deepcopy(stock))
    gen = torch.Generator().manual_seed(0)
    batch = mixed_batch(args.batch, stock.embeds.patch_size[0], args.max_patches, gen)
    lens = batch["patch_valid"].sum(1).tolist()
    padded = batch["patch_valid"].numel()
    print(f"{args.model}, batch {args.batch}, patches per image {lens} (padded to {padded // args.batch})")
    print(
        f"attention backend: {select_backend(torch.device('cpu'), 'attention')}, threads {torch.get_num_threads()}"
    )
    ms_stock = time_steps(stock, batch, args.steps)
    ms_patched = time_steps(patched, batch, args.steps)
    print(f"stock timm (SDPA + mask): {ms_stock:8.1f} ms/step")
    print(
        f"patch_naflex (varlen):    {ms_patched:8.1f} ms/step   stock/patched = {ms_stock / ms_patched:.2f}x"
    )
    if args.compile:
        compiled = torch.compile(copy.deepcopy(stock))
        ms_compiled = time_steps(compiled, batch, args.steps)
        print(
            f"torch.compile(stock):     {ms_compiled:8.1f} ms/step   compiled/patched = {ms_compiled / ms_patched:.2f}x"
        )


if __name__ == "__main__":
    main()
