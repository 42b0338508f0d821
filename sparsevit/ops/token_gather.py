"""Token dropping: gather, scatter and select token rows, with autograd, on every backend.

DynamicViT (Rao et al., NeurIPS 2021, Sec. 3.4) and data-level patch tickets (Shen et
al., IJCAI 2023) drop tokens physically at inference: keep the rows of ``x (B, N, C)``
listed by ``index (B, K)`` and run later blocks on ``(B, K, C)``.

* :func:`gather_tokens`       ``out[b, k] = x[b, index[b, k]]``; its gradient is
  :func:`scatter_add_tokens`.
* :func:`scatter_tokens`      the inverse placement into a ``(B, N, C)`` map (a fill
  value or a given ``base``); its gradient gathers.  A repeated index (allowed with
  ``check_index=False``) takes its last row, on every backend.
* :func:`scatter_add_tokens`  ``out[b, i] = Σ_{k: index[b, k] = i} src[b, k]`` (float32 sums).
  With ``torch.use_deterministic_algorithms(True)`` the sums (and the gradient of
  :func:`gather_tokens`) avoid float atomics and are bitwise reproducible.
* :func:`select_tokens`       prefix tokens plus the top-``keep`` scored others.

Each op is a ``torch.library`` custom op (``torch.ops.sparsevit.gather_tokens`` ...)
with a fake kernel and registered autograd, so ``torch.compile(fullgraph=True)``
traces through it.  The backend (``cuda``, ``triton``, ``torch``) is chosen by
:func:`sparsevit.backend.choose_backend`.
"""

from __future__ import annotations

import numbers

from typing import Optional

import torch

from .. import reference
from ..backend import OpSupport, Support, choose_backend
from ..rounding import ceil_fraction
from . import token_gather_torch
from .validation import (
    check_float,
    check_index_range,
    check_index_tensor,
    check_same_device,
    check_tensor,
    data_check,
    optional_int,
)

__all__ = ["gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens", "TOKEN_SUPPORT"]

TOKEN_SUPPORT = OpSupport(
    op="token_gather",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "triton": Support(),
        "torch": Support(),
    },
)


# ----------------------------------------------------------------------------------
# Backend implementations (no autograd; index is int64 and its range already checked)
# ----------------------------------------------------------------------------------
def _triton():
    from ..kernels import token_gather

    return token_gather


def _gather_impl(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.sparsevit.gather_tokens_cuda(x, index)
    if backend == "triton":
        return _triton().gather_tokens(x, index)
    return token_gather_torch.gather_tokens(x, index)


def _scatter_impl(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.sparsevit.scatter_tokens_cuda(src, index, base)
    if backend == "triton":
        return _triton().scatter_tokens(src, index, base.contiguous().clone())
    return token_gather_torch.scatter_tokens(src, index, base)


def _scatter_add_impl(src: torch.Tensor, index: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    if backend != "torch" and torch.are_deterministic_algorithms_enabled():
        # The float atomics of the cuda/triton kernels sum in a run-dependent order.
        if backend == "triton":
            return _triton().scatter_add_tokens_deterministic(src, index, n).to(src.dtype)
        # index_add_ is deterministic on CUDA in this mode (PyTorch's documented list).
        return token_gather_torch.scatter_add_tokens(src, index, n)
    if backend == "cuda":
        return torch.ops.sparsevit.scatter_add_tokens_cuda(src, index, n)
    if backend == "triton":
        acc = torch.zeros((src.shape[0], n, src.shape[2]), dtype=torch.float32, device=src.device)
        return _triton().scatter_add_tokens(src, index, acc).to(src.dtype)
    return token_gather_torch.scatter_add_tokens(src, index, n)


# ----------------------------------------------------------------------------------
# Custom ops: schema, fake kernel, autograd
# ----------------------------------------------------------------------------------
@torch.library.custom_op("sparsevit::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    return _gather_impl(x, index, backend)


@_gather_op.register_fake
def _(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@torch.library.custom_op("sparsevit::scatter_tokens", mutates_args=())
def _scatter_op(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor, backend: str) -> torch.Tensor:
    return _scatter_impl(src, index, base, backend)


@_scatter_op.register_fake
def _(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor, backend: str) -> torch.Tensor:
    return base.new_empty(base.shape)


@torch.library.custom_op("sparsevit::scatter_add_tokens", mutates_args=())
def _scatter_add_op(src: torch.Tensor, index: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    return _scatter_add_impl(src, index, n, backend)


@_scatter_add_op.register_fake
def _(src: torch.Tensor, index: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    return src.new_empty((src.shape[0], n, src.shape[2]))


def _gather_setup(ctx, inputs, output) -> None:
    x, index, backend = inputs
    ctx.save_for_backward(index)
    ctx.n = x.shape[1]
    ctx.backend = backend


def _gather_backward(ctx, grad: torch.Tensor):
    (index,) = ctx.saved_tensors
    return _scatter_add_op(grad, index, ctx.n, ctx.backend), None, None


def _scatter_setup(ctx, inputs, output) -> None:
    src, index, base, backend = inputs
    ctx.save_for_backward(index)
    ctx.src_shape = src.shape
    ctx.backend = backend


def _scatter_backward(ctx, grad: torch.Tensor):
    (index,) = ctx.saved_tensors
    grad_src = grad_base = None
    if ctx.needs_input_grad[0]:
        grad_src = _gather_op(grad, index, ctx.backend)
    if ctx.needs_input_grad[2]:
        # The rows overwritten by src receive no gradient from the output.
        grad_base = _scatter_op(grad.new_zeros(ctx.src_shape), index, grad, ctx.backend)
    return grad_src, None, grad_base, None


def _scatter_add_setup(ctx, inputs, output) -> None:
    src, index, n, backend = inputs
    ctx.save_for_backward(index)
    ctx.backend = backend


def _scatter_add_backward(ctx, grad: torch.Tensor):
    (index,) = ctx.saved_tensors
    return _gather_op(grad, index, ctx.backend), None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)
_scatter_add_op.register_autograd(_scatter_add_backward, setup_context=_scatter_add_setup)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def _check_index(index: object, batch: int, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    index = check_tensor("index", index, 2, "(B, K)")
    check_index_tensor("index", index)
    check_same_device([(ref_name, ref), ("index", index)])
    if index.shape[0] != batch:
        raise ValueError(f"index must be (B, K) with B={batch} matching {ref_name}, got shape {tuple(index.shape)}")
    return index.long()


def gather_tokens(
    x: torch.Tensor, index: torch.Tensor, *, check_index: bool = True, backend: Optional[str] = None
) -> torch.Tensor:
    """Gather token rows: ``out[b, k, :] = x[b, index[b, k], :]``.

    Args:
        x: (B, N, C) float32/float16/bfloat16, any strides.
        index: (B, K) integer tensor with entries in ``[0, N)``; K may be 0 or exceed N
            (repeats are allowed).
        check_index: verify the index range (one device sync). With ``False`` the check
            is skipped for speed; an out-of-range entry then yields a zero row and never
            reads out of bounds.
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None (``SPARSEVIT_BACKEND``, else
            the fastest available).

    Returns:
        (B, K, C) contiguous, dtype of ``x``.  Gradient: ``dx = scatter_add_tokens(dout, index, N)``.
    """
    x = check_tensor("x", x, 3, "(B, N, C)")
    check_float("x", x)
    index = _check_index(index, x.shape[0], x, "x")
    if check_index:
        check_index_range("index", index, x.shape[1], "N")
    name = choose_backend(TOKEN_SUPPORT, [x, index], backend)
    return _gather_op(x, index, name)


def scatter_tokens(
    src: torch.Tensor,
    index: torch.Tensor,
    n: Optional[int] = None,
    fill: float = 0.0,
    *,
    base: Optional[torch.Tensor] = None,
    check_index: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Place token rows back into a full map: ``out[b, index[b, k], :] = src[b, k, :]``.

    The rows not listed in ``index`` are ``fill`` (a new ``(B, n, C)`` map) or those of
    ``base`` (B, N, C), which is not modified.

    Args:
        src: (B, K, C) float32/float16/bfloat16.
        index: (B, K) integer, entries in ``[0, N)`` and distinct within a row (both
            checked unless ``check_index=False``).
        n: number of tokens N of the output (required unless ``base`` is given).
        fill: value of the rows not in ``index`` when no ``base`` is given.
        base: optional (B, N, C) tensor supplying the other rows (gets gradient there).
        check_index: verify range and distinctness (one device sync). With ``False``
            an out-of-range entry is skipped and a repeated entry is allowed: the last
            one wins, ``out[b, i] = src[b, k*]`` with ``k* = max{k : index[b, k] = i}``,
            deterministically on every backend (the repeats are resolved before the
            kernel runs, so no two writers race).
        backend: as in :func:`gather_tokens`.

    Returns:
        (B, N, C) contiguous.  Gradients: ``dsrc = gather_tokens(dout, index)`` for the
        rows that win (zero for overwritten and skipped rows), ``dbase = dout`` with
        the rows in ``index`` zeroed.
    """
    src = check_tensor("src", src, 3, "(B, K, C)")
    check_float("src", src)
    index = _check_index(index, src.shape[0], src, "src")
    if index.shape[1] != src.shape[1]:
        raise ValueError(f"index must be (B, K) with K={src.shape[1]} matching src, got shape {tuple(index.shape)}")
    if base is None:
        n = optional_int("n", n)
        if n is None:
            raise ValueError("n (the number of output tokens) is required when base is not given")
        if not isinstance(fill, (int, float)) or isinstance(fill, bool):
            raise TypeError(f"fill must be a float, got {type(fill).__name__}")
        base = src.new_full((src.shape[0], n, src.shape[2]), float(fill))
    else:
        base = check_tensor("base", base, 3, "(B, N, C)")
        check_same_device([("src", src), ("base", base)])
        if base.dtype != src.dtype:
            raise TypeError(f"base must have the dtype of src ({src.dtype}), got {base.dtype}")
        if base.shape[0] != src.shape[0] or base.shape[2] != src.shape[2]:
            raise ValueError(
                f"base must be (B, N, C) with B={src.shape[0]}, C={src.shape[2]} as src, got {tuple(base.shape)}"
            )
        if n is not None and n != base.shape[1]:
            raise ValueError(f"n={n} disagrees with base.shape[1]={base.shape[1]}")
    if check_index:
        check_index_range("index", index, base.shape[1], "N")
        _check_distinct(index)
    else:
        index = _last_wins(index, base.shape[1])
    name = choose_backend(TOKEN_SUPPORT, [src, index], backend)
    return _scatter_op(src, index, base, name)


def _check_distinct(index: torch.Tensor) -> None:
    if index.shape[1] < 2:
        return
    ordered = torch.sort(index, dim=1).values
    data_check(~(ordered[:, 1:] == ordered[:, :-1]).any(), "index entries must be distinct within each row")


def _last_wins(index: torch.Tensor, n: int) -> torch.Tensor:
    """``index`` with every entry overwritten by a later equal one set to -1 (skipped).

    A stable sort groups equal entries in ascending ``k``; the last of each group wins.
    Out-of-range entries are skipped by every backend whether or not they are kept.
    """
    if index.shape[1] < 2:
        return index
    key = torch.where((index >= 0) & (index < n), index, -1)
    order = torch.argsort(key, dim=1, stable=True)
    ordered = key.gather(1, order)
    last = torch.cat([ordered[:, 1:] != ordered[:, :-1], torch.ones_like(ordered[:, :1], dtype=torch.bool)], dim=1)
    wins = torch.empty_like(last).scatter_(1, order, last)
    return torch.where(wins, index, -1)


def scatter_add_tokens(
    src: torch.Tensor,
    index: torch.Tensor,
    n: int,
    *,
    check_index: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sum token rows into a zero map: ``out[b, i, :] = Σ_{k : index[b, k] = i} src[b, k, :]``.

    The sums run in float32 and are cast to ``src.dtype``.  This is the adjoint (the
    gradient) of :func:`gather_tokens`; repeated indices add up.  On the ``cuda`` and
    ``triton`` backends the sums use float atomics (the order, hence the last bits,
    varies between runs) unless ``torch.are_deterministic_algorithms_enabled()``: then
    ``triton`` runs a sort-based segment sum (ascending ``k``, the reference's order)
    and ``cuda`` PyTorch's ``index_add_`` (deterministic in that mode), so the result
    is bitwise reproducible.  The same holds for the gradient of :func:`gather_tokens`.

    Args:
        src: (B, K, C) float32/float16/bfloat16.
        index: (B, K) integer, entries in ``[0, n)``.
        n: number of output tokens.
        check_index: verify the range; with ``False`` out-of-range entries are skipped.
        backend: as in :func:`gather_tokens`.

    Returns:
        (B, n, C).  Gradient: ``dsrc = gather_tokens(dout, index)``.
    """
    src = check_tensor("src", src, 3, "(B, K, C)")
    check_float("src", src)
    index = _check_index(index, src.shape[0], src, "src")
    if index.shape[1] != src.shape[1]:
        raise ValueError(f"index must be (B, K) with K={src.shape[1]} matching src, got shape {tuple(index.shape)}")
    n = optional_int("n", n)
    if n is None:
        raise ValueError("n must be an int >= 0, got None")
    if check_index:
        check_index_range("index", index, n, "n")
    name = choose_backend(TOKEN_SUPPORT, [src, index], backend)
    return _scatter_add_op(src, index, n, name)


def select_tokens(
    x: torch.Tensor,
    scores: torch.Tensor,
    keep: "int | float | None" = None,
    *,
    keep_count: Optional[int] = None,
    keep_ratio: Optional[float] = None,
    num_prefix: int = 1,
    order: str = "position",
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the ``keep`` highest-scoring other tokens.

    With M = N − num_prefix ranked tokens, the kept indices are
    ``[0, …, num_prefix−1] ++ (num_prefix + topk(scores, keep))``; the prefix
    (class / register / distillation tokens) is always kept and always first.

    Args:
        x: (B, N, C) tokens.
        scores: (B, M) scores of the non-prefix tokens, or (B, N) of all tokens (the
            prefix entries are then ignored).  Higher is kept.  No gradient flows to
            ``scores`` (the choice is discrete).
        keep: number of non-prefix tokens to keep (an int in ``[0, M]``), or a fraction
            (a float in ``[0, 1]``) giving ``⌈keep · M⌉`` (DynamicViT's ⌈ρ·N⌉), rounded
            exactly on the decimal written (``0.28`` of 25 keeps 7; see
            :func:`sparsevit.rounding.ceil_fraction`).  The type decides: ``1`` keeps one
            token, ``1.0`` all of them.  To say which without relying on the type, give
            ``keep_count=`` or ``keep_ratio=`` instead: exactly one of the three.
        keep_count: number of non-prefix tokens to keep (int in ``[0, M]``).
        keep_ratio: fraction of the non-prefix tokens to keep (in ``[0, 1]``; an int 0 or 1
            is read as 0.0 or 1.0 here).
        num_prefix: leading tokens always kept.
        order: ``"position"`` (default): kept tokens in ascending position, friendly
            to positional logic; ``"score"``: descending score, as in DynamicViT.
        backend: backend of the gather, as in :func:`gather_tokens`.

    Returns:
        ``(tokens (B, num_prefix + keep, C), index (B, num_prefix + keep) int64)``;
        the gradient reaches ``x`` through the gather.
    """
    x = check_tensor("x", x, 3, "(B, N, C)")
    check_float("x", x)
    num_prefix = optional_int("num_prefix", num_prefix)
    b, n, _ = x.shape
    if num_prefix > n:
        raise ValueError(f"num_prefix must be <= N={n}, got {num_prefix}")
    m = n - num_prefix
    scores = check_tensor("scores", scores, 2, "(B, N - num_prefix) or (B, N)")
    check_same_device([("x", x), ("scores", scores)])
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"scores must be a real-valued tensor, got {scores.dtype}")
    if scores.shape[0] != b or scores.shape[1] not in (m, n):
        raise ValueError(f"scores must be (B, {m}) or (B, {n}) for x of shape {tuple(x.shape)}, got {tuple(scores.shape)}")
    if scores.shape[1] == n and num_prefix:
        scores = scores[:, num_prefix:]
    count = _keep_count(keep, keep_count, keep_ratio, m)
    if order not in ("position", "score"):
        raise ValueError(f"order must be 'position' or 'score', got {order!r}")
    index = reference.select_index(scores.detach(), count, num_prefix, order)
    name = choose_backend(TOKEN_SUPPORT, [x, index], backend)
    return _gather_op(x, index, name), index


def _keep_count(keep: object, keep_count: object, keep_ratio: object, m: int) -> int:
    """The number of non-prefix tokens to keep, from exactly one of the three arguments."""
    given = [name for name, v in (("keep", keep), ("keep_count", keep_count), ("keep_ratio", keep_ratio)) if v is not None]
    if len(given) != 1:
        raise TypeError(f"give exactly one of keep, keep_count, keep_ratio; got {', '.join(given) or 'none'}")
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
            raise TypeError(f"keep_ratio must be a float fraction, got {type(keep_ratio).__name__}")
        return _ratio_count("keep_ratio", float(keep_ratio), m)
    name, value = ("keep_count", keep_count) if keep_count is not None else ("keep", keep)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        expected = "an int count" if name == "keep_count" else "an int count or a float fraction"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not isinstance(value, numbers.Integral):
        if name == "keep_count":
            raise TypeError(f"keep_count must be an int, got {type(value).__name__} {value!r} (a fraction: keep_ratio=)")
        return _ratio_count(name, float(value), m)
    value = int(value)
    if not 0 <= value <= m:
        raise ValueError(f"{name} must lie in [0, {m}] (tokens available after the prefix), got {value}")
    return value


def _ratio_count(name: str, ratio: float, m: int) -> int:
    if not 0.0 <= ratio <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} as a fraction must lie in [0, 1], got {ratio}")
    return min(m, ceil_fraction(ratio, m))
