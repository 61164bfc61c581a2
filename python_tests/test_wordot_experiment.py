"""The WordOT experiment: the verse bootstrap, the claim rules on constructed results (each verdict
reachable), and the whole grid end to end on a tiny random encoder (files written, runs reused)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from tiny_encoder import make_tiny_encoder
from xlt_fast.data.bible import load_parallel
from xlt_fast.data.words import moses_words
from xlt_fast.experiments import common, wordot as exp


def test_verse_bootstrap_resamples_whole_verses():
    verse, diff = [0, 0, 0, 1, 2, 2], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    draws = common.verse_bootstrap(verse, diff, 2000, seed=0)
    # a draw's mean is 3a / (3a + b + 2c) for a, b, c copies of verses 0, 1, 2: only these values occur
    possible = {3 * a / (3 * a + b + 2 * c) for a in range(4) for b in range(4) for c in range(4)
                if a + b + c == 3}
    assert all(min(abs(d - p) for p in possible) < 1e-12 for d in draws)
    from math import factorial

    expected = sum(factorial(3) / (factorial(a) * factorial(b) * factorial(c)) / 27 * 3 * a / (3 * a + b + 2 * c)
                   for a in range(4) for b in range(4) for c in range(4) if a + b + c == 3)
    assert np.mean(draws) == pytest.approx(expected, abs=0.02)


def _hits(rng, p, n=400):
    verse = np.repeat(np.arange(n // 4), 4).tolist()
    return {"verse": verse, "cosine": (rng.random(n) < p).astype(int).tolist(),
            "csls": (rng.random(n) < p).astype(int).tolist()}


def _results(word_gain, genre_gain, mix_gain, seeds=(0, 1, 2)):
    """Stage-1 and stage-2 results whose differences are the given ones."""
    rng = np.random.default_rng(0)
    base = {lang: _hits(rng, 0.5) for lang in exp.SEEN}
    stage1 = {"base": SimpleNamespace(info={"hits": base})}
    for arm, gain in (("wordot", word_gain), ("l2_cao", 0.0), ("mix_languages", word_gain + mix_gain)):
        hits = {}
        for lang, h in base.items():  # flip a share of the base's misses (or hits) into the other
            flip = rng.random(len(h["cosine"])) < abs(gain) * 2
            new = [1 if gain > 0 and f else 0 if gain < 0 and f else c for c, f in zip(h["cosine"], flip)]
            hits[lang] = {"verse": h["verse"], "cosine": new, "csls": new}
        stage1[f"align/{arm}"] = SimpleNamespace(info={"hits": hits})
    task = {}
    for arm, gain in (("base", 0.0), ("l2_cao", 0.0), ("wordot", genre_gain)):
        for s in seeds:
            f1 = 0.3 + 0.01 * s + gain
            task[f"task/{arm}-s{s}"] = SimpleNamespace(metrics={lang: {"genre_macro_f1": f1} for lang in
                                                                 ("en",) + exp.SEEN})
    return stage1, task


def test_claims_reproduced_when_the_data_say_so():
    settings = exp.QUICK
    claims = exp.claims(settings, *_results(word_gain=0.2, genre_gain=0.05, mix_gain=-0.1))
    assert [c.verdict for c in claims] == ["reproduced"] * 4


def test_claims_not_reproduced_or_consistent():
    settings = exp.QUICK
    claims = exp.claims(settings, *_results(word_gain=-0.2, genre_gain=-0.05, mix_gain=0.1))
    assert [c.verdict for c in claims] == ["not reproduced"] * 4
    null = exp.claims(settings, *_results(word_gain=0.0, genre_gain=0.0, mix_gain=0.0))
    assert null[2].verdict == "consistent" and "consistent with Table 5" in null[2].ours
    assert all(c.paper and c.ours and c.rule for c in claims)


def test_wordot_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("XLT_FAST_CACHE", str(tmp_path / "cache"))
    texts = []
    for lang in exp.SEEN + exp.UNSEEN:
        for split in ("train_a", "test"):
            pairs = load_parallel(lang, "en", split)
            texts += [" ".join(w) for w in moses_words(pairs.first[:300] + pairs.second[:300], lang)]
    tiny = str(make_tiny_encoder(tmp_path / "tiny", texts, layers=2, hidden=32))
    settings = exp.Settings(config=dict(encoder=tiny, n_pairs=32, batch_size=8, grad_accum=1, n_eval=24, n_task=64,
                                        task_batch_size=8), data_sizes=(16,), task_seeds=(0, 1), task_steps=4,
                            workers=1, n_boot=200)
    claims = exp.run(tmp_path / "out", progress=False, settings=settings)
    assert [c.claim[:3] for c in claims] == ["(a)", "(b)", "(c)", "(d)"]
    out = tmp_path / "out"
    md = (out / "claims.md").read_text()
    assert md.count("\n| (") == 4 and "| WordOT (pair) |" in md and "| WordOT, n = 16 |" in md
    details = json.loads((out / "details.json").read_text())
    assert [r["arm"] for r in details["stage1"]][0] == "base" and len(details["stage1"]) == 1 + len(exp.ARMS) + 1
    assert {r["steps"] for r in details["stage1"][1:]} == {4, 2}
    assert (out / "wordot.png").stat().st_size > 10_000
    assert len(list(out.glob("runs/**/results.json"))) == 1 + len(exp.ARMS) + 1 + 3 * 2
    again = exp.run(tmp_path / "out", progress=False, settings=settings)  # every run is reused
    assert [c.ours for c in again] == [c.ours for c in claims]
