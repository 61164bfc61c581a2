"""Where a WCA step's alignment time goes (1 thread): the same step as task-only, nearest-token
(the extra encoder passes and the loss, no Sinkhorn) and WCA-hard (plus the plans);
``python benchmarks/results/wca-cpu/wca_step_split.py``. Median of 7 calls after 2 warm-ups."""
import statistics
import time

import torch
from xlt_fast.benchmarks.bench_trainers import wca_step

torch.set_num_threads(1)
times = {}
for variant in ("task_only", "nearest_token", "wca_hard"):
    run = wca_step(variant)
    for _ in range(2):
        run()
    samples = []
    for _ in range(7):
        t = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t)
    times[variant] = 1e3 * statistics.median(samples)
    print(f"{variant:14s} {times[variant]:8.1f} ms")
step = times["wca_hard"]
print(f"alignment overhead: {step - times['task_only']:.1f} ms = {100 * (step - times['task_only']) / step:.0f}% of the "
      f"WCA step; of it the plans (wca_hard - nearest_token): {step - times['nearest_token']:.1f} ms = "
      f"{100 * (step - times['nearest_token']) / step:.0f}% of the step")
