"""A minimal training loop on in-memory tensors, for the lottery-ticket rounds and the CPU suites.

Users keep their own loops; this one exists so that IMP (``LotteryTicket.run``)
and the accuracy benchmarks work out of the box: mini-batch AdamW (or SGD) on
the cross-entropy ``L = −(1/B) Σ_i log softmax(f(x_i))_{y_i}``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["accuracy", "fit", "minibatches"]


def minibatches(n: int, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``steps`` index batches of size ``batch_size`` into ``range(n)``: epochs of a seeded permutation.

    A new permutation (``torch.randperm(n, generator=Generator().manual_seed(seed))``, drawn in
    turn) starts whenever fewer than ``batch_size`` indices remain in the current one, so every
    batch is full (all ``n`` indices when ``batch_size > n``) and the order is the same for the
    same ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    seed: int = 0,
    on_optimizer: Optional[Callable[[torch.optim.Optimizer], None]] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> float:
    """Train ``model`` for ``steps`` mini-batches of ``(x, y)``; returns the mean loss of the last 10 steps.

    ``on_optimizer(opt)`` is called once with the new optimizer (e.g. to attach a
    mask manager); ``on_step(t)`` after optimizer step ``t`` (1-based), e.g. ``rigl.step``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if on_optimizer is not None:
        on_optimizer(opt)
    model.train()
    losses: list[float] = []
    for t, idx in enumerate(minibatches(x.shape[0], batch_size, steps, seed), start=1):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(t)
        losses.append(float(loss.detach()))
    return sum(losses[-10:]) / max(1, len(losses[-10:]))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy ``(1/N) Σ_i [argmax f(x_i) = y_i]`` in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train()
    return correct / max(1, x.shape[0])
