"""Wasserstein-1 critic of IWDA (seed 000, App. C.1), optionally CDAN-conditioned."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from xlt_fast import _backend
from xlt_fast.ops.critic import Normalize, critic_gp, critic_values


class WassersteinCritic(nn.Module):
    """``f(z) = w2 · relu(W1 z + b1) + b2``, one hidden ReLU layer of width ``hidden``.

    With ``num_classes=k`` the input is the CDAN outer product ``p ⊗ z`` of a class distribution
    ``p`` (size k, detached) and the feature ``z`` (size d), flattened as ``x[c*d + a] = p_c z_a``
    (seed 000, App. C.1; Long et al. 2018); it is never materialised: W1 ``(H, k*d)`` acts as a
    bilinear map of z and p. Both layers start as ``nn.Linear`` does (uniform in ±1/sqrt(fan_in)).
    """

    def __init__(self, in_features: int, hidden: int = 2048, num_classes: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1 or (num_classes is not None and num_classes < 1):
            raise ValueError(f"WassersteinCritic: in_features, hidden and num_classes must be >= 1, got "
                             f"{in_features}, {hidden}, {num_classes}")
        self.in_features, self.hidden, self.num_classes = in_features, hidden, num_classes
        fan_in = in_features * (num_classes or 1)
        kw = {"device": device, "dtype": dtype}
        self.weight1 = nn.Parameter(torch.empty(hidden, fan_in, **kw))
        self.bias1 = nn.Parameter(torch.empty(hidden, **kw))
        self.weight2 = nn.Parameter(torch.empty(hidden, **kw))
        self.bias2 = nn.Parameter(torch.empty((), **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        b1, b2 = 1 / math.sqrt(self.weight1.shape[1]), 1 / math.sqrt(self.hidden)
        with torch.no_grad():
            self.weight1.uniform_(-b1, b1)
            self.bias1.uniform_(-b1, b1)
            self.weight2.uniform_(-b2, b2)
            self.bias2.uniform_(-b2, b2)

    @property
    def critic_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W1, b1, w2, b2)``, the form :func:`xlt_fast.critic_gp` takes."""
        return self.weight1, self.bias1, self.weight2, self.bias2

    def _check_p(self, p: Optional[Tensor]) -> None:
        if (self.num_classes is None) != (p is None):
            raise ValueError(f"WassersteinCritic: p is required exactly when num_classes is set "
                             f"(num_classes={self.num_classes}, p {'missing' if p is None else 'given'})")

    def forward(self, z: Tensor, p: Optional[Tensor] = None) -> Tensor:
        """Critic values ``f(z)`` (or ``f(p ⊗ z)``) of the rows of ``z`` ``(N, d)``; shape ``(N,)``."""
        self._check_p(p)
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(f"WassersteinCritic: z must have shape (N, {self.in_features}), got {tuple(z.shape)}")
        if p is not None and tuple(p.shape) != (z.shape[0], self.num_classes):
            raise ValueError(f"WassersteinCritic: p must have shape ({z.shape[0]}, {self.num_classes}), got "
                             f"{tuple(p.shape)}")
        return critic_values(self.critic_params, z, None if p is None else p.detach())

    def critic_gp(self, z_src: Tensor, z_tgt: Tensor, p_src: Optional[Tensor] = None,
                  p_tgt: Optional[Tensor] = None, src_weight: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None, *, alpha: Optional[Tensor] = None,
                  normalize: Normalize = "sum_w", check_finite: bool = True,
                  backend: _backend.Backend = "auto") -> tuple[Tensor, Tensor]:
        """``(w1_estimate, penalty)`` of this critic: :func:`xlt_fast.critic_gp`."""
        self._check_p(p_src)
        return critic_gp(self, z_src, z_tgt, p_src, p_tgt, src_weight, generator, alpha=alpha,
                         normalize=normalize, check_finite=check_finite, backend=backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}, num_classes={self.num_classes}"
