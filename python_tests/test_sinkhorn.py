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
                          (xr, yr, aw, bw, xm, ym, "half_sqeuclidean", -1.0, 0.05, 0.5, 1, -1.0, True, "cpu"))
    C = torch.rand(2, 5, 4).requires_grad_()
    real = xm.unsqueeze(2) & ym.unsqueeze(1)
    torch.library.opcheck(ops.sinkhorn_matrix.default, (C, aw, bw, real, 0.1, 0.05, 0.5, 20, 1e-6, "cpu"))
    log_eps0 = torch.zeros(2, dtype=torch.float64)
    n_anneal = torch.full((2,), 3, dtype=torch.int32)
    torch.library.opcheck(ops.sinkhorn_solve.default,
                          (C.detach(), ref.log_weights(aw), ref.log_weights(bw), log_eps0, n_anneal, -1.0, 0.05,
                           5, -1.0, False, "cpu"))
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
