"""The WCA coupling rows of the full grid (d = 384 and 768; 200 fixed updates, and tol = 1e-5 by each
solver's own rule), on their own: ``python benchmarks/results/wca-cpu/run_wca.py THREADS``."""
import sys

import geomloss
import ot
import torch
from ot.batch import solve_batch
from xlt_fast.benchmarks import harness
from xlt_fast.benchmarks.bench_sinkhorn import _wca_cases

threads = int(sys.argv[1])
torch.set_num_threads(threads)
dev = torch.device("cpu")
rows = [r for case in _wca_cases(dev, False, geomloss, solve_batch) for r in harness.run_case(case, dev, quick=False)]
print(harness.table(rows))
env = {**harness.environment(dev), "pot": ot.__version__, "geomloss": geomloss.__version__}
with open("/proc/loadavg") as f:
    env["loadavg_after"] = f.read().split()[:3]
print(env)
print(harness.write_results(rows, env, "benchmarks/results/wca-cpu", f"cpu-wca-full-{threads}t"))
