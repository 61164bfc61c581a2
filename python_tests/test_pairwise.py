"""pairwise_distance: every backend against the fp64 reference, exactness, masks, gradients, errors.

Tolerances: kernels accumulate in fp32; against the fp64 reference the relative error of a
distance is a few 2^-24 * sqrt(d) (refinement removes the cancellation of the expansion), so
1e-5 relative (plus 1e-5 of the largest entry for entries near 0) holds with margin.
"""
import pytest
import torch

import xlt_fast
from xlt_fast.ops import pairwise as ops_pairwise

from conftest import kernel_backends

METRICS = ("sqeuclidean", "euclidean", "cosine", "dot")
BACKENDS = kernel_backends("cpu", "triton", "cuda")


def _close(out, ref, rtol=1e-5):
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol,
                               atol=rtol * max(1.0, float(ref.abs().max())))


def _points(B, n, m, d, device, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g) * offset
    x = (common + torch.randn(B, n, d, generator=g)).to(device)
    y = (common + torch.randn(B, m, d, generator=g)).to(device)
    return x, y


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(2, 7, 5, 19), (1, 1, 1, 3), (3, 33, 70, 48), (1, 65, 1, 17)])
def test_backend_matches_reference(backend, device, metric, shape):
    x, y = _points(*shape, device)
    out = xlt_fast.pairwise_distance(x, y, metric, backend=backend)
    ref = xlt_fast.pairwise_distance(x.double().cpu(), y.double().cpu(), metric, backend="reference")
    assert out.shape == ref.shape and out.dtype == x.dtype
    _close(out, ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_norms_accurate_and_exact_zero(backend, device):
    """Embedding-like data with a common offset of norm ~300: torch.cdist's expansion loses digits,
    ours must not; identical rows give exactly 0 for every distance metric."""
    x, y = _points(2, 40, 30, 64, device, offset=40.0, seed=1)
    y[:, :5] = x[:, :5]
    ref = xlt_fast.pairwise_distance(x.double().cpu(), y.double().cpu(), "sqeuclidean", backend="reference")
    out = xlt_fast.pairwise_distance(x, y, "sqeuclidean", backend=backend)
    _close(out, ref)
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        d = xlt_fast.pairwise_distance(x, y, metric, backend=backend)
        assert torch.all(d[:, torch.arange(5), torch.arange(5)] == 0), metric
    cdist_err = ((torch.cdist(x, y).double().cpu() ** 2 - ref).abs() / ref.clamp_min(1e-6))[:, 5:, 5:].max()
    ours_err = ((out.double().cpu() - ref).abs() / ref.clamp_min(1e-6))[:, 5:, 5:].max()
    assert ours_err < 1e-5 and ours_err < cdist_err  # the point of the kernel


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unbatched_and_noncontiguous(backend, device):
    x, y = _points(1, 9, 11, 40, device)
    xt = x[0].t().contiguous().t()                     # non-contiguous (n, d)
    yt = torch.cat([y[0], y[0]], dim=1)[:, ::2]         # strided columns
    out = xlt_fast.pairwise_distance(xt, yt, "euclidean", backend=backend)
    ref = xlt_fast.pairwise_distance(xt.double().cpu(), yt.double().cpu(), "euclidean", backend="reference")
    assert out.shape == (9, 11)
    _close(out, ref)


@pytest.mark.parametrize("backend,device", kernel_backends("cpu", "triton", "cuda") + [("reference", "cpu")])
@pytest.mark.parametrize("metric", METRICS)
def test_masks_padded_batch_equals_unpadded(backend, device, metric):
    """Padded points (even NaN-filled) change nothing: each problem equals its unpadded result."""
    x, y = _points(3, 10, 12, 21, device, offset=3.0, seed=2)
    nx, ny = [10, 4, 1], [12, 7, 3]
    xm = torch.arange(10, device=device)[None] < torch.tensor(nx, device=device)[:, None]
    ym = torch.arange(12, device=device)[None] < torch.tensor(ny, device=device)[:, None]
    x = x.masked_fill(~xm[..., None], float("nan")).requires_grad_()
    y = y.masked_fill(~ym[..., None], float("nan")).requires_grad_()
    out = xlt_fast.pairwise_distance(x, y, metric, xm, ym, backend=backend)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert torch.all(x.grad[~xm] == 0) and torch.all(out[~(xm[:, :, None] & ym[:, None, :])] == 0)
    for b in range(3):
        single = xlt_fast.pairwise_distance(x[b, :nx[b]].detach(), y[b, :ny[b]].detach(), metric, backend=backend)
        _close(out[b, :nx[b], :ny[b]].detach(), single, rtol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_reference_gradcheck(metric):
    x, y = _points(2, 4, 3, 5, "cpu")
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: xlt_fast.pairwise_distance(a, b, metric, backend="reference"), (x, y))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradients_match_reference(backend, device, metric):
    x, y = _points(2, 13, 9, 24, device, seed=3)
    w = torch.randn(2, 13, 9, device=device)
    grads = []
    for bk, dev, dt in ((backend, device, torch.float32), ("reference", "cpu", torch.float64)):
        xx = x.detach().to(dev, dt).requires_grad_()
        yy = y.detach().to(dev, dt).requires_grad_()
        (xlt_fast.pairwise_distance(xx, yy, metric, backend=bk) * w.to(dev, dt)).sum().backward()
        grads.append((xx.grad, yy.grad))
    for g, r in zip(grads[0], grads[1]):
        torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", "cpu")])
def test_euclidean_gradient_finite_at_zero(backend, device):
    x = torch.randn(1, 4, 8, device=device)
    y = x.clone()
    x.requires_grad_()
    xlt_fast.pairwise_distance(x, y, "euclidean", backend=backend).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cosine_zero_rows_have_distance_one():
    x = torch.zeros(1, 2, 4)
    x[0, 1, 0] = 1.0
    y = torch.tensor([[[0.0, 0, 0, 0], [2.0, 0, 0, 0]]])
    for backend in ("reference", "cpu"):
        d = xlt_fast.pairwise_distance(x, y, "cosine", backend=backend)
        torch.testing.assert_close(d, torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dot", [False, True])
def test_opcheck(backend, device, dot):
    x, y = _points(2, 5, 6, 7, device)
    torch.library.opcheck(ops_pairwise.sqdist, (x.requires_grad_(), y.requires_grad_(), dot, backend))


def test_compile_fullgraph():
    x, y = _points(2, 5, 6, 7, "cpu")
    fn = torch.compile(lambda a, b: xlt_fast.pairwise_distance(a, b, "euclidean", backend="cpu"), fullgraph=True)
    _close(fn(x, y), xlt_fast.pairwise_distance(x.double(), y.double(), "euclidean", backend="reference"))


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5)), {}, ValueError, r"x must have shape \(n, d\) or \(B, n, d\)"),
    ((torch.randn(2, 3, 5), torch.randn(2, 3, 4)), {}, ValueError, "same feature size d"),
    ((torch.randn(2, 3, 5), torch.randn(3, 3, 5)), {}, ValueError, "same batch size B"),
    ((torch.randn(0, 3, 5), torch.randn(0, 3, 5)), {}, ValueError, "empty input"),
    ((torch.randn(2, 0, 5), torch.randn(2, 3, 5)), {}, ValueError, "empty input"),
    ((torch.randn(3, 5), torch.randn(3, 5)), {"metric": "manhattan"}, ValueError, "metric must be one of"),
    ((torch.randint(0, 3, (3, 5)), torch.randn(3, 5)), {}, TypeError, "x must be a floating tensor"),
    ((torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64)), {}, TypeError, "dtype"),
    ((torch.randn(2, 3, 5), torch.randn(2, 4, 5)), {"x_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError,
     r"x_mask must have shape \(2, 3\)"),
    ((torch.randn(2, 3, 5), torch.randn(2, 4, 5)), {"y_mask": torch.ones(2, 4)}, TypeError, "y_mask must be a bool"),
    ((torch.randn(3, 5), torch.randn(3, 5)), {"backend": "gpu"}, ValueError, "backend must be one of"),
    ((torch.randn(3, 5), torch.randn(3, 5)), {"backend": "cuda"}, ValueError, "backend='cuda' needs CUDA tensors"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        xlt_fast.pairwise_distance(*args, **kwargs)


# -- the CPU path without masks: one fused kernel (centring, norms, finiteness flag, GEMM,
#    refinement), or the direct sum for d <= DIRECT_MAX_D -----------------------------------------

FUSED_D = (1, ops_pairwise.DIRECT_MAX_D, ops_pairwise.DIRECT_MAX_D + 1, 40)


@pytest.mark.parametrize("d", FUSED_D)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_fused_paths_accurate_and_exact_zero(d, dtype):
    """Both sides of the direct/GEMM switch, with a large common offset (the direct sum is exact;
    the GEMM path centres first): fp64 reference within 1e-5, identical rows exactly 0."""
    x, y = _points(3, 21, 18, d, "cpu", offset=30.0, seed=d)
    x, y = x.to(dtype), y.to(dtype)
    y[:, :4] = x[:, :4]
    ref = xlt_fast.pairwise_distance(x.double(), y.double(), "sqeuclidean", backend="reference")
    for metric in ("sqeuclidean", "euclidean"):
        out = xlt_fast.pairwise_distance(x, y, metric, backend="cpu")
        assert out.dtype == dtype
        _close(out, ref if metric == "sqeuclidean" else ref.sqrt(), rtol=1e-5 if dtype == torch.float32 else 1e-12)
        assert torch.all(out[:, torch.arange(4), torch.arange(4)] == 0), (metric, d)


@pytest.mark.parametrize("d", (3, 40))
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_cpu_fused_gradcheck(d, metric):
    x, y = _points(2, 4, 5, d, "cpu", offset=3.0, seed=7)
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: xlt_fast.pairwise_distance(a, b, metric, backend="cpu"), (x, y))


@pytest.mark.parametrize("d", (3, 40))
def test_cpu_fused_opcheck(d):
    x, y = _points(2, 5, 6, d, "cpu")
    torch.library.opcheck(ops_pairwise.sqdist_centered, (x.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("d", (3, 40))
@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_fused_nonfinite_named(d, which, bad):
    """The kernel's flag sends non-finite inputs to the exact check, which names the argument."""
    x, y = _points(2, 5, 6, d, "cpu")
    (x if which == "x" else y)[1, 2, d - 1] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or inf"):
        xlt_fast.pairwise_distance(x, y, backend="cpu")
    out = xlt_fast.pairwise_distance(x, y, backend="cpu", check_finite=False)  # no check: no error
    assert out.shape == (2, 5, 6)


@pytest.mark.parametrize("d", (3, 40))
def test_cpu_fused_finite_overflow_is_not_an_error(d):
    """Finite inputs whose squares overflow fp32 raise the kernel's flag, but the exact check passes:
    no error, a result is computed as on the other paths (the direct sum: inf where it overflows)."""
    x, y = _points(1, 3, 4, d, "cpu")
    x[0, 0] *= 1e20
    out = xlt_fast.pairwise_distance(x, y, backend="cpu")
    assert out.shape == (1, 3, 4)
    if d <= ops_pairwise.DIRECT_MAX_D:
        assert torch.isinf(out[0, 0]).all() and torch.isfinite(out[0, 1:]).all()


# -- the direct sum's blocks and L1 tiles, its accuracy, the eager kernel call, masks at small d ------

@pytest.mark.parametrize("shape", [(1, 5, 130, 3), (2, 37, 300, ops_pairwise.DIRECT_MAX_D)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_direct_blocks_and_tiles(shape, dtype):
    """m past several blocks of y (64 fp32 / 32 fp64 points), L1 tiles (16 KiB of packed y: 256 fp32
    points at d = 16) and a partial last block: every entry against the fp64 reference, exact zeros
    anywhere in the row."""
    B, n, m, d = shape
    x, y = _points(*shape, "cpu", offset=20.0, seed=m)
    x, y = x.to(dtype), y.to(dtype)
    y[:, m - 1], y[:, m // 2] = x[:, 0], x[:, n - 1]
    ref = xlt_fast.pairwise_distance(x.double(), y.double(), "sqeuclidean", backend="reference")
    out = xlt_fast.pairwise_distance(x, y, "sqeuclidean", backend="cpu")
    _close(out, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.all(out[:, 0, m - 1] == 0) and torch.all(out[:, n - 1, m // 2] == 0)


@pytest.mark.parametrize("d", (3, ops_pairwise.DIRECT_MAX_D))
def test_cpu_direct_near_duplicates_beat_cdist(d):
    """Points with a common offset of norm ~40 sqrt(d) and pairs 1e-3 apart: the direct sum keeps
    full relative accuracy where cdist's expansion loses it."""
    x, y = _points(2, 30, 40, d, "cpu", offset=40.0, seed=5)
    y[:, :30] = x + 1e-3 * torch.randn(2, 30, d, generator=torch.Generator().manual_seed(6))
    ref = xlt_fast.pairwise_distance(x.double(), y.double(), "sqeuclidean", backend="reference")
    out = xlt_fast.pairwise_distance(x, y, "sqeuclidean", backend="cpu")
    ours_err = ((out.double() - ref).abs() / ref).max()
    cdist_err = ((torch.cdist(x, y).double() ** 2 - ref).abs() / ref).max()
    assert ours_err < 1e-5 and ours_err < cdist_err


@pytest.mark.parametrize("d", (3, ops_pairwise.DIRECT_MAX_D + 1))
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_cpu_eager_kernel_call_equals_custom_op(d, metric):
    """Without autograd the CPU path calls the kernel itself, not the custom op: same values, and
    inputs that need gradients (or no_grad around them) take the right one."""
    x, y = _points(2, 6, 7, d, "cpu", offset=3.0, seed=8)
    plain = xlt_fast.pairwise_distance(x, y, metric, backend="cpu")
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    tracked = xlt_fast.pairwise_distance(xg, yg, metric, backend="cpu")
    assert tracked.grad_fn is not None and plain.grad_fn is None
    torch.testing.assert_close(tracked.detach(), plain, rtol=0, atol=0)
    with torch.no_grad():
        untracked = xlt_fast.pairwise_distance(xg, yg, metric, backend="cpu")
    assert untracked.grad_fn is None
    torch.testing.assert_close(untracked, plain, rtol=0, atol=0)


@pytest.mark.parametrize("d", (3, ops_pairwise.DIRECT_MAX_D, ops_pairwise.DIRECT_MAX_D + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_masked_small_d_equals_unmasked(d, dtype):
    """Masked rows (NaN padding) at small d: the masked path's real entries equal the unmasked
    path's result on the real points (direct sum, or GEMM just above the switch)."""
    x, y = _points(2, 9, 70, d, "cpu", offset=10.0, seed=d)
    x, y = x.to(dtype), y.to(dtype)
    nx, ny = [9, 4], [70, 66]
    xm = torch.arange(9)[None] < torch.tensor(nx)[:, None]
    ym = torch.arange(70)[None] < torch.tensor(ny)[:, None]
    x, y = x.masked_fill(~xm[..., None], float("nan")), y.masked_fill(~ym[..., None], float("nan"))
    out = xlt_fast.pairwise_distance(x, y, "euclidean", xm, ym, backend="cpu")
    assert torch.all(out[~(xm[:, :, None] & ym[:, None, :])] == 0)
    for b in range(2):
        single = xlt_fast.pairwise_distance(x[b, :nx[b]], y[b, :ny[b]], "euclidean", backend="cpu")
        _close(out[b, :nx[b], :ny[b]], single, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_cpu_direct_gradcheck_at_switch(metric):
    x, y = _points(1, 3, 4, ops_pairwise.DIRECT_MAX_D, "cpu", offset=3.0, seed=9)
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: xlt_fast.pairwise_distance(a, b, metric, backend="cpu"), (x, y))
