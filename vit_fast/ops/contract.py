"""The backend contract, written once: every function a backend implements, per op family, with its
argument names in order.

Three backends implement it, each in a predictable place:

- "triton":    `vit_fast/kernels/<family>.py` (launchers of the Triton kernels)
- "cpu":       the C++ extension `vit_fast._C` (`csrc/<family>.cpp`, bound in `csrc/vit_fast.cpp`)
- "reference": `vit_fast/plain/<family>.py` (plain PyTorch, explicit backward formulas)

The ops in `vit_fast/ops/<family>.py` call these functions positionally, in this order, through
`vit_fast.ops.backend.backend_fns`; their custom ops whose inputs are a contract function's take
their schema from here (`schema`), so the op schema and the contract cannot drift apart. `tests/test_contract.py` checks that every backend exports every
function with exactly these argument names and order (the C++ names are read from the pybind11 signatures),
and the cost model (`vit_fast.perf.cost.flops`) reads FLOP-relevant arguments by these names. What
the arguments mean (shapes, dtypes, what comes back) is in docs/backend_contract.md.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

FAMILIES = ("patch_embed", "attention", "layer_norm", "mlp")

CONTRACT: dict[str, dict[str, str]] = {
    "patch_embed": {
        "patch_embed_forward": "Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
        "Tensor? reg_tokens, int patch_size, bool no_embed_class",
        "patch_embed_backward": "Tensor grad, Tensor images, Tensor weight, bool has_bias, bool has_pos, bool has_cls, "
        "int num_reg, int patch_size, bool no_embed_class, bool needs_image_grad",
    },
    "attention": {
        "attention_forward": "Tensor qkv, int num_heads, float scale, float dropout_p, int seed",
        "attention_backward": "Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
        "float dropout_p, int seed",
        "attention_varlen_forward": "Tensor qkv, Tensor table, int max_len, bool zero_fill, int num_heads, float scale, "
        "float dropout_p, int seed",
        "attention_varlen_backward": "Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor table, int max_len, "
        "int num_heads, float scale, float dropout_p, int seed",
    },
    "layer_norm": {
        "layer_norm_forward": "Tensor x, Tensor? weight, Tensor? bias, float eps",
        "layer_norm_backward": "Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd",
        "layer_norm_linear_forward": "Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, float eps",
        "layer_norm_linear_backward": "Tensor dout, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, "
        "Tensor mean, Tensor rstd, bool has_bias",
    },
    "mlp": {
        "linear_residual_forward": "Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? gamma, Tensor? dps, "
        "int tokens_per_sample",
        "linear_residual_backward": "Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? dps, "
        "int tokens_per_sample, bool needs_gamma_grad",
        "mlp_forward": "Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, float eps, Tensor? gamma, Tensor? dps, int tokens_per_sample, "
        "str approximate",
        "mlp_backward": "Tensor dout, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor fc2_weight, "
        "Tensor? fc2_bias, Tensor? gamma, Tensor? dps, int tokens_per_sample, Tensor mean, Tensor rstd, Tensor h_pre, "
        "str approximate, bool has_fc1_bias, bool needs_gamma_grad",
    },
}


def _typed(function: str) -> list[tuple[str, str]]:
    """[(type, name)] of contract function `function`, in call order."""
    for functions in CONTRACT.values():
        if function in functions:
            return [tuple(arg.split()) for arg in functions[function].split(", ")]  # type: ignore[misc]
    raise KeyError(f"{function!r} is not a backend contract function")


def arguments(function: str) -> tuple[str, ...]:
    """The argument names of contract function `function`, in call order."""
    return tuple(name for _, name in _typed(function))


def schema(function: str, returns: str) -> str:
    """The torch.library schema of a custom op whose inputs are exactly contract function
    `function`'s (ints become SymInt, so sizes may be symbolic under torch.compile)."""
    args = ", ".join(f"{'SymInt' if kind == 'int' else kind} {name}" for kind, name in _typed(function))
    return f"({args}) -> {returns}"


@functools.cache
def _bound_type(function: str) -> type:
    return collections.namedtuple(f"{function}_args", arguments(function))  # type: ignore[misc]


def bind(function: str, args: tuple[Any, ...]) -> Any:
    """`args` (a custom op's positional inputs) as a named tuple with contract function
    `function`'s argument names, for op bodies and fake kernels registered with `schema`."""
    return _bound_type(function)(*args)
