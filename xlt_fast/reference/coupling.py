"""Reference affine coupling epilogue (Real-NVP, Dinh et al. 2017, eqs. 4-8; seed 002 sec. 3).

With a boolean feature mask ``m`` (True = transformed) and the conditioner's raw outputs
``s_raw, t`` for the transformed features (in increasing feature order):

    forward:  y_m = x_m * exp(s) + t,      y_~m = x_~m,   logdet = +sum_k s_k
    inverse:  x_m = (y_m - t) * exp(-s),   x_~m = y_~m,   logdet = -sum_k s_k

where ``s = g(s_raw)`` is the scale map: ``"exp"`` g(u) = u (plain Real-NVP), ``"tanh"``
g(u) = c tanh(u / c) and ``"atan"`` g(u) = c (2/pi) atan(u / c) (soft clamps, |s| < c = clamp).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SCALES = ("exp", "tanh", "atan")


def scale_map(s_raw: Tensor, scale: str, clamp: float) -> Tensor:
    """The log-scale ``s = g(s_raw)`` (see the module docstring)."""
    if scale == "exp":
        return s_raw
    if scale == "tanh":
        return clamp * torch.tanh(s_raw / clamp)
    if scale == "atan":
        return (clamp * 2 / math.pi) * torch.atan(s_raw / clamp)
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def coupling(x: Tensor, s_raw: Tensor, t: Tensor, mask: Tensor, scale: str = "exp", clamp: float = 2.0,
             inverse: bool = False) -> tuple[Tensor, Tensor]:
    """``(y, logdet)`` for ``x (N, d)``, ``s_raw, t (N, d_m)`` and a bool ``mask (d,)`` with d_m Trues.

    Differentiable in x, s_raw and t; logdet is summed in fp32 at least (fp64 for fp64 inputs).
    """
    s = scale_map(s_raw, scale, clamp)
    x2 = x[:, mask]
    y2 = (x2 - t) * torch.exp(-s) if inverse else x2 * torch.exp(s) + t
    y = x.clone()
    y[:, mask] = y2
    acc = torch.promote_types(s.dtype, torch.float32)
    logdet = s.to(acc).sum(-1)
    return y, (-logdet if inverse else logdet)
