"""Where the CoNL step's time goes on the CPU (min / median ms of 400 calls after 20 warm-up calls),
at the sizes of bench_contrastive's CoNL case (sqeuclidean). Run from the repository root:
``.venv/bin/python benchmarks/results/conlst-cpu/breakdown.py``."""
import statistics
import time

import torch

import xlt_fast
from xlt_fast import _backend
from xlt_fast.benchmarks import bench_contrastive as bc
from xlt_fast.ops import contrastive as C


def timed(fn, n=400):
    for _ in range(20):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts), statistics.median(ts)


def main():
    ext = _backend.extension()
    a, p, pool, idx, mask = bc.conl_data()
    leaves = [t.clone().requires_grad_() for t in (a, p, pool)]
    tau, code = bc.CONL_TAU, C._METRIC_CODE["sqeuclidean"]
    coef = ext.indexed_candidate_softmax(a, p, pool, idx, mask, tau, code, True)[3]
    one = torch.ones(())

    def grads(loss):
        return torch.autograd.grad(loss, leaves)

    rows = {
        "C++ pass 1 (loss, grad anchor/positive, coef)": lambda: ext.indexed_candidate_softmax(
            a, p, pool, idx, mask, tau, code, True),
        "C++ pass 2 (zeroed (P, d) + scatter)": lambda: ext.indexed_pool_grad(a, pool, idx, mask, coef, one, code),
        "  of which torch.zeros(P, d)": lambda: torch.zeros(bc.CONL_P, bc.CONL_D),
        "the two custom ops, fwd+bwd through autograd": lambda: grads(C.indexed_candidate_softmax(
            *leaves, idx, mask, tau, code, True, "cpu")[0]),
        "negative_contrastive fwd+bwd, check_finite=False": lambda: grads(xlt_fast.negative_contrastive(
            *leaves[:2], idx, tau, "sqeuclidean", pool=leaves[2], negative_mask=mask, check_finite=False)),
        "negative_contrastive fwd+bwd, default checks": lambda: grads(xlt_fast.negative_contrastive(
            *leaves[:2], idx, tau, "sqeuclidean", pool=leaves[2], negative_mask=mask)),
        "dense torch fwd+bwd (the baseline)": lambda: grads(bc.dense_conl(*leaves, idx, mask, tau, "sqeuclidean")),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in rows.items():
        lo, med = timed(fn)
        print(f"{name:<52} min {lo:6.3f} ms  median {med:6.3f} ms")


if __name__ == "__main__":
    main()
