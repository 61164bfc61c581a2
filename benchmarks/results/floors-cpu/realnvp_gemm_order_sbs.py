"""Where RealNVP fwd+bwd at batch B spends its time over the GEMM floor (the case of bench_coupling:
8 couplings, hidden 512, d=768), interleaved reps on one thread, process CPU time, min and median:

    floor       bench_coupling.floor_impl(B): per layer its forward, input- and weight-gradient GEMMs
                back to back (the weight still in cache for the second and third)
    flow order  the same 9 GEMMs x 8 couplings in the order a flow must run them: every forward,
                then the backward, couplings and layers in reverse
    our GEMMs   the GEMMs of realnvp_forward / realnvp_backward alone, in their order and layouts
                (bias in addmm, ReLU in _addmm_activation, dL/dx_1 by addmm_ into a strided slice)
    ours        RealNVP.log_prob and its backward (backend "cpu"), as in realnvp_floor_sbs.py

    .venv/bin/python benchmarks/results/floors-cpu/realnvp_gemm_order_sbs.py B REPS
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from benchmarks import bench_coupling as bc  # noqa: E402

torch.set_num_threads(1)
B, reps = int(sys.argv[1]), int(sys.argv[2])
D, H, K = bc.D, bc.HIDDEN, bc.N_COUPLINGS
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


dims = [(D // 2, H), (H, H), (H, D)]
layers = [[(rnd(o, i), rnd(B, i), rnd(B, o)) for i, o in dims] for _ in range(K)]


def flow_order():
    out = [h @ w.T for c in layers for w, h, _ in c]
    for c in reversed(layers):
        for w, h, gy in reversed(c):
            out += [gy @ w, gy.T @ h]
    return out


params = [[(rnd(o, i), rnd(o)) for i, o in dims] for _ in range(K)]
xs = [rnd(B, D) for _ in range(K)]


def our_gemms():
    acts = []
    for (w1, b1), (w2, b2), (w3, b3) in params:
        x1 = xs[len(acts)][:, :D // 2]
        h1 = torch._addmm_activation(b1, x1, w1.t())
        h2 = torch._addmm_activation(b2, h1, w2.t())
        acts.append((x1, h1, h2, torch.addmm(b3, h2, w3.t())))
    out = []
    for ((w1, _), (w2, _), (w3, _)), (x1, h1, h2, g3) in zip(reversed(params), reversed(acts)):
        gx = torch.empty(B, D)
        g2 = g3 @ w3
        g1 = g2 @ w2
        gx[:, :D // 2].addmm_(g1, w1)
        out += [g1.t() @ x1, g2.t() @ h1, g3.t() @ h2, gx]
    return out


case = next(c for c in bc.cases(torch.device("cpu"), quick=False)
            if c.shape.startswith(f"B={B},") and c.mode == "fwd+bwd")
impls = {"floor": bc.floor_impl(B, "fwd+bwd"), "flow order": flow_order, "our GEMMs": our_gemms,
         "ours": case.impls["cpu"]}
for f in impls.values():
    f()
    f()
times = {n: [] for n in impls}
for r in range(reps):
    for n in (list(impls) if r % 2 == 0 else list(reversed(impls))):
        t0 = time.process_time()
        impls[n]()
        times[n].append(time.process_time() - t0)
floor = min(times["floor"])
for n, v in times.items():
    print(f"fwd+bwd B={B} {n:10s} min {1e3 * min(v):7.2f} med {1e3 * statistics.median(v):7.2f} ms  "
          f"min/floor {min(v) / floor:.3f}", flush=True)
