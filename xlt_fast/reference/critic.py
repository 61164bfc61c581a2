"""Reference Wasserstein critic with zero-centred gradient penalty, built the usual way: the
conditioned input is materialised and the penalty's gradient comes from
``torch.autograd.grad(create_graph=True)`` and a double backward (seed 000, App. C.1; seed 002, Eq. 3).

Critic ``f(x) = w2 · relu(W1 x + b1) + b2``. With CDAN conditioning (seed 000, App. C.1; Long et al.
2018) the input is the outer product of the class distribution p (size k) and the feature z
(size d), flattened with p as the outer index: ``x[c*d + a] = p_c z_a``, i.e.
``bmm(p.unsqueeze(2), z.unsqueeze(1)).view(-1, k*d)`` as in the CDAN code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def conditioned_input(z: Tensor, p: Optional[Tensor]) -> Tensor:
    """``z`` itself, or the CDAN input ``p ⊗ z`` of shape ``(N, k*d)`` (materialised)."""
    if p is None:
        return z
    return (p.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)


def critic(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    """``f(x_r) = w2 · relu(W1 x_r + b1) + b2`` for each row of ``x``; shape ``(N,)``."""
    return torch.relu(x @ w1.T + b1) @ w2 + b2


def critic_gp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, z_src: Tensor, z_tgt: Tensor,
              p_src: Optional[Tensor], p_tgt: Optional[Tensor], src_weight: Optional[Tensor], alpha: Tensor,
              detach_penalty_features: bool = True, normalize: str = "sum_w") -> tuple[Tensor, Tensor]:
    """``(w1_estimate, penalty)`` of seed 000, App. C.1 (the alignment loss after Eq. 4):

    ``w1_estimate = sum_i w_i f(xs_i) / Z - mean_j f(xt_j)`` (``w = 1`` without weights) with
    ``Z = sum_i w_i`` (``normalize="sum_w"``) or ``Z = n`` (``normalize="n"``, the IWDA authors' code),
    ``penalty = mean_{i < min(n,m)} |∇_x f(x~_i)|^2`` with ``x~_i = a_i xs_i + (1 - a_i) xt_i`` on
    the segment between the critic's inputs (with CDAN ``x = p ⊗ z``: the conditioned inputs are
    interpolated, as the IWDA authors' code does; spec A.2h).

    With ``detach_penalty_features`` (the IWDA code's convention) the penalty sees the features
    as constants; otherwise its gradient also flows to them (it is zero almost everywhere for this
    one-hidden-layer ReLU critic: its input gradient is piecewise constant).
    """
    fs = critic(w1, b1, w2, b2, conditioned_input(z_src, p_src))
    ft = critic(w1, b1, w2, b2, conditioned_input(z_tgt, p_tgt))
    if src_weight is None:
        src_mean = fs.mean()
    else:
        src_mean = (src_weight * fs).sum() / (src_weight.sum() if normalize == "sum_w" else fs.shape[0])
    estimate = src_mean - ft.mean()

    k = alpha.shape[0]
    zs, zt = z_src[:k], z_tgt[:k]
    if detach_penalty_features:
        zs, zt = zs.detach(), zt.detach()
    a = alpha.unsqueeze(-1)
    x_src = conditioned_input(zs, None if p_src is None else p_src[:k])
    x_tgt = conditioned_input(zt, None if p_tgt is None else p_tgt[:k])
    x_mix = a * x_src + (1 - a) * x_tgt
    if not x_mix.requires_grad:
        x_mix = x_mix.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(w1, b1, w2, b2, x_mix).sum(), x_mix, create_graph=True)
    penalty = grad.square().sum(-1).mean()
    return estimate, penalty
