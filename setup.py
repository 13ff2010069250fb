"""Build and install lowrank_kernels.

The CUDA extension ``lowrank_kernels._C`` is built from csrc/ when a CUDA toolkit and a CUDA
build of torch are present; otherwise the pure-Python package (reference + Triton) installs and
one line says the CUDA backend was not built.

Environment:
  LOWRANK_KERNELS_SKIP_CUDA=1   never build the extension
  LOWRANK_KERNELS_FORCE_CUDA=1  build it even without a visible GPU (needs nvcc and a CUDA torch);
                                fail loudly if that is impossible
  TORCH_CUDA_ARCH_LIST          architectures (default "8.0;9.0a": A100 and H100)
  MAX_JOBS                      parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import find_packages, setup


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
    if not (torch.cuda.is_available() or _flag("LOWRANK_KERNELS_FORCE_CUDA")):
        return None, "no GPU visible (set LOWRANK_KERNELS_FORCE_CUDA=1 to build anyway)"
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

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Fused GPU kernels for low-rank layers: LoRA, VeRA/RandLoRA, SLTrain, GaLore/Fira",
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.1; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ninja", "peft", "transformers", "galore-torch", "fira",
                 "bitsandbytes"],
        "bench": ["matplotlib", "tqdm", "peft", "galore-torch", "fira", "bitsandbytes"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
