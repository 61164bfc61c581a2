"""The non-finite policy (xlt_fast/_validate.py), property-style for every public op and every backend
CI can run: NaN or inf planted in a real entry of any floating input is a ValueError naming that
input; planted in a masked-out (padded) entry it changes nothing, values and gradients bit for bit;
``check_finite=False`` skips the check. Sinkhorn's ops have the same suite in test_sinkhorn.py."""
import warnings

import pytest
import torch

import xlt_fast
from xlt_fast.nn import AffineCoupling, WassersteinCritic

from conftest import kernel_backends

BAD = (float("nan"), float("inf"), -float("inf"))


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _pairwise(backend, device, metric="euclidean"):
    x, y = _rand(2, 5, 4, seed=0).to(device), _rand(2, 6, 4, seed=1).to(device)
    xm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    ym = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]], dtype=torch.bool, device=device)
    return (lambda x, y, **kw: xlt_fast.pairwise_distance(x, y, metric, xm, ym, backend=backend, **kw),
            {"x": (x, xm), "y": (y, ym)})


def _info_nce(backend, device):
    return (lambda a, b, **kw: xlt_fast.info_nce(a, b, 0.1, "cosine", backend=backend, **kw),
            {"a": (_rand(6, 4, seed=2).to(device), None), "b": (_rand(6, 4, seed=3).to(device), None)})


def _supcon(backend, device, metric="cosine"):
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1], device=device)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool, device=device)
    return (lambda features, **kw: xlt_fast.supcon(features, labels, 0.2, metric, mask, backend=backend, **kw),
            {"features": (_rand(8, 4, seed=4).to(device), mask)})


def _negative_contrastive(backend, device):
    nmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool, device=device)
    return (lambda anchor, positive, negatives, **kw: xlt_fast.negative_contrastive(
        anchor, positive, negatives, 0.5, "euclidean", negative_mask=nmask, backend=backend, **kw),
        {"anchor": (_rand(4, 3, seed=5).to(device), None), "positive": (_rand(4, 3, seed=6).to(device), None),
         "negatives": (_rand(4, 3, 3, seed=7).to(device), nmask)})


def _negative_learning(backend, device):
    labels = torch.tensor([0, 2, 1, 1], device=device)
    return (lambda logits, **kw: xlt_fast.negative_learning(logits, labels, backend=backend, **kw),
            {"logits": (_rand(4, 3, seed=8).to(device), None)})


def _critic(backend, device):
    critic = WassersteinCritic(3, 16, 2).to(device)
    ps = torch.softmax(_rand(5, 2, seed=11), 1).to(device)
    pt = torch.softmax(_rand(4, 2, seed=12), 1).to(device)

    def run(z_src, z_tgt, src_weight, **kw):
        return critic.critic_gp(z_src, z_tgt, ps, pt, src_weight, alpha=torch.full((4,), 0.3, device=device),
                                backend=backend, **kw)
    return run, {"z_src": (_rand(5, 3, seed=9).to(device), None), "z_tgt": (_rand(4, 3, seed=10).to(device), None),
                 "src_weight": ((torch.rand(5, generator=torch.Generator().manual_seed(13)) + 0.5).to(device), None)}


def _coupling(backend, device):
    mask = torch.tensor([True, False, True, False], device=device)
    return (lambda x, s_raw, t, **kw: xlt_fast.coupling(x, s_raw, t, mask, "tanh", backend=backend, **kw),
            {"x": (_rand(3, 4, seed=14).to(device), None), "s_raw": (_rand(3, 2, seed=15).to(device), None),
             "t": (_rand(3, 2, seed=16).to(device), None)})


CASES = {**{f"pairwise_distance-{m}": (lambda b, d, m=m: _pairwise(b, d, m), ("cpu", "triton"))
            for m in ("sqeuclidean", "euclidean", "cosine", "dot")},
         "info_nce": (_info_nce, ("cpu", "triton")),
         **{f"supcon-{m}": (lambda b, d, m=m: _supcon(b, d, m), ("cpu", "triton")) for m in ("cosine", "sqeuclidean")},
         "negative_contrastive": (_negative_contrastive, ("cpu", "triton")),
         "negative_learning": (_negative_learning, ("cpu", "triton")), "critic_gp": (_critic, ("cpu",)),
         "coupling": (_coupling, ("cpu",))}
MASKED_OPS = tuple(op for op in CASES if op.startswith(("pairwise", "supcon", "negative_contrastive")))  # masks
PARAMS = [pytest.param(op, b, d, id=f"{op}-{b}") for op, (_, kernels) in CASES.items()
          for b, d in [("reference", "cpu")] + kernel_backends(*kernels)]
MASKED_PARAMS = [p for p in PARAMS if p.values[0] in MASKED_OPS]


def _outputs(fn, inputs: dict, **kw):
    leaves = {k: t.clone().requires_grad_(True) for k, (t, _) in inputs.items()}
    out = fn(**leaves, **kw)
    out = out if isinstance(out, tuple) else (out,)
    total = sum(o.sum() for o in out)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [o.detach() for o in out], list(grads)


def _plant(t: torch.Tensor, mask, real: bool, value: float) -> torch.Tensor:
    """A copy with ``value`` in the first real entry, or in the last masked-out one."""
    t = t.clone()
    if mask is None:
        t.view(-1)[0] = value
        return t
    idx = (mask if real else ~mask).nonzero()
    pick = tuple(idx[0] if real else idx[-1])
    t[pick] = value
    return t


@pytest.mark.parametrize("op,backend,device", PARAMS)
@pytest.mark.parametrize("value", BAD, ids=("nan", "inf", "-inf"))
def test_non_finite_real_entry_is_an_error_naming_the_input(op, backend, device, value):
    fn, inputs = CASES[op][0](backend, device)
    for name, (t, mask) in inputs.items():
        planted = {k: v for k, (v, _) in inputs.items()}
        planted[name] = _plant(t, mask, True, value)
        with pytest.raises(ValueError, match=f"{name} (contains NaN or inf|must be finite)"):
            fn(**planted)
        with warnings.catch_warnings():  # the escape hatch skips the check; the result is then garbage
            warnings.simplefilter("ignore", RuntimeWarning)
            if name != "src_weight":  # a weight's range check is not a finiteness check: it always runs
                fn(**planted, check_finite=False)


@pytest.mark.parametrize("op,backend,device", MASKED_PARAMS)
@pytest.mark.parametrize("value", BAD, ids=("nan", "inf", "-inf"))
def test_non_finite_padding_changes_nothing(op, backend, device, value):
    fn, inputs = CASES[op][0](backend, device)
    masked = [name for name, (_, mask) in inputs.items() if mask is not None]
    assert masked
    want, want_grads = _outputs(fn, inputs)
    for name in masked:
        t, mask = inputs[name]
        planted = dict(inputs, **{name: (_plant(t, mask, False, value), mask)})
        got, got_grads = _outputs(fn, planted)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{op}: a {value} in padded {name} changed a result"
        for k, a, b in zip(inputs, got_grads, want_grads):
            assert torch.equal(a, b), f"{op}: a {value} in padded {name} changed the gradient of {k}"


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + kernel_backends("cpu", "triton"))
def test_negative_index_pool_rows_behind_masked_negatives_are_never_read(backend, device):
    anchor, positive = _rand(3, 4, seed=20).to(device), _rand(3, 4, seed=21).to(device)
    pool = _rand(6, 4, seed=22).to(device)
    idx = torch.tensor([[0, 5], [1, 2], [5, 3]], device=device)
    nmask = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool, device=device)  # pool row 5: masked entries only
    want = xlt_fast.negative_contrastive(anchor, positive, idx, pool=pool, negative_mask=nmask, backend=backend)
    bad = pool.clone()
    bad[5] = float("nan")
    assert torch.equal(xlt_fast.negative_contrastive(anchor, positive, idx, pool=bad, negative_mask=nmask,
                                                     backend=backend), want)
    out_of_range = idx.clone()
    out_of_range[0, 1] = 99  # behind a masked entry: never used, no error
    assert torch.equal(xlt_fast.negative_contrastive(anchor, positive, out_of_range, pool=pool, negative_mask=nmask,
                                                     backend=backend), want)
    out_of_range[1, 0] = 99
    with pytest.raises(ValueError, match="negative indices must lie in"):
        xlt_fast.negative_contrastive(anchor, positive, out_of_range, pool=pool, negative_mask=nmask, backend=backend)
    bad[2] = float("inf")  # a real negative
    with pytest.raises(ValueError, match=r"pool \(a row a real negative indexes\) contains NaN or inf"):
        xlt_fast.negative_contrastive(anchor, positive, idx, pool=bad, negative_mask=nmask, backend=backend)


def test_bool_membership_is_not_indices():
    anchor = _rand(3, 4, seed=23)
    with pytest.raises(TypeError, match="negatives must be a float tensor of points .* or integer indices"):
        xlt_fast.negative_contrastive(anchor, anchor, torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + kernel_backends("cpu", "triton"))
@pytest.mark.parametrize("gap", [10.0, 104.0, 120.0, 1000.0])
def test_negative_learning_is_finite_and_exact_at_any_gap(backend, device, gap):
    """-log(1 - p_k) for the argmax class k at a logit gap g is log(1 + e^-g ...) + g - ..., finite;
    compared with the same formula in fp64 (fp32 rounding of a value ~g/2: relative 1e-6)."""
    z = torch.tensor([[gap, 0.0, -1.0], [0.0, gap, 1.0], [1.0, 2.0, 3.0]], device=device, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], device=device)
    loss = xlt_fast.negative_learning(z, w, backend=backend)
    (grad,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_(True)
    p = torch.softmax(z64, 1)
    # exact: -log(1 - p_k) = lse(z) - lse_{j != k}(z), in fp64 with torch.logsumexp over the others
    others = torch.stack([torch.logsumexp(torch.cat([z64[:, :k], z64[:, k + 1:]], 1), 1) for k in range(3)], 1)
    want = (w.double() * (torch.logsumexp(z64, 1, keepdim=True) - others)).sum(1).mean()
    (want_grad,) = torch.autograd.grad(want, z64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and p.isfinite().all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_flow_rejects_non_finite_input(backend):
    layer = AffineCoupling(4, hidden=8, backend=backend)
    x = _rand(3, 4, seed=30)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        layer(x)


def test_coupling_mask_must_transform_something():
    x = _rand(3, 4, seed=31)
    with pytest.raises(ValueError, match="at least one transformed feature"):
        xlt_fast.coupling(x, x[:, :0], x[:, :0], torch.zeros(4, dtype=torch.bool))


def test_retrieval_refuses_nan_rows_and_bad_gold():
    from xlt_fast import metrics

    q, k = _rand(5, 3, seed=32), _rand(5, 3, seed=33)
    q[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"queries rows \[2\] contain NaN or inf"):
        metrics.retrieval_precision_at_k(q, k, method="csls", csls_k=2)
    with pytest.raises(ValueError, match=r"gold must hold integer key indices in \[0, 5\)"):
        metrics.retrieval_precision_at_k(k, k, gold=[0, 1, 2, 3, 7])
