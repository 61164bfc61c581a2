"""Command line: ``xlt-fast bench [--quick] [--ops a,b] [--device cpu|cuda] [--out DIR]``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _bench(args: argparse.Namespace) -> int:
    import torch

    from xlt_fast.benchmarks import harness

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    env = harness.environment(device)
    print(f"xlt-fast bench on {env.get('gpu', env.get('cpu'))} | torch {env['torch']} | "
          f"triton {env.get('triton', '-')} | threads {env['cpu_threads']} | {'quick' if args.quick else 'full'}")
    rows = []
    for mod in harness.discover(args.ops.split(",") if args.ops else None):
        for case in mod.cases(device, args.quick):
            case_rows = harness.run_case(case, device, args.quick)
            print(harness.table(case_rows).split("\n", 2)[-1] if rows else harness.table(case_rows), flush=True)
            rows += case_rows
    tag = f"{'gpu' if device.type == 'cuda' else 'cpu'}-{'quick' if args.quick else 'full'}"
    json_path, png_path = harness.write_results(rows, env, args.out, tag)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xlt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suites and print the table")
    bench.add_argument("--quick", action="store_true", help="small grid, few repeats (about 2 min on 2 cores)")
    bench.add_argument("--ops", default=None, help="comma-separated families (e.g. contrastive,pairwise)")
    bench.add_argument("--device", default=None, choices=("cpu", "cuda"))
    bench.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for JSON and PNG")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
