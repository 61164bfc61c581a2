"""Modules built on the ops: Wasserstein critics, coupling layers and flows, classifier heads,
gradient reversal, class importance weights."""
from xlt_fast.nn.critic import WassersteinCritic
from xlt_fast.nn.flows import AffineCoupling, RealNVP
from xlt_fast.nn.heads import FeatureClassifier, grad_reverse
from xlt_fast.nn.importance import ImportanceWeights, project_weights, solve_weights_qp

__all__ = ["AffineCoupling", "FeatureClassifier", "ImportanceWeights", "RealNVP", "WassersteinCritic",
           "grad_reverse", "project_weights", "solve_weights_qp"]
