"""The kernel report: records with occupancy, a per-family summary, the JSON document and the tables.

One record per kernel, launch, config and architecture (see :mod:`.triton_compile` and
:mod:`.cuda_resources`); :func:`with_occupancy` adds the estimate of :mod:`.occupancy`
for the record's own architecture.  The table puts the two architectures of one
launch and config side by side.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

from ..cli.table import format_table
from .occupancy import estimate
from .targets import TARGETS, target

__all__ = ["with_occupancy", "summarize", "document", "triton_table", "cuda_table", "summary_table", "write_json"]


def with_occupancy(record: dict) -> dict:
    """``record`` plus ``occupancy`` (a dict, see :class:`~.occupancy.Occupancy`) when it compiled
    and its block size is known."""
    if record.get("error") or record.get("regs") is None or not record.get("num_warps"):
        return record
    occ = estimate(target(record["capability"]), record["regs"], record.get("shared") or 0, record["num_warps"])
    return dict(record, occupancy=occ.as_dict())


def _range(values: Iterable[float]) -> Optional[list]:
    values = list(values)
    return [min(values), max(values)] if values else None


def summarize(records: Sequence[dict]) -> dict:
    """Per family and per kernel: variants, compiles, errors, the wgmma fraction on sm_90 (of the
    tensor-core launches that fit), max registers, spills, occupancy range per architecture."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["family"]].append(r)
        groups[f"{r['family']}/{r['kernel'] if r['family'] != 'cuda_ext' else r['kernel'].split('<')[0]}"].append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        tc90 = [r for r in ok if r["capability"] == 90 and r.get("tensor_cores") and r.get("occupancy", {}).get("fits")]
        entry: dict[str, Any] = dict(
            variants=len({r.get("variant", r["kernel"]) for r in rs}),
            compiles=len(rs),
            errors=len(rs) - len(ok),
            max_regs={a: max((r["regs"] for r in ok if r["arch"] == a), default=None) for a in _archs(rs)},
            spilling=sorted({f"{r.get('variant', r['kernel'])} {r['arch']}: {r['spills']} B" for r in ok if r.get("spills")}),
            occupancy={a: _range(r["occupancy"]["occupancy"] for r in ok if r["arch"] == a and "occupancy" in r
                                 and r["occupancy"]["fits"]) for a in _archs(rs)},
            not_fitting=sorted({f"{r.get('variant', r['kernel'])} {r['arch']}: {r['occupancy']['limiter']}"
                                for r in ok if "occupancy" in r and not r["occupancy"]["fits"]}),
        )
        if tc90:
            wg = sum(r.get("mma") == "wgmma" for r in tc90)
            entry["wgmma_sm90"] = dict(wgmma=wg, of=len(tc90), fraction=round(wg / len(tc90), 4))
        if any("tma" in r for r in ok):
            entry["tma"] = sum(bool(r.get("tma")) for r in ok)
            entry["cp_async"] = sum(bool(r.get("cp_async")) for r in ok)
            entry["global_vector_bytes"] = _range(r["global_vector_bytes"] for r in ok)
        out[name] = entry
    return out


def _archs(records: Iterable[dict]) -> list[str]:
    return sorted({r["arch"] for r in records})


def document(triton_records: Sequence[dict], cuda_records: Sequence[dict], meta: dict) -> dict:
    """The JSON document: meta, the targets' limits, the records and the summary."""
    targets = {t.name: {k: v for k, v in vars(t).items()} for t in TARGETS.values()}
    return dict(meta=meta, targets=targets, triton=list(triton_records), cuda_ext=list(cuda_records),
                summary=summarize(list(triton_records) + list(cuda_records)))


def write_json(doc: dict, path: str) -> None:
    """``doc`` as JSON, one record per line (compact, and diffs stay readable)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list):
            body = ",\n".join("  " + json.dumps(item, separators=(",", ":")) for item in value)
            parts.append(f"{json.dumps(key)}: [\n{body}\n ]" if value else f"{json.dumps(key)}: []")
        elif isinstance(value, dict) and key == "summary":
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            parts.append(f"{json.dumps(key)}: {{\n{body}\n }}")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    with open(path, "w") as fh:
        fh.write("{" + ",\n ".join(parts) + "}\n")


def _pair(by_arch: dict, archs: Sequence[str], fn) -> str:
    return "/".join(fn(by_arch[a]) if a in by_arch else "-" for a in archs)


def _occ(r: dict) -> str:
    if r.get("error"):
        return "ERR"
    occ = r.get("occupancy")
    if not occ:
        return "?"
    return f"{round(100 * occ['occupancy'])}%" if occ["fits"] else "no fit"


def _mma(r: dict) -> str:
    return "ERR" if r.get("error") else {"wgmma": "wgmma", "wgmma+mma.sync": "wg+mma", "mma.sync": "mma", "wmma": "wmma", "none": "-"}.get(r.get("mma") or r.get("sass_mma") or "none", "?")


def _num(key: str, scale: float = 1.0):
    def fn(r: dict) -> str:
        if r.get("error"):
            return "ERR"
        value = r.get(key)
        return "?" if value is None else (f"{value / scale:.1f}" if scale != 1 else str(value))
    return fn


def _short(name: str) -> str:
    """``BLOCK_M`` → ``BM``: config names short enough for a table."""
    return re.sub(r"^BLOCK_?", "B", name)


def triton_table(records: Sequence[dict]) -> str:
    """One row per kernel, launch and config; ``a/b`` cells are sm_80/sm_90 (the ``--arch`` order)."""
    archs = sorted({r["arch"] for r in records})
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(r["variant"], {})[r["arch"]] = r
    header = ["kernel", "launch", "config", "warps", "regs", "spill B", "smem KB", "occ", "mma", "async", "vec B ld/st/cp"]
    out = []
    for variant, by_arch in rows.items():
        first = next(iter(by_arch.values()))
        last = by_arch[archs[-1]] if archs[-1] in by_arch else first
        labels = " ".join(f"{k}={v}" for k, v in first["labels"].items())
        config = ",".join(f"{_short(k)}={v}" for k, v in first["config"].items()) + f" s{first['num_stages']}"
        asyncs = "ERR" if last.get("error") else ("tma" if last.get("tma") else "cp.async" if last.get("cp_async") else "-")
        vec = "ERR" if last.get("error") else f"{last.get('ld_global_bytes')}/{last.get('st_global_bytes')}/{last.get('cp_async_bytes')}"
        out.append([first["kernel"], labels, config, first.get("num_warps"), _pair(by_arch, archs, _num("regs")),
                    _pair(by_arch, archs, _num("spills")), _pair(by_arch, archs, _num("shared", 1024)),
                    _pair(by_arch, archs, _occ), _pair(by_arch, archs, _mma), asyncs, vec])
    return f"Triton kernels ({' / '.join(archs)}; async and vec for {archs[-1]})\n" + format_table(header, out)


def cuda_table(records: Sequence[dict]) -> str:
    """One row per CUDA kernel instantiation; ``a/b`` cells per architecture."""
    archs = sorted({r["arch"] for r in records})
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(f"{r['source']}:{r['kernel']}", {})[r["arch"]] = r
    header = ["source", "kernel", "threads", "regs", "spill B", "stack B", "smem KB", "occ", "mma"]
    out = []
    for _, by_arch in rows.items():
        first = next(iter(by_arch.values()))
        out.append([first["source"], first["kernel"], first.get("threads") or "?", _pair(by_arch, archs, _num("regs")),
                    _pair(by_arch, archs, _num("spills")), _pair(by_arch, archs, _num("stack")),
                    _pair(by_arch, archs, _num("shared", 1024)), _pair(by_arch, archs, _occ),
                    _pair(by_arch, archs, _mma)])
    source = records[0]["source_of_numbers"] if records else ""
    return f"CUDA extension kernels ({' / '.join(archs)}; {source})\n" + format_table(header, out)


def summary_table(summary: dict) -> str:
    """One row per family and kernel of :func:`summarize`'s result."""
    header = ["family/kernel", "variants", "compiles", "errors", "wgmma sm_90", "max regs", "spilling", "occupancy"]
    rows = []
    for name, s in summary.items():
        wg = s.get("wgmma_sm90")
        occ = " ".join(f"{a}:{round(100 * v[0])}-{round(100 * v[1])}%" for a, v in s["occupancy"].items() if v)
        regs = " ".join(f"{a}:{v}" for a, v in s["max_regs"].items() if v is not None)
        rows.append([name, s["variants"], s["compiles"], s["errors"],
                     f"{wg['wgmma']}/{wg['of']} ({100 * wg['fraction']:.0f}%)" if wg else "-",
                     regs, len(s["spilling"]), occ])
    return "Summary\n" + format_table(header, rows)
