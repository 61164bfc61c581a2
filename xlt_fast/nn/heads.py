"""Small modules the trainers share: a classifier on frozen features and gradient reversal."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward, gradient multiplied by ``-coeff`` backward (Ganin et al. 2016): the
    features upstream descend what the adversary downstream ascends."""
    return _GradReverse.apply(x, coeff)


class FeatureClassifier(nn.Module):
    """Classifier on frozen encoder features: ``z = g(x) = x + W2 drop(gelu(W1 x))`` (a residual
    2-layer MLP, width ``hidden``) and ``logits = h(z) = W z + b`` (seed 000's g and linear h on
    cached features; spec C.1). ``forward(x) -> (z, logits)``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 384, dropout: float = 0.1) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                               nn.Linear(hidden, in_features))
        self.h = nn.Linear(in_features, num_classes)
        self.feature_size = in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x + self.g(x)
        return z, self.h(z)

    @staticmethod
    def collate(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """The model input of rows ``idx`` of each feature matrix, concatenated."""
        return torch.cat([x[idx] for x, idx in parts])
