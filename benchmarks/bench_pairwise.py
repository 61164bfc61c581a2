"""pairwise_distance against torch.cdist (the peer) on embedding-like data (large common mean)."""
from __future__ import annotations

import torch

import xlt_fast
from xlt_fast.benchmarks.harness import Case
from xlt_fast.benchmarks.common import kernel_backends


def cases(device: torch.device, quick: bool) -> list[Case]:
    grid = [(8, 128, 128, 768)] if quick else [(8, 128, 128, 768), (32, 64, 64, 768), (1, 4096, 4096, 768)]
    if not quick:  # low-dimensional points (the direct-sum kernel, d <= DIRECT_MAX_D, and the GEMM path just above)
        grid += [(8, 128, 128, d) for d in (3, 8, 16, 32, 64)] + [(1, 1024, 1024, d) for d in (3, 8, 32)]
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for B, n, m, d in grid:
        # BERT-like: a shared offset with norm ~ 20 plus per-token variation
        offset = torch.randn(d, generator=g) * 0.7
        x = (offset + torch.randn(B, n, d, generator=g)).to(device)
        y = (offset + torch.randn(B, m, d, generator=g)).to(device)
        impls = {"reference": (lambda x=x, y=y: xlt_fast.pairwise_distance(x.double(), y.double(), backend="reference"))
                 if B * n * m * d <= 2**27 else None,
                 "torch.cdist^2": lambda x=x, y=y: torch.cdist(x, y).square()}
        for name in kernel_backends(device, "cpu", "triton", "cuda"):
            impls[name] = (lambda b=name, x=x, y=y: xlt_fast.pairwise_distance(x, y, "sqeuclidean", backend=b))
        impls = {k: v for k, v in impls.items() if v is not None}
        out.append(Case("pairwise_distance", f"B={B},n={n},m={m},d={d}", "fwd", impls, baseline="torch.cdist^2",
                        reference="reference" if "reference" in impls else None))
    return out
