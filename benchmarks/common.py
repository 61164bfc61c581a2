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


def fwd_bwd(loss_fn, *inputs: torch.Tensor):
    """A zero-argument run of ``loss_fn(*inputs)`` plus its gradients w.r.t. ``inputs`` (by
    ``torch.autograd.grad``, so repeated runs do not accumulate); returns ``(loss, *grads)``."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        loss = loss_fn(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    return run


def fp64_cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies in float64 on the CPU, for the reference run that every error is measured against."""
    return [t.detach().to("cpu", torch.float64) if t.is_floating_point() else t.cpu() for t in tensors]
