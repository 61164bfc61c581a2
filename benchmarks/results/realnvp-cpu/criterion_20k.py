"""Semantic and structural criteria on two 20k x 384 token pools (seed 002's model selection):
time and peak memory. Prints one JSON line. Usage: python criterion_20k.py [threads]"""
import json
import platform
import resource
import sys
import time

import torch

from xlt_fast import metrics


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 384
    x = torch.randn(n, d, generator=g)
    y = x @ torch.linalg.qr(torch.randn(d, d, generator=g))[0] + 0.5 * torch.randn(n, d, generator=g)
    metrics.semantic_criterion(x[:500], y[:500], 100)  # warm-up (imports, allocator)
    base = rss_mb()
    t0 = time.perf_counter()
    score, (i, j) = metrics.semantic_criterion(x, y, 30000, 10)
    t_sem = time.perf_counter() - t0
    t0 = time.perf_counter()
    gap = metrics.structural_criterion(x[i], y[j])
    t_str = time.perf_counter() - t0
    print(json.dumps({"n": n, "d": d, "threads": torch.get_num_threads(), "semantic": score, "pairs": len(i),
                      "semantic_s": round(t_sem, 2), "structural_s": round(t_str, 2), "structural": gap,
                      "rss_before_mb": round(base), "peak_rss_mb": round(rss_mb()),
                      "inputs_mb": round(2 * n * d * 4 / 2**20), "dense_matrix_mb": round(n * n * 4 / 2**20),
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
