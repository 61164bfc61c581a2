"""critic_gp B x D=768 x H=2048 (fwd+bwd, features needing gradients, as bench_critic): eager double
backward, ours (backend "cpu") and bench_critic.floor_impl (the 8 GEMM units alone), interleaved
reps (order alternating), wall and process CPU time per impl.

    .venv/bin/python benchmarks/results/floors-cpu/critic_floor_sbs.py B K REPS [THREADS]   # K = 0: no CDAN
"""
import sys, time, torch, statistics
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", ".."))
from benchmarks import bench_critic as bc
from benchmarks.common import cpu_busy_s
import xlt_fast
B = int(sys.argv[1]); k = None if sys.argv[2] == "0" else int(sys.argv[2]); reps = int(sys.argv[3])
th = int(sys.argv[4]) if len(sys.argv) > 4 else 2
torch.set_num_threads(th)
prob = bc._problem(B, k, torch.device("cpu"))
def ours(params, zs, zt, ps, pt, w, a):
    return xlt_fast.critic_gp(tuple(params), zs, zt, ps, pt, w, alpha=a, backend="cpu")
impls = {"eager": lambda: bc._step(bc._reference_fn, *prob), "ours": lambda: bc._step(ours, *prob),
         "floor": bc.floor_impl(B, k)}
for f in impls.values(): f(); f()
wall = {n: [] for n in impls}; cpu = {n: [] for n in impls}; ratios = []
for r in range(reps):
    order = list(impls) if r % 2 == 0 else list(reversed(impls))
    t = {}
    for n in order:
        c0, w0 = time.process_time(), time.perf_counter()
        impls[n]()
        t[n] = time.perf_counter() - w0
        wall[n].append(t[n]); cpu[n].append(time.process_time() - c0)
    ratios.append((t["eager"] / t["ours"], t["ours"] / t["floor"]))
for n in impls:
    print(f"{n}: wall min {1e3*min(wall[n]):.2f} med {1e3*statistics.median(wall[n]):.2f} ms; cpu min {1e3*min(cpu[n]):.2f} med {1e3*statistics.median(cpu[n]):.2f}")
e, o = zip(*ratios)
print(f"eager/ours per-rep median {statistics.median(e):.3f} (min-based {min(wall['eager'])/min(wall['ours']):.3f}); ours/floor median {statistics.median(o):.3f} (min-based {min(wall['ours'])/min(wall['floor']):.3f})")
