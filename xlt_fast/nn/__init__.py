"""Modules built on the ops: Wasserstein critics, coupling layers and flows, classifier heads,
gradient reversal, class importance weights, maps between embedding spaces (seed 002)."""
from xlt_fast.nn.critic import WassersteinCritic
from xlt_fast.nn.embedding_maps import (FCNN, Discriminator, FlowPair, LinearMap, Standardize,
                                        cross_correlation_loss, graph_structure_loss, matching_loss, procrustes)
from xlt_fast.nn.flows import AffineCoupling, RealNVP
from xlt_fast.nn.heads import FeatureClassifier, grad_reverse
from xlt_fast.nn.importance import ImportanceWeights, project_weights, solve_weights_qp

__all__ = ["AffineCoupling", "Discriminator", "FCNN", "FeatureClassifier", "FlowPair", "ImportanceWeights",
           "LinearMap", "RealNVP", "Standardize", "WassersteinCritic", "cross_correlation_loss", "grad_reverse",
           "graph_structure_loss", "matching_loss", "procrustes", "project_weights", "solve_weights_qp"]
