"""critic_gp (Wasserstein critic + zero-centred gradient penalty, IWDA) against the usual autograd
double backward: fwd+bwd of ``-(estimate - 10 * penalty)`` w.r.t. the critic's parameters and the
features (which come from an encoder, so they need gradients); importance weights on.

Peers: ``eager double backward`` (:func:`xlt_fast.reference.critic.critic_gp`: materialised CDAN
input, ``autograd.grad(create_graph=True)``, then a backward through it, gradients taken only for
the leaves that need them), and ``torch.compile`` of the same (full mode only; torch 2.13 rejects
it: aot_autograd does not support double backward, reported as the row's note). The max error is
against that reference in float64 (skipped at B=4096).
"""
from __future__ import annotations

import torch

import xlt_fast
from xlt_fast.benchmarks.common import kernel_backends
from xlt_fast.benchmarks.harness import Case
from xlt_fast.reference import critic as ref

H, D, CLASSES, MU = 2048, 768, 9, 10.0


def _problem(B: int, k, device: torch.device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    fan_in = D * (k or 1)
    params = [torch.empty(H, fan_in).uniform_(-1, 1, generator=g) / fan_in ** 0.5,
              torch.empty(H).uniform_(-1, 1, generator=g) / fan_in ** 0.5,
              torch.empty(H).uniform_(-1, 1, generator=g) / H ** 0.5, torch.zeros(())]
    zs, zt = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g) + 0.5
    ps = torch.softmax(3 * torch.randn(B, k, generator=g), -1) if k else None
    pt = torch.softmax(3 * torch.randn(B, k, generator=g), -1) if k else None
    weight = torch.rand(B, generator=g) + 0.5
    alpha = torch.rand(B, generator=g)

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    params = [to(t).requires_grad_(True) for t in params]
    zs, zt = to(zs).requires_grad_(True), to(zt).requires_grad_(True)
    return params, zs, zt, to(ps), to(pt), to(weight), to(alpha)


def _step(fn, params, zs, zt, ps, pt, weight, alpha):
    est, pen = fn(params, zs, zt, ps, pt, weight, alpha)
    grads = torch.autograd.grad(-(est - MU * pen), params + [zs, zt])
    return (est.detach(), pen.detach()) + grads


def _reference_fn(params, zs, zt, ps, pt, weight, alpha):
    return ref.critic_gp(*params, zs, zt, ps, pt, weight, alpha)


def cases(device: torch.device, quick: bool) -> list[Case]:
    grid = [(16, None), (256, None), (16, CLASSES), (256, CLASSES)] if quick else [
        (B, k) for k in (None, CLASSES) for B in (16, 256, 4096)]
    out = []
    for B, k in grid:
        prob = _problem(B, k, device)
        impls = {}
        if B <= 256:
            prob64 = _problem(B, k, device, torch.float64)
            impls["reference"] = lambda p=prob64: _step(_reference_fn, *p)
        impls["eager double backward"] = lambda p=prob: _step(_reference_fn, *p)
        if not quick:
            compiled = torch.compile(_reference_fn)
            impls["torch.compile double bwd"] = lambda p=prob, c=compiled: _step(c, *p)
        for name in kernel_backends(device, "cpu", "cuda"):
            def ours(params, zs, zt, ps, pt, weight, alpha, b=name):
                return xlt_fast.critic_gp(tuple(params), zs, zt, ps, pt, weight, alpha=alpha, backend=b)

            impls[name] = lambda p=prob, fn=ours: _step(fn, *p)
        shape = f"B={B},D={D}" + (f"x{k}" if k else "") + f",H={H}"
        out.append(Case("critic_gp", shape, "fwd+bwd", impls, baseline="eager double backward",
                        reference="reference" if "reference" in impls else None, floor=floor_impl(B, k, device)))
    return out


def floor_impl(B: int, k=None, device: torch.device = torch.device("cpu"), dtype=torch.float32):
    """The GEMMs ``critic_gp``'s closed form cannot avoid at this case's shapes, alone (no row stages,
    no epilogue), as a zero-argument callable: its time is the case's floor.

    N = 2B rows, K = B interpolated rows, W1v = W1 viewed as (H*k, D). Forward: ``y = Z W1v^T``
    (N rows) and ``G = U W1`` (K rows); backward: ``dW1 = E^T Z`` and ``dZ = E W1v`` (N rows each) and
    ``T = M~^T G`` (K rows): 2 + 1 + 2 + 2 + 1 = 8 units of (B, D, H*k), where the double backward
    does 11.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    kk = k or 1
    w1 = torch.randn(H, kk * D, generator=g).to(device, dtype)
    z = torch.randn(2 * B, D, generator=g).to(device, dtype)
    e = torch.randn(2 * B, H * kk, generator=g).to(device, dtype)
    u = torch.randn(B, H, generator=g).to(device, dtype)
    gm = torch.randn(B, kk * D, generator=g).to(device, dtype)
    w1v = w1.view(H * kk, D)

    def run():
        return (torch.mm(z, w1v.T), torch.mm(u, w1), torch.mm(e.T, z), torch.mm(e, w1v), torch.mm(u.T, gm))

    return run
