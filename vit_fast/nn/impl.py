"""Which op namespace a module runs: the fused ops or the plain-PyTorch oracle."""

from __future__ import annotations

from types import ModuleType

from vit_fast import ops, reference

__all__ = ["IMPLS", "op_namespace"]

#: The values of every `impl` argument (modules, models, patchers, the trainer's config).
IMPLS = ("auto", "fused", "reference")


def op_namespace(impl: str) -> ModuleType:
    """The module whose functions implement the ops for `impl`: 'auto' or 'fused' -> `vit_fast.ops`
    (Triton on CUDA, C++ on CPU), 'reference' -> `vit_fast.reference` (same signatures)."""
    if impl in ("auto", "fused"):
        return ops
    if impl == "reference":
        return reference
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
