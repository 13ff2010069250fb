"""Build the CUDA extension of lowrank_kernels (the package's metadata is in pyproject.toml).

The extension ``lowrank_kernels._C`` is built from csrc/ whenever a CUDA toolkit and a CUDA
build of torch are present, with or without a visible GPU (a wheel or image build has none);
otherwise the pure-Python package (reference + Triton) installs and one line says why the CUDA
backend was not built. torch must be importable at build time: `pip install . --no-build-isolation`.

Environment:
  LOWRANK_KERNELS_SKIP_CUDA=1   never build the extension
  LOWRANK_KERNELS_FORCE_CUDA=1  fail loudly if the extension cannot be built
  TORCH_CUDA_ARCH_LIST          architectures (default "8.0;9.0a": A100 and H100)
  MAX_JOBS                      parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_extension():
    """The CUDAExtension to build, or None with the reason."""
    if _flag("LOWRANK_KERNELS_SKIP_CUDA"):
        return None, "LOWRANK_KERNELS_SKIP_CUDA is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not installed in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cu")) + glob.glob(os.path.join(here, "csrc", "*.cpp")))
    sources = [os.path.relpath(s, here) for s in sources]
    ext = CUDAExtension(
        name="lowrank_kernels._C",
        sources=sources,
        # No -std: BuildExtension adds the standard the installed torch's headers need (C++17 on
        # older releases, C++20 on 2.13 and 2.14, whose headers reject C++17). No
        # --use_fast_math: its flush-to-zero and approximate division/sqrt would break parity
        # with the reference paths, for no gain in memory-bound kernels.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None


built, reason = _cuda_extension()
if built is None:
    if _flag("LOWRANK_KERNELS_FORCE_CUDA"):
        sys.exit(f"lowrank_kernels: LOWRANK_KERNELS_FORCE_CUDA=1 but the CUDA backend cannot be built: {reason}")
    print(f"lowrank_kernels: CUDA backend not built ({reason}); installing reference + Triton only")
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = [built[0]], {"build_ext": built[1]}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
