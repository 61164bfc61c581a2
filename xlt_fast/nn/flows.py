"""Real-NVP affine coupling layers and flow (Dinh et al. 2017; seed 002, sec. 3.1 eq. 2 and App. A.1).

Seed 002 models embedding densities with a Real-NVP flow "stacked with two FCNN networks with a
dimension size of 512 for each", trained with RMSprop (batch 32, lr 1e-4). Here each coupling's
conditioner is exactly ``Linear(d_id, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU ->
Linear(hidden, 2 d_m)``, i.e. two fully connected hidden layers of width ``hidden`` (512 by default)
and a linear output ``[s_raw | t]`` (raw log-scale, shift); d_id and d_m are the numbers of
conditioning and transformed features. The masks are index splits, not multiplicative masks: the
conditioner reads only the d_id conditioning features (a slice for ``"half"``, a stride-2 view for
``"alternating"``), so its first GEMM is half as wide as with a dense masked input. The elementwise
rest (scale map, affine map, merge, log-det) is one fused kernel, :func:`xlt_fast.coupling`; on
the kernel backends a whole flow, conditioners included, is one op each way (:class:`_FusedFlow`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from xlt_fast import _backend, _validate as V
from xlt_fast.ops import coupling as coupling_ops

MASKS = ("half", "alternating")


def split_indices(dim: int, mask: str, flip: bool) -> tuple[slice, slice]:
    """(conditioning, transformed) feature slices. ``"half"``: [0, dim//2) | [dim//2, dim);
    ``"alternating"``: even | odd features; ``flip`` swaps the two roles."""
    if mask == "half":
        a, b = slice(0, dim // 2), slice(dim // 2, dim)
    else:
        a, b = slice(0, dim, 2), slice(1, dim, 2)
    return (b, a) if flip else (a, b)


class _FusedFlow(torch.autograd.Function):
    """A chain of couplings, conditioners included, as one autograd node over the compiled ops
    ``xlt_fast_C::realnvp_forward`` / ``realnvp_backward`` (csrc/realnvp.cpp; kernel backends).

    Forward, per coupling in the order applied: ``h1 = relu(x_1 W1^T + b1)``,
    ``h2 = relu(h1 W2^T + b2)``, ``[s_raw | t] = h2 W3^T + b3`` (three GEMMs with bias and ReLU in
    their epilogue), the fused epilogue kernel, and ``logdet += ld`` in place. Backward, couplings in
    reverse: the epilogue's backward kernel (the packed gradient G3 of ``[s_raw | t]``), then per layer
    ``G_prev = (G W) * 1[h > 0]`` (the ReLU mask applied in place), ``dW = G^T h``, ``db = sum G``;
    dL/dx_1 is accumulated by a GEMM straight into the conditioning columns of dL/dx. The same GEMMs
    and reductions as autograd through the layers, without its graph nodes, zero-filled slice
    gradients, extra additions and per-op Python dispatch; gradients nobody needs are skipped.

    ``cfg = (cond, scale, clamp, inverse)`` as the ops take them; ``tensors`` = the 6 parameters of
    each coupling (W1, b1, W2, b2, W3, b3), then one mask per coupling.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cfg: tuple, *tensors: Tensor):
        k = len(cfg[1])
        y, logdet, saved = torch.ops.xlt_fast_C.realnvp_forward(x, tensors[:6 * k], tensors[6 * k:], *cfg, True)
        ctx.save_for_backward(x, *tensors, *saved)
        ctx.cfg = cfg
        return y, logdet

    @staticmethod
    def backward(ctx, gy: Optional[Tensor], gl: Optional[Tensor]):
        x, *rest = ctx.saved_tensors
        k = len(ctx.cfg[1])
        gy = torch.zeros_like(x) if gy is None else gy
        gl = x.new_zeros(x.shape[0]) if gl is None else gl
        need = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:2 + 6 * k]]
        grads = iter(torch.ops.xlt_fast_C.realnvp_backward(gy, gl, x, rest[7 * k:], rest[:6 * k], rest[6 * k:7 * k],
                                                           *ctx.cfg, need))
        gx, *params = (next(grads) if n else None for n in need)
        return (gx, None, *params, *[None] * k)


def _fusable(kind: str, x: Tensor) -> bool:
    """Whether the fused flow (kernel backends, fp32/fp64) computes this input."""
    return kind != "reference" and x.dtype in (torch.float32, torch.float64)


def _fused(x: Tensor, layers: list["AffineCoupling"], inverse: bool) -> tuple[Tensor, Tensor]:
    """``(y, logdet)`` of the couplings ``layers`` applied in that order (each its inverse if
    ``inverse``), by the fused flow; one autograd node when a gradient is needed, else the op alone."""
    params = [p for c in layers for lin in (c.net[0], c.net[2], c.net[4]) for p in (lin.weight, lin.bias)]
    masks = [c.mask for c in layers]
    cfg = (tuple(v for c in layers for v in (c.cond.start, c.cond.stop, c.cond.step or 1)),
           tuple(coupling_ops.SCALE_ID[c.scale] for c in layers), tuple(float(c.clamp) for c in layers), inverse)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _FusedFlow.apply(x, cfg, *params, *masks)
    y, logdet, _ = torch.ops.xlt_fast_C.realnvp_forward(x, params, masks, *cfg, False)
    return y, logdet


class AffineCoupling(nn.Module):
    """One Real-NVP affine coupling (Dinh et al. 2017, eqs. 4-8).

    ``y_1 = x_1``, ``y_2 = x_2 * exp(s(x_1)) + t(x_1)``, ``log|det dy/dx| = sum s(x_1)``, with
    ``s = g(s_raw)`` a selectable log-scale map (see :func:`xlt_fast.coupling`); ``inverse`` is exact.

    Args:
        dim: number of features d (odd allowed; needs d >= 2).
        hidden: width of the conditioner's two hidden layers (512 in seed 002).
        mask: ``"half"`` (x_1 = the first d//2 features) or ``"alternating"`` (x_1 = even features).
        scale: ``"exp"`` (plain Real-NVP), ``"tanh"`` (default) or ``"atan"``: soft clamps |s| < clamp,
            so every scale stays within exp(+-clamp) and nothing overflows at extreme inputs.
        clamp: bound c of the soft-clamped scale maps (2.0).
        flip: swap the roles of the two feature sets (alternate it along a flow).
        backend: kernel for the epilogue: ``"auto" | "reference" | "cpu" | "cuda"``.
        identity_init: zero the conditioner's output layer, so s = t = 0 and a fresh coupling is the
            identity (every scale map sends 0 to 0); the start seed 002's Algorithm 1 needs. Its
            first gradients reach that layer only (its input layers get none until it is nonzero).
    """

    def __init__(self, dim: int, hidden: int = 512, mask: str = "half", scale: str = "tanh", clamp: float = 2.0,
                 flip: bool = False, backend: _backend.Backend = "auto", identity_init: bool = False) -> None:
        super().__init__()
        op = "AffineCoupling"
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"{op}: dim must be an int >= 2, got {dim!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"{op}: hidden must be an int >= 1, got {hidden!r}")
        V.choice(mask, "mask", MASKS, op)
        V.choice(scale, "scale", coupling_ops.SCALES, op)
        V.choice(backend, "backend", _backend.BACKENDS, op)
        self.dim, self.hidden, self.mask_kind, self.scale, self.flip = dim, hidden, mask, scale, flip
        self.clamp = V.positive(clamp, "clamp", op)
        self.backend = backend
        self.cond, self.trans = split_indices(dim, mask, flip)
        m = torch.zeros(dim, dtype=torch.bool)
        m[self.trans] = True
        self.register_buffer("mask", m, persistent=False)
        d_id, d_m = int((~m).sum()), int(m.sum())
        self.d_m = d_m
        self.net = nn.Sequential(nn.Linear(d_id, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * d_m))
        if identity_init:
            nn.init.zeros_(self.net[4].weight)
            nn.init.zeros_(self.net[4].bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, mask={self.mask_kind!r}, scale={self.scale!r}, "
                f"clamp={self.clamp}, flip={self.flip}")

    def conditioner(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        """``(s_raw, t)`` from the conditioning features ``x1 (N, d_id)`` (views of one GEMM output)."""
        st = self.net(x1)
        return st[:, :self.d_m], st[:, self.d_m:]

    def _transform(self, x: Tensor, inverse: bool, kind: str) -> tuple[Tensor, Tensor]:
        """Kernel backends (fp32/fp64): the fused flow of this one coupling; otherwise autograd through
        the conditioner and :func:`xlt_fast.ops.coupling.run` (the reference, or half precision in fp32)."""
        if _fusable(kind, x):
            return _fused(x, [self], inverse)
        s_raw, t = self.conditioner(x[:, self.cond])
        return coupling_ops.run(x, s_raw, t, self.mask, self.scale, self.clamp, inverse, kind)

    def _check(self, x: Tensor, name: str, op: str) -> str:
        V.floating(x, name, op)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{op}: {name} must have shape (N, {self.dim}), got {tuple(x.shape)}")
        V.finite(x, name, op)
        return _backend.resolve(self.backend, x.device, op, gpu_default="cuda",
                                available=("reference", "cpu", "cuda"))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, logdet)`` for ``x (N, dim)``; logdet ``(N,)`` = log|det dy/dx|."""
        return self._transform(x, False, self._check(x, "x", "AffineCoupling.forward"))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, logdet)`` with x the exact preimage of ``y (N, dim)``; logdet = log|det dx/dy|."""
        return self._transform(y, True, self._check(y, "y", "AffineCoupling.inverse"))


class RealNVP(nn.Module):
    """A Real-NVP flow: ``n_couplings`` affine couplings whose feature roles alternate
    (coupling k has ``flip = k % 2 == 1``), over a standard normal base.

    Direction: ``forward`` maps data x to latent z (the normalizing direction, as in nflows), so
    ``log p(x) = log N(z; 0, I) + log|det dz/dx|`` (seed 002, eq. 2); ``inverse`` and ``sample`` map
    latents to data.

    Args:
        dim: number of features d (odd allowed; d >= 2).
        n_couplings: number of couplings (8 by default).
        hidden, mask, scale, clamp, backend, identity_init: as in :class:`AffineCoupling` (with
            ``identity_init`` a fresh flow is the identity map, log|det| = 0).
    """

    def __init__(self, dim: int, n_couplings: int = 8, hidden: int = 512, mask: str = "half", scale: str = "tanh",
                 clamp: float = 2.0, backend: _backend.Backend = "auto", identity_init: bool = False) -> None:
        super().__init__()
        if not isinstance(n_couplings, int) or n_couplings < 1:
            raise ValueError(f"RealNVP: n_couplings must be an int >= 1, got {n_couplings!r}")
        self.dim = dim
        self.couplings = nn.ModuleList(
            AffineCoupling(dim, hidden, mask, scale, clamp, flip=k % 2 == 1, backend=backend,
                           identity_init=identity_init)
            for k in range(n_couplings))

    def _run(self, x: Tensor, inverse: bool, name: str, op: str) -> tuple[Tensor, Tensor]:
        kind = self.couplings[0]._check(x, name, op)
        layers = list(reversed(self.couplings) if inverse else self.couplings)
        if _fusable(kind, x):
            return _fused(x, layers, inverse)
        logdet: Optional[Tensor] = None
        for layer in layers:
            x, ld = layer._transform(x, inverse, kind)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: latent of ``x (N, dim)`` and log|det dz/dx| ``(N,)``."""
        return self._run(x, False, "x", "RealNVP.forward")

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, logdet)``: the exact preimage of ``z (N, dim)`` and log|det dx/dz| ``(N,)``."""
        return self._run(z, True, "z", "RealNVP.inverse")

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = -|z|^2/2 - (d/2) log(2 pi) + log|det dz/dx|`` per row ``(N,)``."""
        z, logdet = self(x)
        return logdet - 0.5 * z.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples ``x = inverse(z)``, ``z ~ N(0, I)`` on the parameters' device and dtype."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"RealNVP.sample: n must be an int >= 1, got {n!r}")
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.inverse(z)[0]
