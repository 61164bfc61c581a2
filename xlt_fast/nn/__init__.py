"""Modules built on the ops: Wasserstein critics, coupling layers and flows."""
from xlt_fast.nn.critic import WassersteinCritic

__all__ = ["WassersteinCritic"]
