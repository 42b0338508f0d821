"""Property tests of the token ops: gather / scatter / scatter-add / select, every backend.

Each op is compared on generated cases with :mod:`sparsevit.reference` and with an
independent loop implementation of its definition (DynamicViT's token dropping,
Rao et al. 2021, Sec. 3.4):

* ``gather_tokens``:      ``out[b, k] = x[b, index[b, k]]``, a zero row for an index
  outside ``[0, N)`` (``check_index=False``); bit-exact, gradient = the float64 sums;
* ``scatter_tokens``:     ``out = base``; rows written in order k = 0, 1, …, so with a
  repeated index the last row wins and the overwritten ones get no gradient;
  out-of-range indices are skipped;
* ``scatter_add_tokens``: float32 sums of the rows with the same index;
* ``select_tokens``:      the prefix plus the ``⌈ρ·M⌉`` (exact, on the decimal written)
  best-scoring others, in position or score order.

Cases cover B = 0 and 1, N = 0 (nothing in range), K = 0, K > N, C = 0, odd sizes,
every index dtype, and inputs stored transposed, sliced or broadcast (stride 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import sparsevit
from sparsevit import reference
from sparsevit.ops.token_gather import TOKEN_SUPPORT
from strategies import (
    DEVICE,
    DTYPES,
    Stride,
    assert_matches,
    backend_params,
    backends_for,
    examples,
    expected_backends,
    generator,
    grads,
    operand,
    randn,
    run_fwd_bwd,
    strides,
)

BACKENDS = backend_params(TOKEN_SUPPORT)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def test_expected_backends_are_available() -> None:
    """torch and triton (and cuda on a GPU) must all run here: none may drop out silently."""
    missing = set(expected_backends(TOKEN_SUPPORT)) - set(backends_for(TOKEN_SUPPORT))
    assert not missing, f"token ops: backends {sorted(missing)} cannot run on {DEVICE}; see sparsevit.backend_table()"


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenCase:
    """``x``/``base`` (B, N, C), ``src``/``index`` (B, K); ``index_kind`` says which
    entries ``index`` holds: ``distinct`` / ``repeats`` (in range), ``out_of_range``
    (some outside ``[0, N)``), ``repeats_out_of_range`` (both)."""

    b: int
    n: int
    c: int
    k: int
    dtype: torch.dtype
    index_kind: str
    index_dtype: torch.dtype
    data_stride: Stride
    index_stride: Stride
    seed: int


@st.composite
def token_cases(draw, kinds: tuple[str, ...]) -> TokenCase:
    b = draw(st.sampled_from([1, 2, 3, 1, 2, 0]))
    n = draw(st.sampled_from([0, 1, 2, 5, 7, 16, 17, 31, 40]))
    kind = draw(st.sampled_from(kinds))
    if n == 0 and kind in ("distinct", "repeats"):
        kind = "out_of_range" if any("out_of_range" in k for k in kinds) else kind
    if kind == "distinct":
        k = draw(st.integers(0, n))
    elif n == 0 and "out_of_range" not in kind:
        k = 0  # nothing in range to point at
    else:
        k = draw(st.sampled_from([0, 1, 3, 6, 13, 40]))
    c = draw(st.sampled_from([0, 1, 3, 8, 13, 24]))
    return TokenCase(
        b=b, n=n, c=c, k=k,
        dtype=draw(st.sampled_from(DTYPES)),
        index_kind=kind,
        index_dtype=draw(st.sampled_from(INDEX_DTYPES)),
        data_stride=draw(strides(3, expandable=(0, 2), transposable=((1, 2), (0, 1)))),
        index_stride=draw(strides(2, expandable=(0,), transposable=((0, 1),))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_index(case: TokenCase, n: Optional[int] = None) -> torch.Tensor:
    """(B, K) index of ``case.index_dtype`` stored as ``case.index_stride``, as its kind says."""
    n = case.n if n is None else n
    gen = generator(case.seed + 1)
    b, k = case.b, case.k
    if case.index_kind == "distinct":
        rows = [torch.randperm(n, generator=gen)[:k] for _ in range(b)]
        index = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    else:
        index = torch.randint(0, max(n, 1), (b, k), generator=gen)
        if case.index_kind == "repeats" and k > 1 and n > 0:
            index[:, 1::2] = index[:, : k // 2]  # force repeats within each row
        if "out_of_range" in case.index_kind:
            if "repeats" in case.index_kind and k > 1:
                index[:, 1::2] = index[:, : k // 2]
            bad = torch.tensor([-1, n, n + 3, -7, 100])
            pick = torch.rand(b, k, generator=gen) < 0.4
            index = torch.where(pick, bad[torch.randint(0, 5, (b, k), generator=gen)], index)
            if n == 0:
                index = bad[torch.randint(0, 5, (b, k), generator=gen)]
    if case.index_dtype == torch.uint8:
        index = torch.where(index < 0, torch.full_like(index, 255), index)  # still out of range
    index = case.index_stride.values(index.to(case.index_dtype).to(DEVICE))
    return index


def has_bad(index: torch.Tensor, n: int) -> bool:
    return bool(((index.long() < 0) | (index.long() >= n)).any()) if index.numel() else False


# ----------------------------------------------------------------------------------
# Independent loop implementations of the definitions (float64, differentiable)
# ----------------------------------------------------------------------------------
def loop_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    out = x.new_zeros(b, index.shape[1], c)
    for bi in range(b):
        for ki, i in enumerate(index[bi].tolist()):
            if 0 <= i < n:
                out[bi, ki] = x[bi, i]
    return out


def loop_scatter(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Rows written in order k = 0, 1, …: a repeated destination keeps the last one."""
    b, n, _ = base.shape
    out = base.clone()
    for bi in range(b):
        for ki, i in enumerate(index[bi].tolist()):
            if 0 <= i < n:
                out[bi, i] = src[bi, ki]
    return out


def loop_scatter_add(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    b, _, c = src.shape
    out = src.new_zeros(b, n, c)
    for bi in range(b):
        for ki, i in enumerate(index[bi].tolist()):
            if 0 <= i < n:
                out[bi, i] = out[bi, i] + src[bi, ki]
    return out


def assert_bitwise(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (
        f"{name}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
    )
    assert torch.equal(got, want), f"{name}: differs (max |diff| {(got.double() - want.double()).abs().max().item():.3g})"


# ----------------------------------------------------------------------------------
# gather_tokens
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(case=token_cases(("repeats", "distinct", "out_of_range", "repeats_out_of_range")))
@example(case=TokenCase(1, 0, 4, 3, torch.float32, "out_of_range", torch.int64, Stride(), Stride(), 0))  # N = 0
@example(case=TokenCase(2, 7, 0, 5, torch.float16, "repeats", torch.int32, Stride(), Stride(), 1))  # C = 0
@example(case=TokenCase(0, 5, 3, 2, torch.bfloat16, "repeats", torch.int64, Stride(), Stride(), 2))  # B = 0
def test_gather_tokens(backend: str, case: TokenCase) -> None:
    x = operand(randn(generator(case.seed), case.b, case.n, case.c), case.data_stride, case.dtype)
    index = make_index(case)
    check = not has_bad(index, case.n)
    x_op, x_own, x_exact = x.inputs()
    grad = randn(generator(case.seed + 2), case.b, case.k, case.c).to(case.dtype).double()

    got = run_fwd_bwd(lambda t: sparsevit.gather_tokens(t, index, check_index=check, backend=backend), [x_op], grad)
    own = run_fwd_bwd(lambda t: reference.gather_tokens(t, index.long()), [x_own], grad)
    truth = run_fwd_bwd(lambda t: loop_gather(t, index), [x_exact], grad.double())

    assert got[0].is_contiguous(), "gather_tokens must return a contiguous tensor"
    # a copy: bit-exact, against the definition and against the reference
    assert_bitwise("out vs loop", got[0], truth[0].to(case.dtype))
    assert_bitwise("out vs reference", got[0], own[0])
    assert_matches("dx", got[1], truth[1], case.dtype, own=own[1])


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(case=token_cases(("out_of_range", "repeats_out_of_range")))
def test_checked_gather_rejects_out_of_range(backend: str, case: TokenCase) -> None:
    index = make_index(case)
    assume(has_bad(index, case.n))
    x = torch.zeros(case.b, case.n, case.c, dtype=case.dtype, device=DEVICE)
    with pytest.raises(ValueError, match="index"):
        sparsevit.gather_tokens(x, index, backend=backend)


# ----------------------------------------------------------------------------------
# scatter_tokens
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScatterCase:
    tokens: TokenCase
    with_base: bool
    fill: float


@st.composite
def scatter_cases(draw) -> ScatterCase:
    tokens = draw(token_cases(("distinct", "repeats", "out_of_range", "repeats_out_of_range")))
    return ScatterCase(tokens, draw(st.booleans()), draw(st.sampled_from([0.0, -2.5, 3.0])))


def _scatter_case(kind: str, seed: int, b: int = 2, n: int = 6, c: int = 5, k: int = 9) -> ScatterCase:
    return ScatterCase(TokenCase(b, n, c, k, torch.float32, kind, torch.int64, Stride(), Stride(), seed), True, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(case=scatter_cases())
@example(case=_scatter_case("repeats", 3))  # duplicates: the last row wins
@example(case=_scatter_case("repeats_out_of_range", 4))
@example(case=ScatterCase(TokenCase(2, 7, 0, 3, torch.float16, "distinct", torch.int64, Stride(), Stride(), 5), True, 0.0))
def test_scatter_tokens(backend: str, case: ScatterCase) -> None:
    """Forward and both gradients equal the in-order ("last wins") loop, bit for bit."""
    t = case.tokens
    src = operand(randn(generator(t.seed), t.b, t.k, t.c), t.data_stride, t.dtype)
    base = operand(randn(generator(t.seed + 3), t.b, t.n, t.c), t.data_stride, t.dtype)
    index = make_index(t)
    check = t.index_kind == "distinct"
    grad = randn(generator(t.seed + 2), t.b, t.n, t.c).to(t.dtype).double()
    s_op, s_own, s_exact = src.inputs()
    b_op, b_own, b_exact = base.inputs() if case.with_base else (None, None, None)

    def op(s, bb):
        if case.with_base:
            return sparsevit.scatter_tokens(s, index, base=bb, check_index=check, backend=backend)
        return sparsevit.scatter_tokens(s, index, t.n, fill=case.fill, check_index=check, backend=backend)

    def full_base(bb, dtype):
        return bb if case.with_base else torch.full((t.b, t.n, t.c), case.fill, dtype=dtype, device=DEVICE)

    got = run_fwd_bwd(op, [s_op, b_op], grad)
    own = run_fwd_bwd(lambda s, bb: reference.scatter_tokens(s, index.long(), full_base(bb, t.dtype)), [s_own, b_own], grad)
    truth = run_fwd_bwd(lambda s, bb: loop_scatter(s, index, full_base(bb, torch.float64)), [s_exact, b_exact],
                        grad.double())

    assert got[0].is_contiguous(), "scatter_tokens must return a contiguous tensor"
    # a copy: the forward and the gradients (copies of dout rows, or zeros) are exact
    for name, g, r in zip(("out", "dsrc", "dbase"), got, truth):
        if r is None:
            assert g is None, name
            continue
        assert_bitwise(f"{name} vs loop", g, r.to(t.dtype))
    for name, g, r in zip(("out", "dsrc", "dbase"), got, own):
        if r is not None:
            assert_bitwise(f"{name} vs reference", g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(case=token_cases(("repeats", "out_of_range", "repeats_out_of_range")))
def test_checked_scatter_rejects_repeats_and_out_of_range(backend: str, case: TokenCase) -> None:
    index = make_index(case)
    idx = index.long()
    repeated = idx.shape[1] > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any())
    assume(repeated or has_bad(index, case.n))
    src = torch.zeros(case.b, case.k, case.c, dtype=case.dtype, device=DEVICE)
    with pytest.raises(ValueError, match="index"):
        sparsevit.scatter_tokens(src, index, case.n, backend=backend)


# ----------------------------------------------------------------------------------
# scatter_add_tokens
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(case=token_cases(("repeats", "distinct", "out_of_range", "repeats_out_of_range")), extra=st.sampled_from([0, 0, 3]))
@example(case=TokenCase(2, 7, 0, 5, torch.float32, "repeats", torch.int64, Stride(), Stride(), 6), extra=0)  # C = 0
@example(case=TokenCase(1, 0, 3, 4, torch.bfloat16, "out_of_range", torch.int64, Stride(), Stride(), 7), extra=0)  # n = 0
def test_scatter_add_tokens(backend: str, case: TokenCase, extra: int) -> None:
    """Float32 sums of repeated rows (out-of-range skipped), output n = N + extra rows."""
    n = case.n + extra
    src = operand(randn(generator(case.seed), case.b, case.k, case.c), case.data_stride, case.dtype)
    index = make_index(case)
    check = not has_bad(index, n)
    grad = randn(generator(case.seed + 2), case.b, n, case.c).to(case.dtype).double()
    s_op, s_own, s_exact = src.inputs()

    got = run_fwd_bwd(lambda s: sparsevit.scatter_add_tokens(s, index, n, check_index=check, backend=backend),
                      [s_op], grad)
    own = run_fwd_bwd(lambda s: reference.scatter_add_tokens(s, index.long(), n), [s_own], grad)
    truth = run_fwd_bwd(lambda s: loop_scatter_add(s, index, n), [s_exact], grad.double())

    assert got[0].dtype == case.dtype
    assert_matches("out", got[0], truth[0], case.dtype, own=own[0])
    assert_bitwise("dsrc vs loop", got[1], truth[1].to(case.dtype))  # a gather of dout: exact


@pytest.mark.parametrize("backend", BACKENDS)
@examples(8)
@given(case=token_cases(("repeats",)))
def test_atomic_ops_are_reproducible_in_deterministic_mode(backend: str, case: TokenCase) -> None:
    """Under ``torch.use_deterministic_algorithms(True)`` the sums (scatter-add, the gather
    backward) are bitwise reproducible, on the GPU too."""
    src = randn(generator(case.seed), case.b, case.k, case.c).to(case.dtype)
    x = randn(generator(case.seed + 1), case.b, case.n, case.c).to(case.dtype).requires_grad_()
    index = make_index(case)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            summed = sparsevit.scatter_add_tokens(src, index, case.n, backend=backend)
            (dx,) = torch.autograd.grad(sparsevit.gather_tokens(x, index, backend=backend), [x], src)
            runs.append((summed, dx))
    finally:
        torch.use_deterministic_algorithms(before)
    assert_bitwise("scatter_add run 2 vs run 1", runs[1][0], runs[0][0])
    assert_bitwise("gather backward run 2 vs run 1", runs[1][1], runs[0][1])


# ----------------------------------------------------------------------------------
# select_tokens
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectCase:
    b: int
    n: int
    c: int
    num_prefix: int
    keep: object  # int count, or a decimal fraction numerator/10**digits
    numerator: int
    digits: int
    order: str
    full_scores: bool
    dtype: torch.dtype
    score_dtype: torch.dtype
    stride: Stride
    seed: int


@st.composite
def select_cases(draw) -> SelectCase:
    n = draw(st.sampled_from([1, 2, 5, 17, 25, 26, 40]))
    num_prefix = draw(st.integers(0, min(2, n)))
    m = n - num_prefix
    fraction = draw(st.booleans()) and m > 0
    digits = draw(st.sampled_from([1, 2, 3]))
    numerator = draw(st.integers(1, 10**digits)) if fraction else 0
    keep: object = numerator / 10**digits if fraction else draw(st.integers(0, m))
    return SelectCase(
        b=draw(st.sampled_from([1, 2, 3])), n=n, c=draw(st.sampled_from([0, 1, 5, 24])), num_prefix=num_prefix,
        keep=keep, numerator=numerator, digits=digits, order=draw(st.sampled_from(["position", "score"])),
        full_scores=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        score_dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64])),
        stride=draw(strides(3, expandable=(0,), transposable=((1, 2),))), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _select_case(n: int, num_prefix: int, numerator: int, digits: int) -> SelectCase:
    return SelectCase(1, n, 3, num_prefix, numerator / 10**digits, numerator, digits, "position", False,
                      torch.float32, torch.float32, Stride(), 11)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(30)
@given(case=select_cases())
@example(case=_select_case(26, 1, 28, 2))  # keep=0.28 of M=25: exactly 7, not 8
@example(case=_select_case(17, 0, 7, 1))  # 0.7 of 17 = 11.9 -> 12
def test_select_tokens(backend: str, case: SelectCase) -> None:
    """The prefix then the ``⌈ρ·M⌉`` (exact integer arithmetic) highest-scoring tokens."""
    m = case.n - case.num_prefix
    gen = generator(case.seed)
    # distinct scores (a permutation; exact in every score dtype) make the kept set unique
    ranks = torch.stack([torch.randperm(m, generator=gen) for _ in range(case.b)]).to(case.score_dtype).to(DEVICE)
    scores = ranks
    if case.full_scores:  # (B, N): the prefix entries are ignored
        scores = torch.cat([torch.full((case.b, case.num_prefix), 1000, dtype=case.score_dtype, device=DEVICE), ranks], 1)
    count = -(-case.numerator * m // 10**case.digits) if isinstance(case.keep, float) else case.keep

    x = operand(randn(gen, case.b, case.n, case.c), case.stride, case.dtype)
    x_op, x_own, x_exact = x.inputs()
    grad = randn(gen, case.b, case.num_prefix + count, case.c).to(case.dtype).double()
    out = sparsevit.select_tokens(x_op, scores, case.keep, num_prefix=case.num_prefix, order=case.order,
                                  backend=backend)
    tokens, index = out
    assert index.dtype == torch.int64 and tuple(index.shape) == (case.b, case.num_prefix + count), (
        f"kept {tuple(index.shape)}, expected {case.num_prefix} prefix + ⌈{case.keep}·{m}⌉ = {count} tokens"
    )
    # the definition, by sorting in Python
    for bi in range(case.b):
        by_score = sorted(range(m), key=lambda j: -ranks[bi, j].item())[:count]
        chosen = sorted(by_score) if case.order == "position" else by_score
        want = list(range(case.num_prefix)) + [j + case.num_prefix for j in chosen]
        assert index[bi].tolist() == want, f"batch {bi}: kept {index[bi].tolist()}, expected {want}"
    ref_tokens, ref_index = reference.select_tokens(x_own, ranks, count, case.num_prefix, case.order)
    assert torch.equal(index, ref_index)
    assert_bitwise("tokens vs reference", tokens.detach(), ref_tokens.detach())
    (dx,) = grads(tokens, [x_op], grad.to(case.dtype))
    (dx_exact,) = grads(loop_gather(x_exact, index), [x_exact], grad.double())
    (dx_own,) = grads(ref_tokens, [x_own], grad.to(case.dtype))
    assert_matches("dx", dx, dx_exact, case.dtype, own=dx_own)
