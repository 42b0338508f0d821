"""Target tasks made from handwritten digits, for transfer tests of one ticket to many tasks
(universal lottery tickets, Burkholz et al., ICLR 2022).

A task is a label rule applied to the digit ``d ∈ {0, …, 9}`` of each image, optionally on
a changed input (a translated, re-noised image):

* label rules: ``identity`` (y = d, 10 classes), ``parity`` (y = d mod 2), ``at_least_5``
  (y = [d ≥ 5]), ``mod3`` (y = d mod 3);
* input change with shift ``s`` and noise ``σ``: every image is translated by an offset
  ``(dy, dx)`` drawn uniformly from ``{−s, …, s}²`` (content moves down/right for
  positive offsets, vacated pixels are 0), then ``N(0, σ²)`` noise is added per pixel:

      x'[c, i, j] = x[c, i − dy, j − dx] (0 outside the image) + σ · ε[c, i, j].

Named tasks (:data:`DIGIT_TASKS`) fix a rule, ``s`` and ``σ``; the source task of the
experiments is ``identity`` on the unchanged images.  Everything random is drawn from a
CPU generator seeded with ``seed``, so a task is fully determined by its inputs and seed.
Images may be any ``(N, C, H, W)`` float tensor (the 8×8 digits, or scattered digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["DIGIT_TASKS", "LABEL_RULES", "DigitTask", "DigitTaskSpec", "digit_task", "task_labels", "translate"]


def _identity(d: torch.Tensor) -> torch.Tensor:
    return d.clone()


def _parity(d: torch.Tensor) -> torch.Tensor:
    return d % 2


def _at_least_5(d: torch.Tensor) -> torch.Tensor:
    return (d >= 5).to(torch.int64)


def _mod3(d: torch.Tensor) -> torch.Tensor:
    return d % 3


LABEL_RULES: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "identity": (10, _identity),
    "parity": (2, _parity),
    "at_least_5": (2, _at_least_5),
    "mod3": (3, _mod3),
}
"""``rule name -> (number of classes, digit labels -> task labels)``."""


@dataclass(frozen=True)
class DigitTaskSpec:
    """A named task: label ``rule`` (a key of :data:`LABEL_RULES`), translation ``shift`` s ≥ 0 (pixels) and noise σ ≥ 0."""

    rule: str
    shift: int = 0
    noise: float = 0.0


DIGIT_TASKS: dict[str, DigitTaskSpec] = {
    "identity": DigitTaskSpec("identity"),
    "parity": DigitTaskSpec("parity"),
    "at_least_5": DigitTaskSpec("at_least_5"),
    "mod3": DigitTaskSpec("mod3"),
    "shifted_identity": DigitTaskSpec("identity", shift=1, noise=0.1),
    "shifted_parity": DigitTaskSpec("parity", shift=1, noise=0.1),
}
"""The named tasks; ``shifted_*`` translate by up to one pixel and add σ = 0.1 noise."""


@dataclass
class DigitTask:
    """One task's data: ``images (N, C, H, W)`` float, ``labels (N,)`` int64 in ``[0, num_classes)``,
    ``offsets (N, 2)`` int64 the ``(dy, dx)`` translation of each image (zeros when unshifted)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    offsets: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _check_digits(digits: object) -> torch.Tensor:
    if not isinstance(digits, torch.Tensor):
        raise TypeError(f"digits must be a torch.Tensor of digit labels, got {type(digits).__name__}")
    if digits.dim() != 1 or digits.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"digits must be a 1-d integer tensor, got shape {tuple(digits.shape)} dtype {digits.dtype}")
    if digits.numel() and (int(digits.min()) < 0 or int(digits.max()) > 9):
        raise ValueError(f"digits must lie in 0..9, got values in {int(digits.min())}..{int(digits.max())}")
    return digits.to(torch.int64)


def task_labels(rule: str, digits: torch.Tensor) -> torch.Tensor:
    """The labels of label ``rule`` for digit labels ``digits (N,)`` (see :data:`LABEL_RULES`), int64 ``(N,)``."""
    if rule not in LABEL_RULES:
        raise ValueError(f"rule must be one of {sorted(LABEL_RULES)}, got {rule!r}")
    return LABEL_RULES[rule][1](_check_digits(digits))


def translate(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x'[n, c, i, j] = x[n, c, i − dy_n, j − dx_n]``, 0 outside the image; ``offsets (N, 2)`` = ``(dy, dx)``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"shape {tuple(images.shape)} dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W), got {got}")
    if not isinstance(offsets, torch.Tensor) or tuple(offsets.shape) != (images.shape[0], 2):
        got = tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise ValueError(f"offsets must be an integer tensor of shape (N, 2) = ({images.shape[0]}, 2), got {got}")
    offsets = offsets.to(torch.int64)
    h, w = images.shape[-2:]
    s = int(offsets.abs().max()) if offsets.numel() else 0
    if s >= min(h, w):
        raise ValueError(f"offsets must be smaller than the image ({h}×{w}), got up to {s}")
    padded = F.pad(images, (s, s, s, s))
    out = torch.empty_like(images)
    # One slice per distinct offset: at most (2s + 1)² groups, not one per image.
    for dy, dx in torch.unique(offsets, dim=0).tolist():
        rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
        top, left = s - dy, s - dx
        out[rows] = padded[rows, :, top:top + h, left:left + w]
    return out


def digit_task(name: str, images: torch.Tensor, digits: torch.Tensor, *, seed: int = 0) -> DigitTask:
    """Task ``name`` (a key of :data:`DIGIT_TASKS`) on ``images (N, C, H, W)`` with digit labels ``digits (N,)``.

    Offsets ``(dy, dx) ~ U{−s..s}²`` first, then the noise ``σ · N(0, 1)``, both from one
    generator seeded with ``seed``; the inputs are not modified.
    """
    if name not in DIGIT_TASKS:
        raise ValueError(f"name must be one of {sorted(DIGIT_TASKS)}, got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"shape {tuple(images.shape)} dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W), got {got}")
    digits = _check_digits(digits)
    if digits.shape[0] != images.shape[0]:
        raise ValueError(f"digits must have one label per image: {images.shape[0]} images, {digits.shape[0]} labels")
    spec = DIGIT_TASKS[name]
    n = images.shape[0]
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(-spec.shift, spec.shift + 1, (n, 2), generator=g) if spec.shift else torch.zeros(n, 2, dtype=torch.int64)
    out = translate(images, offsets) if spec.shift else images.clone()
    if spec.noise > 0:
        out = out + spec.noise * torch.randn(out.shape, generator=g).to(out)
    num_classes = LABEL_RULES[spec.rule][0]
    return DigitTask(name, out, task_labels(spec.rule, digits), num_classes, offsets)
