"""vit_fast: fused Triton (GPU) and C++ (CPU) kernels for Vision Transformers."""

from vit_fast import ops, reference

__version__ = "0.1.0"

__all__ = ["__version__", "ops", "reference"]
