"""``coupling``: the fused affine coupling epilogue (Real-NVP, Dinh et al. 2017, eqs. 4-8).

After the conditioner's GEMMs have produced ``s_raw, t`` for the transformed features, one kernel
pass per row applies the scale map ``s = g(s_raw)``, the affine map, the masked merge with the
untouched features and the log-det row sum (see :mod:`xlt_fast.reference.coupling`). Its backward
is one pass too, with the exact Jacobian of the elementwise map:

    forward:  dL/dx_m = G e^s,   dL/dt = G,        dL/ds_raw = (G x_m e^s + L) g'(s_raw)
    inverse:  dL/dx_m = G e^-s,  dL/dt = -G e^-s,  dL/ds_raw = -(G e^-s (x_m - t) + L) g'(s_raw)

with ``G = dL/dy_m``, ``L = dL/dlogdet`` and dL/dx_~m = dL/dy_~m. The backward kernel returns
``[dL/ds_raw | dL/dt]`` as one ``(N, 2 d_m)`` tensor: the gradient of a conditioner's packed output.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlt_fast import _backend, _validate as V
from xlt_fast.reference.coupling import SCALES, coupling as ref_coupling

# The kernels take the scale map as an integer: its index in SCALES.
SCALE_ID = {name: i for i, name in enumerate(SCALES)}


def _fake_forward(x: Tensor, s_raw: Tensor, t: Tensor, mask: Tensor, scale: int, clamp: float,
                  inverse: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape[0])


def _fake_backward(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, s_raw: Tensor, t: Tensor, mask: Tensor,
                   scale: int, clamp: float, inverse: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape[0], 2 * s_raw.shape[1])


def _fake_realnvp_forward(x: Tensor, params: list[Tensor], masks: list[Tensor], cond: list[int], scale: list[int],
                          clamp: list[float], inverse: bool, save: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    saved = []
    for k in range(len(masks) if save else 0):  # x_k (k >= 1), h1, h2, [s_raw | t]
        saved += [x.new_empty(x.shape)] if k else []
        saved += [x.new_empty(x.shape[0], params[6 * k + 2 * i].shape[0]) for i in range(3)]
    return x.new_empty(x.shape), x.new_empty(x.shape[0]), saved


def _fake_realnvp_backward(grad_y: Tensor, grad_logdet: Tensor, x: Tensor, saved: list[Tensor], params: list[Tensor],
                           masks: list[Tensor], cond: list[int], scale: list[int], clamp: list[float], inverse: bool,
                           need: list[bool]) -> list[Tensor]:
    return [a.new_empty(a.shape) for a, n in zip([x, *params], need) if n]


def _setup(ctx, inputs, output) -> None:
    x, s_raw, t, mask, scale, clamp, inverse = inputs
    ctx.save_for_backward(x, s_raw, t, mask)
    ctx.args = (scale, clamp, inverse)


def _backward(ctx, grad_y: Optional[Tensor], grad_logdet: Optional[Tensor]):
    x, s_raw, t, mask = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_logdet is None:
        grad_logdet = x.new_zeros(x.shape[0])
    gx, gst = torch.ops.xlt_fast_C.coupling_backward(grad_y, grad_logdet, x, s_raw, t, mask, *ctx.args)
    d_m = s_raw.shape[1]
    return gx, gst[:, :d_m], gst[:, d_m:], None, None, None, None


def _register() -> None:
    """Fake kernels and the autograd formula of the compiled ops ``xlt_fast_C::coupling_forward`` /
    ``coupling_backward`` (schema in csrc/coupling_cpu.cpp, CPU and CUDA kernels), and fake kernels of
    the whole-flow ops ``realnvp_forward`` / ``realnvp_backward`` (csrc/realnvp.cpp; the modules wrap
    them in one autograd.Function). They are called directly, without a Python custom-op layer."""
    torch.library.register_fake("xlt_fast_C::coupling_forward", _fake_forward)
    torch.library.register_fake("xlt_fast_C::coupling_backward", _fake_backward)
    torch.library.register_autograd("xlt_fast_C::coupling_forward", _backward, setup_context=_setup)
    torch.library.register_fake("xlt_fast_C::realnvp_forward", _fake_realnvp_forward)
    torch.library.register_fake("xlt_fast_C::realnvp_backward", _fake_realnvp_backward)


if _backend.has_extension():
    _register()


def run(x: Tensor, s_raw: Tensor, t: Tensor, mask: Tensor, scale: str, clamp: float, inverse: bool,
        kind: str) -> tuple[Tensor, Tensor]:
    """The epilogue on validated 2-d inputs with a resolved backend ``kind`` (no data checks: the
    modules call this on their hot path).

    float16/bfloat16 are computed in fp32; y is cast back, logdet stays fp32.
    """
    if kind == "reference":
        return ref_coupling(x, s_raw, t, mask, scale, clamp, inverse)
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, s_raw, t = x.float(), s_raw.float(), t.float()
    y, logdet = torch.ops.xlt_fast_C.coupling_forward(x, s_raw, t, mask, SCALE_ID[scale], float(clamp),
                                                      bool(inverse))
    return y.to(dtype), logdet


def check_mask(mask: Tensor, d: int, device: torch.device, op: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor of shape ({d},) (True = transformed feature), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (d,):
        raise ValueError(f"{op}: mask must have shape ({d},) (x's feature size d), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: mask is on {mask.device} but x is on {device}")
    if not V._tracing(mask) and not bool(mask.any()):
        raise ValueError(f"{op}: mask must mark at least one transformed feature (it is all False)")


def coupling(x: Tensor, s_raw: Tensor, t: Tensor, mask: Tensor, scale: str = "exp", clamp: float = 2.0,
             inverse: bool = False, *, check_finite: bool = True,
             backend: _backend.Backend = "auto") -> tuple[Tensor, Tensor]:
    """Affine coupling epilogue (Real-NVP, Dinh et al. 2017, eqs. 4-8; seed 002's flow).

    ``y_m = x_m * exp(s) + t`` on the transformed features (``mask`` True), ``y_~m = x_~m``, and
    ``logdet = sum_k s_k``; with ``inverse=True`` ``y_m = (x_m - t) * exp(-s)`` and
    ``logdet = -sum_k s_k``, so that the two are exact inverses for the same ``s_raw, t``.

    Args:
        x: ``(..., d)`` inputs.
        s_raw, t: ``(..., d_m)`` raw log-scale and shift from the conditioner, for the ``d_m``
            features where ``mask`` is True, in increasing feature order.
        mask: bool ``(d,)``, True = transformed feature.
        scale: log-scale map ``s = g(s_raw)``: ``"exp"`` g(u) = u; ``"tanh"`` c tanh(u/c);
            ``"atan"`` c (2/pi) atan(u/c); the last two keep |s| < c = ``clamp``, so exp(s) cannot
            overflow.
        clamp: c > 0 (used by ``"tanh"`` and ``"atan"``).
        inverse: apply the inverse map.
        check_finite: check x, s_raw and t for NaN/inf (False skips it for inputs already checked).
        backend: ``"auto" | "reference" | "cpu" | "cuda"``.

    Returns ``(y (..., d), logdet (...))``. The log-det row sum accumulates in fp32 (fp64 for fp64
    inputs); float16/bfloat16 inputs are computed in fp32, y is cast back and logdet stays fp32.
    Differentiable in x, s_raw and t.
    """
    op = "coupling"
    V.floating(x, "x", op)
    V.floating(s_raw, "s_raw", op)
    V.floating(t, "t", op)
    V.choice(scale, "scale", SCALES, op)
    clamp = V.positive(clamp, "clamp", op)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have shape (..., d) with d >= 1, got {tuple(x.shape)}")
    V.same_dtype_device(op, x=x, s_raw=s_raw, t=t)
    check_mask(mask, x.shape[-1], x.device, op)
    lead = tuple(x.shape[:-1])
    d_m = int(mask.sum()) if not V._tracing(mask) else s_raw.shape[-1]
    for name, a in (("s_raw", s_raw), ("t", t)):
        if tuple(a.shape) != lead + (d_m,):
            raise ValueError(f"{op}: {name} must have shape {lead + (d_m,)} (x's leading dims, d_m = {d_m} "
                             f"True entries of mask), got {tuple(a.shape)}")
    checks = V.Checks(op, check_finite)
    for name, a in (("x", x), ("s_raw", s_raw), ("t", t)):
        checks.finite(name, a)
    checks.run()
    kind = _backend.resolve(backend, x.device, op, gpu_default="cuda", available=("reference", "cpu", "cuda"))
    y, logdet = run(x.reshape(-1, x.shape[-1]), s_raw.reshape(-1, d_m), t.reshape(-1, d_m), mask, scale, clamp,
                    inverse, kind)
    return y.reshape(x.shape), logdet.reshape(lead)
