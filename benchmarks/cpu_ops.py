"""Micro-benchmark: the C++ CPU kernels (vit_fast._C) vs the eager reference ops, per op, at ViT-S/16
shapes (B=8, T=197, D=384, H=6, F=1536), float32, forward and forward+backward.

    OMP_NUM_THREADS=2 python benchmarks/cpu_ops.py [--runs 7] [--threads N] [--dtype float32|bfloat16]
    OMP_NUM_THREADS=2 python benchmarks/cpu_ops.py --model [--compile] [--gemm-ablation]
    OMP_NUM_THREADS=2 python benchmarks/cpu_ops.py --gemm     # the GEMM libraries alone

Times are medians of `--runs` torch.utils.benchmark measurements taken in the same process; the
ratio column is eager / fused (> 1 means the fused op is faster). The fused side calls the contract
functions directly (forward, then backward with the saved tensors), which is what the torch.library
ops do, minus their small Python dispatch cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.utils.benchmark as tb

from vit_fast import reference

B, T, D, H, F, P = 8, 197, 384, 6, 1536, 16


def median_ms(fn, runs: int, cpu_time: bool = False) -> float:
    fn()  # warm-up (allocator, MKL/oneDNN primitive caches)
    # --cpu-time counts the process's CPU seconds instead of wall time: on a machine shared with other
    # jobs this is far less noisy (it is the same as wall time x threads on an idle machine).
    kw = {"timer": time.process_time} if cpu_time else {}
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **kw)
    return statistics.median(timer.blocked_autorange(min_run_time=0.2).median for _ in range(runs)) * 1e3


def cases(dtype: torch.dtype):
    import vit_fast._C as C

    def p(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)

    M = B * T
    # --- attention
    qkv = p(B, T, 3 * D)
    g_attn = torch.randn(B, T, D, dtype=dtype)
    scale = (D // H) ** -0.5

    def attn_ref():
        return reference.attention(qkv, H)

    def attn_fused_fwd():
        return C.attention_forward(qkv.detach(), H, scale, 0.0, 0)

    def attn_fused_fb():
        out, lse = C.attention_forward(qkv.detach(), H, scale, 0.0, 0)
        return C.attention_backward(g_attn, qkv.detach(), out, lse, H, scale, 0.0, 0)

    yield "attention", attn_ref, attn_fused_fwd, attn_fused_fb, g_attn, [qkv]

    # --- LN + qkv Linear
    x = p(B, T, D)
    lw, lb, w, b = p(D), p(D), p(3 * D, D, scale=D**-0.5), p(3 * D)
    g_lnl = torch.randn(B, T, 3 * D, dtype=dtype)

    def lnl_ref():
        return reference.layer_norm_linear(x, lw, lb, w, b, 1e-6)

    def lnl_fwd():
        return C.layer_norm_linear_forward(
            x.detach().view(M, D), lw.detach(), lb.detach(), w.detach(), b.detach(), 1e-6
        )

    def lnl_fb():
        _, mean, rstd = lnl_fwd()
        return C.layer_norm_linear_backward(
            g_lnl.view(M, 3 * D),
            x.detach().view(M, D),
            lw.detach(),
            lb.detach(),
            w.detach(),
            mean,
            rstd,
            True,
        )

    yield "layer_norm_linear", lnl_ref, lnl_fwd, lnl_fb, g_lnl, [x, lw, lb, w, b]

    # --- proj + residual (layer-scale and drop-path on: the training configuration with all epilogues)
    xo, res = p(B, T, D), p(B, T, D)
    pw, pb, gamma = p(D, D, scale=D**-0.5), p(D), p(D, scale=0.1)
    dps = torch.ones(B, dtype=dtype)
    g_lr = torch.randn(B, T, D, dtype=dtype)

    def lr_ref():
        return reference.linear_residual(xo, pw, pb, res, gamma=gamma, drop_path_scale=dps)

    def lr_fwd():
        return C.linear_residual_forward(
            xo.detach().view(M, D), pw.detach(), pb.detach(), res.detach().view(M, D), gamma.detach(), dps, T
        )

    def lr_fb():
        lr_fwd()
        return C.linear_residual_backward(
            g_lr.view(M, D), xo.detach().view(M, D), pw.detach(), pb.detach(), gamma.detach(), dps, T, True
        )

    yield "linear_residual", lr_ref, lr_fwd, lr_fb, g_lr, [xo, pw, pb, res, gamma]

    # --- LN + MLP
    xm = p(B, T, D)
    mlw, mlb = p(D), p(D)
    w1, b1, w2, b2 = p(F, D, scale=D**-0.5), p(F), p(D, F, scale=F**-0.5), p(D)
    g_mlp = torch.randn(B, T, D, dtype=dtype)

    def mlp_ref():
        return reference.layer_norm_mlp(xm, mlw, mlb, w1, b1, w2, b2, 1e-6)

    def mlp_fwd():
        return C.mlp_forward(
            xm.detach().view(M, D),
            mlw.detach(),
            mlb.detach(),
            w1.detach(),
            b1.detach(),
            w2.detach(),
            b2.detach(),
            1e-6,
            None,
            None,
            T,
            "none",
        )

    def mlp_fb():
        _, mean, rstd, h = mlp_fwd()
        return C.mlp_backward(
            g_mlp.view(M, D),
            xm.detach().view(M, D),
            mlw.detach(),
            mlb.detach(),
            w1.detach(),
            w2.detach(),
            b2.detach(),
            None,
            None,
            T,
            mean,
            rstd,
            h,
            "none",
            True,
            False,
        )

    yield "layer_norm_mlp", mlp_ref, mlp_fwd, mlp_fb, g_mlp, [xm, mlw, mlb, w1, b1, w2, b2]

    # --- patch embedding (no image gradient, as in training from pixels)
    images = p(B, 3, 224, 224, grad=False)
    pew, peb, pos, cls = p(D, 3, P, P, scale=0.05), p(D), p(1, T, D), p(1, 1, D)
    g_pe = torch.randn(B, T, D, dtype=dtype)

    def pe_ref():
        return reference.patch_embed(images, pew, peb, pos, cls, patch_size=P)

    def pe_fwd():
        return C.patch_embed_forward(
            images, pew.detach(), peb.detach(), pos.detach(), cls.detach(), None, P, False
        )

    def pe_fb():
        pe_fwd()
        return C.patch_embed_backward(g_pe, images, pew.detach(), True, True, True, 0, P, False, False)

    yield "patch_embed", pe_ref, pe_fwd, pe_fb, g_pe, [pew, peb, pos, cls]


def model_bench(args) -> None:
    """Whole ViT-S/16 at 224, batch 8: inference (no_grad forward) and training step (forward +
    backward of sum(logits), grads set to None between steps) for fused / eager (/ compiled).
    The impls are measured interleaved, run by run, so drifting machine load hits all alike."""
    from vit_fast.models import create_model

    torch.manual_seed(0)
    fused = create_model("vit_small_patch16_224", impl="fused")
    eager = create_model("vit_small_patch16_224", impl="reference")
    eager.load_state_dict(fused.state_dict())
    impls = {"fused": fused, "eager": eager}
    if args.gemm_ablation:
        impls["fused-aten-gemm"] = fused  # the same model, its GEMMs through at::mm (see run_impl)
    if args.compile:
        impls["compiled"] = torch.compile(eager)
    images = torch.randn(B, 3, 224, 224)
    clock = time.process_time if args.cpu_time else time.perf_counter
    import vit_fast._C as C

    gemm_default = C.gemm_backend()

    def run_impl(name, step, m):
        C.set_gemm_backend("aten" if name == "fused-aten-gemm" else gemm_default)
        try:
            step(m)
        finally:
            C.set_gemm_backend(gemm_default)

    def infer(m):
        m.eval()
        with torch.no_grad():
            m(images)

    def train(m):
        m.train()
        m.zero_grad(set_to_none=True)
        m(images).sum().backward()

    results = {}
    for mode, step in (("inference", infer), ("train step", train)):
        for k, m in impls.items():
            run_impl(k, step, m)  # warm-up (and compilation)
        times = {k: [] for k in impls}
        for _ in range(args.runs):
            for k, m in impls.items():
                t0 = clock()
                run_impl(k, step, m)
                times[k].append((clock() - t0) * 1e3)
        results[mode] = {k: statistics.median(v) for k, v in times.items()}
    kind = "cpu" if args.cpu_time else "wall"
    print(
        f"ViT-S/16 224 batch {B} fp32, {kind} time, threads={torch.get_num_threads()}, median of {args.runs}, "
        f"fused GEMMs {gemm_default}"
    )
    for mode, r in results.items():
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in r.items())
        ratios = ", ".join(f"{k}/fused {v / r['fused']:.2f}x" for k, v in r.items() if k != "fused")
        print(f"  {mode:<11} {parts}  ({ratios})")


def gemm_bench(args) -> None:
    """The float32 GEMM shapes of a ViT-S/16 block at batch 8 (M = 1576 token rows): at::mm (the
    BLAS ATen was built with) vs oneDNN's inner product (mkldnn::_linear_pointwise), in GFLOP/s."""
    lp = torch.ops.mkldnn._linear_pointwise
    M = B * T
    print(f"float32 GEMM GFLOP/s, threads={torch.get_num_threads()}, median of {args.runs}")
    print(f"{'GEMM':<34}{'at::mm':>9}{'oneDNN':>9}{'ratio':>7}")
    for label, m, k, n in (
        ("qkv   fwd [M,D]x[D,3D]", M, D, 3 * D),
        ("fc1   fwd [M,D]x[D,F]", M, D, F),
        ("fc2   fwd [M,F]x[F,D]", M, F, D),
        ("proj  fwd [M,D]x[D,D]", M, D, D),
    ):
        a, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flops = 2 * m * n * k
        cases = (
            ("fwd", lambda a=a, w=w: torch.mm(a, w.t()), lambda a=a, w=w: lp(a, w, None, "none", [], "")),
            (
                "dgrad",
                lambda dy=dy, w=w: torch.mm(dy, w),
                lambda dy=dy, w=w: lp(dy, w.t(), None, "none", [], ""),
            ),
            (
                "wgrad",
                lambda dy=dy, a=a: torch.mm(dy.t(), a),
                lambda dy=dy, a=a: lp(dy.t(), a.t(), None, "none", [], ""),
            ),
        )
        for kind, aten_fn, dnnl_fn in cases:
            t_aten = median_ms(aten_fn, args.runs, args.cpu_time)
            t_dnnl = median_ms(dnnl_fn, args.runs, args.cpu_time)
            g_aten, g_dnnl = flops / t_aten / 1e6, flops / t_dnnl / 1e6
            print(f"{label.replace('fwd', kind):<34}{g_aten:>9.0f}{g_dnnl:>9.0f}{g_dnnl / g_aten:>6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cpu-time", action="store_true", help="measure process CPU time, not wall time")
    ap.add_argument("--model", action="store_true", help="whole ViT-S model instead of per-op numbers")
    ap.add_argument("--compile", action="store_true", help="with --model: add torch.compile'd eager")
    ap.add_argument(
        "--gemm-ablation", action="store_true", help="with --model: add the fused model with at::mm GEMMs"
    )
    ap.add_argument("--gemm", action="store_true", help="GEMM libraries alone at ViT-S shapes")
    ap.add_argument(
        "--cpu-gemm", choices=("auto", "onednn", "aten"), default=None, help="fused ops' float32 GEMM library"
    )
    ap.add_argument(
        "--tile-gemm", choices=("auto", "avx512", "blas"), default=None, help="fused attention's tile GEMMs"
    )
    ap.add_argument("--only", default="", help="substring filter on op names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import vit_fast._C as C

    if args.cpu_gemm:
        C.set_gemm_backend(args.cpu_gemm)
    if args.tile_gemm:
        C.set_tile_gemm_backend(args.tile_gemm)
    dtype = getattr(torch, args.dtype)
    if args.model:
        model_bench(args)
        return
    if args.gemm:
        gemm_bench(args)
        return
    print(
        f"{'cpu' if args.cpu_time else 'wall'} time, threads={torch.get_num_threads()} dtype={args.dtype} B={B} T={T} D={D} H={H} F={F}; median of {args.runs}; GEMMs {C.gemm_backend()}, attention tiles {C.tile_gemm_backend()}"
    )
    print(
        f"{'op':<20}{'eager fwd':>11}{'fused fwd':>11}{'ratio':>7}{'eager f+b':>11}{'fused f+b':>11}{'ratio':>7}"
    )
    for name, ref, fused_fwd, fused_fb, grad, leaves in cases(dtype):
        if args.only not in name:
            continue
        with torch.no_grad():
            e_fwd = median_ms(ref, args.runs, args.cpu_time)
        f_fwd = median_ms(fused_fwd, args.runs, args.cpu_time)

        def ref_fb(ref=ref, grad=grad, leaves=leaves):
            torch.autograd.grad(ref(), leaves, grad)

        e_fb = median_ms(ref_fb, args.runs, args.cpu_time)
        f_fb = median_ms(fused_fb, args.runs, args.cpu_time)
        print(
            f"{name:<20}{e_fwd:>9.2f}ms{f_fwd:>9.2f}ms{e_fwd / f_fwd:>6.2f}x{e_fb:>9.2f}ms{f_fb:>9.2f}ms{e_fb / f_fb:>6.2f}x"
        )


if __name__ == "__main__":
    main()
