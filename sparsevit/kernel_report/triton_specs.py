"""From a kernel's representative launch to the signature, constexprs and options of each compile.

A :class:`Launch` describes one call of a ``@triton.jit`` kernel as its launcher makes
it: every runtime argument by name (a :class:`Ptr` for a tensor, ints and floats as
the launcher passes them for a representative problem), the constexprs the launcher
fixes, and the autotune configs the autotuner may pick.  :func:`compile_jobs` turns it
into one :class:`CompileJob` per config and architecture, applying Triton's own
launch-time specialisation to the runtime arguments (an int equal to 1 becomes a
constexpr, a multiple of 16 gets ``tt.divisibility = 16``, tensors are 16-byte
aligned), so the compile sees what a real launch would.

The per-family spec modules (``specs_*.py``) build the launches; :func:`check_coverage`
makes every ``@triton.jit`` kernel of a module need one.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

__all__ = ["Ptr", "Launch", "CompileJob", "SpecError", "launchable_kernels", "kernel_fn", "check_coverage",
           "compile_jobs", "configs_for", "build_signature", "specialize", "config_label", "contiguous_strides"]

# Triton element type names of the torch dtypes the kernels take.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "i32": "int32", "i64": "int64",
                "i8": "int8", "u8": "uint8", "i1": "bool"}


class SpecError(RuntimeError):
    """A kernel and its spec disagree (a kernel without a spec, an argument without a value, ...)."""


@dataclass(frozen=True)
class Ptr:
    """A tensor argument of Triton element type ``dtype`` (``"bf16"``, ``"fp32"``, ``"i32"``, ...),
    16-byte aligned as every torch allocation is."""

    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise SpecError(f"unknown pointer element type {self.dtype!r}; known: {', '.join(TORCH_DTYPES)}")


@dataclass(frozen=True)
class Launch:
    """One representative call of a kernel and the configs its autotuner may pick."""

    family: str  # op family, e.g. "masked_attention"
    module: str  # e.g. "sparsevit.kernels.masked_attention"
    kernel: str  # the @triton.jit function's name in the module
    args: Mapping[str, Any]  # runtime arguments: Ptr, int, float or bool, by name
    constants: Mapping[str, Any]  # constexprs the launcher passes
    configs: Any  # triton.Config objects, or {capability: [triton.Config, ...]} when they depend on the target
    labels: Mapping[str, Any] = field(default_factory=dict)  # what distinguishes this launch (dtype, ...)
    tensor_cores: bool = False  # its tl.dot products should run on tensor cores (MMA)


@dataclass(frozen=True)
class CompileJob:
    """Everything one compile needs, as plain picklable data (it runs in a worker process)."""

    family: str
    module: str
    kernel: str
    capability: int
    labels: tuple  # ((name, value), ...)
    config: tuple  # ((name, value), ...): the config's constexprs
    num_warps: int
    num_stages: int
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    options: dict
    tensor_cores: bool

    @property
    def variant(self) -> str:
        """The launch and config, without the architecture: one row of the table."""
        labels = " ".join(f"{k}={v}" for k, v in self.labels)
        return f"{self.kernel} {labels} {config_label(dict(self.config), self.num_warps, self.num_stages)}".strip()

    @property
    def key(self) -> str:
        return f"{self.variant} sm_{self.capability}"


def config_label(kwargs: Mapping[str, Any], num_warps: int, num_stages: int) -> str:
    """``"BLOCK_M=64,BLOCK_N=64 w4 s3"``."""
    inner = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{inner} w{num_warps} s{num_stages}".strip()


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def kernel_fn(module: str, name: str):
    """The ``@triton.jit`` function ``name`` of ``module``; a clear error if it is missing or interpreted."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if fn is None:
        raise SpecError(f"{module} has no kernel {name!r}: its spec names a kernel that does not exist; update the spec")
    if not isinstance(fn, JITFunction):
        raise SpecError(
            f"{module}.{name} is a {type(fn).__name__}, not a compiled JITFunction: the module was imported with "
            "TRITON_INTERPRET set; run the report in a process without it"
        )
    return fn


def launchable_kernels(module: str) -> list[str]:
    """The ``@triton.jit`` functions of ``module`` that no other one of them calls: its kernels
    (the rest are device helpers inlined into them)."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    if any(type(obj).__name__ == "InterpretedFunction" for obj in vars(mod).values()):
        raise SpecError(f"{module} was imported with TRITON_INTERPRET set; run the report in a process without it")
    jitted = {name: obj for name, obj in vars(mod).items()
              if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__}
    called = {name for name in jitted for other, fn in jitted.items()
              if other != name and re.search(rf"\b{re.escape(name)}\s*\(", fn.src)}
    return sorted(set(jitted) - called)


def check_coverage(module: str, launches: Sequence[Launch], spec_file: str) -> None:
    """Every kernel of ``module`` has a launch, and every launch names a kernel of it; else a
    :class:`SpecError` that says which and where to add it."""
    kernels = set(launchable_kernels(module))
    covered = {launch.kernel for launch in launches if launch.module == module}
    missing, unknown = sorted(kernels - covered), sorted(covered - kernels)
    problems = []
    if missing:
        problems.append(f"kernel(s) without a spec: {', '.join(missing)}")
    if unknown:
        problems.append(f"spec(s) for kernel(s) the module does not have: {', '.join(unknown)}")
    if problems:
        raise SpecError(f"{module}: " + "; ".join(problems) + f". Add or fix them in sparsevit/kernel_report/{spec_file}")


def _native_specialize():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    return lambda value, specialize, align: native_specialize_impl(BaseBackend, value, False, specialize, align)


class _TensorStub:
    """What Triton's specialisation reads from a tensor: its dtype and an aligned address."""

    def __init__(self, dtype: str) -> None:
        import torch

        self.dtype = getattr(torch, TORCH_DTYPES[dtype])

    def data_ptr(self) -> int:
        return 0


def specialize(value: Any, specialize_value: bool = True, align: bool = True) -> tuple[str, Any]:
    """``(type, attr)`` of one runtime argument under Triton's launch-time rules: ``("*bf16", "D")``,
    ``("i32", "D")`` (divisible by 16), ``("i32", "")``, ``("constexpr", 1)``, ``("fp32", None)``..."""
    native = _native_specialize()
    probe = _TensorStub(value.dtype) if isinstance(value, Ptr) else value
    if native is not None:
        kind, attr = native(probe, specialize_value, align)
        return kind, attr
    # Triton's rules (3.x) when its native helper is not importable.
    if isinstance(value, Ptr):
        return "*" + value.dtype, "D" if align else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize_value and value == 1:
            return "constexpr", 1
        aligned = "D" if specialize_value and align and value % 16 == 0 else ""
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), aligned
    if isinstance(value, float):
        return "fp32", None
    raise SpecError(f"cannot specialise argument value {value!r} ({type(value).__name__})")


def build_signature(fn, args: Mapping[str, Any], constants: Mapping[str, Any], where: str) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource`` from a launch's values; a :class:`SpecError`
    for an argument with no value, a constexpr given as a runtime argument, or a value for an
    argument the kernel does not have."""
    names = list(fn.arg_names)
    extra = sorted(set(args) - set(names)) + sorted(set(constants) - set(names))
    if extra:
        raise SpecError(f"{where}: values for argument(s) the kernel does not have: {', '.join(extra)}")
    signature: dict[str, str] = {}
    constexprs: dict[tuple, Any] = {}
    attrs: dict[tuple, list] = {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            if name not in constants and not param.has_default:
                raise SpecError(f"{where}: constexpr {name} has no value (neither from the config nor the launcher)")
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name] if name in constants else param.default
            continue
        if name in constants:
            raise SpecError(f"{where}: {name} is a runtime argument, not a constexpr; give it in args")
        if name not in args:
            raise SpecError(f"{where}: argument {name} has no value in its spec")
        kind, attr = specialize(args[name], not param.do_not_specialize, not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def configs_for(launch: Launch, capability: int) -> list:
    """The configs ``launch`` may pick on ``capability``."""
    if isinstance(launch.configs, Mapping):
        if capability not in launch.configs:
            raise SpecError(f"{launch.module}.{launch.kernel}: no configs for sm_{capability} in its spec")
        return list(launch.configs[capability])
    return list(launch.configs)


def compile_jobs(launch: Launch, capabilities: Sequence[int], max_configs: Optional[int] = None) -> list[CompileJob]:
    """One :class:`CompileJob` per capability and config of ``launch`` (the first ``max_configs``)."""
    fn = kernel_fn(launch.module, launch.kernel)
    where = f"{launch.module}.{launch.kernel} ({launch.family} spec)"
    jobs = []
    for cap in capabilities:
        configs = configs_for(launch, cap)[:max_configs] if max_configs else configs_for(launch, cap)
        if not configs:
            raise SpecError(f"{where}: the launch has no config for sm_{cap}")
        for cfg in configs:
            overlap = sorted(set(cfg.kwargs) & set(launch.constants))
            if overlap:
                raise SpecError(f"{where}: {', '.join(overlap)} set by both the config and the launcher")
            signature, constexprs, attrs = build_signature(fn, launch.args, {**launch.constants, **cfg.kwargs}, where)
            options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, num_ctas=cfg.num_ctas)
            if cfg.maxnreg is not None:
                options["maxnreg"] = cfg.maxnreg
            jobs.append(CompileJob(
                family=launch.family, module=launch.module, kernel=launch.kernel, capability=cap,
                labels=tuple(launch.labels.items()), config=tuple(cfg.kwargs.items()),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                tensor_cores=launch.tensor_cores,
            ))
    return jobs
