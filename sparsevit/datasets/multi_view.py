"""Synthetic multi-view images (the data model of Allen-Zhu & Li, ICLR 2023, "Towards Understanding
Ensemble, Knowledge Distillation and Self-Distillation in Deep Learning").

Every class ``k ∈ {0, …, K−1}`` owns ``V`` fixed feature patterns ("views")
``v_{k,1}, …, v_{k,V} ∈ R^{p×p}``, drawn once from ``pattern_seed``: standard Gaussian,
orthonormalised (QR) when the ``K·V`` patterns fit in ``p²`` dimensions, and scaled to unit
RMS (``‖v_{k,j}‖₂ = p``).  An image is a ``grid × grid`` grid of ``P = grid²`` patches of
``p × p`` pixels, one channel, patch ``i`` at rows ``(i // grid)·p …`` and columns
``(i mod grid)·p …`` (row-major, the order of a ViT's patch tokens).

A sample of class ``y`` (the classes are balanced: ``n // K`` or ``n // K + 1`` each) is

* **multi-view** (a fraction ``1 − q`` of the samples): all ``V`` views of ``y``, each at its own
  random patch ``π_j``;
* **single-view** (exactly ``round(q·n)`` samples): only one view ``j ~ U{1..V}`` of ``y``, at a
  random patch;

plus ``D`` distractor patches carrying weak features of *other* classes (the paper's
"feature noise"): patch ``δ_d`` shows view ``j'_d ~ U{1..V}`` of class ``k'_d ≠ y``
(uniform over the other classes) at amplitude ``γ``.  All view and distractor patches are
distinct.  With Gaussian noise ``ξ_i ~ N(0, σ² I)`` on every patch:

    x_{π_j} = α · v_{y,j} + ξ_{π_j}        for each view j present,
    x_{δ_d} = γ · v_{k'_d, j'_d} + ξ_{δ_d}   for each distractor d,
    x_i     = ξ_i                            on every other patch.

A model that learned only one view of a class classifies the multi-view samples (which
always show that view) but fails the single-view samples showing the other one, where the
distractors decide: the mechanism by which ensembles and distillation help in the paper.

Everything random is drawn from CPU generators: the patterns from ``pattern_seed``, the
samples (labels, single-view choice, positions, distractors, noise) from ``seed``.
:func:`multi_view_splits` draws the train and the test split one after the other from one
sample generator, over the same patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = ["MultiViewDataset", "class_patterns", "multi_view_dataset", "multi_view_splits"]


@dataclass
class MultiViewDataset:
    """One split.

    * ``images (N, 1, grid·p, grid·p)`` float32, ``labels (N,)`` int64;
    * ``single_view (N,)`` bool: True for the single-view samples;
    * ``view_patches (N, V)`` int64: the patch index of view ``j`` of the sample's class, ``-1``
      where the view is absent (single-view samples have exactly one index ``>= 0``);
    * ``distractor_patches``, ``distractor_classes``, ``distractor_views`` ``(N, D)`` int64: the
      patch, class and view of each distractor;
    * ``patterns (K, V, p, p)`` float32: the class views ``v_{k,j}``;
    * the generation parameters ``patch``, ``grid``, ``amplitude`` (α), ``distractor`` (γ), ``noise`` (σ).
    """

    images: torch.Tensor
    labels: torch.Tensor
    single_view: torch.Tensor
    view_patches: torch.Tensor
    distractor_patches: torch.Tensor
    distractor_classes: torch.Tensor
    distractor_views: torch.Tensor
    patterns: torch.Tensor
    patch: int
    grid: int
    amplitude: float
    distractor: float
    noise: float

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return self.patterns.shape[0]

    @property
    def views(self) -> int:
        return self.patterns.shape[1]

    @property
    def views_present(self) -> torch.Tensor:
        """``(N, V)`` bool: which views of its class each sample shows."""
        return self.view_patches >= 0

    @property
    def multi_view(self) -> torch.Tensor:
        """``(N,)`` bool: the complement of ``single_view``."""
        return ~self.single_view

    def patch_pixels(self, sample: int, index: int) -> torch.Tensor:
        """The ``(p, p)`` pixels of patch ``index`` of image ``sample``."""
        r, c = divmod(int(index), self.grid)
        p = self.patch
        return self.images[sample, 0, r * p:(r + 1) * p, c * p:(c + 1) * p]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` mini-batches."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.images[idx], self.labels[idx]


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value: object, minimum: float, strict: bool = False, maximum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum) or (maximum is not None and v > maximum):
        bound = f"in [{minimum:g}, {maximum:g}]" if maximum is not None else (f"> {minimum:g}" if strict else f">= {minimum:g}")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return v


def _seed(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def class_patterns(num_classes: int = 10, views: int = 2, patch: int = 4, seed: int = 0) -> torch.Tensor:
    """The views ``v_{k,j}``, ``(K, V, p, p)`` float32, unit RMS; orthonormal (times ``p``) when ``K·V ≤ p²``."""
    k = _int("num_classes", num_classes, 2)
    v = _int("views", views, 1)
    p = _int("patch", patch, 1)
    g = torch.Generator().manual_seed(_seed("seed", seed))
    raw = torch.randn(p * p, k * v, generator=g, dtype=torch.float64)
    if k * v <= p * p:
        raw, _ = torch.linalg.qr(raw)  # orthonormal columns
    raw = raw / raw.norm(dim=0, keepdim=True)
    return (raw.T * p).reshape(k, v, p, p).to(torch.float32)


@dataclass(frozen=True)
class _Config:
    num_classes: int
    views: int
    single_view_fraction: float
    patch: int
    grid: int
    amplitude: float
    noise: float
    distractor: float
    num_distractors: int


def _config(num_classes, views, single_view_fraction, patch, grid, amplitude, noise, distractor, num_distractors) -> _Config:
    cfg = _Config(
        num_classes=_int("num_classes", num_classes, 2),
        views=_int("views", views, 1),
        single_view_fraction=_float("single_view_fraction", single_view_fraction, 0.0, maximum=1.0),
        patch=_int("patch", patch, 1),
        grid=_int("grid", grid, 1),
        amplitude=_float("amplitude", amplitude, 0.0, strict=True),
        noise=_float("noise", noise, 0.0),
        distractor=_float("distractor", distractor, 0.0),
        num_distractors=_int("num_distractors", num_distractors, 0),
    )
    if cfg.grid * cfg.grid < cfg.views + cfg.num_distractors:
        raise ValueError(f"grid={cfg.grid} has {cfg.grid ** 2} patches, too few to place views={cfg.views} "
                         f"and num_distractors={cfg.num_distractors} at distinct patches")
    return cfg


def _sample(n: int, cfg: _Config, patterns: torch.Tensor, g: torch.Generator) -> MultiViewDataset:
    k, v, p, grid, d = cfg.num_classes, cfg.views, cfg.patch, cfg.grid, cfg.num_distractors
    n_patches = grid * grid
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    single = torch.zeros(n, dtype=torch.bool)
    single[torch.randperm(n, generator=g)[:int(math.floor(cfg.single_view_fraction * n + 0.5))]] = True
    chosen = torch.randint(0, v, (n,), generator=g)
    order = torch.rand(n, n_patches, generator=g).argsort(dim=1)  # a random permutation of the patches per sample
    view_patches = order[:, :v].clone()
    keep = ~single.unsqueeze(1) | (torch.arange(v).unsqueeze(0) == chosen.unsqueeze(1))
    view_patches[~keep] = -1
    distractor_patches = order[:, v:v + d].clone()
    distractor_classes = (labels.unsqueeze(1) + torch.randint(1, k, (n, d), generator=g)) % k
    distractor_views = torch.randint(0, v, (n, d), generator=g)
    patches = torch.randn(n, n_patches, p, p, generator=g) * cfg.noise
    rows = torch.arange(n)
    for j in range(v):
        r = rows[keep[:, j]]
        patches[r, view_patches[r, j]] += cfg.amplitude * patterns[labels[r], j]
    if cfg.distractor > 0:
        for i in range(d):
            patches[rows, distractor_patches[:, i]] += cfg.distractor * patterns[distractor_classes[:, i], distractor_views[:, i]]
    images = patches.reshape(n, grid, grid, p, p).permute(0, 1, 3, 2, 4).reshape(n, 1, grid * p, grid * p).contiguous()
    return MultiViewDataset(images, labels, single, view_patches, distractor_patches, distractor_classes,
                            distractor_views, patterns, p, grid, cfg.amplitude, cfg.distractor, cfg.noise)


def multi_view_dataset(
    n: int,
    *,
    num_classes: int = 10,
    views: int = 2,
    single_view_fraction: float = 0.2,
    patch: int = 4,
    grid: int = 4,
    amplitude: float = 1.0,
    noise: float = 0.5,
    distractor: float = 0.4,
    num_distractors: int = 2,
    seed: int = 0,
    pattern_seed: Optional[int] = None,
) -> MultiViewDataset:
    """``n`` samples of the module's generative model (see the module docstring).

    ``amplitude`` α, ``noise`` σ, ``distractor`` γ (0: no feature noise), ``num_distractors`` D;
    the patterns come from ``pattern_seed`` (default: ``seed``), the samples from ``seed``.
    """
    n = _int("n", n, 0)
    cfg = _config(num_classes, views, single_view_fraction, patch, grid, amplitude, noise, distractor, num_distractors)
    seed = _seed("seed", seed)
    pattern_seed = seed if pattern_seed is None else _seed("pattern_seed", pattern_seed)
    patterns = class_patterns(cfg.num_classes, cfg.views, cfg.patch, pattern_seed)
    return _sample(n, cfg, patterns, torch.Generator().manual_seed(seed))


def multi_view_splits(
    n_train: int = 2000,
    n_test: int = 1000,
    *,
    num_classes: int = 10,
    views: int = 2,
    single_view_fraction: float = 0.2,
    patch: int = 4,
    grid: int = 4,
    amplitude: float = 1.0,
    noise: float = 0.5,
    distractor: float = 0.4,
    num_distractors: int = 2,
    seed: int = 0,
    pattern_seed: int = 0,
) -> tuple[MultiViewDataset, MultiViewDataset]:
    """``(train, test)`` over the same class patterns (from ``pattern_seed``); the samples of both
    come from one generator seeded with ``seed``, train first."""
    n_train = _int("n_train", n_train, 0)
    n_test = _int("n_test", n_test, 0)
    cfg = _config(num_classes, views, single_view_fraction, patch, grid, amplitude, noise, distractor, num_distractors)
    patterns = class_patterns(cfg.num_classes, cfg.views, cfg.patch, _seed("pattern_seed", pattern_seed))
    g = torch.Generator().manual_seed(_seed("seed", seed))
    return _sample(n_train, cfg, patterns, g), _sample(n_test, cfg, patterns, g)
