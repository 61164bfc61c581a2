"""Side-by-side timing of pairwise_distance (sqeuclidean, backend="cpu") against torch.cdist(x, y).square()
on the benchmark's data (a shared offset plus per-point noise). Reps interleave the two, alternating which
goes first; prints min and median ms of each and the ratios cdist/ours (of the minima, of the medians, and
the median of per-rep ratios). Usage: python sbs.py [--reps R] [--threads T] [B,n,m,d ...]"""
import argparse
import statistics
import time

import torch

import xlt_fast

SIZES = [(8, 128, 128, 768), (32, 64, 64, 768), (1, 4096, 4096, 768)] + [(8, 128, 128, d) for d in (3, 8, 16, 32, 64)] \
    + [(1, 1024, 1024, d) for d in (3, 8, 32)]


def data(B, n, m, d):
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(d, generator=g) * 0.7
    return offset + torch.randn(B, n, d, generator=g), offset + torch.randn(B, m, d, generator=g)


def once(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("sizes", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] or SIZES
    print(f"xlt_fast {xlt_fast.__file__}, torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
    print(f"{'size':24} {'ours min/med ms':>18} {'cdist min/med ms':>18} {'ratio min':>9} {'med':>6} {'per-rep':>7}")
    for size in sizes:
        x, y = data(*size)
        fns = {"ours": lambda: xlt_fast.pairwise_distance(x, y, "sqeuclidean", backend="cpu"),
               "cdist": lambda: torch.cdist(x, y).square()}
        # inner repeats so that one sample lasts >= ~2 ms
        t1 = min(once(fns["cdist"]) for _ in range(3))
        inner = max(1, int(2.0 / max(t1, 1e-3)))
        times = {k: [] for k in fns}
        for r in range(reps):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                t = time.perf_counter()
                for _ in range(inner):
                    fns[k]()
                times[k].append((time.perf_counter() - t) * 1e3 / inner)
        o, c = times["ours"], times["cdist"]
        per_rep = statistics.median(ci / oi for ci, oi in zip(c, o))
        name = "B={},n={},m={},d={}".format(*size)
        print(f"{name:24} {min(o):8.3f}/{statistics.median(o):8.3f} {min(c):8.3f}/{statistics.median(c):8.3f} "
              f"{min(c) / min(o):9.2f} {statistics.median(c) / statistics.median(o):6.2f} {per_rep:7.2f}", flush=True)


if __name__ == "__main__":
    main()
