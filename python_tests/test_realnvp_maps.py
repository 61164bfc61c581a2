"""Seed 002's maps, constraints, criteria and simulation (xlt_fast.nn.embedding_maps, the new
xlt_fast.metrics retrieval functions, xlt_fast.data.cbli_simulation) against dense references
built here, closed-form values derived here and exact invariances. Fast (CPU, tiny sizes)."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xlt_fast import metrics
from xlt_fast.data.cbli_simulation import simulate
from xlt_fast.nn.embedding_maps import (FCNN, Discriminator, FlowPair, FlowPass, LinearMap, Standardize,
                                        cross_correlation_loss, graph_structure_loss, matching_loss, procrustes)


pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _dense_mutual(scores, n):
    """Mutual argmax pairs of a dense ``[S, T]`` score matrix, highest score first, at most n."""
    fwd, back = scores.argmax(1), scores.argmax(0)
    src = torch.tensor([i for i in range(len(fwd)) if int(back[fwd[i]]) == i], dtype=torch.long)
    best = scores[src, fwd[src]]
    order = best.argsort(descending=True)[:n]
    return src[order], fwd[src[order]], best[order]


def _dense_csls_euclidean(x, y, k):
    sim = -torch.cdist(x, y)
    r_x = sim.topk(k, dim=1).values.mean(1)
    r_y = sim.topk(k, dim=0).values.mean(0)
    return 2 * sim - r_x[:, None] - r_y[None, :]


# ------------------------------------------------------------------------------- mutual CSLS pairs

@pytest.mark.parametrize("budget", [1 << 24, 100, 7])  # one block; blocks of 2 rows; one row per block
def test_mutual_csls_pairs_equal_a_dense_reference(budget):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = x[torch.randperm(50, generator=g)[:40]] + 0.6 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    dense = metrics.retrieval_scores(x, y, method="csls", csls_k=5)
    want_i, want_j, want_s = _dense_mutual(dense, 25)
    assert 10 < len(want_i) <= 25  # enough mutual pairs to compare, and the cap applies
    i, j, s = metrics.mutual_csls_pairs(x, y, 25, csls_k=5, budget=budget, dtype=torch.float64)
    assert i.tolist() == want_i.tolist() and j.tolist() == want_j.tolist()
    torch.testing.assert_close(s, want_s, rtol=0, atol=1e-10)
    # the default float32 gives the same pairs; every pair is mutual; n caps the count
    i32, j32, _ = metrics.mutual_csls_pairs(x, y, 25, csls_k=5, budget=budget)
    assert i32.tolist() == i.tolist() and j32.tolist() == j.tolist()
    all_i, _, all_s = metrics.mutual_csls_pairs(x, y, 10_000, csls_k=5, budget=budget, dtype=torch.float64)
    assert len(all_i) == len(_dense_mutual(dense, 10_000)[0]) > 25
    assert (all_s[:-1] >= all_s[1:]).all()
    assert metrics.mutual_csls_pairs(x, y, 3, csls_k=5, budget=budget)[0].tolist() == i[:3].tolist()


@pytest.mark.parametrize("budget", [1 << 24, 7])
def test_mutual_csls_pairs_euclidean_equal_a_dense_reference(budget):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 2, generator=g, dtype=torch.float64) * 3
    y = x[:35] @ _orthogonal(2, 3) + 0.3 * torch.randn(35, 2, generator=g, dtype=torch.float64)
    want_i, want_j, want_s = _dense_mutual(_dense_csls_euclidean(x, y, 4), 20)
    assert len(want_i) == 20
    i, j, s = metrics.mutual_csls_pairs(x, y, 20, csls_k=4, similarity="euclidean", budget=budget,
                                        dtype=torch.float64)
    assert i.tolist() == want_i.tolist() and j.tolist() == want_j.tolist()
    torch.testing.assert_close(s, want_s, rtol=0, atol=1e-10)
    # not the cosine answer (2-D cosine ignores the radius)
    assert metrics.mutual_csls_pairs(x, y, 20, csls_k=4, budget=budget)[0].tolist() != i.tolist()


def test_semantic_criterion_is_the_mean_similarity_of_the_mutual_pairs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 5, generator=g)
    y = x + 0.5 * torch.randn(60, 5, generator=g)
    value, (i, j) = metrics.semantic_criterion(x, y, n=20, csls_k=5)
    want_i, want_j, _ = _dense_mutual(metrics.retrieval_scores(x, y, "csls", csls_k=5), 20)
    assert i.tolist() == want_i.tolist() and j.tolist() == want_j.tolist() and len(i) == 20
    cos = (F.normalize(x.double(), dim=1)[i] * F.normalize(y.double(), dim=1)[j]).sum(1)
    assert value == pytest.approx(float(cos.mean()), abs=1e-6)
    assert 0.5 < value < 1
    # euclidean: the mean negative distance of its own pairs
    value, (i, j) = metrics.semantic_criterion(x, y, n=20, csls_k=5, similarity="euclidean")
    want_i, want_j, _ = _dense_mutual(_dense_csls_euclidean(x.double(), y.double(), 5), 20)
    assert i.tolist() == want_i.tolist() and j.tolist() == want_j.tolist()
    assert value == pytest.approx(-float((x.double()[i] - y.double()[j]).norm(dim=1).mean()), abs=1e-5)
    assert value < 0


def test_structural_criterion():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q = _orthogonal(6, 4)
    assert metrics.structural_criterion(x, x @ q) == pytest.approx(0, abs=1e-18)
    # a uniform scale c moves every log singular value by log c: d (log c)^2
    assert metrics.structural_criterion(x, 2 * x @ q) == pytest.approx(6 * math.log(2) ** 2, rel=1e-10)
    aniso = x @ torch.diag(torch.tensor([4.0, 2, 1, 1, 0.5, 0.25], dtype=torch.float64)) @ q
    assert metrics.structural_criterion(x, aniso) > 0.5
    with pytest.raises(ValueError, match="one shape"):
        metrics.structural_criterion(x, x[:, :5])


def test_mutual_csls_pairs_errors():
    x, y = torch.randn(12, 3), torch.randn(10, 3)
    bad = x.clone()
    bad[3, 1] = math.nan
    bad[7, 0] = math.inf
    with pytest.raises(ValueError, match=re.escape("queries rows [3, 7] contain NaN or inf")):
        metrics.mutual_csls_pairs(bad, y, 5, csls_k=3)
    bad_y = y.clone()
    bad_y[9] = math.nan
    with pytest.raises(ValueError, match=re.escape("keys rows [9] contain NaN or inf")):
        metrics.mutual_csls_pairs(x, bad_y, 5, csls_k=3, similarity="euclidean")
    with pytest.raises(ValueError, match=re.escape("rows [3, 7]")):
        metrics.semantic_criterion(bad, y, 5, csls_k=3)
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            metrics.mutual_csls_pairs(x, y, n, csls_k=3)
    with pytest.raises(ValueError, match="csls_k=11"):
        metrics.mutual_csls_pairs(x, y, 5, csls_k=11)
    with pytest.raises(ValueError, match="similarity must be one of"):
        metrics.mutual_csls_pairs(x, y, 5, csls_k=3, similarity="dot")


def test_retrieval_topk_euclidean_equals_cdist():
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(25, 3, generator=g,
                                                                               dtype=torch.float64)
    dist = torch.cdist(q, keys)
    for budget in (1 << 24, 10):
        scores, idx = metrics.retrieval_topk(q, keys, 1, similarity="euclidean", budget=budget)
        assert idx[:, 0].tolist() == dist.argmin(1).tolist()
        torch.testing.assert_close(scores[:, 0], -dist.min(1).values, rtol=0, atol=1e-12)
        scores, idx = metrics.retrieval_topk(q, keys, 3, similarity="euclidean", budget=budget)
        want = dist.topk(3, dim=1, largest=False)
        assert idx.tolist() == want.indices.tolist()
        torch.testing.assert_close(scores, -want.values, rtol=0, atol=1e-12)
    # and not the cosine ranking (keys scaled: same directions, other distances)
    far = keys * torch.linspace(0.2, 5, 25, dtype=torch.float64)[:, None]
    cos_idx = metrics.retrieval_topk(q, far, 1)[1][:, 0]
    euc_idx = metrics.retrieval_topk(q, far, 1, similarity="euclidean")[1][:, 0]
    assert euc_idx.tolist() == torch.cdist(q, far).argmin(1).tolist() != cos_idx.tolist()


# ------------------------------------------------------------------------------------- FlowPair

def _std_normal_nll(v):
    return float((0.5 * v.double().square().sum(1) + 0.5 * v.shape[1] * math.log(2 * math.pi)).mean())


def test_fresh_flow_pair_is_the_identity():
    torch.manual_seed(0)
    pair = FlowPair(6, n_couplings=3, hidden=16, identity_init=True)
    x, y = torch.randn(20, 6) * 3, torch.randn(20, 6) + 2
    assert torch.equal(pair(x), x) and torch.equal(pair.backward_map(y), y)
    out = pair.both(x, y)
    assert torch.equal(out.y_hat, x) and torch.equal(out.x_hat, y)
    assert out.nll.item() == pytest.approx(0.5 * (_std_normal_nll(x) + _std_normal_nll(y)), rel=1e-6)


def test_flow_pair_both_directions_and_inverse():
    torch.manual_seed(1)
    pair = FlowPair(6, n_couplings=4, hidden=16, identity_init=False)
    x, y = torch.randn(32, 6), torch.randn(32, 6) * 2 - 1
    fx = pair(x)
    assert (fx - x).abs().max() > 0.1  # not the identity
    out = pair.both(x, y)
    torch.testing.assert_close(out.y_hat, fx, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.x_hat, pair.backward_map(y), rtol=0, atol=1e-6)
    # f_YX is the inverse of f_XY (float32 round trip through 2 x 4 couplings: within 1e-4)
    torch.testing.assert_close(pair.backward_map(fx), x, rtol=0, atol=1e-4)
    torch.testing.assert_close(pair(pair.backward_map(y)), y, rtol=0, atol=1e-4)
    # the likelihood term is (NLL_X + NLL_Y) / 2 of each flow's change of variables
    want = -0.5 * (pair.flow_x.log_prob(x).mean() + pair.flow_y.log_prob(y).mean())
    assert out.nll.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.nll.item() != pytest.approx(0.5 * (_std_normal_nll(x) + _std_normal_nll(y)), rel=1e-3)


def test_matching_loss_formula_and_gradients():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    # y_hat = y + 1 (|.|^2 = 4 per row), x_hat = x + 2 (16 per row): (4 + 16) / 2
    out = FlowPass(y + 1, x + 2, torch.tensor(0.0))
    assert float(matching_loss(out, x, y)) == pytest.approx(10.0, rel=1e-6)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    want = 0.5 * (sum(float(((a[i] - y[i]) ** 2).sum()) for i in range(8)) / 8
                  + sum(float(((b[i] - x[i]) ** 2).sum()) for i in range(8)) / 8)
    assert float(matching_loss(FlowPass(a, b, torch.tensor(0.0)), x, y)) == pytest.approx(want, rel=1e-5)

    for identity in (False, True):
        torch.manual_seed(2)
        pair = FlowPair(4, n_couplings=2, hidden=8, identity_init=identity)
        out = pair.both(x, y)
        loss = matching_loss(out, x, y) + 1e-2 * out.nll
        loss.backward()
        for name, p in pair.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if not identity or name.endswith(("net.4.weight", "net.4.bias")):
                # fresh identity flows: only the zeroed output layers get gradients at first
                assert p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------- constraints

def test_cross_correlation_loss():
    g = torch.Generator().manual_seed(6)
    y = torch.randn(64, 5, generator=g, dtype=torch.float64)
    assert float(cross_correlation_loss(2 * y + 1, y)) == pytest.approx(0, abs=1e-12)
    slope, shift = torch.tensor([0.1, 1, 3, 7, 20.0], dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert float(cross_correlation_loss(y * slope + shift, y)) == pytest.approx(0, abs=1e-12)
    # y_hat = -y: every correlation is -1, (-1 - 1)^2 per feature
    assert float(cross_correlation_loss(-y, y)) == pytest.approx(4 * 5, rel=1e-12)
    # a permutation of the features: equal in distribution, far from equal
    assert float(cross_correlation_loss(y[:, [1, 2, 3, 4, 0]], y)) > 3
    # the literal Eq. 5 (no square root): c_j = sum a b / (sum a^2 sum b^2); for a = 2 b, c_j = 1 / (2 sum b^2)
    b = y - y.mean(0)
    want = float(((1 / (2 * b.square().sum(0))) - 1).square().sum())
    got = float(cross_correlation_loss(2 * y + 1, y, literal=True))
    assert got == pytest.approx(want, rel=1e-10) and got > 1


def test_graph_structure_loss():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(16, 5, generator=g, dtype=torch.float64)
    assert float(graph_structure_loss(y @ _orthogonal(5, 8), y)) == pytest.approx(0, abs=1e-24)
    assert float(graph_structure_loss(3 * y @ _orthogonal(5, 9), y)) == pytest.approx(0, abs=1e-24)
    scaled = y @ torch.diag(torch.tensor([5.0, 1, 1, 0.2, 1], dtype=torch.float64))
    assert float(graph_structure_loss(scaled, y)) > 1e-3
    assert float(graph_structure_loss(torch.randn(16, 5, generator=g, dtype=torch.float64), y)) > 1e-2
    # by hand: Gram I vs all-ones: off-diagonal entries differ by 1, mean over 4 entries
    e = torch.eye(2)
    assert float(graph_structure_loss(torch.tensor([[1.0, 0], [1, 0]]), e)) == pytest.approx(0.5)


# ------------------------------------------------------------------------------- linear maps

def test_procrustes_recovers_an_orthogonal_map():
    g = torch.Generator().manual_seed(10)
    q = _orthogonal(5, 11).float()
    x = torch.randn(50, 5, generator=g)
    w = procrustes(x, x @ q)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, q, rtol=0, atol=1e-5)
    # with noise: still orthogonal, near Q
    w = procrustes(x, x @ q + 0.05 * torch.randn(50, 5, generator=g))
    torch.testing.assert_close(w @ w.T, torch.eye(5), rtol=0, atol=1e-5)
    assert (w - q).abs().max() < 0.05
    with pytest.raises(ValueError, match="one shape"):
        procrustes(x, x[:, :4])


def test_linear_map_orthogonalize_moves_towards_orthogonal():
    g = torch.Generator().manual_seed(12)
    m = LinearMap(4)
    torch.testing.assert_close(m(torch.ones(2, 4)), torch.ones(2, 4))  # starts as the identity
    q = _orthogonal(4, 13).float()
    with torch.no_grad():
        m.weight.copy_(q + 0.05 * torch.randn(4, 4, generator=g))

    def error():
        w = m.weight.detach()
        return float((w @ w.T - torch.eye(4)).abs().max())

    errors = [error()]
    for _ in range(5):
        m.orthogonalize_(0.1)
        errors.append(error())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    with torch.no_grad():  # an orthogonal W is a fixed point
        m.weight.copy_(q)
    m.orthogonalize_(0.1)
    torch.testing.assert_close(m.weight.detach(), q, rtol=0, atol=1e-6)
    # the bias variant adds b
    mb = LinearMap(3, bias=True)
    with torch.no_grad():
        mb.bias.copy_(torch.tensor([1.0, 2, 3]))
    torch.testing.assert_close(mb(torch.zeros(1, 3)), torch.tensor([[1.0, 2, 3]]))


def test_standardize():
    g = torch.Generator().manual_seed(14)
    rows = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5, 0.1],
                                                                                dtype=torch.float64) + 4
    st = Standardize(rows)
    out = st(rows)
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(0), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    other = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(st(other), (other - rows.mean(0)) / rows.std(0))  # fixed statistics


def test_fcnn_and_discriminator_shapes():
    torch.manual_seed(0)
    x = torch.randn(7, 3) * 10
    assert FCNN(3, 16)(x).shape == (7, 3)
    assert FCNN(3, 16, linear_output=False)(x).abs().max() < 1
    d = Discriminator(3, 8).eval()
    assert d(x).shape == (7,)


# ------------------------------------------------------------------------------- simulation

def test_simulation_shapes_and_determinism():
    sim = simulate(7, 5, [0.0, 2.5], words=20, seed=3)
    assert set(sim.tests) == {0.0, 2.5}
    for split in (sim.train, sim.validation, *sim.tests.values()):
        assert split.x.shape == split.y.shape == (140, 2) and split.word.shape == (140,)
        assert split.word.tolist() == np.repeat(np.arange(20), 7).tolist()
    again = simulate(7, 5, [0.0, 2.5], words=20, seed=3)
    for a, b in ((sim.train, again.train), (sim.validation, again.validation), (sim.tests[2.5], again.tests[2.5])):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = simulate(7, 5, [0.0, 2.5], words=20, seed=4)
    assert not torch.allclose(other.train.x, sim.train.x, atol=0.5)
    # the splits are separate draws
    assert not torch.allclose(sim.train.x, sim.validation.x, atol=0.1)
    assert not torch.allclose(sim.validation.x, sim.tests[0.0].x, atol=0.1)


def _fit_linear(x, y):
    """``A`` with ``y = x A`` by least squares (float64)."""
    return torch.linalg.lstsq(x.double(), y.double()).solution


def test_simulation_world_depends_on_the_seed_only():
    small, large = simulate(5, 1, [0.0], seed=0), simulate(50, 1, [0.0], seed=0)
    a = _fit_linear(small.train.x, small.train.y)  # y = x Q^T
    torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(large.train.y.double(), large.train.x.double() @ a, rtol=0, atol=1e-4)
    b = _fit_linear(simulate(5, 1, [0.0], seed=1).train.x, simulate(5, 1, [0.0], seed=1).train.y)
    assert (a - b).abs().max() > 1e-2  # another seed, another map
    # the words' means: the per-word train means agree across k (within the sampling noise)
    m1, m2 = (torch.stack([s.train.x[s.train.word == w].mean(0) for w in range(20)])
              for s in (simulate(400, 5, [0.0], seed=0), simulate(800, 5, [0.0], seed=0)))
    assert (m1 - m2).abs().max() < 0.3
    m3 = torch.stack([s.x[s.word == w].mean(0) for s in [simulate(400, 5, [0.0], seed=1).train] for w in range(20)])
    assert (m1 - m3).abs().max() > 1


def test_simulation_isometry_and_eps():
    def dist(rows):  # pairwise distances without cdist's matmul shortcut (its diagonal is not 0 in fp32)
        rows = rows.double()
        return (rows[:, None] - rows[None]).norm(dim=2)

    iso = simulate(10, 1, [0.0], seed=2).train
    torch.testing.assert_close(dist(iso.y), dist(iso.x), rtol=0, atol=1e-5)  # fp32 storage of y
    swirl = simulate(10, 5, [0.0], seed=2).train
    assert (dist(swirl.y) - dist(swirl.x)).abs().max() > 1
    assert torch.equal(swirl.x, iso.x)  # t changes the map only
    # eps shifts every coordinate of the test occurrences (the map follows the source points)
    sim = simulate(100, 1, [0.0, 2.5, 5.0], seed=2)
    base = sim.tests[0.0].x.mean(0)
    for eps in (2.5, 5.0):
        shift = sim.tests[eps].x.mean(0) - base
        torch.testing.assert_close(shift, torch.full((2,), eps), rtol=0, atol=0.15)
        a = _fit_linear(sim.train.x, sim.train.y).float()
        torch.testing.assert_close(sim.tests[eps].y, sim.tests[eps].x @ a, rtol=0, atol=1e-4)
    torch.testing.assert_close(sim.validation.x.mean(0), base, rtol=0, atol=0.15)


@pytest.mark.parametrize("kw,match", [({"k": 0}, "k .* must be an int >= 1"), ({"k": 2.0}, "k .* must be an int"),
                                      ({"t": 0}, "t .* must be an int >= 1"), ({"t": 1.5}, "t .* must be an int")])
def test_simulation_bad_arguments(kw, match):
    args = {"k": 5, "t": 1, "eps": [0.0], **kw}
    with pytest.raises(ValueError, match=match):
        simulate(**args)
