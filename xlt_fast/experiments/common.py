"""What every experiment shares: claims and their verdicts, the statistics behind them, the grid
of runs (each in its own directory; a complete one is skipped, an interrupted one resumed) and the
claims files (``claims.json``, ``claims.md``)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from xlt_fast.training import atomic, checkpoint
from xlt_fast.training.config import TrainerConfig, config_hash, replace
from xlt_fast.training.run import Result, read_result

Verdict = Literal["reproduced", "consistent", "not reproduced"]


@dataclasses.dataclass
class Claim:
    """One checked claim: what the paper says, what we measured, the verdict by the stated rule."""

    claim: str
    paper: str
    ours: str
    verdict: Verdict
    rule: str = ""


@dataclasses.dataclass
class Interval:
    """Mean with a 95% t-interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [95% CI {self.low:+.4f}, {self.high:+.4f}], n={self.n}"


def mean_ci(values: Iterable[float]) -> Interval:
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if x.size == 1:
        return Interval(float(x[0]), -math.inf, math.inf, 1)
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), int(x.size))


def sign_verdict(ci: Interval, direction: int) -> Verdict:
    """``direction`` +1: reproduced if the CI lies above 0, consistent if only the mean does; -1: below."""
    if ci.n == 0 or math.isnan(ci.mean):
        return "not reproduced"
    if direction * ci.mean <= 0:
        return "not reproduced"
    bound = ci.low if direction > 0 else ci.high
    return "reproduced" if direction * bound > 0 else "consistent"


def all_of(verdicts: Iterable[Verdict]) -> Verdict:
    """The verdict of a claim made of parts: reproduced if every part is, not reproduced if any
    part is not, consistent otherwise."""
    verdicts = list(verdicts)
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "not reproduced" if "not reproduced" in verdicts else "consistent"


def verse_bootstrap(verse: Sequence[int], diff: Sequence[float], n_boot: int, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap means of ``diff`` (one value per linked word), resampling verses: a
    cluster bootstrap, since the words of a verse are not independent."""
    ids, inverse = np.unique(np.asarray(verse), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(diff, dtype=np.float64), minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids))
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    return sums[draws].sum(1) / counts[draws].sum(1)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value."""
    from scipy import stats

    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def write_claims(out_dir: Path, method: str, claims: Sequence[Claim], details: dict[str, Any],
                 markdown: str = "") -> str:
    """``claims.json`` (the list of claims), ``details.json`` (``details``) and ``claims.md`` (a table:
    claim, paper, ours, verdict; then ``markdown``); returns the Markdown."""
    atomic.write_json(out_dir / "claims.json", [dataclasses.asdict(c) for c in claims])
    atomic.write_json(out_dir / "details.json", details)
    lines = [f"### {method}: claims", "", "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {c.claim} | {c.paper} | {c.ours} | **{c.verdict}** |" for c in claims]
    text = "\n".join(lines) + "\n" + markdown
    atomic.write_text(out_dir / "claims.md", text)
    return text


def markdown(rows: Sequence[dict[str, Any]], fmt: str = "{:.3f}") -> str:
    keys = [k for k in rows[0] if not k.endswith(" sd")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            text = fmt.format(v) if isinstance(v, float) else str(v)
            if f"{k} sd" in r and not math.isnan(r[f"{k} sd"]):
                text += f" ± {r[f'{k} sd']:.3f}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sizes(settings: Any, default: Any, workers: int | None) -> Any:
    """The experiment's sizes: ``settings`` if given (tests), else ``default`` (quick or full), with
    ``workers`` replaced when given."""
    settings = settings or default
    return settings if workers is None else dataclasses.replace(settings, workers=workers)


@dataclasses.dataclass
class Cell:
    """One run of a grid: a name (its directory under the grid's root) and its config."""

    name: str
    cfg: TrainerConfig


def cell_dir(root: Path, name: str, cfg: TrainerConfig) -> Path:
    """``root/name-<config hash>``: another config never reuses a directory."""
    return root / f"{name}-{config_hash(cfg)[:8]}"


def run_cells(trainer, cells: Sequence[Cell], root: Path, progress: bool, desc: str,
              workers: int = 1) -> dict[str, Result]:
    """Train every cell (skipping complete ones, resuming interrupted ones) and return the results.

    ``workers > 1`` trains cells in that many processes (one thread each; spawned, so each has its
    own torch), which uses two cores better than one process with two threads for small models;
    the processes stay up for the next call (:func:`_pool`).
    """
    jobs = []
    for cell in cells:
        out = cell_dir(root, cell.name, cell.cfg)
        cfg = replace(cell.cfg, output_dir=str(out))
        jobs.append((cell.name, cfg))
    results: dict[str, Result] = {}
    todo = []
    for name, cfg in jobs:
        done = read_result(cfg.output_dir)
        if done is not None and done.config_hash == config_hash(cfg):
            results[name] = done
        else:
            todo.append((name, cfg))
    bar = _bar(len(jobs), desc, progress, initial=len(jobs) - len(todo))
    if workers <= 1 or len(todo) <= 1:
        for name, cfg in todo:
            results[name] = _train_cell(trainer.__name__, cfg)
            bar()
    else:
        import concurrent.futures as cf

        pool = _pool(workers)
        futures = {pool.submit(_train_cell, trainer.__name__, cfg): name for name, cfg in todo}
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            bar()
    bar(close=True)
    return results


_POOLS: dict[int, Any] = {}


def _pool(workers: int):
    """A process pool of ``workers`` (one thread each; spawned, so each has its own torch), kept
    for the next grid: its processes keep their imports, models and caches warm."""
    import atexit
    import concurrent.futures as cf
    import multiprocessing as mp

    pool = _POOLS.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)
        _POOLS[workers] = pool
        atexit.register(pool.shutdown)
    return pool


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train_cell(module: str, cfg: TrainerConfig) -> Result:
    import importlib

    trainer = importlib.import_module(module)
    resume = checkpoint.latest(Path(cfg.output_dir) / "checkpoints") is not None
    return trainer.train(cfg, resume=resume)


def _bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Callable[..., None]:
    if not enabled:
        return lambda close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit="run", dynamic_ncols=True)

    def step(close: bool = False) -> None:
        if close:
            bar.close()
        else:
            bar.update(1)
    return step


def short_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


# -------------------------------------------------------------------- genre-task target choice

def _linear_probe(x, y, k: int, seed: int = 0):
    """Multinomial logistic regression, full batch AdamW (500 steps, lr 1e-2, wd 1e-4)."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def largest_gap_languages(cfg, n_languages: int, selection_verses: int, out: Path,
                          progress: bool) -> tuple[list[str], list[dict]]:
    """The ``n_languages`` Bible targets with the largest zero-shot gap of an English linear probe
    (trained on the source verses of the genre-task config ``cfg``), evaluated on the same
    ``selection_verses`` dev verses in every language (spec C.1; dev only). Writes ``languages.json``."""
    import torch

    from xlt_fast import metrics
    from xlt_fast.data import GENRES, languages, load_genre_task, subsample_with_priors
    from xlt_fast.trainers import genre
    from xlt_fast.training import default_cache

    cache = default_cache()
    enc = dict(encoder=cfg.encoder, layers=(cfg.feature_layer,), pooling=cfg.pooling, prefix=cfg.prefix,
               max_length=cfg.max_length, progress=progress)
    source = genre.datasets(cfg)["source"]
    xs = cache.get(source.texts, **enc)[cfg.feature_layer]
    head = _linear_probe(xs, torch.tensor(source.labels), len(GENRES))
    en_dev = load_genre_task(cfg.source_lang, "dev")
    ids = set(subsample_with_priors(en_dev, en_dev.priors(), selection_verses, cfg.data_seed)[0].ids)
    rows = []
    sets = {lang: load_genre_task(lang, "dev") for lang in languages()}
    sets = {lang: ds.subset([i for i, v in enumerate(ds.ids) if v in ids]) for lang, ds in sets.items()}
    feats = cache.get([t for ds in sets.values() for t in ds.texts], **enc)[cfg.feature_layer]
    start = 0
    for lang, ds in sets.items():
        x = feats[start:start + len(ds)]
        start += len(ds)
        with torch.no_grad():
            pred = head(x).argmax(1)
        y = np.asarray(ds.labels)
        rows.append({"language": lang, "verses": len(ds), "macro_f1": metrics.macro_f1(y, pred, labels=np.unique(y)),
                     "accuracy": metrics.accuracy(y, pred)})
    en = next(r["macro_f1"] for r in rows if r["language"] == cfg.source_lang)
    for r in rows:
        r["gap"] = en - r["macro_f1"]
    targets = sorted((r for r in rows if r["language"] != cfg.source_lang), key=lambda r: -r["gap"])
    chosen = [r["language"] for r in targets[:n_languages]]
    atomic.write_json(out / "languages.json", {"rows": rows, "chosen": chosen, "rule": (
        f"English linear probe (trained on the {len(source)} source verses) on the same "
        f"{selection_verses} dev verses in every language; targets = the {n_languages} "
        f"largest gaps (English macro-F1 minus target macro-F1)")})
    return chosen, rows
