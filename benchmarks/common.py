"""Helpers shared by the benchmark suites."""
from __future__ import annotations

from typing import Callable

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


def cpu_busy_s() -> float:
    """Busy time of all CPUs since boot, in seconds (/proc/stat: everything but idle and iowait), to
    tell how much of a timed interval other processes ran."""
    import os

    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def quiet_reps(run_rep: Callable[[int], dict], rewarm: Callable[[], None], reps: int, max_wait: float) -> list[dict]:
    """Reps ``run_rep(i) -> {..., "quiet": bool}`` until ``reps`` of them, or with ``max_wait > 0``
    until ``reps`` quiet ones or ``max_wait`` seconds: after a rep that was not quiet, wait (up to
    the deadline) for 0.5 s in which other processes used under 5% of a CPU, then ``rewarm()`` so that
    no rep starts cold."""
    import time

    log: list[dict] = []
    deadline = time.monotonic() + max_wait
    while len(log) < reps or (max_wait > 0 and sum(r["quiet"] for r in log) < reps and time.monotonic() < deadline):
        if max_wait > 0 and log and not log[-1]["quiet"]:
            while time.monotonic() < deadline:
                b0 = cpu_busy_s()
                time.sleep(0.5)
                if cpu_busy_s() - b0 < 0.05:
                    break
            rewarm()
        log.append(run_rep(len(log)))
    return log
