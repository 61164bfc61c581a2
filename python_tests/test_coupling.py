"""Affine coupling epilogue op, AffineCoupling and RealNVP: kernels vs reference, exact inverse,
log-det vs autograd Jacobian, log_prob vs nflows, gradcheck/opcheck, overflow safety, errors.

Tolerances: fp64 comparisons are at 1e-12 (one pass of elementwise maths, libm exp/tanh/atan).
fp32 kernel outputs are compared with the fp64 reference at 2e-6 relative to the output scale: the
CPU kernel's polynomial exp/tanh/atan are within ~3 ulp, plus one fp32 rounding per operation.
Through whole fp32 flows (4 couplings, GEMMs included) gradients get 1e-5: the GEMMs' rounding
(~sqrt(K) * 2^-24 relative) compounds over the layers. Round trips: 1e-5 (fp32) / 1e-10 (fp64) as
the contract states; log-dets against slogdet of the autograd Jacobian (fp64): 1e-10.
"""
import pytest
import torch

import xlt_fast
from xlt_fast.nn import AffineCoupling, RealNVP
from xlt_fast.reference.coupling import coupling as ref_coupling, scale_map

from conftest import kernel_backends

BACKENDS = kernel_backends("cpu", "cuda")
SCALES = ("exp", "tanh", "atan")


def _mask(kind: str, d: int, device="cpu") -> torch.Tensor:
    m = torch.zeros(d, dtype=torch.bool)
    if kind == "half":
        m[d // 2:] = True
    elif kind == "alternating":
        m[1::2] = True
    else:  # an irregular mask
        m[torch.randperm(d, generator=torch.Generator().manual_seed(3))[: d // 2 + 1]] = True
    return m.to(device)


def _inputs(n, d, mask, dtype, device, scale_mag=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    dm = int(mask.sum())
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = scale_mag * torch.randn(n, dm, generator=g, dtype=torch.float64)
    t = torch.randn(n, dm, generator=g, dtype=torch.float64)
    return [a.to(device=device, dtype=dtype) for a in (x, s, t)]


def _close(a, b, rtol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    assert err <= rtol, f"max error {err:.3g} > {rtol:.1g}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["half", "alternating", "irregular"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_matches_reference(backend, device, dtype, mask_kind, scale, inverse):
    d = 37  # odd, and not a multiple of any vector width
    mask = _mask(mask_kind, d, device)
    x, s, t = _inputs(19, d, mask, dtype, device, scale_mag=3.0)
    xr, sr, tr = (a.detach().double().cpu().requires_grad_() for a in (x, s, t))
    for a in (x, s, t):
        a.requires_grad_()
    y, ld = xlt_fast.coupling(x, s, t, mask, scale, 1.7, inverse, backend=backend)
    yr, ldr = ref_coupling(xr, sr, tr, mask.cpu(), scale, 1.7, inverse)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _close(y, yr, tol)
    _close(ld, ldr, tol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gl = torch.randn(ld.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((y * gy.to(device, dtype)).sum() + (ld * gl.to(device, ld.dtype)).sum(), (x, s, t))
    want = torch.autograd.grad((yr * gy).sum() + (ldr * gl).sum(), (xr, sr, tr))
    for a, b in zip(got, want):
        _close(a, b, tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leading_dims_and_half_precision(backend, device):
    mask = _mask("alternating", 8, device)
    x, s, t = _inputs(6, 8, mask, torch.float32, device)
    y, ld = xlt_fast.coupling(x.view(2, 3, 8), s.view(2, 3, 4), t.view(2, 3, 4), mask, "atan", backend=backend)
    y2, ld2 = xlt_fast.coupling(x, s, t, mask, "atan", backend="reference")
    assert y.shape == (2, 3, 8) and ld.shape == (2, 3)
    _close(y.view(6, 8), y2, 2e-6)
    yb, ldb = xlt_fast.coupling(x.bfloat16(), s.bfloat16(), t.bfloat16(), mask, "atan", backend=backend)
    assert yb.dtype == torch.bfloat16 and ldb.dtype == torch.float32
    _close(yb, y2, 2e-2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(backend, device, scale, inverse):
    mask = _mask("alternating", 7, device)
    x, s, t = (a.requires_grad_() for a in _inputs(4, 7, mask, torch.float64, device))
    assert torch.autograd.gradcheck(
        lambda x, s, t: xlt_fast.coupling(x, s, t, mask, scale, 1.3, inverse, backend=backend), (x, s, t))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["half", "alternating"])
def test_gradcheck_fused_coupling(backend, device, mask):
    torch.manual_seed(4)
    layer = AffineCoupling(5, hidden=4, mask=mask, scale="tanh", backend=backend).double().to(device)
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    names, params = zip(*layer.named_parameters())

    class Both(torch.nn.Module):  # forward and inverse, as one module for functional_call
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, v):
            return self.layer(v) + self.layer.inverse(v)

    def f(x, *ps):
        return torch.func.functional_call(Both(), {"layer." + n: p for n, p in zip(names, ps)}, (x,))

    assert torch.autograd.gradcheck(f, (x,) + tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    ops = torch.ops.xlt_fast_C
    for kind, inverse in (("half", False), ("alternating", True)):
        mask = _mask(kind, 10, device)
        x, s, t = (a.requires_grad_() for a in _inputs(5, 10, mask, torch.float32, device))
        torch.library.opcheck(ops.coupling_forward.default, (x, s, t, mask, 1, 2.0, inverse))
        gy, gl = torch.randn_like(x), torch.randn(5, device=device)
        torch.library.opcheck(ops.coupling_backward.default,
                              (gy, gl, x.detach(), s.detach(), t.detach(), mask, 2, 2.0, inverse))


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
@pytest.mark.parametrize("scale", ["tanh", "atan"])
def test_clamped_scales_never_overflow(backend, device, scale):
    mask = _mask("half", 6, device)
    x = torch.full((3, 6), 1e3, device=device, requires_grad=True)
    s = torch.tensor([[1e30, -1e30, 3e4]] * 3, device=device, requires_grad=True)
    t = torch.zeros(3, 3, device=device, requires_grad=True)
    for inverse in (False, True):
        y, ld = xlt_fast.coupling(x, s, t, mask, scale, 2.0, inverse, backend=backend)
        grads = torch.autograd.grad(y.sum() + ld.sum(), (x, s, t))
        for a in (y, ld) + grads:
            assert torch.isfinite(a).all()
        assert (ld.abs() <= 3 * 2.0).all()  # |s| < clamp per feature


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("scale", SCALES)
def test_round_trip(backend, mask, scale):
    torch.manual_seed(0)
    flow = RealNVP(9, n_couplings=4, hidden=32, mask=mask, scale=scale, backend=backend)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        flow = flow.to(dtype)
        x = torch.randn(64, 9, dtype=dtype)
        with torch.no_grad():
            z, ld = flow(x)
            xb, ldb = flow.inverse(z)
        assert float((xb - x).abs().max()) <= tol
        assert float((ld + ldb).abs().max()) <= tol * 10


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("scale", SCALES)
def test_logdet_equals_log_abs_det_jacobian(backend, mask, scale):
    torch.manual_seed(1)
    layer = AffineCoupling(5, hidden=16, mask=mask, scale=scale, backend=backend).double()
    flow = RealNVP(5, n_couplings=3, hidden=16, mask=mask, scale=scale, backend=backend).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    for f in (layer.forward, layer.inverse, flow.forward, flow.inverse):
        _, ld = f(x)
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0))[0].squeeze(0), x[i])
            assert abs(float(torch.linalg.slogdet(jac)[1]) - float(ld[i].detach())) < 1e-10


def _nflows_flow(flow: RealNVP):
    """An nflows flow equivalent to ``flow``: same masks, conditioner weights copied in. nflows'
    default scale map sigmoid(u + 2) + 1e-3 is none of ours, so its scale hook is overridden with
    exp(g(u)) for our map g; nflows then takes log(scale) = g(u), our s, for the log-det."""
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform

    class Transform(AffineCouplingTransform):
        def __init__(self, mask, net, scale, clamp):
            super().__init__(mask, lambda i, o: net)
            self.scale, self.clamp = scale, clamp

        def _scale_and_shift(self, params):
            n = self.num_transform_features  # nflows layout: [shift | unconstrained scale]
            return torch.exp(scale_map(params[:, n:], self.scale, self.clamp)), params[:, :n]

    class Net(torch.nn.Module):  # our conditioner, outputs in nflows' order
        def __init__(self, layer: AffineCoupling):
            super().__init__()
            self.layer = layer

        def forward(self, x1, context=None):
            s, t = self.layer.conditioner(x1)
            return torch.cat([t, s], 1)

    transforms = [Transform(c.mask.int(), Net(c), c.scale, c.clamp) for c in flow.couplings]
    return Flow(CompositeTransform(transforms), StandardNormal([flow.dim]))


@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("scale", ["exp", "tanh"])
def test_log_prob_matches_nflows(mask, scale):
    torch.manual_seed(2)
    flow = RealNVP(7, n_couplings=4, hidden=24, mask=mask, scale=scale).double()
    peer = _nflows_flow(flow)
    x = torch.randn(16, 7, dtype=torch.float64)
    _close(flow.log_prob(x), peer.log_prob(x), 1e-12)
    with torch.no_grad():
        z, _ = peer._transform(x)
        _close(flow(x)[0], z, 1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("direction", ["log_prob", "inverse"])
def test_flow_backends_agree_fwd_bwd(backend, device, mask, direction):
    """The kernel backends' fused couplings (hand-written backward) against autograd through the
    reference: values, dL/dx and every parameter gradient."""
    torch.manual_seed(3)
    flow = RealNVP(13, n_couplings=4, hidden=32, mask=mask, scale="atan", backend=backend).to(device)
    ref = RealNVP(13, n_couplings=4, hidden=32, mask=mask, scale="atan", backend="reference").double()
    ref.load_state_dict(flow.state_dict())
    x = torch.randn(33, 13, device=device)
    results = []
    for f, v in ((flow, x), (ref, x.double().cpu())):
        v = v.clone().requires_grad_()
        out = f.log_prob(v) if direction == "log_prob" else f.inverse(v)[0].square().sum(-1) + f.inverse(v)[1]
        results.append((out, torch.autograd.grad(out.sum(), [v] + list(f.parameters()))))
    _close(results[0][0], results[1][0], 2e-6)
    for a, b in zip(results[0][1], results[1][1]):
        _close(a, b, 1e-5)


def _fwd_bwd_results(run, params, x):
    """``run(x) -> (y, logdet)`` with a loss on both outputs: the outputs and dL/d(x, params)."""
    v = x.clone().requires_grad_()
    y, logdet = run(v)
    loss = (y.square().sum(-1) + 2 * logdet).sum()
    return [y, logdet, *torch.autograd.grad(loss, [v] + list(params))]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("inverse", [False, True])
def test_whole_flow_op_equals_its_couplings_one_by_one(backend, device, mask, inverse):
    """RealNVP's fused flow (one op each way for all couplings) against its couplings applied one
    at a time (the same op with one coupling each): bit-identical values and gradients; and against
    autograd through the reference backend in fp64."""
    torch.manual_seed(6)
    flow = RealNVP(12, n_couplings=3, hidden=16, mask=mask, scale="tanh", backend=backend).double().to(device)
    x = torch.randn(9, 12, dtype=torch.float64, device=device)

    def one_by_one(v):
        logdet = 0
        for c in (reversed(flow.couplings) if inverse else flow.couplings):
            v, ld = c.inverse(v) if inverse else c(v)
            logdet = logdet + ld
        return v, logdet

    whole = _fwd_bwd_results(flow.inverse if inverse else flow, flow.parameters(), x)
    for a, b in zip(whole, _fwd_bwd_results(one_by_one, flow.parameters(), x)):
        assert torch.equal(a, b)
    ref = RealNVP(12, n_couplings=3, hidden=16, mask=mask, scale="tanh", backend="reference").double()
    ref.load_state_dict(flow.state_dict())
    for a, b in zip(whole, _fwd_bwd_results(ref.inverse if inverse else ref, ref.parameters(), x.cpu())):
        _close(a, b, 1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whole_flow_gradcheck_and_partial_gradients(backend, device):
    """gradcheck of the fused flow in x and every parameter (both directions); with frozen
    parameters, or a loss on one output only, the gradients computed are the full run's."""
    torch.manual_seed(7)
    flow = RealNVP(5, n_couplings=2, hidden=4, mask="alternating", scale="atan", backend=backend).double().to(device)
    names, params = zip(*flow.named_parameters())
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)

    class Both(torch.nn.Module):  # forward and inverse, as one module for functional_call
        def __init__(self):
            super().__init__()
            self.flow = flow

        def forward(self, v):
            return *self.flow(v), *self.flow.inverse(v)

    def f(v, *ps):
        return torch.func.functional_call(Both(), {"flow." + n: p for n, p in zip(names, ps)}, (v,))

    assert torch.autograd.gradcheck(f, (x,) + tuple(p.detach().requires_grad_() for p in params))
    full = _fwd_bwd_results(flow, flow.parameters(), x.detach())
    flow.couplings[0].net[2].weight.requires_grad_(False)
    flow.couplings[1].net[0].bias.requires_grad_(False)
    kept = [p for p in flow.parameters() if p.requires_grad]
    want = [g for p, g in zip(flow.parameters(), full[3:]) if p.requires_grad]
    for a, b in zip(_fwd_bwd_results(flow, kept, x.detach())[3:], want):
        assert torch.equal(a, b)
    z_only = torch.autograd.grad(flow(x)[0].sum(), x)[0]
    ld_only = torch.autograd.grad(flow(x)[1].sum(), x)[0]
    ref = RealNVP(5, n_couplings=2, hidden=4, mask="alternating", scale="atan", backend="reference").double()
    ref.load_state_dict(flow.state_dict())
    xr = x.detach().cpu().requires_grad_()
    _close(z_only, torch.autograd.grad(ref(xr)[0].sum(), xr)[0], 1e-12)
    _close(ld_only, torch.autograd.grad(ref(xr)[1].sum(), xr)[0], 1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whole_flow_ops_opcheck_and_errors(backend, device):
    """The whole-flow ops against their fake kernels and schema; misuse names the argument."""
    torch.manual_seed(8)
    flow = RealNVP(6, n_couplings=2, hidden=8, mask="half", scale="tanh").to(device)
    params = [p.detach() for p in flow.parameters()]
    masks = [c.mask for c in flow.couplings]
    cond = [v for c in flow.couplings for v in (c.cond.start, c.cond.stop, 1)]
    cfg = (cond, [1, 1], [2.0, 2.0], False)
    x = torch.randn(4, 6, device=device)
    ops = torch.ops.xlt_fast_C
    torch.library.opcheck(ops.realnvp_forward.default, (x, params, masks, *cfg, True))
    _, _, saved = ops.realnvp_forward(x, params, masks, *cfg, True)
    need = [True] + [i % 3 != 1 for i in range(12)]
    torch.library.opcheck(ops.realnvp_backward.default,
                          (torch.randn_like(x), torch.randn(4, device=device), x, saved, params, masks, *cfg, need))
    with pytest.raises(RuntimeError, match="params must hold 6 tensors"):
        ops.realnvp_forward(x, params[:-1], masks, *cfg, False)
    with pytest.raises(RuntimeError, match="cond must hold 3 ints"):
        ops.realnvp_forward(x, params, masks, cond[:-1], *cfg[1:], False)
    with pytest.raises(RuntimeError, match="need must hold 13 flags"):
        ops.realnvp_backward(x, x[:, 0], x, saved, params, masks, *cfg, need[:-1])


def test_sample_and_identity_flow():
    flow = RealNVP(6, n_couplings=2, hidden=8)
    x = flow.sample(10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 6) and torch.isfinite(x).all()
    assert torch.isfinite(flow.log_prob(x)).all()
    with torch.no_grad():  # zero heads: s = t = 0, the flow is the identity, log p = log N(x; 0, I)
        for c in flow.couplings:
            for p in c.net[4].parameters():  # the [s_raw | t] output layer
                p.zero_()
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    _close(flow.log_prob(x), want, 1e-6)


@pytest.mark.parametrize("scale", ["exp", "tanh", "atan"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_identity_init_is_the_identity_and_trains(backend, scale):
    """identity_init: a fresh flow maps x to x exactly with log|det| = 0 both ways (log p is the
    base density); its output layers are the only ones with a first gradient, and one step of
    maximum likelihood moves it off the identity."""
    torch.manual_seed(0)
    flow = RealNVP(7, n_couplings=3, hidden=16, scale=scale, backend=backend, identity_init=True)
    x = torch.randn(12, 7) * 3
    for y, logdet in (flow(x), flow.inverse(x)):
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(12))
    _close(flow.log_prob(x), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1), 1e-6)
    (-flow.log_prob(x).mean()).backward()
    for c in flow.couplings:
        assert c.net[4].weight.grad.abs().sum() > 0 and c.net[0].weight.grad.abs().sum() == 0
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    opt.step()
    assert not torch.allclose(flow(x)[0], x)
    assert not torch.equal(RealNVP(7, n_couplings=1, hidden=16).couplings[0].net[4].weight,
                           torch.zeros_like(flow.couplings[0].net[4].weight))  # the default init is not zero


def test_bad_inputs():
    mask = _mask("half", 6)
    x, s, t = _inputs(4, 6, mask, torch.float32, "cpu")
    with pytest.raises(ValueError, match="s_raw must have shape"):
        xlt_fast.coupling(x, s[:, :2], t, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\)"):
        xlt_fast.coupling(x, s, t, mask[:5])
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        xlt_fast.coupling(x, s, t, mask.int())
    with pytest.raises(ValueError, match="x contains NaN"):
        xlt_fast.coupling(x.index_fill(0, torch.tensor([1]), float("nan")), s, t, mask)
    with pytest.raises(ValueError, match="s_raw contains NaN"):
        xlt_fast.coupling(x, s.index_fill(0, torch.tensor([1]), float("nan")), t, mask)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        xlt_fast.coupling(x.int(), s, t, mask)
    with pytest.raises(TypeError, match="t has dtype"):
        xlt_fast.coupling(x, s, t.double(), mask)
    with pytest.raises(ValueError, match="scale must be one of"):
        xlt_fast.coupling(x, s, t, mask, "sigmoid")
    with pytest.raises(ValueError, match="clamp must be a finite number > 0"):
        xlt_fast.coupling(x, s, t, mask, "tanh", 0.0)
    with pytest.raises(ValueError, match="backend='triton' is not implemented"):
        xlt_fast.coupling(x, s, t, mask, backend="triton")
    flow = RealNVP(6, n_couplings=2, hidden=8)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6\)"):
        flow.log_prob(torch.randn(4, 7))
    with pytest.raises(ValueError, match="x contains NaN"):
        flow(torch.full((2, 6), float("nan")))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 6\)"):
        flow.inverse(torch.randn(6))
    with pytest.raises(ValueError, match="mask must be one of"):
        AffineCoupling(6, mask="checkerboard")
    with pytest.raises(ValueError, match="dim must be an int >= 2"):
        AffineCoupling(1)


# _backend's functools.cache helpers are traced through by dynamo (a warning, not an error)
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_flow_under_torch_compile():
    """The fused coupling (autograd.Function over the compiled ops with fake kernels) traces under
    torch.compile and gives the eager values and gradients."""
    torch.manual_seed(5)
    flow = RealNVP(10, n_couplings=2, hidden=16, mask="alternating", scale="tanh")
    x = torch.randn(8, 10, requires_grad=True)
    want = flow.log_prob(x)
    got = torch.compile(flow.log_prob, backend="aot_eager")(x)
    _close(got, want, 1e-6)
    _close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], 1e-6)
