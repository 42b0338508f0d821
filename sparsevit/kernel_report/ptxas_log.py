"""Per-function resources from ``ptxas -v`` logs and ``cuobjdump -res-usage`` listings.

``ptxas -v`` (also through ``nvcc -Xptxas -v``) prints, per entry function::

    ptxas info    : Compiling entry function 'NAME' for 'sm_90a'
    ptxas info    : Function properties for NAME
        24 bytes stack frame, 20 bytes spill stores, 28 bytes spill loads
    ptxas info    : Used 72 registers, used 1 barriers, 24 bytes cumulative stack size, 9728 bytes smem

``cuobjdump -res-usage`` prints ``Function NAME:`` then ``REG:72 STACK:24 SHARED:10752 LOCAL:0 ...``
(its SHARED includes the 1 KB the driver reserves per block; the spill split is not given).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

__all__ = ["Resources", "parse_ptxas_log", "parse_res_usage"]


@dataclass
class Resources:
    """Registers per thread, spill bytes, stack frame and static shared memory of one function."""

    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0

    @property
    def spills(self) -> int:
        """Bytes spilled: stores plus loads, as ``ptxas -v`` counts them."""
        return self.spill_stores + self.spill_loads

    def as_dict(self) -> dict:
        return dict(asdict(self), spills=self.spills)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, Resources]:
    """``{entry function name: Resources}`` from a ``ptxas -v`` log (device functions that are
    not entries are left out)."""
    out: dict[str, Resources] = {}
    frames: dict[str, tuple[int, int, int]] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            out[entry] = Resources()
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif m := _FRAME.search(line):
            if props is not None:
                frames[props] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _USED.search(line)) and entry is not None:
            res = out[entry]
            res.regs = int(m.group(1))
            if s := _SMEM.search(line):
                res.smem = int(s.group(1))
    for name, res in out.items():
        if name in frames:
            res.stack, res.spill_stores, res.spill_loads = frames[name]
    return out


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``{function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}`` from
    ``cuobjdump -res-usage``."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+?):\s*$", line):
            name = m.group(1)
        elif name is not None and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return out
