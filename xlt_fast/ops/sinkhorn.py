"""``sinkhorn`` / ``sinkhorn_divergence``: batched log-domain entropic OT with masks.

Math and semantics: ``xlt_fast.reference.sinkhorn`` (GeomLoss's eps-scaling and debiasing, seed
003 eq. 1; Feydy's thesis Alg. 3.5). Costs follow ARCHITECTURE section 2 rather than the issue's
wording: ``"half_sqeuclidean"`` |x - y|^2 / 2 is the default (GeomLoss p = 2), so that
``sinkhorn_divergence(x, y)`` equals ``geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05,
scaling=0.5, debias=True)`` per problem (the cases where the conventions differ are listed in
:func:`sinkhorn_divergence`); ``"sqeuclidean"`` is |x - y|^2 as in every op.

Inputs follow the non-finite policy of ``xlt_fast._validate``: the real entries of every floating
input are checked (one read-back per call, ``check_finite=False`` skips), padded entries are zeroed
at the op boundary, so no backend reads them. Non-convergence is reported, not hidden:
``SinkhornResult.marginal_error`` always, a :class:`ConvergenceWarning` when ``tol`` is missed.

Stopping rules, ours and POT's (``ot.batch.solve_batch(method="log_sinkhorn")``, read in
``ot/batch/_utils.py``: ``bregman_log_projection_batch``):

- POT: alternate updates ``u = log a - LSE(K + v)``, ``v = log b - LSE(K^T + u)``; every 10th update
  (loop index 0, 10, 20, ...) it forms the plan, takes the L2 norm of its row-marginal violation
  ``|T 1 - a|_2`` per problem (the columns are exact right after the v update) and stops the whole
  batch once the largest is below ``tol``.
- ours, ``stop="marginals"`` (default): the L1 violation of both marginals, ``|P 1 - a|_1 + |P^T 1 -
  b|_1``, per problem, at every update (free: the row sums come from the next row pass). L1 >= L2
  and both sides count, so it is the stricter test: the same ``tol`` runs more updates than POT.
- ours, ``stop="pot"`` (with ``update="alternate"``): POT's quantity ``|P 1 - a|_2``, per problem,
  at every update. Both tests are computed in float64 (expm1) by the kernel and again, on the same
  numbers, for the report, so a problem that stopped is never reported above ``tol``.

Update rules: ``"averaged"`` (default; GeomLoss's symmetric updates, f and g from the previous pair,
averaged) and ``"alternate"`` (Gauss-Seidel as POT; at a fixed eps about half the updates to the
same tol). The divergence, eps-scaling's debiasing problems and the Triton kernel use the averaged rule.

Custom ops:
- ``xlt_fast::sinkhorn_solve`` runs the loop on a detached cost (C++ CPU kernel or Triton kernel);
  it returns the previous and the extrapolated potentials and the iteration counts.
- ``xlt_fast::sinkhorn_plan`` builds the one-sided plans of the backward (C++ on the CPU, torch
  softmax elsewhere).
- ``xlt_fast::sinkhorn_points`` (point clouds) and ``xlt_fast::sinkhorn_matrix`` (precomputed cost)
  compute the costs (the pairwise kernels, centred and refined: no cancellation at small eps), the
  schedule on the device (no host sync), call the solver and return the value; their autograd
  formulas are the envelope theorem: with the row plan ``Pf_ij = a_i softmax_j(log b_j + g_j/eps -
  C_ij/eps)`` and the column plan ``Pg`` (previous potentials), ``dv/dx_i = sum_j Pf_ij d_1 c(x_i,
  y_j)``, ``dv/dy_j = sum_i Pg_ij d_2 c(x_i, y_j)`` (GeomLoss's routing), ``dv/da = f``,
  ``dv/db = g``; ``dv/dC = (Pf + Pg) / 2`` for a precomputed cost. No iteration is stored.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from xlt_fast import _backend, _validate as V
from xlt_fast.ops.pairwise import REFINE_TOL, _pairwise_kernel, check_points_pair, sqdist
from xlt_fast.reference import sinkhorn as ref
from xlt_fast.reference.pairwise import unit_rows

COSTS = tuple(ref.COST_P)
DEFAULT_FIXED_ITERS = 100


# ----------------------------------------------------------------------------- solver core op
@torch.library.custom_op("xlt_fast::sinkhorn_solve", mutates_args=())
def sinkhorn_solve(C: Tensor, loga: Tensor, logb: Tensor, log_eps0: Tensor, n_anneal: Tensor, log_ratio: float,
                   eps: float, n_iters: int, tol: float, symmetric: bool, rule: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sinkhorn loop on ``C (B, n, m)``: ``(f_prev, g_prev, f, g, iters)`` (``tol <= 0``: no early exit).
    ``rule``: ``xlt_fast.reference.sinkhorn.rule_code`` (0: averaged updates, L1 test of both marginals)."""
    if backend == "triton":
        if rule:
            raise ValueError("xlt_fast::sinkhorn_solve: the Triton kernel has the averaged update only "
                             "(update='alternate' / stop='pot' run on the cpu and reference backends)")
        from xlt_fast.kernels.sinkhorn import solve as triton_solve

        return triton_solve(C, loga, logb, log_eps0, n_anneal, log_ratio, eps, n_iters, tol, symmetric)
    if backend == "cpu":
        return tuple(_backend.extension().sinkhorn_solve(C, loga, logb, log_eps0, n_anneal, log_ratio, eps,
                                                         n_iters, tol, symmetric, rule))
    raise ValueError(f"xlt_fast::sinkhorn_solve: no kernel for backend {backend!r}")


@sinkhorn_solve.register_fake
def _(C, loga, logb, log_eps0, n_anneal, log_ratio, eps, n_iters, tol, symmetric, rule, backend):
    B, n, m = C.shape
    return (C.new_empty(B, n), C.new_empty(B, m), C.new_empty(B, n), C.new_empty(B, m),
            C.new_empty(B, dtype=torch.int32))


# ----------------------------------------------------------------------------- helpers
@torch.library.custom_op("xlt_fast::sinkhorn_plan", mutates_args=())
def sinkhorn_plan(C: Tensor, h: Tensor, w: Tensor, eps: float, cols: bool, backend: str) -> Tensor:
    """One-sided plan of the envelope gradient: ``W_ij = w_i softmax_j(h_j - C_ij / eps)`` ``(B, n, m)``,
    or with ``cols`` ``W_ji = w_j softmax_i(h_i - C_ij / eps)`` ``(B, m, n)``. A problem whose ``h`` is
    all -inf (no mass, w = 0) gives 0, not NaN."""
    if backend == "cpu":
        return _backend.extension().sinkhorn_plan(C, h, w, eps, cols)
    h = torch.where(torch.isfinite(h).any(1, keepdim=True), h, 0)
    if cols:
        return (w.unsqueeze(1) * torch.softmax(h.unsqueeze(2) - C / eps, 1)).transpose(1, 2).contiguous()
    return w.unsqueeze(2) * torch.softmax(h.unsqueeze(1) - C / eps, 2)


@sinkhorn_plan.register_fake
def _(C, h, w, eps, cols, backend):
    B, n, m = C.shape
    return C.new_empty(B, m, n) if cols else C.new_empty(B, n, m)


def _sq_grad(k: float, Ws: list[Tensor], signs: list[float], x: Tensor, others: list[Tensor]) -> Tensor:
    """``sum_t sign_t sum_j W_t,ij d/dx_i k |x_i - o_t,j|^2`` = ``2k (r_i x_i - sum_t sign_t W_t o_t)``,
    ``r = sum_t sign_t rowsum(W_t)``, by accumulating GEMMs."""
    r = sum(s * W.sum(2, keepdim=True) for W, s in zip(Ws, signs))
    own = [t for t, o in enumerate(others) if o is x]
    if not own:
        out = (2 * k) * r * x
    else:  # r_i x_i - s_t (W_t x)_i = ((diag(r) - s_t W_t) x)_i: one GEMM, no pass over x
        t = own[0]
        M = -signs[t] * Ws[t]
        M.diagonal(0, 1, 2).add_(r[..., 0])
        out = torch.bmm(M, x).mul_(2 * k)
    for t, (W, s, o) in enumerate(zip(Ws, signs, others)):
        if t not in own[:1]:
            out = out.baddbmm_(W, o, alpha=-2 * k * s)
    return out


def _cost_grad(W: Tensor, x: Tensor, y: Tensor, C: Tensor, cost: str) -> Tensor:
    """``sum_j W_ij d/dx_i c(x_i, y_j)`` for ``W (B, n, m)`` (euclidean, cosine), by GEMMs."""
    if cost == "euclidean":  # d|x - y| / dx = (x - y) / |x - y|, 0 at 0
        Wd = torch.where(C > 0, W / torch.where(C > 0, C, 1), 0)
        return Wd.sum(2, keepdim=True) * x - Wd @ y
    # cosine: d(1 - <x^, y^>)/dx = -(y^ - cos x^) / |x|, 0 for a zero row
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    xn = torch.where(norm > 0, x / torch.where(norm > 0, norm, 1), 0)
    yn = unit_rows(y)
    cos = 1 - C
    inv = torch.where(norm > 0, 1 / torch.where(norm > 0, norm, 1), 0)
    return -(W @ yn - (W * cos).sum(2, keepdim=True) * xn) * inv


def _schedule(scale: Tensor, p: int, eps: float, blur: float, scaling: float, B: int, device):
    """``(log_eps0, n_anneal, target eps)`` per problem on the device (eps <= 0: eps-scaling)."""
    if eps > 0:
        return (torch.full((B,), math.log(eps), dtype=torch.float64, device=device),
                torch.zeros(B, dtype=torch.int32, device=device), eps)
    log_eps0, n_anneal = ref.schedule_params(scale, p, blur, scaling)
    return log_eps0, n_anneal, _target_eps(eps, blur, p)


def _solve(C, loga, logb, sched, log_ratio, n_iters, tol, symmetric, kind, rule=0):
    log_eps0, n_anneal, target = sched
    return sinkhorn_solve(C.detach().contiguous(), loga, logb, log_eps0, n_anneal, log_ratio, target, n_iters,
                          tol, symmetric, rule, kind)


def _masks(xm: Optional[Tensor], ym: Optional[Tensor], B: int, n: int, m: int, device):
    xm = torch.ones(B, n, dtype=torch.bool, device=device) if xm is None else xm
    ym = torch.ones(B, m, dtype=torch.bool, device=device) if ym is None else ym
    return xm, ym


# ----------------------------------------------------------------------------- point-cloud op
def _centred(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x and y minus the mean of their real points together (distances unchanged; the norms that the
    GEMM expansion cancels against shrink: no fp32 blow-up), and the per-problem diameter of the
    real points' bounding box (GeomLoss's ``max_diameter``).

    Padded rows become zeros: pairs of zero rows are exactly 0, which the pairwise kernels skip
    when they refine near-zero entries; their costs never matter (zero mass). The centroid 0 lies
    inside the bounding box, so the zero rows do not widen it."""
    xf, yf = xm.to(x.dtype).unsqueeze(1), ym.to(y.dtype).unsqueeze(1)
    cnt = (xf.sum(2) + yf.sum(2)).clamp_min(1).unsqueeze(-1)
    c = (xf @ x + yf @ y) / cnt
    xc = torch.where(xm.unsqueeze(-1), x - c, 0)
    yc = torch.where(ym.unsqueeze(-1), y - c, 0)
    (xlo, xhi), (ylo, yhi) = torch.aminmax(xc, dim=1), torch.aminmax(yc, dim=1)
    diam = torch.linalg.vector_norm(torch.maximum(xhi, yhi) - torch.minimum(xlo, ylo), dim=-1)
    return xc, yc, diam


class _Costs:
    """Ground costs of centred, masked points by the pairwise kernels (``xlt_fast.ops.pairwise``)."""

    def __init__(self, xc: Tensor, yc: Tensor, xm: Tensor, ym: Tensor, cost: str, backend: str):
        self.xc, self.yc, self.xm, self.ym, self.cost, self.backend = xc, yc, xm, ym, cost, backend

    def pair(self, u: Tensor, v: Tensor, um: Tensor, vm: Tensor) -> Tensor:
        if self.cost in ("half_sqeuclidean", "sqeuclidean"):
            D = sqdist(u, v, False, self.backend)
            return 0.5 * D if self.cost == "half_sqeuclidean" else D
        return _pairwise_kernel(u, v, self.cost, um, vm, self.backend)

    def __call__(self, self_costs: bool):
        if self_costs:
            return self.pair(self.xc, self.xc, self.xm, self.xm), self.pair(self.yc, self.yc, self.ym, self.ym)
        return self.pair(self.xc, self.yc, self.xm, self.ym)


@torch.library.custom_op("xlt_fast::sinkhorn_points", mutates_args=())
def sinkhorn_points(x: Tensor, y: Tensor, aw: Tensor, bw: Tensor, x_mask: Tensor, y_mask: Tensor, cost: str,
                    eps: float, blur: float, scaling: float, n_iters: int, tol: float, debias: bool, rule: int,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """OT_eps (``debias=False``) or S_eps per problem between weighted point clouds.

    ``aw, bw``: normalised weights, 0 on padded points. ``eps <= 0``: GeomLoss eps-scaling to
    ``blur^p``. Returns ``(value (B,), F (B, 4, n), G (B, 4, m), iters (B,), C_xy, C_xx, C_yy)``
    with ``F = [f, f_prev, f_aa, f_aa_prev]``, ``G = [g, g_prev, g_bb, g_bb_prev]`` (self rows 0
    without debias, C_xx / C_yy empty); outputs after ``value`` are saved for the backward and carry
    no gradient.
    """
    B = x.shape[0]
    p = ref.COST_P[cost]
    if backend == "cpu" and cost in ("half_sqeuclidean", "sqeuclidean"):
        # centring, diameter and the three costs per problem in one C++ task (_centred + the costs)
        C, Cxx, Cyy, scale = _backend.extension().sinkhorn_sq_costs(
            x, y, x_mask, y_mask, 0.5 if cost == "half_sqeuclidean" else 1.0, debias, REFINE_TOL)
        costs = None
    elif cost == "cosine":  # not translation invariant: its kernel normalises the raw rows
        costs = _Costs(x, y, x_mask, y_mask, cost, backend)
        C = costs(False)
        scale = ref.cost_range(C, x_mask.unsqueeze(-1) & y_mask.unsqueeze(-2))
    else:
        xc, yc, scale = _centred(x, y, x_mask, y_mask)
        costs = _Costs(xc, yc, x_mask, y_mask, cost, backend)
        C = costs(False)
    sched = _schedule(scale, p, eps, blur, scaling, B, x.device)
    loga, logb = ref.log_weights(aw), ref.log_weights(bw)
    log_ratio = p * math.log(scaling)
    fp, gp, f, g, iters = _solve(C, loga, logb, sched, log_ratio, n_iters, tol, False, backend, rule)
    value = (aw * f).sum(1) + (bw * g).sum(1)
    zx, zy = torch.zeros_like(f), torch.zeros_like(g)
    faa, faap, gbb, gbbp = zx, zx, zy, zy
    if costs is not None:
        Cxx, Cyy = costs(True) if debias else (C.new_empty(0, 0, 0), C.new_empty(0, 0, 0))
    if debias:
        faap, _, faa, _, _ = _solve(Cxx, loga, loga, sched, log_ratio, n_iters, tol, True, backend)
        gbbp, _, gbb, _, _ = _solve(Cyy, logb, logb, sched, log_ratio, n_iters, tol, True, backend)
        value = value - (aw * faa).sum(1) - (bw * gbb).sum(1)
    F = torch.stack([f, fp, faa, faap], 1) * x_mask.unsqueeze(1)
    G = torch.stack([g, gp, gbb, gbbp], 1) * y_mask.unsqueeze(1)
    return value, F, G, iters, C, Cxx, Cyy


@sinkhorn_points.register_fake
def _(x, y, aw, bw, x_mask, y_mask, cost, eps, blur, scaling, n_iters, tol, debias, rule, backend):
    B, n, _ = x.shape
    m = y.shape[1]
    return (x.new_empty(B), x.new_empty(B, 4, n), x.new_empty(B, 4, m), x.new_empty(B, dtype=torch.int32),
            x.new_empty(B, n, m), x.new_empty(B, n, n) if debias else x.new_empty(0, 0, 0),
            x.new_empty(B, m, m) if debias else x.new_empty(0, 0, 0))


def _target_eps(eps: float, blur: float, p: int) -> float:
    return eps if eps > 0 else blur ** p


def _points_setup(ctx, inputs, output) -> None:
    x, y, aw, bw, _, _, cost, eps, blur, _, _, _, debias, _, backend = inputs
    _, F, G, iters, C, Cxx, Cyy = output
    ctx.save_for_backward(x, y, aw, bw, F, G, C, Cxx, Cyy)
    ctx.cost, ctx.debias, ctx.backend = cost, debias, backend
    ctx.target = _target_eps(eps, blur, ref.COST_P[cost])
    ctx.mark_non_differentiable(F, G, iters, C, Cxx, Cyy)


def _points_backward(ctx, gv: Tensor, *_):
    x, y, aw, bw, F, G, C, Cxx, Cyy = ctx.saved_tensors
    eps, be = ctx.target, ctx.backend
    la, lb = ref.log_weights(aw), ref.log_weights(bw)
    Ga, Gb = gv.unsqueeze(1) * aw, gv.unsqueeze(1) * bw
    Wx = sinkhorn_plan(C, lb + G[:, 1] / eps, Ga, eps, False, be)
    Wy = sinkhorn_plan(C, la + F[:, 1] / eps, Gb, eps, True, be)
    ga, gb = gv.unsqueeze(1) * F[:, 0], gv.unsqueeze(1) * G[:, 0]
    sq = ctx.cost in ("half_sqeuclidean", "sqeuclidean")
    k = 0.5 if ctx.cost == "half_sqeuclidean" else 1.0
    if not ctx.debias:
        if sq:
            return (_sq_grad(k, [Wx], [1.0], x, [y]), _sq_grad(k, [Wy], [1.0], y, [x]), ga, gb,
                    None, None, None, None, None, None, None, None, None, None, None)
        return (_cost_grad(Wx, x, y, C, ctx.cost), _cost_grad(Wy, y, x, C.transpose(1, 2), ctx.cost), ga, gb,
                None, None, None, None, None, None, None, None, None, None, None)
    Wxx = sinkhorn_plan(Cxx, la + F[:, 3] / eps, Ga, eps, False, be)
    Wyy = sinkhorn_plan(Cyy, lb + G[:, 3] / eps, Gb, eps, False, be)
    if sq:
        gx = _sq_grad(k, [Wx, Wxx], [1.0, -1.0], x, [y, x])
        gy = _sq_grad(k, [Wy, Wyy], [1.0, -1.0], y, [x, y])
    else:
        gx = _cost_grad(Wx, x, y, C, ctx.cost) - _cost_grad(Wxx, x, x, Cxx, ctx.cost)
        gy = _cost_grad(Wy, y, x, C.transpose(1, 2), ctx.cost) - _cost_grad(Wyy, y, y, Cyy, ctx.cost)
    ga = ga - gv.unsqueeze(1) * F[:, 2]
    gb = gb - gv.unsqueeze(1) * G[:, 2]
    return gx, gy, ga, gb, None, None, None, None, None, None, None, None, None, None, None


sinkhorn_points.register_autograd(_points_backward, setup_context=_points_setup)


# ----------------------------------------------------------------------------- precomputed-cost op
@torch.library.custom_op("xlt_fast::sinkhorn_matrix", mutates_args=())
def sinkhorn_matrix(C: Tensor, aw: Tensor, bw: Tensor, real: Tensor, eps: float, blur: float, scaling: float,
                    n_iters: int, tol: float, rule: int,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OT_eps per problem for a precomputed cost ``C (B, n, m)`` (padded entries already 0; ``real``
    the (B, n, m) mask of real pairs). The schedule scale is the range of the real entries, p = 1.
    Returns ``(value, F (B, 2, n) = [f, f_prev], G (B, 2, m), iters)``."""
    B = C.shape[0]
    sched = _schedule(ref.cost_range(C, real), 1, eps, blur, scaling, B, C.device)
    loga, logb = ref.log_weights(aw), ref.log_weights(bw)
    fp, gp, f, g, iters = _solve(C, loga, logb, sched, math.log(scaling), n_iters, tol, False, backend, rule)
    value = (aw * f).sum(1) + (bw * g).sum(1)
    return value, torch.stack([f, fp], 1), torch.stack([g, gp], 1), iters


@sinkhorn_matrix.register_fake
def _(C, aw, bw, real, eps, blur, scaling, n_iters, tol, rule, backend):
    B, n, m = C.shape
    return C.new_empty(B), C.new_empty(B, 2, n), C.new_empty(B, 2, m), C.new_empty(B, dtype=torch.int32)


def _matrix_setup(ctx, inputs, output) -> None:
    C, aw, bw, _, eps, blur = inputs[:6]
    _, F, G, iters = output
    ctx.save_for_backward(C, aw, bw, F, G)
    ctx.target, ctx.backend = _target_eps(eps, blur, 1), inputs[-1]
    ctx.mark_non_differentiable(F, G, iters)


def _matrix_backward(ctx, gv: Tensor, *_):
    C, aw, bw, F, G = ctx.saved_tensors
    eps, be = ctx.target, ctx.backend
    la, lb = ref.log_weights(aw), ref.log_weights(bw)
    half = 0.5 * gv.unsqueeze(1)
    Wf = sinkhorn_plan(C, lb + G[:, 1] / eps, half * aw, eps, False, be)
    Wg = sinkhorn_plan(C, la + F[:, 1] / eps, half * bw, eps, True, be)
    return Wf + Wg.transpose(1, 2), gv.unsqueeze(1) * F[:, 0], gv.unsqueeze(1) * G[:, 0], None, None, None, None, \
        None, None, None, None


sinkhorn_matrix.register_autograd(_matrix_backward, setup_context=_matrix_setup)


# ----------------------------------------------------------------------------- public API
class ConvergenceWarning(RuntimeWarning):
    """A call with ``tol`` ended with some problem's marginal violation still above ``tol``."""


@dataclasses.dataclass
class SinkhornResult:
    """Result of :func:`sinkhorn` (batch dimension dropped for unbatched inputs).

    cost: OT_eps per problem ``(B,)``, differentiable (envelope theorem). f, g: dual potentials
    ``(B, n)``, ``(B, m)`` (0 on padded points), detached. plan: ``(B, n, m)`` when asked,
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, detached. n_iters: Sinkhorn updates per
    problem ``(B,)`` (int32). eps: the final temperature.

    marginal_error: ``(B,)``, detached: how far each problem is from convergence, the L1 violation
    ``|P' 1 - a|_1 + |P'^T 1 - b|_1`` of the plan ``P'`` of the potentials ``f', g'`` before the
    last (extrapolation) update, ``sum_i a_i |1 - exp((f'_i - f_i) / eps)| + sum_j b_j |1 -
    exp((g'_j - g_j) / eps)|``: the quantity that ``tol`` bounds, computed on the device (no host
    sync); the returned plan, one update further, is about as close. Reading it: below ``tol``
    means converged (its float32 floor is about 1e-7 max|f| / eps); each side lies in [0, 1] when
    mass is missing and is unbounded when in excess; a value like 0.1 means that cost, potentials
    and plan are not the entropic optimum (raise ``n_iters``, or ``eps`` / ``blur``). 0 for problems
    without mass.
    """
    cost: Tensor
    f: Tensor
    g: Tensor
    plan: Optional[Tensor]
    n_iters: Tensor
    eps: float
    marginal_error: Tensor


def _weights(w: Optional[Tensor], name: str, mask: Optional[Tensor], shape: tuple[int, int], like: Tensor,
             checks: V.Checks, op: str) -> Tensor:
    """User weights ``(B, n)`` / ``(n,)`` normalised over the real points (``mask``; None: all are
    real), in ``like``'s dtype; their value checks are added to ``checks``."""
    if w is None:
        if mask is None:  # the same numbers as ones / their sum, without the sum
            return like.new_ones(shape) / shape[1]
        real = mask.to(like.dtype)
        return real / real.sum(1, keepdim=True).clamp_min(1)
    V.floating(w, name, op)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (B, n) matching the points, got "
                         f"{tuple(w.shape)}")
    if w.device != like.device:
        raise ValueError(f"{op}: {name} is on {w.device} but the points are on {like.device}")
    checks.finite(name, w, mask)
    w = V.masked(w, mask).to(torch.promote_types(w.dtype, like.dtype))
    top = w.detach().amax(1, keepdim=True)
    checks.add((w < 0).any(), f"{name} must be non-negative")
    empty = top[:, 0] <= 0
    checks.add((empty if mask is None else empty & mask.any(1)).any(),
               f"{name} must have a positive total over the real points of each problem")
    # divided by the largest weight first: the total neither overflows nor underflows
    w = (w / top.clamp_min(torch.finfo(w.dtype).tiny)).to(like.dtype)
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _masses(a, b, xm, ym, shape, like, checks, op) -> tuple[Tensor, Tensor]:
    """Normalised weights ``(B, n)``, ``(B, m)``; a problem without a real point on one side has no
    mass on either (it gives 0)."""
    B, n, m = shape
    aw = _weights(a, "a", xm, (B, n), like, checks, op)
    bw = _weights(b, "b", ym, (B, m), like, checks, op)
    if a is None and b is None and xm is None and ym is None:  # uniform over n, m >= 1 points: all live
        return aw, bw
    live = ((aw.sum(1) > 0) & (bw.sum(1) > 0)).unsqueeze(1)
    return aw * live, bw * live


def _options(eps, blur, scaling, n_iters, tol, op) -> tuple[float, float, float, int, float]:
    blur = V.positive(blur, "blur", op)
    scaling = V.positive(scaling, "scaling", op)
    if not scaling < 1:
        raise ValueError(f"{op}: scaling must be in (0, 1), got {scaling}")
    eps_v = -1.0 if eps is None else V.positive(eps, "eps", op)
    if n_iters is None:
        n_iters = 1 if eps is None else DEFAULT_FIXED_ITERS
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"{op}: n_iters must be an int >= 1, got {n_iters!r}")
    tol_v = -1.0 if tol is None else V.positive(tol, "tol", op)
    return eps_v, blur, scaling, n_iters, tol_v


def _prepare_points(x, y, a, b, x_mask, y_mask, cost, check_finite, op):
    """Batched points (padded rows zeroed), normalised weights and full masks; all value checks of
    the call in one read-back."""
    V.choice(cost, "cost", COSTS, op)
    X, Y = check_points_pair(x, y, op)
    B, n, m = X.shape[0], X.shape[1], Y.shape[1]
    xm = V.point_mask(x_mask, "x_mask", (B, n), X.device, op)
    ym = V.point_mask(y_mask, "y_mask", (B, m), Y.device, op)
    checks = V.Checks(op, check_finite)
    checks.finite("x", X, xm)
    checks.finite("y", Y, ym)
    X, Y = V.masked(X, xm), V.masked(Y, ym)
    if X.dtype in (torch.float16, torch.bfloat16):
        X, Y = X.float(), Y.float()
    aw, bw = _masses(a, b, xm, ym, (B, n, m), X, checks, op)
    checks.run()
    xm, ym = _masks(xm, ym, B, n, m, X.device)
    return X, Y, aw, bw, xm, ym


def _prepare_cost(cost, a, b, x_mask, y_mask, check_finite, op):
    """Batched precomputed cost (padded pairs zeroed), normalised weights, full masks and the mask
    of real pairs; all value checks of the call in one read-back."""
    V.floating(cost, "cost", op)
    Cm = cost.unsqueeze(0) if cost.dim() == 2 else cost
    if Cm.dim() != 3 or 0 in Cm.shape:
        raise ValueError(f"{op}: a precomputed cost must have shape (B, n, m) or (n, m) with n, m >= 1, "
                         f"got {tuple(cost.shape)}")
    B, n, m = Cm.shape
    xm = V.point_mask(x_mask, "x_mask", (B, n), Cm.device, op)
    ym = V.point_mask(y_mask, "y_mask", (B, m), Cm.device, op)
    xf, yf = _masks(xm, ym, B, n, m, Cm.device)
    real = xf.unsqueeze(2) & yf.unsqueeze(1)
    given = None if xm is None and ym is None else real
    checks = V.Checks(op, check_finite)
    checks.finite("cost", Cm, given)
    Cm = V.masked(Cm, given)
    if Cm.dtype in (torch.float16, torch.bfloat16):
        Cm = Cm.float()
    aw, bw = _masses(a, b, xm, ym, (B, n, m), Cm, checks, op)
    checks.run()
    return Cm, aw, bw, xf, yf, real


def _errors(aw, bw, F, G, eps, stop: str) -> tuple[Tensor, Tensor]:
    """``(marginal_error in aw's dtype, the stopping rule's float64 violation)`` of a kernel's
    ``F[:, :2] = [f, f_prev]``, ``G``, from the weights as the kernels read them (exp of log w in
    float64): the numbers of the kernel's own test, so a problem it stopped is never reported above tol."""
    wa, wb = ref.log_weights(aw).double().exp(), ref.log_weights(bw).double().exp()
    err, stop_err = ref.final_errors(wa, F[:, 1], F[:, 0], wb, G[:, 1], G[:, 0], eps, stop == "pot")
    return err.to(aw.dtype), stop_err


def _kernel_result(value, F, G, iters, C, aw, bw, xm, ym, eps, return_plan, stop) -> dict:
    """A kernel op's outputs (``F[:, :2] = [f, f_prev]``, likewise ``G``) as the reference's dict."""
    f, g = F[:, 0] * xm, G[:, 0] * ym
    err, stop_err = _errors(aw, bw, F, G, eps, stop)
    return {"value": value, "f": f, "g": g, "iters": iters, "marginal_error": err, "stop_error": stop_err,
            "plan": _full_plan(f, g, C, aw, bw, eps) if return_plan else None}


def _warn_unconverged(err: Tensor, tol: Optional[float], warn: Optional[bool], n_iters: int, op: str) -> None:
    """:class:`ConvergenceWarning` when ``tol`` was asked for and a problem's violation (the stopping
    rule's quantity, float64, computed as the kernels' test computes it) is not below it (or NaN).
    ``warn`` None: on CPU tensors only (elsewhere the read-back is a host sync); never while tracing
    or capturing."""
    if tol is None or warn is False or (warn is None and err.device.type != "cpu") or not V.data_checks(err):
        return
    count, worst = torch.stack([(~(err < tol)).sum().to(err.dtype), err.max()]).tolist()
    if count:
        warnings.warn(f"{op}: {int(count)} of {err.numel()} problems did not reach tol={tol:g} in n_iters={n_iters} "
                      f"(largest marginal violation {worst:.3g}); raise n_iters, or eps / blur",
                      ConvergenceWarning, stacklevel=3)


def sinkhorn(x: Optional[Tensor] = None, y: Optional[Tensor] = None, a: Optional[Tensor] = None,
             b: Optional[Tensor] = None, x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None, *,
             cost: Union[str, Tensor] = "half_sqeuclidean", eps: Optional[float] = None, blur: float = 0.05,
             scaling: float = 0.5, n_iters: Optional[int] = None, tol: Optional[float] = None,
             return_plan: bool = False, check_finite: bool = True, warn: Optional[bool] = None,
             update: str = "averaged", stop: str = "marginals",
             backend: _backend.Backend = "auto") -> SinkhornResult:
    """Entropic OT ``OT_eps(a, b) = min_P <P, C> + eps KL(P | a (x) b)`` per problem (seed 003 eq. 1).

    Args:
        x, y: points ``(B, n, d)``, ``(B, m, d)`` (or unbatched ``(n, d)``); None with a tensor cost.
        a, b: non-negative weights ``(B, n)``, ``(B, m)``, normalised over the real points
            (default uniform).
        x_mask, y_mask: bool ``(B, n)``, ``(B, m)``, True = real point; padded points carry no mass,
            and their entries of x, y, a, b and cost are replaced by zeros first: whatever they hold
            (even NaN / inf) reaches no result and no gradient, on every backend.
        cost: ``"half_sqeuclidean"`` |x - y|^2 / 2 (default, GeomLoss p = 2), ``"sqeuclidean"``
            |x - y|^2, ``"euclidean"`` |x - y| (p = 1), ``"cosine"`` 1 - cos (seed 001; p = 1), or a
            precomputed cost tensor ``(B, n, m)`` (p = 1; x and y must then be None).
        eps: fixed temperature; None uses eps-scaling from each problem's own diameter D (for cosine
            and precomputed costs the range of the cost) to ``blur**p`` by factors ``scaling**p``.
        n_iters: updates at the final eps (default 1 with eps-scaling, as GeomLoss; 100 with a fixed eps).
        tol: early exit per problem once the violation that ``stop`` names is below ``tol``.
        update: ``"averaged"`` (default; GeomLoss's symmetric updates ``f <- (f + softmin) / 2``,
            ``g`` likewise, both from the previous potentials) or ``"alternate"`` (Gauss-Seidel, as
            POT: ``f <- softmin(C, log b + g / eps)`` then ``g`` from the new ``f``; about half the
            updates to a given tolerance at a fixed eps). With eps-scaling both anneal alike.
        stop: the stopping rule for ``tol``. ``"marginals"`` (default): the L1 violation of both
            marginals ``|P 1 - a|_1 + |P^T 1 - b|_1`` (``marginal_error``), per problem, tested at
            every update. ``"pot"`` (``update="alternate"`` only): POT ``solve_batch``'s quantity, the
            L2 norm ``|P 1 - a|_2`` of the row violation (the columns are exact after an alternate
            update), per problem, tested at every update (POT tests the largest over the batch every
            10 updates). L1 of both sides >= L2 of the rows: ``"marginals"`` is the stricter test.
        return_plan: also return the plan ``(B, n, m)``.
        check_finite: reject NaN / inf in the real entries of x, y, a, b or cost (``ValueError``
            naming it; one host read-back with the range checks). False skips it, for inputs checked
            already; a NaN then spoils its problem.
        warn: when ``tol`` is given and a problem ends above it, warn (:class:`ConvergenceWarning`,
            with the count and the largest violation). None (default): on CPU tensors only, since on
            a GPU the check is a host sync (pass True for it); never while tracing or capturing.
        backend: ``"auto" | "reference" | "cpu" | "triton"``.

    Returns a :class:`SinkhornResult`; read ``marginal_error`` to know whether a problem converged
    (no warning without ``tol``). Problems with no real point on a side give 0 everywhere.
    Gradients (of ``cost`` only) by the envelope theorem; see the module docstring. At a fixed eps
    and convergence the plan is POT's ``ot.sinkhorn(a, b, C, eps, method="sinkhorn_log")``, but
    ``cost`` is the entropic value ``<P, C> + eps KL(P | a (x) b)``, not ``ot.sinkhorn2``'s
    ``<P, C>``. POT's ``ot.batch.solve_batch(method="log_sinkhorn")`` iterates are
    ``update="alternate"``'s; its test (every 10 updates, on the batch's largest ``|P 1 - a|_2``)
    is ``stop="pot"``'s quantity.
    """
    op = "sinkhorn"
    eps_v, blur, scaling, n_iters, tol_v = _options(eps, blur, scaling, n_iters, tol, op)
    V.choice(update, "update", ref.UPDATES, op)
    V.choice(stop, "stop", ref.STOPS, op)
    if stop == "pot" and update != "alternate":
        raise ValueError(f"{op}: stop='pot' needs update='alternate' (POT's test reads the rows only, which "
                         f"bounds the whole violation only when the columns are exact)")
    rule = ref.rule_code(update, stop)
    ref_eps, ref_tol = (None if eps is None else eps_v), (None if tol is None else tol_v)
    if isinstance(cost, Tensor):
        if x is not None or y is not None:
            raise ValueError(f"{op}: with a precomputed cost tensor, x and y must be None")
        unbatched, dtype = cost.dim() == 2, cost.dtype
        Cm, aw, bw, xm, ym, real = _prepare_cost(cost, a, b, x_mask, y_mask, check_finite, op)
        kind = _backend.resolve(backend, Cm.device, op, available=("reference", "cpu", "triton"))
        target = _target_eps(eps_v, blur, 1)
        if kind == "reference":
            r = ref.sinkhorn(None, None, aw, bw, xm, ym, Cm, ref_eps, blur, scaling, n_iters, ref_tol,
                             return_plan=return_plan, update=update, stop=stop)
        else:
            value, F, G, iters = sinkhorn_matrix(Cm, aw, bw, real, eps_v, blur, scaling, n_iters, tol_v, rule, kind)
            r = _kernel_result(value, F, G, iters, Cm.detach(), aw, bw, xm, ym, target, return_plan, stop)
    else:
        unbatched = isinstance(x, Tensor) and x.dim() == 2
        X, Y, aw, bw, xm, ym = _prepare_points(x, y, a, b, x_mask, y_mask, cost, check_finite, op)
        dtype = x.dtype
        kind = _backend.resolve(backend, X.device, op, available=("reference", "cpu", "triton"))
        target = _target_eps(eps_v, blur, ref.COST_P[cost])
        if kind == "reference":
            r = ref.sinkhorn(X, Y, aw, bw, xm, ym, cost, ref_eps, blur, scaling, n_iters, ref_tol,
                             return_plan=return_plan, update=update, stop=stop)
        else:
            value, F, G, iters, C, _, _ = sinkhorn_points(X, Y, aw, bw, xm, ym, cost, eps_v, blur, scaling, n_iters,
                                                          tol_v, False, rule, kind)
            r = _kernel_result(value, F, G, iters, C, aw, bw, xm, ym, target, return_plan, stop)
    _warn_unconverged(r["stop_error"], tol, warn, n_iters, op)
    out = [r["value"].to(dtype), r["f"], r["g"], r.get("plan"), r["iters"], r["marginal_error"]]
    if unbatched:
        out = [t if t is None else t[0] for t in out]
    value, f, g, plan, iters, err = out
    return SinkhornResult(value, f, g, plan, iters, target, err)


def _full_plan(f: Tensor, g: Tensor, C: Tensor, aw: Tensor, bw: Tensor, eps: float) -> Tensor:
    """``a_i b_j exp((f_i + g_j - C_ij) / eps)`` (0 where a_i b_j = 0)."""
    lp = (f.unsqueeze(2) + g.unsqueeze(1) - C) / eps + ref.log_weights(aw).unsqueeze(2) + \
        ref.log_weights(bw).unsqueeze(1)
    return lp.exp().detach()


def sinkhorn_divergence(x: Tensor, y: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None,
                        x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None, *,
                        cost: str = "half_sqeuclidean", eps: Optional[float] = None, blur: float = 0.05,
                        scaling: float = 0.5, n_iters: Optional[int] = None, tol: Optional[float] = None,
                        check_finite: bool = True, warn: Optional[bool] = None,
                        backend: _backend.Backend = "auto") -> Tensor:
    """Debiased Sinkhorn divergence ``S = OT(a,b) - OT(a,a)/2 - OT(b,b)/2`` per problem, ``(B,)``.

    Same arguments as :func:`sinkhorn` (point clouds only); the ``tol`` warning covers the three
    problems. Differentiable in x, y, a, b (envelope theorem, no stored iterations).

    With the defaults it equals ``geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5,
    debias=True)(a, x, b, y)`` per problem (and ``sinkhorn(...).cost`` the ``debias=False`` loss),
    except where the conventions differ:

    - eps-scaling starts from each problem's own diameter (GeomLoss's tensorized batch shares the
      largest one); a diameter below ``blur`` starts at ``blur^p`` (GeomLoss anneals upward);
    - ``a``, ``b`` are normalised over the real points (GeomLoss takes weights as given);
    - ``"sqeuclidean"`` is |x - y|^2, twice GeomLoss's p = 2 cost; ``"cosine"`` (no GeomLoss cost)
      anneals from the range of the cost;
    - ``eps``, ``n_iters > 1`` and ``tol`` have no GeomLoss counterpart (it always anneals and
      makes one update at ``blur^p``);
    - a problem without a real point on a side gives 0.
    """
    op = "sinkhorn_divergence"
    eps_v, blur, scaling, n_iters, tol_v = _options(eps, blur, scaling, n_iters, tol, op)
    if not isinstance(cost, str):
        raise TypeError(f"{op}: cost must be one of {COSTS}; the divergence needs point clouds")
    unbatched = isinstance(x, Tensor) and x.dim() == 2
    X, Y, aw, bw, xm, ym = _prepare_points(x, y, a, b, x_mask, y_mask, cost, check_finite, op)
    kind = _backend.resolve(backend, X.device, op, available=("reference", "cpu", "triton"))
    target = _target_eps(eps_v, blur, ref.COST_P[cost])
    if kind == "reference":
        r = ref.sinkhorn(X, Y, aw, bw, xm, ym, cost, None if eps is None else eps_v, blur, scaling, n_iters,
                         None if tol is None else tol_v, debias=True)
        value, err = r["value"], r["stop_error"]
    else:
        value, F, G = sinkhorn_points(X, Y, aw, bw, xm, ym, cost, eps_v, blur, scaling, n_iters, tol_v, True, 0,
                                      kind)[:3]
        err = _errors(aw, bw, F, G, target, "marginals")[1]
        for w, P in ((aw, F), (bw, G)):  # OT(a, a), OT(b, b): symmetric, g = f
            err = torch.maximum(err, _errors(w, w, P[:, 2:], P[:, 2:], target, "marginals")[1])
    _warn_unconverged(err, tol, warn, n_iters, op)
    value = value.to(x.dtype)
    return value[0] if unbatched else value


def hard_coupling(plan: Tensor, y_mask: Optional[Tensor] = None, *, check_finite: bool = True) -> Tensor:
    """Seed 001 eq. 6: per target column j, mass ``1 / n_t`` on ``argmax_i plan_ij`` (n_t = number of
    real target points), 0 elsewhere. A column without positive mass gets none: padded columns
    (``y_mask`` False, never read), all-zero columns, every column of a problem without real source
    points. ``(B, n, m)`` or ``(n, m)``; not differentiable (a selection). NaN / inf in a real column
    is a ``ValueError`` (``check_finite=False`` skips the check, one host read-back)."""
    op = "hard_coupling"
    V.floating(plan, "plan", op)
    unbatched = plan.dim() == 2
    P = plan.unsqueeze(0) if unbatched else plan
    if P.dim() != 3:
        raise ValueError(f"{op}: plan must have shape (B, n, m) or (n, m), got {tuple(plan.shape)}")
    B, n, m = P.shape
    ym = V.point_mask(y_mask, "y_mask", (B, m), P.device, op)
    cols = None if ym is None else ym.unsqueeze(1).expand(B, n, m)
    checks = V.Checks(op, check_finite)
    checks.finite("plan", P, cols)
    checks.run()
    if n == 0:
        return torch.zeros_like(plan)
    top, idx = V.masked(P.detach(), cols).max(1, keepdim=True)
    nt = float(m) if ym is None else ym.sum(1).clamp_min(1).to(P.dtype).view(B, 1, 1)
    out = torch.zeros_like(P).scatter_(1, idx, (top > 0).to(P.dtype) / nt)
    return out[0] if unbatched else out


def average_plans(plans: Union[Tensor, list[Tensor]], *, check_finite: bool = True) -> Tensor:
    """Seed 001 eq. 4: the mean of per-layer plans, an ``(L, ..., n, m)`` tensor (L >= 1) or a
    non-empty list of plans of one shape, dtype and device (``TypeError`` / ``ValueError`` naming the
    plan that differs). NaN / inf in a plan is a ``ValueError`` naming it (``check_finite=False``
    skips the check, one host read-back)."""
    op = "average_plans"
    if isinstance(plans, Tensor):
        V.floating(plans, "plans", op)
        if plans.dim() < 3 or plans.shape[0] == 0:
            raise ValueError(f"{op}: a plans tensor must have shape (L, ..., n, m) with L >= 1, got "
                             f"{tuple(plans.shape)}")
        named = {"plans": plans}
    elif isinstance(plans, (list, tuple)):
        if not plans:
            raise ValueError(f"{op}: plans is an empty list; give at least one plan")
        named = {f"plans[{k}]": p for k, p in enumerate(plans)}
        for name, p in named.items():
            V.floating(p, name, op)
            if p.dim() < 2:
                raise ValueError(f"{op}: {name} must have shape (..., n, m), got {tuple(p.shape)}")
            if p.shape != plans[0].shape:
                raise ValueError(f"{op}: {name} has shape {tuple(p.shape)} but plans[0] has "
                                 f"{tuple(plans[0].shape)}; they must match")
        V.same_dtype_device(op, **named)
    else:
        raise TypeError(f"{op}: plans must be a tensor (L, ..., n, m) or a list of plans, got "
                        f"{type(plans).__name__}")
    checks = V.Checks(op, check_finite)
    for name, p in named.items():
        checks.finite(name, p)
    checks.run()
    return (plans if isinstance(plans, Tensor) else torch.stack(list(plans))).mean(0)
