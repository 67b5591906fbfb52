"""The backend contract, written once: every function a backend implements, per op family, with its
argument names in order.

Three backends implement it, each in a predictable place:

- "triton":    `vit_fast/kernels/<family>.py` (launchers of the Triton kernels)
- "cpu":       the C++ extension `vit_fast._C` (`csrc/<family>.cpp`, bound in `csrc/vit_fast.cpp`)
- "reference": `vit_fast/plain/<family>.py` (plain PyTorch, explicit backward formulas)

The ops in `vit_fast/ops/<family>.py` call these functions positionally, in this order, through
`vit_fast.ops.backend.backend_fns`. `tests/test_contract.py` checks that every backend exports every
function with exactly these argument names (the C++ names are read from the pybind11 signatures),
and the cost model (`vit_fast.perf.cost.flops`) reads FLOP-relevant arguments by these names. What
the arguments mean (shapes, dtypes, what comes back) is in docs/backend_contract.md.
"""

from __future__ import annotations

FAMILIES = ("patch_embed", "attention", "layer_norm", "mlp")

CONTRACT: dict[str, dict[str, tuple[str, ...]]] = {
    "patch_embed": {
        "patch_embed_forward": (
            "images", "weight", "bias", "pos_embed", "cls_token", "reg_tokens", "patch_size", "no_embed_class",
        ),
        "patch_embed_backward": (
            "grad", "images", "weight", "has_bias", "has_pos", "has_cls", "num_reg", "patch_size",
            "no_embed_class", "needs_image_grad",
        ),
    },
    "attention": {
        "attention_forward": ("qkv", "num_heads", "scale", "dropout_p", "seed"),
        "attention_backward": ("grad_out", "qkv", "out", "lse", "num_heads", "scale", "dropout_p", "seed"),
        "attention_varlen_forward": (
            "qkv", "table", "max_len", "zero_fill", "num_heads", "scale", "dropout_p", "seed",
        ),
        "attention_varlen_backward": (
            "grad_out", "qkv", "out", "lse", "table", "max_len", "num_heads", "scale", "dropout_p", "seed",
        ),
    },
    "layer_norm": {
        "layer_norm_forward": ("x", "weight", "bias", "eps"),
        "layer_norm_backward": ("dy", "x", "weight", "mean", "rstd"),
        "layer_norm_linear_forward": ("x", "ln_weight", "ln_bias", "weight", "bias", "eps"),
        "layer_norm_linear_backward": (
            "dout", "x", "ln_weight", "ln_bias", "weight", "mean", "rstd", "has_bias",
        ),
    },
    "mlp": {
        "linear_residual_forward": ("x", "weight", "bias", "residual", "gamma", "dps", "tokens_per_sample"),
        "linear_residual_backward": (
            "dout", "x", "weight", "bias", "gamma", "dps", "tokens_per_sample", "needs_gamma_grad",
        ),
        "mlp_forward": (
            "x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "eps", "gamma",
            "dps", "tokens_per_sample", "approximate",
        ),
        "mlp_backward": (
            "dout", "x", "ln_weight", "ln_bias", "fc1_weight", "fc2_weight", "fc2_bias", "gamma", "dps",
            "tokens_per_sample", "mean", "rstd", "h_pre", "approximate", "has_fc1_bias", "needs_gamma_grad",
        ),
    },
}  # fmt: skip


def arguments(function: str) -> tuple[str, ...]:
    """The argument names of contract function `function`, in call order."""
    for functions in CONTRACT.values():
        if function in functions:
            return functions[function]
    raise KeyError(f"{function!r} is not a backend contract function")


def family_of(function: str) -> str:
    """The op family contract function `function` belongs to."""
    for family, functions in CONTRACT.items():
        if function in functions:
            return family
    raise KeyError(f"{function!r} is not a backend contract function")
