"""xlt_fast: fast, exact ops for zero-shot cross-lingual transfer.

Every op takes ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"``; see ``xlt_fast.ops``.
"""
from xlt_fast.ops.pairwise import pairwise_distance
from xlt_fast.ops.sinkhorn import (SinkhornResult, average_plans, hard_coupling, sinkhorn,
                                   sinkhorn_divergence)

__version__ = "0.1.0"

__all__ = ["pairwise_distance", "sinkhorn", "sinkhorn_divergence", "SinkhornResult", "hard_coupling",
           "average_plans"]
