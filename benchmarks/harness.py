"""Benchmark harness: median times, ratios measured side by side in one run, max error against
the reference, peak memory; a printed table, JSON and a PNG plot under ``benchmarks/results/``.

A :class:`Case` holds zero-argument callables, one per implementation (our backends and the
peers). Each returns the tensors to compare (the value, and for ``fwd+bwd`` the gradients).
Ratios are ``time(baseline) / time(impl)``: above 1 means faster than the peer. Implementations
are timed interleaved (one call of each in turn per rep), so load from other processes hits them
alike.

Floors (:mod:`xlt_fast.benchmarks.floors`): a case's unavoidable work alone (its GEMMs at the same
shapes), timed with the case and printed as a row ``floor (GEMMs only)`` whose ratio is the ceiling
of the case; each of our backends gets ``% of floor`` = floor time / its time x 100.

Targets: ``Case.target`` (a ratio over the baseline), else :data:`TARGETS` (ARCHITECTURE.md
section 3 and issue 16); each of our rows records the target and whether it was met.
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
    floor: Optional[Callable[[], Any]] = None  # the unavoidable work alone (see floors.py); None: registry
    floor_label: str = "floor (GEMMs only)"   # its row's name
    target: Optional[float] = None            # ratio over the baseline to reach; None: TARGETS


OUR_BACKENDS = ("cpu", "triton", "cuda")

# (op, mode or None, shape prefix or None, target ratio over the case's baseline): ARCHITECTURE.md
# section 3 and issue 16. A case's own ``target`` wins.
TARGETS: list[tuple[str, Optional[str], Optional[str], float]] = [
    ("sinkhorn_divergence", "fwd+bwd", "B=32,n,m~U[10,64]", 3.0),
    ("sinkhorn fixed eps", None, None, 1.5),
    ("critic_gp", "fwd+bwd", "B=256,", 0.9 * 1.375),
    ("realnvp", "fwd+bwd", "B=256,", 1.4),
    ("supcon", None, "B=512,d=768", 2.0),
    ("info_nce", None, "B=512,d=768", 2.0),
    ("negative_contrastive", None, None, 1.5),
    ("CoNL step", None, None, 1.5),
    ("pairwise_distance", None, None, 1.0),
    ("iwda step", None, None, 1.0),
    ("wordot step", None, None, 1.0),
    ("wca step", None, None, 1.0),
    ("realnvp step", None, None, 1.0),
]


def is_ours(name: str) -> bool:
    """Whether an implementation name is one of our backends (``cpu``, ``xlt_fast[cpu]``, ...)."""
    return name in OUR_BACKENDS or name.startswith("xlt_fast")


def target_of(case: Case) -> Optional[float]:
    if case.target is not None:
        return case.target
    for op, mode, prefix, target in TARGETS:
        if op == case.op and (mode is None or mode == case.mode) and (prefix is None or case.shape.startswith(prefix)):
            return target
    return None


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
    baseline: str = ""                  # the case's peer (ratios divide its time)
    kind: str = "peer"                  # "ours" | "peer" | "baseline" | "reference" | "floor"
    pct_of_floor: Optional[float] = None  # ours: floor time / this time x 100
    target: Optional[float] = None      # ours: the case's target ratio
    met: Optional[bool] = None          # ours: ratio >= target


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


def _time_one(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, min_time: float,
                     max_reps: int) -> dict[str, float]:
    """Median ms per call of each function, timed in turn within each rep (one warm-up call each):
    at least 3 reps, then until ``min_time`` seconds per function or ``max_reps`` reps."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start_all = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < 3 or time.perf_counter() - start_all < min_time * len(fns)):
        for name, fn in fns.items():
            times[name].append(_time_one(fn, device))
        reps += 1
    return {k: statistics.median(v) for k, v in times.items()}


FLOOR = "floor"


def run_case(case: Case, device: torch.device, quick: bool) -> list[Row]:
    """Rows of one case: the reference (run once), every implementation and the floor (timed
    interleaved), with ratios over the baseline, errors, peak memory, % of floor and the target."""
    from xlt_fast.benchmarks import floors

    if case.setup:
        case.setup()
    min_time, max_reps = (0.3, 20) if quick else (1.0, 200)
    outs, times, mems, notes = {}, {}, {}, {}
    timed: dict[str, Callable[[], Any]] = {}
    try:
        floor_fn = floors.floor_for(case, device)
    except Exception as err:  # a floor that cannot be built is reported, not fatal
        floor_fn, notes[FLOOR] = None, f"{type(err).__name__}: {str(err)[:60]}"
    for name, fn in list(case.impls.items()) + ([(FLOOR, floor_fn)] if floor_fn is not None else []):
        try:
            if name == case.reference:  # the truth: run once, for its output and a rough time
                _sync(device)
                t0 = time.perf_counter()
                outs[name] = fn()
                _sync(device)
                times[name] = (time.perf_counter() - t0) * 1e3
                continue
            out = fn()
            if name != FLOOR:
                outs[name] = out
            timed[name] = fn
        except torch.OutOfMemoryError:
            notes[name] = "out of memory"
        except Exception as err:  # a peer that cannot run this case is reported, not fatal
            notes[name] = f"{type(err).__name__}: {str(err)[:60]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if timed:
        times.update(time_interleaved(timed, device, min_time, max_reps))
    for name, fn in timed.items():
        if name != FLOOR:
            mems[name] = peak_memory_mb(fn, device)
    ref = outs.get(case.reference) if case.reference else None
    base = times.get(case.baseline)
    floor_t = times.get(FLOOR)
    target = target_of(case)
    rows = []
    names = list(case.impls) + ([FLOOR] if FLOOR in times or FLOOR in notes else [])
    for name in names:
        t = times.get(name)
        err = None
        if ref is not None and name in outs and name != case.reference:
            try:
                err = max_error(outs[name], ref)
            except ValueError as e:
                notes[name] = str(e)
        kind = ("floor" if name == FLOOR else "reference" if name == case.reference else
                "baseline" if name == case.baseline else "ours" if is_ours(name) else "peer")
        ratio = (base / t) if (base and t) else None
        row = Row(case.op, case.shape, case.mode, case.floor_label if name == FLOOR else name, t, ratio,
                  err, mems.get(name), notes.get(name, ""), baseline=case.baseline, kind=kind)
        if kind == "ours":
            row.pct_of_floor = 100 * floor_t / t if (floor_t and t) else None
            row.target = target
            row.met = (ratio >= target) if (ratio is not None and target is not None) else None
        rows.append(row)
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
    """The printed table; ``% floor`` is floor time / our time (100 % is the bound), ``target`` the
    case's target ratio with ``ok`` / ``MISSED``."""
    head = (f"{'op':<20} {'shape':<36} {'mode':<8} {'impl':<22} {'median ms':>10} {'ratio':>8} {'% floor':>8} "
            f"{'target':>13} {'max err':>9} {'peak MB':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        tgt = "" if r.target is None else f"{r.target:.2f}x " + ("-" if r.met is None else "ok" if r.met else "MISSED")
        pct = "" if r.pct_of_floor is None else f"{r.pct_of_floor:7.0f}%"
        lines.append(f"{r.op:<20} {r.shape:<36} {r.mode:<8} {r.impl:<22} {_fmt(r.median_ms, '10.3f')} "
                     f"{_fmt(r.ratio, '7.2f')}x {pct:>8} {tgt:>13} {_fmt(r.max_err, '9.1e')} "
                     f"{_fmt(r.peak_mb, '8.1f')}  {r.note}")
    return "\n".join(lines)


def write_results(rows: list[Row], env: dict, out_dir: str, tag: str) -> tuple[str, Optional[str]]:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tag}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return path, plot(rows, os.path.join(out_dir, f"{tag}.png"), env)


def _groups(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by case (op, shape, mode), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.mode), []).append(r)
    return list(groups.values())


MET, MISSED, NO_TARGET = "#2ca02c", "#d62728", "#4c72b0"


def plot(rows: list[Row], path: str, env: dict) -> Optional[str]:
    """One group per case: each of our backends' speed-up over the case's peer as a horizontal bar
    (log axis, the value written on it); green where the case's target is met, red where it is
    missed (with no declared target, 1x is the target); the target as a black tick, the floor's
    ratio (the ceiling) as a grey triangle above the bar, the 1x line. The reference and the peers are not bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return None
    groups = [g for g in _groups(rows) if any(r.kind == "ours" and r.ratio for r in g)]
    if not groups:
        return None
    bars, ticks, labels, separators = [], [], [], []
    y = 0.0
    for g in groups:
        ours = [r for r in g if r.kind == "ours" and r.ratio]
        floor = next((r for r in g if r.kind == "floor" and r.ratio), None)
        y0 = y
        for r in ours:
            bars.append((y, r, floor))
            y += 1
        ticks.append((y0 + y - 1) / 2)
        first = ours[0]
        labels.append(f"{first.op} {first.mode}\n{first.shape}\nvs {first.baseline}")
        separators.append(y - 0.5 + 0.25)
        y += 0.5
    vals = [r.ratio for _, r, _ in bars] + [f.ratio for _, _, f in bars if f] + \
           [r.target for _, r, _ in bars if r.target] + [1.0]
    lo, hi = min(vals) / 1.6, max(vals) * 4
    fig, ax = plt.subplots(figsize=(11, 0.62 * y + 2.2))
    for yy, r, floor in bars:
        target = r.target if r.target is not None else 1.0
        color = MET if r.ratio >= target else MISSED
        ax.barh(yy, r.ratio - lo, height=0.7, color=color, left=lo, alpha=0.9)
        label = f"{r.ratio:.2f}x"
        inside = r.ratio / lo > 2.2  # room for the value on the bar
        ax.text(r.ratio / 1.03 if inside else r.ratio * 1.03, yy, label, va="center",
                ha="right" if inside else "left", fontsize=8, fontweight="bold",
                color="white" if inside else (MISSED if r.ratio < target else "black"))
        notes = []
        if len(set(b[1].impl for b in bars if (b[1].op, b[1].shape, b[1].mode) == (r.op, r.shape, r.mode))) > 1:
            notes.append(r.impl)
        if r.target is not None:
            notes.append(f"target {r.target:.3g}x" + ("" if r.met else " MISSED"))
        elif r.ratio < 1:
            notes.append("slower than the peer")
        if r.pct_of_floor is not None:
            notes.append(f"{r.pct_of_floor:.0f}% of floor")
        if notes:
            x_note = r.ratio * (1.06 if inside else 1.55)
            ax.text(x_note, yy + 0.05, "  ".join(notes), va="center", fontsize=7,
                    color=MISSED if r.ratio < target else "0.2")
        if r.target is not None:
            ax.plot([r.target, r.target], [yy - 0.42, yy + 0.42], color="black", lw=2.2, solid_capstyle="butt")
        if floor is not None:
            ax.plot(floor.ratio, yy - 0.36, marker="v", color="0.4", ms=6, ls="none", zorder=5)
    for sep in separators[:-1]:
        ax.axhline(sep, color="0.85", lw=0.6)
    ax.axvline(1.0, color="black", lw=0.9, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    steps = [v * 10.0 ** e for e in range(-3, 5) for v in (1, 2, 5)]
    shown = [v for v in steps if lo <= v <= hi]
    ax.set_xticks(shown, [f"{v:g}x" for v in shown], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(y - 0.5, -0.75)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("speed-up over the case's peer (time of the peer / our time, same run; log scale)")
    ax.grid(axis="x", which="both", color="0.92", lw=0.5)
    ax.set_axisbelow(True)
    handles = [Patch(color=MET, label="target met (no target: faster than the peer)"),
               Patch(color=MISSED, label="target missed"),
               Line2D([], [], color="black", lw=2.2, label="target"),
               Line2D([], [], color="0.4", marker="v", ls="none", ms=6, label="ceiling: peer's time / the floor's"),
               Line2D([], [], color="black", ls="--", lw=0.9, label="1x (as fast as the peer)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.62 * y + 1.8)), ncol=3,
              fontsize=7, frameon=False)
    ax.set_title(f"xlt_fast on {env.get('gpu', env.get('cpu', env['device']))}, torch {env['torch']}, "
                 f"{env.get('cpu_threads', '?')} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
