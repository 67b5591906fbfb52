"""MLP modules with timm's parameter names.

- `Mlp`: timm's `Mlp` layout (`fc1`, `act`, `drop1`, `fc2`, `drop2`), forward = fc2(gelu(fc1(x))),
  usable inside a timm-compatible Block (checkpoint keys `mlp.fc1.*`, `mlp.fc2.*`).
- `LayerNormMLP`: the pre-LN MLP sub-block x + gamma * drop_path(fc2(gelu(fc1(norm(x))))) as one
  fused op (`vit_fast.ops.layer_norm_mlp`), holding `norm` (nn.LayerNorm), `mlp` (an `Mlp`) and
  optional layer-scale `ls.gamma`, so `norm`/`mlp`/`ls` map onto timm's `norm2`/`mlp`/`ls2`.
- `layer_norm_mlp_functional`: the plain functional core both use, for a Block that owns its own
  parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vit_fast.nn.impl import op_namespace

__all__ = [
    "LayerNormMLP",
    "LayerScale",
    "Mlp",
    "drop_path_scale",
    "layer_norm_mlp_functional",
    "mlp_dropout_p",
    "scale_residual",
]


def layer_norm_mlp_functional(
    x: Tensor,
    norm: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    *,
    gamma: Tensor | None = None,
    drop_path_scale: Tensor | None = None,
    approximate: str = "none",
    impl: str = "fused",
) -> Tensor:
    """x [B, T, D] -> x + gamma * drop_path_scale * fc2(gelu(fc1(norm(x)))), [B, T, D].

    `impl="fused"` runs `vit_fast.ops.layer_norm_mlp` (saves only x, LN statistics and the fc1
    pre-activation for backward); `impl="reference"` runs `vit_fast.reference.layer_norm_mlp`.
    """
    return op_namespace(impl).layer_norm_mlp(
        x,
        norm.weight,
        norm.bias,
        fc1.weight,
        fc1.bias,
        fc2.weight,
        fc2.bias,
        norm.eps,
        gamma=gamma,
        drop_path_scale=drop_path_scale,
        approximate=approximate,
    )


def drop_path_scale(batch: int, drop_prob: float, training: bool, device: torch.device) -> Tensor | None:
    """Stochastic depth as a per-sample scale [B]: 0 for a dropped sample, 1/keep for a kept one."""
    if drop_prob == 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    return torch.empty(batch, device=device).bernoulli_(keep).div_(keep)


def scale_residual(out: Tensor, residual: Tensor, gamma: Tensor | None, dps: Tensor | None) -> Tensor:
    """residual + gamma * dps * out, unfused: for the training steps whose dropout sits between a
    GEMM and this epilogue. out, residual [B, T, D]; gamma [D] (layer-scale); dps [B] (per-sample
    drop-path scale, cast to out's dtype)."""
    if gamma is not None:
        out = out * gamma
    if dps is not None:
        out = out * dps.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
    return residual + out


def mlp_dropout_p(mlp: nn.Module) -> float:
    """The largest dropout rate inside an MLP with timm's layout (`drop1` after the activation,
    `drop2` after fc2; 0 where a module has none): the fused MLP op has no dropout, so a rate > 0
    in training means the unfused module path."""
    return max(getattr(getattr(mlp, name, None), "p", 0.0) for name in ("drop1", "drop2"))


class Mlp(nn.Module):
    """timm-compatible MLP: fc1 [hidden, dim] -> GELU -> dropout -> fc2 [dim, hidden] -> dropout.

    x [..., dim] -> [..., dim]. `approximate='tanh'` selects the tanh GELU (timm's `gelu_tanh`).
    """

    def __init__(
        self, dim: int, hidden: int, *, bias: bool = True, drop: float = 0.0, approximate: str = "none"
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel scale `gamma` [dim] (timm's LayerScale parameter name)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LayerNormMLP(nn.Module):
    """Pre-LN MLP sub-block with residual: x + ls(drop_path(mlp(norm(x)))), fused into one op.

    x [B, T, dim] -> [B, T, dim]. Parameters: `norm.weight`, `norm.bias` [dim]; `mlp.fc1.weight`
    [hidden, dim], `mlp.fc1.bias` [hidden]; `mlp.fc2.weight` [dim, hidden], `mlp.fc2.bias` [dim];
    `ls.gamma` [dim] when `init_values` is set. In training, `drop_path` > 0 drops whole samples
    (stochastic depth) through a per-sample scale handed to the fused epilogue. Dropout inside the
    MLP (`drop` > 0, training) is not fused: that case runs the unfused module path.
    """

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        *,
        mlp_ratio: float = 4.0,
        bias: bool = True,
        norm_eps: float = 1e-6,
        init_values: float | None = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        approximate: str = "none",
        impl: str = "fused",
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden or int(dim * mlp_ratio), bias=bias, drop=drop, approximate=approximate)
        self.ls = LayerScale(dim, init_values) if init_values else None
        self.drop_path = drop_path
        self.approximate = approximate
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.ls.gamma if self.ls is not None else None
        dps = drop_path_scale(x.shape[0], self.drop_path, self.training, x.device)
        if self.training and mlp_dropout_p(self.mlp) > 0.0:
            return scale_residual(self.mlp(self.norm(x)), x, gamma, dps)
        return layer_norm_mlp_functional(
            x,
            self.norm,
            self.mlp.fc1,
            self.mlp.fc2,
            gamma=gamma,
            drop_path_scale=dps,
            approximate=self.approximate,
            impl=self.impl,
        )
