"""Pruning at initialisation: magnitude, SNIP and SynFlow scores, one-shot or iterative (stage 1 of
Peek-a-Boo, Chen et al. ICLR 2022).

by ``filter``) gets a score ``S`` and the units (weights, or ``b × b`` blocks scored by the
mean of ``S`` over the block) of largest score are kept:

* ``magnitude``: ``S = |W|``;
* ``snip`` (Lee et al., ICLR 2019): ``S = |W ⊙ G|`` with ``G = Σ_b ∂L_b/∂W`` the gradient of
  the loss (cross-entropy by default) summed over the given data batches ``b``;
* ``synflow`` (Tanaka et al., NeurIPS 2020), data-free: every parameter and buffer is replaced
  by its absolute value in float64 (so the products cannot overflow as soon as in float32), an
  all-ones input ``1`` of one example's shape is passed forward in eval mode, and

      R = 1ᵀ (Π_l |W_l|) 1      (the sum of the outputs),    S = |W ⊙ ∂R/∂W|.

  For a network of Linear / conv layers and ReLUs, ``R`` is exactly that product of absolute
  weight matrices; for a ViT (LayerNorm, softmax, GELU) it is the same recipe applied to the
  absolute network, as in the reference code.

With ``iterations = n`` the units are pruned in ``n`` rounds on an exponential schedule: round
``k = 1..n`` keeps the fraction ``d^{k/n}`` (``d = 1 − sparsity``) of all units, chosen among
the survivors of round ``k − 1`` by scores recomputed on the pruned network (pruned weights
are zero, so a SNIP / SynFlow score sees the pruned network).  ``iterations=None`` means 100
rounds for ``synflow`` (Tanaka et al.'s default) and 1 (one-shot) otherwise; for ``magnitude``
the scores do not depend on the mask, so every schedule gives the one-shot mask.  ``scope``
``"global"`` ranks all units of all layers together and keeps ``round(d_k · Σ_l u_l)``;
``"layer"`` keeps ``round(d_k · u_l)`` of each layer ``l`` (``round`` half to even).  Ties go
to the lowest index (layer order, then the flat index in the layer).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..layer_filters import resolve_filter
from .density import check_sparsity
from .masks import LayerFilter, MaskedWeight, MaskManager, default_filter, topk_mask

__all__ = ["SCORES", "prune_at_init", "pruning_scores"]

SCORES = ("magnitude", "snip", "synflow")
SCOPES = ("global", "layer")
SYNFLOW_ITERATIONS = 100

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Union[Batch, Iterable[Batch]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- checks
def _check_score(score: object) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score  # type: ignore[return-value]


def _check_iterations(iterations: object, score: str) -> int:
    if iterations is None:
        return SYNFLOW_ITERATIONS if score == "synflow" else 1
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations must be an int >= 1 or None, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return iterations


def _batches(data: object) -> list[Batch]:
    """``data`` as a list of ``(x, y)`` batches: one pair, or an iterable of pairs."""
    def is_pair(item: object) -> bool:
        return (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(t, torch.Tensor) for t in item))

    if is_pair(data):
        return [(data[0], data[1])]  # type: ignore[index]
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a pair (x, y) of tensors or an iterable of such pairs, got {type(data).__name__}")
    out = []
    for item in data:
        if not is_pair(item):
            raise TypeError(f"data must be a pair (x, y) of tensors or an iterable of such pairs; an item is "
                            f"{type(item).__name__}")
        out.append((item[0], item[1]))
    if not out:
        raise ValueError("data holds no batch")
    return out


def _select_weights(model: nn.Module, filt: LayerFilter) -> dict[str, torch.Tensor]:
    """``module name -> weight`` of every module with a ≥ 2-dim ``weight`` that ``filt`` keeps."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and filt(name, module):
            out[name] = w
    return out


def _input_shape(model: nn.Module, input_shape: Optional[Sequence[int]], batches: Optional[list[Batch]]) -> tuple:
    """One example's shape: given, from the data, or from a timm-style ``patch_embed`` (``(C, H, W)``)."""
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list, torch.Size)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
            raise TypeError(f"input_shape must be a tuple of positive ints (one example's shape), got {input_shape!r}")
        return tuple(input_shape)
    if batches:
        return tuple(batches[0][0].shape[1:])
    pe = getattr(model, "patch_embed", None)
    size, proj = getattr(pe, "img_size", None), getattr(pe, "proj", None)
    if size is not None and isinstance(proj, nn.Conv2d):
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (proj.in_channels, int(h), int(w))
    raise ValueError("score='synflow' needs one example's shape: pass input_shape=(C, H, W) (or data)")


# --------------------------------------------------------------------------- scores
def _snip(model: nn.Module, weights: Mapping[str, torch.Tensor], batches: list[Batch],
          loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """``|W ⊙ Σ_b ∂L_b/∂W|`` in float64 (gradients through ``functional_call``: no ``.grad`` or hook touched)."""
    total = {n: torch.zeros(w.shape, dtype=torch.float64, device=w.device) for n, w in weights.items()}
    with torch.enable_grad():
        for x, y in batches:
            leaves = {f"{n}.weight": w.detach().requires_grad_(True) for n, w in weights.items()}
            loss = loss_fn(functional_call(model, leaves, (x,)), y)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for n, g in zip(weights, grads):
                if g is not None:
                    total[n] += g.detach().double()
    return {n: (weights[n].detach().double() * total[n]).abs() for n in weights}


def _synflow(model: nn.Module, weights: Mapping[str, torch.Tensor], shape: tuple) -> dict[str, torch.Tensor]:
    """``|W ⊙ ∂R/∂W|``, ``R = Σ f_{|θ|}(1)`` in float64 on the absolute network, eval mode."""
    state: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        state[name] = t.detach().abs().double() if t.is_floating_point() else t
    keys = [f"{n}.weight" for n in weights]
    for k in keys:
        state[k] = state[k].clone().requires_grad_(True)
    device = next(iter(weights.values())).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
            r = functional_call(model, state, (ones,)).sum()
            if not torch.isfinite(r):
                raise ValueError(f"synflow: R = 1ᵀ(Π|W|)1 is {float(r)} even in float64; the network is too deep "
                                 "or its weights too large for SynFlow scores")
            grads = torch.autograd.grad(r, [state[k] for k in keys], allow_unused=True)
    finally:
        model.train(was_training)
    out = {}
    for n, k, g in zip(weights, keys, grads):
        g = torch.zeros_like(state[k]) if g is None else g
        out[n] = (state[k].detach() * g.detach()).abs()
    return out


def _scores(model: nn.Module, weights: Mapping[str, torch.Tensor], score: str, batches: Optional[list[Batch]],
            shape: Optional[tuple], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    if score == "magnitude":
        return {n: w.detach().double().abs() for n, w in weights.items()}
    if score == "snip":
        assert batches is not None
        return _snip(model, weights, batches, loss_fn)
    assert shape is not None
    return _synflow(model, weights, shape)


def pruning_scores(
    model: nn.Module,
    score: str = "magnitude",
    *,
    data: Optional[Data] = None,
    filter: Optional[LayerFilter] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    input_shape: Optional[Sequence[int]] = None,
    loss_fn: Optional[LossFn] = None,
) -> dict[str, torch.Tensor]:
    """``module name -> S`` (float64, the weight's shape) for every selected layer of ``model`` as it is now.

    * ``"magnitude"``: ``S = |W|``;
    * ``"snip"``: ``S = |W ⊙ Σ_b ∂L_b/∂W|`` over the batches of ``data`` (one ``(x, y)`` pair or an
      iterable of pairs; required), ``L = loss_fn(model(x), y)`` (default cross-entropy), in the
      model's current train/eval mode;
    * ``"synflow"``: ``S = |W ⊙ ∂R/∂W|``, ``R = 1ᵀ(Π_l|W_l|)1``: the sum of the outputs of the model
      with every parameter and buffer replaced by its absolute value (float64), eval mode, on an
      all-ones input of ``input_shape`` (default: one example of ``data``, else a timm-style
      ``patch_embed``'s ``(C, H, W)``).

    Layers: every module with a ≥ 2-dim ``weight`` kept by ``filter(name, module)`` (default: Linear
    and Conv2d except the stem and the head) or torchao-style ``filter_fn(module, fqn)``; frozen
    weights are scored too.  The model, its gradients and hooks are left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    score = _check_score(score)
    filt = resolve_filter(filter, filter_fn, default_filter)
    weights = _select_weights(model, filt)
    if not weights:
        raise ValueError("filter selected no layer with a weight of 2 or more dims in model")
    batches, shape, loss_fn = _prepare(model, score, data, input_shape, loss_fn)
    return _scores(model, weights, score, batches, shape, loss_fn)


def _prepare(model: nn.Module, score: str, data: object, input_shape: Optional[Sequence[int]],
             loss_fn: Optional[LossFn]) -> tuple[Optional[list[Batch]], Optional[tuple], LossFn]:
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, target) -> loss, got {type(loss_fn).__name__}")
    loss = loss_fn if loss_fn is not None else F.cross_entropy
    if score == "snip" and data is None:
        raise ValueError("score='snip' needs data: a batch (x, y) or an iterable of batches")
    batches = _batches(data) if data is not None and score != "magnitude" else None
    shape = _input_shape(model, input_shape, batches) if score == "synflow" else None
    return batches, shape, loss


# --------------------------------------------------------------------------- stage 1
def _unit_scores(layer: MaskedWeight, s: torch.Tensor) -> torch.Tensor:
    """Flat per-unit scores (float64, CPU): ``S`` per element, or its mean per ``b × b`` block."""
    if layer.block_size is not None:
        b = layer.block_size
        rows, k = layer.matrix_shape
        s = s.reshape(rows // b, b, k // b, b).mean(dim=(1, 3))
    return s.reshape(-1).detach().cpu().double()


def prune_at_init(
    model: nn.Module,
    sparsity: float,
    *,
    score: str = "magnitude",
    data: Optional[Data] = None,
    iterations: Optional[int] = None,
    scope: str = "global",
    granularity: str = "element",
    block_size: Optional[int] = None,
    filter: Optional[LayerFilter] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    input_shape: Optional[Sequence[int]] = None,
    loss_fn: Optional[LossFn] = None,
) -> MaskManager:
    """Prune ``model`` in place at initialisation; returns the :class:`MaskManager` holding the masks.

    ``n = iterations`` rounds (default 100 for ``synflow``, else 1); round ``k`` keeps the fraction
    ``d_k = (1 − sparsity)^{k/n}`` of the units, the survivors of largest score
    (:func:`pruning_scores`, recomputed each round on the pruned network):
    ``round(d_k · Σ_l u_l)`` over all layers (``scope="global"``) or ``round(d_k · u_l)`` per layer
    (``scope="layer"``).  Blocks (``granularity="block"``) are scored by the mean of ``S`` over
    the block.  Afterwards ``W = W ⊙ M`` and the manager's gradient hooks zero the gradients of
    the pruned weights; its ``densities`` and ``targets`` are the reached ones.  Layers as in
    :class:`MaskManager` (trainable weights only with the default filter).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_sparsity("sparsity", sparsity)
    score = _check_score(score)
    n_iter = _check_iterations(iterations, score)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    batches, shape, loss = _prepare(model, score, data, input_shape, loss_fn)
    manager = MaskManager(model, 0.0, distribution="uniform", granularity=granularity, block_size=block_size,
                          filter=filter, filter_fn=filter_fn, init="dense")
    if manager.sharded:
        manager.remove()
        raise ValueError("prune_at_init does not support FSDP2-sharded weights: prune the unsharded model, "
                         "then fully_shard it")
    layers = manager.layers
    weights = {n: l.weight for n, l in layers.items()}
    density = 1.0 - sparsity
    for k in range(1, n_iter + 1):
        d_k = density if k == n_iter else density ** (k / n_iter)
        raw = _scores(model, weights, score, batches, shape, loss)
        unit = {}
        for name, layer in layers.items():
            s = _unit_scores(layer, raw[name])
            s = torch.nan_to_num(s, nan=0.0)
            unit[name] = torch.where(layer.local_mask.reshape(-1).cpu(), s, torch.tensor(-math.inf, dtype=s.dtype))
        if scope == "layer":
            keep = {n: topk_mask(unit[n], int(round(d_k * layers[n].num_units))) for n in layers}
        else:
            flat = torch.cat([unit[n] for n in layers])
            chosen = topk_mask(flat, int(round(d_k * flat.numel())))
            keep, offset = {}, 0
            for name, layer in layers.items():
                keep[name] = chosen[offset: offset + layer.num_units]
                offset += layer.num_units
        for name, layer in layers.items():
            layer.local_mask = keep[name].reshape(layer.local_unit_shape)
        manager.apply_masks()
    manager.densities = {n: l.density() for n, l in layers.items()}
    manager.targets = manager.active_counts()
    manager.sparsity = manager.total_sparsity()
    return manager
