"""``python -m sparsevit info``: what runs here, and why the rest does not.

Versions, devices, the extension's status, whether compiled GPU code matches the
GPU, and for every op the backend it would use on each device with the reason each
other backend is not used.  ``--json PATH`` writes the same as a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch

from .. import _extension
from ..backend import BACKENDS, ENV_VAR, BackendUnavailableError, OpSupport, backend_table, choose_backend
from . import arch
from .env import cpu_name, versions

__all__ = ["OP_FAMILIES", "add_parser", "collect", "render", "run"]


def _token_tensors(device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(1, 4, 8, device=device), torch.zeros(1, 2, dtype=torch.long, device=device)]


def _block_tensors(device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(16, 16, device=device), torch.zeros(1, 16, 16, device=device)]


def _softmax_tensors(device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(1, 1, 4, 4, device=device)]


def _attention_tensors(device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(1, 1, 4, 8, device=device) for _ in range(3)]


def _families() -> list[tuple[str, OpSupport, Callable[[torch.device], list[torch.Tensor]]]]:
    from ..ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
    from ..ops.masked_attention import MASKED_ATTENTION_SUPPORT
    from ..ops.masked_softmax import MASKED_SOFTMAX_SUPPORT
    from ..ops.token_gather import TOKEN_SUPPORT

    return [
        ("gather_tokens, scatter_tokens, scatter_add_tokens, select_tokens", TOKEN_SUPPORT, _token_tensors),
        ("dds, dsd, sdd", BLOCK_SPARSE_SUPPORT, _block_tensors),
        ("masked_softmax", MASKED_SOFTMAX_SUPPORT, _softmax_tensors),
        ("masked_attention", MASKED_ATTENTION_SUPPORT, _attention_tensors),
    ]


OP_FAMILIES = ("gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens", "dds", "dsd", "sdd",
               "masked_softmax", "masked_attention")


def _devices() -> dict:
    out = {"cpu": cpu_name(), "cuda": []}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        out["cuda"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count})
    return out


def _op_table(device_types: list[str]) -> list[dict]:
    rows = []
    for ops, support, make in _families():
        for device_type in device_types:
            device = torch.device(device_type)
            tensors = make(device)
            reasons = {b: support.reject_reason(b, tensors, tensors[0].dtype, device.type) for b in BACKENDS}
            try:
                default, error = choose_backend(support, tensors), None
            except BackendUnavailableError as exc:
                default, error = None, str(exc)
            rows.append({"ops": ops, "device": device.type, "dtype": "float32", "default": default,
                         "default_error": error, "reasons": reasons})
    return rows


def _gpu_arch() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    arch_list = torch.cuda.get_arch_list()
    path = arch.extension_file()
    ext_archs, how = arch.extension_archs(path)
    out = []
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        torch_ok, torch_why = arch.torch_arch_verdict(cap, arch_list)
        entry = {"device": f"cuda:{i}", "arch": f"sm_{cap[0]}{cap[1]}", "torch_arch_list": arch_list,
                 "torch_kernels": torch_ok, "torch_reason": torch_why, "extension_archs": ext_archs,
                 "extension_archs_source": how}
        if ext_archs is not None:
            entry["extension_compiled_for_it"] = any(arch.arch_runs_on(a, cap) for a in ext_archs)
        if _extension.CUDA_KERNELS_ERROR is None:
            entry["extension_probe_ok"], entry["extension_probe"] = arch.probe_cuda_kernels(torch.device("cuda", i))
        else:
            entry["extension_probe_ok"], entry["extension_probe"] = None, f"not probed: {_extension.CUDA_KERNELS_ERROR}"
        out.append(entry)
    return out


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-ready dict."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "versions": versions(),
        "devices": _devices(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "backend_env": os.environ.get(ENV_VAR),
        "extension": {
            "file": arch.extension_file(),
            "error": _extension.EXTENSION_ERROR,
            "cpu_kernels_error": _extension.CPU_KERNELS_ERROR,
            "cuda_kernels_error": _extension.CUDA_KERNELS_ERROR,
        },
        "gpu_arch": _gpu_arch(),
        "backend_table": backend_table(),
        "ops": _op_table(device_types),
    }


def _yes_no(error: "str | None") -> str:
    return "yes" if error is None else f"no ({error})"


def render(info: dict) -> str:
    """The text report of :func:`collect`'s dict."""
    v = info["versions"]
    lines = [f"sparsevit {v['sparsevit']}", "", "Versions"]
    lines.append(f"  python      {v['python']} ({v['platform']})")
    cuda = f"CUDA {v['cuda_build']} build" if v["cuda_build"] else "CPU-only build"
    lines.append(f"  torch       {v['torch']} ({cuda}{', cuDNN ' + str(v['cudnn']) if v['cudnn'] else ''})")
    mode = "interpreter (TRITON_INTERPRET=1)" if info["triton_interpret"] else "compiled kernels"
    lines.append(f"  triton      {v['triton'] or 'not installed'}" + (f" ({mode})" if v["triton"] else ""))
    for name in ("timm", "numpy", "matplotlib"):
        lines.append(f"  {name:<11} {v[name] or 'not installed'}")
    lines += ["", "Devices", f"  cpu         {info['devices']['cpu']}"]
    if not info["devices"]["cuda"]:
        lines.append("  cuda        none visible to torch" + ("" if v["cuda_build"] else " (torch is a CPU-only build)"))
    for d in info["devices"]["cuda"]:
        lines.append(f"  cuda:{d['index']:<6} {d['name']}, capability {d['capability']}, {d['memory_gib']} GiB, "
                     f"{d['multiprocessors']} SMs")
    ext = info["extension"]
    lines += ["", "Extension sparsevit._C"]
    lines.append(f"  file        {ext['file'] or 'not built'}")
    lines.append(f"  loaded      {_yes_no(ext['error'])}")
    if ext["error"] is None:
        lines.append(f"  C++ CPU kernels  {_yes_no(ext['cpu_kernels_error'])}")
        lines.append(f"  CUDA kernels     {_yes_no(ext['cuda_kernels_error'])}")
    lines += ["", "GPU architecture"]
    if not info["gpu_arch"]:
        lines.append("  no GPU visible: nothing to check")
    for g in info["gpu_arch"]:
        lines.append(f"  {g['device']} is {g['arch']}")
        lines.append(f"    torch kernels:    {'yes' if g['torch_kernels'] else 'NO'}: {g['torch_reason']}")
        if g["extension_archs"] is None:
            built = f"unknown: {g['extension_archs_source']}"
        else:
            verdict = "yes" if g.get("extension_compiled_for_it") else "NO"
            built = f"{verdict}: built for {', '.join(g['extension_archs']) or 'no GPU'} ({g['extension_archs_source']})"
        lines.append(f"    sparsevit._C:     {built}")
        lines.append(f"    run-time probe:   {g['extension_probe']}")
        lines.append("    triton kernels:   compiled for this GPU when first used (JIT)")
    lines += ["", "Backends", *("  " + line for line in info["backend_table"].splitlines())]
    lines += ["", "Default backend per op (float32 inputs) and why each other backend is not used"]
    if info["backend_env"]:
        lines.append(f"  ({ENV_VAR}={info['backend_env']!r} overrides the automatic choice)")
    for row in info["ops"]:
        default = row["default"] or f"none: {row['default_error']}"
        lines.append(f"  {row['ops']}  on {row['device']}: default {default}")
        for backend, reason in row["reasons"].items():
            lines.append(f"    {backend:<7} {'available' if reason is None else reason}")
    return "\n".join(lines)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register the ``info`` subcommand and its options."""
    p = sub.add_parser("info", help="versions, devices, extension, and which backend every op uses here",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m sparsevit info`` with parsed ``args``; the exit status."""
    info = collect()
    print(render(info))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0
