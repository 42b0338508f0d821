"""BlockSparseLinear: ``y = x Wᵀ + bias`` with a block-sparse weight, fast in training too.

The sparse layer of RigL / lottery-ticket training (Evci et al., ICML 2020; Frankle &
Carbin, ICLR 2019) at block granularity: only the kept ``b × b`` blocks of
``W (out_features, in_features)`` are stored (``weight (nnz, b, b)``) and multiplied.
The forward pass is :func:`sparsevit.dds` ``(x, Wᵀ)``; its backward computes
``dx = dy W`` (dds) and ``dW = Σ dyᵀ x`` on the kept blocks only (sdd).

The layout's index tensors are buffers, so they follow ``.to(device)`` and live in
the ``state_dict``; loading a state dict adopts its layout (see the class docstring
for what is checked and what a different number of kept blocks does).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..backend import choose_backend
from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout
from ..ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT, _dds_op, autocast_operands

__all__ = ["BlockSparseLinear"]

_BUFFERS = ("row_offsets", "col_indices", "row_indices", "col_offsets", "bsc_row_indices", "bsc_perm")


class BlockSparseLinear(nn.Module):
    """A Linear layer whose weight keeps only the blocks of a :class:`BlockSparseLayout`.

    ``y = x Wᵀ + bias`` with ``W (out_features, in_features)`` zero outside the layout.

    Args:
        in_features, out_features: as in ``nn.Linear``; multiples of ``block_size``.
        layout: the ``(out_features, in_features)`` block layout, or None to draw a
            random one at ``sparsity``.
        sparsity: fraction of blocks dropped when no ``layout`` is given.
        block_size: 16, 32, 64 or 128 (taken from ``layout`` when given).
        bias: learn an additive bias.
        backend: backend of the products (None: automatic, see :mod:`sparsevit.backend`).

    Loading a ``state_dict`` checks everything before it changes anything, so a refused
    load leaves the module exactly as it was (``load_state_dict`` then raises its
    RuntimeError, with a line naming the key and the problem).  Checked: every value is
    a tensor; the six layout buffers come together, int32, and form a valid layout of
    this module's ``(out_features, in_features)`` at its ``block_size`` (a layout of
    another shape or block size is refused; see :meth:`BlockSparseLayout.validate`);
    ``weight`` is floating-point ``(nnz, b, b)`` for that layout (a layout is never
    loaded without its weight, and a weight alone must fit the current layout);
    ``bias`` is floating-point ``(out_features,)``.  Missing and unexpected keys are
    reported as ``nn.Module`` reports them (``strict`` is not passed down to modules,
    so the consistent keys present still load before ``load_state_dict`` raises for
    them, as in every torch module).  Values are copied in
    place, converting dtype as ``nn.Linear`` does, so the ``weight`` Parameter object
    stays the same and optimizers keep training it.  When the saved layout keeps a
    different number of blocks the same Parameter is resized in place (its ``.grad``
    dropped) and a UserWarning says so: optimizer state made for the old size (SGD
    momentum, Adam moments) no longer fits, so load the optimizer's own state dict
    afterwards, or rebuild the optimizer.  ``assign=True`` adopts the saved tensors
    themselves, after the same checks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: Optional[BlockSparseLayout] = None,
        *,
        sparsity: Optional[float] = None,
        block_size: int = 32,
        bias: bool = True,
        backend: Optional[str] = None,
        device: "torch.device | str | None" = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if layout is None:
            if sparsity is None:
                raise ValueError("give a layout or a sparsity")
            layout = BlockSparseLayout.random((out_features, in_features), block_size, sparsity, device=device)
        else:
            if not isinstance(layout, BlockSparseLayout):
                raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
            if sparsity is not None:
                raise ValueError("give a layout or a sparsity, not both")
            if layout.shape != (out_features, in_features):
                raise ValueError(f"layout shape {layout.shape} must be (out_features, in_features) = {(out_features, in_features)}")
            if device is not None:
                layout = layout.to(device)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = layout.block_size
        self.backend = backend
        b = layout.block_size
        factory = dict(device=layout.device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(layout.nnz_blocks, b, b, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        for name, t in zip(_BUFFERS, layout.index_tensors()):
            self.register_buffer(name, t.clone())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: U(−1/√in, 1/√in) for the kept weights and the bias."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def layout(self) -> BlockSparseLayout:
        """The current block layout (built from the index buffers, checked when they were set)."""
        return BlockSparseLayout._trusted(
            (self.out_features, self.in_features), self.block_size, *(getattr(self, n) for n in _BUFFERS)
        )

    @property
    def density(self) -> float:
        return self.layout.density

    def sparse_weight(self) -> BlockSparseMatrix:
        """``W`` as a :class:`BlockSparseMatrix` sharing this module's parameter."""
        return BlockSparseMatrix(self.weight, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Wᵀ + bias``: x (..., in_features) -> (..., out_features).

        Inside a ``torch.autocast`` region x, W and the bias are cast to the region's
        dtype first, as ``nn.Linear`` does (the weight's gradient stays in its own dtype).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (..., {self.in_features}), got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must be (..., {self.in_features}), got {tuple(x.shape)}")
        x, weight, bias = autocast_operands(x.device, x, self.weight, self.bias)
        if x.dtype != weight.dtype:
            raise TypeError(f"x must have the weight's dtype {weight.dtype}, got {x.dtype}")
        a = x if x.dim() >= 2 else x.unsqueeze(0)
        index = [getattr(self, n) for n in _BUFFERS]
        name = choose_backend(BLOCK_SPARSE_SUPPORT, [a, weight], self.backend)
        y = _dds_op(a, weight, index, True, name)  # x @ Wᵀ through the BSR index
        if bias is not None:
            y = y + bias
        return y if x.dim() >= 2 else y.squeeze(0)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        block_size: Optional[int] = None,
        sparsity: Optional[float] = None,
        layout: Optional[BlockSparseLayout] = None,
        norm: str = "l2",
        backend: Optional[str] = None,
    ) -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight`` given by ``layout``, or the largest-norm blocks
        at ``sparsity`` (:meth:`BlockSparseLayout.from_dense`), copying values and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if layout is None:
            if block_size is None or sparsity is None:
                raise ValueError("give either layout, or block_size and sparsity")
            layout = BlockSparseLayout.from_dense(w, block_size, sparsity, norm)
        elif block_size is not None or sparsity is not None:
            raise ValueError("give either layout, or block_size and sparsity, not both")
        layout = layout.to(w.device)
        mod = cls(linear.in_features, linear.out_features, layout, bias=linear.bias is not None,
                  backend=backend, dtype=w.dtype)
        with torch.no_grad():
            mod.weight.copy_(BlockSparseMatrix.from_dense(w, layout).values)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros outside the kept blocks)."""
        w = self.sparse_weight().to_dense().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # -- state dict -------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Check the saved weight, bias and layout completely, then adopt them in one step (class docstring)."""
        for hook in self._load_state_dict_pre_hooks.values():  # as nn.Module does, before anything is read
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        names = ("weight",) + (("bias",) if self.bias is not None else ()) + _BUFFERS
        saved = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        # Missing and unexpected keys follow nn.Module's contract (reported; load_state_dict
        # raises for them when strict, which it does not pass down to modules).
        missing_keys.extend(prefix + n for n in names if n not in saved)
        unexpected_keys.extend(
            k for k in state_dict
            if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] not in names
        )
        errors = _check_saved(self, saved, prefix)
        if errors:
            error_msgs.extend(errors)
            return
        self._commit(saved, prefix, bool(local_metadata.get("assign_to_params_buffers", False)))

    @torch.no_grad()
    def _commit(self, saved: dict, prefix: str, assign: bool) -> None:
        """Adopt checked tensors: every conversion first, then only assignments and in-place copies."""
        if assign:
            for name, t in saved.items():
                if name in _BUFFERS:
                    setattr(self, name, t.contiguous())
                else:
                    setattr(self, name, nn.Parameter(t, requires_grad=getattr(self, name).requires_grad))
            return
        ready = {}
        for name, t in saved.items():
            current = getattr(self, name)
            ready[name] = t.to(device=current.device, dtype=current.dtype, copy=t.shape != current.shape)
        if "weight" in ready and ready["weight"].shape != self.weight.shape:
            old_nnz, new_nnz = self.weight.shape[0], ready["weight"].shape[0]
            warnings.warn(
                f"BlockSparseLinear {prefix.rstrip('.') or '(root)'!r} kept {old_nnz} blocks; the saved layout keeps "
                f"{new_nnz}: its weight Parameter was resized in place, so optimizer state made for the old size "
                "(momentum, Adam moments) no longer fits: load the optimizer's state dict after this, or rebuild "
                "the optimizer",
                UserWarning,
                stacklevel=5,  # the caller of load_state_dict, for a root module
            )
            self.weight.grad = None
            self.weight.data = ready.pop("weight")
        for name, t in ready.items():
            current = getattr(self, name)
            if t.shape == current.shape:
                current.copy_(t)
            else:
                setattr(self, name, t)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"nnz_blocks={lay.nnz_blocks}, density={lay.density:.3f}, bias={self.bias is not None}"
        )


def _check_saved(mod: BlockSparseLinear, saved: dict, prefix: str) -> list[str]:
    """Every problem of the saved tensors for ``mod``, as error lines naming the key; [] when they fit."""
    errors = []
    for name, t in saved.items():
        if not torch.overrides.is_tensor_like(t):
            errors.append(f"{prefix}{name}: expected a torch.Tensor, got {type(t).__name__}")
    if errors:
        return errors
    b = mod.block_size
    out_f, in_f = mod.out_features, mod.in_features
    index = [n for n in _BUFFERS if n in saved]
    nnz = mod.weight.shape[0]
    weight = saved.get("weight")
    if weight is not None and weight.dim() == 3 and weight.shape[1] == weight.shape[2] and weight.shape[1] != b:
        return [
            f"{prefix}weight: the saved layer has block size {weight.shape[1]}, this module has block_size={b}: "
            "a layout of another block size cannot be loaded"
        ]
    if index:
        if len(index) != len(_BUFFERS):
            lacking = [prefix + n for n in _BUFFERS if n not in saved]
            return [f"{prefix}{index[0]}: the six layout buffers load together, the state lacks {lacking}"]
        if weight is None:
            return [f"{prefix}row_offsets: a saved layout cannot be loaded without its weight ({prefix}weight)"]
        rows, cols = saved["row_offsets"], saved["col_offsets"]
        for key, t, dim, feats in (("row_offsets", rows, out_f, "out_features"), ("col_offsets", cols, in_f, "in_features")):
            if t.dim() != 1 or t.numel() != dim // b + 1:
                return [
                    f"{prefix}{key}: the saved layout has {t.numel() - 1 if t.dim() == 1 else '?'} block "
                    f"{'rows' if key == 'row_offsets' else 'columns'}, this module ({feats}={dim}, block_size={b}) "
                    f"has {dim // b}: a layout of another shape cannot be loaded"
                ]
        dev = rows.device
        try:
            layout = BlockSparseLayout((out_f, in_f), b, *(saved[n].to(dev) for n in _BUFFERS))
        except (TypeError, ValueError) as err:
            msg = str(err)
            culprit = min(_BUFFERS, key=lambda n: msg.find(n) if n in msg else len(msg))
            return [f"{prefix}{culprit}: the saved layout is invalid: {msg}"]
        nnz = layout.nnz_blocks
    if weight is not None:
        if not weight.is_floating_point():
            errors.append(f"{prefix}weight must be a floating-point tensor, got {weight.dtype}")
        elif tuple(weight.shape) != (nnz, b, b):
            errors.append(
                f"{prefix}weight: expected (nnz_blocks, b, b) = {(nnz, b, b)} for the "
                f"{'saved' if index else 'current'} layout, got {tuple(weight.shape)}"
            )
    bias = saved.get("bias")
    if bias is not None:
        if not bias.is_floating_point():
            errors.append(f"{prefix}bias must be a floating-point tensor, got {bias.dtype}")
        elif tuple(bias.shape) != (out_f,):
            errors.append(f"{prefix}bias: expected shape {(out_f,)}, got {tuple(bias.shape)}")
    return errors
