"""Whether compiled GPU code can run on a device: torch's kernels and sparsevit._C's.

A cubin built for ``sm_XY`` runs on devices of the same major version ``X`` with a
minor version ``>= Y`` (an arch-specific ``sm_XYa`` only on ``X.Y`` itself); PTX for
``compute_XY`` is compiled by the driver for any device ``>= X.Y``.  torch lists its
targets in ``torch.cuda.get_arch_list()``.  The build of ``sparsevit._C`` does not
record its ``TORCH_CUDA_ARCH_LIST``, so its targets are read from the library file
with the CUDA toolkit's ``cuobjdump`` when that is installed; whatever the listing
says, :func:`probe_cuda_kernels` runs one kernel on the device, which settles it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from typing import Optional

import torch

__all__ = ["arch_runs_on", "extension_archs", "extension_file", "probe_cuda_kernels", "torch_arch_verdict"]

_ARCH = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


def _split(digits: str) -> tuple[int, int]:
    """``"90"`` -> (9, 0), ``"120"`` -> (12, 0)."""
    return int(digits[:-1]), int(digits[-1])


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """True when code compiled for ``arch`` (``sm_86``, ``sm_90a``, ``compute_80``) runs on ``capability``."""
    m = _ARCH.match(arch.strip())
    if m is None:
        return False
    kind, digits, suffix = m.groups()
    major, minor = _split(digits)
    if kind == "compute":
        return (major, minor) <= tuple(capability)
    if suffix == "a":
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]


def torch_arch_verdict(capability: tuple[int, int], arch_list: list[str]) -> tuple[bool, str]:
    """(runs, explanation) for torch's own kernels on a device of ``capability``."""
    native = f"sm_{capability[0]}{capability[1]}"
    usable = [a for a in arch_list if arch_runs_on(a, capability)]
    if native in arch_list:
        return True, f"{native} is in torch.cuda.get_arch_list()"
    if usable:
        return True, f"no {native} in torch.cuda.get_arch_list(), but {', '.join(usable)} runs on it"
    return False, f"torch.cuda.get_arch_list() = {arch_list} has nothing that runs on {native}"


def extension_file() -> Optional[str]:
    """Path of the ``sparsevit._C`` library, or None when it is not built."""
    spec = importlib.util.find_spec("sparsevit._C")
    return None if spec is None else spec.origin


def _cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - the tool is optional
        return None
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "cuobjdump")):
        return os.path.join(CUDA_HOME, "bin", "cuobjdump")
    return None


def extension_archs(path: Optional[str]) -> tuple[Optional[list[str]], str]:
    """(targets or None, how they were found) of the GPU code in the library at ``path``."""
    if path is None:
        return None, "sparsevit._C is not built"
    tool = _cuobjdump()
    if tool is None:
        return None, ("the build does not record its TORCH_CUDA_ARCH_LIST, and cuobjdump (CUDA toolkit) "
                      "is not on PATH to read the targets from the library")
    found: set[str] = set()
    for flag, kind in (("--list-elf", "sm"), ("--list-ptx", "compute")):
        try:
            out = subprocess.run([tool, flag, path], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cuobjdump failed: {type(exc).__name__}: {exc}"
        found.update(f"{kind}_{m}" for m in re.findall(r"\bsm_(\d+[a-z]?)\b", out))
    if not found:
        return [], "cuobjdump lists no GPU code in the library (a CPU-only build)"
    return sorted(found), "read from the library with cuobjdump"


def probe_cuda_kernels(device: torch.device) -> tuple[bool, str]:
    """Run the ``cuda`` backend's token gather on ``device`` against the reference.

    A library without code for this GPU fails here with CUDA's "no kernel image is
    available" error, whatever the build claimed.
    """
    from .. import reference
    from ..ops import gather_tokens

    try:
        x = torch.randn(2, 5, 8, device=device)
        index = torch.tensor([[0, 3], [4, 1]], device=device)
        got = gather_tokens(x, index, backend="cuda")
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, f"a cuda-backend kernel failed on {device}: {type(exc).__name__}: {first}"
    if not torch.equal(got, reference.gather_tokens(x, index)):
        return False, f"a cuda-backend kernel ran on {device} but returned wrong values"
    return True, f"a cuda-backend kernel ran on {device} and matched the reference"
