"""Where the time of one WCA coupling goes (d = 768, 4 x 32 problems): the cost GEMM, the Sinkhorn
loop, the plan build; ours and POT's. ``python benchmarks/results/wca-cpu/profile_wca.py THREADS``."""
import statistics
import sys
import time

import torch
from ot.batch import solve_batch
from xlt_fast.benchmarks.bench_sinkhorn import (
    WCA_EPS,
    WCA_ITERS,
    _layer_weights,
    _wca_states,
)

import xlt_fast
from xlt_fast.nn.token_alignment import cosine_costs

torch.set_num_threads(int(sys.argv[1]))
L, B = 4, 32
xs, ys, xm, ym = _wca_states(L, B, 20, 60, 768, seed=1)
C = cosine_costs(xs, ys).reshape(L * B, xs.shape[2], ys.shape[2])
xm4, ym4, a, b = xm.repeat(L, 1), ym.repeat(L, 1), _layer_weights(xm, L), _layer_weights(ym, L)


def ms(fn, reps=15):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def ours(n_iters, tol, plan):
    return xlt_fast.sinkhorn(x_mask=xm4, y_mask=ym4, cost=C, eps=WCA_EPS, n_iters=n_iters, tol=tol, return_plan=plan,
                             check_finite=False, warn=False, backend="cpu")


def pot(n_iters, tol):
    return solve_batch(C, WCA_EPS, a=a, b=b, max_iter=n_iters, tol=tol, method="log_sinkhorn", reg_type="kl",
                       grad="detach")


lse = -C / WCA_EPS
print(f"threads {torch.get_num_threads()}, C {tuple(C.shape)}")
print(f"cosine_costs (L, B, n, d) -> (L, B, n, m):        {ms(lambda: cosine_costs(xs, ys)):8.2f} ms")
for it in (1, WCA_ITERS):
    print(f"ours {it:3d} updates, no plan / with plan:         {ms(lambda it=it: ours(it, None, False)):8.2f} / "
          f"{ms(lambda it=it: ours(it, None, True)):8.2f} ms")
print(f"ours tol 1e-5 (max 1000), no plan / with plan:    {ms(lambda: ours(1000, 1e-5, False)):8.2f} / "
      f"{ms(lambda: ours(1000, 1e-5, True)):8.2f} ms")
print(f"POT {WCA_ITERS} updates (tol 0) / tol 1e-5:               {ms(lambda: pot(WCA_ITERS, 0.0), 5):8.2f} / "
      f"{ms(lambda: pot(1000, 1e-5), 5):8.2f} ms")
print(f"POT's inner op: one logsumexp over (B, n, m):      {ms(lambda: torch.logsumexp(lse, 2)):8.3f} ms")
