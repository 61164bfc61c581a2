"""Modules built on the ops: Wasserstein critics, coupling layers and flows."""
from xlt_fast.nn.critic import WassersteinCritic
from xlt_fast.nn.flows import AffineCoupling, RealNVP

__all__ = ["AffineCoupling", "RealNVP", "WassersteinCritic"]
