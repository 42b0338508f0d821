"""Token-sparse models on timm ViTs: DynamicViT, data-level patch tickets, their losses."""

from .dynamicvit import DynamicViT, DynamicViTOutput, dynamic_vit
from .losses import DistillationLoss, DynamicViTLoss, ensemble_logits
from .patch_ticket import PatchTicketViT, RandomPatchSelector, TicketSelector
from .predictor import TokenPredictor

__all__ = ["DynamicViT", "DynamicViTOutput", "dynamic_vit", "DynamicViTLoss", "DistillationLoss", "ensemble_logits", "TokenPredictor", "PatchTicketViT", "RandomPatchSelector", "TicketSelector"]
