"""PNG plots of a run from its ``metrics.jsonl`` rows: training curves and evaluation metrics."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from xlt_fast.training import atomic

_META = {"step", "phase", "phase_step", "split", "time_s", "epoch"}


def _scalar_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in _META and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return keys


def grid(n: int, width: float = 3.6, height: float = 2.6):
    """A figure with ``n`` subplots in at most 4 columns; returns ``(fig, axes)`` (extra axes hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, n))
    nrows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def finish(fig, path: Path, title: str) -> None:
    """Title, tight layout, write ``path`` atomically, close."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic.save_figure(path, fig)
    plt.close(fig)


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """``train.png`` (each training quantity vs step, one colour per phase) and ``eval.png`` (each
    evaluation metric vs step, one line per split)."""
    import matplotlib.pyplot as plt

    written = []
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] not in ("train", "enter")]
    for name, subset, series in (("train", train, "phase"), ("eval", evals, "split")):
        keys = _scalar_keys(subset)
        if not keys:
            continue
        fig, axes = grid(len(keys))
        for ax, key in zip(axes, keys):
            for label in dict.fromkeys(r[series] for r in subset):
                pts = [(r["step"], r[key]) for r in subset if r[series] == label and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{title}: {name}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        atomic.save_figure(path, fig)
        plt.close(fig)
        written.append(path)
    return written
