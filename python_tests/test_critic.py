"""critic_gp: every kernel backend against the autograd double-backward reference.

Tolerances: float64 to 1e-8 and float32 to 1e-5, relative to each output's scale (max(1, max|ref|)).
The float32 kernels are compared with the float64 reference on the same data; their error is GEMM
rounding (about sqrt(d*k) * 2^-24 per entry), far below 1e-5 at these sizes. The kernels compute
the interpolated pre-activation as a h_s + (1 - a) h_t rather than W1 x~ + b1; that differs by
rounding only, and a ReLU mask could flip only on a |h~| below 1e-6, which the fixed seeds avoid.
"""
import pytest
import torch

import xlt_fast
from xlt_fast.nn import WassersteinCritic
from xlt_fast.ops import critic as ops
from xlt_fast.reference import critic as ref

from conftest import kernel_backends

BACKENDS = kernel_backends("cpu", "cuda")
TOL = {torch.float64: 1e-8, torch.float32: 1e-5}


def _problem(n, m, d, H, k, weighted, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    critic = WassersteinCritic(d, H, k, dtype=torch.float64)
    with torch.no_grad():
        for prm in critic.parameters():  # larger than the default init: O(1) values and gradients
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64) / 2)
    data = {"z_src": torch.randn(n, d, generator=g, dtype=torch.float64),
            "z_tgt": torch.randn(m, d, generator=g, dtype=torch.float64) + 0.3,
            "p_src": torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) if k else None,
            "p_tgt": torch.softmax(torch.randn(m, k, generator=g, dtype=torch.float64), -1) if k else None,
            "src_weight": torch.rand(n, generator=g, dtype=torch.float64) + 0.1 if weighted else None,
            "alpha": torch.rand(min(n, m), generator=g, dtype=torch.float64)}
    critic = critic.to(device=device, dtype=dtype)
    data = {key: None if v is None else v.to(device=device, dtype=dtype) for key, v in data.items()}
    for key in ("z_src", "z_tgt", "src_weight"):
        if data[key] is not None:
            data[key].requires_grad_(True)
    return critic, data


def _leaves(critic, data):
    return list(critic.parameters()) + [data[key] for key in ("z_src", "z_tgt", "src_weight") if data[key] is not None]


def _run(critic, data, backend, coefs=(0.7, 1.3), **kw):
    """Values and gradients of ``coefs[0] * estimate + coefs[1] * penalty`` w.r.t. every leaf."""
    est, pen = critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], data["src_weight"],
                                alpha=data["alpha"], backend=backend, **kw)
    loss = sum(c * v for c, v in zip(coefs, (est, pen)) if c)
    grads = torch.autograd.grad(loss, _leaves(critic, data), materialize_grads=True)
    return [est.detach(), pen.detach()] + list(grads)


def _reference(critic, data, coefs=(0.7, 1.3), detach_penalty_features=True, normalize="sum_w"):
    c64 = WassersteinCritic(critic.in_features, critic.hidden, critic.num_classes, dtype=torch.float64)
    c64.load_state_dict({key: v.detach().double().cpu() for key, v in critic.state_dict().items()})
    d64 = {key: None if v is None else v.detach().double().cpu() for key, v in data.items()}
    for key in ("z_src", "z_tgt", "src_weight"):
        if d64[key] is not None:
            d64[key].requires_grad_(True)
    est, pen = ref.critic_gp(*c64.critic_params, d64["z_src"], d64["z_tgt"], d64["p_src"], d64["p_tgt"],
                             d64["src_weight"], d64["alpha"], detach_penalty_features, normalize)
    loss = sum(c * v for c, v in zip(coefs, (est, pen)) if c)
    grads = torch.autograd.grad(loss, _leaves(c64, d64), materialize_grads=True)
    return [est.detach(), pen.detach()] + list(grads)


def _assert_close(out, expected, tol):
    names = ["estimate", "penalty", "W1", "b1", "w2", "b2", "z_src", "z_tgt", "src_weight"]
    for name, a, b in zip(names, out, expected):
        assert a.shape == b.shape, name
        err = float((a.detach().double().cpu() - b).abs().max()) / max(1.0, float(b.abs().max()))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,m", [(7, 5), (4, 9)])
def test_matches_double_backward(backend, device, dtype, k, weighted, n, m):
    critic, data = _problem(n, m, 6, 48, k, weighted, dtype, device)
    _assert_close(_run(critic, data, backend), _reference(critic, data), TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [None, 3])
def test_normalize_by_n(backend, device, dtype, k):
    """normalize="n" (the IWDA authors' (1/n) sum_i w_i f(xs_i)): every backend against the reference,
    gradients w.r.t. the weights included."""
    critic, data = _problem(7, 5, 6, 48, k, True, dtype, device)
    _assert_close(_run(critic, data, backend, normalize="n"), _reference(critic, data, normalize="n"), TOL[dtype])


def test_normalize_reference_formulas():
    """The reference's two normalisations against the critic values written out by hand."""
    critic, data = _problem(6, 4, 5, 16, 3, True, torch.float64, "cpu")
    zs, zt, ps, pt, w = (data[k].detach() if data[k] is not None else None
                         for k in ("z_src", "z_tgt", "p_src", "p_tgt", "src_weight"))
    fs, ft = critic(zs, ps), critic(zt, pt)
    for normalize, z in (("sum_w", w.sum()), ("n", 6.0)):
        est, _ = ref.critic_gp(*critic.critic_params, zs, zt, ps, pt, w, data["alpha"], normalize=normalize)
        torch.testing.assert_close(est, (w * fs).sum() / z - ft.mean(), rtol=1e-12, atol=1e-12)
    est_n, _ = ref.critic_gp(*critic.critic_params, zs, zt, ps, pt, 2 * w, data["alpha"], normalize="n")
    est_s, _ = ref.critic_gp(*critic.critic_params, zs, zt, ps, pt, 2 * w, data["alpha"])
    assert not torch.allclose(est_n, est_s)  # "n" sees the scale of w, "sum_w" does not


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_normalize_by_n_allows_zero_weights(backend, device):
    """With Z = n, all-zero weights are well defined (the source term vanishes); "sum_w" refuses them."""
    critic, data = _problem(5, 4, 3, 8, 2, True, torch.float64, device)
    data["src_weight"] = torch.zeros(5, dtype=torch.float64, device=device)
    est, _ = critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], data["src_weight"],
                              alpha=data["alpha"], normalize="n", backend=backend)
    torch.testing.assert_close(est, -critic(data["z_tgt"].detach(), data["p_tgt"]).mean().detach())
    with pytest.raises(ValueError, match="not all zero"):
        critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], data["src_weight"],
                         alpha=data["alpha"], backend=backend)
    with pytest.raises(ValueError, match="normalize"):
        critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], normalize="mean")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("coefs", [(1.0, 0.0), (0.0, 1.0)])
def test_one_output_used(backend, device, coefs):
    """Only the estimate or only the penalty in the loss (the other output gets no gradient)."""
    critic, data = _problem(6, 6, 5, 32, 4, True, torch.float64, device)
    _assert_close(_run(critic, data, backend, coefs), _reference(critic, data, coefs), 1e-8)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,m", [(7, 4), (3, 8)])
def test_blocked(backend, device, n, m, monkeypatch):
    """Large problems are processed in blocks: y and e by rows (here 2 paired rows, then 4 rest
    rows per block), T = M~^T G by rows of W1 (7 here, the last block short)."""
    monkeypatch.setattr(ops, "Y_BLOCK", 4 * 40 * 3)
    monkeypatch.setattr(ops, "T_BLOCK", 7 * 15)
    critic, data = _problem(n, m, 5, 40, 3, True, torch.float64, device)
    _assert_close(_run(critic, data, backend), _reference(critic, data), 1e-8)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_penalty_through_features_is_zero(backend, device):
    """Propagating the penalty to the features (no detach) gives the same feature gradients: the
    critic's input gradient is piecewise constant, so the penalty's is zero almost everywhere."""
    critic, data = _problem(5, 8, 4, 40, 3, False, torch.float64, device)
    _assert_close(_run(critic, data, backend), _reference(critic, data, detach_penalty_features=False), 1e-8)


def test_cdan_penalty_point_is_on_the_segment_between_conditioned_inputs():
    """The penalty as the IWDA authors' calc_gradient_penalty computes it with CDAN: interpolate the
    materialised inputs p ⊗ z of paired rows, then |grad f|^2 there (not (p~) ⊗ (z~), which lies off
    that segment)."""
    critic, data = _problem(6, 4, 5, 32, 3, False, torch.float64, "cpu")
    zs, zt, ps, pt, a = (data[k].detach() for k in ("z_src", "z_tgt", "p_src", "p_tgt", "alpha"))
    xs, xt = (torch.bmm(p.unsqueeze(2), z.unsqueeze(1)).flatten(1) for p, z in ((ps[:4], zs[:4]), (pt, zt)))
    mix = (a[:, None] * xs + (1 - a[:, None]) * xt).requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.critic(*critic.critic_params, mix).sum(), mix)
    want = grad.square().sum(1).mean()
    for backend in ("reference", "cpu"):
        _, pen = xlt_fast.critic_gp(critic, zs, zt, ps, pt, alpha=a, backend=backend)
        torch.testing.assert_close(pen, want, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    critic, data = _problem(4, 3, 3, 6, 2, True, torch.float64, "cpu", seed=1)
    w1, b1, w2, b2 = (prm.detach().requires_grad_(True) for prm in critic.critic_params)

    def fn(w1, b1, w2, b2, zs, zt, sw):
        return ref.critic_gp(w1, b1, w2, b2, zs, zt, data["p_src"], data["p_tgt"], sw, data["alpha"])

    args = (w1, b1, w2, b2, data["z_src"], data["z_tgt"], data["src_weight"])
    assert torch.autograd.gradcheck(fn, args)


def test_module_forward_matches_materialised():
    critic, data = _problem(5, 4, 6, 16, 3, False, torch.float64, "cpu")
    x = ref.conditioned_input(data["z_src"], data["p_src"])
    expected = ref.critic(*critic.critic_params, x)
    torch.testing.assert_close(critic(data["z_src"], data["p_src"]), expected, rtol=1e-12, atol=1e-12)
    plain, pdata = _problem(5, 4, 6, 16, None, False, torch.float64, "cpu")
    torch.testing.assert_close(plain(pdata["z_src"]), ref.critic(*plain.critic_params, pdata["z_src"]))


def test_module_bad_input():
    critic = WassersteinCritic(6, 8, 3)
    with pytest.raises(ValueError, match="p is required"):
        critic(torch.randn(2, 6))
    with pytest.raises(ValueError, match="z must have shape"):
        critic(torch.randn(2, 5), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="p must have shape"):
        critic(torch.randn(2, 6), torch.full((2, 4), 1 / 4))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bfloat16_computes_in_float32(backend, device):
    """bfloat16 inputs run in float32 and are cast back: errors are bfloat16 rounding (2^-8)."""
    critic, data = _problem(6, 5, 4, 24, 3, True, torch.bfloat16, device)
    out = _run(critic, data, backend)
    assert all(t.dtype == torch.bfloat16 for t in out)
    _assert_close(out, _reference(critic, data), 3e-2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_generator_is_deterministic(backend, device):
    critic, data = _problem(6, 4, 5, 16, 2, False, torch.float32, device)
    args = (data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"])
    out1 = critic.critic_gp(*args, generator=torch.Generator(device).manual_seed(3), backend=backend)
    out2 = critic.critic_gp(*args, generator=torch.Generator(device).manual_seed(3), backend=backend)
    alpha = torch.rand(4, generator=torch.Generator(device).manual_seed(3), device=device)
    out3 = critic.critic_gp(*args, alpha=alpha, backend=backend)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(out1, out2, out3))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    critic, data = _problem(5, 4, 3, 8, 2, True, torch.float64, device)
    w1, b1, w2, b2 = (prm.detach().requires_grad_(True) for prm in critic.critic_params)
    n, m = 5, 4
    coef = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).to(device, torch.float64)
    args = (w1, b1, w2, b2, data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], coef, data["alpha"], backend)
    torch.library.opcheck(ops._critic_gp, args)
    outs = ops._critic_gp(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    one = torch.ones((), dtype=torch.float64, device=device)
    bargs = (one, one * 2, w1.detach(), w2.detach(), data["z_src"].detach(), data["z_tgt"].detach(),
             data["p_src"], data["p_tgt"], coef, outs[3], outs[4], outs[5], True, backend)
    torch.library.opcheck(ops._critic_gp_backward, bargs)


def test_compile_fullgraph():
    critic, data = _problem(6, 5, 4, 16, 3, True, torch.float32, "cpu")
    args = (data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], data["src_weight"])

    def step(zs, zt, ps, pt, sw, alpha):
        est, pen = xlt_fast.critic_gp(critic, zs, zt, ps, pt, sw, alpha=alpha, backend="cpu")
        return est - 10 * pen

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    leaves = _leaves(critic, data)
    got = compiled(*args, data["alpha"])
    g_got = torch.autograd.grad(got, leaves)
    want = step(*args, data["alpha"])
    g_want = torch.autograd.grad(want, leaves)
    for a, b in zip((got,) + g_got, (want,) + g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change,name", [
    ({"z_tgt": torch.randn(4, 7)}, "z_src and z_tgt"),
    ({"p_src": torch.full((5, 3), 0.5)}, "p_src"),
    ({"p_tgt": -torch.softmax(torch.randn(4, 3), -1)}, "p_tgt"),
    ({"p_tgt": None}, "p_tgt"),
    ({"p_src": torch.softmax(torch.randn(5, 2), -1), "p_tgt": torch.softmax(torch.randn(4, 2), -1)}, "W1"),
    ({"src_weight": torch.tensor([1.0, -0.5, 1.0, 1.0, 1.0])}, "src_weight"),
    ({"src_weight": torch.ones(4)}, "src_weight"),
    ({"alpha": torch.full((4,), 1.5)}, "alpha"),
    ({"alpha": torch.rand(5)}, "alpha"),
    ({"z_src": torch.randn(5, 6, dtype=torch.float64)}, "dtype"),
])
def test_bad_input(change, name):
    critic = WassersteinCritic(6, 8, 3)
    kw = {"z_src": torch.randn(5, 6), "z_tgt": torch.randn(4, 6), "p_src": torch.softmax(torch.randn(5, 3), -1),
          "p_tgt": torch.softmax(torch.randn(4, 3), -1), "src_weight": None, "alpha": None}
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=name):
        xlt_fast.critic_gp(critic, kw.pop("z_src"), kw.pop("z_tgt"), **kw)


def test_bad_params():
    with pytest.raises(TypeError, match="critic_params"):
        xlt_fast.critic_gp((torch.randn(4, 3),), torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="b1 and w2"):
        xlt_fast.critic_gp((torch.randn(4, 3), torch.randn(5), torch.randn(4), torch.randn(())),
                           torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [None, 3])
def test_calls_interleaved_before_backward(backend, device, k):
    """Two calls of different sizes, both forwards before either backward, then the first call's
    backward again after a third call: the CPU kernels' reused scratch buffers (y, u_mix, e, T) hold
    nothing a later backward reads, so every result still matches the reference."""
    first, second = _problem(7, 5, 6, 48, k, True, torch.float64, device), _problem(9, 12, 6, 48, k, False,
                                                                                   torch.float64, device, seed=1)
    outs = []
    for critic, data in (first, second):
        est, pen = critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], data["src_weight"],
                                    alpha=data["alpha"], backend=backend)
        outs.append((critic, data, est, pen))
    for i in (1, 0):
        critic, data, est, pen = outs[i]
        grads = torch.autograd.grad(0.7 * est + 1.3 * pen, _leaves(critic, data), retain_graph=True,
                                    materialize_grads=True)
        _assert_close([est.detach(), pen.detach()] + list(grads), _reference(critic, data), TOL[torch.float64])
    critic, data = second
    critic.critic_gp(data["z_src"], data["z_tgt"], data["p_src"], data["p_tgt"], alpha=data["alpha"], backend=backend)
    critic, data, est, pen = outs[0]
    grads = torch.autograd.grad(0.7 * est + 1.3 * pen, _leaves(critic, data), materialize_grads=True)
    _assert_close([est.detach(), pen.detach()] + list(grads), _reference(critic, data), TOL[torch.float64])
