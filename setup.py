"""Build script for sparsevit.

The Triton kernels in ``kernels/`` install as the subpackage ``sparsevit.kernels``
(never as a top-level ``kernels`` package).  The C++ extension ``sparsevit._C`` is
built from ``csrc/``: the C++ CPU kernels (``csrc/cpu/*.cpp``) wherever there is a C++
compiler, plus the CUDA kernels (``csrc/*.cu``) when torch is a CUDA build and a CUDA
toolkit is found.  Two variables steer it (values ``0``, ``1``, or unset/``auto``):

* ``SPARSEVIT_BUILD_EXT`` -- the whole extension: ``0`` never builds it (a pure
  Python/Triton install), ``1`` builds it or fails the install loudly;
* ``SPARSEVIT_BUILD_CUDA`` -- its CUDA kernels: ``0`` builds the C++ CPU kernels
  only, ``1`` requires the CUDA kernels too and fails loudly if they cannot build;
* both unset: build what this machine allows; a build that starts and fails
  (compiler or linker error) is reported in one message and the package installs
  without the extension.

Because the extension compiles against the torch that is already installed,
install with ``pip install --no-build-isolation .`` when you want it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "sparsevit",
    "sparsevit.ops",
    "sparsevit.nn",
    "sparsevit.sparse_training",
    "sparsevit.kernels",
    "sparsevit.integrations",
    "sparsevit.models",
    "sparsevit.datasets",
    "sparsevit.kernel_report",
    "sparsevit.cli",
]


def _build_mode(var: str) -> str:
    """``auto``, ``force`` or ``skip`` from the environment variable ``var``."""
    value = os.environ.get(var, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "skip"
    raise SystemExit(f"{var} must be 0, 1, auto or unset, got {value!r}")


def _cuda_unavailable(torch) -> "str | None":
    """Why the CUDA kernels cannot be built here, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _openmp_flags(torch) -> list:
    """Compiler flags for at::parallel_for: with torch's OpenMP backend its parallel loop
    is inlined into our code, so without -fopenmp it would silently run on one thread."""
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _extension():
    """Return (ext_modules, cmdclass) for sparsevit._C, or explain why not."""
    ext_mode, cuda_mode = _build_mode("SPARSEVIT_BUILD_EXT"), _build_mode("SPARSEVIT_BUILD_CUDA")
    if ext_mode == "skip":
        if cuda_mode == "force":
            raise SystemExit("sparsevit: SPARSEVIT_BUILD_EXT=0 and SPARSEVIT_BUILD_CUDA=1 contradict each other")
        print("sparsevit: SPARSEVIT_BUILD_EXT=0, not building the C++/CUDA extension")
        return [], {}
    forced = "force" in (ext_mode, cuda_mode)

    def give_up(reason: str):
        if forced:
            raise SystemExit(f"sparsevit: the extension must be built (SPARSEVIT_BUILD_EXT/SPARSEVIT_BUILD_CUDA=1) but {reason}")
        print(f"sparsevit: not building the C++/CUDA extension: {reason}")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        return give_up(
            f"torch is not importable at build time ({exc}); install torch first and "
            "use `pip install --no-build-isolation .`"
        )

    if cuda_mode == "skip":
        no_cuda = "SPARSEVIT_BUILD_CUDA=0"
    else:
        no_cuda = _cuda_unavailable(torch)
        if no_cuda is not None and cuda_mode == "force":
            raise SystemExit(f"sparsevit: SPARSEVIT_BUILD_CUDA=1 but {no_cuda}")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", *_openmp_flags(torch)]
    common = dict(
        name="sparsevit._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=[f for f in cxx if f == "-fopenmp"],
    )
    if no_cuda is None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to query: default to Hopper, the architecture we tune for.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            print("sparsevit: TORCH_CUDA_ARCH_LIST unset and no GPU visible, using 9.0")
        from torch.utils.cpp_extension import CUDA_HOME

        ext = CUDAExtension(
            sources=sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            define_macros=[("SPARSEVIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            **common,
        )
        print(f"sparsevit: building the C++ CPU and CUDA kernels with {CUDA_HOME} for torch {torch.__version__}")
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
        print(f"sparsevit: building the C++ CPU kernels only ({no_cuda}) for torch {torch.__version__}")
    build_ext = BuildExtension.with_options(use_ninja=_has_ninja())
    if not forced:
        build_ext = _optional_build(build_ext, with_cuda=no_cuda is None)
    return [ext], {"build_ext": build_ext}


def _skip_hint(with_cuda: bool) -> str:
    """How to force or skip the build after an automatic-mode failure."""
    if with_cuda:
        return (
            "set SPARSEVIT_BUILD_CUDA=1 to make a failed build an error (and see the compiler "
            "output above), SPARSEVIT_BUILD_CUDA=0 to build only the C++ CPU kernels, or "
            "SPARSEVIT_BUILD_EXT=0 to skip the extension"
        )
    return (
        "set SPARSEVIT_BUILD_EXT=1 to make a failed build an error (and see the compiler "
        "output above), or SPARSEVIT_BUILD_EXT=0 to skip the extension"
    )


def _optional_build(base, with_cuda: bool):
    """``base`` (a build_ext class) whose failure installs the package without the extension.

    In automatic mode a compiler or linker error (e.g. an ``nvcc`` that cannot link
    ``-lcudart``) must not fail ``pip install``: the Python/Triton package works
    without ``sparsevit._C``, and the backend table says why it is missing.
    """

    class OptionalBuildExt(base):
        failed: "str | None" = None

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure falls back
                OptionalBuildExt.failed = f"{type(exc).__name__}: {exc}"
                print(
                    "sparsevit: the C++/CUDA extension failed to build "
                    f"({OptionalBuildExt.failed}); installing without it (the triton and "
                    f"torch backends still work). {_skip_hint(with_cuda)}.",
                    file=sys.stderr,
                )

        def get_outputs(self) -> list:
            return [] if OptionalBuildExt.failed else super().get_outputs()

        def get_output_mapping(self) -> dict:
            return {} if OptionalBuildExt.failed else super().get_output_mapping()

    return OptionalBuildExt


def _has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except ImportError:
        return False


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
        return fh.read()


ext_modules, cmdclass = _extension()

setup(
    name="sparsevit",
    version="0.1.0",
    description="Triton, C++ and CUDA kernels that make sparse Vision Transformers run faster",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"sparsevit.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'", "timm>=1.0", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "expecttest", "hypothesis", "scikit-learn", "pillow"],
        "bench": ["matplotlib>=3.5", "tqdm>=4", "scikit-learn", "pillow"],
    },
    zip_safe=False,
)
