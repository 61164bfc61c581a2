"""Triton log-domain Sinkhorn loop, one program per problem.

Same algorithm as ``csrc/sinkhorn_cpu.cpp`` (see ``xlt_fast.reference.sinkhorn``): symmetric updates
``f <- (f + softmin_eps(C, log b + g/eps)) / 2``, ``g <- (g + softmin_eps(C^T, log a + f/eps)) / 2``
with ``softmin_eps(C, h)_i = -eps log sum_j exp(h_j - C_ij / eps)``; eps of step t is
``exp(log_eps0 + max(t - 1, 0) log_ratio)`` for the problem's ``n_anneal`` annealing steps, then the
target eps for up to ``n_iters`` steps (early exit on the L1 marginal violation when tol > 0), then
one extrapolation from the previous potentials. All loop bounds are read on the device: no host
synchronisation, so the launch can be captured in a CUDA graph.

- ``_sinkhorn_tile``: n, m <= 128. The whole cost block (BLOCK_N x BLOCK_M, powers of two) and the
  potentials stay in registers through all iterations.
- ``_sinkhorn_tiled``: larger problems. Row / column blocks stream through the cost (L2-resident for
  512 x 512 fp32 = 1 MiB) with an online logsumexp; potentials live in the output buffers,
  phases separated by barriers.
Padded points have log weight -inf; every load and store is masked.
"""
import torch
import triton
import triton.language as tl

TILE_MAX = 128


@triton.jit
def _eps_at(t, na, log_eps0, log_ratio, eps):
    step = tl.maximum(t - 1, 0).to(tl.float64)
    ann = tl.exp((log_eps0 + step * log_ratio).to(tl.float32))
    return tl.where(t < na, ann, eps)


@triton.jit
def _softmin_rows(c, h, e):
    """-e log sum_j exp(h_j - c_ij / e) over axis 1; 0 for a row without any finite term."""
    z = h[None, :] - c / e
    mx = tl.max(z, 1)
    ok = mx > float("-inf")
    ms = tl.where(ok, mx, 0.0)
    s = tl.sum(tl.exp(z - ms[:, None]), 1)
    return tl.where(ok, -e * (ms + tl.log(s)), 0.0)


@triton.jit
def _softmin_cols(c, h, e):
    """-e log sum_i exp(h_i - c_ij / e) over axis 0."""
    z = h[:, None] - c / e
    mx = tl.max(z, 0)
    ok = mx > float("-inf")
    ms = tl.where(ok, mx, 0.0)
    s = tl.sum(tl.exp(z - ms[None, :]), 0)
    return tl.where(ok, -e * (ms + tl.log(s)), 0.0)


@triton.jit
def _marginal_err(logw, p, pt, e):
    """sum_i w_i |1 - exp((p_i - pt_i) / e)| over points with mass: a padded lane's potentials, whose
    exp may overflow, are never read (0 * inf would make the sum NaN and block the early exit)."""
    real = logw > float("-inf")
    return tl.sum(tl.where(real, tl.exp(logw) * tl.abs(1.0 - tl.exp((p - pt) / e)), 0.0), 0)


@triton.jit
def _sinkhorn_tile(c_ptr, la_ptr, lb_ptr, le_ptr, na_ptr, fp_ptr, gp_ptr, f_ptr, g_ptr, it_ptr,
                   n, m, scb, scn, scm, log_ratio, eps, n_iters, tol,
                   SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mn = rn < n
    mm = rm < m
    c = tl.load(c_ptr + b * scb + rn[:, None] * scn + rm[None, :] * scm, mask=mn[:, None] & mm[None, :],
                other=0.0).to(tl.float32)
    la = tl.load(la_ptr + b * n + rn, mask=mn, other=float("-inf")).to(tl.float32)
    lb = tl.load(lb_ptr + b * m + rm, mask=mm, other=float("-inf")).to(tl.float32)
    log_eps0 = tl.load(le_ptr + b)
    na = tl.load(na_ptr + b)
    live = (tl.max(la, 0) > float("-inf")) & (tl.max(lb, 0) > float("-inf"))

    e0 = tl.exp(log_eps0.to(tl.float32))
    f = _softmin_rows(c, lb, e0)
    if SYM:
        g = lb  # unused: g is f
    else:
        g = _softmin_cols(c, la, e0)
    total = na + n_iters
    t = na * 0  # loop-carried scalars start as int32 tensors
    iters = na * 0
    cont = t < total
    while cont:
        e = _eps_at(t, na, log_eps0, log_ratio, eps)
        if SYM:
            ft = _softmin_rows(c, la + f / e, e)
            err = 2.0 * _marginal_err(la, f, ft, e)
        else:
            ft = _softmin_rows(c, lb + g / e, e)
            gt = _softmin_cols(c, la + f / e, e)
            err = _marginal_err(la, f, ft, e) + _marginal_err(lb, g, gt, e)
        done = (tol > 0) & (t >= na) & (err < tol)
        upd = 1 - done.to(tl.int32)
        f = tl.where(done, f, 0.5 * (f + ft))
        if not SYM:
            g = tl.where(done, g, 0.5 * (g + gt))
        iters += upd
        t += 1
        cont = (t < total) & (upd > 0)
    e = eps
    if SYM:
        fo = _softmin_rows(c, la + f / e, e)
        g = f
        go = fo
    else:
        fo = _softmin_rows(c, lb + g / e, e)
        go = _softmin_cols(c, la + f / e, e)
    zero_n = tl.zeros((BLOCK_N,), tl.float32)
    zero_m = tl.zeros((BLOCK_M,), tl.float32)
    tl.store(fp_ptr + b * n + rn, tl.where(live, f, zero_n), mask=mn)
    tl.store(f_ptr + b * n + rn, tl.where(live, fo, zero_n), mask=mn)
    if SYM:
        tl.store(gp_ptr + b * m + rn, tl.where(live, f, zero_n), mask=mn)
        tl.store(g_ptr + b * m + rn, tl.where(live, fo, zero_n), mask=mn)
    else:
        tl.store(gp_ptr + b * m + rm, tl.where(live, g, zero_m), mask=mm)
        tl.store(g_ptr + b * m + rm, tl.where(live, go, zero_m), mask=mm)
    tl.store(it_ptr + b, tl.where(live, iters, 0))



@triton.jit
def _stream_softmin(c_ptr, s_out, s_red, w_ptr, p_ptr, out_ptr, n_out, n_red, e, first,
                    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """out_o = -e log sum_r exp(w_r + p_r / e - C[o, r] / e) for all o < n_out, streaming the cost
    (element (o, r) at c_ptr + o * s_out + r * s_red) by blocks with an online logsumexp. ``first``:
    the potentials p are not used yet (the initial softmin)."""
    for o0 in range(0, n_out, BLOCK_O):
        ro = o0 + tl.arange(0, BLOCK_O)
        mo = ro < n_out
        mx = tl.full((BLOCK_O,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_O,), tl.float32)
        for r0 in range(0, n_red, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mr = rr < n_red
            h = tl.load(w_ptr + rr, mask=mr, other=float("-inf"))
            if not first:
                h += tl.load(p_ptr + rr, mask=mr, other=0.0) / e
            c = tl.load(c_ptr + ro[:, None] * s_out + rr[None, :] * s_red, mask=mo[:, None] & mr[None, :],
                        other=0.0)
            z = h[None, :] - c / e
            new = tl.maximum(mx, tl.max(z, 1))
            ns = tl.where(new > float("-inf"), new, 0.0)
            s = s * tl.exp(mx - ns) + tl.sum(tl.exp(z - ns[:, None]), 1)
            mx = new
        ok = mx > float("-inf")
        out = tl.where(ok, -e * (tl.where(ok, mx, 0.0) + tl.log(s)), 0.0)
        tl.store(out_ptr + ro, out, mask=mo)


@triton.jit
def _err_sum(w_ptr, p_ptr, pt_ptr, n, e, BLOCK: tl.constexpr):
    err = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
    for i0 in range(0, n, BLOCK):
        ri = i0 + tl.arange(0, BLOCK)
        mi = ri < n
        lw = tl.load(w_ptr + ri, mask=mi, other=float("-inf"))
        p = tl.load(p_ptr + ri, mask=mi, other=0.0)
        pt = tl.load(pt_ptr + ri, mask=mi, other=0.0)
        err += _marginal_err(lw, p, pt, e)
    return err


@triton.jit
def _average(p_ptr, pt_ptr, n, BLOCK: tl.constexpr):
    for i0 in range(0, n, BLOCK):
        ri = i0 + tl.arange(0, BLOCK)
        mi = ri < n
        p = tl.load(p_ptr + ri, mask=mi, other=0.0)
        pt = tl.load(pt_ptr + ri, mask=mi, other=0.0)
        tl.store(p_ptr + ri, 0.5 * (p + pt), mask=mi)


@triton.jit
def _sinkhorn_tiled(c_ptr, la_ptr, lb_ptr, le_ptr, na_ptr, fp_ptr, gp_ptr, f_ptr, g_ptr, it_ptr,
                    n, m, scb, scn, scm, log_ratio, eps, n_iters, tol,
                    SYM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """Potentials live in fp/gp (current) and f/g (candidate updates, then the extrapolation)."""
    b = tl.program_id(0).to(tl.int64)
    cb = c_ptr + b * scb
    la, lb = la_ptr + b * n, lb_ptr + b * m
    fp, gp, ft, gt = fp_ptr + b * n, gp_ptr + b * m, f_ptr + b * n, g_ptr + b * m
    log_eps0 = tl.load(le_ptr + b)
    na = tl.load(na_ptr + b)
    e0 = tl.exp(log_eps0.to(tl.float32))
    if SYM:
        _stream_softmin(cb, scn, scm, la, fp, fp, n, n, e0, True, BLOCK_O, BLOCK_R)
    else:
        _stream_softmin(cb, scn, scm, lb, gp, fp, n, m, e0, True, BLOCK_O, BLOCK_R)
        _stream_softmin(cb, scm, scn, la, fp, gp, m, n, e0, True, BLOCK_O, BLOCK_R)
    tl.debug_barrier()
    total = na + n_iters
    t = na * 0
    iters = na * 0
    cont = t < total
    while cont:
        e = _eps_at(t, na, log_eps0, log_ratio, eps)
        if SYM:
            _stream_softmin(cb, scn, scm, la, fp, ft, n, n, e, False, BLOCK_O, BLOCK_R)
            tl.debug_barrier()
            err = 2.0 * _err_sum(la, fp, ft, n, e, BLOCK_O)
        else:
            _stream_softmin(cb, scn, scm, lb, gp, ft, n, m, e, False, BLOCK_O, BLOCK_R)
            _stream_softmin(cb, scm, scn, la, fp, gt, m, n, e, False, BLOCK_O, BLOCK_R)
            tl.debug_barrier()
            err = _err_sum(la, fp, ft, n, e, BLOCK_O) + _err_sum(lb, gp, gt, m, e, BLOCK_O)
        done = (tol > 0) & (t >= na) & (err < tol)
        upd = 1 - done.to(tl.int32)
        if upd > 0:
            _average(fp, ft, n, BLOCK_O)
            if not SYM:
                _average(gp, gt, m, BLOCK_O)
        iters += upd
        tl.debug_barrier()
        t += 1
        cont = (t < total) & (upd > 0)
    if SYM:
        _stream_softmin(cb, scn, scm, la, fp, ft, n, n, eps, False, BLOCK_O, BLOCK_R)
        tl.debug_barrier()
        _copy(fp, gp, n, BLOCK_O)
        _copy(ft, gt, n, BLOCK_O)
    else:
        _stream_softmin(cb, scn, scm, lb, gp, ft, n, m, eps, False, BLOCK_O, BLOCK_R)
        _stream_softmin(cb, scm, scn, la, fp, gt, m, n, eps, False, BLOCK_O, BLOCK_R)
    tl.store(it_ptr + b, iters)


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    for i0 in range(0, n, BLOCK):
        ri = i0 + tl.arange(0, BLOCK)
        tl.store(dst + ri, tl.load(src + ri, mask=ri < n, other=0.0), mask=ri < n)


def tiled(C32, la, lb, le, na, fp, gp, f, g, iters, log_ratio, eps, n_iters, tol, symmetric,
          block_o: int = 64, block_r: int = 64):
    """Launch the streaming kernel (any n, m); problems without mass on a side are zeroed after."""
    B, n, m = C32.shape
    _sinkhorn_tiled[(B,)](C32, la, lb, le, na, fp, gp, f, g, iters, n, m, *C32.stride(), log_ratio, eps, n_iters,
                          tol, SYM=symmetric, BLOCK_O=block_o, BLOCK_R=block_r, num_warps=4)
    live = (torch.isfinite(la).any(1) & torch.isfinite(lb).any(1))
    for t in (fp, gp, f, g):
        t.mul_(live.unsqueeze(1))
    iters.mul_(live)

def _pow2(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def solve(C: torch.Tensor, loga: torch.Tensor, logb: torch.Tensor, log_eps0: torch.Tensor, n_anneal: torch.Tensor,
          log_ratio: float, eps: float, n_iters: int, tol: float, symmetric: bool):
    """``(f_prev, g_prev, f, g, iters)`` for ``C (B, n, m)``; fp32 math, outputs in C's dtype."""
    B, n, m = C.shape
    dev = C.device
    C32 = C.float()
    la = loga.float().contiguous()
    lb = logb.float().contiguous()
    le = log_eps0.double().contiguous()
    na = n_anneal.to(torch.int32).contiguous()
    fp, f = (torch.empty(B, n, device=dev, dtype=torch.float32) for _ in range(2))
    gp, g = (torch.empty(B, m, device=dev, dtype=torch.float32) for _ in range(2))
    iters = torch.empty(B, device=dev, dtype=torch.int32)
    if max(n, m) <= TILE_MAX:
        bn, bm = _pow2(n), _pow2(m)
        _sinkhorn_tile[(B,)](C32, la, lb, le, na, fp, gp, f, g, iters, n, m, *C32.stride(), log_ratio, eps,
                             n_iters, tol, SYM=symmetric, BLOCK_N=bn, BLOCK_M=bm,
                             num_warps=4 if bn * bm <= 64 * 64 else 8)
    else:
        tiled(C32, la, lb, le, na, fp, gp, f, g, iters, log_ratio, eps, n_iters, tol, symmetric)
    dt = C.dtype
    return fp.to(dt), gp.to(dt), f.to(dt), g.to(dt), iters
