"""xlt_fast.metrics against independent computations (sklearn, scipy, explicit loops) and small
cases whose expected values are derived here."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from xlt_fast import metrics
from xlt_fast.data import formats


def test_accuracy_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        t, p = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
        assert metrics.accuracy(t, p) == pytest.approx(accuracy_score(t, p))
        assert metrics.macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro"))
        assert metrics.macro_f1(torch.from_numpy(t), p, labels=range(8)) == pytest.approx(
            f1_score(t, p, average="macro", labels=range(8), zero_division=0))
    # hand case: class 0 has tp=1, fp=1, fn=0 -> F1 2/3; class 1 tp=1, fn=1 -> 2/3; class 2: 0
    assert metrics.macro_f1([0, 1, 1, 2], [0, 1, 0, 1]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])


@pytest.mark.parametrize("tags, entities", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),         # IOB2
    (["I-PER", "I-PER", "B-PER", "O", "I-ORG"], [("PER", 0, 1), ("PER", 2, 2), ("ORG", 4, 4)]),  # IOB1
    (["B-LOC", "I-LOC", "E-LOC", "S-LOC", "O", "S-PER"],
     [("LOC", 0, 2), ("LOC", 3, 3), ("PER", 5, 5)]),                             # BIOES
    (["O", "I-PER", "I-PER"], [("PER", 1, 2)]),            # I after O starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change splits
    (["E-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 1)]),  # E closes, I after E starts anew
])
def test_get_entities_conlleval_rules(tags, entities):
    assert metrics.get_entities(tags) == entities


def _simple_iob2_entities(tags):
    """Independent reading of valid IOB2: B- opens an entity, I- extends it."""
    out, cur = [], None
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            if cur:
                out.append(tuple(cur))
            cur = [tag[2:], i, i]
        elif tag.startswith("I-"):
            cur[2] = i
        else:
            if cur:
                out.append(tuple(cur))
            cur = None
    if cur:
        out.append(tuple(cur))
    return out


def _random_iob2(rng, n):
    tags = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            tags.append("O")
        elif r < 0.7 or not tags or tags[-1] == "O":
            tags.append("B-" + rng.choice(["PER", "LOC", "ORG"]))
        else:
            tags.append("I-" + tags[-1][2:])
    return tags


def test_entity_f1_on_random_sequences_in_every_scheme():
    rng = np.random.default_rng(1)
    true = [_random_iob2(rng, int(rng.integers(1, 15))) for _ in range(60)]
    pred = [_random_iob2(rng, len(t)) if rng.random() < 0.5 else list(t) for t in true]
    gold = {(s, *e) for s, t in enumerate(true) for e in _simple_iob2_entities(t)}
    guess = {(s, *e) for s, p in enumerate(pred) for e in _simple_iob2_entities(p)}
    tp = len(gold & guess)
    expected = 2 * tp / (len(gold) + len(guess))  # = 2PR / (P + R)
    assert metrics.entity_f1(true, pred) == pytest.approx(expected)
    for scheme in ("IOB1", "BIOES"):
        conv_true = [formats.convert_tags(t, "IOB2", scheme) for t in true]
        conv_pred = [formats.convert_tags(p, "IOB2", scheme) for p in pred]
        for t in conv_true:
            formats.validate_tags(t, scheme)
        assert metrics.entity_f1(conv_true, conv_pred) == pytest.approx(expected)
    assert metrics.entity_f1([["O", "O"]], [["B-PER", "O"]]) == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        metrics.entity_f1([["O"]], [["O", "O"]])


def test_conditional_feature_shift_hand_case_and_loops():
    # 1-D features; class 0: source mean 1, target mean 4 -> 3; class 1: 1 vs 2 -> 1;
    # class 2 only in the source -> skipped. Mean over the shared classes: (3 + 1) / 2.
    zs, ys = [[0.0], [2.0], [1.0], [9.0]], [0, 0, 1, 2]
    zt, yt = [[4.0], [1.0], [3.0]], [0, 1, 1]
    assert metrics.conditional_feature_shift(zs, ys, zt, yt) == pytest.approx(2.0)
    rng = np.random.default_rng(2)
    zs, ys = rng.normal(size=(300, 16)), rng.integers(0, 4, 300)
    zt, yt = rng.normal(1.0, size=(200, 16)), rng.integers(0, 4, 200)
    expected = np.mean([sum(abs(zs[ys == c, i].mean() - zt[yt == c, i].mean()) for i in range(16))
                        for c in range(4)])
    got = metrics.conditional_feature_shift(torch.from_numpy(zs).float(), ys, zt, yt)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no class occurs"):
        metrics.conditional_feature_shift(zs, np.zeros(300), zt, np.ones(200))


def test_total_variation_and_prior_shift():
    assert metrics.total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert metrics.total_variation([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    # source 3:1 -> (0.75, 0.25, 0); target 1:1:2 -> (0.25, 0.25, 0.5); TV = (0.5 + 0 + 0.5) / 2
    assert metrics.prior_shift([0, 0, 0, 1], [0, 1, 2, 2], 3) == pytest.approx(0.5)


def _csls_loops(x, y, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    cos = np.array([[float(a @ b) for b in y] for a in x])
    r_x = np.array([np.sort(row)[-k:].mean() for row in cos])
    r_y = np.array([np.sort(col)[-k:].mean() for col in cos.T])
    return cos, 2 * cos - r_x[:, None] - r_y[None, :]


def test_retrieval_precision_cosine_and_csls():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8))
    y = x + rng.normal(scale=1.2, size=(40, 8))
    cos, csls = _csls_loops(x, y, 5)
    np.testing.assert_allclose(metrics.retrieval_scores(x, y, "cosine").numpy(), cos, atol=1e-12)
    np.testing.assert_allclose(metrics.retrieval_scores(x, y, "csls", csls_k=5).numpy(), csls,
                               atol=1e-12)
    for k in (1, 3):
        for method, scores in (("cosine", cos), ("csls", csls)):
            top = np.argsort(-scores, axis=1)[:, :k]
            expected = np.mean([i in top[i] for i in range(40)])
            assert metrics.retrieval_precision_at_k(x, y, k, method, csls_k=5) == expected
    # a hub key (the last) is nearer every query than its translation (cos 0.71 vs 0.63): cosine
    # retrieves the hub each time; CSLS subtracts the hub's high mean similarity and recovers all
    q = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, 0.0, 1.0]])
    keys = np.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert metrics.retrieval_precision_at_k(q, keys, 1) == 0.0
    assert metrics.retrieval_precision_at_k(q, keys, 1, "csls", csls_k=2) == 1.0
    with pytest.raises(ValueError, match="unknown method"):
        metrics.retrieval_scores(x, y, "dot")


def test_pearson_matches_scipy():
    rng = np.random.default_rng(4)
    a = rng.normal(size=50)
    b = 0.3 * a + rng.normal(size=50)
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="constant"):
        metrics.pearson([1, 1, 1], [1, 2, 3])


def test_prior_correction_percent():
    """Seed 000 Sec. 4.2: 100 for a perfect estimate, 0 for 'no shift', negative when worse."""
    p_s, p_t = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.3, 0.6])
    assert metrics.prior_correction(p_t, p_s, p_t) == pytest.approx(100)
    assert metrics.prior_correction(p_t, p_s, p_s) == pytest.approx(0)
    halfway = (p_s + p_t) / 2
    assert metrics.prior_correction(p_t, p_s, halfway) == pytest.approx(50)
    assert metrics.prior_correction(p_t, p_s, np.array([0.9, 0.05, 0.05])) < 0
    assert np.isnan(metrics.prior_correction(p_s, p_s, p_t))


@pytest.mark.parametrize("method", ["cosine", "csls"])
@pytest.mark.parametrize("budget", [1, 97, 1 << 24])
def test_blockwise_topk_equals_the_dense_scores(method, budget):
    """retrieval_topk in blocks (down to one query row, or one key row for CSLS's key means, at a
    time) gives the dense matrix's top k, values and indices; precision@k reads it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(53, 12, generator=g), torch.randn(41, 12, generator=g)
    dense = metrics.retrieval_scores(x, y, method, csls_k=5).topk(3, dim=1)
    values, indices = metrics.retrieval_topk(x, y, 3, method, csls_k=5, budget=budget)
    torch.testing.assert_close(values, dense.values, rtol=0, atol=1e-12)
    assert torch.equal(indices, dense.indices)
    gold = torch.randint(0, 41, (53,), generator=g)
    want = float((dense.indices == gold[:, None]).any(1).double().mean())
    assert metrics.retrieval_precision_at_k(x, y, 3, method, csls_k=5, gold=gold) == want
    with pytest.raises(ValueError, match="k=42 must be in 1..41"):
        metrics.retrieval_topk(x, y, 42)
