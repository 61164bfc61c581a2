"""Where the realnvp step's time goes: forward (loss), backward and the RMSprop step of ours and of
nflows timed apart, interleaved, on the case's own step functions (``benchmarks/bench_trainers.py``).

    .venv/bin/python benchmarks/results/realnvp-cpu/profile_phases.py [--threads N] [--reps R]

Prints, per batch and implementation, min / median ms of each phase (wall time with more than one
thread, process CPU time with one) and the reps' "others" CPU (other processes, from /proc/stat).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from xlt_fast.benchmarks import bench_trainers as bt

parser = argparse.ArgumentParser()
parser.add_argument("--batches", default="32,256")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--reps", type=int, default=15)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
print(f"threads {torch.get_num_threads()}, clock {clock.__name__}")
for B in [int(b) for b in args.batches.split(",")]:
    pair, (x, y) = bt._realnvp_pair(), bt._realnvp_batch(B)
    impls = {"nflows": bt.realnvp_nflows_step(pair, x, y), "xlt_fast cpu": bt.realnvp_step(pair, x, y, "cpu")}
    phases = ("forward", "backward", "rmsprop")
    res = {n: {k: [] for k in phases} for n in impls}
    others = []
    for f in impls.values():
        for _ in range(2):
            f()
    for _ in range(args.reps):
        b0, c0 = bt._cpu_busy_s(), time.process_time()
        for n, f in impls.items():
            f.restore()
            f.optimizer.zero_grad(set_to_none=True)
            t0 = clock()
            v = f.loss_fn()
            t1 = clock()
            v[0].backward()
            t2 = clock()
            f.optimizer.step()
            t3 = clock()
            for k, a, b in zip(phases, (t0, t1, t2), (t1, t2, t3)):
                res[n][k].append(1e3 * (b - a))
        others.append(1e3 * ((bt._cpu_busy_s() - b0) - (time.process_time() - c0)))
    print(f"B={B}: others' CPU per rep median {statistics.median(others):.0f} ms")
    for n, r in res.items():
        total = sum(min(v) for v in r.values())
        print(f"  {n:13s} " + ", ".join(f"{k} {min(v):.1f} / {statistics.median(v):.1f}" for k, v in r.items())
              + f" | sum of mins {total:.1f} ms")
