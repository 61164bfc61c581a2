"""``pairwise_distance``: the op, its custom-op core and its dispatch.

The core op ``xlt_fast::sqdist`` computes squared distances (or dot products) of centred rows; the
metric-specific steps around it (unit rows for cosine, a safe square root, masks) are plain
differentiable torch ops shared with the reference. Centring by the (masked) mean of both point
sets changes no distance but shrinks the norms that the GEMM expansion cancels against.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlt_fast import _backend, _validate as V
from xlt_fast.reference import pairwise as ref

METRICS = ("sqeuclidean", "euclidean", "cosine", "dot")
# Entries with D <= REFINE_TOL * (|x|^2 + |y|^2) are recomputed exactly. Elsewhere the expansion's
# rounding error, about sqrt(d) * 2^-24 * (|x|^2 + |y|^2), stays below sqrt(d) * 2^-20 * D.
REFINE_TOL = 2.0 ** -4
# The CPU kernel sums (x_ik - y_jk)^2 directly (exact, no GEMM, D written once) up to this feature
# size: 3 d flops per entry (a subtract and a fused multiply-add per feature; the GEMM does 2 d), but
# no packing of x, no centring and no second pass over D for the expansion.
# Measured on AVX-512 (1 and 2 cores): direct ahead of the GEMM path at d = 8, level at d = 12-16,
# behind from d = 20 at (8, 128, 128, d) and (1, 1024, 1024, d).
DIRECT_MAX_D = 16


@torch.library.custom_op("xlt_fast::sqdist", mutates_args=())
def sqdist(x: Tensor, y: Tensor, dot: bool, backend: str) -> Tensor:
    """Squared distances ``|x_i - y_j|^2`` (or ``<x_i, y_j>`` with ``dot``), ``(B,n,d)x(B,m,d)->(B,n,m)``."""
    if backend == "triton":
        from xlt_fast.kernels.pairwise import sqdist as triton_sqdist

        return triton_sqdist(x, y, dot, REFINE_TOL)
    if backend in ("cpu", "cuda"):
        return _backend.extension().pairwise_sqdist(x, y, dot, REFINE_TOL)
    raise ValueError(f"xlt_fast::sqdist: no kernel for backend {backend!r}")


@sqdist.register_fake
def _(x: Tensor, y: Tensor, dot: bool, backend: str) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], y.shape[1])


def _sqdist_setup(ctx, inputs, output) -> None:
    x, y, dot, _ = inputs
    ctx.save_for_backward(x, y)
    ctx.dot = dot


def _sqdist_backward(ctx, grad: Tensor):
    """d/dx_i sum_j G_ij |x_i - y_j|^2 = 2 (sum_j G_ij) x_i - 2 (G y)_i; likewise for y (two GEMMs)."""
    x, y = ctx.saved_tensors
    gx = grad @ y
    gy = grad.transpose(1, 2) @ x
    if not ctx.dot:
        gx = 2 * (grad.sum(2, keepdim=True) * x - gx)
        gy = 2 * (grad.sum(1).unsqueeze(-1) * y - gy)
    return gx, gy, None, None


sqdist.register_autograd(_sqdist_backward, setup_context=_sqdist_setup)


@torch.library.custom_op("xlt_fast::sqdist_centered", mutates_args=())
def sqdist_centered(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """CPU squared distances without masks, centred inside the kernel: ``(D, finite)``; ``finite`` is
    a bool scalar, False when x or y may hold NaN/inf (then the caller's exact check decides)."""
    return _backend.extension().pairwise_sqdist_centered(x, y, REFINE_TOL, DIRECT_MAX_D)


@sqdist_centered.register_fake
def _(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], x.shape[1], y.shape[1]), x.new_empty((), dtype=torch.bool)


def _centered_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.mark_non_differentiable(output[1])


def _centered_backward(ctx, grad: Tensor, _):
    """As :func:`_sqdist_backward` on the centred points (the gradient ignores the centre, and
    centring keeps the two terms' cancellation small)."""
    x, y = ctx.saved_tensors
    c = masked_center(x, y, None, None)
    x, y = x - c, y - c
    gx = 2 * (grad.sum(2, keepdim=True) * x - grad @ y)
    gy = 2 * (grad.sum(1).unsqueeze(-1) * y - grad.transpose(1, 2) @ x)
    return gx, gy


sqdist_centered.register_autograd(_centered_backward, setup_context=_centered_setup)


def masked_center(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor]) -> Tensor:
    """Mean ``(B, 1, d)`` of the real points of x and y together (detached: distances ignore it)."""
    x, y = x.detach(), y.detach()
    sx, sy = V.masked(x, x_mask).sum(1), V.masked(y, y_mask).sum(1)
    cx = x.new_full((x.shape[0],), x.shape[1]) if x_mask is None else x_mask.sum(1).to(x.dtype)
    cy = y.new_full((y.shape[0],), y.shape[1]) if y_mask is None else y_mask.sum(1).to(y.dtype)
    return ((sx + sy) / (cx + cy).clamp_min(1).unsqueeze(-1)).unsqueeze(1)


def check_points_pair(x: Tensor, y: Tensor, op: str, xname: str = "x", yname: str = "y"):
    """Validate two point sets; return them batched ``(B, n, d)``, ``(B, m, d)``."""
    X = V.points(x, xname, op)
    Y = V.points(y, yname, op)
    V.same_dtype_device(op, **{xname: X, yname: Y})
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{op}: {xname} and {yname} must have the same batch size B, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"{op}: {xname} and {yname} must have the same feature size d, got "
                         f"{X.shape[-1]} and {Y.shape[-1]}")
    if X.shape[0] == 0 or X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(f"{op}: empty input: {xname} has shape {tuple(x.shape)}, {yname} has "
                         f"shape {tuple(y.shape)}; B, n and m must be >= 1")
    return X, Y


def pairwise_distance(x: Tensor, y: Tensor, metric: str = "sqeuclidean", x_mask: Optional[Tensor] = None,
                      y_mask: Optional[Tensor] = None, *, check_finite: bool = True,
                      backend: _backend.Backend = "auto") -> Tensor:
    """Distances between the rows of ``x`` and ``y``.

    Args:
        x: ``(B, n, d)`` or ``(n, d)``. y: ``(B, m, d)`` or ``(m, d)``.
        metric: ``"sqeuclidean"`` |x - y|^2, ``"euclidean"`` |x - y|, ``"cosine"`` 1 - cos (a zero row
            has cosine 0 with everything), ``"dot"`` <x, y> (a similarity).
        x_mask, y_mask: bool ``(B, n)`` / ``(B, m)``, True = real point; entries of padded points are 0
            and their values (even NaN) never reach a result or a gradient.
        check_finite: check the real points for NaN/inf (a ``ValueError`` naming x or y); False
            skips it for inputs already checked (then a NaN gives NaN or garbage in its problem).
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``.

    Returns ``(B, n, m)`` (``(n, m)`` for unbatched input). Identical rows give exactly 0; the
    euclidean gradient at zero distance is 0. Kernels accumulate in fp32 (fp64 on the CPU kernel
    for fp64 inputs); float16/bfloat16 inputs are computed in fp32 and cast back.
    """
    op = "pairwise_distance"
    V.choice(metric, "metric", METRICS, op)
    unbatched = x.dim() == 2 if isinstance(x, Tensor) else False
    X, Y = check_points_pair(x, y, op)
    xm = V.point_mask(x_mask, "x_mask", tuple(X.shape[:2]), X.device, op)
    ym = V.point_mask(y_mask, "y_mask", tuple(Y.shape[:2]), Y.device, op)
    kind = _backend.resolve(backend, X.device, op, gpu_default="triton")
    if kind == "cpu" and xm is None and ym is None and metric != "dot":
        # the kernel finds non-finite inputs in its centring pass; the exact check runs only then
        out = _cpu_unmasked(X, Y, metric, op, check_finite)
        return out.squeeze(0) if unbatched else out
    checks = V.Checks(op, check_finite)
    checks.finite("x", X, xm)
    checks.finite("y", Y, ym)
    checks.run()
    if kind == "reference":
        out = ref.pairwise_distance(X, Y, metric, xm, ym)
    else:
        out = _pairwise_kernel(X, Y, metric, xm, ym, kind)
    return out.squeeze(0) if unbatched else out


def _from_sqdist(core: Tensor, metric: str, X: Tensor, Y: Tensor) -> Tensor:
    """The metric from the kernels' output: squared distances (of unit rows X, Y for cosine), or dot."""
    if metric == "euclidean":
        return ref.safe_sqrt(core)
    if metric == "cosine":
        return ref.cosine_from_units(0.5 * core, X, Y)
    return core


def _cpu_unmasked(X: Tensor, Y: Tensor, metric: str, op: str, check_finite: bool) -> Tensor:
    """The CPU path without masks: one fused kernel call for the centring, the norms, the
    finiteness flag, the GEMM and the refinement (the masked path costs four more passes)."""
    dtype, X0, Y0 = X.dtype, X, Y
    if dtype in (torch.float16, torch.bfloat16):
        X, Y = X.float(), Y.float()
    if metric == "cosine":
        X, Y = ref.unit_rows(X), ref.unit_rows(Y)
    eager = V.data_checks(X)
    if eager and not (torch.is_grad_enabled() and (X.requires_grad or Y.requires_grad)):
        # nothing to record for autograd or a tracer: the kernel itself (the custom op's Python
        # dispatch costs ~10 us a call, a tenth of a (8, 128, 128, d <= 16) problem)
        core, finite = _backend.extension().pairwise_sqdist_centered(X, Y, REFINE_TOL, DIRECT_MAX_D)
    else:
        core, finite = sqdist_centered(X, Y)
    if check_finite and eager and not bool(finite):
        checks = V.Checks(op)
        checks.finite("x", X0)
        checks.finite("y", Y0)
        checks.run()  # raises for NaN/inf; a finite overflow (inf distances) goes on as before
    return _from_sqdist(core, metric, X, Y).to(dtype)


def _pairwise_kernel(X: Tensor, Y: Tensor, metric: str, xm: Optional[Tensor], ym: Optional[Tensor],
                     kind: str) -> Tensor:
    dtype = X.dtype
    if dtype in (torch.float16, torch.bfloat16):
        X, Y = X.float(), Y.float()
    X, Y = V.masked(X, xm), V.masked(Y, ym)
    if metric == "cosine":
        X, Y = ref.unit_rows(X), ref.unit_rows(Y)
    if metric == "dot":
        core = sqdist(X, Y, True, kind)
    else:
        c = masked_center(X, Y, xm, ym)
        # padded rows back to exact zeros: their pairs then skip the kernels' refinement
        core = sqdist(V.masked(X - c, xm), V.masked(Y - c, ym), False, kind)
    out = _from_sqdist(core, metric, X, Y)
    if xm is not None or ym is not None:
        b, n, m = out.shape
        xmask = xm if xm is not None else out.new_ones(b, n, dtype=torch.bool)
        ymask = ym if ym is not None else out.new_ones(b, m, dtype=torch.bool)
        out = out.masked_fill(~(xmask.unsqueeze(-1) & ymask.unsqueeze(-2)), 0)
    return out.to(dtype)
