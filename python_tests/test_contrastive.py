"""Contrastive losses: backends vs the fp64 reference, reference vs pytorch-metric-learning,
gradcheck, opcheck, edge cases and errors.

Tolerances: values 1e-5 relative (fp32 kernels vs fp64 reference; a loss is a mean of
logsumexps of O(1/tau) logits, whose fp32 rounding is ~1e-7 relative); gradients 1e-4 relative
plus 1e-5 of the largest entry (each entry sums O(N) fp32 terms).
"""
import pytest
import torch

import xlt_fast
from xlt_fast import reference as R
from xlt_fast.ops import contrastive as C

from conftest import kernel_backends

BACKENDS = kernel_backends("cpu", "triton")
METRICS = ("cosine", "dot", "sqeuclidean", "euclidean")


def _run(fn, tensors, backend, device, dtype):
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in tensors]
    value = fn(*leaves, backend=backend)
    value.backward()
    return value.detach().double().cpu(), [t.grad.double().cpu() for t in leaves]


def check_against_reference(fn, tensors, backend, device, rtol=1e-5):
    v, g = _run(fn, tensors, backend, device, torch.float32)
    rv, rg = _run(fn, tensors, "reference", "cpu", torch.float64)
    torch.testing.assert_close(v, rv, rtol=rtol, atol=rtol)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1e-3, float(b.abs().max())))


def _feats(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,d", [(1, 3), (37, 19), (70, 48)])
def test_info_nce_backends(backend, device, metric, n, d):
    a, b = _feats(n, d), _feats(n, d, seed=1)
    temp = 0.5 if metric in ("cosine", "dot") else 5.0
    check_against_reference(lambda x, y, backend: xlt_fast.info_nce(x, y, temp, metric, backend=backend),
                            [a, b], backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_supcon_backends_with_mask(backend, device, metric):
    n = 45
    f = _feats(n, 24)
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[0] = 99  # an anchor without positive: excluded, never NaN
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(4)) > 0.2).to(device)
    temp = 0.3 if metric in ("cosine", "dot") else 4.0
    check_against_reference(
        lambda x, backend: xlt_fast.supcon(x, labels.to(x.device), temp, metric,
                                           mask=mask.to(x.device), backend=backend), [f], backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
def test_supcon_without_any_positive_is_zero_not_nan(backend, device):
    f = _feats(6, 8).to(device).requires_grad_()
    loss = xlt_fast.supcon(f, torch.arange(6, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(f.grad == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_negative_contrastive_backends(backend, device, metric):
    B, K, d = 23, 5, 40
    anchor, pos, neg = _feats(B, d), _feats(B, d, seed=1), _feats(B, K, d, seed=2)
    nmask = (torch.rand(B, K, generator=torch.Generator().manual_seed(5)) > 0.3).to(device)
    temp = 0.5 if metric in ("cosine", "dot") else 6.0
    check_against_reference(
        lambda a, p, n, backend: xlt_fast.negative_contrastive(a, p, n, temp, metric,
                                                               negative_mask=nmask.to(a.device), backend=backend),
        [anchor, pos, neg], backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_contrastive_indices_into_pool(backend, device):
    """Indices into the second views (the default pool) equal the gathered (B, K, d) form,
    and the pool's gradient collects every use of a row."""
    B, K, d = 17, 4, 12
    anchor, pos = _feats(B, d), _feats(B, d, seed=1)
    idx = torch.randint(0, B, (B, K), generator=torch.Generator().manual_seed(6))
    by_index = lambda a, p, backend: xlt_fast.negative_contrastive(a, p, idx.to(a.device), 3.0, backend=backend)
    check_against_reference(by_index, [anchor, pos], backend, device)
    v1 = by_index(anchor.to(device), pos.to(device), backend)
    v2 = xlt_fast.negative_contrastive(anchor.to(device), pos.to(device), pos.to(device)[idx.to(device)], 3.0,
                                       backend=backend)
    torch.testing.assert_close(v1, v2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "multi-hot"])
def test_negative_learning_backends(backend, device, kind):
    B, Cn = 41, 7
    z = _feats(B, Cn, scale=3.0)
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, Cn, (B,), generator=g) if kind == "index" else (torch.rand(B, Cn, generator=g) > 0.5)
    check_against_reference(lambda x, backend: xlt_fast.negative_learning(x, y.to(x.device), backend=backend),
                            [z], backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
def test_negative_learning_confident_row_is_finite(backend, device):
    """p_k rounds to 1 in fp32 (logit gap 40): -log(1 - p_k) must still be right (~40), not inf."""
    z = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 2.0]], device=device, requires_grad=True)
    loss = xlt_fast.negative_learning(z, torch.tensor([0, 2], device=device), backend=backend)
    loss.backward()
    expected = (40 + torch.log1p(2 * torch.exp(torch.tensor(-40.0, dtype=torch.float64)))
                - torch.log(torch.tensor(2.0, dtype=torch.float64))
                + torch.logsumexp(torch.tensor([0.0, 1, 2], dtype=torch.float64), 0)
                - torch.logsumexp(torch.tensor([0.0, 1], dtype=torch.float64), 0)) / 2
    assert abs(loss.item() - expected.item()) < 1e-5 and torch.isfinite(z.grad).all()


def test_reference_matches_pytorch_metric_learning():
    """Where the definitions coincide (cosine similarity): SupConLoss and NTXentLoss with ref_emb."""
    from pytorch_metric_learning import losses as pml  # a requirement: missing fails, never skips
    f = _feats(64, 32).double()
    labels = torch.randint(0, 6, (64,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(R.supcon(f, labels, 0.1), pml.SupConLoss(temperature=0.1)(f, labels), rtol=1e-10, atol=1e-10)
    a, b = _feats(64, 32, seed=2).double(), _feats(64, 32, seed=3).double()
    ar = torch.arange(64)
    torch.testing.assert_close(R.info_nce(a, b, 0.05),
                               pml.NTXentLoss(temperature=0.05)(a, ar, ref_emb=b, ref_labels=ar.clone()),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["info_nce", "supcon", "negative_contrastive", "negative_learning"])
def test_reference_gradcheck(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    negs = torch.randn(6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fns = {
        "info_nce": (lambda a, b: R.info_nce(a, b, 0.5, "euclidean"), (x, y)),
        "supcon": (lambda a: R.supcon(a, torch.tensor([0, 0, 1, 1, 2, 0]), 0.5), (x,)),
        "negative_contrastive": (lambda a, b, n: R.negative_contrastive(a, b, n, 0.7, "sqeuclidean"), (x, y, negs)),
        "negative_learning": (lambda z: R.negative_learning(z, torch.tensor([0, 1, 2, 3, 0, 1])), (x,)),
    }
    fn, args = fns[name]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 8, generator=g).to(device).requires_grad_()
    c = torch.randn(9, 8, generator=g).to(device).requires_grad_()
    lab = torch.arange(9, device=device) % 3
    valid = torch.ones(9, dtype=torch.bool, device=device)
    if backend == "cpu":
        torch.library.opcheck(C.contrastive_dense, (a, c, lab, lab, valid, valid, 0.5, 1, True, True))
        torch.library.opcheck(C.contrastive_dense, (a, None, lab, lab, valid, valid, 0.5, 0, True, True))
    else:
        torch.library.opcheck(C.contrastive_tiled, (a, c, lab, lab, valid, valid, 0.5, 1, True))
    cands = torch.randn(9, 4, 8, generator=g).to(device).requires_grad_()
    cv = torch.ones(9, 4, dtype=torch.bool, device=device)
    torch.library.opcheck(C.candidate_softmax, (a, cands, cv, 0.5, 2, True, backend))
    z = torch.randn(9, 5, generator=g).to(device).requires_grad_()
    w = (torch.rand(9, 5, generator=g) > 0.5).float().to(device)
    torch.library.opcheck(C.negative_learning_op, (z, w, True, backend))


def test_compile_fullgraph_supcon():
    f = _feats(20, 8).requires_grad_()
    labels = torch.arange(20) % 4
    fn = torch.compile(lambda x: xlt_fast.supcon(x, labels, backend="cpu"), fullgraph=True)
    loss = fn(f)
    loss.backward()
    torch.testing.assert_close(loss.double(), R.supcon(f.detach().double(), labels, 0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,err,match", [
    (lambda: xlt_fast.info_nce(torch.randn(4, 3, 2), torch.randn(4, 3, 2)), ValueError, r"a must have shape \(N, d\)"),
    (lambda: xlt_fast.info_nce(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
    (lambda: xlt_fast.info_nce(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "N, d >= 1"),
    (lambda: xlt_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0), ValueError,
     "temperature must be a finite number > 0"),
    (lambda: xlt_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), metric="l1"), ValueError, "metric must be one of"),
    (lambda: xlt_fast.supcon(torch.randn(4, 3), torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (lambda: xlt_fast.supcon(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
    (lambda: xlt_fast.supcon(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), mask=torch.ones(3, dtype=torch.bool)),
     ValueError, "mask must have shape"),
    (lambda: xlt_fast.negative_contrastive(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2, 5)), ValueError,
     r"negatives must have shape \(4, K, 3\)"),
    (lambda: xlt_fast.negative_contrastive(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([[0, 4]] * 4)), ValueError,
     r"negative indices must lie in \[0, 4\)"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 3), torch.tensor([0, 1, 3, 2])), ValueError,
     r"complementary_labels must lie in \[0, 3\)"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 1), torch.tensor([0, 0, 0, 0])), ValueError, "C >= 2"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 3), -torch.ones(4, 3)), ValueError, "finite and >= 0"),
    (lambda: xlt_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cuda"), ValueError, "is not implemented"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
