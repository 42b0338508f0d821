"""``MaskedAttention``: timm's ``Attention`` with DynamicViT's learnable key-keep mask.

A drop-in replacement for ``timm.layers.Attention`` (it subclasses it, so the
constructor arguments and parameter names -- ``qkv``, ``q_norm``, ``k_norm``,
``attn_drop``, ``norm``, ``proj``, ``proj_drop`` -- are those of the installed timm and
dense checkpoints load with ``strict=True``).  It adds, after Rao et al., DynamicViT
(NeurIPS 2021), Sec. 3.3, Eq. 11:

* an optional ``keep (B, N)`` mask (float in [0, 1], receiving a gradient, or bool):
  attention becomes :func:`sparsevit.masked_attention`;
* the class token's attention row ``Ã[:, :, 0, :]`` on request, which token-ranking
  methods (EViT; data-level tickets, Shen et al. 2023) need and SDPA cannot return.

With no mask the forward is timm's own (PyTorch SDPA when timm's ``fused_attn`` is
on), so a swapped model is never slower and gives the same logits.  With attention
dropout in training the probabilities are needed, so the masked path is then
:func:`sparsevit.masked_softmax`, dropout, and the product with V; when
``SPARSEVIT_BACKEND`` names a backend that ``masked_softmax`` lacks (``triton``: the
fused kernel never forms the probabilities), that call takes ``masked_softmax``'s
automatic choice instead of failing (an explicit choice for ``masked_attention`` is
still honoured by the fused path).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention

from ..backend import BACKENDS, ENV_VAR
from ..ops import masked_attention, masked_softmax
from ..ops.masked_softmax import MASKED_SOFTMAX_SUPPORT, check_eps

__all__ = ["MaskedAttention", "cls_attention_row"]


def cls_attention_row(
    q: torch.Tensor, k: torch.Tensor, keep: Optional[torch.Tensor], scale: float, eps: float
) -> torch.Tensor:
    """The first query's attention row ``Ã[:, :, 0, :]`` (B, H, N), in float32.

    ``Ã_0j = (exp(P_0j − m_0) G_0j + eps/N) / (Σ_k exp(P_0k − m_0) G_0k + eps)`` with
    ``P_0j = q_0 · k_j · scale``, ``G_00 = 1``, ``G_0j = keep_j`` (``keep=None``: softmax).
    O(N) per head; differentiable in q, k and a float ``keep``, through ``m_0`` too
    (``torch.max``, as the public implementation).  A negative or non-finite
    ``keep_j`` gives NaN, as in :func:`sparsevit.masked_softmax`.
    """
    scores = torch.matmul(q[:, :, :1].float(), k.float().transpose(-2, -1)).squeeze(2) * scale
    if keep is None:
        return scores.softmax(-1)
    n = scores.shape[-1]
    gate = keep.to(torch.float32)
    gate = torch.where((gate >= 0) & (gate < float("inf")), gate, torch.full_like(gate, float("nan")))
    gate = torch.cat([1.0 + 0.0 * gate[..., :1], gate[..., 1:]], dim=-1).unsqueeze(1)
    w = (scores - torch.max(scores, dim=-1, keepdim=True)[0]).exp() * gate
    return (w + eps / n) / (w.sum(-1, keepdim=True) + eps)


def _softmax_backend(scores: torch.Tensor) -> Optional[str]:
    """The backend for the module's own ``masked_softmax`` call (attention dropout).

    None (the op's usual choice), unless ``SPARSEVIT_BACKEND`` names a backend that
    ``masked_softmax`` has no kernel for: then its automatic choice for ``scores``.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env not in BACKENDS or env in MASKED_SOFTMAX_SUPPORT.backends:
        return None
    device = scores.device.type
    for name in MASKED_SOFTMAX_SUPPORT.order_for(scores.device):
        if MASKED_SOFTMAX_SUPPORT.reject_reason(name, [scores], scores.dtype, device) is None:
            return name
    return "torch"


class MaskedAttention(Attention):
    """Multi-head self-attention with an optional DynamicViT keep mask (timm-compatible).

    Constructor: exactly ``timm.layers.Attention``'s arguments, plus ``eps`` (the
    stabiliser of the masked softmax, 1e-6 as in DynamicViT).

    Attributes usable inside an unmodified timm model (whose blocks call
    ``attn(x, attn_mask=..., is_causal=...)``):

    * ``keep``: a (B, N) mask applied when ``forward`` gets none (None: dense);
    * ``record_cls_attn``: when True, each forward stores the class-token attention
      row (B, H, N) in ``cls_attn``.
    """

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_masking(eps)

    def _init_masking(self, eps: float) -> None:
        self.eps = check_eps(eps)
        self.keep: Optional[torch.Tensor] = None
        self.record_cls_attn = False
        self.cls_attn: Optional[torch.Tensor] = None

    @classmethod
    def from_attention(cls, attn: Attention, eps: float = 1e-6) -> "MaskedAttention":
        """A ``MaskedAttention`` sharing the parameters, buffers and settings of ``attn``."""
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be a timm.layers.Attention, got {type(attn).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(attn.__dict__)
        new._init_masking(eps)
        return new

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        keep: Optional[torch.Tensor] = None,
        return_cls_attn: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``proj(Ã V)`` with ``Ã`` DynamicViT's masked softmax of ``Q Kᵀ · scale``.

        Args:
            x: (B, N, C) tokens.
            attn_mask, is_causal: as in timm (SDPA semantics); not combinable with ``keep``.
            keep: (B, N) keep mask, float in [0, 1] (gets a gradient) or bool; default
                the ``keep`` attribute; None: ordinary attention.
            return_cls_attn: also return the class-token attention row (B, H, N) float32.

        Returns:
            (B, N, dim_out), or ``(out, cls_attn)`` with ``return_cls_attn``.
        """
        keep = self.keep if keep is None else keep
        want_row = return_cls_attn or self.record_cls_attn
        if keep is not None and (attn_mask is not None or is_causal):
            raise ValueError("keep cannot be combined with attn_mask or is_causal")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if keep is None:
            out = self._dense(q, k, v, attn_mask, is_causal, dropout)
        elif dropout > 0:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            attn = masked_softmax(scores, keep, self.eps, backend=_softmax_backend(scores))
            out = torch.matmul(self.attn_drop(attn), v)
        else:
            out = masked_attention(q, k, v, keep, scale=self.scale, eps=self.eps)
        row = None
        if want_row:
            if attn_mask is not None or is_causal:
                raise ValueError("the class-token attention row is not available with attn_mask or is_causal")
            row = cls_attention_row(q, k, keep, self.scale, self.eps)
            if self.record_cls_attn:
                self.cls_attn = row
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out) if hasattr(self, "norm") else out
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, row) if return_cls_attn else out

    def _dense(self, q, k, v, attn_mask, is_causal, dropout) -> torch.Tensor:
        """timm's own dense attention (SDPA when ``fused_attn``), unchanged."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[2], attn, attn_mask, is_causal))
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"
