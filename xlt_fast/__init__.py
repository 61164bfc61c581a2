"""xlt_fast: fast, exact ops for zero-shot cross-lingual transfer.

Every op takes ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"``; see ``xlt_fast.ops``.
"""
from xlt_fast import nn
from xlt_fast.ops.contrastive import info_nce, negative_contrastive, negative_learning, supcon
from xlt_fast.ops.coupling import coupling
from xlt_fast.ops.critic import critic_gp
from xlt_fast.ops.pairwise import pairwise_distance
from xlt_fast.ops.sinkhorn import (ConvergenceWarning, SinkhornResult, average_plans, hard_coupling, sinkhorn,
                                   sinkhorn_divergence)

__version__ = "0.1.0"

__all__ = [
    "pairwise_distance",
    "info_nce",
    "supcon",
    "negative_contrastive",
    "negative_learning",
    "sinkhorn",
    "sinkhorn_divergence",
    "SinkhornResult",
    "ConvergenceWarning",
    "hard_coupling",
    "average_plans",
    "coupling",
    "critic_gp",
    "nn",
]
