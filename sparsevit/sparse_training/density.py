"""Per-layer densities for a global sparsity target (RigL, Evci et al., ICML 2020, §3 and appendix).

Given layers with weight shapes ``shape_l`` (``numel`` ``n_l``) and a target
sparsity ``s``, choose densities ``d_l`` with

    Σ_l d_l · n_l = (1 − s) · Σ_l n_l                          (exact total)

* ``uniform``: ``d_l = 1 − s`` for every layer;
* ``er`` (Erdős–Rényi): ``d_l = ε · (n_in + n_out) / (n_in · n_out)``, the
  kernel dims of a conv ignored (Mocanu et al. 2018);
* ``erk`` (Erdős–Rényi–Kernel): ``d_l = ε · Σ dims(shape_l) / Π dims(shape_l)``,
  i.e. ``(n_out + n_in + k_h + k_w) / (n_out · n_in · k_h · k_w)`` for a conv;

with ε solving the total.  A layer whose density would exceed 1 is kept dense
and ε is solved again for the others (repeated until none exceeds 1), exactly
as in the RigL reference code.  A user-given mapping ``name -> density`` is
also accepted and checked.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

__all__ = ["DISTRIBUTIONS", "check_sparsity", "layer_densities", "raw_density_weight"]

DISTRIBUTIONS = ("uniform", "er", "erk")

Distribution = Union[str, Mapping[str, float]]


def check_sparsity(name: str, value: object) -> float:
    """``value`` must be a real number in ``[0, 1)``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def raw_density_weight(shape: Sequence[int], distribution: str) -> float:
    """The unnormalised ER / ERK density of a layer of weight ``shape``.

    ``erk``: ``Σ shape / Π shape``; ``er``: ``(shape[0] + shape[1]) / (shape[0] · shape[1])``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dims (n_out, n_in, ...), got {shape}")
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    if distribution == "er":
        return (shape[0] + shape[1]) / (shape[0] * shape[1])
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS} or a mapping, got {distribution!r}")


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: Distribution = "erk",
) -> dict[str, float]:
    """Density ``d_l`` of every layer so that ``Σ d_l n_l = (1 − s) Σ n_l`` (see the module docstring).

    ``shapes``: ``name -> weight shape`` ``(n_out, n_in, *kernel)``.
    ``distribution``: ``"uniform"``, ``"er"``, ``"erk"``, or a mapping ``name -> density``
    (each in ``(0, 1]``, one per layer; returned as given).
    """
    if not isinstance(shapes, Mapping) or not shapes:
        raise ValueError("shapes must be a non-empty mapping name -> weight shape")
    sparsity = check_sparsity("sparsity", sparsity)
    if isinstance(distribution, Mapping):
        return _user_densities(shapes, distribution)
    if not isinstance(distribution, str):
        raise TypeError(f"distribution must be a str or a mapping name -> density, got {type(distribution).__name__}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS} or a mapping, got {distribution!r}")
    numel = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    if distribution == "uniform":
        return {name: 1.0 - sparsity for name in shapes}
    raw = {name: raw_density_weight(shape, distribution) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        # Σ_{l sparse} ε raw_l n_l = (1 − s) Σ_l n_l − Σ_{l dense} n_l
        rhs = (1.0 - sparsity) * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor <= 0:
            break
        eps = rhs / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        # Only the layer(s) with the largest raw density become dense, then solve again.
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def _user_densities(shapes: Mapping[str, Sequence[int]], given: Mapping[str, float]) -> dict[str, float]:
    missing = [n for n in shapes if n not in given]
    extra = [n for n in given if n not in shapes]
    if missing or extra:
        raise ValueError(
            f"distribution mapping must give one density per sparsified layer; missing {missing}, unknown {extra}"
        )
    out = {}
    for name in shapes:
        d = given[name]
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise TypeError(f"distribution[{name!r}] must be a float in (0, 1], got {type(d).__name__}")
        if not (0.0 < float(d) <= 1.0):
            raise ValueError(f"distribution[{name!r}] must lie in (0, 1], got {d}")
        out[name] = float(d)
    return out
