"""Property tests of DynamicViT's masked softmax and masked attention, every backend.

DynamicViT (Rao et al., NeurIPS 2021, Sec. 3.3, Eq. 11), as the public
``softmax_with_policy``: with ``m_i = max_j P_ij`` over all keys and ``G_ij = 1`` if
``i = j`` else ``keep_j``,

    Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps),   out = Ã V.

The truth is that formula evaluated in float64 and differentiated by autograd,
through the row max as the public code does (the gradient reaches the first maximal
key).  Every op is compared with it and with :mod:`sparsevit.reference` evaluated in
float64, forward and every gradient (dq, dk, dv, dkeep; dscores, dkeep), on
generated cases:

* keep patterns: none, all ones, hard 0/1 (bool and float), soft, soft near 0/1,
  all zeros, class token only;
* logit scales 1, 4 and 16, and the dropped-max regime: a dropped key 8 to 100 above
  the others, so the kept weights ``exp(P − m)`` leave fp16's range (> ~10 below the
  max: subnormal; > ~17: zero) and the kept mass ``Σ exp(P − m) G`` is small next to
  eps, where the gradient through the max is as large as the gradient itself;
* eps 0, 1e-6 and 1e-2; default and explicit scales; N from 0 to 24 (odd sizes),
  D from 0 to 32, batch 1; q, k, v (and the scores) stored transposed, sliced or
  broadcast over the batch or the heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import sparsevit
from sparsevit import reference
from sparsevit.ops.masked_attention import MASKED_ATTENTION_SUPPORT
from sparsevit.ops.masked_softmax import MASKED_SOFTMAX_SUPPORT
from strategies import (
    DEVICE,
    DTYPES,
    LOW_PRECISION,
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
    strides,
)

ATTENTION_BACKENDS = backend_params(MASKED_ATTENTION_SUPPORT)
SOFTMAX_BACKENDS = backend_params(MASKED_SOFTMAX_SUPPORT)
KEEP_KINDS = ("none", "ones", "bool", "hard", "soft", "soft_extreme", "zeros", "class_only")


@pytest.mark.parametrize("support", [MASKED_ATTENTION_SUPPORT, MASKED_SOFTMAX_SUPPORT], ids=lambda s: s.op)
def test_expected_backends_are_available(support) -> None:
    missing = set(expected_backends(support)) - set(backends_for(support))
    assert not missing, f"{support.op}: backends {sorted(missing)} cannot run on {DEVICE}"


# ----------------------------------------------------------------------------------
# The truth: the public formula, float64, gradient through the row max
# ----------------------------------------------------------------------------------
def dynamicvit_softmax(attn: torch.Tensor, keep: Optional[torch.Tensor], eps: float, exp_dtype: torch.dtype) -> torch.Tensor:
    """The public ``softmax_with_policy``; ``exp_dtype`` float32 as published, float64 for the truth.

    ``torch.max(attn, -1)[0]`` is written as a gather at the first maximal key (what
    ``torch.max`` returns on the CPU), so the gradient through the max goes to the
    key the documentation names on every device.
    """
    if keep is None:
        return attn.to(exp_dtype).softmax(-1).type_as(attn)
    b, n = keep.shape
    if attn.numel() == 0:
        return attn * 0
    policy = keep.to(attn.dtype).reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=policy.dtype, device=policy.device).view(1, 1, n, n)
    policy = policy + (1.0 - policy) * eye
    max_att = attn.gather(-1, attn.detach().argmax(dim=-1, keepdim=True))
    attn = attn - max_att
    attn = attn.to(exp_dtype).exp() * policy.to(exp_dtype)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def dynamicvit_attention(q, k, v, keep, scale: float, eps: float, exp_dtype: torch.dtype) -> torch.Tensor:
    """The public unfused attention: ``softmax_with_policy(q kᵀ · scale) @ v`` in q's dtype."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return dynamicvit_softmax(attn, keep, eps, exp_dtype) @ v


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskCase:
    """Shapes (B, H, N, D), the keep pattern, the score regime and the storage of inputs.

    ``gap``: None, or the dropped-max regime: one key (dropped when the pattern drops
    any) sits ``gap`` above the typical maximum of the others, for every query.
    """

    b: int
    h: int
    n: int
    d: int
    dtype: torch.dtype
    keep_kind: str
    keep_dtype: torch.dtype
    logit_scale: float
    gap: Optional[float]
    eps: float
    scale: Optional[float]
    strides: tuple  # Stride of q, k, v (attention) or of the scores (softmax: strides[0])
    seed: int


def _mask_cases(draw, max_n: int, four_d_strides: st.SearchStrategy) -> MaskCase:
    dtype = draw(st.sampled_from(DTYPES))
    return MaskCase(
        b=draw(st.sampled_from([1, 1, 2])),
        h=draw(st.sampled_from([1, 2])),
        n=draw(st.sampled_from([n for n in (1, 2, 3, 5, 8, 13, 17, 24, 33, 40) if n <= max_n])),
        d=draw(st.sampled_from([1, 4, 16, 20, 32])),
        dtype=dtype,
        keep_kind=draw(st.sampled_from(KEEP_KINDS)),
        keep_dtype=draw(st.sampled_from([torch.float32, torch.float32, dtype])),
        logit_scale=draw(st.sampled_from([1.0, 4.0, 16.0])),
        gap=draw(st.sampled_from([None, None, 8.0, 12.0, 14.0, 17.0, 20.0, 30.0, 50.0, 100.0])),
        eps=draw(st.sampled_from([1e-6, 1e-6, 0.0, 1e-2])),
        scale=draw(st.sampled_from([None, None, 0.3])),
        strides=tuple(draw(four_d_strides) for _ in range(3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# broadcast only over the batch and the heads: keys repeated along N would tie the row max
FOUR_D = strides(4, expandable=(0, 1), transposable=((1, 2), (2, 3)))


@st.composite
def attention_cases(draw) -> MaskCase:
    return _mask_cases(draw, 24, FOUR_D)


@st.composite
def softmax_cases(draw) -> MaskCase:
    return _mask_cases(draw, 40, strides(4, expandable=(0, 1, 2), transposable=((1, 2), (2, 3))))


def make_keep(case: MaskCase, gen: torch.Generator) -> tuple[Optional[torch.Tensor], Optional[int]]:
    """``(keep (B, N) or None, the dropped-max key j or None)``."""
    b, n, kind = case.b, case.n, case.keep_kind
    if kind == "none":
        keep = None
    elif kind == "bool":
        keep = torch.rand(b, n, generator=gen) > 0.5
    elif kind == "hard":
        keep = (torch.rand(b, n, generator=gen) > 0.5).double()
    elif kind == "soft":
        keep = torch.rand(b, n, generator=gen, dtype=torch.float64)
    elif kind == "soft_extreme":  # a Gumbel-softmax-like policy: mostly near 0 or 1
        keep = torch.sigmoid(8 * torch.randn(b, n, generator=gen, dtype=torch.float64))
    elif kind == "zeros":
        keep = torch.zeros(b, n, dtype=torch.float64)
    elif kind == "ones":
        keep = torch.ones(b, n, dtype=torch.float64)
    else:  # class_only: DynamicViT keeps the class token always
        keep = torch.zeros(b, n, dtype=torch.float64)
        keep[:, :1] = 1
    j = None
    if case.gap is not None and n >= 2:
        j = int(torch.randint(1, n, (1,), generator=gen))
        if keep is not None and kind != "ones":
            keep[:, j] = 0  # the far-above key is dropped
    if keep is not None:
        keep = keep.to(DEVICE)
        if keep.dtype != torch.bool:
            keep = keep.to(case.keep_dtype)
    return keep, j


def keep_receives_grad(case: MaskCase) -> bool:
    """Whether a float keep is a leaf that receives a gradient in this case.

    Not in the dropped-max regime with eps = 0 (dkeep of the far-above key is
    ~exp(gap), beyond float32 at the larger gaps) or with a float16 keep (it is
    ~1/eps there, beyond float16): the truth is then not representable in keep's
    dtype.  The keep is then a constant policy, and dq, dk, dv are still compared.
    """
    if case.gap is None:
        return True
    return case.eps > 0 and case.keep_dtype != torch.float16


def _keep_for(keep: Optional[torch.Tensor], case: MaskCase, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """A fresh keep for one run: bool as it is; float in ``dtype`` (None: its own dtype),
    a leaf that receives a gradient (see :func:`keep_receives_grad`)."""
    if keep is None or keep.dtype == torch.bool:
        return keep
    t = keep if dtype is None else keep.to(dtype)
    return t.detach().clone().requires_grad_(keep_receives_grad(case))


def _fresh(o, dtype: torch.dtype) -> torch.Tensor:
    """A fresh view, in ``dtype``, of operand ``o``'s (rounded) values."""
    src = o.exact if dtype == torch.float64 else o.low
    return o.view(src.detach().to(dtype).clone().requires_grad_())


def evaluate(case: MaskCase, operands: list, keep, grad: torch.Tensor, op, public, ref) -> tuple:
    """``(got, own, truth, ref)``: ``[out, *grads]`` of the op (case dtype), of the public
    formula in the case dtype and in float32 (``own`` = both), of the public formula in
    float64 (the truth) and of the reference in float64."""

    def run(fn, dtype: torch.dtype, keep_dtype: Optional[torch.dtype]) -> list:
        tensors = [_fresh(o, dtype) for o in operands]
        kp = _keep_for(keep, case, keep_dtype)
        out = fn(*tensors, kp)
        return [out.detach()] + grads(out, [*tensors, kp], grad.to(out.dtype))

    got = run(op, case.dtype, None)
    own = [run(lambda *a: public(*a, torch.float32), case.dtype, None),
           run(lambda *a: public(*a, torch.float32), torch.float32, torch.float32)]
    truth = run(lambda *a: public(*a, torch.float64), torch.float64, torch.float64)
    reference_run = run(ref, torch.float64, torch.float64)
    return got, list(zip(*own)), truth, reference_run


def _scale(case: MaskCase) -> float:
    if case.scale is not None:
        return case.scale
    return case.d ** -0.5 if case.d > 0 else 1.0


def attention_inputs(case: MaskCase):
    """q, k, v as :class:`Operand` and keep, in the case's regime."""
    gen = generator(case.seed)
    b, h, n, d = case.b, case.h, case.n, case.d
    q = randn(gen, b, h, n, d, scale=case.logit_scale)
    k = randn(gen, b, h, n, d)
    v = randn(gen, b, h, n, d)
    keep, j = make_keep(case, gen)
    if j is not None and d > 0:
        # every query has q_0 = 1 and only key j has k_0 ≠ 0: its score is `top` above the
        # others, whose spread is ~ logit_scale
        top = case.gap + 2.5 * case.logit_scale
        q[..., 0] = 1.0
        k[..., 0] = 0.0
        k[..., j, 0] = top / _scale(case)
    ops = [operand(t, s, case.dtype) for t, s in zip((q, k, v), case.strides)]
    return ops, keep


def softmax_inputs(case: MaskCase):
    gen = generator(case.seed)
    b, h, n = case.b, case.h, case.n
    scores = randn(gen, b, h, n, n, scale=case.logit_scale)
    keep, j = make_keep(case, gen)
    if j is not None:
        others = scores.clone()
        others[..., j] = -math.inf
        row_max = others.amax(dim=-1)
        own_row = scores[..., j, j].clone()
        scores[..., j] = row_max + case.gap
        scores[..., j, j] = own_row  # the key's own row is ordinary
    return operand(scores, case.strides[0], case.dtype), keep


def _bound_dtype(case: MaskCase, name: str) -> torch.dtype:
    """dkeep comes back in keep's dtype; its accuracy is that of the lower of the two."""
    if name == "dkeep" and case.dtype == torch.float32 and case.keep_dtype in LOW_PRECISION:
        return case.keep_dtype
    return case.dtype


def _compare(case: MaskCase, names: tuple, got: list, own: list, truth: list, ref: list,
             magnitudes: "dict | None" = None) -> None:
    for name, g, o, t, r in zip(names, got, own, truth, ref):
        bound = _bound_dtype(case, name)
        mag = (magnitudes or {}).get(name, 0.0)
        assert_matches(f"{name} (vs the public formula in float64)", g, t, bound, own=o, magnitude=mag)
        assert_matches(f"{name} (vs sparsevit.reference in float64)", g, r, bound, own=o, magnitude=mag)


def _attention_magnitudes(operands, grad: torch.Tensor, scale: float) -> dict:
    """Size of the terms of ``dq = scale Σ_j dP_ij k_j`` and ``dk = scale Σ_i dP_ij q_i``.

    ``|dP_ij| ≤ Ã_ij (|dÃ_ij| + |Δ_i|) ≤ 2 Ã_ij |dO_i|₂ max_j |v_j|₂``, so each is a sum of
    terms of size up to ``2 · scale · max|dO|₂ · max|v|₂ · max|k|`` (resp. ``|q|``).
    """
    if grad.numel() == 0:
        return {}
    q, k, v = (op.exact for op in operands)
    base = 2.0 * abs(scale) * float(grad.norm(dim=-1).max()) * float(v.norm(dim=-1).max())
    return {"dq": base * float(k.abs().max()), "dk": base * float(q.abs().max())}


# ----------------------------------------------------------------------------------
# masked_attention
# ----------------------------------------------------------------------------------
def _attention_case(**kw) -> MaskCase:
    base = MaskCase(1, 1, 2, 16, torch.float16, "hard", torch.float32, 1.0, None, 0.0, None,
                    (Stride(), Stride(), Stride()), 0)
    return replace(base, **kw)


def _issue_inputs(case: MaskCase):
    """The reproducer of the fp16 bug: q_0 = 1, k_1 = (80, 0, …), keep = [1, 0], eps = 0:
    the dropped key's score 20 leaves exp(0 − 20) far below fp16's range; out = v_0."""
    q = torch.zeros(1, 1, 2, 16, dtype=torch.float64, device=DEVICE)
    q[..., 0] = 1
    k = torch.zeros_like(q)
    k[0, 0, 1, 0] = 80
    v = randn(generator(case.seed), 1, 1, 2, 16)
    keep = torch.tensor([[1.0, 0.0]], device=DEVICE)
    return [operand(t, Stride(), case.dtype) for t in (q, k, v)], keep


def run_attention(case: MaskCase, backend: str, inputs=None) -> None:
    operands, keep = attention_inputs(case) if inputs is None else inputs
    scale = _scale(case)
    eps = case.eps if keep is not None else 0.0
    grad = randn(generator(case.seed + 7), case.b, case.h, case.n, case.d).to(case.dtype).double()
    got, own, truth, ref = evaluate(
        case, operands, keep, grad,
        lambda q, k, v, kp: sparsevit.masked_attention(q, k, v, kp, scale=case.scale, eps=case.eps, backend=backend),
        lambda q, k, v, kp, exp_dtype: dynamicvit_attention(q, k, v, kp, scale, eps, exp_dtype),
        lambda q, k, v, kp: reference.masked_attention(q, k, v, kp, scale, eps),
    )
    assert got[0].dtype == case.dtype and tuple(got[0].shape) == (case.b, case.h, case.n, case.d)
    if got[4] is not None:
        assert got[4].dtype == keep.dtype, f"dkeep dtype {got[4].dtype} != keep's {keep.dtype}"
    _compare(case, ("out", "dq", "dk", "dv", "dkeep"), got, own, truth, ref,
             _attention_magnitudes(operands, grad, scale))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@examples(45)
@given(case=attention_cases())
@example(case=_attention_case(n=13, d=20, keep_kind="zeros", dtype=torch.bfloat16, eps=1e-6, logit_scale=1.0))
@example(case=_attention_case(n=13, d=20, keep_kind="class_only", dtype=torch.float32, eps=1e-6))
@example(case=_attention_case(n=17, d=16, keep_kind="soft", dtype=torch.float16, logit_scale=16.0, gap=20.0, eps=1e-6))
@example(case=_attention_case(n=8, d=32, keep_kind="bool", dtype=torch.bfloat16, logit_scale=4.0, gap=30.0, eps=0.0))
@example(case=_attention_case(n=5, d=16, keep_kind="hard", dtype=torch.float32, gap=100.0, eps=0.0))
def test_masked_attention(backend: str, case: MaskCase) -> None:
    run_attention(case, backend)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_attention_dropped_max_reproducer(backend: str, dtype: torch.dtype) -> None:
    """The issue's reproducer, forward and gradients: out[0] must be v[0], not zeros."""
    case = _attention_case(dtype=dtype, keep_kind="hard", eps=0.0, seed=3)
    inputs = _issue_inputs(case)
    out = sparsevit.masked_attention(*(t.low for t in inputs[0]), inputs[1], eps=0.0, backend=backend)
    torch.testing.assert_close(out[0, 0, 0], inputs[0][2].low[0, 0, 0], atol=0, rtol=2 * torch.finfo(dtype).eps)
    run_attention(case, backend, inputs)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 0, 8), (2, 2, 0, 1), (0, 1, 5, 8), (1, 2, 5, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_attention_empty_dims(backend: str, shape: tuple, dtype: torch.dtype) -> None:
    """N = 0, B = 0 and D = 0 are accepted: the right (empty or zero) outputs and gradients."""
    b, h, n, d = shape
    case = _attention_case(b=b, h=h, n=n, d=d, dtype=dtype, keep_kind="soft", eps=1e-6, seed=9)
    run_attention(case, backend)


# ----------------------------------------------------------------------------------
# masked_softmax
# ----------------------------------------------------------------------------------
def run_softmax(case: MaskCase, backend: str) -> None:
    scores, keep = softmax_inputs(case)
    eps = case.eps if keep is not None else 0.0
    grad = randn(generator(case.seed + 7), case.b, case.h, case.n, case.n).to(case.dtype).double()
    got, own, truth, ref = evaluate(
        case, [scores], keep, grad,
        lambda s, kp: sparsevit.masked_softmax(s, kp, case.eps, backend=backend),
        lambda s, kp, exp_dtype: dynamicvit_softmax(s, kp, eps, exp_dtype),
        lambda s, kp: reference.masked_softmax(s, kp, eps),
    )
    assert got[0].dtype == case.dtype and tuple(got[0].shape) == tuple(scores.shape)
    _compare(case, ("probs", "dscores", "dkeep"), got, own, truth, ref)


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@examples(60)
@given(case=softmax_cases())
@example(case=_attention_case(n=13, keep_kind="zeros", dtype=torch.float32, eps=1e-6))  # all-zeros policy
@example(case=_attention_case(n=13, keep_kind="class_only", dtype=torch.float32, eps=1e-6))
@example(case=_attention_case(n=24, keep_kind="soft", dtype=torch.float32, logit_scale=4.0, eps=1e-6))
@example(case=_attention_case(n=17, keep_kind="hard", dtype=torch.float16, logit_scale=16.0, gap=20.0, eps=1e-6))
@example(case=_attention_case(n=9, keep_kind="bool", dtype=torch.float32, gap=100.0, eps=0.0))
def test_masked_softmax(backend: str, case: MaskCase) -> None:
    run_softmax(case, backend)


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 0), (0, 2, 5)], ids=str)
def test_masked_softmax_empty_dims(backend: str, shape: tuple) -> None:
    b, h, n = shape
    run_softmax(_attention_case(b=b, h=h, n=n, dtype=torch.float32, keep_kind="soft", eps=1e-6, seed=4), backend)


# ----------------------------------------------------------------------------------
# The reference is the public formula (float64, gradients through the max included)
# ----------------------------------------------------------------------------------
def _assert_float64_equal(names: tuple, got: list, want: list) -> None:
    for name, r, t in zip(names, got, want):
        if t is None:
            assert r is None, name
            continue
        scale = 1.0 + t.abs().max().item() if t.numel() else 1.0
        torch.testing.assert_close(r / scale, t / scale, atol=1e-12, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@examples(80)
@given(case=softmax_cases())
@example(case=_attention_case(n=13, keep_kind="zeros", eps=1e-6))
@example(case=_attention_case(n=13, keep_kind="class_only", eps=1e-6))
@example(case=_attention_case(n=24, keep_kind="soft", logit_scale=16.0, eps=1e-6))
def test_reference_softmax_is_the_public_formula(case: MaskCase) -> None:
    """``reference.masked_softmax`` in float64 equals the public formula and its autograd
    (through the row max) to float64 rounding, in every regime."""
    scores, keep = softmax_inputs(case)
    eps = case.eps if keep is not None else 0.0
    grad = randn(generator(case.seed + 7), case.b, case.h, case.n, case.n)
    results = []
    for fn in (reference.masked_softmax, lambda s, kp, e: dynamicvit_softmax(s, kp, e, torch.float64)):
        s = _fresh(scores, torch.float64)
        kp = _keep_for(keep, case, torch.float64)
        out = fn(s, kp, eps)
        results.append([out.detach()] + grads(out, [s, kp], grad))
    _assert_float64_equal(("probs", "dscores", "dkeep"), *results)


@examples(40)
@given(case=attention_cases())
@example(case=_attention_case(n=13, d=20, keep_kind="zeros", eps=1e-6))
@example(case=_attention_case(n=13, d=20, keep_kind="soft", logit_scale=4.0, eps=1e-6))
def test_reference_attention_is_the_public_formula(case: MaskCase) -> None:
    """``reference.masked_attention`` in float64 equals the public unfused attention and
    its autograd to float64 rounding (dq, dk, dv, dkeep)."""
    operands, keep = attention_inputs(case)
    scale, eps = _scale(case), (case.eps if keep is not None else 0.0)
    grad = randn(generator(case.seed + 7), case.b, case.h, case.n, case.d)
    results = []
    for fn in (lambda q, k, v, kp: reference.masked_attention(q, k, v, kp, scale, eps),
               lambda q, k, v, kp: dynamicvit_attention(q, k, v, kp, scale, eps, torch.float64)):
        tensors = [_fresh(o, torch.float64) for o in operands]
        kp = _keep_for(keep, case, torch.float64)
        out = fn(*tensors, kp)
        results.append([out.detach()] + grads(out, [*tensors, kp], grad))
    _assert_float64_equal(("out", "dq", "dk", "dv", "dkeep"), *results)


# ----------------------------------------------------------------------------------
# Non-finite keep: every backend as the reference (or every backend refuses it)
# ----------------------------------------------------------------------------------
@examples(6)
@given(case=attention_cases(), bad=st.sampled_from([math.nan, math.inf]))
def test_non_finite_keep_like_the_reference(case: MaskCase, bad: float) -> None:
    case = replace(case, keep_kind="soft", gap=None, n=max(case.n, 2), strides=(Stride(),) * 3)
    (q, k, v), keep = attention_inputs(case)
    keep = keep.clone()
    keep[0, case.n - 1] = bad
    outcomes = {}
    for backend in backends_for(MASKED_ATTENTION_SUPPORT):
        try:
            outcomes[backend] = sparsevit.masked_attention(q.low, k.low, v.low, keep, scale=case.scale, eps=case.eps,
                                                           backend=backend)
        except ValueError as exc:
            assert "keep" in str(exc), f"{backend}: the error must name keep: {exc}"
            outcomes[backend] = None
    refused = [name for name, out in outcomes.items() if out is None]
    assert not refused or len(refused) == len(outcomes), f"only {refused} refuse keep = {bad}"
    if refused:
        return
    want = reference.masked_attention(q.exact, k.exact, v.exact, keep.double(), _scale(case), case.eps)
    for backend, out in outcomes.items():
        assert torch.equal(torch.isnan(out), torch.isnan(want)), (
            f"{backend}: NaN where the reference has {int(torch.isnan(want).sum())} NaNs, got {int(torch.isnan(out).sum())}"
        )
        finite = ~torch.isnan(want)
        assert_matches(f"{backend} finite part", out[finite], want[finite], case.dtype)


@examples(10)
@given(case=softmax_cases(), bad=st.sampled_from([math.nan, math.inf, -math.inf]), where=st.sampled_from(["keep", "scores"]))
def test_non_finite_softmax_inputs_like_the_reference(case: MaskCase, bad: float, where: str) -> None:
    """A NaN/inf in keep or in the scores: every backend puts its NaNs where the reference
    does (a row max must not skip a NaN score), or every backend refuses the input."""
    case = replace(case, keep_kind="soft", gap=None, n=max(case.n, 2), strides=(Stride(),))
    scores, keep = softmax_inputs(case)
    s, keep = scores.low.clone(), keep.clone()
    if where == "keep":
        keep[0, case.n - 1] = bad
    else:
        s[0, 0, case.n - 1, 0] = bad
    outcomes = {}
    for backend in backends_for(MASKED_SOFTMAX_SUPPORT):
        try:
            outcomes[backend] = sparsevit.masked_softmax(s, keep, case.eps, backend=backend)
        except ValueError as exc:
            assert where in str(exc), f"{backend}: the error must name {where}: {exc}"
            outcomes[backend] = None
    refused = [name for name, out in outcomes.items() if out is None]
    assert not refused or len(refused) == len(outcomes), f"only {refused} refuse {where} = {bad}"
    if refused:
        return
    want = reference.masked_softmax(s.double(), keep.double(), case.eps)
    for backend, out in outcomes.items():
        assert torch.equal(torch.isnan(out), torch.isnan(want)), (
            f"{backend}: {int(torch.isnan(out).sum())} NaNs where the reference has {int(torch.isnan(want).sum())}"
        )
        finite = ~torch.isnan(want)
        assert_matches(f"{backend} finite part", out[finite], want[finite], case.dtype)
