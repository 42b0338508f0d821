"""BlockSparseLayout: the block sparsity pattern of a matrix, as BSR and BSC index tensors.

Block sparsity makes RigL / lottery-ticket sparsity (Evci et al., ICML 2020; Frankle &
Carbin, ICLR 2019) fast on GPUs: the mask lives on square ``b × b`` blocks, so every
kept block is a dense tile for the tensor cores.

For an ``(M, K)`` matrix at block size ``b`` the block mask is ``(M/b, K/b)``; its
``nnz`` kept blocks are packed in row-major (BSR) order.  The layout holds

* BSR: ``row_offsets (M/b + 1,)``, ``col_indices (nnz,)`` and ``row_indices (nnz,)``
  (block ``t`` sits at block row ``row_indices[t]``, block column ``col_indices[t]``;
  the blocks of block row ``i`` are ``row_offsets[i] : row_offsets[i+1]``);
* BSC: ``col_offsets (K/b + 1,)``, ``bsc_row_indices (nnz,)`` and ``bsc_perm (nnz,)``:
  the ``s``-th block in column-major order is packed block ``bsc_perm[s]``, so the
  transposed matrix is read through this index without moving any values.

All index tensors are int32 on the layout's device and are built there from the
mask (the only host round-trips are the block counts).  A layout is immutable and
hashable (by content), so it can key caches.

Every kernel trusts these indices, so a layout built from index tensors a user gives
(the constructor, unpickling, a loaded ``state_dict``) is checked once, by
:meth:`BlockSparseLayout.validate`, before anything can use it; the constructors that
derive the indices themselves (:meth:`~BlockSparseLayout.from_mask` and the ones built
on it, :meth:`~BlockSparseLayout.to`) skip that redundant check.  The index tensors
must not be modified in place afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["BlockSparseLayout", "BLOCK_SIZES"]

BLOCK_SIZES = (16, 32, 64, 128)
_INDEX_NAMES = ("row_offsets", "col_indices", "row_indices", "col_offsets", "bsc_row_indices", "bsc_perm")


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return block_size


def _check_shape(shape: object, block_size: int) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be a pair (M, K), got {shape!r}")
    m, k = (int(s) for s in shape)
    if m <= 0 or k <= 0:
        raise ValueError(f"shape must be positive, got {(m, k)}")
    if m % block_size or k % block_size:
        raise ValueError(f"shape {(m, k)} must be a multiple of block_size={block_size} in both dims")
    return m, k


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1], got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return float(sparsity)


def _has_data(t: torch.Tensor) -> bool:
    """False for tensors whose values cannot be read: meta, and fake tensors while tracing."""
    if t.is_meta:
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return True
    return not is_fake(t)


def kept_blocks(num_blocks: int, sparsity: float) -> int:
    """Blocks kept at a target ``sparsity``: ``num_blocks − round(sparsity · num_blocks)``."""
    return num_blocks - int(round(sparsity * num_blocks))


class BlockSparseLayout:
    """The block sparsity pattern of an ``(M, K)`` matrix; see the module docstring.

    Build one with :meth:`from_mask`, :meth:`from_dense` or :meth:`random`, or from
    the six index tensors of the module docstring (checked by :meth:`validate`).
    """

    __slots__ = ("shape", "block_size") + _INDEX_NAMES + ("_hash",)

    def __init__(
        self,
        shape: tuple[int, int],
        block_size: int,
        row_offsets: torch.Tensor,
        col_indices: torch.Tensor,
        row_indices: torch.Tensor,
        col_offsets: torch.Tensor,
        bsc_row_indices: torch.Tensor,
        bsc_perm: torch.Tensor,
    ) -> None:
        """Wrap user-given index tensors, after checking them with :meth:`validate` (syncs).

        The tensors are made contiguous (the kernels read them with unit stride); a
        ValueError names the first inconsistency.
        """
        self._fill(shape, block_size, (row_offsets, col_indices, row_indices, col_offsets, bsc_row_indices, bsc_perm))
        self.validate()

    def _fill(self, shape: tuple[int, int], block_size: int, index: tuple) -> None:
        block_size = _check_block_size(block_size)
        set_ = object.__setattr__
        set_(self, "shape", _check_shape(shape, block_size))
        set_(self, "block_size", block_size)
        for name, t in zip(_INDEX_NAMES, index):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-D tensor")
            set_(self, name, t.contiguous())
        set_(self, "_hash", None)

    @classmethod
    def _trusted(cls, shape: tuple[int, int], block_size: int, *index: torch.Tensor) -> "BlockSparseLayout":
        """A layout of indices derived by this module (or already validated): no data checks."""
        layout = cls.__new__(cls)
        layout._fill(shape, block_size, index)
        return layout

    # -- immutability -------------------------------------------------------------
    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BlockSparseLayout is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"BlockSparseLayout is immutable (cannot delete {name!r})")

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockSparseLayout":
        """Layout of the kept blocks ``mask (M/b, K/b)`` (bool) of an ``(M, K)`` matrix."""
        block_size = _check_block_size(block_size)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (M/b, K/b), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask must have 2 dims (M/b, K/b), got shape {tuple(mask.shape)}")
        mb, kb = mask.shape
        shape = _check_shape((mb * block_size, kb * block_size), block_size)
        dev = mask.device
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        row_offsets = torch.cat([zero, mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        col_offsets = torch.cat([zero, mask.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        nz = mask.nonzero()  # row-major order: the packed (BSR) order
        nnz = nz.shape[0]
        ordinal = torch.full((mb, kb), -1, dtype=torch.int32, device=dev)
        ordinal[nz[:, 0], nz[:, 1]] = torch.arange(nnz, dtype=torch.int32, device=dev)
        nz_t = mask.t().nonzero()  # (col, row), column-major order
        bsc_perm = ordinal[nz_t[:, 1], nz_t[:, 0]]
        return cls._trusted(
            shape, block_size,
            row_offsets, nz[:, 1].to(torch.int32), nz[:, 0].to(torch.int32),
            col_offsets, nz_t[:, 1].to(torch.int32), bsc_perm.to(torch.int32),
        )

    @staticmethod
    def block_norms(weight: torch.Tensor, block_size: int, norm: str = "l2") -> torch.Tensor:
        """Per-block norms ``(M/b, K/b)`` of ``weight (M, K)``: L2 ``sqrt(Σ w²)`` or L1 ``Σ |w|``."""
        m, k = _check_shape(tuple(weight.shape), _check_block_size(block_size))
        b = block_size
        blocks = weight.detach().float().reshape(m // b, b, k // b, b)
        if norm == "l2":
            return blocks.pow(2).sum(dim=(1, 3)).sqrt()
        if norm == "l1":
            return blocks.abs().sum(dim=(1, 3))
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, block_size: int, sparsity: float, norm: str = "l2"
    ) -> "BlockSparseLayout":
        """Keep the ``nnz = n − round(sparsity · n)`` blocks of ``weight (M, K)`` of largest norm.

        ``n = (M/b)(K/b)``; the norm of a block is L2 (``norm="l2"``) or L1 (``"l1"``),
        see :meth:`block_norms`.  Ties are broken by ``torch.topk``.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor (M, K)")
        sparsity = _check_sparsity(sparsity)
        norms = cls.block_norms(weight, block_size, norm)
        keep = kept_blocks(norms.numel(), sparsity)
        mask = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
        if keep:
            mask[torch.topk(norms.flatten(), keep).indices] = True
        return cls.from_mask(mask.view(norms.shape), block_size)

    @classmethod
    def random(
        cls,
        shape: tuple[int, int],
        block_size: int,
        sparsity: float,
        *,
        device: "torch.device | str | None" = None,
        generator: Optional[torch.Generator] = None,
    ) -> "BlockSparseLayout":
        """Keep ``n − round(sparsity · n)`` of the ``n`` blocks, chosen uniformly at random."""
        block_size = _check_block_size(block_size)
        m, k = _check_shape(shape, block_size)
        sparsity = _check_sparsity(sparsity)
        n = (m // block_size) * (k // block_size)
        gen_device = generator.device if generator is not None else device
        order = torch.randperm(n, generator=generator, device=gen_device)
        mask = torch.zeros(n, dtype=torch.bool, device=order.device)
        mask[order[: kept_blocks(n, sparsity)]] = True
        return cls.from_mask(mask.view(m // block_size, k // block_size).to(device), block_size)

    @classmethod
    def dense(cls, shape: tuple[int, int], block_size: int, device: "torch.device | str | None" = None) -> "BlockSparseLayout":
        """Every block kept (sparsity 0)."""
        block_size = _check_block_size(block_size)
        m, k = _check_shape(shape, block_size)
        return cls.from_mask(torch.ones(m // block_size, k // block_size, dtype=torch.bool, device=device), block_size)

    # -- properties -----------------------------------------------------------------
    @property
    def blocks_shape(self) -> tuple[int, int]:
        """``(M/b, K/b)``."""
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    @property
    def nnz_blocks(self) -> int:
        """Number of kept blocks."""
        return self.col_indices.shape[0]

    @property
    def density(self) -> float:
        """``nnz_blocks / ((M/b)(K/b))``."""
        mb, kb = self.blocks_shape
        return self.nnz_blocks / (mb * kb)

    @property
    def sparsity(self) -> float:
        """``1 − density``."""
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        return self.row_offsets.device

    def index_tensors(self) -> list[torch.Tensor]:
        """``[row_offsets, col_indices, row_indices, col_offsets, bsc_row_indices, bsc_perm]``."""
        return [getattr(self, name) for name in _INDEX_NAMES]

    def to_mask(self) -> torch.Tensor:
        """The block mask ``(M/b, K/b)`` bool."""
        mask = torch.zeros(self.blocks_shape, dtype=torch.bool, device=self.device)
        mask[self.row_indices.long(), self.col_indices.long()] = True
        return mask

    def to(self, device: "torch.device | str") -> "BlockSparseLayout":
        """The same layout on ``device``."""
        return BlockSparseLayout._trusted(self.shape, self.block_size, *(t.to(device) for t in self.index_tensors()))

    # -- checks -----------------------------------------------------------------------
    def validate(self) -> "BlockSparseLayout":
        """Check that the index tensors describe one consistent pattern (syncs); return self.

        Raises ValueError naming the first inconsistency: dtypes (int32), devices and
        sizes, in-range distinct ``(row, col)`` pairs, and every index equal to the one
        :meth:`from_mask` derives from that block set, i.e. offsets that count the
        blocks, strictly increasing columns within a block row (BSR, row-major), and a
        BSC index (``col_offsets``, ``bsc_row_indices``, ``bsc_perm``) that is exactly
        its transpose.  Tensors without data (meta / fake, as under tracing) get only
        the dtype, device and size checks.
        """
        mb, kb = self.blocks_shape
        nnz = self.nnz_blocks
        sizes = {"row_offsets": mb + 1, "col_offsets": kb + 1}
        for name in _INDEX_NAMES:
            t = getattr(self, name)
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on {self.device}, got {t.device}")
            want = sizes.get(name, nnz)
            if t.numel() != want:
                raise ValueError(f"{name} must have {want} entries, got {t.numel()}")
        if nnz > mb * kb:
            raise ValueError(f"nnz_blocks={nnz} exceeds the {mb * kb} blocks of the matrix")
        if not _has_data(self.row_offsets):
            return self
        mask = torch.zeros(mb, kb, dtype=torch.bool, device=self.device)
        if nnz:
            if self.col_indices.min() < 0 or self.col_indices.max() >= kb:
                raise ValueError(f"col_indices must lie in [0, {kb})")
            if self.row_indices.min() < 0 or self.row_indices.max() >= mb:
                raise ValueError(f"row_indices must lie in [0, {mb})")
            mask[self.row_indices.long(), self.col_indices.long()] = True
        expected = BlockSparseLayout.from_mask(mask, self.block_size) if int(mask.sum()) == nnz else None
        if expected is None:
            raise ValueError("the (row_indices, col_indices) pairs must be distinct")
        for name in _INDEX_NAMES:
            if not torch.equal(getattr(self, name), getattr(expected, name)):
                raise ValueError(f"{name} is inconsistent with the block pattern (BSR row-major order, BSC its transpose)")
        return self

    # -- hashing ----------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.shape, self.block_size, str(self.device))

    def __hash__(self) -> int:
        if self._hash is None:
            content = hash(self.col_indices.cpu().numpy().tobytes() + self.row_offsets.cpu().numpy().tobytes())
            object.__setattr__(self, "_hash", hash(self._key() + (content,)))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        if self is other:
            return True
        return (
            self._key() == other._key()
            and self.nnz_blocks == other.nnz_blocks
            and torch.equal(self.row_offsets, other.row_offsets)
            and torch.equal(self.col_indices, other.col_indices)
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, device={self.device})"
        )

    def __reduce__(self):
        return (BlockSparseLayout, (self.shape, self.block_size, *self.index_tensors()))

