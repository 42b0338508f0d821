"""Cluttered digits: the harder, held-out variant of :mod:`.scattered_digits`.

Each image is one upscaled scikit-learn digit (the label) at a random position -- anywhere,
not on the patch grid, by default -- plus ``clutter`` *fragments*: ``fragment × fragment``
crops (in 8×8 digit pixels, upscaled the same way) of other digits of the same split,
pasted at random positions that do not overlap the digit, on Gaussian noise of σ = ``noise``:

    image = noise + digit_{label}[box] + Σ_c crop_c[clutter_box_c]

Fragments carry strokes of every class, so a token selector cannot keep "any bright patch":
it has to find the whole digit among look-alike pieces, and an unaligned digit spreads over
up to ``(⌈8·scale / patch⌉ + 1)²`` patches.  Train and test images come from disjoint sets
of the 1,797 digits (the fragments too), so the test split is held out at the digit level.
Fully determined by the seed; images are 3-channel (the grey value repeated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.validation import check_int
from .scattered_digits import ScatteredDigits, upscaled_digits

__all__ = ["ClutteredDigits", "cluttered_digits_splits"]

@dataclass
class ClutteredDigits(ScatteredDigits):
    """A :class:`ScatteredDigits` split with its clutter: ``clutter_boxes (n, c, 4)`` the fragments'
    (top, left, height, width) in pixels and ``clutter_sources (n, c, 3)`` each fragment's
    (source digit index in scikit-learn's order, row, column of the crop in 8×8 digit pixels);
    ``sources (n,)`` the index of the labelled digit."""

    clutter_boxes: torch.Tensor = None  # type: ignore[assignment]
    clutter_sources: torch.Tensor = None  # type: ignore[assignment]
    sources: torch.Tensor = None  # type: ignore[assignment]


def _beside(g: torch.Generator, canvas: int, size: int, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """A uniformly random corner of a ``size × size`` square inside the canvas that does not overlap ``box``."""
    t, l, h, w = box
    starts = torch.arange(canvas - size + 1)
    rows = (starts < t + h) & (t < starts + size)
    cols = (starts < l + w) & (l < starts + size)
    free = (~(rows[:, None] & cols[None, :])).nonzero()
    pick = int(torch.randint(0, free.shape[0], (1,), generator=g))
    return int(free[pick, 0]), int(free[pick, 1])


def _position(g: torch.Generator, canvas: int, size: int, align: int) -> tuple[int, int]:
    slots = (canvas - size) // align + 1
    t, l = torch.randint(0, slots, (2,), generator=g).tolist()
    return t * align, l * align


def _split(big: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, g: torch.Generator, canvas: int, scale: int,
           noise: float, clutter: int, fragment: int, align: int) -> ClutteredDigits:
    n, side, fs = pool.numel(), 8 * scale, fragment * scale
    images = torch.randn(n, canvas, canvas, generator=g) * noise
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    cboxes = torch.zeros(n, clutter, 4, dtype=torch.int64)
    csources = torch.zeros(n, clutter, 3, dtype=torch.int64)
    for i in range(n):
        src = int(pool[i])
        t, l = _position(g, canvas, side, align)
        box = (t, l, side, side)
        images[i, t:t + side, l:l + side] += big[src]
        boxes[i] = torch.tensor(box)
        for c in range(clutter):
            k = int(torch.randint(0, n - 1, (1,), generator=g))  # uniform over the split's other digits
            other = int(pool[k + 1 if k >= i else k])
            r0, c0 = torch.randint(0, 8 - fragment + 1, (2,), generator=g).tolist()
            ft, fl = _beside(g, canvas, fs, box)
            crop = big[other, r0 * scale:(r0 + fragment) * scale, c0 * scale:(c0 + fragment) * scale]
            images[i, ft:ft + fs, fl:fl + fs] += crop
            cboxes[i, c] = torch.tensor((ft, fl, fs, fs))
            csources[i, c] = torch.tensor((other, r0, c0))
    images = images.unsqueeze(1).expand(n, 3, canvas, canvas).contiguous()
    return ClutteredDigits(images, labels[pool].clone(), boxes, cboxes, csources, pool.clone())


def cluttered_digits_splits(
    canvas: int = 40, scale: int = 2, noise: float = 0.3, clutter: int = 3, fragment: int = 4,
    test_fraction: float = 0.25, seed: int = 0, align: int = 1,
) -> tuple[ClutteredDigits, ClutteredDigits]:
    """Train and test splits over disjoint digits (``test_fraction`` of the 1,797 for the test split).

    Args:
        canvas: image side in pixels; must leave room for a fragment beside the digit wherever it
            lies (``canvas ≥ 8·scale + 2·fragment·scale``; ``8·scale`` without clutter).
        scale: integer upscaling of the 8×8 digits.
        noise: σ of the background noise (≥ 0).
        clutter: fragments per image (≥ 0).
        fragment: fragment side in 8×8 digit pixels, ``1 ≤ fragment ≤ 8``.
        align: the digit's corner is a random multiple of ``align`` pixels (1: anywhere).
    """
    canvas = check_int("canvas", canvas, 1)
    scale = check_int("scale", scale, 1)
    clutter = check_int("clutter", clutter, 0)
    fragment = check_int("fragment", fragment, 1)
    align = check_int("align", align, 1)
    seed = check_int("seed", seed, 0)
    if fragment > 8:
        raise ValueError(f"fragment must be <= 8 (digit pixels), got {fragment}")
    need = 8 * scale + (2 * fragment * scale if clutter else 0)
    if canvas < need:
        raise ValueError(f"canvas={canvas} leaves no room: it must be >= 8·scale + 2·fragment·scale = {need} "
                         "(a fragment beside the digit wherever the digit lies)")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a float >= 0, got {noise!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    big, labels = upscaled_digits(scale)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(big.shape[0], generator=g)
    n_test = int(round(test_fraction * big.shape[0]))
    test_pool, train_pool = order[:n_test], order[n_test:]
    train = _split(big, labels, train_pool, g, canvas, scale, float(noise), clutter, fragment, align)
    test = _split(big, labels, test_pool, g, canvas, scale, float(noise), clutter, fragment, align)
    return train, test
