"""The CUDA kernel ``xlt_fast_C::pairwise_sqdist`` on the GPU against a float64 truth, plus the
``cuda_built`` marker. The GPU tests skip without a GPU and a CUDA build of ``xlt_fast._C``."""
import pytest
import torch

import xlt_fast

from xlt_fast import _backend

needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.has_cuda_kernels()),
    reason="CUDA kernels need a GPU and xlt_fast._C built with CUDA")


def test_marker_matches_build():
    """``cuda_built`` exists exactly in CUDA builds, and then answers True."""
    if torch.version.cuda is None:
        assert not _backend.has_cuda_kernels()
    if _backend.has_cuda_kernels():
        assert torch.ops.xlt_fast_C.cuda_built() is True


def _truth(x, y, dot):
    x, y = x.double(), y.double()
    g = x @ y.transpose(1, 2)
    if dot:
        return g
    return (x.unsqueeze(2) - y.unsqueeze(1)).square().sum(-1)


def _op(x, y, dot=False, tol=2.0 ** -4):
    return _backend.extension().pairwise_sqdist(x, y, dot, tol)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("B,n,m,d", [(1, 1, 1, 1), (2, 65, 63, 17), (3, 130, 7, 33), (1, 64, 128, 768),
                                     (2, 200, 190, 100)])
def test_matches_float64_truth(B, n, m, d, dot, dtype):
    g = torch.Generator().manual_seed(B * 1000 + n + m + d)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64)
    out = _op(x.to("cuda", dtype), y.to("cuda", dtype), dot)
    assert out.shape == (B, n, m) and out.dtype == dtype and out.is_cuda
    ref = _truth(x, y, dot)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_close_pairs_refined_and_identical_rows_zero(dtype):
    """Rows at norm ~1e3 that differ by ~1e-3: the expansion alone would lose every digit."""
    g = torch.Generator().manual_seed(0)
    base = 1e3 * torch.randn(1, 70, 40, generator=g, dtype=torch.float64)
    x = base
    y = torch.cat([base[:, :35], base[:, 35:] + 1e-3 * torch.randn(1, 35, 40, generator=g, dtype=torch.float64)], 1)
    out = _op(x.to("cuda", dtype), y.to("cuda", dtype)).cpu().double()
    xd, yd = x.to(dtype).double(), y.to(dtype).double()  # the truth of the rounded inputs
    ref = _truth(xd, yd, False)
    diag = torch.arange(70)
    assert torch.equal(out[0, diag[:35], diag[:35]], torch.zeros(35, dtype=torch.float64))
    torch.testing.assert_close(out[0, diag, diag], ref[0, diag, diag], rtol=1e-5, atol=0)
    assert (out >= 0).all()


@needs_cuda_kernels
def test_non_contiguous_and_mixed_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 90, generator=g).cuda()[:, ::2, ::3]      # (2, 20, 30), strided
    y = torch.randn(2, 30, 25, generator=g).cuda().transpose(1, 2)   # (2, 25, 30), transposed
    out = _op(x, y.double())
    torch.testing.assert_close(out.cpu().double(), _truth(x.cpu(), y.cpu(), False), rtol=1e-5, atol=1e-4)


@needs_cuda_kernels
def test_batch_beyond_one_launch():
    """More problems than gridDim.y holds (65535): the launcher splits the batch."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(65537, 1, 3, generator=g)
    y = torch.randn(65537, 2, 3, generator=g)
    out = _op(x.cuda(), y.cuda())
    torch.testing.assert_close(out.cpu().double(), _truth(x, y, False), rtol=1e-5, atol=1e-5)


@needs_cuda_kernels
def test_bad_input_names_argument():
    x = torch.randn(1, 4, 3, device="cuda")
    # Mixed devices are rejected by the public op before any kernel runs. (The raw internal op
    # called with one CPU and one CUDA tensor crashed in torch 2.11's dispatcher on an H100,
    # before reaching the binding's own device check; it is not reachable through the API.)
    with pytest.raises(ValueError, match="is on"):
        xlt_fast.pairwise_distance(x, torch.randn(1, 4, 3))
    with pytest.raises(RuntimeError, match="must share B and d"):
        _op(x, torch.randn(1, 4, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _op(x.half(), x.half())
