"""Side-by-side timings for issue 16's Sinkhorn rows (this folder's README): interleaved reps, each
rep runs every implementation once in turn; a rep is quiet when other processes used under 10% of
a CPU during it (benchmarks.common.cpu_busy_s minus this process's CPU time).

    .venv/bin/python benchmarks/results/sinkhorn-cpu/measure.py [--reps 7] [--wait 60] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import xlt_fast
from xlt_fast.benchmarks.bench_sinkhorn import FIXED_EPS, FIXED_ITERS, FIXED_MAX_ITERS, FIXED_TOL, _batch, _with_grad, pot_iterations
from xlt_fast.benchmarks.common import cpu_busy_s, quiet_reps


def timed(fns: dict, reps: int, wait: float) -> dict:
    def rep(i):
        row, b0, c0, t0 = {}, cpu_busy_s(), time.process_time(), time.perf_counter()
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            row[name] = (time.perf_counter() - t, time.process_time() - c)
        others = (cpu_busy_s() - b0) - (time.process_time() - c0)
        row["quiet"] = others < 0.1 * (time.perf_counter() - t0)
        return row

    def rewarm():
        for fn in fns.values():
            fn()

    rewarm()
    log = quiet_reps(rep, rewarm, reps, wait)
    use = [r for r in log if r["quiet"]] or log
    out = {"reps": len(log), "quiet_reps": sum(r["quiet"] for r in log)}
    names = list(fns)
    for name in names:
        w = [r[name][0] * 1e3 for r in use]
        c = [r[name][1] * 1e3 for r in use]
        out[name] = {"min_ms": min(w), "median_ms": statistics.median(w), "cpu_median_ms": statistics.median(c)}
    base, ours = names[0], names[1:]
    for name in ours:
        out[name]["ratio_min"] = out[base]["min_ms"] / out[name]["min_ms"]
        out[name]["ratio_median_of_reps"] = statistics.median(r[base][0] / r[name][0] for r in use)
        out[name]["ratio_cpu_median"] = out[base]["cpu_median_ms"] / out[name]["cpu_median_ms"]
    return out


def divergence(B: int, reps: int, wait: float) -> dict:
    import geomloss
    x, y, xm, ym, _, _ = _batch(B, 10, 64, 768, torch.device("cpu"), seed=B + 64)
    a, b = xm.float() / xm.sum(1, keepdim=True), ym.float() / ym.sum(1, keepdim=True)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True, backend="tensorized")
    fns = {"geomloss tensorized": lambda: _with_grad(lambda u, v: loss(a, u, b, v), x, y, True),
           "xlt_fast[cpu]": lambda: _with_grad(lambda u, v: xlt_fast.sinkhorn_divergence(
               u, v, x_mask=xm, y_mask=ym, backend="cpu"), x, y, True)}
    return timed(fns, reps, wait)


def fixed_eps(B: int, n: int, reps: int, wait: float) -> dict:
    from ot.batch import solve_batch
    x, y, _, _, _, _ = _batch(B, n, n, 768, torch.device("cpu"), seed=7)
    M = 0.5 * torch.cdist(x, y) ** 2
    res = {}
    for label, n_iters, tol in (("tol", FIXED_MAX_ITERS, FIXED_TOL), ("it", FIXED_ITERS, None)):
        alt = dict(eps=FIXED_EPS, n_iters=n_iters, tol=tol, update="alternate", stop="pot" if tol else "marginals")
        avg = dict(eps=FIXED_EPS, n_iters=n_iters, tol=tol)
        pt = 0.0 if tol is None else tol
        fns = {"POT solve_batch": lambda: solve_batch(0.5 * torch.cdist(x, y) ** 2, FIXED_EPS, max_iter=n_iters, tol=pt,
                                                      method="log_sinkhorn", reg_type="kl", grad="detach").value,
               "xlt_fast[cpu] alternate": lambda: xlt_fast.sinkhorn(x, y, backend="cpu", **alt).cost,
               "xlt_fast[cpu] averaged": lambda: xlt_fast.sinkhorn(x, y, backend="cpu", **avg).cost}
        r = timed(fns, reps, wait)
        r["iterations"] = {"POT solve_batch": pot_iterations(M, FIXED_EPS, n_iters, pt)}
        for key, kw in (("xlt_fast[cpu] alternate", alt), ("xlt_fast[cpu] averaged", avg)):
            k = xlt_fast.sinkhorn(x, y, backend="cpu", **kw).n_iters
            r["iterations"][key] = [int(k.min()), int(k.max())]
        res[label] = r
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--wait", type=float, default=60.0)
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["divergence", "fixed"], default=None)
    args = p.parse_args()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.only != "fixed":
        for B in (8, 32):
            out[f"divergence B={B},n,m~U[10,64],d=768 fwd+bwd"] = r = divergence(B, args.reps, args.wait)
            print(f"divergence B={B}:", json.dumps(r), flush=True)
    if args.only != "divergence":
        for B, n in ((8, 32), (32, 64), (8, 128)):
            out[f"sinkhorn fixed eps B={B},n=m={n},d=768,eps={FIXED_EPS:g}"] = r = fixed_eps(B, n, args.reps, args.wait)
            print(f"fixed eps B={B} n={n}:", json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
