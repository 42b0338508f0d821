"""Pure-PyTorch references of every sparsevit op: the specification.

Each function here is plain differentiable torch; the kernels in ``kernels/`` and
``csrc/`` are tested against it, forward and backward.  They are also the
``torch`` backend of each op.

Token dropping (DynamicViT, Rao et al. 2021, Sec. 3.4; data-level tickets, Shen et
al. 2023): with ``x (B, N, C)`` and an integer ``index (B, K)``,

* ``gather_tokens``:      ``out[b, k] = x[b, index[b, k]]``, zero where the index is
  outside ``[0, N)``;
* ``scatter_tokens``:     ``out = base``; ``out[b, index[b, k]] = src[b, k]``, skipping
  indices outside ``[0, N)``; with a repeated index one of the rows wins (which
  one is unspecified);
* ``scatter_add_tokens``: ``out = 0``; ``out[b, index[b, k]] += src[b, k]`` summed in
  float32 and cast to the dtype of ``src``, skipping indices outside ``[0, n)``;
* ``select_tokens``: the ``num_prefix`` leading tokens plus the ``keep`` highest
  scoring others, in position or score order.

Masked-softmax attention (DynamicViT, Rao et al. 2021, Sec. 3.3, Eq. 11; the public
implementation's ``softmax_with_policy``): with ``P = Q Kᵀ · scale``, ``m_i = max_j P_ij``
over all N keys, ``G_ij = 1`` if ``i = j`` else ``keep_j``,

* ``masked_softmax``:   ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)``;
* ``masked_attention``: ``out = Ã V``.

The row max is a constant of the backward pass (detached); the public implementation
differentiates through it, which changes the gradients only by terms of order eps.
"""


from __future__ import annotations

import torch

__all__ = [
    "gather_tokens",
    "scatter_tokens",
    "scatter_add_tokens",
    "select_tokens",
    "masked_softmax",
    "masked_attention",
]


def _flat_rows(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers into a (B·(N+1), C) view, out-of-range entries sent to row N of their batch.

    Returns ``(flat (B·K,), valid (B, K))``; row N of each batch is a spill row.
    """
    valid = (index >= 0) & (index < n)
    spill = torch.where(valid, index, torch.full_like(index, n)).long()
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * (n + 1)
    return (spill + offsets).reshape(-1), valid


def _with_spill_row(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B·(N+1), C) with a zero row appended to every batch."""
    b, _, c = t.shape
    return torch.cat([t, t.new_zeros(b, 1, c)], dim=1).reshape(-1, c)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k, :] = x[b, index[b, k], :]`` (zero for an index outside ``[0, N)``).

    x: (B, N, C); index: (B, K) integer -> (B, K, C).
    """
    b, n, c = x.shape
    flat, _ = _flat_rows(index, n)
    return _with_spill_row(x).index_select(0, flat).view(b, index.shape[1], c)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``out = base``; ``out[b, index[b, k], :] = src[b, k, :]`` (out-of-range indices skipped).

    src: (B, K, C); index: (B, K) integer; base: (B, N, C) -> (B, N, C).
    """
    b, n, c = base.shape
    flat, _ = _flat_rows(index, n)
    out = _with_spill_row(base).index_copy(0, flat, src.reshape(-1, c))
    return out.view(b, n + 1, c)[:, :n]


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i, :] = Σ_{k : index[b, k] = i} src[b, k, :]`` in float32, cast to ``src.dtype``.

    src: (B, K, C); index: (B, K) integer -> (B, n, C).  The adjoint of :func:`gather_tokens`.
    """
    b, _, c = src.shape
    flat, _ = _flat_rows(index, n)
    acc = src.new_zeros((b * (n + 1), c), dtype=torch.float32)
    acc = acc.index_add(0, flat, src.reshape(-1, c).float())
    return acc.view(b, n + 1, c)[:, :n].to(src.dtype)


def select_index(scores: torch.Tensor, keep: int, num_prefix: int, order: str) -> torch.Tensor:
    """Indices (B, num_prefix + keep) of the prefix tokens and the ``keep`` best others.

    ``scores (B, N - num_prefix)`` rank the non-prefix tokens (higher is kept).
    ``order="position"`` sorts the kept indices ascending; ``"score"`` keeps them in
    descending score order.  The prefix indices ``0..num_prefix-1`` always come first.
    """
    b = scores.shape[0]
    top = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices
    if order == "position":
        top = torch.sort(top, dim=1).values
    prefix = torch.arange(num_prefix, device=scores.device).expand(b, num_prefix)
    return torch.cat([prefix, top + num_prefix], dim=1)


def select_tokens(
    x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int = 1, order: str = "position"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_prefix`` leading tokens and the ``keep`` highest-scoring others.

    x: (B, N, C); scores: (B, N - num_prefix) -> tokens (B, num_prefix + keep, C), index.
    """
    index = select_index(scores, keep, num_prefix, order)
    return gather_tokens(x, index), index


def _keep_gate(keep: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``G (B, 1, N, N)``: ``G_ij = 1`` on the diagonal, ``keep_j`` elsewhere."""
    g = keep.to(dtype).reshape(keep.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=dtype, device=keep.device).view(1, 1, n, n)
    return g + (1.0 - g) * eye


def masked_softmax(scores: torch.Tensor, keep: "torch.Tensor | None", eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax over the last dim, in float32 (float64 for float64 input).

    ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)`` with
    ``m_i = max_k P_ik`` over all keys (detached) and ``G_ij = 1`` if ``i = j`` else
    ``keep_j``.  ``keep=None`` is the ordinary softmax (no eps terms).

    scores: (B, H, N, N); keep: (B, N) float in [0, 1] or bool, or None -> (B, H, N, N),
    dtype of ``scores``.
    """
    n = scores.shape[-1]
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32
    p = scores.to(work)
    if keep is None:
        return torch.softmax(p, dim=-1).to(scores.dtype)
    m = p.amax(dim=-1, keepdim=True).detach()
    w = (p - m).exp() * _keep_gate(keep, n, work)
    out = (w + eps / n) / (w.sum(dim=-1, keepdim=True) + eps)
    return out.to(scores.dtype)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: "torch.Tensor | None" = None,
    scale: "float | None" = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``out = masked_softmax(Q Kᵀ · scale, keep, eps) V`` (DynamicViT's masked attention).

    q, k, v: (B, H, N, D); keep: (B, N) or None; ``scale`` defaults to ``D ** -0.5``.
    Scores, exponentials and sums in float32 (float64 for float64 input); the
    probabilities are cast to the dtype of ``v`` before the product with V, as a
    fused kernel does.  Returns (B, H, N, D) in the dtype of ``q``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * scale
    attn = masked_softmax(scores, keep, eps)
    return torch.matmul(attn.to(v.dtype).to(work), v.to(work)).to(q.dtype)


# ----------------------------------------------------------------------------------
# Closed-form forward statistics and gradients of the masked softmax (the torch
# backend of the custom ops; tested against autograd through the functions above).
# With e_ij = exp(P_ij − m_i), w_ij = e_ij G_ij, S_i = Σ_j w_ij + eps,
# Ã_ij = (w_ij + eps/N) / S_i and an upstream gradient dÃ:
#   Δ_i = Σ_j dÃ_ij Ã_ij,   dP_ij = w_ij (dÃ_ij − Δ_i) / S_i,
#   dkeep_j = Σ_{h, i ≠ j} e_ij (dÃ_ij − Δ_i) / S_i   (m_i held constant).
# ----------------------------------------------------------------------------------
def masked_softmax_stats(
    scores: torch.Tensor, keep: "torch.Tensor | None", eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Ã, m, S)``: probabilities (float32) and the row max and denominator (B, H, N) float32.

    ``keep=None`` means ``G = 1``; pass ``eps=0`` then for the ordinary softmax.
    """
    n = scores.shape[-1]
    p = scores.float()
    m = p.amax(dim=-1)
    w = (p - m.unsqueeze(-1)).exp()
    if keep is not None:
        w = w * _keep_gate(keep, n, torch.float32)
    s = w.sum(dim=-1) + eps
    return (w + eps / max(n, 1)) / s.unsqueeze(-1), m, s


def masked_softmax_grads(
    grad: torch.Tensor,
    scores: torch.Tensor,
    keep: "torch.Tensor | None",
    m: torch.Tensor,
    s: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dP (B, H, N, N) float32, dkeep (B, N) float32)`` for upstream ``grad = dÃ``.

    ``dkeep`` is zero when ``keep`` is None.
    """
    b, _, n, _ = scores.shape
    e = (scores.float() - m.unsqueeze(-1)).exp()
    g = _keep_gate(keep, n, torch.float32) if keep is not None else torch.ones((), device=scores.device)
    w = e * g
    attn = (w + eps / max(n, 1)) / s.unsqueeze(-1)
    da = grad.float()
    delta = (da * attn).sum(dim=-1, keepdim=True)
    t = (da - delta) / s.unsqueeze(-1)
    dp = w * t
    if keep is None:
        return dp, torch.zeros((b, n), dtype=torch.float32, device=scores.device)
    off_diag = 1.0 - torch.eye(n, dtype=torch.float32, device=scores.device)
    dkeep = (e * t * off_diag).sum(dim=(1, 2))
    return dp, dkeep
