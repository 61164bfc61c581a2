"""The WCA step rows of the trainers bench on their own (a WCA-hard step against the same step
without alignment): ``python benchmarks/results/wca-cpu/run_wca_step.py THREADS``."""
import sys

import torch
from xlt_fast.benchmarks import harness
from xlt_fast.benchmarks.bench_trainers import cases

threads = int(sys.argv[1])
torch.set_num_threads(threads)
dev = torch.device("cpu")
rows = [r for case in cases(dev, quick=False) if case.op == "wca step" for r in harness.run_case(case, dev, quick=False)]
print(harness.table(rows))
env = harness.environment(dev)
with open("/proc/loadavg") as f:
    env["loadavg_after"] = f.read().split()[:3]
print(env)
print(harness.write_results(rows, env, "benchmarks/results/wca-cpu", f"cpu-wca-step-{threads}t"))
