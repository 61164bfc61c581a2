"""Benchmark harness: median times, ratios measured side by side in one run, max error against
the reference, peak memory; a printed table, JSON and a PNG plot under ``benchmarks/results/``.

A :class:`Case` holds zero-argument callables, one per implementation (our backends and the
peers). Each returns the tensors to compare (the value, and for ``fwd+bwd`` the gradients).
Ratios are ``time(baseline) / time(impl)``: above 1 means faster than the peer.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import pkgutil
import platform
import statistics
import time
from typing import Any, Callable, Optional

import torch


@dataclasses.dataclass
class Case:
    op: str                                   # op name, e.g. "supcon"
    shape: str                                # readable size, e.g. "B=512,d=768"
    mode: str                                 # "fwd", "fwd+bwd", "inverse", ...
    impls: dict[str, Callable[[], Any]]       # implementation name -> one run
    baseline: str                             # peer the ratios divide by
    reference: Optional[str] = "reference"    # impl whose output is the truth (None: no check)
    setup: Optional[Callable[[], None]] = None
    tolerance: float = 1e-4                   # max error (of the output's scale) an xlt_fast impl may have


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    mode: str
    impl: str
    median_ms: Optional[float]
    ratio: Optional[float]
    max_err: Optional[float]
    peak_mb: Optional[float]
    note: str = ""


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def max_error(out: Any, ref: Any) -> float:
    """Max over outputs of max |out - ref| / max(1, max |ref|) (relative to the output's scale)."""
    errs = []
    for a, b in zip(_flatten(out), _flatten(ref)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        errs.append(float((a - b).abs().max() / max(1.0, float(b.abs().max()))) if a.numel() else 0.0)
    return max(errs) if errs else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call adds: CUDA allocator peak on a GPU; on the CPU the rise of the
    process's resident high-water mark (Linux, reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_kb("VmRSS:")
    fn()
    return max(0, _rss_kb("VmHWM:") - base) / 1024


def time_ms(fn: Callable[[], Any], device: torch.device, min_time: float, max_reps: int) -> float:
    """Median wall time of one call in ms (CUDA events on a GPU), after a warm-up."""
    fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start_all < min_time):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(case: Case, device: torch.device, quick: bool) -> list[Row]:
    if case.setup:
        case.setup()
    min_time, max_reps = (0.3, 20) if quick else (1.0, 200)
    outs, times, mems, notes = {}, {}, {}, {}
    for name, fn in case.impls.items():
        try:
            if name == case.reference:  # the truth: run once, for its output and a rough time
                _sync(device)
                t0 = time.perf_counter()
                outs[name] = fn()
                _sync(device)
                times[name] = (time.perf_counter() - t0) * 1e3
                continue
            outs[name] = fn()
            times[name] = time_ms(fn, device, min_time, max_reps)
            mems[name] = peak_memory_mb(fn, device)
        except torch.OutOfMemoryError:
            notes[name] = "out of memory"
        except Exception as err:  # a peer that cannot run this case is reported, not fatal
            notes[name] = f"{type(err).__name__}: {str(err)[:60]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = outs.get(case.reference) if case.reference else None
    base = times.get(case.baseline)
    rows = []
    for name in case.impls:
        t = times.get(name)
        err = None
        if ref is not None and name in outs and name != case.reference:
            try:
                err = max_error(outs[name], ref)
            except ValueError as e:
                notes[name] = str(e)
        rows.append(Row(case.op, case.shape, case.mode, name, t, (base / t) if (base and t) else None,
                        err, mems.get(name), notes.get(name, "")))
    return rows


def discover(ops: Optional[list[str]] = None):
    """The ``bench_*`` modules of this package (optionally only those whose family is in ``ops``)."""
    import xlt_fast.benchmarks as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("bench_") and (not ops or info.name[len("bench_"):] in ops):
            mods.append(importlib.import_module(f"xlt_fast.benchmarks.{info.name}"))
    return mods


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or _cpu_model()
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = f"{'op':<20} {'shape':<26} {'mode':<8} {'impl':<22} {'median ms':>10} {'ratio':>8} {'max err':>9} {'peak MB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:<20} {r.shape:<26} {r.mode:<8} {r.impl:<22} {_fmt(r.median_ms, '10.3f')} "
                     f"{_fmt(r.ratio, '7.2f')}x {_fmt(r.max_err, '9.1e')} {_fmt(r.peak_mb, '8.1f')}  {r.note}")
    return "\n".join(lines)


def write_results(rows: list[Row], env: dict, out_dir: str, tag: str) -> tuple[str, Optional[str]]:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tag}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return path, plot(rows, os.path.join(out_dir, f"{tag}.png"), env)


def plot(rows: list[Row], path: str, env: dict) -> Optional[str]:
    """Bar chart of the ratios (speed-up over each case's baseline), log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [r for r in rows if r.ratio is not None]
    if not pts:
        return None
    labels = [f"{r.op} {r.shape} {r.mode} [{r.impl}]" for r in pts]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(pts) + 1.5))
    ax.barh(range(len(pts)), [r.ratio for r in pts], color=["C2" if r.ratio >= 1 else "C3" for r in pts])
    ax.set_yticks(range(len(pts)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the case's baseline (same run)")
    ax.set_title(f"xlt_fast on {env.get('gpu', env.get('cpu', env['device']))}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
