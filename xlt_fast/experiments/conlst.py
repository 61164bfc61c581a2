"""The CoNLST experiment (seed 004, Tables 3-4, Figs. 3-4; spec C.3): contrastive negative learning
cleans the high-confidence pseudo-labels, and CoNLST beats plain self-training.

Protocol (frozen multilingual-e5-small features, Bible genre task, English source; dropout in g
is the view noise):

1. **Targets**: the ``n_languages`` with the largest zero-shot gap of an English linear probe on
   shared dev verses (:func:`xlt_fast.experiments.common.largest_gap_languages`; dev only).
2. **Zero-shot models**, one per seed (4 epochs of cross-entropy on English half A).
3. **Choices on target dev** (the paper states neither): stage 1's ``(conl_lr, temperature)`` by
   the dev accuracy of CoNL-only, stage 2's ``(st_lr, flex_warmup)`` by the dev accuracy of plain
   ST (the baseline: the choice favours it, not CoNLST). NL-CE uses stage 1's lr. Sweep runs use
   the seeds ``sweep_seeds``; no choice reads a test label or a pool label.
4. **Arms**, each from the seed's zero-shot model (``init_from``), same pool and test set: ST,
   CoNL-only, CoNLST, NL-CE only (its stage 1 alone: Fig. 4), NL-CE+ST, CoNLST without L_CLCS,
   CoNLST without mixup.
5. **Claims** C1-C5 of the spec: pseudo-label accuracy per confidence bin on the pool before
   (zero-shot model) and after stage 1 (CoNL-only, NL-CE), and target **test** accuracy (the
   paper's metric; macro-F1 alongside), intervals over targets x seeds.

Quick mode is sized for the 2-core machine: 2 targets, 3 seeds, a 2,000-verse pool, one masked
copy per verse, the sweeps on one seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xlt_fast.experiments.common import (Cell, Claim, all_of, largest_gap_languages, markdown, mean_ci, run_cells,
                                         sign_verdict, sizes, spearman, write_claims)
from xlt_fast.trainers import conlst as trainer, genre
from xlt_fast.training import default_cache, replace
from xlt_fast.training.plots import finish, grid as subplots

ARMS = ("self_training", "conl_only", "conlst", "nl_only", "nl_ce_st", "no_clcs", "no_mixup")
LABEL = {"zero_shot": "ZS", "self_training": "ST", "conl_only": "CoNL only (w/o ST)", "conlst": "CoNLST",
         "nl_only": "NL-CE only", "nl_ce_st": "NL-CE + ST (w/o CL)", "no_clcs": "w/o L_CLCS", "no_mixup": "w/o mixup"}
# Table 3 (mBERT, XNLI average accuracy; ZS from Table 1); ST alone was not run in the paper
PAPER = {"zero_shot": "65.4", "self_training": "-", "conl_only": "66.8", "conlst": "68.5", "nl_only": "-",
         "nl_ce_st": "65.3", "no_clcs": "65.5", "no_mixup": "67.3"}
STAGE1 = ("conl_lr", "temperature")
STAGE2 = ("st_lr", "flex_warmup")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One size of the experiment."""

    n_languages: int
    selection_verses: int
    seeds: tuple[int, ...]
    sweep_seeds: tuple[int, ...]
    stage1: tuple[tuple[float, float], ...]   # (conl_lr, temperature) candidates
    stage2: tuple[tuple[float, bool], ...]    # (st_lr, flex_warmup) candidates
    config: dict[str, Any]                    # CoNLSTConfig fields shared by every run
    arms: tuple[str, ...] = ARMS
    workers: int = 2


QUICK = Settings(n_languages=2, selection_verses=120, seeds=(0, 1, 2), sweep_seeds=(0,),
                 stage1=((2e-4, 0.1), (2e-4, 0.5), (1e-3, 0.5)), stage2=((1e-4, False), (5e-4, False), (5e-4, True)),
                 config=dict(n_source=0, n_target=2000, n_test=600, n_dev=600, n_source_eval=600, mask_copies=1))
FULL = Settings(n_languages=3, selection_verses=600, seeds=(0, 1, 2, 3, 4), sweep_seeds=(0, 1, 2),
                stage1=tuple((lr, t) for lr in (1e-5, 1e-4, 2e-4, 1e-3) for t in (0.1, 0.5)),
                stage2=tuple((lr, w) for lr in (1e-4, 5e-4, 1e-3) for w in (True, False)),
                config=dict(n_source=0, n_target=2000, n_test=600, n_dev=600, n_source_eval=1000, mask_copies=2))


def base_config(settings: Settings, target: str, **fields: Any) -> trainer.CoNLSTConfig:
    values = dict(target_lang=target, progress=False, plots=False, keep_checkpoints=0, log_every=10)
    return replace(trainer.CoNLSTConfig(), **{**values, **settings.config, **fields})


def _encode_all(cfg: trainer.CoNLSTConfig, progress: bool) -> None:
    """Encode every text the runs of a target read (pool, dev, test, masked pool copies) in one pass."""
    sets = genre.datasets(cfg)
    texts = [t for ds in sets.values() for t in ds.texts] + trainer.masked_texts(cfg, sets["target"])
    default_cache().get(list(dict.fromkeys(texts)), encoder=cfg.encoder, layers=(cfg.feature_layer,),
                        pooling=cfg.pooling, prefix=cfg.prefix, max_length=cfg.max_length, progress=progress)


def _choose(settings: Settings, lang: str, zs: dict[int, str], root: Path, progress: bool, variant: str,
            names: tuple[str, str], candidates: Sequence[tuple], fixed: dict[str, Any]) -> dict[str, Any]:
    """The candidate with the best mean target dev accuracy of ``variant`` over the sweep seeds."""
    cells = [Cell(f"{lang}/sweep-{variant}/{names[0]}{a}-{names[1]}{b}-s{seed}",
                  base_config(settings, lang, variant=variant, seed=seed, init_from=zs[seed],
                              **{names[0]: a, names[1]: b}, **fixed))
             for a, b in candidates for seed in settings.sweep_seeds]
    results = run_cells(trainer, cells, root, progress, f"{lang}: {variant} sweep (dev)", settings.workers)
    scores = {}
    for a, b in candidates:
        acc = [results[c.name].metrics["target_dev"]["accuracy"] for c in cells
               if (getattr(c.cfg, names[0]), getattr(c.cfg, names[1])) == (a, b)]
        scores[f"{a}/{b}"] = float(np.mean(acc))
    best = max(candidates, key=lambda ab: scores[f"{ab[0]}/{ab[1]}"])
    return {names[0]: best[0], names[1]: best[1], "dev_accuracy": scores}


def records(settings: Settings, lang: str, results: dict) -> list[dict[str, Any]]:
    """One record per seed: every arm's test accuracy / macro-F1 and pool pseudo-label bins."""
    out = []
    for seed in settings.seeds:
        get = {m: results[f"{lang}/{m}-s{seed}"] for m in ("zero_shot",) + settings.arms}
        out.append({"language": lang, "seed": seed,
                    "acc": {m: r.metrics["target_test"]["accuracy"] for m, r in get.items()},
                    "f1": {m: r.metrics["target_test"]["macro_f1"] for m, r in get.items()},
                    "pool": {m: r.metrics["pool"] for m, r in get.items()}})
    return out


# ----------------------------------------------------------------------------------- claims

def _pts(ci) -> str:
    return f"{100 * ci.mean:+.2f} points [{100 * ci.low:+.2f}, {100 * ci.high:+.2f}], n={ci.n}"


def _by_lang(recs: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(r["language"], []).append(r)
    return out


def _bin_delta(rs: Sequence[dict], arm: str, key: str) -> list[float]:
    """Per seed: the arm's pool value minus the zero-shot model's (seeds where a bin is empty are skipped)."""
    return [r["pool"][arm][key] - r["pool"]["zero_shot"][key] for r in rs
            if r["pool"][arm][key] is not None and r["pool"]["zero_shot"][key] is not None]


def _acc_delta(rs: Sequence[dict], arm: str, base: str) -> list[float]:
    return [r["acc"][arm] - r["acc"][base] for r in rs]


def claims(recs: Sequence[dict]) -> list[Claim]:
    """C1-C5 of spec C.3 (test accuracy; pool bins from the CoNL-only and NL-CE models)."""
    langs = _by_lang(recs)
    out = []
    # C1
    per_lang, passed = [], 0
    for lang, rs in langs.items():
        d = np.array(_bin_delta(rs, "conl_only", "acc_high"))
        sd = float(d.std(ddof=1)) if d.size > 1 else math.inf
        overall = float(np.mean(_bin_delta(rs, "conl_only", "accuracy")))
        ok = d.size > 0 and d.mean() > 2 * sd and overall >= 0
        passed += ok
        n0 = np.mean([r["pool"]["zero_shot"]["n_high"] for r in rs])
        n1 = np.mean([r["pool"]["conl_only"]["n_high"] for r in rs])
        gain = f"{100 * d.mean():+.1f} points (seed sd {100 * sd:.1f}" if d.size else "no > 0.9 bin to compare (empty"
        per_lang.append(f"{lang}: {gain}; n_high {n0:.0f} -> {n1:.0f}); overall {100 * overall:+.1f}")
    need = math.ceil(2 * len(langs) / 3)
    out.append(Claim("C1: after CoNL the pseudo-labels of the > 0.9 bin are more accurate (by > 2 seed sd, in >= 2/3 "
                     "of the targets) and the overall pseudo-label accuracy does not fall",
                     "Table 4: > 0.9 bin +3.3 (en) to +12.6 (ur) points; overall +0.8 to +1.9",
                     "; ".join(per_lang), "reproduced" if passed >= need else
                     "consistent" if passed > 0 else "not reproduced",
                     f"reproduced: >= {need} of {len(langs)} targets pass; consistent: at least one"))
    # C2
    zs_acc = [float(np.mean([r["pool"]["zero_shot"]["accuracy"] for r in rs])) for rs in langs.values()]
    gains = [float(np.mean(d)) if (d := _bin_delta(rs, "conl_only", "acc_high")) else math.nan
             for rs in langs.values()]
    rho = spearman(zs_acc, gains)[0] if len(langs) > 1 else math.nan
    pairs = ", ".join(f"{lang} (ZS pool acc {100 * a:.1f}: {100 * g:+.1f})" for lang, a, g in zip(langs, zs_acc, gains))
    out.append(Claim("C2: the gain is larger for targets with lower zero-shot accuracy",
                     "Table 4: en +3.3, fr +6.0, zh +6.6, ur +12.6 (lower ZS, larger gain)",
                     f"{pairs}; Spearman rho(ZS accuracy, gain) = {rho:+.2f} over {len(langs)} targets",
                     "reproduced" if len(langs) >= 3 and rho == -1 else "consistent" if rho < 0 else "not reproduced",
                     "reproduced: rho = -1 over >= 3 targets; consistent: rho < 0"))
    # C3
    d_nl = mean_ci(_bin_delta(recs, "nl_only", "acc_high"))
    d_conl = mean_ci(_bin_delta(recs, "conl_only", "acc_high"))
    d3 = mean_ci(_acc_delta(recs, "conlst", "nl_ce_st"))
    parts = [sign_verdict(d3, +1),
             "reproduced" if d_nl.mean <= 0 else "consistent" if d_nl.mean < d_conl.mean else "not reproduced"]
    out.append(Claim("C3: NL with CE only does not clean the high-confidence pseudo-labels, and NL-CE+ST < CoNLST",
                     "Fig. 4: NL-CE raises the high-confidence noise; Table 3: 65.3 vs 68.5",
                     f"> 0.9 bin after NL-CE {_pts(d_nl)} vs after CoNL {_pts(d_conl)}; CoNLST - NL-CE+ST "
                     f"{_pts(d3)}", all_of(parts),
                     "reproduced: NL-CE's > 0.9 bin change <= 0 and CoNLST - NL-CE+ST CI > 0; consistent: NL-CE's "
                     "change below CoNL's and the means in the paper's direction"))
    # C4
    d4 = mean_ci(_acc_delta(recs, "conlst", "self_training"))
    d4a = mean_ci(_acc_delta(recs, "conlst", "conl_only"))
    d4b = mean_ci(_acc_delta(recs, "conl_only", "zero_shot"))
    out.append(Claim("C4: CoNLST beats plain ST, and CoNLST > CoNL-only > ZS",
                     "Table 3: CoNLST 68.5 vs w/o ST 66.8 (+1.7) vs mBERT 65.4; ST alone not run (SL-* in Table 2)",
                     f"CoNLST - ST {_pts(d4)}; CoNLST - CoNL-only {_pts(d4a)}; CoNL-only - ZS {_pts(d4b)}",
                     all_of([sign_verdict(d4, +1), sign_verdict(d4a, +1), sign_verdict(d4b, +1)]),
                     "reproduced: all three CIs > 0; not reproduced: any mean <= 0"))
    # C5
    d5 = mean_ci(_acc_delta(recs, "conlst", "no_clcs"))
    multi = [rs for rs in langs.values() if len(rs) > 1]  # the seed sd needs two seeds of a target
    sd = {m: float(np.mean([np.std([r["acc"][m] for r in rs], ddof=1) for rs in multi])) if multi else math.nan
          for m in ("conlst", "no_clcs")}
    unstable = sd["no_clcs"] > sd["conlst"]
    out.append(Claim("C5: without L_CLCS CoNLST is less stable (a drop or a larger seed variance)",
                     "Table 3: 65.5 vs 68.5; Sec. 4.3 calls L_CLCS crucial",
                     f"CoNLST - w/o L_CLCS {_pts(d5)}; seed sd of test accuracy {100 * sd['conlst']:.2f} (CoNLST) vs "
                     f"{100 * sd['no_clcs']:.2f} (w/o L_CLCS)",
                     "reproduced" if d5.low > 0 else "consistent" if d5.mean > 0 or unstable else "not reproduced",
                     "reproduced: CoNLST - w/o CI > 0; consistent: mean > 0 or the larger seed sd"))
    return out


def ablation_table(recs: Sequence[dict]) -> list[dict[str, Any]]:
    """Table 3 analogue: test accuracy / macro-F1 of every arm per target (mean ± sd over seeds), the paper's beside."""
    rows = []
    for m in ("zero_shot",) + tuple(k for k in recs[0]["acc"] if k != "zero_shot"):
        row: dict[str, Any] = {"arm": LABEL[m], "paper (mBERT XNLI acc.)": PAPER[m]}
        for lang, rs in _by_lang(recs).items():
            acc = [100 * r["acc"][m] for r in rs]
            row[f"{lang} acc"] = float(np.mean(acc))
            row[f"{lang} acc sd"] = float(np.std(acc, ddof=1)) if len(acc) > 1 else math.nan
            row[f"{lang} F1"] = float(np.mean([100 * r["f1"][m] for r in rs]))
        rows.append(row)
    return rows


def bins_table(recs: Sequence[dict]) -> list[dict[str, Any]]:
    """Table 4 analogue: pool pseudo-label accuracy (count) per confidence bin, before and after stage 1."""
    rows = []
    for lang, rs in _by_lang(recs).items():
        for m, name in (("zero_shot", "before (ZS)"), ("conl_only", "after CoNL"), ("nl_only", "after NL-CE")):
            if m not in rs[0]["pool"]:
                continue
            row: dict[str, Any] = {"target": lang, "model": name}
            for b in trainer.BINS:
                acc = [r["pool"][m][f"acc_{b}"] for r in rs if r["pool"][m][f"acc_{b}"] is not None]
                n = np.mean([r["pool"][m][f"n_{b}"] for r in rs])
                row[f"{b} acc (n)"] = f"{100 * np.mean(acc):.1f} ({n:.0f})" if acc else f"- ({n:.0f})"
            row["overall acc"] = float(np.mean([100 * r["pool"][m]["accuracy"] for r in rs]))
            rows.append(row)
    return rows


COLORS = {"zero_shot": "black", "conl_only": "tab:blue", "nl_only": "tab:red"}


def plot(recs: Sequence[dict], path: Path) -> None:
    """Per target: pseudo-label accuracy and count per confidence bin before and after stage 1
    (Table 4 / Figs. 3-4 analogue); then every arm's test accuracy."""
    langs = _by_lang(recs)
    fig, axes = subplots(2 * len(langs) + 1, width=4.2, height=3.2)
    models = [m for m in ("zero_shot", "conl_only", "nl_only") if m in recs[0]["pool"]]
    names = {"zero_shot": "before (ZS)", "conl_only": "after CoNL", "nl_only": "after NL-CE"}
    x = np.arange(len(trainer.BINS))
    width = 0.8 / len(models)
    for j, (lang, rs) in enumerate(langs.items()):
        ax_acc, ax_n = axes[2 * j], axes[2 * j + 1]
        for i, m in enumerate(models):
            acc = [100 * np.mean(a) if (a := [r["pool"][m][f"acc_{b}"] for r in rs
                                              if r["pool"][m][f"acc_{b}"] is not None]) else np.nan
                   for b in trainer.BINS]  # an empty bin draws no bar
            n = [np.mean([r["pool"][m][f"n_{b}"] for r in rs]) for b in trainer.BINS]
            ax_acc.bar(x + i * width, acc, width, color=COLORS[m], label=names[m])
            ax_n.bar(x + i * width, n, width, color=COLORS[m], label=names[m])
        for ax, what in ((ax_acc, "pseudo-label accuracy (%)"), (ax_n, "pseudo-labels in the bin")):
            ax.set_xticks(x + 0.4 - width / 2, ["> 0.9", "0.5-0.9", "< 0.5"])
            ax.set_xlabel("confidence")
            ax.set_ylabel(what)
            ax.set_title(f"{lang}: {what}", fontsize=9)
        ax_acc.legend(fontsize=7)
    ax = axes[-1]
    arms = list(recs[0]["acc"])
    width = 0.8 / len(langs)
    for j, (lang, rs) in enumerate(langs.items()):
        acc = np.array([[100 * r["acc"][m] for m in arms] for r in rs])
        sd = acc.std(0, ddof=1) if len(rs) > 1 else None
        ax.bar(np.arange(len(arms)) + j * width, acc.mean(0), width, yerr=sd, capsize=2, label=lang)
        ax.axhline(acc.mean(0)[0], color=f"C{j}", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(arms)) + 0.4 - width / 2, [LABEL[m] for m in arms], rotation=35, ha="right",
                  fontsize=7)
    lo = min(100 * r["acc"][m] for r in recs for m in arms)
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title("test accuracy per arm (mean, seed sd; dashed: ZS)", fontsize=9)
    ax.legend(fontsize=7)
    finish(fig, path, "CoNLST: pseudo-label quality by confidence bin, before and after stage 1 "
                      "(frozen e5-small, Bible genres, en → target)")


NOTES = ("Notes: stage-1 (conl_lr, temperature) and stage-2 (st_lr, flex_warmup) were chosen on target **dev** "
         "accuracy of CoNL-only and of plain ST respectively; no choice read a test or pool label. The pool's labels "
         "are read only for the bin report. Intervals are t-intervals over targets x seeds, which share the pool "
         "and the zero-shot model per seed. The paper's numbers are mBERT on XNLI (3 classes, 15 languages); ours "
         "are frozen e5-small on 8 Bible genres, so only directions compare.")


def run(out_dir: str | Path, quick: bool = True, progress: bool = True, workers: int | None = None,
        settings: Settings | None = None) -> list[Claim]:
    """The whole experiment in ``out_dir`` (resumable: complete runs are reused); returns the claims."""
    settings = sizes(settings, QUICK if quick else FULL, workers)
    out = Path(out_dir)
    root = out / "runs"
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    targets, selection = largest_gap_languages(base_config(settings, "de"), settings.n_languages,
                                               settings.selection_verses, out, progress)
    times["language_selection_s"] = time.perf_counter() - t0
    recs, chosen = [], {}
    for lang in targets:
        t = time.perf_counter()
        _encode_all(base_config(settings, lang), progress)
        times[f"{lang}_encoding_s"] = time.perf_counter() - t
        t = time.perf_counter()
        zs_cells = [Cell(f"{lang}/zero_shot-s{seed}", base_config(settings, lang, variant="zero_shot", seed=seed,
                                                                  keep_checkpoints=1)) for seed in settings.seeds]
        zs_results = run_cells(trainer, zs_cells, root, progress, f"{lang}: zero-shot models", settings.workers)
        zs = {c.cfg.seed: zs_results[c.name].run_dir for c in zs_cells}
        s1 = _choose(settings, lang, zs, root, progress, "conl_only", STAGE1, settings.stage1, {})
        s2 = _choose(settings, lang, zs, root, progress, "self_training", STAGE2, settings.stage2, {})
        chosen[lang] = {"stage1": s1, "stage2": s2}
        fields = {k: s1[k] for k in STAGE1} | {k: s2[k] for k in STAGE2}
        times[f"{lang}_zero_shot_and_sweeps_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = [Cell(f"{lang}/{arm}-s{seed}", base_config(settings, lang, variant=arm, seed=seed, init_from=zs[seed],
                                                            **fields))
                 for seed in settings.seeds for arm in settings.arms]
        results = run_cells(trainer, cells, root, progress, f"{lang}: arms", settings.workers)
        results.update(zs_results)
        times[f"{lang}_arms_s"] = time.perf_counter() - t
        recs += records(settings, lang, results)
    out_claims = claims(recs)
    plot(recs, out / "conlst_pseudo_labels.png")
    times["total_s"] = time.perf_counter() - t0
    ablation, bins = ablation_table(recs), bins_table(recs)
    details = {"mode": "quick" if quick else "full", "settings": dataclasses.asdict(settings), "targets": targets,
               "language_selection": selection, "choices": chosen, "ablation": ablation, "bins": bins,
               "records": recs, "times": {k: round(v, 1) for k, v in times.items()}}
    picks = "; ".join(f"{lang}: conl_lr {c['stage1']['conl_lr']}, temperature {c['stage1']['temperature']}, "
                      f"st_lr {c['stage2']['st_lr']}, flex_warmup {c['stage2']['flex_warmup']}"
                      for lang, c in chosen.items())
    extra = (f"\nTargets: {', '.join(targets)} (largest zero-shot gap of {len(selection) - 1}). Chosen on dev: "
             f"{picks}.\n\nTarget test accuracy (%, mean ± sd over {len(settings.seeds)} seeds) and macro-F1 "
             f"(Table 3 analogue):\n\n{markdown(ablation, '{:.1f}')}\nPool pseudo-labels by confidence bin, "
             f"accuracy % (count) (Table 4 analogue):\n\n{markdown(bins, '{:.1f}')}\n{NOTES}\n")
    write_claims(out, "CoNLST (seed 004)", out_claims, details, extra)
    return out_claims
