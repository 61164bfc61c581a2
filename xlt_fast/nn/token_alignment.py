"""Token couplings and the alignment loss of WCA (Wang and Henao; seed 001, Eqs. 3-9).

Token states of parallel sentences come as layer stacks ``xs (L, B, n, d)`` (source) and
``ys (L, B, m, d)`` (target) with masks ``x_mask (B, n)``, ``y_mask (B, m)`` (True = a real token:
special tokens and padding are False, spec A6.5). Every coupling ``T (B, n, m)`` is a constant
(computed without gradient, A6.2); the loss carries the gradient through the costs:

* ``C^b_ij = 1 - cos(x^b_i, y^b_j)`` per layer b (Sec. 3.2): :func:`cosine_costs`, one batched GEMM
  on unit rows for all layers;
* Eq. 5, the per-layer entropic plans with uniform marginals over the real tokens: :func:`layer_plans`,
  one :func:`xlt_fast.sinkhorn` call over all ``L * B`` problems on those same costs;
* Eq. 4 ``T_soft = mean_b T^b`` and Eq. 6 ``T_hard``: each target column's mass ``1 / n_t`` on its
  argmax source token (:func:`xlt_fast.average_plans`, :func:`xlt_fast.hard_coupling`);
* Eq. 8 (nearest token): each target token's ``1 / n_t`` on the source token of least layer-mean
  cost, no marginal constraint (:func:`nearest_coupling`);
* Eq. 9 (a word aligner's links): ``1 / n_t`` (n_t = real target words) on each linked word pair
  (:func:`link_coupling`);
* Eq. 3: ``L_w = mean_pairs sum_ij T_ij sum_b C^b_ij`` (:func:`alignment_loss`; a sum over layers,
  A6.4).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import xlt_fast

Coupling = Literal["hard", "soft", "nearest"]


def cosine_costs(xs: Tensor, ys: Tensor) -> Tensor:
    """``C (..., n, m) = 1 - <x_i / |x_i|, y_j / |y_j|>`` for ``xs (..., n, d)``, ``ys (..., m, d)``:
    the rows normalised once, one batched GEMM; differentiable. A zero (padded) row has cost 1."""
    u = F.normalize(xs, dim=-1, eps=1e-12)
    v = F.normalize(ys, dim=-1, eps=1e-12)
    return 1.0 - u @ v.transpose(-1, -2)


def _relative(C: Tensor, real: Tensor) -> Tensor:
    """Each problem's cost divided by its range over the real pairs (so a fixed eps is a fraction of it)."""
    hi = C.masked_fill(~real, float("-inf")).amax((-1, -2), keepdim=True)
    lo = C.masked_fill(~real, float("inf")).amin((-1, -2), keepdim=True)
    span = (hi - lo).nan_to_num(0.0, 0.0, 0.0).clamp_min(1e-6)
    return C / span


@torch.no_grad()
def layer_plans(costs: Tensor, x_mask: Tensor, y_mask: Tensor, *, eps: float = 0.05, n_iters: int = 100,
                tol: float | None = 1e-3, relative_eps: bool = False, backend: str = "auto"
                ) -> tuple[Tensor, Tensor]:
    """Eq. 5 for every layer and pair in one Sinkhorn call: ``(plans (L, B, n, m), marginal error
    (L, B))`` of the detached costs ``(L, B, n, m)`` at the fixed temperature ``eps`` (A6.1: log
    domain, at most ``n_iters`` updates, early exit below ``tol``). ``relative_eps`` scales eps by
    each problem's cost range (the fix the coupling probe suggests: layer 12's costs span a third of
    layers 9-11's)."""
    L, B, n, m = costs.shape
    C = costs.detach().reshape(L * B, n, m)
    xm, ym = x_mask.repeat(L, 1), y_mask.repeat(L, 1)
    if relative_eps:
        C = _relative(C, xm.unsqueeze(2) & ym.unsqueeze(1))
    out = xlt_fast.sinkhorn(x_mask=xm, y_mask=ym, cost=C, eps=eps, n_iters=n_iters, tol=tol, return_plan=True,
                            check_finite=False, warn=False, backend=backend)
    return out.plan.view(L, B, n, m), out.marginal_error.view(L, B)


def _one_per_column(index: Tensor, y_mask: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``(B, n, m)``: ``1 / n_t`` at ``(index[b, j], j)`` for every real column j, 0 elsewhere."""
    B, m = index.shape
    nt = y_mask.sum(1).clamp_min(1).to(dtype).view(B, 1, 1)
    mass = y_mask.to(dtype).unsqueeze(1) / nt
    return torch.zeros(B, n, m, dtype=dtype, device=index.device).scatter_(1, index.unsqueeze(1), mass)


@torch.no_grad()
def nearest_coupling(costs: Tensor, x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """Eq. 8: each real target token's mass ``1 / n_t`` on ``argmin_i mean_b C^b_ij`` over the real
    source tokens; ``costs (L, B, n, m)`` -> ``(B, n, m)``."""
    mean = costs.detach().mean(0).masked_fill(~x_mask.unsqueeze(2), float("inf"))
    return _one_per_column(mean.argmin(1), y_mask, costs.shape[2], costs.dtype)


@torch.no_grad()
def token_coupling(costs: Tensor, x_mask: Tensor, y_mask: Tensor, kind: Coupling = "hard", **plan_options
                   ) -> Tensor:
    """The constant coupling ``T (B, n, m)`` of costs ``(L, B, n, m)``: ``"hard"`` (Eqs. 4-6, WCA's
    default), ``"soft"`` (Eqs. 4-5) or ``"nearest"`` (Eq. 8). ``plan_options`` go to
    :func:`layer_plans`."""
    if kind == "nearest":
        return nearest_coupling(costs, x_mask, y_mask)
    if kind not in ("hard", "soft"):
        raise ValueError(f"token_coupling: kind must be 'hard', 'soft' or 'nearest', got {kind!r}")
    plans, _ = layer_plans(costs, x_mask, y_mask, **plan_options)
    soft = xlt_fast.average_plans(plans, check_finite=False)
    return soft if kind == "soft" else xlt_fast.hard_coupling(soft, y_mask, check_finite=False)


def link_coupling(links: Sequence[Sequence[tuple[int, int]]], x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """Eq. 9: ``1 / n_t`` (n_t = real target words of the pair) on each linked ``(source word, target
    word)`` pair whose words are both real, 0 elsewhere: ``(B, n, m)`` for word masks ``(B, n)``,
    ``(B, m)``."""
    B, n = x_mask.shape
    m = y_mask.shape[1]
    T = torch.zeros(B, n, m, device=x_mask.device)
    found = [(b, i, j) for b, pair in enumerate(links) for i, j in pair if 0 <= i < n and 0 <= j < m]
    if found:
        rows, cols_x, cols_y = torch.tensor(found, device=x_mask.device).unbind(1)
        keep = x_mask[rows, cols_x] & y_mask[rows, cols_y]
        nt = y_mask.sum(1).clamp_min(1).float()
        T[rows[keep], cols_x[keep], cols_y[keep]] = 1.0 / nt[rows[keep]]
    return T


def alignment_loss(coupling: Tensor, costs: Tensor) -> Tensor:
    """Eq. 3: ``mean_pairs sum_ij T_ij sum_b C^b_ij`` for a constant ``T (B, n, m)`` and costs
    ``(L, B, n, m)`` (with the hard coupling: the cosine distance of each target token to its
    source token, averaged over target tokens, summed over layers)."""
    return (coupling.detach().to(costs.dtype).unsqueeze(0) * costs).sum((0, 2, 3)).mean()
