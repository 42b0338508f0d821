"""What a kernel's PTX and SASS say about how it uses the hardware.

* MMA family: ``wgmma.mma_async`` (Hopper warpgroup MMA; SASS ``HGMMA``), ``mma.sync``
  (Ampere-style warp MMA; SASS ``HMMA``), ``wmma.mma.sync`` (the WMMA API, also
  ``HMMA`` in SASS), or none (CUDA cores only).  A kernel whose products lower to
  both warpgroup and warp MMAs (e.g. one ``tl.dot`` with a 32-row tile) is
  ``"wgmma+mma.sync"``.
* Asynchronous copies: ``cp.async.{ca,cg}`` (Ampere global → shared; SASS ``LDGSTS``)
  and ``cp.async.bulk`` (the Hopper Tensor Memory Accelerator, TMA; SASS ``UTMALDG``
  / ``UBLKCP``).
* The widest global access: ``ld.global.v4.b32`` moves 4 × 32 bits = 16 bytes per
  thread, ``st.global.b16`` 2 bytes; a ``cp.async`` moves its copy-size operand.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

__all__ = ["PtxFacts", "ptx_facts", "mma_family", "mma_counts", "sass_mma_family", "access_bytes", "widest_access",
           "cp_async_bytes", "uses_cp_async", "uses_tma", "sass_counts"]

MMA_FAMILIES = ("wgmma", "wgmma+mma.sync", "mma.sync", "wmma", "none")

_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_VECTOR = re.compile(r"^v(\d+)$")
_SCALAR = re.compile(r"^[bfsu](\d+)$")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global(?:\.[\w:]+)*\s+\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*([0-9xXa-fA-F]+)")
_SASS_OPS = ("HGMMA", "HMMA", "IMMA", "DMMA", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP", "LDL", "STL")


def mma_counts(ptx: str) -> dict[str, int]:
    """How many ``wgmma.mma_async``, ``mma.sync`` and ``wmma.mma`` instructions ``ptx`` has."""
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "mma.sync": len(re.findall(r"(?<![\w.])mma\.sync\b", ptx)),
        "wmma": len(re.findall(r"\bwmma\.mma\b", ptx)),
    }


def _family(wgmma: int, warp_mma: int, wmma: int) -> str:
    if wgmma:
        return "wgmma+mma.sync" if warp_mma or wmma else "wgmma"
    if warp_mma:
        return "mma.sync"
    return "wmma" if wmma else "none"


def mma_family(ptx: str) -> str:
    """``"wgmma"``, ``"wgmma+mma.sync"``, ``"mma.sync"``, ``"wmma"`` or ``"none"``: the matrix
    instructions in ``ptx``."""
    counts = mma_counts(ptx)
    return _family(counts["wgmma"], counts["mma.sync"], counts["wmma"])


def sass_mma_family(sass: str) -> str:
    """The same from SASS: ``HGMMA`` is wgmma, ``HMMA``/``IMMA``/``DMMA`` warp MMA (``"mma.sync"``)."""
    counts = sass_counts(sass)
    return _family(counts["HGMMA"], counts["HMMA"] + counts["IMMA"] + counts["DMMA"], 0)


def sass_counts(sass: str) -> dict[str, int]:
    """How many times each opcode of interest appears in ``sass`` (``HGMMA.64x64x16...`` counts as ``HGMMA``)."""
    return {op: len(re.findall(rf"\b{op}(?=[\s.])", sass)) for op in _SASS_OPS}


def access_bytes(qualifiers: str) -> int:
    """Bytes per thread of one ``ld``/``st`` from its qualifiers, e.g. ``".nc.v4.b32"`` → 16."""
    vector, bits = 1, 0
    for q in qualifiers.strip(".").split("."):
        if m := _VECTOR.match(q):
            vector = int(m.group(1))
        elif m := _SCALAR.match(q):
            bits = int(m.group(1))
    return vector * bits // 8


def widest_access(ptx: str, op: str) -> int:
    """The widest ``op.global`` (``op`` is ``"ld"`` or ``"st"``) in ``ptx``, in bytes per thread; 0 if none."""
    widths = [access_bytes(q) for o, q in _GLOBAL_ACCESS.findall(ptx) if o == op]
    return max(widths, default=0)


def cp_async_bytes(ptx: str) -> int:
    """The widest ``cp.async`` (global → shared) copy size in bytes; 0 if none."""
    return max((int(size, 0) for size in _CP_ASYNC.findall(ptx)), default=0)


def uses_cp_async(ptx: str) -> bool:
    """Ampere-style asynchronous copies (``cp.async.ca``/``cp.async.cg``)."""
    return re.search(r"\bcp\.async\.(?:ca|cg)\.", ptx) is not None


def uses_tma(ptx: str) -> bool:
    """Bulk asynchronous copies (``cp.async.bulk``, the TMA)."""
    return re.search(r"\bcp\.async\.bulk\b", ptx) is not None


@dataclass(frozen=True)
class PtxFacts:
    """What one kernel's PTX says; :func:`ptx_facts` builds it."""

    mma: str
    mma_counts: dict
    cp_async: bool
    tma: bool
    ld_global_bytes: int
    st_global_bytes: int
    cp_async_bytes: int

    @property
    def global_vector_bytes(self) -> int:
        """The widest global access of any kind, in bytes per thread."""
        return max(self.ld_global_bytes, self.st_global_bytes, self.cp_async_bytes)

    def as_dict(self) -> dict:
        return dict(asdict(self), global_vector_bytes=self.global_vector_bytes)


def ptx_facts(ptx: str) -> PtxFacts:
    """Every fact above from one kernel's PTX."""
    return PtxFacts(
        mma=mma_family(ptx),
        mma_counts=mma_counts(ptx),
        cp_async=uses_cp_async(ptx),
        tma=uses_tma(ptx),
        ld_global_bytes=widest_access(ptx, "ld"),
        st_global_bytes=widest_access(ptx, "st"),
        cp_async_bytes=cp_async_bytes(ptx),
    )
