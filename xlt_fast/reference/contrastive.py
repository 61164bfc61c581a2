"""Reference contrastive losses (seed 004, CoNLST; SimCSE; SupCon), dense B x B logits.

Logits are similarity / temperature (cosine, dot) or minus the (squared) euclidean distance over
temperature; the papers write <h_i, h_j> / tau for either choice (seed 004 uses euclidean
distance for eq. 6, after Snell et al.).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlt_fast.reference.pairwise import similarity_logits


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.05, metric: str = "cosine") -> Tensor:
    """SimCSE in-batch InfoNCE (seed 004 eq. 3): mean_i [ logsumexp_j s(a_i, b_j) - s(a_i, b_i) ]."""
    logits = similarity_logits(a, b, metric, temperature)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def supcon(features: Tensor, labels: Tensor, temperature: float = 0.1, metric: str = "cosine",
           mask: Optional[Tensor] = None) -> Tensor:
    """Supervised contrastive loss (seed 004 eq. 2, Khosla et al.).

    For anchor i, A(i) = the other (unmasked) samples and P(i) = those with the same label;
    loss_i = logsumexp_{a in A(i)} s_ia - mean_{p in P(i)} s_ip, averaged over the anchors that
    have at least one positive (an anchor without positive is excluded; none at all gives 0).
    """
    n = features.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=features.device) if mask is None else mask
    logits = similarity_logits(features, features, metric, temperature)
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    others = valid.unsqueeze(0) & ~eye
    pos = others & (labels.unsqueeze(0) == labels.unsqueeze(1))
    lse = torch.logsumexp(logits.masked_fill(~others, float("-inf")), dim=1)
    n_pos = pos.sum(1)
    pos_mean = (logits * pos).sum(1) / n_pos.clamp_min(1)
    anchors = valid & (n_pos > 0)
    per_anchor = torch.where(anchors, lse - pos_mean, 0)
    return per_anchor.sum() / anchors.sum().clamp_min(1)


def negative_contrastive(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float = 0.05,
                         metric: str = "euclidean", negative_mask: Optional[Tensor] = None) -> Tensor:
    """CoNLST contrastive negative learning (seed 004 eq. 6) with explicit negatives ``(B, K, d)``.

    loss_i = -log( e^{s(h_i, h_i')} / (e^{s(h_i, h_i')} + sum_{j in N_i} e^{s(h_i, h_j')}) ), mean over i.
    ``negative_mask (B, K)`` marks the real negatives (True) when anchors have different counts.
    """
    pos_logit = similarity_logits(anchor.unsqueeze(1), positive.unsqueeze(1), metric, temperature)[:, 0, 0]
    neg_logits = similarity_logits(anchor.unsqueeze(1), negatives, metric, temperature)[:, 0, :]
    if negative_mask is not None:
        neg_logits = neg_logits.masked_fill(~negative_mask, float("-inf"))
    all_logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1)
    return (torch.logsumexp(all_logits, dim=1) - pos_logit).mean()


def negative_learning(logits: Tensor, complementary: Tensor) -> Tensor:
    """Negative learning (seed 004 eq. 1): mean_i sum_k ybar_ik * -log(1 - p_ik), p = softmax(logits).

    ``complementary`` is ``(B,)`` class indices or ``(B, C)`` non-negative weights (multi-hot).
    -log(1 - p_k) = logsumexp(z) - logsumexp_{j != k}(z), computed without forming 1 - p_k.
    """
    c = logits.shape[1]
    if complementary.dim() == 1:
        complementary = torch.nn.functional.one_hot(complementary, c).to(logits.dtype)
    eye = torch.eye(c, dtype=torch.bool, device=logits.device)
    lse_without = torch.logsumexp(logits.unsqueeze(1).masked_fill(eye, float("-inf")), dim=-1)
    nl = torch.logsumexp(logits, dim=1, keepdim=True) - lse_without
    return (complementary.to(logits.dtype) * nl).sum(1).mean()
