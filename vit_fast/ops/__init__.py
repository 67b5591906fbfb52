"""Public fused ops. Each validates its arguments, then runs on the backend `select_backend` picks
(Triton on CUDA or under TRITON_INTERPRET=1, the C++ extension on CPU, else the reference)."""

from vit_fast.ops.attention import attention
from vit_fast.ops.backend import active_backends, select_backend, use_backend
from vit_fast.ops.layer_norm import layer_norm, layer_norm_linear
from vit_fast.ops.mlp import layer_norm_mlp, linear_residual
from vit_fast.ops.patch_embed import patch_embed

__all__ = [
    "active_backends",
    "attention",
    "layer_norm",
    "layer_norm_linear",
    "layer_norm_mlp",
    "linear_residual",
    "patch_embed",
    "select_backend",
    "use_backend",
]
