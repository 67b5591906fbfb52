"""Drop-in integrations with other model libraries (timm today)."""

from vit_fast.integrations.timm import is_patched, patch_timm, unpatch_timm

__all__ = ["is_patched", "patch_timm", "unpatch_timm"]
