"""Pure-PyTorch reference implementations: differentiable, fp64-capable, the ground truth that
every kernel is tested against. They favour clarity and exactness over speed and memory."""
from xlt_fast.reference.contrastive import info_nce, negative_contrastive, negative_learning, supcon
from xlt_fast.reference.coupling import coupling
from xlt_fast.reference.critic import critic_gp
from xlt_fast.reference.pairwise import pairwise_distance

__all__ = ["pairwise_distance", "info_nce", "supcon", "negative_contrastive", "negative_learning",
           "coupling", "critic_gp"]
