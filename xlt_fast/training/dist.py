"""Data-parallel training with ``torch.distributed``: one process per device, launched by
``torchrun`` (or ``accelerate launch``, which sets the same environment variables).

Collectives run on every rank; files are written by rank 0 only. A run without ``WORLD_SIZE`` (or
with ``WORLD_SIZE=1``) is a single process and every helper here is a no-op. CPU processes use the
gloo backend, CUDA ones NCCL.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn


class Dist:
    """This process's place in the job: ``rank``, ``world_size``, ``device``."""

    def __init__(self, device: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if device.startswith("cuda") and self.enabled:
            device = f"cuda:{local_rank}"
        self.device = torch.device(device)
        self._owns_group = False
        if self.enabled and not tdist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tdist.init_process_group(backend)
            self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self._owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self._owns_group = False

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a cache), the others after it is done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``DistributedDataParallel(module)`` in a multi-process job, else ``module`` itself.

        Buffers are not re-broadcast from rank 0 at each forward: running statistics are all-reduced
        explicitly by the trainers (the EMA confusion matrix of IWDA), so every rank holds the same.
        """
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})  # torch < 2.13 has only the older name
        return ddp(module, device_ids=ids, **no_sync)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks (in place; returned)."""
        if self.enabled:
            tdist.all_reduce(tensor)
        return tensor

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over the ranks of each logged number (every rank passes the same names)."""
        if not self.enabled or not values:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The contiguous share ``[start, stop)`` of ``n`` items of ``rank`` (default: this one);
        sizes differ by at most one."""
        rank = self.rank if rank is None else rank
        per, extra = divmod(n, self.world_size)
        start = rank * per + min(rank, extra)
        return start, start + per + (rank < extra)

    def gather_rows(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's :meth:`shard` rows (in rank order) into the ``n`` rows of all."""
        if not self.enabled:
            return rows
        most = -(-n // self.world_size)
        padded = rows.new_zeros((most, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        sizes = [stop - start for start, stop in (self.shard(n, r) for r in range(self.world_size))]
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out
