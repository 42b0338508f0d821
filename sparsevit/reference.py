"""Pure-PyTorch references of every sparsevit op: the specification.

Each function here is plain differentiable torch; the kernels in ``kernels/`` and
``csrc/`` are tested against it, forward and backward.  They are also the
``torch`` backend of each op.

Token dropping (DynamicViT, Rao et al. 2021, Sec. 3.4; data-level tickets, Shen et
al. 2023): with ``x (B, N, C)`` and an integer ``index (B, K)``,

* ``gather_tokens``:      ``out[b, k] = x[b, index[b, k]]``, zero where the index is
  outside ``[0, N)``;
* ``scatter_tokens``:     ``out = base``; ``out[b, index[b, k]] = src[b, k]``, skipping
  indices outside ``[0, N)``; with a repeated index the last row wins: destination
  ``i`` takes ``src[b, k*]`` for the largest ``k*`` with ``index[b, k*] = i`` (the other
  rows are overwritten and get no gradient);
* ``scatter_add_tokens``: ``out = 0``; ``out[b, index[b, k]] += src[b, k]`` summed in
  float32 and cast to the dtype of ``src``, skipping indices outside ``[0, n)``;
* ``select_tokens``: the ``num_prefix`` leading tokens plus the ``keep`` highest
  scoring others, in position or score order.

Block-sparse matmul (block-granular RigL sparsity, Evci et al. 2020): dense matmuls
with the block mask applied, ``dds`` (``a @ S``), ``dsd`` (``S @ b``) and ``sdd`` (the
kept blocks of ``Σ_batch a @ b``), with ``S`` given by its packed blocks.

Masked-softmax attention (DynamicViT, Rao et al. 2021, Sec. 3.3, Eq. 11; the public
implementation's ``softmax_with_policy``): with ``P = Q Kᵀ · scale``, ``m_i = max_j P_ij``
over all N keys, ``G_ij = 1`` if ``i = j`` else ``keep_j``,

* ``masked_softmax``:   ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)``;
* ``masked_attention``: ``out = Ã V``.

Gradients flow through the row max ``m_i`` exactly as in the public implementation
(``torch.max(dim=-1)``: to the first maximal key of each row).  A negative or
non-finite ``keep_j`` makes the whole batch element NaN (on every backend).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens",
    "block_sparse_to_dense", "dense_to_block_sparse", "dds", "dsd", "sdd",
    "masked_softmax", "masked_attention",
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
    b, n, c = t.shape
    # Explicit sizes: with C = 0 a -1 in reshape would be ambiguous.
    return torch.cat([t, t.new_zeros(b, 1, c)], dim=1).reshape(b * (n + 1), c)


def _last_writers(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) bool: entry k is in ``[0, n)`` and no later entry of its row has the same index."""
    b, k = index.shape
    valid = (index >= 0) & (index < n)
    spill = torch.where(valid, index, torch.full_like(index, n)).long()
    position = torch.arange(k, device=index.device).expand(b, k)
    last = torch.full((b, n + 1), -1, dtype=torch.long, device=index.device)
    last = last.scatter_reduce(1, spill, position, reduce="amax")
    return valid & (last.gather(1, spill) == position)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k, :] = x[b, index[b, k], :]`` (zero for an index outside ``[0, N)``).

    x: (B, N, C); index: (B, K) integer -> (B, K, C).
    """
    b, n, c = x.shape
    flat, _ = _flat_rows(index, n)
    return _with_spill_row(x).index_select(0, flat).view(b, index.shape[1], c)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``out = base``; ``out[b, index[b, k], :] = src[b, k, :]`` (out-of-range indices skipped).

    A repeated index takes the row of its last (largest) ``k``; the earlier rows are
    sent to the spill row, so they neither reach the output nor get gradient.

    src: (B, K, C); index: (B, K) integer; base: (B, N, C) -> (B, N, C).
    """
    b, n, c = base.shape
    k = index.shape[1]
    winners = torch.where(_last_writers(index, n), index, torch.full_like(index, n))
    flat, _ = _flat_rows(winners, n)
    out = _with_spill_row(base).index_copy(0, flat, src.reshape(b * k, c))
    return out.view(b, n + 1, c)[:, :n]


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i, :] = Σ_{k : index[b, k] = i} src[b, k, :]`` in float32, cast to ``src.dtype``.

    src: (B, K, C); index: (B, K) integer -> (B, n, C).  The adjoint of :func:`gather_tokens`.
    """
    b, k, c = src.shape
    flat, _ = _flat_rows(index, n)
    acc = src.new_zeros((b * (n + 1), c), dtype=torch.float32)
    acc = acc.index_add(0, flat, src.reshape(b * k, c).float())
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


# ----------------------------------------------------------------------------------
# Block-sparse matmul (RigL-style block sparsity, Evci et al. 2020): dense matmuls
# with the block mask applied.  A block-sparse (M, K) matrix S at block size b is its
# packed blocks ``values (nnz, b, b)`` at block coordinates (row_indices, col_indices).
# ----------------------------------------------------------------------------------
def block_sparse_to_dense(
    values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The dense ``(M, K)`` matrix ``S`` with ``S[i·b:(i+1)·b, j·b:(j+1)·b] = values[t]`` for
    ``(i, j) = (row_indices[t], col_indices[t])`` and zeros elsewhere (differentiable in ``values``)."""
    b = values.shape[-1]
    m, k = shape
    blocks = values.new_zeros((m // b, k // b, b, b))
    blocks = blocks.index_put((row_indices.long(), col_indices.long()), values)
    return blocks.permute(0, 2, 1, 3).reshape(m, k)


def dense_to_block_sparse(
    dense: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The blocks ``values[t] = dense[..., i·b:(i+1)·b, j·b:(j+1)·b]`` at ``(i, j) = (row_indices[t],
    col_indices[t])``: ``dense (..., M, K)`` -> ``(..., nnz, b, b)``."""
    b = block_size
    *lead, m, k = dense.shape
    blocks = dense.reshape(*lead, m // b, b, k // b, b).transpose(-3, -2)
    return blocks[..., row_indices.long(), col_indices.long(), :, :]


def _sparse_operand(values, row_indices, col_indices, shape, transposed):
    s = block_sparse_to_dense(values, row_indices, col_indices, shape)
    return s.t() if transposed else s


def dds(
    a: torch.Tensor, values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor,
    shape: tuple[int, int], transposed: bool = False,
) -> torch.Tensor:
    """``out = a @ B`` with ``B = S`` (or ``Sᵀ`` when ``transposed``), ``S (M, K)`` block-sparse.

    a: (..., P, Q) -> (..., P, N) where ``B`` is ``(Q, N)``.
    """
    return torch.matmul(a, _sparse_operand(values, row_indices, col_indices, shape, transposed))


def dsd(
    values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, shape: tuple[int, int],
    b: torch.Tensor, transposed: bool = False,
) -> torch.Tensor:
    """``out = A @ b`` with ``A = S`` (or ``Sᵀ``), ``S (M, K)`` block-sparse.

    b: (..., Q, N) -> (..., R, N) where ``A`` is ``(R, Q)``.
    """
    return torch.matmul(_sparse_operand(values, row_indices, col_indices, shape, transposed), b)


def sdd(
    a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The kept blocks of ``Σ_batch a @ b``: a (..., M, R), b (..., R, N) -> (nnz, b, b).

    Leading batch dims (the same on both) are summed over, as in a weight gradient
    ``dW = Σ_tokens dyᵀ x``; the batch is folded into the contraction so that half
    precision inputs are summed by one matmul (fp32 accumulation).
    """
    m, r = a.shape[-2:]
    n = b.shape[-1]
    batch = math.prod(a.shape[:-2])
    # Explicit sizes: with a zero-length contraction (R = 0 or no batch) a -1 would be
    # ambiguous; the product is then the (M, 0) @ (0, N) zero matrix.
    a2 = a.reshape(batch, m, r).permute(1, 0, 2).reshape(m, batch * r)
    b2 = b.reshape(batch * r, n)
    return dense_to_block_sparse(a2 @ b2, row_indices, col_indices, block_size)


def _checked_gate(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``keep (B, N)`` in ``dtype``, NaN where an entry is negative or not finite.

    A NaN then reaches ``G_ij`` for every query i (the diagonal included), so the
    whole batch element's output is NaN on every backend, as the public formula
    ``G = g + (1 − g) I`` makes it for a non-finite ``g``.
    """
    g = keep.to(dtype)
    return torch.where((g >= 0) & (g < math.inf), g, torch.full_like(g, math.nan))


def _keep_gate(keep: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``G (B, 1, N, N)``: ``G_ij = 1`` on the diagonal, ``keep_j`` elsewhere (see :func:`_checked_gate`).

    ``G_jj`` is ``1 + 0·keep_j``: exactly 1, and NaN with a non-finite ``keep_j``.
    """
    g = _checked_gate(keep, dtype).reshape(keep.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=torch.bool, device=keep.device).view(1, 1, n, n)
    return torch.where(eye, 1.0 + 0.0 * g, g)


def _log_keep_gate(keep: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``log G (B, 1, N, N)``: 0 on the diagonal, ``log keep_j`` (−inf for a dropped key) elsewhere."""
    return _keep_gate(keep, n, dtype).log()


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, keep: "torch.Tensor | None", eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax over the last dim, in float32 (float64 for float64 input).

    ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)`` with
    ``m_i = max_k P_ik`` over all keys and ``G_ij = 1`` if ``i = j`` else ``keep_j``,
    exactly as the public ``softmax_with_policy``: the gradient flows through ``m_i``
    (``torch.max(dim=-1)``, so to the first maximal key).  ``keep=None`` is the ordinary
    softmax (no eps terms).  A negative or non-finite ``keep_j`` makes the whole batch
    element NaN.

    scores: (B, H, N, N); keep: (B, N) float (>= 0, DynamicViT's are in [0, 1]) or bool,
    or None -> (B, H, N, N), dtype of ``scores``.
    """
    n = scores.shape[-1]
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32
    p = scores.to(work)
    if keep is None:
        return torch.softmax(p, dim=-1).to(scores.dtype)
    if p.numel() == 0:
        return p.to(scores.dtype)
    m = torch.max(p, dim=-1, keepdim=True)[0]
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
    d = q.shape[-1]
    scale = (d ** -0.5 if d > 0 else 1.0) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * scale
    attn = masked_softmax(scores, keep, eps)
    return torch.matmul(attn.to(v.dtype).to(work), v.to(work)).to(q.dtype)


# ----------------------------------------------------------------------------------
# Closed-form forward statistics and gradients of the masked softmax (the torch
# backend of the custom ops; tested against autograd through the functions above).
#
# Evaluated without leaving float32's range whatever the dropped keys do, and
# relative to the largest weight of each row (so no precision is lost to the size
# of the scores): with the weighted max  m^w_i = max_j (P_ij + log G_ij)  (finite: the
# diagonal has G = 1), l_i = Σ_j exp(P_ij + log G_ij − m^w_i) >= 1 and
# r_i = eps · exp(m_i − m^w_i) (the eps term at that scale, possibly beyond float32),
#   λ_i = log(l_i + r_i)  (a log-add of log l_i and log r_i),   ρ_i = eps / S_i = r_i / (l_i + r_i),
#   Ã_ij = exp((P_ij − m^w_i) + log G_ij − λ_i) + ρ_i / N
# (m^w is only a shift, common to every term of a row, so its rounding cancels).
# Gradients for an upstream dÃ, with e_ij / S_i = exp(P_ij − m^w_i − λ_i),
# a_ij = e_ij G_ij / S_i and Δ_i = Σ_j dÃ_ij Ã_ij:
#   dP_ij   = a_ij (dÃ_ij − Δ_i) + [j = j*_i] dm_i,   dm_i = ρ_i (mean_j dÃ_ij − Δ_i),
#   dkeep_j = Σ_{h, i ≠ j} (e_ij / S_i) (dÃ_ij − Δ_i),
# where j*_i is the first maximal key of row i: ∂Ã_ij/∂m_i = ρ_i (1/N − Ã_ij) is the
# gradient through the row max that the public implementation's autograd takes.
# ----------------------------------------------------------------------------------
def _log_gate_or_zero(p: torch.Tensor, keep: "torch.Tensor | None") -> torch.Tensor:
    """``log G`` (a scalar 0 when ``keep`` is None)."""
    return p.new_zeros(()) if keep is None else _log_keep_gate(keep, p.shape[-1], p.dtype)


def _shifted(p: torch.Tensor, log_g: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
    """``P + log G − m^w`` as ``(P − m^w) + log G``: rounding ``P + log G`` first would cost
    the precision of the scores' magnitude."""
    return (p - mw.unsqueeze(-1)) + log_g


def _row_terms(
    p: torch.Tensor, log_g: torch.Tensor, mw: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, ρ)`` of every row from the scores, ``log G`` and the weighted max ``m^w``."""
    log_l = _shifted(p, log_g, mw).exp().sum(dim=-1).log()
    if eps <= 0:
        return log_l, torch.zeros_like(log_l)
    log_r = math.log(eps) + (p.amax(dim=-1) - mw)
    # ρ = r / (l + r) = sigmoid(log r − log l): no cancellation, whichever term dominates
    return torch.logaddexp(log_l, log_r), torch.sigmoid(log_r - log_l)


def masked_softmax_stats(
    scores: torch.Tensor, keep: "torch.Tensor | None", eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Ã, m^w, λ)``: probabilities and the row statistics (B, H, N) of the comment above,
    in float32 (float64 for float64 scores).

    ``keep=None`` means ``G = 1``; pass ``eps=0`` then for the ordinary softmax.
    """
    n = scores.shape[-1]
    p = scores.to(_work_dtype(scores))
    if p.numel() == 0:
        stats = p.new_zeros(p.shape[:3])
        return p.clone(), stats, stats.clone()
    log_g = _log_gate_or_zero(p, keep)
    mw = (p + log_g).amax(dim=-1)  # only a shift: its own rounding cancels
    lam, rho = _row_terms(p, log_g, mw, eps)
    probs = (_shifted(p, log_g, mw) - lam.unsqueeze(-1)).exp() + (rho / n).unsqueeze(-1)
    return probs, mw, lam


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``j*_i``: the first index of the largest score of each row (B, H, N) int32, as ``torch.max``."""
    return scores.argmax(dim=-1).to(torch.int32)


def masked_softmax_grads(
    grad: torch.Tensor,
    scores: torch.Tensor,
    keep: "torch.Tensor | None",
    mw: torch.Tensor,
    lam: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dP (B, H, N, N), dkeep (B, N))`` for upstream ``grad = dÃ``, float32 (float64 for float64 scores).

    ``mw, lam`` are from :func:`masked_softmax_stats`; ``ρ``, the row max and its first
    index ``j*`` are recomputed from the scores.  ``dkeep`` is zero when ``keep`` is None.
    """
    b, _, n, _ = scores.shape
    work = _work_dtype(scores)
    if scores.numel() == 0:
        return scores.new_zeros(scores.shape, dtype=work), scores.new_zeros((b, n), dtype=work)
    p = scores.to(work)
    mw, lam = mw.to(work), lam.to(work)
    _, rho = _row_terms(p, _log_gate_or_zero(p, keep), mw, eps)
    e = ((p - mw.unsqueeze(-1)) - lam.unsqueeze(-1)).exp()  # e_ij / S_i
    if keep is None:
        a = e
    else:
        g = _keep_gate(keep, n, work)
        # G = 0 must give 0 even where e overflows (a dropped key far above the kept ones, eps = 0)
        a = torch.where(g == 0, torch.zeros_like(e), e * g)
    da = grad.to(work)
    delta = (da * (a + (rho / n).unsqueeze(-1))).sum(dim=-1, keepdim=True)
    t = da - delta
    dp = a * t
    if eps > 0:
        dm = rho * (da.mean(dim=-1) - delta.squeeze(-1))
        dp = dp.scatter_add(-1, first_argmax(p).long().unsqueeze(-1), dm.unsqueeze(-1))
    if keep is None:
        return dp, torch.zeros((b, n), dtype=work, device=scores.device)
    off_diag = 1.0 - torch.eye(n, dtype=work, device=scores.device)
    dkeep = (e * t * off_diag).sum(dim=(1, 2))
    return dp, dkeep
