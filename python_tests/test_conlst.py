"""The CoNLST trainer (xlt_fast.trainers.conlst; spec shared/specs/iwda_conlst.md B, C.3, D.14-23)
on tiny configs of the real task (frozen e5-small features of Bible verses, Korean target): every
variant trains its phases; the pieces of a step on hand-built inputs (Eq. 4's complementary labels,
Eq. 5's negatives, Eq. 1's random complementary label, FlexMatch thresholds, Table 4's bins, the
masked and mixup strong views); one CoNL step's loss against the dense reference with every index
traced back to the pool; the edge cases (no confident sample, K above the confident set); resume
and init_from equal one uninterrupted run; bad configs fail early, naming the field."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xlt_fast
from xlt_fast import reference
from xlt_fast.data import GENRES
from xlt_fast.trainers import conlst, iwda
from xlt_fast.training import ConfigError, State, checkpoint, replace

pytestmark = pytest.mark.usefixtures("one_thread")

K = len(GENRES)
# gamma 0.3: after 4 short zero-shot epochs about 60 of the 256 pool verses are "confident", so
# stage 1 has negatives (at the default 0.9 this tiny model has none: the gamma = 1 test covers that)
TINY = dict(n_source=320, n_target=256, n_test=64, n_dev=64, n_source_eval=64, batch_size=32, zs_epochs=4.0,
            zs_lr=3e-3, gamma=0.3, mask_copies=1, st_iterations=2, progress=False, plots=False, target_lang="ko",
            log_every=1)
POOL = 256
STEPS = {"zs": 4 * 320 // 32, "conl": POOL // 32, "nl": POOL // 32, "st": 2 * POOL // 32}  # 40, 8, 8, 16
PHASES = {"zero_shot": ["zs"], "conlst": ["zs", "conl", "st"], "conl_only": ["zs", "conl"], "nl_only": ["zs", "nl"],
          "nl_ce_st": ["zs", "nl", "st"], "no_clcs": ["zs", "conl", "st"], "no_mixup": ["zs", "conl", "st"],
          "self_training": ["zs", "st"]}
POOL_KEYS = {"accuracy", "high_confidence"} | {f"{p}_{b}" for p in ("n", "acc", "noise_share") for b in conlst.BINS}


def _cfg(root, name, **kw):
    return replace(conlst.CoNLSTConfig(), **{**TINY, "output_dir": str(Path(root) / name), **kw})


def _rows(run_dir, split=None):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def _modules(run_dir):
    path = checkpoint.latest(Path(run_dir) / "checkpoints") / "state.pt"
    return torch.load(path, weights_only=True)["modules"]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs shared by several tests, each trained once (lazily): name -> (cfg, Result)."""
    root, done = tmp_path_factory.mktemp("conlst"), {}

    def run(name, **kw):
        if name not in done:
            cfg = _cfg(root, name, **kw)
            done[name] = (cfg, conlst.train(cfg))
        return done[name]
    return run


# ------------------------------------------------------------------------------ every variant

def _finite_numbers(row):
    return all(math.isfinite(v) for k, v in row.items() if isinstance(v, float) and k != "time_s")


@pytest.mark.parametrize("variant", list(PHASES))
def test_every_variant_trains_its_phases(runs, variant):
    cfg, result = runs(variant, variant=variant)
    names = conlst.phase_names(cfg)
    assert names == PHASES[variant]
    assert result.steps == sum(STEPS[n] for n in names)
    train = _rows(result.run_dir, "train")
    assert [r["phase"] for r in train] == [n for n in names for _ in range(STEPS[n])]  # log_every = 1
    assert all(_finite_numbers(r) for r in train)
    for split in ("source_dev", "target_dev", "target_test"):
        m = result.metrics[split]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    pool = result.metrics["pool"]
    assert set(pool) == POOL_KEYS and 0 <= pool["high_confidence"] <= POOL
    assert sum(pool[f"n_{b}"] for b in conlst.BINS) == POOL
    for b in conlst.BINS:
        assert (pool[f"acc_{b}"] is None) == (pool[f"n_{b}"] == 0)
        assert pool[f"acc_{b}"] is None or 0 <= pool[f"acc_{b}"] <= 1
    if pool["accuracy"] < 1:
        assert sum(pool[f"noise_share_{b}"] for b in conlst.BINS) == pytest.approx(1)
    assert result.info["pool_size"] == POOL and result.info["source_size"] == 320
    saved = _modules(result.run_dir)
    stage1 = conlst.STAGE1.get(variant)
    assert ("con" in saved) == (stage1 == "conl")  # theta_con exists only where L_CL is trained
    if stage1:
        rows = [r for r in train if r["phase"] == stage1]
        keys = {"conl": {"loss", "cl", "negatives", "no_negative"}, "nl": {"loss", "nl"}}[stage1]
        keys |= set() if variant == "no_clcs" else {"clcs"}
        assert all(keys <= set(r) for r in rows) and ("clcs" in rows[0]) == (variant != "no_clcs")
        # stage 1 labels the pool on entry with the zero-shot model in eval mode: the zero-shot
        # evaluation's pool report, to the bit
        enter = _rows(result.run_dir, "enter")
        assert len(enter) == 1 and enter[0]["phase"] == stage1
        zs_pool = next(r for r in _rows(result.run_dir, "pool") if r["phase"] == "zs")
        assert enter[0]["high_confidence"] == zs_pool["high_confidence"] > 0
        assert all(enter[0][f"pool_{k}"] == zs_pool[k] for k in POOL_KEYS - {"high_confidence"})
    if "st" in names:
        rows = [r for r in train if r["phase"] == "st"]
        # relabelled at the start of every iteration
        assert ["kept" in r for r in rows] == [i % STEPS["conl"] == 0 for i in range(STEPS["st"])]
        assert all(0 < r["kept"] <= 1 for r in rows if "kept" in r)
        # the saved selection is the FlexMatch rule on the saved pseudo-labels; a class nobody
        # predicts above tau has threshold 0, so all of its samples are kept
        lab = saved["labels"]
        t = conlst.flexmatch_thresholds(lab["confidence"], lab["label"], K, cfg.flex_tau, cfg.flex_warmup)
        assert torch.equal(lab["selected"], lab["confidence"] >= t[lab["label"]])
        unconfident = torch.bincount(lab["label"][lab["confidence"] > cfg.flex_tau], minlength=K) == 0
        assert (t[unconfident] == 0).all()
        assert lab["selected"][unconfident[lab["label"]]].all()


# -------------------------------------------------------------------- hand-built inputs

def _labels(label, least, confidence):
    lab = conlst.PseudoLabels(len(label))
    lab.label.copy_(torch.tensor(label))
    lab.least.copy_(torch.tensor(least))
    lab.confidence.copy_(torch.tensor(confidence))
    return lab


def test_pseudo_labels_hold_argmax_argmin_and_confidence():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    lab = conlst.PseudoLabels(2)
    lab.set(logits)
    q = torch.softmax(logits, 1)
    assert lab.label.tolist() == [0, 1] and lab.least.tolist() == [2, 0]
    torch.testing.assert_close(lab.confidence, q.max(1).values)
    assert set(lab.state_dict()) == {"label", "least", "confidence", "selected"}  # saved in checkpoints


def test_complementary_labels_follow_eq4():
    lab = _labels([2, 0, 5, 7], [1, 3, 0, 6], [0.95, 0.9, 0.3, 0.89])
    idx = torch.tensor([3, 0, 1, 2, 0])
    out = conlst.complementary(lab, idx, 0.9, K)
    assert out.shape == (5, K) and out.dtype == torch.bool
    every = torch.ones(K, dtype=torch.bool)
    expected = torch.stack([F.one_hot(torch.tensor(6), K).bool(),        # 0.89 < gamma: only argmin q
                            every.scatter(0, torch.tensor([2]), False),  # confident: all but its label
                            every.scatter(0, torch.tensor([0]), False),  # max q == gamma counts as confident
                            F.one_hot(torch.tensor(0), K).bool(),
                            every.scatter(0, torch.tensor([2]), False)])
    assert torch.equal(out, expected)
    assert torch.equal(conlst.complementary(lab, idx, 1.0, K).sum(1), torch.ones(5, dtype=torch.long))
    assert (conlst.complementary(lab, idx, 0.0, K).sum(1) == K - 1).all()


def _candidates():
    """Pool indices 100..111 with pseudo-labels 0,0,0,1,1,1,2,2,3,3,3,3."""
    return torch.arange(100, 112), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3])


def test_negatives_have_allowed_labels_no_repeats_and_mask_the_shortfall():
    cand, cand_labels = _candidates()
    allowed = torch.zeros(5, K, dtype=torch.bool)
    allowed[0, [1, 2, 3]] = True  # 9 candidates
    allowed[1, 2] = True          # 2 candidates < k
    allowed[2, 3] = True          # exactly 4 = k
    allowed[3, 7] = True          # a class nobody holds: none
    allowed[4] = True             # all 12
    gen = torch.Generator().manual_seed(0)
    label_of = dict(zip(cand.tolist(), cand_labels.tolist()))
    for _ in range(50):
        idx, mask = conlst.sample_negatives(allowed, cand, cand_labels, 4, gen)
        assert idx.shape == mask.shape == (5, 4) and idx.dtype == torch.long and mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [4, 2, 4, 0, 4]  # False exactly where fewer than k exist
        for row in range(5):
            picked = idx[row][mask[row]].tolist()
            assert len(set(picked)) == len(picked)
            assert all(p in label_of and allowed[row, label_of[p]] for p in picked)
        assert sorted(idx[1][mask[1]].tolist()) == [106, 107] and sorted(idx[2].tolist()) == [108, 109, 110, 111]


def test_negatives_with_k_above_the_candidates_or_none_at_all():
    cand, cand_labels = _candidates()
    allowed = torch.ones(3, K, dtype=torch.bool)
    allowed[1] = False
    allowed[1, 0] = True
    idx, mask = conlst.sample_negatives(allowed, cand, cand_labels, 20, torch.Generator().manual_seed(1))
    assert idx.shape == (3, 20) and mask.sum(1).tolist() == [12, 3, 12]
    assert sorted(idx[0][mask[0]].tolist()) == cand.tolist()  # every candidate once, then padding
    assert not mask[:, 12:].any()
    empty = torch.empty(0, dtype=torch.long)
    idx, mask = conlst.sample_negatives(allowed, empty, empty, 5, torch.Generator().manual_seed(1))
    assert idx.shape == (3, 5) and not mask.any()


def test_negatives_are_uniform_without_replacement():
    """Every 3-subset of 8 allowed candidates equally likely: chi-square over the 56 subsets (and over
    single candidates) at a fixed generator, bounded by mean + 6 sd of the chi-square law."""
    cand, cand_labels = _candidates()
    draws = 28_000
    allowed = torch.zeros(draws, K, dtype=torch.bool)
    allowed[:, [0, 1, 2]] = True  # the 8 candidates 100..107
    idx, mask = conlst.sample_negatives(allowed, cand, cand_labels, 3, torch.Generator().manual_seed(2))
    assert mask.all()
    ones = torch.bincount(idx.flatten() - 100, minlength=12)[:8].double()
    e1 = draws * 3 / 8
    assert ((ones - e1) ** 2 / e1).sum() < 7 + 6 * math.sqrt(2 * 7)
    subsets = {}
    for row in idx.sort(1).values.tolist():
        subsets[tuple(row)] = subsets.get(tuple(row), 0) + 1
    assert len(subsets) == 56
    e = draws / 56
    chi2 = sum((c - e) ** 2 / e for c in subsets.values())
    assert chi2 < 55 + 6 * math.sqrt(2 * 55)


def test_random_complementary_never_the_label_and_covers_the_rest():
    y = torch.randint(K, (40_000,), generator=torch.Generator().manual_seed(3))
    ybar = conlst.random_complementary(y, K, torch.Generator().manual_seed(4))
    assert ybar.dtype == torch.long and ((ybar >= 0) & (ybar < K)).all() and not (ybar == y).any()
    counts = torch.zeros(K, K)
    counts.index_put_((y, ybar), torch.ones(len(y)), accumulate=True)
    for c in range(K):
        others = torch.cat([counts[c, :c], counts[c, c + 1:]])
        assert (others > 0).all()
        e = others.sum() / (K - 1)
        assert ((others - e).abs() < 6 * e.sqrt()).all()  # about uniform over the K - 1 others


def test_flexmatch_thresholds_by_hand():
    # tau 0.95: confident are samples 0, 1, 5 (class 0) and 2 (class 1): sigma = [3, 1, 0, ...], N = 10
    conf = torch.tensor([0.99, 0.97, 0.96, 0.5, 0.3, 0.98, 0.95, 0.2, 0.6, 0.7])
    pred = torch.tensor([0, 0, 1, 1, 2, 0, 2, 3, 3, 3])  # sample 6 at exactly tau is not confident
    warm = conlst.flexmatch_thresholds(conf, pred, 4, 0.95, warmup=True)
    # warm-up: beta = sigma / max(3, 10 - 4) = [1/2, 1/6, 0, 0]; T = beta / (2 - beta) * tau
    torch.testing.assert_close(warm, torch.tensor([0.5 / 1.5, (1 / 6) / (11 / 6), 0.0, 0.0]) * 0.95)
    plain = conlst.flexmatch_thresholds(conf, pred, 4, 0.95, warmup=False)
    torch.testing.assert_close(plain, torch.tensor([1.0, (1 / 3) / (5 / 3), 0.0, 0.0]) * 0.95)
    # mostly confident: the largest class sets the scale either way, and it gets tau itself
    conf2, pred2 = torch.tensor([0.99, 0.99, 0.99, 0.99, 0.1]), torch.tensor([0, 0, 0, 1, 1])
    for w in (True, False):
        torch.testing.assert_close(conlst.flexmatch_thresholds(conf2, pred2, 3, 0.9, warmup=w),
                                   torch.tensor([0.9, (1 / 3) / (5 / 3) * 0.9, 0.0]))
    # nobody confident: every threshold 0 (every sample kept), no division by zero
    assert torch.equal(conlst.flexmatch_thresholds(torch.full((6,), 0.4), torch.arange(6) % 3, 3, 0.95),
                       torch.zeros(3))


def test_confidence_bins_by_hand():
    conf = torch.tensor([0.95, 0.91, 0.9, 0.5, 0.7, 0.49, 0.2, 0.99])  # 0.9 and 0.5 fall in the middle bin
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    pred = torch.tensor([0, 2, 2, 0, 4, 0, 0, 7])  # wrong: 1 (high), 3 (mid), 5, 6 (low)
    out = conlst.confidence_bins(conf, pred, y)
    assert out == {"accuracy": 0.5, "n_high": 3, "acc_high": pytest.approx(2 / 3), "noise_share_high": 0.25,
                   "n_mid": 3, "acc_mid": pytest.approx(2 / 3), "noise_share_mid": 0.25,
                   "n_low": 2, "acc_low": 0.0, "noise_share_low": 0.5}
    right = conlst.confidence_bins(conf[:5], y[:5], y[:5])  # all correct, no low bin
    assert right["accuracy"] == 1.0 and right["n_low"] == 0 and right["acc_low"] is None
    assert all(right[f"noise_share_{b}"] == 0 for b in conlst.BINS)
    assert right["n_high"] == 2 and right["n_mid"] == 3


def test_mask_words_rate_at_least_one_and_seeded():
    text = " ".join(f"w{i}" for i in range(200))
    out = conlst.mask_words(text, 0.15, "<mask>", seed=7)
    assert out == conlst.mask_words(text, 0.15, "<mask>", seed=7)
    assert out != conlst.mask_words(text, 0.15, "<mask>", seed=8)
    words, orig = out.split(), text.split()
    assert len(words) == 200 and all(w == o for w, o in zip(words, orig) if w != "<mask>")
    rates = [conlst.mask_words(text, 0.15, "<mask>", seed=s).split().count("<mask>") / 200 for s in range(50)]
    assert 0.05 < rates[0] < 0.3 and abs(np.mean(rates) - 0.15) < 0.015
    for s in range(20):  # a tiny rate on a short verse still masks exactly one word
        assert conlst.mask_words("a b c d e", 1e-6, "[M]", seed=s).split().count("[M]") == 1
    assert conlst.mask_words("", 0.5, "<mask>", seed=0) == ""


def test_masked_copies_depend_on_the_verse_not_the_pool():
    cfg = replace(conlst.CoNLSTConfig(), mask_copies=2, mask_rate=0.3)
    texts = [f"verse {i} has some words in it" for i in range(6)]
    full = SimpleNamespace(texts=texts, ids=[f"id{i}" for i in range(6)])
    part = SimpleNamespace(texts=texts[3:0:-1], ids=[f"id{i}" for i in (3, 2, 1)])
    a, b = conlst.masked_texts(cfg, full), conlst.masked_texts(cfg, part)
    assert len(a) == 12 and len(b) == 6  # copy-major
    for c in range(2):
        assert [a[6 * c + i] for i in (3, 2, 1)] == b[3 * c:3 * c + 3]
    assert a[:6] != a[6:] and all("<mask>" in t for t in a)
    assert conlst.masked_texts(replace(cfg, data_seed=1), full) != a


def _view_state(n=8, d=12, copies=2):
    x = torch.eye(n, d)  # sample i is the basis vector e_i, so a mix is read off its coordinates
    masked = torch.stack([x + 10.0 * (c + 1) for c in range(copies)])
    lab = conlst.PseudoLabels(n)
    lab.label.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])[:n] % K)
    return State(modules={"labels": lab}, generators={"st": torch.Generator().manual_seed(5)},
                 data=SimpleNamespace(target=SimpleNamespace(inputs=x), masked=masked))


def test_mixup_views_are_convex_combinations_with_soft_targets():
    cfg = replace(conlst.CoNLSTConfig(), strong_views=["mixup"])
    state = _view_state()
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3, 3, 6, 0] * 4)  # kept samples are drawn with replacement
    torch.manual_seed(0)  # the Beta draw uses the global RNG
    x_before = state.data.target.inputs.clone()
    out_x, out_y = conlst.strong_view(cfg, state, idx)
    assert torch.equal(state.data.target.inputs, x_before)
    coef = out_x[:, :8]
    assert (coef >= 0).all() and torch.allclose(coef.sum(1), torch.ones(len(idx))) and (out_x[:, 8:] == 0).all()
    assert (coef[torch.arange(len(idx)), idx] > 0).all()  # each view holds its own sample (lambda > 0)
    assert (coef.gt(0).sum(1) <= 2).all() and (coef.max(1).values < 0.99).any()
    onehot = F.one_hot(state.modules["labels"].label, K).float()
    torch.testing.assert_close(out_y, coef @ onehot)  # y~ = lambda y_i + (1 - lambda) y_j with the same lambda
    assert torch.allclose(out_y.sum(1), torch.ones(len(idx))) and (out_y >= 0).all()


def test_mask_views_are_precomputed_copies_with_hard_targets_and_both_views_mix():
    state = _view_state()
    idx = torch.arange(8).repeat(8)
    onehot = F.one_hot(state.modules["labels"].label, K).float()
    masked = state.data.masked
    out_x, out_y = conlst.strong_view(replace(conlst.CoNLSTConfig(), strong_views=["mask"], mask_copies=2), state, idx)
    copy = [next(c for c in range(2) if torch.equal(out_x[r], masked[c, idx[r]])) for r in range(len(idx))]
    assert set(copy) == {0, 1} and torch.equal(out_y, onehot[idx])
    torch.manual_seed(0)
    both = replace(conlst.CoNLSTConfig(), strong_views=["mask", "mixup"], mask_copies=2)
    out_x, out_y = conlst.strong_view(both, state, idx)
    is_mask = torch.tensor([any(torch.equal(out_x[r], masked[c, idx[r]]) for c in range(2)) for r in range(len(idx))])
    assert 0 < is_mask.sum() < len(idx)  # one view per sample, both drawn
    torch.testing.assert_close(out_y[is_mask], onehot[idx[is_mask]])
    coef = out_x[~is_mask, :8]
    assert torch.allclose(coef.sum(1), torch.ones(int((~is_mask).sum()))) and (coef >= 0).all()


def test_variant_switches():
    base = conlst.CoNLSTConfig()
    assert conlst.views(base) == ["mask", "mixup"]
    assert conlst.views(replace(base, variant="no_mixup")) == ["mask"]
    assert conlst.views(replace(base, variant="no_mixup", strong_views=["mixup", "mask"])) == ["mask"]
    assert conlst.lambda_clcs(base) == 1e-3 and conlst.lambda_clcs(replace(base, variant="no_clcs")) == 0.0
    for variant, names in PHASES.items():
        assert conlst.phase_names(replace(base, variant=variant)) == names
        assert conlst.phase_names(replace(base, variant=variant, init_from="/some/run")) == names[1:]


# ------------------------------------------------------------------------------- the CoNL step

def test_conl_step_is_eq6_on_traced_negatives(tmp_path, monkeypatch):
    """Dropout 0 (so the two views and the pool's features are recomputable): every step's
    anchors are theta_con(g(x)) of the step's pool batch, the candidates are the pool's confident
    samples, the complementary sets are Eq. 4's, the pool rows are the features of the sampled
    negatives (indices traced back through the unique/inverse map), and the loss equals the
    dense fp64 reference on the gathered negatives, which the log reports."""
    seen, real_nc, real_sn, real_step = [], xlt_fast.negative_contrastive, conlst.sample_negatives, conlst._conl_step
    live = {}

    def step(cfg, state, ctx):
        live["state"] = state
        return real_step(cfg, state, ctx)

    def sample(allowed, candidates, candidate_labels, k, gen):
        neg, mask = real_sn(allowed, candidates, candidate_labels, k, gen)
        live["sampled"] = (allowed, candidates, candidate_labels, k, neg, mask)
        return neg, mask

    def contrastive(anchor, positive, index, temperature, metric, *, pool=None, negative_mask=None, check_finite=True):
        out = real_nc(anchor, positive, index, temperature, metric, pool=pool, negative_mask=negative_mask,
                      check_finite=check_finite)
        state, cfg = live["state"], live["cfg"]
        allowed, candidates, candidate_labels, k, neg, mask = live["sampled"]
        lab, model, con = state.modules["labels"], state.modules["model"], state.modules["con"]
        stream = state.streams["conl/target"]
        anchors = stream.global_batch(stream.position - 1)
        with torch.no_grad():
            def h(rows):
                return F.normalize(con(model(state.data.target.inputs[rows])[0]), dim=1)
            torch.testing.assert_close(anchor, h(anchors))
            torch.testing.assert_close(positive, h(anchors))
            assert torch.equal(candidates, (lab.confidence >= cfg.gamma).nonzero().flatten())
            assert torch.equal(candidate_labels, lab.label[candidates]) and k == cfg.negatives
            assert torch.equal(allowed, conlst.complementary(lab, anchors, cfg.gamma, K))
            assert torch.equal(negative_mask, mask)
            rows, cols = mask.nonzero(as_tuple=True)
            assert allowed[rows, lab.label[neg[rows, cols]]].all()
            if mask.any():
                unique = torch.unique(neg[mask])
                assert pool.shape[0] == len(unique) and torch.equal(unique[index[mask]], neg[mask])
                torch.testing.assert_close(pool, h(unique))
                ref = reference.negative_contrastive(anchor.double(), positive.double(), pool.double()[index],
                                                     temperature, metric, negative_mask=mask)
                torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
            else:
                assert out.item() == 0.0
        seen.append((out.item(), int(mask.sum())))
        return out

    monkeypatch.setattr(conlst, "_conl_step", step)
    monkeypatch.setattr(conlst, "sample_negatives", sample)
    monkeypatch.setattr(xlt_fast, "negative_contrastive", contrastive)
    cfg = _cfg(tmp_path, "traced", variant="conl_only", dropout=0.0)
    live["cfg"] = cfg
    result = conlst.train(cfg)
    assert len(seen) == STEPS["conl"] and result.steps == STEPS["zs"] + STEPS["conl"]
    assert any(n > 0 for _, n in seen) and all(cl > 0 for cl, n in seen if n > 0)
    logged = [r for r in _rows(result.run_dir, "train") if r["phase"] == "conl"]
    assert [r["cl"] for r in logged] == [cl for cl, _ in seen]
    assert [r["negatives"] * cfg.batch_size for r in logged] == pytest.approx([n for _, n in seen])


def test_lclcs_is_the_only_path_to_the_classifier_head(runs, tmp_path):
    """Stage 1 with lambda = 0 leaves theta_cl (h) exactly as the zero-shot model had it and
    moves g and theta_con; with lambda > 0 h moves too (spec B.2 step 2d)."""
    _, zs = runs("zero_shot", variant="zero_shot")
    before = _modules(zs.run_dir)["model"]
    off = conlst.train(_cfg(tmp_path, "off", variant="conl_only", lambda_clcs=0.0, init_from=zs.run_dir))
    on = conlst.train(_cfg(tmp_path, "on", variant="conl_only", init_from=zs.run_dir))
    after_off, after_on = _modules(off.run_dir)["model"], _modules(on.run_dir)["model"]
    for k in ("h.weight", "h.bias"):
        assert torch.equal(after_off[k], before[k]) and not torch.equal(after_on[k], before[k])
    assert not torch.equal(after_off["g.0.weight"], before["g.0.weight"])
    assert all("clcs" not in r for r in _rows(off.run_dir, "train"))


# ---------------------------------------------------------------------------------- edge cases

def test_no_confident_sample_means_no_negatives_and_cl_zero(tmp_path):
    """gamma = 1: no pool sample is confident, so no anchor has a negative (defined behaviour:
    L_CL = 0 exactly, no NaN), and the run still completes both stages."""
    result = conlst.train(_cfg(tmp_path, "g1", variant="conlst", gamma=1.0))
    assert result.steps == STEPS["zs"] + STEPS["conl"] + STEPS["st"]
    enter = _rows(result.run_dir, "enter")[0]
    assert enter["high_confidence"] == 0 and result.metrics["pool"]["high_confidence"] == 0
    rows = [r for r in _rows(result.run_dir, "train") if r["phase"] == "conl"]
    assert all(r["cl"] == 0.0 and r["negatives"] == 0.0 and r["no_negative"] == 1.0 for r in rows)
    assert all(math.isfinite(r["loss"]) and r["clcs"] > 0 for r in rows)
    saved = _modules(result.run_dir)
    assert all(torch.isfinite(v).all() for m in ("model", "con") for v in saved[m].values())


def test_more_negatives_than_confident_samples(tmp_path):
    """K = 500 > the ~60 confident samples of the pool: every anchor gets at most all of them (the rest
    masked) and the loss stays finite."""
    result = conlst.train(_cfg(tmp_path, "k500", variant="conl_only", negatives=500))
    high = _rows(result.run_dir, "enter")[0]["high_confidence"]
    assert 0 < high < 500
    rows = [r for r in _rows(result.run_dir, "train") if r["phase"] == "conl"]
    assert all(math.isfinite(r["cl"]) and 0 <= r["negatives"] <= high for r in rows)
    assert any(r["negatives"] > 0 and r["cl"] > 0 for r in rows)
    assert all(torch.isfinite(v).all() for v in _modules(result.run_dir)["model"].values())


# ---------------------------------------------------------------------- resume and init_from

def test_resume_inside_both_stages_equals_uninterrupted(runs, tmp_path):
    """Stopped inside CoNL (step 46; last checkpoint at 44) and inside self-training (step 58; the
    checkpoint at 56 ends the first iteration, so the resumed run relabels the pool first)."""
    _, full = runs("conlst", variant="conlst")
    part = _cfg(tmp_path, "part", variant="conlst", checkpoint_every=4)
    assert conlst.train(part, stop_after=46) is None
    assert json.loads((checkpoint.latest(tmp_path / "part" / "checkpoints") / "progress.json").read_text())[
        "phase"] == "conl"
    assert conlst.train(part, resume=True, stop_after=58) is None
    resumed = conlst.train(part, resume=True)
    assert resumed.steps == full.steps
    a, b = _modules(full.run_dir), _modules(resumed.run_dir)
    assert set(a) == set(b) == {"model", "labels", "con"}
    for m in a:
        _same(a[m], b[m])
    assert resumed.metrics == full.metrics


def test_init_from_a_zero_shot_run_equals_one_run(runs, tmp_path):
    """zero_shot run + conlst(init_from) == conlst in one run, bit for bit: each phase reseeds the
    global RNG on entry, streams and generators are seeded by name."""
    _, one = runs("conlst", variant="conlst")
    _, zs = runs("zero_shot", variant="zero_shot")
    two = conlst.train(_cfg(tmp_path, "two", variant="conlst", init_from=zs.run_dir))
    assert two.steps == STEPS["conl"] + STEPS["st"]
    a, b = _modules(one.run_dir), _modules(two.run_dir)
    assert a.keys() == b.keys()
    for m in a:
        _same(a[m], b[m])
    assert one.metrics == two.metrics
    again = conlst.train(_cfg(tmp_path, "eval", variant="zero_shot", init_from=zs.run_dir))
    assert again.steps == 0 and again.metrics == zs.metrics  # only evaluates the loaded model


def test_init_from_rejects_what_it_cannot_continue(runs, tmp_path):
    _, zs = runs("zero_shot", variant="zero_shot")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="init_from: .* is not a finished run with a checkpoint"):
        conlst.train(_cfg(tmp_path, "a", variant="conl_only", init_from=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"init_from: .*differing fields: \['hidden'\]"):
        conlst.train(_cfg(tmp_path, "b", variant="conl_only", hidden=64, init_from=zs.run_dir))
    pruned = conlst.train(_cfg(tmp_path, "pruned", variant="zero_shot", zs_epochs=0.1, keep_checkpoints=0))
    with pytest.raises(ConfigError, match="init_from: .*keep_checkpoints >= 1"):
        conlst.train(_cfg(tmp_path, "c", variant="conl_only", init_from=pruned.run_dir))


def test_init_from_an_iwda_run(tmp_path):
    """A post-training step on another method's model (CoNLST-RS/-MT): an IWDA run with the same
    model settings is accepted, and zero_shot(init_from) reports exactly the IWDA model's accuracy."""
    shared = {k: TINY[k] for k in ("n_source", "n_target", "n_test", "n_dev", "n_source_eval", "batch_size",
                                   "progress", "plots", "target_lang")}
    src = iwda.train(replace(iwda.IWDAConfig(), **shared, variant="zero_shot", zs_epochs=1.0,
                             output_dir=str(tmp_path / "iwda")))
    ev = conlst.train(_cfg(tmp_path, "eval", variant="zero_shot", init_from=src.run_dir))
    assert ev.steps == 0
    for split in ("target_test", "target_dev", "source_dev"):
        for key in ("accuracy", "macro_f1"):
            assert ev.metrics[split][key] == src.metrics[split][key]
    post = conlst.train(_cfg(tmp_path, "post", variant="conl_only", init_from=src.run_dir))
    assert post.steps == STEPS["conl"]


# ----------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("fields,message", [
    (dict(mode="finetune"), "mode: the CoNLST trainer runs on frozen features"),
    (dict(variant="no_mixup", strong_views=["mixup"]), "strong_views: no_mixup removes mixup"),
    (dict(strong_views=["mask", "backtranslation"]), "strong_views: one or more distinct views of"),
    (dict(strong_views=[]), "strong_views: one or more distinct views of"),
    (dict(n_target=48, batch_size=32), r"n_target: the pool must hold at least two batches \(2 x 32\)"),
    (dict(gamma=1.5), "gamma"),
    (dict(negatives=0), "negatives"),
])
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        replace(conlst.CoNLSTConfig(), **fields)


# ------------------------------------------------------------------------ repeated view names

def test_no_mixup_with_only_repeated_mixup_is_a_config_error():
    try:
        cfg = replace(conlst.CoNLSTConfig(), variant="no_mixup", strong_views=["mixup", "mixup"])
    except ConfigError as exc:
        assert "strong_views" in str(exc)
        return
    assert conlst.views(cfg), "accepted, but the variant has no strong view left"


def test_repeated_view_names_leave_no_sample_unaugmented():
    try:
        cfg = replace(conlst.CoNLSTConfig(), strong_views=["mask", "mask"], mask_copies=2)
    except ConfigError as exc:
        assert "strong_views" in str(exc)
        return
    state = _view_state()
    idx = torch.arange(8).repeat(4)
    out_x, _ = conlst.strong_view(cfg, state, idx)
    original = [r for r in range(len(idx)) if torch.equal(out_x[r], state.data.target.inputs[idx[r]])]
    assert not original, f"{len(original)} of {len(idx)} samples got no strong view"
