"""Backend selection shared by every op.

``backend="auto"`` picks the op's preferred GPU kernel for CUDA tensors and the C++ kernel for CPU
tensors; ``"reference" | "cpu" | "triton" | "cuda"`` forces one. Triton kernels also run on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported),
which is how CI checks them.
"""
from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "reference", "cpu", "triton", "cuda"]
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


@functools.cache
def extension():
    """The compiled module ``xlt_fast._C`` (its import registers the ``xlt_fast_C`` torch ops)."""
    try:
        from xlt_fast import _C  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the build
        raise RuntimeError(
            "xlt_fast._C is not built: run `make install` (or `pip install --no-build-isolation -e .`). "
            f"Import error: {err}"
        ) from err
    return torch.ops.xlt_fast_C


@functools.cache
def has_extension() -> bool:
    try:
        extension()
    except RuntimeError:
        return False
    return True


@functools.cache
def has_cuda_kernels() -> bool:
    """True when ``_C`` was built with the CUDA sources."""
    return has_extension() and hasattr(torch.ops.xlt_fast_C, "cuda_built")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: str, device: torch.device, op: str, gpu_default: str = "triton",
            available: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")) -> str:
    """Turn ``backend`` into the concrete kernel family for tensors on ``device``.

    Raises ``ValueError`` naming the op when the choice cannot run on that device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = gpu_default
        elif device.type == "cpu" and has_extension():
            backend = "cpu"
        else:
            backend = "reference"
    if backend not in available:
        raise ValueError(f"{op}: backend={backend!r} is not implemented; available: {available}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got {device}")
        extension()
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got {device}")
        if not has_cuda_kernels():
            raise ValueError(f"{op}: backend='cuda' needs xlt_fast._C built with CUDA (torch with CUDA and nvcc)")
    elif backend == "triton":
        if not has_triton():
            raise ValueError(f"{op}: backend='triton' needs the triton package")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"triton is imported to run on {device} under the interpreter"
            )
    return backend
