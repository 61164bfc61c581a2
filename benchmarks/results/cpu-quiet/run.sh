#!/usr/bin/env bash
# Issue 16's quiet CPU run: nothing else on the machine. From the repository root:
#   bash benchmarks/results/cpu-quiet/run.sh
# Writes benchmarks/results/cpu-quick.{json,png} (xlt-fast bench --quick) and this folder's logs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=benchmarks/results/cpu-quiet
py=.venv/bin/python
{ date -u; uname -m; lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200; git rev-parse HEAD; uptime; } > $out/env.txt
.venv/bin/xlt-fast bench --quick --out benchmarks/results 2>&1 | tee $out/bench-quick.log
$py benchmarks/results/sinkhorn-cpu/measure.py --reps 7 --wait 30 --out $out/sinkhorn.json 2>&1 | tee $out/sinkhorn.log
for args in "256 0 10 2" "256 0 10 1" "16 0 30 2" "256 9 6 2"; do
  $py benchmarks/results/floors-cpu/critic_floor_sbs.py $args 2>&1 | tee -a $out/critic.log
done
for args in "32 2 30" "256 2 12" "32 1 30" "256 1 12"; do
  $py benchmarks/results/floors-cpu/realnvp_floor_sbs.py $args 2>&1 | tee -a $out/realnvp.log
done
$py benchmarks/results/pairwise-cpu/sbs.py --reps 20 --threads 2 2>&1 | tee $out/pairwise.log
uptime >> $out/env.txt
