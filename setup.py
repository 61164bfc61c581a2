"""Build xlt_fast and its compiled extension ``xlt_fast._C``.

C++ CPU kernels (``csrc/*.cpp``) are always built. The CUDA kernels (``csrc/cuda/*.cu``) and their
torch-facing bindings (``csrc/cuda/*.cpp``) are added when the installed torch has CUDA and
``nvcc`` is found. Build without isolation so that no second torch is pulled:
``pip install --no-build-isolation -e .``
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    import torch

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    sources = _sources("csrc/*.cpp")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("XLT_FAST_NO_CUDA") == "1":
        with_cuda = False
    if not with_cuda:
        return cpp_extension.CppExtension(
            "xlt_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # H100/H200; override for other GPUs
    nvcc = ["-O3", "-std=c++17"]
    return cpp_extension.CUDAExtension(
        "xlt_fast._C",
        sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
        define_macros=[("XLT_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="xlt_fast",
    version="0.1.0",
    description="Fast, exact ops for zero-shot cross-lingual transfer (OT, critics, flows, contrastive).",
    python_requires=">=3.10",
    packages=find_packages(include=["xlt_fast", "xlt_fast.*"]) + ["xlt_fast.kernels", "xlt_fast.benchmarks"],
    package_dir={"xlt_fast.kernels": "kernels", "xlt_fast.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["pytest-benchmark", "matplotlib"]},
    entry_points={"console_scripts": ["xlt-fast=xlt_fast.cli:main"]},
)
