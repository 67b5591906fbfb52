"""vit_fast: fused Triton (GPU) and C++ (CPU) kernels for Vision Transformers."""

from vit_fast import ops, reference
from vit_fast.integrations import is_patched, patch, patch_timm, unpatch, unpatch_timm
from vit_fast.models import VisionTransformer, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "VisionTransformer",
    "__version__",
    "create_model",
    "is_patched",
    "list_models",
    "ops",
    "patch",
    "patch_timm",
    "reference",
    "unpatch",
    "unpatch_timm",
]
