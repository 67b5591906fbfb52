"""The custom ops' eager fast path.

Calling a `torch.library.custom_op` from Python goes through the dispatcher and back into Python
(~40 us per call here), which a batch-1 ViT forward pays some 50 times. When nothing could intercept
the call (no input needs a gradient, no torch.compile / jit tracing, no dispatch or function mode such
as FakeTensorMode or a FlopCounter, no functorch transform, no profiler, plain CPU / CUDA tensors),
the dispatcher would only run the op's own Python body: `run_op` runs that body directly. Every
other call goes through the op as before, so autograd, compile, fake kernels and profiling see it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

PLAIN_TYPES = (Tensor, nn.Parameter)  # tensors no subclass behaviour can intercept


def plain_call(args: tuple[Any, ...]) -> bool:
    """Whether a custom-op call with `args` would reach the op's body unobserved (see module doc)."""
    if (
        torch.compiler.is_compiling()  # first: under torch.compile the rest must not be traced
        or torch.autograd.profiler._is_profiler_enabled
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch._C._is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    grad = torch.is_grad_enabled()
    for arg in args:
        for t in arg if isinstance(arg, (list, tuple)) else (arg,):  # Tensor[] arguments too
            if isinstance(t, Tensor) and (
                type(t) not in PLAIN_TYPES
                or not (t.is_cpu or t.is_cuda)  # meta, XLA, ...: through the dispatcher
                or (grad and t.requires_grad)
            ):
                return False
    return True


def run_op(op: Any, *args: Any) -> Any:
    """`op(*args)` for a custom op defined in vit_fast.ops, without the dispatcher round trip when
    `plain_call(args)`."""
    body = getattr(op, "_init_fn", None)  # torch's CustomOpDef keeps the decorated function here
    if body is not None and plain_call(args):
        return body(*args)
    return op(*args)
