"""Suite ``tokens``: gather / scatter / scatter-add / select of token rows.

Against, in the same run: ``torch.gather`` and ``index_select`` (gather),
``Tensor.scatter`` (scatter), ``Tensor.scatter_add_`` (the gather backward) and
``torch.topk`` + sort + gather (select).  Every kernel moves bytes and does no
arithmetic worth counting, so its floor is bytes / measured copy bandwidth; we
report GB/s and the fraction of that bandwidth (target on GPU: >= 85% for
B=256, N=197, C=384..1024 in bf16).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

import sparsevit
from sparsevit import reference
from sparsevit.ops.token_gather import TOKEN_SUPPORT
from sparsevit.rounding import ceil_fraction

from harness import Record, Runner, progress, rotating, rotation_count, time_ms

KEEP = 0.7  # DynamicViT's first stage


def _shapes(runner: Runner) -> list[tuple[int, int, int]]:
    if runner.device.type == "cuda":
        return [(256, 197, 384), (256, 197, 768), (256, 197, 1024)] if not runner.quick else [(256, 197, 384)]
    return [(8, 197, 384)] if runner.quick else [(32, 197, 384), (32, 197, 768)]


def _make_set(b: int, n: int, c: int, dtype: torch.dtype, device: torch.device):
    x = torch.randn(b, n, c, device=device, dtype=dtype)
    scores = torch.randn(b, n - 1, device=device)
    k = ceil_fraction(KEEP, n - 1)
    index = reference.select_index(scores, k, 1, "position")
    src = torch.randn(b, index.shape[1], c, device=device, dtype=dtype)
    return x, index, scores, src


def run(runner: Runner) -> None:
    runner.measure_peaks()
    points = [(shape, dtype) for shape in _shapes(runner) for dtype in runner.dtypes]
    for (b, n, c), dtype in progress(points, "tokens", label=lambda p: f"B={p[0][0]} N={p[0][1]} C={p[0][2]} {p[1]}"):
        first = _make_set(b, n, c, dtype, runner.device)
        set_bytes = sum(t.numel() * t.element_size() for t in first)
        sets = [first] + [_make_set(b, n, c, dtype, runner.device) for _ in range(rotation_count(set_bytes, runner.device) - 1)]
        _gather(runner, sets, dtype)
        _scatter(runner, sets, dtype)
        _scatter_add(runner, sets, dtype)
        _select(runner, sets, dtype)


def _checked_ours(runner: Runner, op: str, sets: list, ref: torch.Tensor, call: Callable, **tol) -> tuple[dict, dict, dict]:
    """``call(x, index, scores, src, backend=...)`` on every requested backend that runs here, each
    checked against ``ref`` on the first input set before it is timed; returns (callables, max
    errors, {backend: why it cannot run} for the others)."""
    x, index = sets[0][0], sets[0][1]
    backends, skipped = runner.split_backends(TOKEN_SUPPORT, [x, index])
    ours, errors = {}, {}
    for backend in backends:
        fn = functools.partial(call, backend=backend)
        errors[backend] = runner.check(f"{op}[{backend}]", fn(*sets[0]), ref, **tol)
        ours[backend] = fn
    return ours, errors, skipped


def _point(runner: Runner, op: str, x: torch.Tensor, k: int, dtype: torch.dtype, nbytes: int, baseline: str,
           baseline_fn: Callable, ours: dict[str, Callable], sets: list, errors: dict[str, float],
           skipped: dict[str, str]) -> None:
    base_ms = time_ms(rotating(sets, baseline_fn), runner.device)
    shape = {"B": x.shape[0], "N": x.shape[1], "C": x.shape[2], "K": k}
    dt = str(dtype).replace("torch.", "")
    runner.add(Record("tokens", op, baseline, None, None, dt, shape, base_ms, bytes=nbytes))
    for backend, fn in ours.items():
        ms = time_ms(rotating(sets, fn), runner.device)
        runner.add(Record("tokens", op, f"sparsevit[{backend}]", backend, baseline, dt, shape, ms, bytes=nbytes,
                          speedup_vs_baseline=base_ms / ms, max_abs_error=errors[backend]))
    for backend, reason in skipped.items():
        runner.skip(op, f"sparsevit[{backend}]", backend, dt, shape, reason, baseline)


def _gather(runner: Runner, sets: list, dtype: torch.dtype) -> None:
    x, index, _, _ = sets[0]
    b, n, c = x.shape
    k = index.shape[1]
    ref = reference.gather_tokens(x, index)
    ours, errors, skipped = _checked_ours(runner, "gather_tokens", sets, ref,
                                 lambda x, i, s, src, backend: sparsevit.gather_tokens(x, i, check_index=False, backend=backend))
    nbytes = 2 * b * k * c * x.element_size() + index.numel() * index.element_size()

    def torch_gather(x, i, s, src):
        return x.gather(1, i.unsqueeze(-1).expand(-1, -1, c))

    def index_select(x, i, s, src):
        flat = (i + torch.arange(b, device=i.device).unsqueeze(1) * n).reshape(-1)
        return x.reshape(b * n, c).index_select(0, flat).view(b, k, c)

    runner.check("index_select baseline", index_select(*sets[0]), ref)
    _point(runner, "gather_tokens", x, k, dtype, nbytes, "torch.gather", torch_gather, ours, sets, errors, skipped)
    base_ms = time_ms(rotating(sets, index_select), runner.device)
    runner.add(Record("tokens", "gather_tokens", "index_select", None, None, str(dtype).replace("torch.", ""),
                      {"B": b, "N": n, "C": c, "K": k}, base_ms, bytes=nbytes))


def _scatter(runner: Runner, sets: list, dtype: torch.dtype) -> None:
    x, index, _, src = sets[0]
    b, n, c = x.shape
    k = index.shape[1]
    ref = reference.scatter_tokens(src, index, x)
    ours, errors, skipped = _checked_ours(
        runner, "scatter_tokens", sets, ref,
        lambda x, i, s, src, backend: sparsevit.scatter_tokens(src, i, base=x, check_index=False, backend=backend))
    es = x.element_size()
    nbytes = 2 * b * n * c * es + 2 * b * k * c * es  # copy base, then read src rows and overwrite

    def torch_scatter(x, i, s, src):
        return x.scatter(1, i.unsqueeze(-1).expand(-1, -1, c), src)

    _point(runner, "scatter_tokens", x, k, dtype, nbytes, "Tensor.scatter", torch_scatter, ours, sets, errors, skipped)


def _scatter_add(runner: Runner, sets: list, dtype: torch.dtype) -> None:
    x, index, _, src = sets[0]
    b, n, c = x.shape
    k = index.shape[1]
    ref = reference.scatter_add_tokens(src, index, n)
    ours, errors, skipped = _checked_ours(
        runner, "scatter_add_tokens", sets, ref,
        lambda x, i, s, src, backend: sparsevit.scatter_add_tokens(src, i, n, check_index=False, backend=backend),
        atol=1e-2, rtol=1e-2)
    # Minimum traffic: read src rows, write the (B, N, C) result once.
    nbytes = b * k * c * x.element_size() + b * n * c * x.element_size()

    def torch_scatter_add(x, i, s, src):
        return torch.zeros_like(x).scatter_add_(1, i.unsqueeze(-1).expand(-1, -1, c), src)

    _point(runner, "scatter_add_tokens", x, k, dtype, nbytes, "Tensor.scatter_add_", torch_scatter_add, ours, sets, errors, skipped)


def _select(runner: Runner, sets: list, dtype: torch.dtype) -> None:
    x, index, scores, _ = sets[0]
    b, n, c = x.shape
    k = index.shape[1] - 1
    ref_tokens, _ = reference.select_tokens(x, scores, k, 1, "position")
    ours, errors, skipped = _checked_ours(runner, "select_tokens", sets, ref_tokens,
                                 lambda x, i, s, src, backend: sparsevit.select_tokens(x, s, k, backend=backend)[0])
    nbytes = 2 * b * (k + 1) * c * x.element_size() + scores.numel() * scores.element_size()

    def topk_gather(x, i, s, src):
        top = torch.topk(s, k, dim=1).indices.sort(dim=1).values + 1
        idx = torch.cat([torch.zeros(b, 1, dtype=top.dtype, device=top.device), top], 1)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))

    _point(runner, "select_tokens", x, k, dtype, nbytes, "topk+gather", topk_gather, ours, sets, errors, skipped)
