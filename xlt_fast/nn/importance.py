"""Class importance weights ``w_y = p_T(y) / p_S(y)`` under label shift, estimated as in IWDA
(seed 000, Sec. 3 and App. C.1; after Lipton et al. 2018 and Tachet des Combes et al. 2020).

Eq. (3): ``p_T(Y^ = i) = sum_j p_S(Y^ = i, Y = j) w_j``, i.e. ``t = C w`` with the source joint
confusion matrix ``C[i, j]`` and the target prediction histogram ``t``. The estimate solves
``min_w |C w - t|^2`` s.t. ``w >= 0`` and ``p_S^T w = 1`` (Eq. 4, right):

* once by quadratic programming on the zero-shot model's hard predictions (:func:`solve_weights_qp`),
  giving the initial ``w^(0) = (1 - rho) w' + rho 1`` (App. C.1);
* then at every training step by projected gradient descent on ``|C w - t|^2`` with EMA
  statistics (Sec. 3, fixes 1-3), ``w = w^(0) + delta`` and ``delta`` decayed towards 0 by the
  optimizer (decoupled weight decay: the regulariser ``xi |w - w^(0)|^2``).
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

Projection = Literal["clamp", "euclidean"]


def confusion_counts(pred: Tensor, labels: Tensor, k: int) -> Tensor:
    """Hard joint counts ``C[i, j] = #{pred = i, label = j}``, shape ``(k, k)``."""
    flat = pred.long() * k + labels.long()
    return torch.bincount(flat, minlength=k * k).reshape(k, k).to(torch.float64)


def prediction_counts(pred: Tensor, k: int) -> Tensor:
    """Hard prediction histogram ``t[i] = #{pred = i}``, shape ``(k,)``."""
    return torch.bincount(pred.long(), minlength=k).to(torch.float64)


def solve_weights_qp(confusion: np.ndarray, target_hist: np.ndarray, source_prior: np.ndarray) -> np.ndarray:
    """``argmin_w |C w - t|^2`` s.t. ``w >= 0``, ``p_S^T w = 1`` (``C`` and ``t`` normalised to sum 1).

    A convex QP solved by SLSQP (scipy) to 1e-12; the IWDA authors use cvxopt for the same problem.
    The linear term of the objective is ``-C^T t`` (their code writes ``-C t``, which agrees only
    for symmetric C; spec D.8).
    """
    from scipy.optimize import minimize

    C = np.asarray(confusion, dtype=np.float64)
    C = C / C.sum()
    t = np.asarray(target_hist, dtype=np.float64)
    t = t / t.sum()
    p = np.asarray(source_prior, dtype=np.float64)
    P, q = C.T @ C, C.T @ t
    k = len(p)
    res = minimize(lambda w: w @ P @ w - 2 * q @ w, np.ones(k), jac=lambda w: 2 * (P @ w - q), method="SLSQP",
                   bounds=[(0, None)] * k, constraints=[{"type": "eq", "fun": lambda w: p @ w - 1, "jac": lambda w: p}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    if not res.success:  # fall back to projected gradient descent, exact projection (slow but sure)
        warnings.warn(f"solve_weights_qp: SLSQP did not converge ({res.message}); using projected gradient descent")
        w, step = torch.ones(k, dtype=torch.float64), 1 / (2 * np.linalg.eigvalsh(P).max() + 1e-12)
        Pt, qt, pt = (torch.as_tensor(a) for a in (P, q, p))
        for _ in range(20000):
            w = project_weights(w - step * 2 * (Pt @ w - qt), pt, "euclidean")
        return w.numpy()
    w = np.clip(res.x, 0, None)
    return w / (p @ w)


def project_weights(w: Tensor, source_prior: Tensor, method: Projection = "clamp") -> Tensor:
    """Map ``w`` back to ``{w >= 0, p_S^T w = 1}``.

    ``"clamp"``: ``max(w, 0)`` then divide by ``p_S^T w`` (the IWDA authors' code; not the nearest
    point; if no weight is positive, w = 1). ``"euclidean"``: the nearest point, ``w_i = max(0, v_i - lam p_i)`` with ``lam`` solving
    ``sum_i p_i max(0, v_i - lam p_i) = 1`` (exact, from the sorted breakpoints ``v_i / p_i``).
    """
    if method == "clamp":
        w = w.clamp_min(0)
        total = (source_prior * w).sum()
        return torch.where(total > 0, w / total.clamp_min(1e-300), torch.ones_like(w))  # all <= 0: no shift
    p, v = source_prior, w
    breaks, _ = torch.sort(v / p)
    # g(lam) = sum_i p_i relu(v_i - lam p_i) decreases from +inf to 0; g at every breakpoint:
    g = (p * torch.relu(v[None, :] - breaks[:, None] * p[None, :])).sum(1)
    above = (g >= 1).nonzero()
    lo = breaks[above[-1, 0]] if above.numel() else breaks[0] - 1  # the segment holding the root
    active = (v - lo * p) > 0
    lam = ((p * v)[active].sum() - 1) / (p[active] ** 2).sum()
    return torch.relu(v - lam * p)


class ImportanceWeights(nn.Module):
    """``w = w^(0) + delta`` with EMA statistics ``C`` (source joint confusion) and ``t`` (target
    prediction histogram), all in the state dict.

    The statistics start at ``C = diag(p_S)``, ``t = p_S * w^(0)``, where ``w^(0)`` is optimal (the
    intent stated by the IWDA code's ``ImWeightsEstimator``; its code sets the transposed pair).
    Each update adds a batch's counts normalised to sum 1 with rate ``ema_rate`` (the code adds raw
    counts; in the steady state both weigh a batch by ``ema_rate``, but raw counts forget the
    starting point about batch-size times faster). With ``trainable=False`` the weights stay fixed
    (oracle or uniform weights).
    """

    def __init__(self, source_prior: Tensor, init: Tensor | None = None, ema_rate: float = 5e-3,
                 trainable: bool = True) -> None:
        super().__init__()
        p = torch.as_tensor(source_prior, dtype=torch.float64)
        if p.dim() != 1 or (p <= 0).any():
            raise ValueError(f"ImportanceWeights: source_prior must be a vector of positive class frequencies, got "
                             f"{p.tolist()}")
        k = p.numel()
        self.ema_rate = ema_rate
        self.register_buffer("source_prior", p / p.sum())
        self.register_buffer("init", torch.ones(k, dtype=torch.float64))
        self.register_buffer("confusion", torch.zeros(k, k, dtype=torch.float64))
        self.register_buffer("target_hist", torch.zeros(k, dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float64), requires_grad=trainable)
        self.reset(torch.ones(k, dtype=torch.float64) if init is None else init)

    @torch.no_grad()
    def reset(self, init: Tensor) -> None:
        """Start from ``w^(0) = init`` (delta = 0) with statistics at which it is optimal."""
        init = torch.as_tensor(init, dtype=torch.float64, device=self.init.device)
        self.init.copy_(init)
        self.delta.zero_()
        self.confusion.copy_(torch.diag(self.source_prior))
        self.target_hist.copy_(self.source_prior * init)

    @property
    def weights(self) -> Tensor:
        """``w = w^(0) + delta`` (differentiable w.r.t. delta)."""
        return self.init + self.delta

    @property
    def target_prior(self) -> Tensor:
        """The implied target prior ``p_S * w`` (sums to 1 when w is feasible)."""
        w = self.weights.detach()
        return self.source_prior * w / (self.source_prior * w).sum()

    @torch.no_grad()
    def update_statistics(self, confusion: Tensor, target_hist: Tensor) -> None:
        """EMA step with a batch's hard counts (already summed over processes)."""
        s = self.ema_rate
        self.confusion.mul_(1 - s).add_(confusion.to(self.confusion) / confusion.sum().clamp_min(1), alpha=s)
        self.target_hist.mul_(1 - s).add_(target_hist.to(self.target_hist) / target_hist.sum().clamp_min(1), alpha=s)

    def loss(self) -> Tensor:
        """``|C w - t|^2`` with the normalised statistics; its gradient reaches delta only."""
        C = self.confusion / self.confusion.sum()
        t = self.target_hist / self.target_hist.sum()
        return (C @ self.weights - t).square().sum()

    @torch.no_grad()
    def project_(self, method: Projection = "clamp") -> None:
        """Make ``w`` feasible again after an optimizer step (projected gradient descent)."""
        self.delta.copy_(project_weights(self.weights, self.source_prior, method) - self.init)
