"""sinkhorn / sinkhorn_divergence: reference vs GeomLoss and POT, every kernel vs the reference.

Tolerances:
- reference vs GeomLoss (float64, same algorithm): values 1e-4 rel, gradients 1e-3 (the contract);
  in float64 the two agree to ~1e-12, so these bounds only absorb summation order.
- kernels vs reference: values 1e-5 rel, gradients 1e-4 rel (of the largest entry). The kernels run
  in float32; a float32 cost carries a rounding error ~2^-24 |C| that the plan sees as
  exp(error / eps), i.e. a relative error ~ 6e-8 |C| / eps. Test data keep |C| / eps <~ 1e3, so the
  expected error is <~ 6e-5. The C++ kernel is also checked in float64 at BERT-like scale (1e-9).
- POT at fixed eps: both solvers run to convergence (1e-7 on plans and costs in float64).
"""
import math
import warnings

import pytest
import torch

import xlt_fast
from xlt_fast.reference import sinkhorn as ref
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu", "triton")
COSTS = ["half_sqeuclidean", "sqeuclidean", "euclidean", "cosine"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def clouds(B, n, m, d, scale=1.0, offset=0.0, dtype=torch.float64, seed=0, masks=False):
    """Embedding-like points: a shared offset plus per-point noise; optional random padding."""
    g = torch.Generator().manual_seed(seed)
    off = offset * torch.randn(d, generator=g, dtype=dtype)
    x = off + scale * torch.randn(B, n, d, generator=g, dtype=dtype)
    y = off + 0.3 + scale * torch.randn(B, m, d, generator=g, dtype=dtype)
    if not masks:
        return x, y, None, None
    xm = torch.arange(n) < torch.randint(1, n + 1, (B,), generator=g).unsqueeze(1)
    ym = torch.arange(m) < torch.randint(1, m + 1, (B,), generator=g).unsqueeze(1)
    return x, y, xm, ym


# ----------------------------------------------------------------------------- reference vs peers
@pytest.mark.parametrize("debias", [True, False])
def test_reference_matches_geomloss_per_problem(debias):
    import geomloss
    x, y, _, _ = clouds(3, 11, 7, 16, scale=1.0, offset=2.0)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 11, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=debias, backend="tensorized")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    fn = xlt_fast.sinkhorn_divergence if debias else (lambda *args, **kw: xlt_fast.sinkhorn(*args, **kw).cost)
    ours = fn(xr, yr, a, b, backend="reference")
    gx, gy = torch.autograd.grad(ours.sum(), (xr, yr))
    for k in range(3):
        xk, yk = x[k].clone().requires_grad_(), y[k].clone().requires_grad_()
        want = loss(a[k], xk, b[k], yk)
        wx, wy = torch.autograd.grad(want, (xk, yk))
        assert rel(ours[k], want) < 1e-4
        assert rel(gx[k], wx) < 1e-3 and rel(gy[k], wy) < 1e-3


def test_reference_matches_geomloss_large_norms_float32():
    """BERT-like norms (|x| ~ 20, squared distances ~ 100) at eps = blur^2 = 0.0025, float32."""
    import geomloss
    x, y, _, _ = clouds(1, 20, 15, 64, scale=1.0, offset=2.5, dtype=torch.float32, seed=3)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, backend="tensorized")
    want = loss(x[0].double(), y[0].double())
    for backend in ["reference", "cpu"]:
        got = xlt_fast.sinkhorn_divergence(x, y, backend=backend)
        assert torch.isfinite(got).all()
        assert rel(got[0], want) < 1e-4


@pytest.mark.parametrize("precomputed", [False, True])
def test_reference_matches_pot_fixed_eps(precomputed):
    import ot
    x, y, _, _ = clouds(2, 9, 6, 5, scale=0.7)
    eps, iters = 0.5, 1000
    for k in range(2):
        C = 0.5 * torch.cdist(x[k], y[k]) ** 2
        a, b = torch.full((9,), 1 / 9, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
        plan_pot = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=iters, stopThr=0)
        cost_pot = ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", numItermax=iters, stopThr=0)
        if precomputed:
            r = xlt_fast.sinkhorn(cost=C, eps=eps, n_iters=iters, return_plan=True, backend="reference")
        else:
            r = xlt_fast.sinkhorn(x[k], y[k], eps=eps, n_iters=iters, return_plan=True, backend="reference")
        assert rel(r.plan, plan_pot) < 1e-7
        assert abs(float((r.plan * C).sum() - cost_pot)) < 1e-7 * float(cost_pot)
        # the dual value is the entropic cost <P, C> + eps KL(P | a (x) b)
        kl = (r.plan * (r.plan / (a[:, None] * b[None, :])).log()).sum()
        assert abs(float(r.cost - (r.plan * C).sum() - eps * kl)) < 1e-7 * float(r.cost)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_plan_marginals_at_convergence(backend):
    x, y, xm, ym = clouds(3, 10, 8, 4, masks=True, seed=5)
    r = xlt_fast.sinkhorn(x, y, x_mask=xm, y_mask=ym, eps=0.1, n_iters=5000, tol=1e-10, return_plan=True,
                          backend=backend)
    a = xm.double() / xm.sum(1, keepdim=True)
    b = ym.double() / ym.sum(1, keepdim=True)
    assert (r.plan.sum(2) - a).abs().max() < 1e-9
    assert (r.plan.sum(1) - b).abs().max() < 1e-9
    assert (r.n_iters < 5000).all() and len(set(r.n_iters.tolist())) > 1  # per-problem early exit


# ----------------------------------------------------------------------------- kernels vs reference
def _run(fn, x, y, **kw):
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    v = fn(xr, yr, **kw)
    weights = torch.linspace(1, 2, v.shape[0], dtype=v.dtype, device=v.device)
    gx, gy = torch.autograd.grad((v * weights).sum(), (xr, yr))
    return v, gx, gy


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cost", COSTS)
def test_divergence_kernel_matches_reference(backend, device, cost):
    small = backend == "triton"
    B, n, m, d = (3, 6, 5, 4) if small else (4, 13, 9, 16)
    x, y, xm, ym = clouds(B, n, m, d, scale=0.5, offset=1.0, dtype=torch.float32, masks=True, seed=7)
    want = _run(xlt_fast.sinkhorn_divergence, x.double(), y.double(), x_mask=xm, y_mask=ym, cost=cost,
                backend="reference")
    x, y, xm, ym = x.to(device), y.to(device), xm.to(device), ym.to(device)
    got = _run(xlt_fast.sinkhorn_divergence, x, y, x_mask=xm, y_mask=ym, cost=cost, backend=backend)
    assert rel(got[0], want[0]) < 1e-5
    assert rel(got[1], want[1]) < 1e-4 and rel(got[2], want[2]) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sinkhorn_kernel_matches_reference_weights_plan(backend, device):
    x, y, xm, ym = clouds(3, 7, 5, 4, scale=0.5, dtype=torch.float32, masks=True, seed=8)
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 7, generator=g) + 0.1, torch.rand(3, 5, generator=g) + 0.1
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    want = xlt_fast.sinkhorn(x.double(), y.double(), ar, br, xm, ym, return_plan=True, backend="reference")
    wa, wb = torch.autograd.grad(want.cost.sum(), (ar, br))
    ag, bg = a.to(device).requires_grad_(), b.to(device).requires_grad_()
    got = xlt_fast.sinkhorn(x.to(device), y.to(device), ag, bg, xm.to(device), ym.to(device), return_plan=True,
                            backend=backend)
    ga, gb = torch.autograd.grad(got.cost.sum(), (ag, bg))
    assert rel(got.cost, want.cost) < 1e-5
    assert rel(got.f, want.f) < 1e-5 and rel(got.g, want.g) < 1e-5
    assert rel(ga, wa) < 1e-4 and rel(gb, wb) < 1e-4
    assert rel(got.plan, want.plan) < 1e-4
    assert torch.equal(got.n_iters.cpu(), want.n_iters)


def test_cpu_kernel_float64_bert_scale():
    """Float64 removes rounding: the C++ loop must reproduce the reference almost exactly at
    BERT-like norms and eps = 0.0025."""
    x, y, xm, ym = clouds(4, 30, 25, 48, scale=1.0, offset=2.5, masks=True, seed=11)
    want = _run(xlt_fast.sinkhorn_divergence, x, y, x_mask=xm, y_mask=ym, backend="reference")
    got = _run(xlt_fast.sinkhorn_divergence, x, y, x_mask=xm, y_mask=ym, backend="cpu")
    for w, g_ in zip(want, got):
        assert rel(g_, w) < 1e-9


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_single_point_and_all_masked(backend, device):
    x, y, _, _ = clouds(3, 4, 1, 3, scale=0.5, dtype=torch.float32, seed=4)
    xm = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    ym = torch.tensor([[True], [True], [True]])
    outs = []
    for be, dev in [("reference", "cpu"), (backend, device)]:
        xr = x.to(dev).requires_grad_()
        yr = y.to(dev).requires_grad_()
        v = xlt_fast.sinkhorn_divergence(xr, yr, x_mask=xm.to(dev), y_mask=ym.to(dev), backend=be)
        gx, gy = torch.autograd.grad(v.sum(), (xr, yr))
        r = xlt_fast.sinkhorn(x.to(dev), y.to(dev), x_mask=xm.to(dev), y_mask=ym.to(dev), return_plan=True,
                              backend=be)
        outs.append((v, gx, gy, r.cost, r.plan))
        for t in outs[-1]:
            assert torch.isfinite(t).all()
        assert v[1] == 0 and r.cost[1] == 0 and (gx[1] == 0).all() and (r.plan[1] == 0).all()
        # one target point: every source point sends all its mass there (float32 plan entries carry
        # a relative error ~ 2^-24 |C| / eps ~ 1e-5 here)
        assert abs(float(r.plan[0].sum()) - 1) < 1e-4
    for w, g_ in zip(*outs):
        assert rel(g_, w) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_precomputed_cost_matches_points(backend, device):
    x, y, xm, ym = clouds(2, 6, 5, 3, scale=0.5, dtype=torch.float32, masks=True, seed=9)
    x, y, xm, ym = x.to(device), y.to(device), xm.to(device), ym.to(device)
    C = (0.5 * torch.cdist(x.double(), y.double()) ** 2).requires_grad_()
    kw = dict(eps=0.05, n_iters=100, x_mask=xm, y_mask=ym)
    points = xlt_fast.sinkhorn(x, y, backend=backend, **kw)
    want = xlt_fast.sinkhorn(cost=C, backend="reference", **kw)
    (wC,) = torch.autograd.grad(want.cost.sum(), (C,))
    Cf = C.detach().float().requires_grad_()
    got = xlt_fast.sinkhorn(cost=Cf, backend=backend, **kw)
    (gC,) = torch.autograd.grad(got.cost.sum(), (Cf,))
    assert rel(points.cost, want.cost) < 1e-5 and rel(got.cost, want.cost) < 1e-5
    assert rel(gC, wC) < 1e-4
    # d OT / d C is the plan (envelope theorem), up to the convergence of 100 iterations
    plan = xlt_fast.sinkhorn(cost=C.detach(), return_plan=True, backend="reference", **kw).plan
    assert (wC - plan).abs().max() < 1e-3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_padded_batch_equals_unpadded(backend):
    B, d = 4, 8
    g = torch.Generator().manual_seed(6)
    sizes = [(5, 9), (12, 3), (1, 7), (12, 9)]
    n, m = 12, 9
    x = torch.randn(B, n, d, generator=g) + 2.0
    y = torch.randn(B, m, d, generator=g) + 2.0
    xm = torch.arange(n) < torch.tensor([s[0] for s in sizes]).unsqueeze(1)
    ym = torch.arange(m) < torch.tensor([s[1] for s in sizes]).unsqueeze(1)
    xp = torch.where(xm.unsqueeze(-1), x, 1e3)  # padding values must not matter
    yp = torch.where(ym.unsqueeze(-1), y, -1e3)
    batch = _run(xlt_fast.sinkhorn_divergence, xp, yp, x_mask=xm, y_mask=ym, backend=backend)
    r = xlt_fast.sinkhorn(xp, yp, x_mask=xm, y_mask=ym, backend=backend)
    for k, (nk, mk) in enumerate(sizes):
        one = _run(xlt_fast.sinkhorn_divergence, x[k:k + 1, :nk], y[k:k + 1, :mk], backend=backend)
        rk = xlt_fast.sinkhorn(x[k, :nk], y[k, :mk], backend=backend)
        scale = float(one[0].abs().max())
        assert abs(float(batch[0][k] - one[0][0])) <= 1e-6 * scale
        assert rel(batch[1][k, :nk] / (1 + k / (B - 1)), one[1][0]) <= 1e-6
        assert (batch[1][k, nk:] == 0).all() and (batch[2][k, mk:] == 0).all()
        assert abs(float(r.cost[k] - rk.cost)) <= 1e-6 * abs(float(rk.cost))
        assert (r.f[k, :nk] - rk.f).abs().max() <= 1e-6 * rk.f.abs().max()
        assert (r.f[k, nk:] == 0).all() and int(r.n_iters[k]) == int(rk.n_iters)


# ----------------------------------------------------------------------------- op machinery
def test_opcheck():
    x, y, xm, ym = clouds(2, 5, 4, 3, dtype=torch.float32, masks=True, seed=12)
    aw, bw = xm.float() / xm.sum(1, keepdim=True), ym.float() / ym.sum(1, keepdim=True)
    ops = torch.ops.xlt_fast
    xr, yr = x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(ops.sinkhorn_points.default,
                          (xr, yr, aw, bw, xm, ym, "half_sqeuclidean", -1.0, 0.05, 0.5, 1, -1.0, True, 0, "cpu"))
    C = torch.rand(2, 5, 4).requires_grad_()
    real = xm.unsqueeze(2) & ym.unsqueeze(1)
    torch.library.opcheck(ops.sinkhorn_matrix.default, (C, aw, bw, real, 0.1, 0.05, 0.5, 20, 1e-6, 0, "cpu"))
    log_eps0 = torch.zeros(2, dtype=torch.float64)
    n_anneal = torch.full((2,), 3, dtype=torch.int32)
    torch.library.opcheck(ops.sinkhorn_solve.default,
                          (C.detach(), ref.log_weights(aw), ref.log_weights(bw), log_eps0, n_anneal, -1.0, 0.05,
                           5, -1.0, False, 0, "cpu"))
    for rule in (1, 3):  # alternate updates, with the L1 and POT's L2 test
        torch.library.opcheck(ops.sinkhorn_solve.default,
                              (C.detach(), ref.log_weights(aw), ref.log_weights(bw), log_eps0, n_anneal, -1.0,
                               0.05, 5, 1e-4, False, rule, "cpu"))
    for cols in (False, True):
        torch.library.opcheck(ops.sinkhorn_plan.default,
                              (C.detach(), torch.randn(2, 5 if cols else 4), aw if not cols else bw, 0.1, cols, "cpu"))


def test_hard_coupling_and_average():
    P = torch.tensor([[[0.1, 0.5, 0.0], [0.3, 0.2, 0.0]], [[0.2, 0.1, 0.7], [0.1, 0.6, 0.3]]])
    avg = xlt_fast.average_plans([P[0], P[1]])
    assert torch.allclose(avg, (P[0] + P[1]) / 2)
    ym = torch.tensor([[True, True, False], [True, True, True]])
    H = xlt_fast.hard_coupling(P, ym)
    want = torch.tensor([[[0, 0.5, 0], [0.5, 0, 0]], [[1 / 3, 0, 1 / 3], [0, 1 / 3, 0]]])
    assert torch.allclose(H, want)


@pytest.mark.parametrize("call,match", [
    (lambda x, y: xlt_fast.sinkhorn(x, y[..., :2]), "feature size d"),
    (lambda x, y: xlt_fast.sinkhorn(x, y[:1]), "batch size B"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, eps=0.0), "eps must be a finite number > 0"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, eps=-1.0), "eps must be a finite number > 0"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, scaling=1.5), "scaling must be in"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, n_iters=0), "n_iters must be an int >= 1"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, a=-torch.ones(2, 4)), "a must be non-negative"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, b=torch.zeros(2, 5)), "b must have a positive total"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, a=torch.ones(2, 3)), r"a must have shape \(2, 4\)"),
    (lambda x, y: xlt_fast.sinkhorn(x.masked_fill(x > 0.5, float("nan")), y), "x contains NaN"),
    (lambda x, y: xlt_fast.sinkhorn_divergence(x, y, cost="l1"), "cost must be one of"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, cost=torch.rand(2, 4, 5)), "x and y must be None"),
    (lambda x, y: xlt_fast.sinkhorn(cost=torch.rand(4, 5, 6, 7)), r"shape \(B, n, m\)"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, x_mask=torch.ones(2, 3, dtype=torch.bool)), "x_mask must have shape"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, update="jacobi"), "update must be one of"),
    (lambda x, y: xlt_fast.sinkhorn(x, y, eps=0.1, tol=1e-3, stop="pot"), "stop='pot' needs update='alternate'"),
])
def test_bad_inputs(call, match):
    x, y, _, _ = clouds(2, 4, 5, 3, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, y)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("path", ["tile", "tiled"])
def test_triton_solver_paths_match_reference(path, symmetric):
    """Both Triton code paths (on-chip tile; streamed tiles, forced here with 16-wide blocks) with
    early exit, against the reference loop."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from xlt_fast.kernels import sinkhorn as K

    B, n, m = 3, 12, 12 if symmetric else 20
    x, y, xm, ym = clouds(B, n, m, 3, scale=0.5, dtype=torch.float32, masks=True, seed=13)
    if symmetric:
        y, ym = x, xm
    C = ref.cost_matrix(x, y, "half_sqeuclidean", xm, ym)
    la = ref.log_weights(xm.float() / xm.sum(1, keepdim=True))
    lb = ref.log_weights(ym.float() / ym.sum(1, keepdim=True))
    log_eps0 = torch.tensor([0.0, -1.0, 0.5], dtype=torch.float64)
    n_anneal = torch.tensor([4, 0, 2], dtype=torch.int32)
    args = (math.log(0.25), 0.1, 60, 1e-4)
    fp, gp, iters = ref.solve(C.double(), la.double(), lb.double(), log_eps0, n_anneal, *args[:3], args[3],
                              symmetric)
    dev = [t.to(device) for t in (C, la, lb, log_eps0, n_anneal)]
    if path == "tile":
        got = K.solve(*dev, *args, symmetric)
    else:
        got = [torch.empty(B, n, device=device), torch.empty(B, m, device=device),
               torch.empty(B, n, device=device), torch.empty(B, m, device=device),
               torch.empty(B, dtype=torch.int32, device=device)]
        K.tiled(dev[0], dev[1], dev[2], dev[3], dev[4], *got, *args, symmetric, block_o=16, block_r=16)
    assert torch.equal(got[4].cpu(), iters) and (iters < 60 + n_anneal).any()
    assert rel(got[0][xm], fp[xm]) < 1e-5 and rel(got[1][ym], gp[ym]) < 1e-5


def test_compiles_fullgraph():
    """The op path has no graph break (no data-dependent host sync): torch.compile(fullgraph=True)
    traces the custom ops through their fake kernels, forward and backward."""
    x, y, xm, ym = clouds(3, 7, 6, 5, dtype=torch.float32, masks=True, seed=14)
    fn = lambda u, v: xlt_fast.sinkhorn_divergence(u, v, x_mask=xm, y_mask=ym, backend="cpu")  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = _run(compiled, x, y)
    want = _run(fn, x, y)
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


# ----------------------------------------------------------------------------- non-finite policy
ALL_BACKENDS = [("reference", "cpu")] + BACKENDS
NONFINITE = [float("nan"), float("inf")]


def _planted_inputs(device):
    """Weighted, padded problems (problem 2 has no real source point) with their padded entries."""
    x, y, _, _ = clouds(3, 6, 5, 3, scale=0.5, dtype=torch.float32, seed=15)
    xm = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0] * 6], dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(16)
    a, b = torch.rand(3, 6, generator=g) + 0.1, torch.rand(3, 5, generator=g) + 0.1
    inputs = {"x": x, "y": y, "a": a, "b": b}
    padded = {"x": ~xm, "y": ~ym, "a": ~xm, "b": ~ym}
    return {k: v.to(device) for k, v in inputs.items()}, {k: v.to(device) for k, v in padded.items()}, \
        xm.to(device), ym.to(device)


def _with_grads(fn, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    v = fn(**leaves)
    weights = torch.linspace(1, 2, v.shape[0], dtype=v.dtype, device=v.device)
    return (v, *torch.autograd.grad((v * weights).sum(), list(leaves.values())))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["x", "y", "a", "b", "cost"])
@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_real_entry_is_an_error(backend, device, name, bad):
    """NaN / inf in a real entry (of problem 0) is a ValueError naming the input; check_finite=False
    skips the check, and the other problems are unaffected."""
    inputs, padded, xm, ym = _planted_inputs(device)
    kw = dict(x_mask=xm, y_mask=ym, backend=backend)
    fns = [lambda **k: xlt_fast.sinkhorn(**k, **kw).cost]
    if name == "cost":
        inputs = {"cost": torch.rand(3, 6, 5, device=device)}
        real = xm.unsqueeze(2) & ym.unsqueeze(1)
    else:
        fns.append(lambda **k: xlt_fast.sinkhorn_divergence(**k, **kw))
        real = ~padded[name]
    planted = dict(inputs, **{name: inputs[name].clone()})
    planted[name][tuple(real.nonzero()[0].tolist())] = bad
    for fn in fns:
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            fn(**planted)
        skipped = fn(**planted, check_finite=False)
        assert torch.equal(skipped[1:], fn(**inputs)[1:])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_padded_entries_are_never_read(backend, device, bad):
    """NaN / inf in padded entries of x, y, a, b give exactly the unplanted values and gradients."""
    inputs, padded, xm, ym = _planted_inputs(device)
    planted = {k: torch.where(padded[k].unsqueeze(-1) if v.dim() == 3 else padded[k], bad, v)
               for k, v in inputs.items()}
    fns = [lambda **k: xlt_fast.sinkhorn(**k, x_mask=xm, y_mask=ym, backend=backend).cost,
           lambda **k: xlt_fast.sinkhorn_divergence(**k, x_mask=xm, y_mask=ym, backend=backend)]
    for fn in fns:
        want, got = _with_grads(fn, inputs), _with_grads(fn, planted)
        for w, g_ in zip(want, got):
            assert torch.isfinite(g_).all() and torch.equal(g_, w)
    r_want = xlt_fast.sinkhorn(**inputs, x_mask=xm, y_mask=ym, return_plan=True, backend=backend)
    r_got = xlt_fast.sinkhorn(**planted, x_mask=xm, y_mask=ym, return_plan=True, backend=backend)
    for field in ("f", "g", "plan", "n_iters", "marginal_error"):
        assert torch.equal(getattr(r_got, field), getattr(r_want, field))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_padded_cost_entries_are_never_read(backend, device, bad):
    _, _, xm, ym = _planted_inputs(device)
    C = torch.rand(3, 6, 5, device=device)
    real = xm.unsqueeze(2) & ym.unsqueeze(1)
    outs = []
    for cost in (C, torch.where(real, C, bad)):
        cr = cost.clone().requires_grad_()
        r = xlt_fast.sinkhorn(cost=cr, x_mask=xm, y_mask=ym, eps=0.1, return_plan=True, backend=backend)
        (gC,) = torch.autograd.grad(r.cost.sum(), (cr,))
        outs.append((r.cost, gC, r.f, r.g, r.plan, r.marginal_error))
    for w, g_ in zip(*outs):
        assert torch.isfinite(g_).all() and torch.equal(g_, w)
    assert (outs[1][1][~real] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_extreme_weights_are_normalised(backend):
    """Weights whose total underflows (subnormal) or overflows the points' dtype are still
    normalised: the same result as the uniform weights they are proportional to."""
    x, y, xm, ym = clouds(2, 6, 5, 3, dtype=torch.float32, masks=True, seed=17)
    want = xlt_fast.sinkhorn(x, y, x_mask=xm, y_mask=ym, backend=backend).cost
    for a in (torch.full((2, 6), 1e-40), torch.full((2, 6), 1e300, dtype=torch.float64)):
        got = xlt_fast.sinkhorn(x, y, a, x_mask=xm, y_mask=ym, backend=backend).cost
        assert rel(got, want) < 1e-6


# ----------------------------------------------------------------------------- degenerate plans
def test_hard_coupling_zero_columns_and_problems():
    P = torch.tensor([[[0.0, 0.5, 0.0], [0.0, 0.2, 0.3]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    H = xlt_fast.hard_coupling(P)
    want = torch.tensor([[[0, 1 / 3, 0], [0, 0, 1 / 3]], [[0, 0, 0], [0, 0, 0]]])
    assert torch.equal(H, want)  # an all-zero column and an all-zero problem get no mass
    assert torch.equal(xlt_fast.hard_coupling(torch.zeros(0, 4)), torch.zeros(0, 4))


def test_hard_coupling_nonfinite():
    P = torch.tensor([[[0.1, 0.5, 0.0], [0.3, 0.2, 0.0]]])
    ym = torch.tensor([[True, True, False]])
    want = xlt_fast.hard_coupling(P, ym)
    for bad in NONFINITE:
        planted = P.clone()
        planted[0, :, 2] = bad  # a padded column: never read
        assert torch.equal(xlt_fast.hard_coupling(planted, ym), want)
        planted[0, 1, 0] = bad
        with pytest.raises(ValueError, match="plan contains NaN or inf"):
            xlt_fast.hard_coupling(planted, ym)
        assert xlt_fast.hard_coupling(planted, ym, check_finite=False).shape == P.shape


def test_average_plans_bad_inputs():
    P = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="plans is an empty list"):
        xlt_fast.average_plans([])
    with pytest.raises(ValueError, match="L >= 1"):
        xlt_fast.average_plans(torch.zeros(0, 2, 3, 4))
    with pytest.raises(ValueError, match=r"plans\[1\] has shape \(2, 3, 5\) but plans\[0\] has \(2, 3, 4\)"):
        xlt_fast.average_plans([P, torch.rand(2, 3, 5)])
    with pytest.raises(TypeError, match=r"plans\[1\] has dtype torch.float64"):
        xlt_fast.average_plans([P, P.double()])
    with pytest.raises(ValueError, match=r"plans\[1\] is on meta"):
        xlt_fast.average_plans([P, P.to("meta")])
    with pytest.raises(TypeError, match=r"plans\[0\] must be a floating tensor"):
        xlt_fast.average_plans([P.long(), P.long()])
    for bad in NONFINITE:
        Q = P.clone()
        Q[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"plans\[1\] contains NaN or inf"):
            xlt_fast.average_plans([P, Q])
        with pytest.raises(ValueError, match="plans contains NaN or inf"):
            xlt_fast.average_plans(torch.stack([P, Q]))
        assert xlt_fast.average_plans([P, Q], check_finite=False).shape == P.shape
    assert torch.equal(xlt_fast.average_plans(torch.stack([P, 3 * P])), 2 * P)


# ----------------------------------------------------------------------------- non-convergence
@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_unconverged_tol_warns_and_marginal_error(backend, device):
    """eps-scaling to blur = 1e-4 on a cost in [-1, 1] stops far from convergence (marginals off by
    ~0.3 after 1000 iterations as after 100; POT warns here too); a moderate eps converges.
    marginal_error agrees with the returned plan's marginals."""
    from xlt_fast.ops.sinkhorn import ConvergenceWarning
    g = torch.Generator().manual_seed(18)
    C = (2 * torch.rand(2, 12, 10, generator=g, dtype=torch.float64) - 1).to(device)
    if backend == "triton":
        C = C.float()

    def plan_violation(r):
        return (r.plan.sum(2) - 1 / 12).abs().sum(1) + (r.plan.sum(1) - 1 / 10).abs().sum(1)

    with pytest.warns(ConvergenceWarning, match=r"2 of 2 problems did not reach tol=0.001 in n_iters=100 "
                                                r"\(largest marginal violation 0\.\d+\)"):
        r = xlt_fast.sinkhorn(cost=C, blur=1e-4, n_iters=100, tol=1e-3, return_plan=True, backend=backend)
    assert (r.marginal_error > 0.1).all() and (plan_violation(r) > 0.1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        xlt_fast.sinkhorn(cost=C, blur=1e-4, n_iters=100, tol=1e-3, warn=False, backend=backend)
        xlt_fast.sinkhorn(cost=C, blur=1e-4, n_iters=100, backend=backend)  # no tol: read marginal_error
        r = xlt_fast.sinkhorn(cost=C, eps=0.2, n_iters=1000, tol=1e-5, return_plan=True, backend=backend)
        assert (r.marginal_error < 1e-5).all() and (plan_violation(r) < 1e-5).all()
        assert (r.n_iters < 1000).all()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_unconverged_divergence_warns(backend, device):
    from xlt_fast.ops.sinkhorn import ConvergenceWarning
    x, y, xm, ym = clouds(2, 6, 5, 3, scale=0.5, dtype=torch.float32, masks=True, seed=19)
    x, y, xm, ym = x.to(device), y.to(device), xm.to(device), ym.to(device)
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn_divergence: \d of 2 problems did not reach tol"):
        xlt_fast.sinkhorn_divergence(x, y, x_mask=xm, y_mask=ym, n_iters=2, tol=1e-4, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        xlt_fast.sinkhorn_divergence(x, y, x_mask=xm, y_mask=ym, blur=0.5, n_iters=1000, tol=1e-4,
                                     backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA default needs a GPU")
def test_unconverged_warning_is_opt_in_on_cuda():
    from xlt_fast.ops.sinkhorn import ConvergenceWarning
    C = 2 * torch.rand(2, 12, 10, device="cuda") - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        r = xlt_fast.sinkhorn(cost=C, blur=1e-4, n_iters=1000, tol=1e-3, backend="triton")
    assert (r.marginal_error > 0.1).all()
    with pytest.warns(ConvergenceWarning):
        xlt_fast.sinkhorn(cost=C, blur=1e-4, n_iters=1000, tol=1e-3, warn=True, backend="triton")


def test_compiles_fullgraph_with_tol():
    """The value checks and the convergence warning are skipped while tracing: no graph break."""
    x, y, xm, ym = clouds(2, 6, 5, 3, scale=0.5, dtype=torch.float32, masks=True, seed=19)
    fn = lambda u, v: xlt_fast.sinkhorn_divergence(u, v, x_mask=xm, y_mask=ym, n_iters=2, tol=1e-4,  # noqa: E731
                                                   backend="cpu")
    from xlt_fast.ops.sinkhorn import ConvergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, y)
    with pytest.warns(ConvergenceWarning):
        want = fn(x, y)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- update and stopping rules
def test_reference_alternate_matches_pot_solve_batch():
    """update="alternate", stop="pot" is POT solve_batch's log-Sinkhorn: the same plans at a fixed eps
    (to 1e-9 at convergence, float64), and with the same tol both end below it on POT's quantity;
    the alternate rule needs about half the averaged rule's updates."""
    from ot.batch import solve_batch
    x, y, _, _ = clouds(3, 9, 7, 5, scale=0.7, seed=21)
    C = 0.5 * torch.cdist(x, y) ** 2
    eps = 0.3
    pot = solve_batch(C, eps, max_iter=3000, tol=1e-12, method="log_sinkhorn", reg_type="kl", grad="detach")
    alt = xlt_fast.sinkhorn(cost=C, eps=eps, n_iters=3000, tol=1e-12, update="alternate", stop="pot",
                            return_plan=True, backend="reference")
    assert rel(alt.plan, pot.plan) < 1e-9
    tol, iters = 1e-6, {}
    for update, stop in (("alternate", "pot"), ("alternate", "marginals"), ("averaged", "marginals")):
        r = ref.sinkhorn(None, None, None, None, None, None, C, eps, n_iters=3000, tol=tol, update=update, stop=stop)
        assert (r["stop_error"] < tol).all() and (r["iters"] < 3000).all()
        iters[update, stop] = r["iters"].double().mean()
        if stop == "pot":
            n_pot = int(r["iters"].max())
    from ot.batch._utils import bregman_log_projection_batch
    pot_iters = int(bregman_log_projection_batch(-C / eps, max_iter=3000, tol=tol)["n_iters"]) + 1
    assert abs(pot_iters - n_pot) <= 11  # the same test; POT evaluates it (on the batch) every 10 updates
    assert iters["alternate", "pot"] <= iters["alternate", "marginals"]  # L1 of both >= L2 of the rows
    assert iters["averaged", "marginals"] > 1.5 * iters["alternate", "marginals"]


@pytest.mark.parametrize("update,stop", [("alternate", "pot"), ("alternate", "marginals")])
def test_cpu_alternate_matches_reference(update, stop):
    """The C++ kernel's alternate updates and both stopping rules against the reference: the same
    per-problem iteration counts (the tests compute the same float64 numbers) and potentials, masks."""
    x, y, xm, ym = clouds(4, 12, 9, 6, masks=True, seed=22)
    kw = dict(x_mask=xm, y_mask=ym, eps=0.2, n_iters=2000, tol=1e-7, update=update, stop=stop, return_plan=True)
    want = xlt_fast.sinkhorn(x, y, backend="reference", **kw)
    got = xlt_fast.sinkhorn(x, y, backend="cpu", **kw)
    assert torch.equal(got.n_iters, want.n_iters) and (want.n_iters < 2000).all()
    assert rel(got.cost, want.cost) < 1e-12 and rel(got.plan, want.plan) < 1e-10
    g32 = xlt_fast.sinkhorn(x.float(), y.float(), backend="cpu", **{**kw, "tol": 1e-4})
    w32 = xlt_fast.sinkhorn(x, y, backend="reference", **{**kw, "tol": 1e-4})
    assert rel(g32.cost, w32.cost) < 1e-5 and (g32.n_iters - w32.n_iters).abs().max() <= 2


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_warning_when_every_problem_stopped(backend):
    """A problem that the solver stopped early is never reported above tol (the report and the test
    compute the same float64 numbers; they once differed at float32 rounding: 1.00048e-5 > 1e-5)."""
    from xlt_fast.ops.sinkhorn import ConvergenceWarning
    g = torch.Generator().manual_seed(23)
    C = torch.rand(64, 20, 16, generator=g) * 0.6 + 0.07
    for update, stop in (("averaged", "marginals"), ("alternate", "pot")):
        for tol in (1e-4, 1e-5):
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                r = xlt_fast.sinkhorn(cost=C, eps=0.05, n_iters=5000, tol=tol, update=update, stop=stop,
                                      backend=backend)
            assert (r.n_iters < 5000).all()
