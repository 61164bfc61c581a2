"""RealNVP (8 couplings, hidden 512, d=768, exp scale, as bench_coupling) fwd+bwd and inverse at batch
B: ours (backend "cpu"), nflows and bench_coupling.floor_impl (the conditioners' GEMMs alone),
interleaved reps (order alternating), wall and process CPU time per impl.

    .venv/bin/python benchmarks/results/floors-cpu/realnvp_floor_sbs.py B THREADS REPS
"""
import sys, time, torch, statistics
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", ".."))
from benchmarks import bench_coupling as bc
torch.set_num_threads(int(sys.argv[2]))
B = int(sys.argv[1]); reps = int(sys.argv[3])
cases = [c for c in bc.cases(torch.device("cpu"), quick=False) if c.shape.startswith(f"B={B},")]
for case in cases:
    impls = {"ours": case.impls["cpu"], "nflows": case.impls["nflows"], "floor": bc.floor_impl(B, case.mode)}
    for f in impls.values(): f(); f()
    wall = {n: [] for n in impls}; cpu = {n: [] for n in impls}
    for r in range(reps):
        for n in (list(impls) if r % 2 == 0 else list(reversed(impls))):
            c0, w0 = time.process_time(), time.perf_counter(); impls[n]()
            wall[n].append(time.perf_counter() - w0); cpu[n].append(time.process_time() - c0)
    s = {n: (1e3 * min(wall[n]), 1e3 * statistics.median(wall[n]), 1e3 * min(cpu[n])) for n in impls}
    print(case.mode, B, " ".join(f"{n} min {a:.2f} med {b:.2f} cpu-min {c:.2f} ms;" for n, (a, b, c) in s.items()),
          f"ours/floor {s['ours'][0]/s['floor'][0]:.3f} (med {s['ours'][1]/s['floor'][1]:.3f}), nflows/ours {s['nflows'][0]/s['ours'][0]:.3f} (med {s['nflows'][1]/s['ours'][1]:.3f})", flush=True)
