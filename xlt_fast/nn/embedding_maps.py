"""Maps between two languages' embedding spaces (seed 002, Zhao & Eger): the density-matching pair
of Real-NVP flows (Eqs. 1-3), the bootstrapping constraints (Eqs. 4-5) and the baselines
(orthogonal Procrustes, GBDD, normalisation, FCNN, MUSE's adversarial orthogonal map).

Convention: X is the language mapped (the non-English one), Y the space it is mapped into
(English, left unchanged); a map sends rows ``x (N, d)`` to predictions of rows of Y.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from xlt_fast.nn.flows import RealNVP


def _gaussian_nll(z: Tensor, logdet: Tensor) -> Tensor:
    """``-mean log p(x)`` with ``log p(x) = log N(z; 0, I) + log|det dz/dx|`` (seed 002 Eq. 2)."""
    d = z.shape[1]
    return -(logdet - 0.5 * z.square().sum(1) - 0.5 * d * math.log(2 * math.pi)).mean()


@dataclasses.dataclass
class FlowPass:
    """One pass of both flows over a batch: ``y_hat = f_XY(x)``, ``x_hat = f_YX(y)`` and the
    likelihood term ``nll = (NLL_X + NLL_Y) / 2`` (Eq. 2 on both spaces)."""

    y_hat: Tensor
    x_hat: Tensor
    nll: Tensor


class FlowPair(nn.Module):
    """Two Real-NVP flows sharing the latent ``Z ~ N(0, I)`` (seed 002 Sec. 3.2, AlignFlow-style):
    ``g_X, g_Y`` map data to latents, ``f_XY = g_Y^-1 o g_X`` and ``f_YX = g_X^-1 o g_Y``.

    Each flow is :class:`xlt_fast.nn.RealNVP` (the fused coupling kernels); ``identity_init``
    zeroes every conditioner's output layer so that ``f_XY`` starts as the identity (Algorithm 1,
    step 3).
    """

    def __init__(self, dim: int, n_couplings: int = 8, hidden: int = 512, scale: str = "tanh", clamp: float = 2.0,
                 identity_init: bool = True, backend: str = "auto") -> None:
        super().__init__()
        kw = dict(n_couplings=n_couplings, hidden=hidden, scale=scale, clamp=clamp, backend=backend,
                  identity_init=identity_init)
        self.flow_x, self.flow_y = RealNVP(dim, **kw), RealNVP(dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """``f_XY(x)``: rows of X mapped into Y."""
        return self.flow_y.inverse(self.flow_x(x)[0])[0]

    def backward_map(self, y: Tensor) -> Tensor:
        """``f_YX(y)``: rows of Y mapped into X."""
        return self.flow_x.inverse(self.flow_y(y)[0])[0]

    def both(self, x: Tensor, y: Tensor) -> FlowPass:
        """Both directions and the likelihood from one forward and one inverse of each flow."""
        z_x, ld_x = self.flow_x(x)
        z_y, ld_y = self.flow_y(y)
        y_hat = self.flow_y.inverse(z_x)[0]
        x_hat = self.flow_x.inverse(z_y)[0]
        return FlowPass(y_hat, x_hat, 0.5 * (_gaussian_nll(z_x, ld_x) + _gaussian_nll(z_y, ld_y)))


def matching_loss(out: FlowPass, x: Tensor, y: Tensor) -> Tensor:
    """Eq. 1's cross-entropy term in its symmetric ("dual") form on aligned pairs ``(x_i, y_i)``:
    ``(mean_i |f_XY(x_i) - y_i|^2 + mean_i |f_YX(y_i) - x_i|^2) / 2`` (squares summed over features)."""
    return 0.5 * ((out.y_hat - y).square().sum(1).mean() + (out.x_hat - x).square().sum(1).mean())


def cross_correlation_loss(y_hat: Tensor, y: Tensor, literal: bool = False) -> Tensor:
    """Eq. 5: ``sum_j (c_j - 1)^2`` with ``c_j`` the Pearson correlation over the batch of feature j
    of the induced pairs (columns de-meaned), ``c_j = sum_i a_ij b_ij / sqrt(sum_i a_ij^2 sum_i b_ij^2)``;
    ``literal=True``: the equation as printed, without the square root (spec 6.8)."""
    a, b = y_hat - y_hat.mean(0), y - y.mean(0)
    denom = a.square().sum(0) * b.square().sum(0)
    c = (a * b).sum(0) / (denom if literal else denom.clamp_min(1e-24).sqrt()).clamp_min(1e-12)
    return (c - 1).square().sum()


def graph_structure_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """Eq. 4: ``|G(Y_hat) - G(Y)|^2`` of the batch Gram matrices, here of L2-normalised rows and
    averaged over the ``B^2`` entries (raw Grams of 384-d states are in the hundreds; spec 6.9)."""
    a, b = nn.functional.normalize(y_hat, dim=1), nn.functional.normalize(y, dim=1)
    return (a @ a.T - b @ b.T).square().mean()


def procrustes(x: Tensor, y: Tensor) -> Tensor:
    """The orthogonal ``W`` minimising ``|x W - y|_F`` over pairs (Schönemann 1966): ``W = U V^T``
    with ``U S V^T = svd(x^T y)``."""
    if x.shape != y.shape or x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"procrustes: x and y must be [n, d] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    u, _, vh = torch.linalg.svd(x.double().T @ y.double())
    return (u @ vh).to(x.dtype)


class LinearMap(nn.Module):
    """``x -> x W + b``: the closed-form maps (Rotation: W orthogonal from :func:`procrustes`;
    GBDD: W = I, b = -mean_i(x_i - y_i), the global language bias of Zhao et al. 2020) and MUSE's
    mapping (W trained, b = 0). Starts as the identity."""

    def __init__(self, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def orthogonalize_(self, beta: float) -> None:
        """MUSE's update towards the orthogonal manifold: ``W <- (1 + beta) W - beta W W^T W``."""
        w = self.weight
        w.copy_((1 + beta) * w - beta * (w @ w.T @ w))


class Standardize(nn.Module):
    """Per-feature z-scoring with fixed statistics: the language-specific mean and variance removed
    (Normalization, Zhao et al. 2021; applied to each language with its own statistics)."""

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", rows.mean(0))
        self.register_buffer("std", rows.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class FCNN(nn.Module):
    """Three fully connected layers of width ``width`` each followed by tanh (seed 002 Sec. 4.1, A.1:
    1024). ``linear_output`` drops the last tanh: layer-8 states and the simulation's points lie far
    outside (-1, 1), which a tanh output cannot reach (spec 6.18)."""

    def __init__(self, dim: int, width: int = 1024, linear_output: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                   nn.Linear(width, dim)]
        if not linear_output:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    """MUSE's language discriminator (Lample et al. 2018, their defaults): input dropout 0.1, two
    hidden layers of 2048 with LeakyReLU(0.2), one logit (mapped source vs target)."""

    def __init__(self, dim: int, hidden: int = 2048, input_dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(input_dropout), nn.Linear(dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)
