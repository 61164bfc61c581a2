"""Reference batched log-domain Sinkhorn (entropic OT) and Sinkhorn divergence, pure PyTorch.

Entropic OT between a = sum_i a_i delta_{x_i} and b = sum_j b_j delta_{y_j} (seed 003 eq. 2;
seed 001 eq. 3-5 use the plan):

    OT_eps(a, b) = min_P <P, C> + eps KL(P | a (x) b) = max_{f,g} <a, f> + <b, g>  (at optimum)

solved by symmetric ("averaged") log-domain Sinkhorn updates with the softmin
``softmin_eps(C, h)_i = -eps log sum_j exp(h_j - C_ij / eps)``:

    f <- (f + softmin_eps(C, log b + g / eps)) / 2,   g <- (g + softmin_eps(C^T, log a + f / eps)) / 2

with eps-scaling (annealing): eps runs through GeomLoss's list (Feydy's thesis, Algorithm 3.5;
``geomloss/_legacy/sinkhorn_divergence.py``: ``epsilon_schedule`` / ``sinkhorn_loop``)
``[D^p] + [exp(e) for e in arange(p log D, p log blur, p log scaling)] + [blur^p]``, D the
diameter of each problem's bounding box (per problem here; GeomLoss batches share one), then a
last "extrapolation" update from the detached previous potentials, which carries the gradient
(envelope theorem): x receives it through f only, y through g only, exactly as GeomLoss builds
``C_xy = cost(x, y.detach())`` and ``C_yx = cost(y, x.detach())``. The debiased divergence
(Feydy et al. 2019) is ``S = OT(a,b) - OT(a,a)/2 - OT(b,b)/2 = <a, f_ba - f_aa> + <b, g_ab - g_bb>``.

This module is the ground truth for the kernels: clear, fp64-capable, with a host-side loop over
the longest per-problem schedule (problems whose schedule is over are frozen). The op path
(``xlt_fast.ops.sinkhorn``) has no host synchronisation.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from xlt_fast.reference.pairwise import pairwise_distance

# cost name -> (exponent p of the eps schedule, ground cost). Names mean what they mean in every op
# of the library: "sqeuclidean" is |x - y|^2; "half_sqeuclidean" is GeomLoss's p = 2 cost.
COST_P = {"half_sqeuclidean": 2, "sqeuclidean": 2, "euclidean": 1, "cosine": 1}


def cost_matrix(x: Tensor, y: Tensor, cost: str, x_mask: Optional[Tensor] = None,
                y_mask: Optional[Tensor] = None) -> Tensor:
    """``(B, n, m)`` ground cost; entries involving a padded point are 0."""
    if cost == "half_sqeuclidean":
        return 0.5 * pairwise_distance(x, y, "sqeuclidean", x_mask, y_mask)
    return pairwise_distance(x, y, cost, x_mask, y_mask)


def diameter(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor]) -> Tensor:
    """Per problem, the diagonal of the bounding box of the real points of x and y (GeomLoss's
    ``max_diameter``), ``(B,)``, detached. 0 for a problem without real points."""
    x, y = x.detach(), y.detach()
    big = torch.finfo(x.dtype).max
    xm = x_mask.unsqueeze(-1) if x_mask is not None else None
    ym = y_mask.unsqueeze(-1) if y_mask is not None else None
    lo = torch.minimum((x if xm is None else x.masked_fill(~xm, big)).amin(1),
                       (y if ym is None else y.masked_fill(~ym, big)).amin(1))
    hi = torch.maximum((x if xm is None else x.masked_fill(~xm, -big)).amax(1),
                       (y if ym is None else y.masked_fill(~ym, -big)).amax(1))
    span = torch.where(hi >= lo, hi - lo, 0)
    return torch.linalg.vector_norm(span, dim=-1)


def cost_range(C: Tensor, real: Tensor) -> Tensor:
    """``max - min`` of the real entries of ``C`` per problem (the schedule's scale for cosine and
    precomputed costs, with p = 1), ``(B,)``, detached; 0 without real entries."""
    C = C.detach()
    big = torch.finfo(C.dtype).max
    hi = C.masked_fill(~real, -big).amax((1, 2))
    lo = C.masked_fill(~real, big).amin((1, 2))
    return torch.where(hi >= lo, hi - lo, 0)


def schedule_params(scale: Tensor, p: int, blur: float, scaling: float) -> tuple[Tensor, Tensor]:
    """GeomLoss's eps list as ``(log_eps0 (B,), n_anneal (B,) int32)``, on the device of ``scale``.

    ``scale`` is the diameter D (``p`` as in the cost) or, for cosine and precomputed costs, the
    largest cost (then ``p = 1``). The list is ``[D^p] + [D^p scaling^(p k), k < K] + [blur^p]``
    with ``K = len(arange(p log D, p log blur, p log scaling))``; the first value also
    initialises the potentials. The annealing steps are the first ``K + 1`` values; a D below
    blur is raised to blur (GeomLoss would anneal upward), so K = 0 and eps starts at blur^p.
    """
    d = scale.detach().double().clamp_min(blur)
    log_eps0 = p * torch.log(d)
    k = torch.ceil((p * math.log(blur) - log_eps0) / (p * math.log(scaling))).clamp_min(0)
    return log_eps0, (k + 1).to(torch.int32)


def eps_at(t: int, log_eps0: Tensor, n_anneal: Tensor, log_ratio: float, eps: float) -> Tensor:
    """eps of iteration ``t`` per problem: annealing step t < n_anneal has
    ``exp(log_eps0 + max(t - 1, 0) log_ratio)``, later steps the target ``eps``."""
    ann = torch.exp(log_eps0 + max(t - 1, 0) * log_ratio)
    return torch.where(t < n_anneal, ann, torch.full_like(ann, eps))


def _softmin(eps: Tensor, C: Tensor, h: Tensor) -> Tensor:
    """``-eps log sum_j exp(h_j - C_ij / eps)`` per row, ``eps (B,)``; 0 where all h_j = -inf."""
    e = eps.to(C.dtype).view(-1, 1, 1)
    lse = torch.logsumexp(h.unsqueeze(1) - C / e, dim=2)
    return torch.where(torch.isfinite(lse), -e.squeeze(-1) * lse, 0)


def log_weights(w: Tensor) -> Tensor:
    """log w with log 0 = -inf (zero mass never enters a softmin)."""
    return torch.where(w > 0, torch.log(torch.where(w > 0, w, 1)), -math.inf)


def _side_terms(w: Tensor, p: Tensor, q: Tensor, eps) -> Tensor:
    """``w_i |expm1((p_i - q_i) / eps)|`` in float64 (expm1: no cancellation in 1 - exp at small
    arguments; the C++ kernel's stopping test computes the same numbers), 0 where w_i = 0."""
    eps = eps.double() if isinstance(eps, Tensor) else eps
    t = w.double() * torch.expm1((p.double() - q.double()) / eps).abs()
    return torch.where(w > 0, t, 0)


def marginal_error(a: Tensor, f_prev: Tensor, f: Tensor, b: Tensor, g_prev: Tensor, g: Tensor,
                   eps: Union[float, Tensor], double: bool = False) -> Tensor:
    """L1 marginal violation ``|P 1 - a|_1 + |P^T 1 - b|_1`` per problem ``(B,)`` of the plan
    ``P_ij = a_i b_j exp((f'_i + g'_j - C_ij) / eps)`` of the potentials ``f', g'`` before the
    extrapolation ``f = softmin_eps(C, log b + g' / eps)``, ``g = softmin_eps(C^T, log a + f' / eps)``:
    the row sums of ``P`` are ``a_i exp((f'_i - f_i) / eps)``, so no pass over ``C`` is needed and it
    is the violation that ``tol`` bounds (with ``stop="marginals"``). ``eps``: a float or ``(B, 1)``.
    Points without mass contribute 0 (whatever their potentials: no 0 * inf). Computed in float64;
    returned in a's dtype, or float64 with ``double`` (what the tolerance test compares)."""
    err = _side_terms(a, f_prev, f, eps).sum(1) + _side_terms(b, g_prev, g, eps).sum(1)
    return err if double else err.to(a.dtype)


def row_error_l2(a: Tensor, f_prev: Tensor, f: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """POT's stopping quantity ``|P 1 - a|_2`` (the L2 norm of the row-marginal violation; POT's
    ``solve_batch`` checks it after the column update, whose columns are exact) of the plan of
    ``f', g'`` as in :func:`marginal_error`, float64 ``(B,)``."""
    return _side_terms(a, f_prev, f, eps).square().sum(1).sqrt()


def final_errors(a: Tensor, f_prev: Tensor, f: Tensor, b: Tensor, g_prev: Tensor, g: Tensor,
                 eps: Union[float, Tensor], pot: bool) -> tuple[Tensor, Tensor]:
    """``(marginal_error, the stopping rule's violation)`` in float64: :func:`marginal_error` and,
    with ``pot``, :func:`row_error_l2`, the row side's terms computed once for both."""
    rows = _side_terms(a, f_prev, f, eps)
    err = rows.sum(1) + _side_terms(b, g_prev, g, eps).sum(1)
    return err, (rows.square().sum(1).sqrt() if pot else err)


# update rules of the fixed-eps loop: bit 0 alternate (Gauss-Seidel) updates, bit 1 POT's L2 row test
UPDATES = ("averaged", "alternate")
STOPS = ("marginals", "pot")


def rule_code(update: str, stop: str) -> int:
    """The solvers' ``rule`` integer for an update rule and a stopping rule."""
    return int(update == "alternate") + 2 * int(stop == "pot")


def solve(C: Tensor, loga: Tensor, logb: Tensor, log_eps0: Tensor, n_anneal: Tensor, log_ratio: float,
          eps: float, n_iters: int, tol: Optional[float], symmetric: bool = False, rule: int = 0):
    """Sinkhorn loop on a detached cost ``C (B, n, m)``.

    Runs per problem ``n_anneal`` annealing iterations then up to ``n_iters`` at ``eps``.

    ``rule`` 0 (``update="averaged"``, the default): symmetric updates ``f <- (f + ft) / 2``,
    ``g <- (g + gt) / 2`` with ``ft = softmin_eps(C, log b + g / eps)``, ``gt = softmin_eps(C^T, log a
    + f / eps)``, stopping a problem once the L1 marginal violation of its plan before an update,
    ``sum_i a_i |1 - exp((f_i - ft_i) / eps)| + sum_j b_j |1 - exp((g_j - gt_j) / eps)|``, is below
    ``tol`` (tested at every update at the target eps). ``symmetric`` (C = C^T, a = b): g is f, as
    for GeomLoss's OT(a, a).

    ``rule`` bit 0 (``update="alternate"``): Gauss-Seidel updates as POT's ``sinkhorn_log``,
    ``f <- ft``, then ``g <- softmin_eps(C^T, log a + f / eps)``; the columns of the plan are then
    exact, so the violation is the rows' alone, tested before each update whose previous update ran
    at ``eps``. Bit 1 (``stop="pot"``, with alternate updates only): the test is POT's, the L2 norm
    ``|P 1 - a|_2 < tol`` instead of the L1 violation of both marginals.
    Returns the previous potentials ``(f, g)`` (before the last extrapolation) and iterations.
    """
    C = C.detach()
    alternate, l2 = bool(rule & 1), bool(rule & 2)
    if alternate and symmetric:
        raise ValueError("alternate updates have no symmetric (g = f) form")
    if l2 and not alternate:
        raise ValueError("POT's L2 row test needs alternate updates (exact columns)")
    B = C.shape[0]
    e0 = torch.exp(log_eps0)
    f = _softmin(e0, C, logb)
    g = f if symmetric else _softmin(e0, C.transpose(1, 2), loga)
    iters = torch.zeros(B, dtype=torch.int32, device=C.device)
    active = torch.ones(B, dtype=torch.bool, device=C.device)
    total = n_anneal + n_iters
    wa, wb = loga.double().exp(), logb.double().exp()  # the kernels' exp(log w): the same test numbers
    for t in range(int(total.max())):  # host loop: the reference favours clarity over capture
        e = eps_at(t, log_eps0, n_anneal, log_ratio, eps)
        ec = e.to(C.dtype).unsqueeze(-1)
        ft = _softmin(e, C, logb + g / ec)
        run = active & (t < total)
        if alternate:
            if tol is not None:
                err = row_error_l2(wa, f, ft, eps) if l2 else marginal_error(wa, f, ft, wb, g, g, eps, True)
                run = run & ~((t > n_anneal) & (err < tol))
            r = run.unsqueeze(-1)
            f = torch.where(r, ft, f)
            g = torch.where(r, _softmin(e, C.transpose(1, 2), loga + f / ec), g)
        else:
            gt = ft if symmetric else _softmin(e, C.transpose(1, 2), loga + f / ec)
            if tol is not None:
                err = marginal_error(wa, f, ft, wb, g, gt, eps, True)
                run = run & ~((t >= n_anneal) & (err < tol))
            r = run.unsqueeze(-1)
            f = torch.where(r, 0.5 * (f + ft), f)
            g = f if symmetric else torch.where(r, 0.5 * (g + gt), g)
        iters = iters + run.to(torch.int32)
        active = run
        if not bool(active.any()):
            break
    return f, g, iters


def extrapolate(C: Tensor, logb: Tensor, g: Tensor, eps: float) -> Tensor:
    """Last update ``f' = softmin_eps(C, log b + g / eps)`` from the detached previous ``g``,
    differentiable in ``C`` (the envelope-theorem gradient)."""
    e = torch.full((C.shape[0],), eps, dtype=torch.float64, device=C.device)
    return _softmin(e, C, (logb + g / eps).detach())


def _weights(w: Optional[Tensor], mask: Optional[Tensor], shape, dtype, device) -> Tensor:
    """Normalised weights with zero mass on padded points (uniform over real points by default)."""
    real = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask
    w = real.to(dtype) if w is None else torch.where(real, w, 0)
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def sinkhorn(x: Optional[Tensor], y: Optional[Tensor], a: Optional[Tensor] = None, b: Optional[Tensor] = None,
             x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None, cost="half_sqeuclidean",
             eps: Optional[float] = None, blur: float = 0.05, scaling: float = 0.5,
             n_iters: Optional[int] = None, tol: Optional[float] = None, debias: bool = False,
             return_plan: bool = False, update: str = "averaged", stop: str = "marginals") -> dict:
    """Reference entropic OT (``debias=False``) or Sinkhorn divergence (``debias=True``).

    Inputs are batched ``(B, n, d)``, ``(B, m, d)`` (already validated), or ``x = y = None`` with a
    precomputed ``cost`` tensor ``(B, n, m)``. Returns a dict with ``value (B,)`` (differentiable),
    detached ``f, g`` (and ``plan (B, n, m)``), ``iters (B,)`` and ``marginal_error (B,)``
    (:func:`marginal_error`; with ``debias`` the largest of the three problems'), and
    ``stop_error (B,)`` float64, the quantity ``tol`` bounds (``marginal_error``'s, or with
    ``stop="pot"`` :func:`row_error_l2`). ``update`` / ``stop``: see :func:`solve` (eps-scaling
    and the debiasing problems keep the averaged update). Problems with no real point on a side give 0.
    """
    rule = rule_code(update, stop)
    if isinstance(cost, Tensor):
        B, n, m = cost.shape
        dtype, device = cost.dtype, cost.device
        p = 1
    else:
        B, n, _ = x.shape
        m = y.shape[1]
        dtype, device = x.dtype, x.device
        p = COST_P[cost]
    aw = _weights(a, x_mask, (B, n), dtype, device)
    bw = _weights(b, y_mask, (B, m), dtype, device)
    empty = (aw.sum(1) == 0) | (bw.sum(1) == 0)
    # an empty problem runs on dummy uniform weights (finite everywhere) and is zeroed at the end
    loga = torch.where(empty.unsqueeze(-1), 0, log_weights(aw))
    logb = torch.where(empty.unsqueeze(-1), 0, log_weights(bw))
    if isinstance(cost, Tensor):
        real = _pair_mask(x_mask, y_mask, B, n, m, device)
        pair = cost.masked_fill(~real, 0)
        # f and g each carry a one-sided plan estimating d OT / d C = P: average the two by
        # letting half of C's gradient through each (values unchanged)
        C_f = C_g = 0.5 * (pair + pair.detach())
        scale = cost_range(pair, real)
    else:
        C_f = cost_matrix(x, y.detach(), cost, x_mask, y_mask)
        C_g = cost_matrix(x.detach(), y, cost, x_mask, y_mask)
        scale = diameter(x, y, x_mask, y_mask) if cost != "cosine" else \
            cost_range(C_f, _pair_mask(x_mask, y_mask, B, n, m, device))
    target = blur ** p if eps is None else eps
    if eps is None:
        log_eps0, n_anneal = schedule_params(scale, p, blur, scaling)
        n_target = 1 if n_iters is None else n_iters
    else:
        log_eps0 = torch.full((B,), math.log(eps), dtype=torch.float64, device=device)
        n_anneal = torch.zeros(B, dtype=torch.int32, device=device)
        n_target = 100 if n_iters is None else n_iters
    log_ratio = p * math.log(scaling)
    with torch.no_grad():
        fp, gp, iters = solve(C_f, loga, logb, log_eps0, n_anneal, log_ratio, target, n_target, tol, False, rule)
    f = extrapolate(C_f, logb, gp, target)
    g = extrapolate(C_g.transpose(1, 2), loga, fp, target)
    # value with explicit weights (d value / d a = f, the envelope theorem)
    value = (aw * f).sum(1) + (bw * g).sum(1)
    # the weights as the stopping test reads them, exp(log w) in float64: reported and tested agree
    wa, wb = log_weights(aw).double().exp(), log_weights(bw).double().exp()
    err, stop_err = final_errors(wa, fp, f.detach(), wb, gp, g.detach(), target, bool(rule & 2))
    out = {"f": f, "g": g}
    if debias:
        if isinstance(cost, Tensor):
            raise ValueError("the Sinkhorn divergence needs point clouds, not a precomputed cost")
        C_xx = cost_matrix(x, x.detach(), cost, x_mask, x_mask)
        C_yy = cost_matrix(y, y.detach(), cost, y_mask, y_mask)
        with torch.no_grad():
            faap, _, _ = solve(C_xx, loga, loga, log_eps0, n_anneal, log_ratio, target, n_target, tol, True)
            gbbp, _, _ = solve(C_yy, logb, logb, log_eps0, n_anneal, log_ratio, target, n_target, tol, True)
        faa = extrapolate(C_xx, loga, faap, target)
        gbb = extrapolate(C_yy, logb, gbbp, target)
        value = value - (aw * faa).sum(1) - (bw * gbb).sum(1)
        out.update(f_aa=faa, g_bb=gbb)
        for w, hp, h in ((wa, faap, faa.detach()), (wb, gbbp, gbb.detach())):  # symmetric: g = f
            err = torch.maximum(err, marginal_error(w, hp, h, w, hp, h, target, True))
        stop_err = err
    value = torch.where(empty, 0, value)
    xm = torch.ones(B, n, dtype=torch.bool, device=device) if x_mask is None else x_mask
    ym = torch.ones(B, m, dtype=torch.bool, device=device) if y_mask is None else y_mask
    live = ~empty.unsqueeze(-1)
    side = {"f": xm, "f_aa": xm, "g": ym, "g_bb": ym}
    out = {k: torch.where(live & side[k], v, 0).detach() for k, v in out.items()}
    if return_plan:
        C = C_f.detach()
        lp = (out["f"].unsqueeze(2) + out["g"].unsqueeze(1) - C) / target + \
            log_weights(aw).unsqueeze(2) + log_weights(bw).unsqueeze(1)
        out["plan"] = torch.where(live.unsqueeze(-1), lp.exp(), 0)
    out["value"] = value
    out["iters"] = torch.where(empty, 0, iters)
    out["marginal_error"] = torch.where(empty, 0, err).to(dtype)
    out["stop_error"] = torch.where(empty, 0, stop_err)
    return out


def _pair_mask(x_mask, y_mask, B, n, m, device) -> Tensor:
    xm = torch.ones(B, n, dtype=torch.bool, device=device) if x_mask is None else x_mask
    ym = torch.ones(B, m, dtype=torch.bool, device=device) if y_mask is None else y_mask
    return xm.unsqueeze(-1) & ym.unsqueeze(-2)
