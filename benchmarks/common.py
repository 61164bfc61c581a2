"""Helpers shared by the benchmark suites."""
from __future__ import annotations

import torch

from xlt_fast import _backend


def kernel_backends(device: torch.device, *candidates: str) -> list[str]:
    """The kernel backends among ``candidates`` that run on ``device`` here (no interpreter in
    benchmarks: Triton is timed on GPUs only)."""
    names = []
    for name in candidates:
        if name == "cpu" and device.type == "cpu" and _backend.has_extension():
            names.append(name)
        elif name == "triton" and device.type == "cuda" and _backend.has_triton():
            names.append(name)
        elif name == "cuda" and device.type == "cuda" and _backend.has_cuda_kernels():
            names.append(name)
    return names
