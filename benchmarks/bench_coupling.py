"""RealNVP (8 affine couplings, conditioner width 512, d = 768) against nflows and normflows at
equal configuration: same half/flipped-half masks, same conditioner (two hidden ReLU layers of
width 512 and one linear output layer for log-scale and shift), the "exp" scale map, and the same weights
copied in, so every implementation computes the same numbers and the max error is meaningful.

Modes: ``fwd+bwd`` = log p(x) and the backward of its sum (all parameter gradients and dL/dx; the
callable returns log p and dL/dx); ``inverse`` = x = f^-1(z) with its log-det, without autograd.
nflows needs its scale hook set to exp (its default is sigmoid(u + 2) + 1e-3, same cost); normflows'
flows run latent -> data, so its ``forward_and_log_det`` is the data -> latent direction here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from xlt_fast.benchmarks.common import kernel_backends
from xlt_fast.benchmarks.harness import Case
from xlt_fast.nn import RealNVP

D, N_COUPLINGS, HIDDEN = 768, 8, 512


def _conditioner(c, interleave: bool) -> nn.Sequential:
    """A copy of coupling ``c``'s conditioner whose output rows are [t | s_raw] (nflows) or
    interleaved t_0, s_0, t_1, s_1, ... (normflows) instead of our [s_raw | t]."""
    net = copy.deepcopy(c.net)
    w, b = c.net[4].weight.detach(), c.net[4].bias.detach()
    m = c.d_m
    with torch.no_grad():
        if interleave:
            for dst, src in ((net[4].weight, w), (net[4].bias, b)):
                dst[0::2], dst[1::2] = src[m:], src[:m]
        else:
            net[4].weight.copy_(torch.cat([w[m:], w[:m]]))
            net[4].bias.copy_(torch.cat([b[m:], b[:m]]))
    return net


def nflows_peer(flow: RealNVP):
    """nflows Flow equal to ``flow`` (scale hook exp, layout [shift | log-scale])."""
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform

    class ExpAffine(AffineCouplingTransform):
        def _scale_and_shift(self, params):
            n = self.num_transform_features
            return torch.exp(params[:, n:]), params[:, :n]

    class Net(nn.Module):
        def __init__(self, seq: nn.Sequential):
            super().__init__()
            self.seq = seq

        def forward(self, x, context=None):
            return self.seq(x)

    transforms = [ExpAffine(c.mask.int(), lambda i, o, c=c: Net(_conditioner(c, False))) for c in flow.couplings]
    return Flow(CompositeTransform(transforms), StandardNormal([flow.dim]))


def normflows_peer(flow: RealNVP):
    """normflows NormalizingFlow equal to ``flow`` (AffineCouplingBlock, split "channel" /
    "channel_inv", interleaved [shift, log-scale] outputs)."""
    import normflows as nf

    blocks = []
    for c in flow.couplings:
        mlp = nf.nets.MLP([c.net[0].in_features, HIDDEN, HIDDEN, 2 * c.d_m])
        net = _conditioner(c, True)
        with torch.no_grad():
            for i in (0, 2, 4):
                mlp.net[i].weight.copy_(net[i].weight)
                mlp.net[i].bias.copy_(net[i].bias)
        blocks.append(nf.flows.AffineCouplingBlock(mlp, scale_map="exp",
                                                   split_mode="channel_inv" if c.flip else "channel"))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(flow.dim, trainable=False), blocks)


def _fwd_bwd(log_prob, x: torch.Tensor, params: list[torch.Tensor]):
    def run():
        xg = x.detach().requires_grad_()
        lp = log_prob(xg)
        grads = torch.autograd.grad(lp.sum(), [xg] + params)
        return lp.detach(), grads[0]
    return run


def _inverse(fn, z: torch.Tensor):
    def run():
        with torch.no_grad():
            return fn(z)
    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    batches = [32] if quick else [32, 256, 4096]
    torch.manual_seed(0)
    flow = RealNVP(D, N_COUPLINGS, HIDDEN, mask="half", scale="exp")
    ref = copy.deepcopy(flow).double()
    for c in ref.couplings:
        c.backend = "reference"
    peers = {}  # built from the CPU flow (nflows derives buffers from the mask), then moved
    try:
        peers["nflows"] = nflows_peer(flow).to(device)
    except ImportError:
        pass
    try:
        peers["normflows"] = normflows_peer(flow).to(device)
    except ImportError:
        pass
    flow = flow.to(device)
    out = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        x = torch.randn(B, D, generator=g).to(device)
        ours = {name: copy.deepcopy(flow) for name in kernel_backends(device, "cpu", "cuda")}
        for name, f in ours.items():
            for c in f.couplings:
                c.backend = name
        fb = {"reference": _fwd_bwd(ref.log_prob, x.double().cpu(), list(ref.parameters()))}
        inv = {"reference": _inverse(ref.inverse, x.double().cpu())}
        for name, f in ours.items():
            fb[name] = _fwd_bwd(f.log_prob, x, list(f.parameters()))
            inv[name] = _inverse(f.inverse, x)
        if "nflows" in peers:
            p = peers["nflows"]
            fb["nflows"] = _fwd_bwd(p.log_prob, x, list(p.parameters()))
            inv["nflows"] = _inverse(p._transform.inverse, x)
        if "normflows" in peers:
            p = peers["normflows"]

            def nf_log_prob(v, p=p):
                z, ld = p.forward_and_log_det(v)
                return p.q0.log_prob(z) + ld

            fb["normflows"] = _fwd_bwd(nf_log_prob, x, list(p.parameters()))
            inv["normflows"] = _inverse(p.inverse_and_log_det, x)
        base = "nflows" if "nflows" in peers else "reference"
        shape = f"B={B},d={D},K={N_COUPLINGS},H={HIDDEN}"
        out.append(Case("realnvp", shape, "fwd+bwd", fb, baseline=base, floor=floor_impl(B, "fwd+bwd", device)))
        out.append(Case("realnvp", shape, "inverse", inv, baseline=base, floor=floor_impl(B, "inverse", device)))
    return out


def floor_impl(B: int, mode: str = "fwd+bwd", device: torch.device = torch.device("cpu"), dtype=torch.float32):
    """The conditioners' GEMMs alone at this case's shapes (no bias, ReLU, epilogue, autograd), as a
    zero-argument callable: the floor of the ``realnvp`` case ``mode`` ("fwd+bwd" or "inverse").

    Per coupling (its own weights): forward ``x_1 W1^T`` (B, D/2 -> HIDDEN), ``h1 W2^T``, ``h2 W3^T``
    (-> D); ``"fwd+bwd"`` adds per layer ``G W`` (the input gradient, also for x_1) and ``G^T h``
    (the weight gradient): 9 GEMMs per coupling, 3 for ``"inverse"``.
    """
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    dims = [(D // 2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, D)]
    layers = [[(rnd(o, i), rnd(B, i), rnd(B, o)) for i, o in dims] for _ in range(N_COUPLINGS)]
    backward = mode == "fwd+bwd"

    def run():
        out = []
        for coupling in layers:
            for w, h, gy in coupling:
                out.append(h @ w.T)
                if backward:
                    out += [gy @ w, gy.T @ h]
        return out

    return run



def interleaved(batches: list[int], reps: int) -> None:
    """Round-robin timing on one thread: each implementation's minimum CPU time (``time.process_time``)
    over ``reps`` interleaved runs. On a machine shared with other jobs this keeps the ratios that
    sequential wall-clock medians lose (they mostly measure the other jobs)."""
    import time

    torch.set_num_threads(1)
    for case in cases(torch.device("cpu"), quick=False):
        if int(case.shape.split(",")[0][2:]) not in batches:
            continue
        names = [n for n in case.impls if n != case.reference]
        best = dict.fromkeys(names, float("inf"))
        for n in names:
            case.impls[n]()  # warm-up
        for _ in range(reps):
            for n in names:
                t0 = time.process_time()
                case.impls[n]()
                best[n] = min(best[n], time.process_time() - t0)
        base = best.get(case.baseline)
        print(f"{case.shape} {case.mode}: " + ", ".join(
            f"{n} {1e3 * t:.1f} ms" + (f" ({base / t:.2f}x)" if base else "") for n, t in best.items()), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=interleaved.__doc__)
    parser.add_argument("--batches", default="32,256,4096", help="comma-separated B")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    interleaved([int(b) for b in args.batches.split(",")], args.reps)
