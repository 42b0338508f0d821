"""One-call integrations of sparsevit with model libraries."""

from .timm import PatchReport, patch_attention

__all__ = ["PatchReport", "patch_attention"]
