"""torch.library custom ops of xlt_fast: schema, autograd formula, fake kernel, backend dispatch."""
