"""Drop-in integrations with other model libraries: `patch` / `unpatch` / `is_patched` for timm,
Hugging Face transformers, torchvision and open_clip ViTs; the timm-specific entry points."""

from vit_fast.integrations.patch import is_patched, patch, unpatch
from vit_fast.integrations.timm import patch_timm, unpatch_timm

__all__ = ["is_patched", "patch", "patch_timm", "unpatch", "unpatch_timm"]
