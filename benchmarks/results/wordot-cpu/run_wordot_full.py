"""The WordOT divergence rows of the full grid (d = 384 and 768, fwd and fwd+bwd), on their own."""
import torch, geomloss
from xlt_fast.benchmarks import harness
from xlt_fast.benchmarks.bench_sinkhorn import _wordot_cases
dev = torch.device("cpu")
rows = [r for case in _wordot_cases(dev, False, geomloss) for r in harness.run_case(case, dev, quick=False)]
print(harness.table(rows))
env = harness.environment(dev)
print(harness.write_results(rows, env, "benchmarks/results/wordot-cpu", "cpu-wordot-full"))
