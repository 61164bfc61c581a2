"""Reference pairwise distances by explicit differences (no |x|^2 + |y|^2 - 2xy cancellation)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlt_fast._validate import masked  # padded points to zeros: no value or gradient of theirs survives


def safe_sqrt(d2: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf/NaN) where the argument is exactly 0."""
    positive = d2 > 0
    return torch.where(positive, torch.where(positive, d2, 1).sqrt(), 0)


def unit_rows(x: Tensor) -> Tensor:
    """x / |x| row-wise (one reciprocal per row, then a product); a zero row stays zero."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.where(norm > 0, 1 / torch.where(norm > 0, norm, 1), 0)


def cosine_from_units(sq_half: Tensor, xn: Tensor, yn: Tensor) -> Tensor:
    """1 - cos from ``sq_half = |x^ - y^|^2 / 2`` of the unit rows, with cos = 0 for zero rows.

    For non-zero rows 1 - cos = |x^ - y^|^2 / 2 exactly, which is exactly 0 for identical rows;
    a zero row contributes the missing 1/2 per zero side so that its distance to anything is 1.
    """
    zx = (xn.abs().amax(-1) == 0).to(sq_half.dtype)
    zy = (yn.abs().amax(-1) == 0).to(sq_half.dtype)
    return sq_half + 0.5 * (zx.unsqueeze(-1) + zy.unsqueeze(-2))


def pairwise_distance(x: Tensor, y: Tensor, metric: str = "sqeuclidean",
                      x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None) -> Tensor:
    """Distances between the rows of ``x (B, n, d)`` and ``y (B, m, d)`` -> ``(B, n, m)``.

    sqeuclidean |x - y|^2, euclidean |x - y|, cosine 1 - cos(x, y), dot <x, y> (a similarity,
    kept so that every op takes the same metric names). Entries involving a padded point are 0.
    """
    x, y = masked(x, x_mask), masked(y, y_mask)
    if metric == "dot":
        out = x @ y.transpose(-1, -2)
    else:
        if metric == "cosine":
            x, y = unit_rows(x), unit_rows(y)
        d2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
        if metric == "sqeuclidean":
            out = d2
        elif metric == "euclidean":
            out = safe_sqrt(d2)
        elif metric == "cosine":
            out = cosine_from_units(0.5 * d2, x, y)
        else:
            raise ValueError(f"unknown metric {metric!r}")
    if x_mask is not None or y_mask is not None:
        b, n, m = out.shape
        xm = x_mask if x_mask is not None else out.new_ones(b, n, dtype=torch.bool)
        ym = y_mask if y_mask is not None else out.new_ones(b, m, dtype=torch.bool)
        out = out.masked_fill(~(xm.unsqueeze(-1) & ym.unsqueeze(-2)), 0)
    return out


def similarity_logits(a: Tensor, c: Tensor, metric: str, temperature: float) -> Tensor:
    """Logits of anchors ``a (..., n, d)`` against candidates ``c (..., m, d)``: similarity / tau,
    with cosine similarity, dot product, or minus the (squared) euclidean distance."""
    if metric == "cosine":
        sim = unit_rows(a) @ unit_rows(c).transpose(-1, -2)
    elif metric == "dot":
        sim = a @ c.transpose(-1, -2)
    elif metric in ("sqeuclidean", "euclidean"):
        sim = -pairwise_distance(a.unsqueeze(0) if a.dim() == 2 else a,
                                 c.unsqueeze(0) if c.dim() == 2 else c, metric)
        if a.dim() == 2:
            sim = sim.squeeze(0)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return sim / temperature
