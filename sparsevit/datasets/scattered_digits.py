"""Scattered digits: scikit-learn's 8×8 digits placed at random on a larger noisy canvas.

Each 8×8 digit (values 0..16, scaled to [0, 1]) is upscaled by an integer factor and
pasted at a uniformly random position of a ``canvas × canvas`` image filled with
Gaussian noise (σ = ``noise``). With a 64×64 canvas, ×2 upscaling and 8×8 patches a
digit covers at most 9 of the 64 patches: most tokens are background, the redundancy
that token dropping (DynamicViT) and patch tickets exploit. Images are 3-channel
(the grey value repeated) so that any timm ViT takes them. Fully determined by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ScatteredDigits", "scattered_digits_splits", "upscaled_digits"]


@dataclass
class ScatteredDigits:
    """Tensors of one split: ``images (n, 3, canvas, canvas)`` float32, ``labels (n,)`` int64,
    ``boxes (n, 4)`` the digit's (top, left, height, width) in pixels."""

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        """Yield ``(images, labels)`` mini-batches."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.images[idx], self.labels[idx]


def upscaled_digits(scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ``(images (n, 8·scale, 8·scale) in [0, 1], labels (n,))``.

    ``images = nearest-upscale(digit / 16, scale)``: every pixel of the 8×8 digit becomes a
    ``scale × scale`` square.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("scattered digits need scikit-learn: pip install 'sparsevit[bench]'") from exc
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    big = F.interpolate(small.unsqueeze(1), scale_factor=scale, mode="nearest").squeeze(1)
    return big, labels


def scattered_digits_splits(
    canvas: int = 64, scale: int = 2, noise: float = 0.2, test_fraction: float = 0.25, seed: int = 0, align: int = 1
) -> tuple[ScatteredDigits, ScatteredDigits]:
    """Build the train and test splits from all 1,797 scikit-learn digits.

    ``align``: the digit's top-left corner is a random multiple of ``align`` pixels (1:
    anywhere; the patch size: the digit sits on the patch grid, the easier task).
    """
    if scale < 1 or 8 * scale > canvas:
        raise ValueError(f"scale must be >= 1 with 8·scale <= canvas={canvas}, got {scale}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    big, labels = upscaled_digits(scale)
    g = torch.Generator().manual_seed(seed)
    n, side = big.shape[0], 8 * scale
    images = torch.randn(n, canvas, canvas, generator=g) * noise
    slots = (canvas - side) // align + 1
    tops = torch.randint(0, slots, (n,), generator=g) * align
    lefts = torch.randint(0, slots, (n,), generator=g) * align
    for i in range(n):
        t, l = int(tops[i]), int(lefts[i])
        images[i, t:t + side, l:l + side] += big[i]
    images = images.unsqueeze(1).expand(n, 3, canvas, canvas).contiguous()
    boxes = torch.stack([tops, lefts, torch.full_like(tops, side), torch.full_like(tops, side)], dim=1)
    order = torch.randperm(n, generator=g)
    n_test = int(round(test_fraction * n))
    test, train = order[:n_test], order[n_test:]
    return (ScatteredDigits(images[train], labels[train], boxes[train]),
            ScatteredDigits(images[test], labels[test], boxes[test]))
