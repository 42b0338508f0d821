"""A minimal supervised training loop and evaluation for the CPU accuracy suites and tests.

Users keep their own loops; this one exists so that the package's accuracy suites
(scattered digits) and tests train the same way.  AdamW with cosine decay, one
``step_fn(model, images, labels) -> loss`` per mini-batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["train", "evaluate", "cross_entropy_step"]


def cross_entropy_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain objective: CE(model(images), labels)."""
    return F.cross_entropy(model(images), labels)


def train(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    step_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_step,
    steps_per_epoch: Optional[int] = None,
    lr_for: Optional[Callable[[str], float]] = None,
) -> list[float]:
    """Train ``model`` for ``epochs`` (``batches(epoch)`` yields the epoch's batches); returns epoch losses.

    Learning rate: lr · ½(1 + cos(π t / T)) over the T optimizer steps; ``lr_for(name)``
    gives a parameter its own base rate instead of ``lr`` (e.g. DynamicViT's predictors
    at 100× the backbone's).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lr_for is None:
        groups = [{"params": [p for _, p in named], "lr": lr}]
    else:
        rates: dict = {}
        for n, p in named:
            rates.setdefault(float(lr_for(n)), []).append(p)
        groups = [{"params": ps, "lr": r} for r, ps in rates.items()]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    total = epochs * (steps_per_epoch or sum(1 for _ in batches(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    history = []
    model.train()
    for epoch in range(epochs):
        losses = []
        for images, labels in batches(epoch):
            loss = step_fn(model, images, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append(sum(losses) / max(1, len(losses)))
    return history


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Top-1 accuracy of ``predict(images) -> logits`` over the batches."""
    correct = seen = 0
    for images, labels in batches:
        correct += int((predict(images).argmax(-1) == labels).sum())
        seen += labels.numel()
    return correct / max(1, seen)
