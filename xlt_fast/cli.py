"""Command line.

``xlt-fast train METHOD [--config FILE] [--field value ...] --output_dir DIR [--resume]``
  trains one config of a bundled trainer (``xlt-fast train iwda --help`` lists its fields); a
  multi-process run is the same command under ``torchrun --nproc_per_node N -m xlt_fast.cli``.
``xlt-fast reproduce [METHOD ...] [--quick] --output_dir DIR [--workers N]``
  runs the papers' key experiments and writes ``DIR/<method>/claims.json``, ``claims.md`` and plots.
``xlt-fast bench [--quick] [--ops a,b] [--device cpu|cuda] [--out DIR]``
  the benchmark suites: per case the ratio of each implementation over the peer, a floor row (the
  op's GEMMs alone at the same shapes: the ceiling), our backends' % of floor and the target met or
  missed; ``DIR/{cpu,gpu}-{quick,full}.json`` and a ``.png`` of our speed-ups per case.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
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


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from xlt_fast import trainers
    from xlt_fast.training import load_config
    from xlt_fast.training.config import config_help

    try:
        trainer = trainers.get(args.method)
    except ValueError as exc:
        print(f"xlt-fast train: {exc}", file=sys.stderr)
        return 2
    if args.help:
        print(config_help(trainer.Config))
        return 0
    cfg = load_config(trainer.Config, args.config, rest)
    result = trainer.train(cfg, resume=args.resume)
    if result is None or os.environ.get("RANK", "0") != "0":
        return 0
    print(f"\n{args.method} {cfg.variant}: {result.steps} steps in {result.run_time_s:.1f} s -> {result.run_dir}")
    for split, values in result.metrics.items():
        shown = {k: v for k, v in values.items() if isinstance(v, float)}
        print(f"  {split:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from xlt_fast import experiments
    from xlt_fast.training import atomic

    methods = args.methods or list(experiments.EXPERIMENTS)
    unknown = [m for m in methods if m not in experiments.EXPERIMENTS]
    if unknown:
        print(f"xlt-fast reproduce: unknown method(s) {unknown}; available: {', '.join(experiments.EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    tables = []
    for method in methods:
        module = experiments.get(method)
        print(f"== reproduce {method} ({'quick' if args.quick else 'full'}) -> {out / method}", flush=True)
        module.run(out / method, quick=args.quick, progress=not args.no_progress, workers=args.workers)
        text = (out / method / "claims.md").read_text()
        tables.append(text)
        print("\n" + text)
        pngs = sorted(str(p) for p in (out / method).glob("*.png"))
        print(f"plots: {', '.join(pngs)}\nclaims: {out / method / 'claims.json'}\n", flush=True)
    atomic.write_text(out / "claims.md", "\n".join(tables))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xlt-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suites and print the table")
    bench.add_argument("--quick", action="store_true", help="small grid, few repeats (about 2 min on 2 cores)")
    bench.add_argument("--ops", default=None, help="comma-separated families (e.g. contrastive,pairwise)")
    bench.add_argument("--device", default=None, choices=("cpu", "cuda"))
    bench.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for JSON and PNG")
    train = sub.add_parser("train", add_help=False, help="train one config of a bundled trainer")
    train.add_argument("method", help="trainer name (iwda, wordot, wca, realnvp, conlst)")
    train.add_argument("--config", default=None, help="JSON or TOML file of config fields")
    train.add_argument("--resume", action="store_true", help="continue output_dir from its latest checkpoint")
    train.add_argument("-h", "--help", action="store_true", help="list the trainer's config fields")
    repro = sub.add_parser("reproduce", help="run the papers' key experiments and check their claims")
    repro.add_argument("methods", nargs="*", help="experiments to run (default: every one)")
    repro.add_argument("--quick", action="store_true", help="the small grid (minutes on 2 cores)")
    repro.add_argument("--output_dir", default="reproduce", help="where runs, claims and plots go")
    repro.add_argument("--workers", type=int, default=None, help="processes for the grid's runs")
    repro.add_argument("--no_progress", action="store_true", help="no progress bars")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from xlt_fast.training import ConfigError

    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "train":
            return _train(args, rest)
        return _reproduce(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as exc:
        print(f"xlt-fast {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
