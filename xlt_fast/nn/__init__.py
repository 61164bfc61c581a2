"""Modules built on the ops: Wasserstein critics, coupling layers and flows."""
