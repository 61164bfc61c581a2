"""A training step of each trainer through the library's ops against the same step written the
usual way, at the trainers' experiment shapes (ARCHITECTURE section 3, last row).

IWDA: one simultaneous step of ``xlt_fast.trainers.iwda`` (features g, classifier h, CDAN critic
with zero-centred gradient penalty, importance weights: forward, one backward, three fused AdamW
updates, projection) on frozen-feature batches of 32 + 32, d = 384, 8 classes. The usual way is the
same step with ``critic_backend="reference"``: the CDAN input ``p (x) z`` materialised and the
penalty's gradient by ``torch.autograd.grad(create_graph=True)`` and a double backward, as the IWDA
authors' code does. Rows: the quick experiment's critic width (384) and the paper's (2048). Every
implementation starts from the same state (each its own copy; the timed repeats keep training it);
the max error is that of the first step's losses and gradients (of g, h and the critic) against
the same step in float64 (reference backend).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from xlt_fast.benchmarks.common import kernel_backends
from xlt_fast.benchmarks.harness import Case
from xlt_fast.data.core import ClassificationDataset
from xlt_fast.trainers import iwda
from xlt_fast.training import Context, Dist, replace

N_SOURCE, N_TARGET, D, K, BATCH = 2400, 1000, 384, 8, 32


def _data(dtype: torch.dtype) -> iwda.Data:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (N_SOURCE + N_TARGET,), generator=g)
    x = torch.randn(N_SOURCE + N_TARGET, D, generator=g, dtype=torch.float64).to(dtype) + labels[:, None] * 0.05

    def domain(name, rows):
        ds = ClassificationDataset(["-"] * len(rows), labels[rows].tolist(), [str(c) for c in range(K)])
        return iwda.Domain(name, ds, x[rows], labels[rows])
    source, target = domain("source", torch.arange(N_SOURCE)), domain("target", torch.arange(N_SOURCE, N_SOURCE + N_TARGET))
    prior = source.dataset.priors()
    return iwda.Data(source, target, {}, prior, prior)


def iwda_step(critic_hidden: int, backend: str, dtype: torch.dtype = torch.float32):
    """A zero-argument IWDA step on its own copy of one initial state; returns the step's losses
    and the updated parameters of g, h and the critic."""
    cfg = replace(iwda.IWDAConfig(), variant="iwda", batch_size=BATCH, critic_hidden=critic_hidden, lambda_da=0.5,
                  critic_scale="one", critic_backend=backend, output_dir=tempfile.mkdtemp(), progress=False)
    ctx = Context(cfg, Dist("cpu"), Path(cfg.output_dir))
    torch.manual_seed(0)
    state = iwda.build_state(cfg, ctx, _data(torch.float64))
    state.streams.update(ctx.streams)
    for module in state.modules.values():
        if module is not state.modules["iw"]:
            module.to(dtype)
    state.data = _data(dtype)
    ctx.state = state
    steps = iwda._steps(cfg, cfg.epochs, N_SOURCE // BATCH)
    state.phase_step = steps // 2  # past the ramps: full alignment strength and estimated weights

    def run():
        torch.manual_seed(1)  # the same dropout masks in every implementation's first step
        values = iwda._alignment_step(cfg, steps, state, ctx, ("model", "critic"))
        grads = [p.grad.clone() for name in ("model", "critic") for p in state.modules[name].parameters()]
        return (torch.tensor([values["loss"], values["w1"], values["gp"], values["iw_loss"]], dtype=torch.float64),
                *grads)
    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []  # the trainers' experiments run their frozen-feature grids on the CPU
    out = []
    for hidden in (384, 2048):
        impls = {"reference": iwda_step(hidden, "reference", torch.float64),
                 "eager double backward": iwda_step(hidden, "reference")}
        for name in kernel_backends(device, "cpu"):
            impls[f"xlt_fast {name}"] = iwda_step(hidden, name)
        out.append(Case("iwda step", f"B=32+32,d=384x{K},H={hidden}", "step", impls,
                        baseline="eager double backward"))
    return out
