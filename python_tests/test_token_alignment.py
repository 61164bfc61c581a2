"""WCA's couplings and alignment loss (xlt_fast.nn.token_alignment; seed 001, Eqs. 3-9), each
checked against a computation of its own: cosine costs pair by pair, the batched layer plans
against one Sinkhorn call per problem and against POT, the hard / soft / nearest couplings from
the plans and costs by hand, the spec's A6.1 stability of the hard coupling when eps is halved,
the loss and its gradient against the explicit formula, and Eq. 9's link coupling.

Tolerances: float64 costs throughout. The kernel backend ("auto" on CPU) runs Sinkhorn in
float32, so its plans differ from a float64 solver by ~1e-7 |C| / eps relative (|C| <= 2 and
eps = 0.05 here: ~4e-6); those comparisons use 2e-5 of the largest entry. The float64 reference
backend agrees with POT to ~1e-10 at convergence; that comparison uses 1e-8.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import xlt_fast
from xlt_fast.nn import token_alignment as ta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def clouds(L=3, B=4, n=7, m=6, d=5, seed=0, x_len=(7, 5, 3, 6), y_len=(6, 4, 6, 2)):
    """Random layer stacks ``(L, B, n, d)``, ``(L, B, m, d)`` and masks with a length per pair
    (padded rows hold random values too: the masks alone must keep them out)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(L, B, n, d, generator=g, dtype=torch.float64)
    ys = torch.randn(L, B, m, d, generator=g, dtype=torch.float64)
    xm = torch.arange(n)[None, :] < torch.tensor(x_len[:B])[:, None]
    ym = torch.arange(m)[None, :] < torch.tensor(y_len[:B])[:, None]
    return xs, ys, xm, ym


# ------------------------------------------------------------------------------------- costs

def test_cosine_costs_are_one_minus_cosine_pair_by_pair():
    xs, ys, _, _ = clouds(L=2, B=3, n=4, m=5, d=6)
    xs.requires_grad_(True)
    ys.requires_grad_(True)
    C = ta.cosine_costs(xs, ys)
    assert C.shape == (2, 3, 4, 5) and C.dtype == torch.float64
    want = torch.empty(2, 3, 4, 5, dtype=torch.float64)
    for l in range(2):
        for b in range(3):
            for i in range(4):
                for j in range(5):
                    want[l, b, i, j] = 1 - F.cosine_similarity(xs[l, b, i], ys[l, b, j], dim=0)
    torch.testing.assert_close(C, want, rtol=0, atol=1e-12)
    assert float(C.detach().min()) >= 0 and float(C.detach().max()) <= 2
    # the gradient reaches both inputs and is that of the pairwise formula
    w = torch.randn(C.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gy = torch.autograd.grad((C * w).sum(), (xs, ys))
    hx, hy = torch.autograd.grad((want * w).sum(), (xs, ys))
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0
    torch.testing.assert_close(gx, hx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gy, hy, rtol=1e-9, atol=1e-12)


def test_cosine_costs_scale_invariant_and_zero_rows_cost_one():
    xs, ys, _, _ = clouds(L=1, B=2, n=3, m=4, d=5)
    C = ta.cosine_costs(xs, ys)
    scale = torch.tensor([0.01, 7.0, 300.0], dtype=torch.float64).view(1, 1, 3, 1)
    torch.testing.assert_close(ta.cosine_costs(xs * scale, ys), C, rtol=0, atol=1e-12)
    xs = xs.clone()
    xs[0, 1, 2] = 0  # a padded (zero) row: cost 1 to everything, and a finite gradient
    xs.requires_grad_(True)
    C = ta.cosine_costs(xs, ys)
    torch.testing.assert_close(C[0, 1, 2], torch.ones(4, dtype=torch.float64))
    (g,) = torch.autograd.grad(C.sum(), xs)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------------------- plans

@pytest.mark.parametrize("options", [{"eps": 0.05, "n_iters": 100, "tol": 1e-3},          # the trainer's (A6.1)
                                     {"eps": 0.1, "n_iters": 7, "tol": None},             # a fixed number of updates
                                     {"eps": 0.2, "n_iters": 2000, "tol": 1e-9}])         # converged
def test_layer_plans_equal_one_sinkhorn_per_problem(options):
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    plans, err = ta.layer_plans(C, xm, ym, **options)
    L, B, n, m = C.shape
    assert plans.shape == (L, B, n, m) and err.shape == (L, B)
    for l in range(L):
        for b in range(B):
            nx, ny = int(xm[b].sum()), int(ym[b].sum())
            # the real block alone: what padding must not change
            one = xlt_fast.sinkhorn(cost=C[l, b, :nx, :ny], return_plan=True, warn=False, **options)
            assert rel(plans[l, b, :nx, :ny], one.plan) < 2e-5, (l, b)
            assert float(plans[l, b, nx:].abs().sum()) == 0 and float(plans[l, b, :, ny:].abs().sum()) == 0
            assert abs(float(err[l, b]) - float(one.marginal_error)) < 1e-5
    if options["tol"] == 1e-9:
        assert float(err.max()) < 1e-8
        # converged: uniform marginals over the real tokens, 1 / n_s per row and 1 / n_t per column
        for b in range(B):
            nx, ny = int(xm[b].sum()), int(ym[b].sum())
            P = plans[:, b, :nx, :ny].double()
            torch.testing.assert_close(P.sum(2), torch.full((L, nx), 1 / nx, dtype=torch.float64), atol=1e-8,
                                       rtol=0)
            torch.testing.assert_close(P.sum(1), torch.full((L, ny), 1 / ny, dtype=torch.float64), atol=1e-8,
                                       rtol=0)


def test_layer_plans_ignore_whatever_padded_costs_hold():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    real = xm[None, :, :, None] & ym[None, :, None, :]
    junk = C.masked_fill(~real, 50.0)  # a padded entry must neither carry mass nor widen the cost range
    for relative in (False, True):
        a, _ = ta.layer_plans(C, xm, ym, relative_eps=relative)
        b, _ = ta.layer_plans(junk, xm, ym, relative_eps=relative)
        assert rel(b, a) < 1e-6


def test_layer_plans_match_pot_at_convergence():
    """One unmasked problem against POT's log-domain Sinkhorn (uniform weights), both converged."""
    import ot

    xs, ys, _, _ = clouds(L=2, B=1, n=8, m=6, d=5, seed=3)
    C = ta.cosine_costs(xs, ys)
    xm, ym = torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    a, b = torch.full((8,), 1 / 8, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
    eps = 0.05
    for backend, bound in (("auto", 2e-5), ("reference", 1e-8)):
        plans, err = ta.layer_plans(C, xm, ym, eps=eps, n_iters=5000, tol=1e-10, backend=backend)
        for l in range(2):
            pot = ot.sinkhorn(a, b, C[l, 0], reg=eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
            assert rel(plans[l, 0], pot) < bound, (backend, l)
        assert float(err.max()) < 1e-6


def test_relative_eps_is_eps_times_each_problems_cost_range():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    got, _ = ta.layer_plans(C, xm, ym, eps=0.05, n_iters=3000, tol=1e-9, relative_eps=True)
    L, B = C.shape[:2]
    for l in range(L):
        for b in range(B):
            nx, ny = int(xm[b].sum()), int(ym[b].sum())
            block = C[l, b, :nx, :ny]
            span = float(block.max() - block.min())
            one = xlt_fast.sinkhorn(cost=block, eps=0.05 * span, n_iters=3000, tol=1e-9, return_plan=True, warn=False)
            assert rel(got[l, b, :nx, :ny], one.plan) < 2e-5
    # so a cost scaled by k > 0 gives the same plans
    scaled, _ = ta.layer_plans(3.0 * C, xm, ym, eps=0.05, n_iters=3000, tol=1e-9, relative_eps=True)
    assert rel(scaled, got) < 2e-5


# ----------------------------------------------------------------------------------- couplings

def _plan_options():
    return {"eps": 0.05, "n_iters": 100, "tol": 1e-3}


def test_hard_coupling_is_one_over_nt_at_each_columns_argmax():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    T = ta.token_coupling(C, xm, ym, "hard", **_plan_options())
    plans, _ = ta.layer_plans(C, xm, ym, **_plan_options())
    mean = plans.double().mean(0)
    B, n, m = T.shape
    assert (B, n, m) == (4, 7, 6) and not T.requires_grad
    for b in range(B):
        nx, nt = int(xm[b].sum()), int(ym[b].sum())
        torch.testing.assert_close(T[b].sum().double(), torch.tensor(1.0, dtype=torch.float64))
        for j in range(m):
            col = T[b, :, j]
            if j >= nt:  # padded column
                assert float(col.abs().sum()) == 0
                continue
            nonzero = col.nonzero().flatten().tolist()
            assert nonzero == [int(mean[b, :nx, j].argmax())], (b, j)
            assert nonzero[0] < nx
            assert float(col[nonzero[0]]) == pytest.approx(1 / nt, rel=1e-6)
    # column-wise (A6.3): several target tokens may share a source token, so rows need not sum to 1 / n_s
    assert T.shape[1] == n


def test_soft_coupling_is_the_mean_of_the_layer_plans():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    T = ta.token_coupling(C, xm, ym, "soft", **_plan_options())
    plans, _ = ta.layer_plans(C, xm, ym, **_plan_options())
    want = sum(plans[l] for l in range(plans.shape[0])) / plans.shape[0]
    assert rel(T, want) < 1e-6
    # converged, each pair's soft coupling carries mass 1
    T = ta.token_coupling(C, xm, ym, "soft", eps=0.2, n_iters=2000, tol=1e-9)
    torch.testing.assert_close(T.sum((1, 2)).double(), torch.ones(4, dtype=torch.float64), atol=1e-8, rtol=0)


def test_nearest_coupling_is_the_real_row_of_least_mean_cost():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys)
    real_rows = xm[None, :, :, None].expand_as(C)
    C = C.masked_fill(~real_rows, -1.0)  # a padded row would win every column if it were read
    T = ta.token_coupling(C, xm, ym, "nearest")
    torch.testing.assert_close(T, ta.nearest_coupling(C, xm, ym))
    B, _n, m = T.shape
    for b in range(B):
        nx, nt = int(xm[b].sum()), int(ym[b].sum())
        for j in range(m):
            col = T[b, :, j]
            if j >= nt:
                assert float(col.abs().sum()) == 0
                continue
            layer_mean = [sum(float(C[l, b, i, j]) for l in range(C.shape[0])) / C.shape[0] for i in range(nx)]
            best = min(range(nx), key=layer_mean.__getitem__)
            assert col.nonzero().flatten().tolist() == [best]
            assert float(col[best]) == pytest.approx(1 / nt)


def test_unknown_coupling_kind_is_refused():
    xs, ys, xm, ym = clouds()
    with pytest.raises(ValueError, match="kind must be 'hard', 'soft' or 'nearest', got 'argmax'"):
        ta.token_coupling(ta.cosine_costs(xs, ys), xm, ym, "argmax")


def _translation_clouds(B=6, n=12, d=32, L=4, noise=0.6, drop=2, seed=0):
    """Realistic pairs: each target token a noisy copy of a source token (a different noise per
    layer), in shuffled order, ``drop`` source tokens untranslated; returns the clouds, masks and
    each target token's true source token."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    xs = base.unsqueeze(0) + 0.3 * torch.randn(L, B, n, d, generator=g, dtype=torch.float64)
    m = n - drop
    truth = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(B)])
    ys = base[torch.arange(B)[:, None], truth].unsqueeze(0) + noise * torch.randn(L, B, m, d, generator=g,
                                                                                   dtype=torch.float64)
    xm = torch.ones(B, n, dtype=torch.bool)
    ym = torch.ones(B, m, dtype=torch.bool)
    xm[1, -1] = False  # some padding too
    ym[2, -2:] = False
    return xs, ys, xm, ym, truth


def test_hard_coupling_stable_when_eps_is_halved():
    """Spec A6.1: the hard coupling is unchanged on most columns at eps 0.05 -> 0.025. On cosine
    costs in [0, 2], eps = 0.05 is already close to the unregularised plan: halving it sharpens
    each column but moves its argmax only where two source tokens lie within ~eps of each other in
    cost, which for these clouds (true matches at cosine distance ~0.3, others ~1) is rare; 80%
    leaves room for such near-ties and for unconverged problems (100 iterations at most)."""
    xs, ys, xm, ym, truth = _translation_clouds()
    C = ta.cosine_costs(xs, ys)
    picks = {}
    for eps in (0.05, 0.025):
        T = ta.token_coupling(C, xm, ym, "hard", eps=eps, n_iters=100, tol=1e-3)
        picks[eps] = T.argmax(1)
    cols = ym
    same = (picks[0.05] == picks[0.025])[cols].double().mean()
    assert same >= 0.8, float(same)
    # and the coupling is not trivially stable: it finds the true source token of most columns
    for eps in (0.05, 0.025):
        right = (picks[eps] == truth)[cols & (truth < xm.sum(1, keepdim=True))].double().mean()
        assert right >= 0.8, (eps, float(right))


# ------------------------------------------------------------------------------------- the loss

def test_alignment_loss_with_the_hard_coupling_is_the_explicit_formula():
    xs, ys, xm, ym = clouds()
    xs.requires_grad_(True)
    ys.requires_grad_(True)
    C = ta.cosine_costs(xs, ys)
    T = ta.token_coupling(C, xm, ym, "hard")
    loss = ta.alignment_loss(T, C)
    match = T.argmax(1)  # (B, m): the source token of each target column
    L, B = xs.shape[:2]
    per_pair = []
    for b in range(B):
        nt = int(ym[b].sum())
        total = 0.0
        for j in range(nt):
            i = int(match[b, j])
            for l in range(L):
                total = total + (1 - F.cosine_similarity(xs[l, b, i], ys[l, b, j], dim=0))
        per_pair.append(total / nt)
    want = sum(per_pair) / B
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)  # T is float32: 1 / n_t rounds
    # the gradient reaches both sides' embeddings, and is the formula's with T held constant
    gx, gy = torch.autograd.grad(loss, (xs, ys))
    hx, hy = torch.autograd.grad(want, (xs, ys))
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0
    torch.testing.assert_close(gx, hx, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gy, hy, rtol=1e-6, atol=1e-9)
    # padded tokens get no gradient
    assert float(gx[:, ~xm].abs().sum()) == 0 and float(gy[:, ~ym].abs().sum()) == 0


def test_alignment_loss_sums_layers_and_passes_no_gradient_through_the_coupling():
    xs, ys, xm, ym = clouds()
    C = ta.cosine_costs(xs, ys).requires_grad_(True)
    T = ta.token_coupling(C.detach(), xm, ym, "soft").double().requires_grad_(True)
    loss = ta.alignment_loss(T, C)
    want = torch.einsum("bij,lbij->b", T.detach(), C.detach()).mean()  # a sum over layers (A6.4)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=0)
    loss.backward()
    assert T.grad is None  # the coupling is a constant (A6.2)
    torch.testing.assert_close(C.grad, T.detach().unsqueeze(0).expand_as(C) / C.shape[1], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------- Eq. 9

def test_link_coupling_puts_one_over_nt_on_real_linked_pairs():
    x_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    y_mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    links = [[(0, 1), (2, 0), (1, 3), (3, 2), (0, 4), (9, 0), (1, 7)],  # (3, 2), (0, 4): padded; 9, 7: beyond
             [(1, 1), (1, 2), (0, 0)]]                                  # one source word linked twice
    T = ta.link_coupling(links, x_mask, y_mask)
    want = torch.zeros(2, 4, 5)
    for i, j in [(0, 1), (2, 0), (1, 3)]:
        want[0, i, j] = 1 / 4
    for i, j in [(1, 1), (1, 2), (0, 0)]:
        want[1, i, j] = 1 / 3
    torch.testing.assert_close(T, want, rtol=0, atol=0)
    assert not T.requires_grad
    # no links, or none that survive: all zeros
    assert float(ta.link_coupling([[], [(5, 5)]], x_mask, y_mask).abs().sum()) == 0
    # and the loss of a link coupling is the mean cosine distance of the linked pairs, per target word
    xs, ys, _, _ = clouds(L=2, B=2, n=4, m=5, d=3)
    C = ta.cosine_costs(xs, ys)
    pair0 = sum(float(C[:, 0, i, j].sum()) for i, j in [(0, 1), (2, 0), (1, 3)]) / 4
    pair1 = sum(float(C[:, 1, i, j].sum()) for i, j in [(1, 1), (1, 2), (0, 0)]) / 3
    assert float(ta.alignment_loss(T, C)) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)


def test_link_coupling_ignores_negative_indices():
    x_mask = torch.tensor([[True, True, True]])
    y_mask = torch.tensor([[True, True]])
    T = ta.link_coupling([[(-1, 0), (0, 1)]], x_mask, y_mask)
    want = torch.zeros(1, 3, 2)
    want[0, 0, 1] = 1 / 2
    torch.testing.assert_close(T, want, rtol=0, atol=0)


def test_cosine_cost_is_bounded_so_plans_have_a_meaningful_eps():
    # the temperature eps = 0.05 is a fraction of the cost range [0, 2] (A6.1): sanity of that range
    x = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    y = torch.tensor([[[[-2.0, 0.0], [0.0, 3.0], [5.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(ta.cosine_costs(x, y)[0, 0, 0], torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    assert math.isclose(float(ta.cosine_costs(x, x)), 0.0, abs_tol=1e-15)
