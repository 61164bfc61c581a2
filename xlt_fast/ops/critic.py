"""``critic_gp``: Wasserstein-1 estimate and zero-centred gradient penalty of a one-hidden-layer
ReLU critic, with closed-form penalty gradients (no double backward).

Critic ``f(x) = w2 · relu(W1 x + b1) + b2`` (seed 000, App. C.1: hidden width 2048). With CDAN
conditioning the input is ``x = p ⊗ z`` (``x[c*d + a] = p_c z_a``), never materialised: viewing W1
as ``(H*k, d)``, ``y = z W1v^T`` is one GEMM and ``h_j = b1_j + sum_c p_c y[j*k + c]``.

Forward (N = n + m rows, K = min(n, m) interpolated rows, ``m_i = 1[h~_i > 0]``):
  * ``estimate = sum_r coef_r f(x_r)``, ``coef = (w / Z, -1/m)`` with ``Z = sum w`` or ``n``;
  * ``x~_i = a_i x_s,i + (1 - a_i) x_t,i`` on the segment between the critic inputs (with CDAN the
    conditioned inputs ``p ⊗ z``, as the IWDA authors' code); its pre-activation needs no GEMM:
    ``h~_i = a_i h_s,i + (1 - a_i) h_t,i`` since W1 is linear;
  * ``g_i = ∇_x f(x~_i) = W1^T u_i`` with ``u_i = m_i ⊙ w2`` (one GEMM), ``penalty = mean_i |g_i|^2``.

Backward of the penalty P (the input gradient is piecewise constant in W1, b1 and x, so the
masks are constants almost everywhere): ``|g|^2 = u^T W1 W1^T u`` gives
  ``∂P/∂W1 = (2/K) sum_i u_i g_i^T = (2/K) diag(w2) T`` and ``∂P/∂w2 = (2/K) sum_i m_i ⊙ (W1 g_i)
  = (2/K) rowdot(W1, T)`` with ``T = M~^T G`` (H, k*d): one GEMM and a fused epilogue for both;
  ``∂P/∂b1 = ∂P/∂b2 = 0`` and ``∂P/∂x~ = 0`` a.e. So the features get the
  penalty's gradient (zero) whether treated as constants (IWDA code) or not. The estimate's
  gradients are the usual ones: ``δ_r = coef_r m_r ⊙ w2``, ``∂/∂W1 = sum_r δ_r x_r^T``,
  ``∂/∂b1 = sum_r δ_r``, ``∂/∂w2 = sum_r coef_r relu(h_r)``, ``∂/∂z_r = W1^T δ_r`` (CDAN: contracted
  with p_r); with CDAN, ``e_r = δ_r ⊗ p_r`` turns the W1 and z gradients into GEMMs with W1v.

GEMMs: ATen (the CPU BLAS / cuBLAS); the row stages, norms, reductions and the epilogue are the
fused kernels of ``csrc/critic_cpu.cpp`` and ``csrc/cuda/critic.cu``.
"""
from __future__ import annotations

import math
import threading
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from xlt_fast import _backend, _validate as V
from xlt_fast.reference import critic as ref

OP = "critic_gp"
Y_BLOCK = 2 ** 24  # entries of y = z W1v^T (forward) and e (backward) formed at once (64 MiB in float32)
T_BLOCK = 2 ** 22  # entries of T = M~^T G formed at once in the backward (16 MiB in float32)


def _blocks(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


_SCRATCH = threading.local()


def _scratch(role: str, shape: tuple[int, ...], like: Tensor) -> Optional[Tensor]:
    """A contiguous CPU buffer of ``shape`` for a temporary that never leaves the op (``y``, ``u_mix``,
    ``e``, ``T``, ``z``), reused across calls: one per role, dtype and thread, grown when too small.
    Callers ask only for block-sized temporaries (at most Y_BLOCK / T_BLOCK entries, so a few tens of
    MiB held per thread); a larger one is allocated fresh. A fresh multi-MiB tensor costs a page fault
    per 4 KiB on first touch, as much as the elementwise stage that fills it. None off the CPU (the
    CUDA caching allocator already reuses memory): the caller allocates."""
    if like.device.type != "cpu":
        return None
    n = math.prod(shape)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((role, like.dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(role, like.dtype)] = like.new_empty(n)
    return buf[:n].view(shape)

CriticParams = Union[Sequence[Tensor], torch.nn.Module]
Normalize = Literal["sum_w", "n"]
NORMALIZE = ("sum_w", "n")


def _stage(backend: str):
    """The fused-stage kernels (``xlt_fast_C`` ops) of a kernel backend."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"xlt_fast::{OP}: no kernel for backend {backend!r}")
    return _backend.extension()


@torch.library.custom_op("xlt_fast::critic_gp", mutates_args=())
def _critic_gp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, z_src: Tensor, z_tgt: Tensor,
               p_src: Optional[Tensor], p_tgt: Optional[Tensor], coef: Tensor, alpha: Tensor,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(estimate, penalty, f, h, mask_mix, g_mix)``; the last four are saved for the backward.

    ``y = z W1v^T`` is formed for at most ``Y_BLOCK`` entries at a time: all rows at once when they
    fit, else blocks of paired rows (source and target rows a..b, whose interpolations need both),
    then the longer side's rest.
    """
    ext = _stage(backend)
    (n, d), m, K, H = z_src.shape, z_tgt.shape[0], alpha.shape[0], w1.shape[0]
    k = w1.shape[1] // d
    w1 = w1.contiguous()
    w1v = w1.view(H * k, d)
    if (n + m) * H * k <= Y_BLOCK:
        z = torch.cat([z_src, z_tgt], out=_scratch("z", (n + m, d), z_src) if (n + m) * d <= Y_BLOCK else None)
        p = None if p_src is None else torch.cat([p_src, p_tgt])
        if backend == "cpu":  # h (saved) straight from the GEMM when k == 1; y, u_mix in scratch
            h = z.new_empty(n + m, H)
            y = torch.mm(z, w1v.T, out=h if k == 1 else _scratch("y", (n + m, H * k), z))
            estimate, f, h, mask_mix, u_mix = ext.critic_rows_fwd_out(y, p, b1, w2, b2, coef, alpha, n, h,
                                                                      _scratch("u", (K, H), z))
        else:
            estimate, f, h, mask_mix, u_mix = ext.critic_rows_fwd(torch.mm(z, w1v.T), p, b1, w2, b2, coef, alpha, n)
        g_mix = torch.mm(u_mix, w1)
        return estimate, ext.critic_penalty(g_mix), f, h, mask_mix, g_mix
    estimate, f, h = z_src.new_zeros(()), z_src.new_empty(n + m), z_src.new_empty(n + m, H)
    mask_mix, g_mix = z_src.new_empty(K, H), z_src.new_empty(K, k * d)
    step = max(1, Y_BLOCK // (2 * H * k))
    for a, b in _blocks(0, K, step):
        rows = torch.cat([z_src[a:b], z_tgt[a:b]])
        p = None if p_src is None else torch.cat([p_src[a:b], p_tgt[a:b]])
        c = torch.cat([coef[a:b], coef[n + a:n + b]])
        est_b, f_b, h_b, mask_b, u_b = ext.critic_rows_fwd(torch.mm(rows, w1v.T), p, b1, w2, b2, c, alpha[a:b], b - a)
        estimate += est_b
        f[a:b], f[n + a:n + b] = f_b[:b - a], f_b[b - a:]
        h[a:b], h[n + a:n + b] = h_b[:b - a], h_b[b - a:]
        mask_mix[a:b] = mask_b
        torch.mm(u_b, w1, out=g_mix[a:b])
    z_rest, p_rest, off = (z_src, p_src, 0) if n > K else (z_tgt, p_tgt, n)
    for a, b in _blocks(K, z_rest.shape[0], 2 * step):
        p = None if p_rest is None else p_rest[a:b]
        est_b, f_b, h_b, _, _ = ext.critic_rows_fwd(torch.mm(z_rest[a:b], w1v.T), p, b1, w2, b2,
                                                    coef[off + a:off + b], alpha[:0], b - a)
        estimate += est_b
        f[off + a:off + b], h[off + a:off + b] = f_b, h_b
    return estimate, ext.critic_penalty(g_mix), f, h, mask_mix, g_mix


@_critic_gp.register_fake
def _(w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, coef, alpha, backend):
    N, K, H = z_src.shape[0] + z_tgt.shape[0], alpha.shape[0], w1.shape[0]
    return (w1.new_empty(()), w1.new_empty(()), w1.new_empty(N), w1.new_empty(N, H), w1.new_empty(K, H),
            w1.new_empty(K, w1.shape[1]))


@torch.library.custom_op("xlt_fast::critic_gp_backward", mutates_args=())
def _critic_gp_backward(grad_est: Tensor, grad_pen: Tensor, w1: Tensor, w2: Tensor, z_src: Tensor,
                        z_tgt: Tensor, p_src: Optional[Tensor], p_tgt: Optional[Tensor], coef: Tensor,
                        h: Tensor, mask_mix: Tensor, g_mix: Tensor, need_z: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dW1, db1, dw2, db2, dz)`` in closed form; ``dz`` is ``(n + m, d)`` (empty unless ``need_z``)."""
    ext = _stage(backend)
    d, H = z_src.shape[1], w1.shape[0]
    k = w1.shape[1] // d
    w1 = w1.contiguous()
    N = z_src.shape[0] + z_tgt.shape[0]
    z = torch.cat([z_src, z_tgt], out=_scratch("z", (N, d), z_src) if N * d <= Y_BLOCK else None)
    p = None if p_src is None else torch.cat([p_src, p_tgt])
    coef = grad_est * coef
    dz = []
    for a, b in _blocks(0, N, max(1, Y_BLOCK // (H * k))):  # e is (rows, H*k)
        pb = None if p is None else p[a:b]
        e = _scratch("e", (b - a, H * k), z) if backend == "cpu" else None
        if e is None:
            e, gb1_b, gw2_b = ext.critic_rows_bwd(h[a:b], pb, w2, coef[a:b])
        else:
            gb1_b, gw2_b = ext.critic_rows_bwd_out(h[a:b], pb, w2, coef[a:b], e)
        if a == 0:
            gw1, gb1, gw2 = torch.mm(e.T, z[a:b]), gb1_b, gw2_b
        else:
            gw1.addmm_(e.T, z[a:b])
            gb1 += gb1_b
            gw2 += gw2_b
        if need_z:
            dz.append(torch.mm(e, w1.view(H * k, d)))
    dz = (dz[0] if len(dz) == 1 else torch.cat(dz)) if need_z else z.new_empty(0)
    gw1 = gw1.view(H, k * d)
    scale = grad_pen * (2.0 / mask_mix.shape[0])
    rows = max(1, T_BLOCK // w1.shape[1])
    for j0 in range(0, H, rows):  # T = M~^T G block by block: O(T_BLOCK) extra memory, not O(H k d)
        mj = mask_mix[:, j0:j0 + rows]
        t = torch.mm(mj.T, g_mix, out=_scratch("t", (mj.shape[1], g_mix.shape[1]), g_mix))
        gw2[j0:j0 + rows] += ext.critic_gp_epilogue(gw1[j0:j0 + rows], t, w1[j0:j0 + rows], w2[j0:j0 + rows], scale)
    gb2 = coef.sum()
    return gw1, gb1, gw2, gb2.reshape(()), dz


@_critic_gp_backward.register_fake
def _(grad_est, grad_pen, w1, w2, z_src, z_tgt, p_src, p_tgt, coef, h, mask_mix, g_mix, need_z, backend):
    H, N = w1.shape[0], z_src.shape[0] + z_tgt.shape[0]
    dz = z_src.new_empty(N, z_src.shape[1]) if need_z else z_src.new_empty(0)
    return w1.new_empty(w1.shape), w1.new_empty(H), w1.new_empty(H), w1.new_empty(()), dz


def _setup(ctx, inputs, output) -> None:
    w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, coef, alpha, backend = inputs
    _, _, f, h, mask_mix, g_mix = output
    ctx.mark_non_differentiable(f, h, mask_mix, g_mix)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(w1, w2, z_src, z_tgt, p_src, p_tgt, coef, f, h, mask_mix, g_mix)
    ctx.backend = backend


def _backward(ctx, grad_est, grad_pen, *_):
    w1, w2, z_src, z_tgt, p_src, p_tgt, coef, f, h, mask_mix, g_mix = ctx.saved_tensors
    zero = w1.new_zeros(())
    grad_est = zero if grad_est is None else grad_est
    grad_pen = zero if grad_pen is None else grad_pen
    need_z = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
    gw1, gb1, gw2, gb2, dz = _critic_gp_backward(grad_est, grad_pen, w1, w2, z_src, z_tgt, p_src, p_tgt,
                                                 coef, h, mask_mix, g_mix, need_z, ctx.backend)
    dzs, dzt = dz.split([z_src.shape[0], z_tgt.shape[0]]) if need_z else (None, None)
    return gw1, gb1, gw2, gb2, dzs, dzt, None, None, grad_est * f, None, None


_critic_gp.register_autograd(_backward, setup_context=_setup)


def critic_values(critic_params: CriticParams, z: Tensor, p: Optional[Tensor] = None) -> Tensor:
    """``f(z)`` (or ``f(p ⊗ z)`` with CDAN, without materialising ``p ⊗ z``) for each row; ``(N,)``.

    Plain differentiable torch ops (autograd), for evaluating the critic outside ``critic_gp``.
    """
    w1, b1, w2, b2 = _params(critic_params)
    if p is None:
        h = torch.addmm(b1, z, w1.T)
    else:
        H, k = w1.shape[0], p.shape[-1]
        y = (z @ w1.reshape(H * k, z.shape[-1]).T).view(z.shape[0], H, k)
        h = torch.baddbmm(b1.unsqueeze(-1), y, p.unsqueeze(-1)).squeeze(-1)
    return torch.relu(h) @ w2 + b2


def _params(critic_params: CriticParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if isinstance(critic_params, torch.nn.Module):
        critic_params = getattr(critic_params, "critic_params", None)
        if critic_params is None:
            raise TypeError(f"{OP}: critic_params must be a WassersteinCritic or a tuple (W1, b1, w2, b2)")
    if not isinstance(critic_params, (tuple, list)) or len(critic_params) != 4:
        raise TypeError(f"{OP}: critic_params must be a WassersteinCritic or a tuple (W1, b1, w2, b2) of "
                        f"shapes (H, k*d), (H,), (H,), ()")
    w1, b1, w2, b2 = critic_params
    for name, t in (("W1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        V.floating(t, f"critic_params.{name}", OP)
    H = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or H == 0 or w1.shape[1] == 0:
        raise ValueError(f"{OP}: critic_params.W1 must have shape (H, k*d) with H, d >= 1, got {tuple(w1.shape)}")
    if tuple(b1.shape) != (H,) or tuple(w2.shape) != (H,):
        raise ValueError(f"{OP}: critic_params b1 and w2 must have shape ({H},) (H = W1.shape[0]), got "
                         f"{tuple(b1.shape)} and {tuple(w2.shape)}")
    if b2.numel() != 1:
        raise ValueError(f"{OP}: critic_params.b2 must be a scalar, got shape {tuple(b2.shape)}")
    return w1, b1, w2, b2.reshape(())


def _check_distribution(p: Tensor, name: str, rows: int, k: int, checks: V.Checks) -> None:
    V.floating(p, name, OP)
    if tuple(p.shape) != (rows, k):
        raise ValueError(f"{OP}: {name} must have shape ({rows}, {k}) (rows, num_classes), got {tuple(p.shape)}")
    tol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-4
    pd = p.detach()
    bad = ~torch.isfinite(pd).all() | (pd < 0).any() | ((pd.sum(-1) - 1).abs() > tol).any()
    checks.add(bad, f"{name} must hold probability distributions (rows >= 0 summing to 1 within {tol}), "
                    f"e.g. softmax(logits)")


def _check_inputs(critic_params, z_src, z_tgt, p_src, p_tgt, src_weight, normalize, checks: V.Checks):
    w1, b1, w2, b2 = _params(critic_params)
    for name, z in (("z_src", z_src), ("z_tgt", z_tgt)):
        V.floating(z, name, OP)
        if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] == 0:
            raise ValueError(f"{OP}: {name} must have shape (rows, d) with rows, d >= 1, got {tuple(z.shape)}")
        checks.finite(name, z)
    for name, t in (("W1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        checks.finite(f"critic_params.{name}", t)
    (n, d), m = z_src.shape, z_tgt.shape[0]
    if z_tgt.shape[1] != d:
        raise ValueError(f"{OP}: z_src and z_tgt must have the same feature size d, got {d} and {z_tgt.shape[1]}")
    V.same_dtype_device(OP, W1=w1, b1=b1, w2=w2, b2=b2, z_src=z_src, z_tgt=z_tgt)
    if (p_src is None) != (p_tgt is None):
        raise ValueError(f"{OP}: pass both p_src and p_tgt (CDAN) or neither")
    k = 1 if p_src is None else (p_src.shape[-1] if p_src.dim() == 2 else -1)
    if p_src is not None:
        _check_distribution(p_src, "p_src", n, k, checks)
        _check_distribution(p_tgt, "p_tgt", m, k, checks)
        V.same_dtype_device(OP, z_src=z_src, p_src=p_src, p_tgt=p_tgt)
    if w1.shape[1] != k * d:
        need = f"num_classes * d = {k} * {d}" if p_src is not None else f"d = {d} (or pass p_src/p_tgt for CDAN)"
        raise ValueError(f"{OP}: critic_params.W1 must have shape (H, {need}), got {tuple(w1.shape)}")
    if src_weight is not None:
        V.floating(src_weight, "src_weight", OP)
        if tuple(src_weight.shape) != (n,):
            raise ValueError(f"{OP}: src_weight must have shape ({n},) (one weight per source row), got "
                             f"{tuple(src_weight.shape)}")
        V.same_dtype_device(OP, z_src=z_src, src_weight=src_weight)
        sw = src_weight.detach()
        if normalize == "sum_w":
            checks.add(~torch.isfinite(sw).all() | (sw < 0).any() | ~(sw.sum() > 0),
                       "src_weight must be finite, >= 0 and not all zero (normalize='sum_w' divides by their sum)")
        else:
            checks.add(~torch.isfinite(sw).all() | (sw < 0).any(), "src_weight must be finite and >= 0")
    return (w1, b1, w2, b2), n, m


def _alpha(alpha: Optional[Tensor], generator: Optional[torch.Generator], K: int, like: Tensor,
           checks: V.Checks) -> Tensor:
    if alpha is not None:
        V.floating(alpha, "alpha", OP)
        if tuple(alpha.shape) != (K,):
            raise ValueError(f"{OP}: alpha must have shape ({K},) (min(n, m) rows), got {tuple(alpha.shape)}")
        V.same_dtype_device(OP, z_src=like, alpha=alpha)
        checks.add(~((alpha >= 0) & (alpha <= 1)).all(), "alpha must lie in [0, 1]")
        return alpha
    if generator is not None:
        if torch.compiler.is_compiling():
            raise ValueError(f"{OP}: torch.compile cannot trace a torch.Generator; draw alpha outside the "
                             f"compiled region (torch.rand(min(n, m), generator=...)) and pass alpha=")
        if generator.device.type != like.device.type:
            raise ValueError(f"{OP}: generator is on {generator.device} but the features are on {like.device}")
    return torch.rand(K, generator=generator, device=like.device, dtype=like.dtype)


def critic_gp(critic_params: CriticParams, z_src: Tensor, z_tgt: Tensor, p_src: Optional[Tensor] = None,
              p_tgt: Optional[Tensor] = None, src_weight: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None, *, alpha: Optional[Tensor] = None,
              normalize: Normalize = "sum_w", check_finite: bool = True,
              backend: _backend.Backend = "auto") -> tuple[Tensor, Tensor]:
    """Importance-weighted Wasserstein-1 estimate and zero-centred gradient penalty (seed 000, App. C.1).

    ``w1_estimate = sum_i w_i f(xs_i) / Z - mean_j f(xt_j)`` with ``Z = sum_i w_i`` or ``Z = n``, and
    ``penalty = mean_{i < K} |∇_x f(x~_i)|^2``, ``K = min(n, m)``, ``x~_i = a_i xs_i + (1 - a_i) xt_i``
    with ``x = z``, or with CDAN the conditioned input ``x = p ⊗ z`` (interpolated as a whole, as the
    IWDA authors' code; the gradient is w.r.t. it). The IWDA critic maximises ``estimate - mu * penalty``.

    Args:
        critic_params: a :class:`xlt_fast.nn.WassersteinCritic` or ``(W1, b1, w2, b2)`` of shapes
            ``(H, k*d)``, ``(H,)``, ``(H,)``, ``()``.
        z_src, z_tgt: features ``(n, d)``, ``(m, d)``.
        p_src, p_tgt: CDAN class distributions ``(n, k)``, ``(m, k)`` (rows >= 0 summing to 1); they
            get no gradient (detached, as in CDAN).
        src_weight: ``(n,)`` importance weights >= 0 (e.g. ``w[y_i]`` in IWDA); differentiable.
        generator: draws ``a_i ~ U(0, 1)`` (one per row, on the features' device); the result is
            deterministic given its state. Not traceable by torch.compile: pass ``alpha`` there.
        alpha: ``(K,)`` interpolation weights in [0, 1] instead of drawing them.
        normalize: how the weighted source term is normalised: ``"sum_w"`` (``Z = sum_i w_i``, a
            weighted mean: the scale of w does not matter) or ``"n"`` (``Z = n``: the per-sample form
            ``(1/n) sum_i w_i f(xs_i)`` of the IWDA authors' code, an unbiased estimate of
            ``E_{p_S^w}[f]`` when ``E_{p_S}[w] = 1``). Without weights both are the mean.
        check_finite: check features and parameters for NaN/inf (False skips it, for inputs already
            checked; the range checks of p, weights and alpha always run).
        backend: ``"auto" | "reference" | "cpu" | "cuda"``.

    Gradients: the estimate's w.r.t. parameters, features and weights; the penalty's w.r.t. the
    parameters in closed form (no double backward). The penalty's gradient w.r.t. the features is
    zero almost everywhere for this critic, so treating the features as constants (IWDA code) and
    propagating through them give the same result. Kernels compute in the input dtype
    (float16/bfloat16 in float32); the CPU kernel accumulates sums in float64.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"{OP}: normalize must be one of {NORMALIZE}, got {normalize!r}")
    checks = V.Checks(OP, check_finite)
    (w1, b1, w2, b2), n, m = _check_inputs(critic_params, z_src, z_tgt, p_src, p_tgt, src_weight, normalize, checks)
    a = _alpha(alpha, generator, min(n, m), z_src, checks)
    checks.run()
    kind = _backend.resolve(backend, z_src.device, OP, gpu_default="cuda", available=("reference", "cpu", "cuda"))
    if p_src is not None:
        p_src, p_tgt = p_src.detach(), p_tgt.detach()
    if kind == "reference":
        return ref.critic_gp(w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, src_weight, a, normalize=normalize)
    dtype = z_src.dtype
    tensors = [w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, src_weight, a]
    if dtype in (torch.float16, torch.bfloat16):
        tensors = [None if t is None else t.float() for t in tensors]
    w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, src_weight, a = tensors
    if src_weight is None:
        coef_src = z_src.new_full((n,), 1.0 / n)
    else:
        coef_src = src_weight / (src_weight.sum() if normalize == "sum_w" else n)
    coef = torch.cat([coef_src, z_tgt.new_full((m,), -1.0 / m)])
    estimate, penalty = _critic_gp(w1, b1, w2, b2, z_src, z_tgt, p_src, p_tgt, coef, a, kind)[:2]
    return estimate.to(dtype), penalty.to(dtype)
