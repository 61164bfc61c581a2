"""Contrastive losses: backends vs the fp64 reference, reference vs pytorch-metric-learning,
gradcheck, opcheck, edge cases and errors.

Tolerances: values 1e-5 relative (fp32 kernels vs fp64 reference; a loss is a mean of
logsumexps of O(1/tau) logits, whose fp32 rounding is ~1e-7 relative); gradients 1e-4 relative
plus 1e-5 of the largest entry (each entry sums O(N) fp32 terms).
"""
import warnings

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

    def by_index(a, p, backend):
        return xlt_fast.negative_contrastive(a, p, idx.to(a.device), 3.0, backend=backend)

    check_against_reference(by_index, [anchor, pos], backend, device)
    v1 = by_index(anchor.to(device), pos.to(device), backend)
    v2 = xlt_fast.negative_contrastive(anchor.to(device), pos.to(device), pos.to(device)[idx.to(device)], 3.0,
                                       backend=backend)
    torch.testing.assert_close(v1, v2)


# -- integer negatives on the kernel backends: the indexed op (pool rows read by index) ------------

def _indexed_problem(B=11, K=6, d=10, P=9, seed=0):
    """Anchors, positives, a pool, indices with duplicates (row 2 twice for anchor 0 and used by
    anchors 1 and 4 too), a mask whose masked entries hold garbage indices (negative, far out of
    range) and an anchor (5) with every negative masked."""
    anchor, pos, pool = _feats(B, d, seed=seed), _feats(B, d, seed=seed + 1), _feats(P, d, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    idx = torch.randint(0, P, (B, K), generator=g)
    mask = torch.rand(B, K, generator=g) > 0.25
    idx[0, 1] = idx[0, 3] = idx[1, 0] = idx[4, 2] = 2
    mask[0, 1] = mask[0, 3] = mask[1, 0] = mask[4, 2] = True
    mask[5] = False
    garbage = torch.tensor([-7, P, 10**9, -(2**40)])
    idx[~mask] = garbage[torch.arange(int((~mask).sum())) % 4]
    return anchor, pos, pool, idx, mask


def _indexed_vs_reference(backend, device, dtype, metric, anchor, pos, pool, idx, mask, temp):
    def by_index(a, p, c, backend):
        return xlt_fast.negative_contrastive(a, p, idx.to(a.device), temp, metric, pool=c,
                                             negative_mask=None if mask is None else mask.to(a.device), backend=backend)

    v, g = _run(by_index, [anchor, pos, pool], backend, device, dtype)
    rv, rg = _run(by_index, [anchor, pos, pool], "reference", "cpu", torch.float64)  # gathers pool[idx]
    tight = dtype == torch.float64
    torch.testing.assert_close(v, rv, rtol=1e-12 if tight else 1e-5, atol=1e-12 if tight else 1e-5)
    for a, b in zip(g, rg):
        scale = max(1e-3, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-10 if tight else 1e-4, atol=(1e-12 if tight else 1e-5) * scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("metric", METRICS)
def test_negative_contrastive_indexed_vs_gathered_reference(backend, device, dtype, metric):
    """Loss and gradients w.r.t. anchor, positive and a separate pool equal the reference's gathered
    form, with duplicate indices, garbage indices under the mask and an anchor without negatives."""
    temp = 0.5 if metric in ("cosine", "dot") else 6.0
    _indexed_vs_reference(backend, device, dtype, metric, *_indexed_problem(), temp)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_negative_contrastive_indexed_more_negatives_than_pool_rows(backend, device, metric):
    """K = 12 negatives per anchor from a pool of 4 rows: every row is used many times per anchor."""
    anchor, pos, pool = _feats(5, 8, seed=10), _feats(5, 8, seed=11), _feats(4, 8, seed=12)
    idx = torch.randint(0, 4, (5, 12), generator=torch.Generator().manual_seed(13))
    _indexed_vs_reference(backend, device, torch.float64, metric, anchor, pos, pool, idx, None, 3.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_negative_contrastive_indexed_default_pool_is_positive(backend, device, metric):
    """pool=None indexes the positives: positive's gradient sums its use as positive and as pool."""
    B, K, d = 9, 5, 7
    anchor, pos = _feats(B, d, seed=20), _feats(B, d, seed=21)
    idx = torch.randint(0, B, (B, K), generator=torch.Generator().manual_seed(22))
    mask = torch.rand(B, K, generator=torch.Generator().manual_seed(23)) > 0.3
    idx[~mask] = -1

    def by_index(a, p, backend):
        return xlt_fast.negative_contrastive(a, p, idx.to(a.device), 2.0, metric, negative_mask=mask.to(a.device),
                                             backend=backend)

    def gathered(a, p, backend):  # the same loss with pool = p written out: autograd sums both uses
        neg = p[idx.clamp_min(0).to(a.device)]
        return xlt_fast.negative_contrastive(a, p, neg, 2.0, metric, negative_mask=mask.to(a.device), backend=backend)

    v, g = _run(by_index, [anchor, pos], backend, device, torch.float64)
    rv, rg = _run(gathered, [anchor, pos], "reference", "cpu", torch.float64)
    torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the op itself with pool the very tensor positive (what the public function passes)
    a, p = anchor.double().to(device), pos.double().to(device).requires_grad_()
    valid = mask.to(device)
    code, i = C._METRIC_CODE[metric], idx.to(device)
    out = C.indexed_candidate_softmax(a, p, p, i, valid, 2.0, code, True, backend)
    out[0].backward()
    as_pool = C.indexed_pool_grad(a, p.detach(), i, valid, out[3], torch.ones((), dtype=a.dtype, device=device), code,
                                  backend)
    torch.testing.assert_close(p.grad.cpu(), (out[2] + as_pool).cpu(), rtol=0, atol=0)
    torch.testing.assert_close(p.grad.cpu(), rg[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
def test_negative_contrastive_indexed_without_any_negative_is_zero(backend, device):
    """Every negative masked (indices garbage): loss 0 and zero, finite gradients."""
    anchor, pos, pool = (_feats(3, 4, seed=s).to(device).requires_grad_() for s in (30, 31, 32))
    idx = torch.tensor([[5, -1], [99, 3], [0, 10**12]], device=device)
    loss = xlt_fast.negative_contrastive(anchor, pos, idx, 0.5, "sqeuclidean", pool=pool,
                                         negative_mask=torch.zeros(3, 2, dtype=torch.bool, device=device),
                                         backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for t in (anchor, pos, pool):
        assert t.grad is None or (torch.isfinite(t.grad).all() and torch.all(t.grad == 0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_contrastive_indexed_reads_by_index(backend, device, monkeypatch):
    """Integer negatives go to the indexed op: the gathering path (candidate_softmax) is not called."""
    def gathering(*args):
        raise AssertionError("candidate_softmax called for integer negatives")

    monkeypatch.setattr(C, "candidate_softmax", gathering)
    anchor, pos, pool, idx, mask = _indexed_problem(B=6, K=4, d=5, P=6)
    loss = xlt_fast.negative_contrastive(anchor.to(device), pos.to(device), idx.to(device), 1.0,
                                         pool=pool.to(device), negative_mask=mask.to(device), backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_contrastive_indexed_pool_without_grad(backend, device, monkeypatch):
    """A pool that does not require grad: its gradient pass is skipped, anchor's and positive's are
    still those of the reference."""
    def no_pool_grad(*args):
        raise AssertionError("indexed_pool_grad called for a pool without grad")

    anchor, pos, pool, idx, mask = _indexed_problem(B=6, K=4, d=5, P=6)
    ref = [t.double().requires_grad_() for t in (anchor, pos)]
    R.negative_contrastive(*ref, pool.double()[idx.clamp(0, 5)], 2.0, "sqeuclidean", mask).backward()
    monkeypatch.setattr(C, "indexed_pool_grad", no_pool_grad)
    leaves = [t.double().to(device).requires_grad_() for t in (anchor, pos)]
    xlt_fast.negative_contrastive(*leaves, idx.to(device), 2.0, "sqeuclidean", pool=pool.double().to(device),
                                  negative_mask=mask.to(device), backend=backend).backward()
    for t, r in zip(leaves, ref):
        torch.testing.assert_close(t.grad.cpu(), r.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_contrastive_indexed_pool_grad_deterministic(backend, device):
    """The pool gradient (many uses of few rows) is bitwise the same on every run, and on the CPU
    for one and for two threads."""
    anchor, pos, pool = _feats(16, 33, seed=40), _feats(16, 33, seed=41), _feats(6, 33, seed=42)
    idx = torch.randint(0, 6, (16, 16), generator=torch.Generator().manual_seed(43))

    def pool_grad():
        c = pool.to(device).requires_grad_()
        xlt_fast.negative_contrastive(anchor.to(device), pos.to(device), idx.to(device), 4.0, "euclidean", pool=c,
                                      backend=backend).backward()
        return c.grad.cpu()

    first = pool_grad()
    runs = [pool_grad()]
    if backend == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(pool_grad())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        assert torch.equal(first, other)


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
def test_negative_contrastive_indexed_non_finite_pool_rows(backend, device):
    """NaN/inf in a pool row no real negative indexes (an unused row, or one only masked entries
    index) changes nothing; in an indexed row it is an error naming pool, unless check_finite=False."""
    anchor, pos, pool = _feats(4, 5, seed=50).to(device), _feats(4, 5, seed=51).to(device), _feats(6, 5, seed=52)
    idx = torch.tensor([[0, 1], [1, 2], [2, 4], [0, 4]], device=device)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool, device=device)  # row 2 only via (1, 1)

    def run(c, **kw):
        c = c.detach().clone().to(device).requires_grad_()
        loss = xlt_fast.negative_contrastive(anchor, pos, idx, 1.0, "euclidean", pool=c, negative_mask=mask,
                                             backend=backend, **kw)
        loss.backward()
        return loss.detach(), c.grad

    base = run(pool)
    for row in (3, 5):  # never indexed
        bad = pool.clone()
        bad[row, 1] = float("nan")
        out = run(bad)
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    for value in (float("nan"), float("inf")):
        bad = pool.clone()
        bad[4, 3] = value
        with pytest.raises(ValueError, match=r"pool \(a row a real negative indexes\) contains NaN or inf"):
            run(bad)
        with warnings.catch_warnings():  # the escape hatch skips the check; the gradient is then garbage
            warnings.simplefilter("ignore", RuntimeWarning)
            assert not torch.isfinite(run(bad, check_finite=False)[1]).all()


def test_negative_contrastive_indexed_gradcheck_cpu():
    """fp64 gradcheck through the public op (cpu backend) w.r.t. anchor, positive and pool, every
    metric, with duplicates and a masked garbage index; and with the default pool (= positive)."""
    anchor, pos, pool, idx, mask = _indexed_problem(B=6, K=4, d=3, P=5)
    leaves = [t.double().requires_grad_() for t in (anchor, pos, pool)]
    for metric in METRICS:
        assert torch.autograd.gradcheck(
            lambda a, p, c: xlt_fast.negative_contrastive(a, p, idx, 1.5, metric, pool=c, negative_mask=mask,
                                                          backend="cpu"), leaves)
    own = torch.randint(0, 6, (6, 4), generator=torch.Generator().manual_seed(60))
    assert torch.autograd.gradcheck(
        lambda a, p: xlt_fast.negative_contrastive(a, p, own, 1.5, "sqeuclidean", backend="cpu"), leaves[:2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_contrastive_indexed_bfloat16(backend, device):
    """Half-precision rows are computed in fp32 and the loss returned in the input dtype."""
    anchor, pos, pool, idx, mask = _indexed_problem(B=6, K=4, d=8, P=7)
    args = [t.to(device, torch.bfloat16) for t in (anchor, pos, pool)]
    loss = xlt_fast.negative_contrastive(*args[:2], idx.to(device), 4.0, "sqeuclidean", pool=args[2],
                                         negative_mask=mask.to(device), backend=backend)
    ref = R.negative_contrastive(*[t.double().cpu() for t in args[:2]], args[2].double().cpu()[idx.clamp(0, 6)], 4.0,
                                 "sqeuclidean", mask)
    assert loss.dtype == torch.bfloat16 and abs(loss.double().cpu() - ref).item() < 1e-2 * max(1.0, ref.item())


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
    torch.testing.assert_close(R.supcon(f, labels, 0.1), pml.SupConLoss(temperature=0.1)(f, labels),
                               rtol=1e-10, atol=1e-10)
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
    pool = torch.randn(7, 8, generator=g).to(device).requires_grad_()
    idx = torch.randint(0, 7, (9, 4), generator=g).to(device)
    iv = (torch.rand(9, 4, generator=g) > 0.3).to(device)
    idx[~iv] = -3  # never read
    torch.library.opcheck(C.indexed_candidate_softmax, (a, c, pool, idx, iv, 0.5, 1, True, backend))
    coef = torch.randn(9, 4, generator=g).to(device)
    half = torch.tensor(0.5, device=device)
    torch.library.opcheck(C.indexed_pool_grad, (a.detach(), pool.detach(), idx, iv, coef, half, 2, backend))
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
    (lambda: xlt_fast.supcon(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError,
     r"labels must have shape \(4,\)"),
    (lambda: xlt_fast.supcon(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), mask=torch.ones(3, dtype=torch.bool)),
     ValueError, "mask must have shape"),
    (lambda: xlt_fast.negative_contrastive(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2, 5)), ValueError,
     r"negatives must have shape \(4, K, 3\)"),
    (lambda: xlt_fast.negative_contrastive(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([[0, 4]] * 4)),
     ValueError, r"negative indices must lie in \[0, 4\)"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 3), torch.tensor([0, 1, 3, 2])), ValueError,
     r"complementary_labels must lie in \[0, 3\)"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 1), torch.tensor([0, 0, 0, 0])), ValueError, "C >= 2"),
    (lambda: xlt_fast.negative_learning(torch.randn(4, 3), -torch.ones(4, 3)), ValueError, "finite and >= 0"),
    (lambda: xlt_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cuda"), ValueError, "is not implemented"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
