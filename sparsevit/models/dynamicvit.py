"""DynamicViT on any timm Vision Transformer (Rao et al., NeurIPS 2021).

Prediction modules before chosen blocks (default: at depths 1/4, 1/2, 3/4, i.e.
0-indexed blocks 3, 6, 9 of 12) score the patch tokens; stage s keeps ρ^s of them.

* Training (Sec. 3.3): D = Gumbel-Softmax(π)[:, :, keep] (hard, straight-through),
  D̂ ← D̂ ⊙ D (hierarchical: a dropped token never returns), and every later block
  masks attention with G_ij = 1 if i = j else D̂_j through
  :class:`sparsevit.nn.MaskedAttention` (the fused kernel, gradient into D̂).
  Prefix tokens (class, register, distillation) are always kept.
* Inference (Sec. 3.4): at stage s keep the top ⌈ρ^s·N⌉ patch tokens by their keep
  probability and physically drop the rest (:func:`sparsevit.select_tokens`), so later
  blocks run on fewer tokens.

Index 0 of the predictor output means "keep", as in the public implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..integrations.timm import patch_attention
from ..nn.masked_attention import MaskedAttention
from ..ops import select_tokens
from ..rounding import ceil_fraction
from .keep_grad import clip_keep_grad
from .predictor import TokenPredictor
from .vit_parts import check_vit, embed_tokens, head_from_tokens

__all__ = ["DynamicViT", "DynamicViTOutput", "dynamic_vit"]


@dataclass
class DynamicViTOutput:
    """What a training forward returns for :class:`sparsevit.models.losses.DynamicViTLoss`.

    logits (B, classes) [or a tuple for distilled ViTs' two heads in training];
    tokens (B, P + N, C) final normalised tokens; decisions: per stage D̂ (B, N) over
    patch tokens; keep_ratios: the targets ρ^s.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    decisions: list = field(default_factory=list)
    keep_ratios: list = field(default_factory=list)
    num_prefix: int = 1


def _check_blocks(vit: VisionTransformer, first: int) -> None:
    """Every block from ``first`` on must hold timm's ``Attention`` (or MaskedAttention) at ``.attn``.

    Raises TypeError naming the first block that does not, before the model is touched.
    """
    from timm.layers import Attention

    for i, blk in enumerate(vit.blocks):
        if i < first:
            continue
        attn = getattr(blk, "attn", None)
        if isinstance(attn, MaskedAttention) or type(attn) is Attention:
            continue
        cls = type(blk)
        what = (f"its .attn is {type(attn).__module__}.{type(attn).__name__}" if attn is not None else
                "it has no .attn (attention computed inside the block, e.g. parallel attention + MLP)")
        raise TypeError(f"DynamicViT: block {i} ({cls.__module__}.{cls.__name__}) cannot take a keep mask: {what}; "
                        "supported: blocks whose .attn is timm.layers.Attention (Block, ResPostBlock, ...)")


class DynamicViT(nn.Module):
    """A timm ``VisionTransformer`` with DynamicViT token sparsification.

    Args:
        vit: a timm VisionTransformer ('token' or 'avg' pooling, any prefix tokens, image
            and patch size). Its attention modules are swapped in place for
            :class:`MaskedAttention` (same parameters: dense weights still load).
        keep_ratio: ρ in (0, 1]; stage s keeps ⌈ρ^s · N⌉ patch tokens (exact rational
            rounding of the decimal written, :func:`sparsevit.rounding.ceil_fraction`).
        prune_at: 0-indexed blocks before which a predictor runs (strictly increasing,
            in [1, depth)); default the blocks at depth/4, depth/2, 3·depth/4.
        tau: Gumbel-softmax temperature in training.
        keep_grad_clip: ``None`` (default: the exact gradient, as the public implementation)
            or ``c > 0``: in training the gradient that reaches D̂ from the attention blocks is
            clamped to ``[−c, c]`` per token (:func:`sparsevit.models.keep_grad.clip_keep_grad`;
            the forward pass is unchanged).
        detach_predictor_input: the predictors read the tokens detached, so no loss reaches
            the backbone or an earlier stage's decisions through a predictor's input (default
            False: not detached, as the public implementation).

    ``forward(images)`` returns a :class:`DynamicViTOutput` in training mode and logits
    in eval mode (``return_index=True``: also the kept patch indices per stage).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        keep_ratio: float = 0.7,
        prune_at: Optional[Sequence[int]] = None,
        tau: float = 1.0,
        keep_grad_clip: Optional[float] = None,
        detach_predictor_input: bool = False,
    ) -> None:
        super().__init__()
        vit = check_vit(vit)
        depth = len(vit.blocks)
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
        if prune_at is None:
            prune_at = sorted({max(1, depth // 4), max(1, depth // 2), max(1, 3 * depth // 4)})
        prune_at = [int(p) for p in prune_at]
        if not prune_at or any(not 1 <= p < depth for p in prune_at) or prune_at != sorted(set(prune_at)):
            raise ValueError(f"prune_at must be strictly increasing block indices in [1, {depth}), got {prune_at}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        _check_blocks(vit, prune_at[0])  # before anything is changed
        patch_attention(vit)
        self.vit = vit
        self.keep_ratio = float(keep_ratio)
        self.prune_at = prune_at
        self.tau = float(tau)
        if keep_grad_clip is not None and (isinstance(keep_grad_clip, bool) or not isinstance(keep_grad_clip, (int, float))
                                           or not keep_grad_clip > 0 or keep_grad_clip == float("inf")):
            raise ValueError(f"keep_grad_clip must be None or a finite float > 0, got {keep_grad_clip!r}")
        if not isinstance(detach_predictor_input, bool):
            raise TypeError(f"detach_predictor_input must be a bool, got {type(detach_predictor_input).__name__}")
        self.keep_grad_clip = None if keep_grad_clip is None else float(keep_grad_clip)
        self.detach_predictor_input = detach_predictor_input
        self.score_predictor = nn.ModuleList([TokenPredictor(vit.embed_dim) for _ in prune_at])

    @property
    def num_prefix(self) -> int:
        return self.vit.num_prefix_tokens

    def stage_keep_ratios(self) -> list[float]:
        """ρ^s for s = 1..S."""
        return [self.keep_ratio ** (s + 1) for s in range(len(self.prune_at))]

    def load_dense(self, state_dict: dict, strict: bool = True):
        """Load a dense timm state dict into the wrapped ViT (strict); predictors untouched."""
        return self.vit.load_state_dict(state_dict, strict=strict)

    def forward(self, images: torch.Tensor, return_index: bool = False):
        if self.training:
            if return_index:
                raise ValueError("return_index=True needs eval mode (model.eval()): in training no token is dropped, "
                                 "the decisions are in the output's .decisions")
            return self.forward_train(images)
        return self.forward_infer(images, return_index=return_index)

    def forward_train(self, images: torch.Tensor) -> DynamicViTOutput:
        """Masked training forward with hard Gumbel-softmax decisions (straight-through)."""
        vit = self.vit
        x = embed_tokens(vit, images)
        b, n_all, _ = x.shape
        p = self.num_prefix
        prefix = x.new_ones(b, p)
        decision = x.new_ones(b, n_all - p, 1)  # D̂ over patch tokens
        decisions, stage = [], 0
        for i, blk in enumerate(vit.blocks):
            if stage < len(self.prune_at) and i == self.prune_at[stage]:
                tokens = x[:, p:].detach() if self.detach_predictor_input else x[:, p:]
                log_pi = self.score_predictor[stage](tokens, decision)
                hard = F.gumbel_softmax(log_pi, tau=self.tau, hard=True)[:, :, 0:1]
                decision = hard * decision
                decisions.append(decision.squeeze(-1))
                stage += 1
            if stage:
                keep = torch.cat([prefix, decision.squeeze(-1)], dim=1)
                blk.attn.keep = keep if self.keep_grad_clip is None else clip_keep_grad(keep, self.keep_grad_clip)
                try:
                    x = blk(x)
                finally:
                    blk.attn.keep = None
            else:
                x = blk(x)
        x = vit.norm(x)
        logits = head_from_tokens(vit, x, decision.squeeze(-1))
        return DynamicViTOutput(logits, x, decisions, self.stage_keep_ratios(), p)

    @torch.no_grad()
    def _scores(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix
        ones = x.new_ones(x.shape[0], x.shape[1] - p, 1)
        return self.score_predictor[stage](x[:, p:], ones)[:, :, 0].float()

    def forward_infer(self, images: torch.Tensor, return_index: bool = False):
        """Token-dropping inference: top ⌈ρ^s·N⌉ patch tokens per stage, the rest removed.

        Returns logits, or ``(logits, [index per stage])`` where each index (B, P + k_s)
        lists the kept tokens' positions in the original token sequence (prefix first,
        then patches in ascending position).
        """
        vit = self.vit
        x = embed_tokens(vit, images)
        b, n_all, _ = x.shape
        p = self.num_prefix
        n_patch = n_all - p
        positions = torch.arange(n_all, device=x.device).expand(b, n_all)
        kept, stage = [], 0
        for i, blk in enumerate(vit.blocks):
            if stage < len(self.prune_at) and i == self.prune_at[stage]:
                count = min(x.shape[1] - p, ceil_fraction(self.keep_ratio, n_patch, stage + 1))
                x, index = select_tokens(x, self._scores(stage, x), count, num_prefix=p)
                positions = positions.gather(1, index)
                kept.append(positions)
                stage += 1
            x = blk(x)
        logits = head_from_tokens(vit, vit.norm(x))
        return (logits, kept) if return_index else logits


def dynamic_vit(
    model_or_name: Union[str, VisionTransformer],
    keep_ratio: float = 0.7,
    prune_at: Optional[Sequence[int]] = None,
    **timm_kwargs,
) -> DynamicViT:
    """Build a :class:`DynamicViT` from a timm model or a timm model name.

    ``dynamic_vit("deit_small_patch16_224", 0.7, pretrained=True)`` creates the timm model
    with ``timm_kwargs`` and wraps it; a model instance is wrapped as is (kwargs unused).
    """
    if isinstance(model_or_name, str):
        import timm

        model_or_name = timm.create_model(model_or_name, **timm_kwargs)
    elif timm_kwargs:
        raise TypeError(f"timm keyword arguments are only used with a model name, got {sorted(timm_kwargs)}")
    return DynamicViT(model_or_name, keep_ratio=keep_ratio, prune_at=prune_at)
