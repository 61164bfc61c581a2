"""Class importance weights (IWDA, seed 000 Sec. 3 / App. C.1): the QP, the projections, the EMA
statistics and the projected-gradient updates, checked against independent solutions and against
known priors of a simulated label shift."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize, nnls

from xlt_fast.nn import ImportanceWeights, project_weights, solve_weights_qp
from xlt_fast.nn.importance import confusion_counts, prediction_counts

K = 5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    p_s = rng.dirichlet(np.full(K, 3.0))
    cond = 0.6 * np.eye(K) + 0.4 * rng.dirichlet(np.ones(K), size=K).T  # p(pred = i | y = j), columns sum to 1
    C = cond * p_s  # joint p_S(pred = i, y = j)
    return p_s, cond, C


def test_qp_recovers_exact_weights():
    p_s, _, C = _problem()
    w_true = np.random.default_rng(1).uniform(0.2, 2.0, K)
    w_true /= p_s @ w_true
    w = solve_weights_qp(C, C @ w_true, p_s)
    np.testing.assert_allclose(w, w_true, atol=1e-6)


def test_qp_matches_an_independent_solver():
    """Infeasible targets (the constrained optimum has zeros): against NNLS with the equality as a
    heavily weighted extra row (exact as the weight grows)."""
    p_s, _, C = _problem(2)
    t = np.random.default_rng(3).dirichlet(np.ones(K) * 0.3)
    w = solve_weights_qp(C, t, p_s)
    big = 1e5
    w_ref, _ = nnls(np.vstack([C / C.sum(), big * p_s]), np.concatenate([t, [big]]))
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    assert (w >= 0).all() and p_s @ w == pytest.approx(1)


def test_weights_recover_known_priors_from_hard_predictions():
    """A simulated label shift: a classifier with p(pred | y) shared by both domains (the label-shift
    assumption), 200k examples a side; the QP on hard counts recovers p_T within sampling error."""
    rng = np.random.default_rng(4)
    p_s, cond, _ = _problem(4)
    p_t = np.array([0.5, 0.05, 0.2, 0.15, 0.1])
    n = 200_000
    y_s, y_t = rng.choice(K, n, p=p_s), rng.choice(K, n, p=p_t)
    pred_s, pred_t = _draw(rng, cond, y_s), _draw(rng, cond, y_t)
    C = confusion_counts(torch.as_tensor(pred_s), torch.as_tensor(y_s), K).numpy()
    t = prediction_counts(torch.as_tensor(pred_t), K).numpy()
    w = solve_weights_qp(C, t, np.bincount(y_s, minlength=K) / n)
    p_est = (np.bincount(y_s, minlength=K) / n) * w
    assert 0.5 * np.abs(p_est - p_t).sum() < 0.01
    assert 0.5 * np.abs(p_s - p_t).sum() > 0.3  # a large shift was corrected


def _draw(rng, cond, labels):
    """A prediction for each label, drawn from the column ``cond[:, label]``."""
    u = rng.random(len(labels))
    cdf = np.cumsum(cond[:, labels], axis=0)
    return (u[None, :] > cdf).sum(0)


@pytest.mark.parametrize("seed", range(4))
def test_euclidean_projection_is_the_nearest_feasible_point(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(K))
    v = rng.normal(0.8, 1.0, K)
    got = project_weights(torch.as_tensor(v), torch.as_tensor(p), "euclidean").numpy()
    ref = minimize(lambda w: ((w - v) ** 2).sum(), np.ones(K), method="SLSQP", bounds=[(0, None)] * K,
                   constraints=[{"type": "eq", "fun": lambda w: p @ w - 1}], options={"ftol": 1e-14}).x
    np.testing.assert_allclose(got, ref, atol=1e-6)
    clamp = project_weights(torch.as_tensor(v), torch.as_tensor(p), "clamp").numpy()
    assert (clamp >= 0).all() and p @ clamp == pytest.approx(1)
    for method in ("clamp", "euclidean"):  # feasible points stay where they are
        np.testing.assert_allclose(project_weights(torch.as_tensor(ref), torch.as_tensor(p), method).numpy(), ref,
                                   atol=1e-9)


def test_statistics_start_optimal_and_average_with_the_rate():
    p_s, _, C = _problem(5)
    iw = ImportanceWeights(torch.as_tensor(p_s), init=torch.full((K,), 1.0), ema_rate=0.1)
    w0 = torch.as_tensor([1.5, 0.5, 1.0, 1.2, 0.8], dtype=torch.float64)
    iw.reset(w0 / (iw.source_prior @ w0))
    assert float(iw.loss().detach()) < 1e-20  # w0 is optimal for the starting statistics
    counts = torch.as_tensor(C * 40)
    hist = torch.arange(1.0, K + 1, dtype=torch.float64)
    before_c, before_t = iw.confusion.clone(), iw.target_hist.clone()
    iw.update_statistics(counts, hist)
    torch.testing.assert_close(iw.confusion, 0.9 * before_c + 0.1 * counts / counts.sum())
    torch.testing.assert_close(iw.target_hist, 0.9 * before_t + 0.1 * hist / hist.sum())
    assert iw.loss().requires_grad and iw.delta.grad is None


def test_projected_gradient_steps_reach_the_qp_solution():
    """The per-step update of IWDA without the regulariser (lambda_iw = 0) on fixed statistics
    converges to the QP optimum (Sec. 3: 'projected gradient descent ... close to optimality')."""
    p_s, _, C = _problem(6)
    t = C @ np.array([2.0, 0.3, 1.0, 0.7, 1.1]) + 0.01
    iw = ImportanceWeights(torch.as_tensor(p_s))
    iw.confusion.copy_(torch.as_tensor(C))
    iw.target_hist.copy_(torch.as_tensor(t))
    opt = torch.optim.AdamW([iw.delta], lr=1e-2, weight_decay=0.0)
    for i in range(3000):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - i / 3000)
        opt.zero_grad()
        iw.loss().backward()
        opt.step()
        iw.project_("euclidean")
    np.testing.assert_allclose(iw.weights.detach().numpy(), solve_weights_qp(C, t, p_s), atol=2e-3)


def test_rejects_a_source_prior_with_zeros():
    with pytest.raises(ValueError, match="positive"):
        ImportanceWeights(torch.tensor([0.5, 0.5, 0.0]))
