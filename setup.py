"""Build script for sparsevit.

The Triton kernels in ``kernels/`` install as the subpackage ``sparsevit.kernels``
(never as a top-level ``kernels`` package).  The C++/CUDA extension
``sparsevit._C`` is built from ``csrc/`` only when a CUDA build of torch and a
CUDA toolkit are both present:

* ``SPARSEVIT_BUILD_CUDA=0`` never builds it;
* ``SPARSEVIT_BUILD_CUDA=1`` always builds it and fails loudly if it cannot;
* unset: build it when possible, otherwise install the pure Python/Triton package;
  a build that starts and fails (compiler or linker error) is reported in one
  message and the package installs without the extension.

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
]


def _build_mode() -> str:
    value = os.environ.get("SPARSEVIT_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "skip"
    raise SystemExit(f"SPARSEVIT_BUILD_CUDA must be 0, 1 or unset, got {value!r}")


def _cuda_extension():
    """Return (ext_modules, cmdclass) for sparsevit._C, or explain why not."""
    mode = _build_mode()
    if mode == "skip":
        print("sparsevit: SPARSEVIT_BUILD_CUDA=0, not building the CUDA extension")
        return [], {}

    def give_up(reason: str):
        if mode == "force":
            raise SystemExit(f"sparsevit: SPARSEVIT_BUILD_CUDA=1 but {reason}")
        print(f"sparsevit: not building the CUDA extension: {reason}")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return give_up(
            f"torch is not importable at build time ({exc}); install torch first and "
            "use `pip install --no-build-isolation .`"
        )
    if torch.version.cuda is None:
        return give_up(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return give_up("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to query: default to Hopper, the architecture we tune for.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        print("sparsevit: TORCH_CUDA_ARCH_LIST unset and no GPU visible, using 9.0")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="sparsevit._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    print(f"sparsevit: building the CUDA extension with {CUDA_HOME} for torch {torch.__version__}")
    build_ext = BuildExtension.with_options(use_ninja=_has_ninja())
    if mode == "auto":
        build_ext = _optional_build(build_ext)
    return [ext], {"build_ext": build_ext}


_SKIP_HINT = (
    "set SPARSEVIT_BUILD_CUDA=1 to make a failed build an error (and see the compiler "
    "output above), or SPARSEVIT_BUILD_CUDA=0 to skip the build"
)


def _optional_build(base):
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
                    f"torch backends still work). {_SKIP_HINT}.",
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


ext_modules, cmdclass = _cuda_extension()

setup(
    name="sparsevit",
    version="0.1.0",
    description="Triton and CUDA kernels that make sparse Vision Transformers run faster",
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
