"""Tiled pairwise squared distances / dot products with exact refinement of close pairs.

Each program computes a (BLOCK_M, BLOCK_N) tile of one problem: <x_i, y_j> accumulated over d in
fp32 (IEEE, no TF32), then D = |x|^2 + |y|^2 - 2<x, y>. If any entry of the tile is within
``refine_tol * (|x_i|^2 + |y_j|^2)`` of zero (where the expansion cancels), the tile recomputes
those entries as sum_k (x_ik - y_jk)^2: exact zero for identical rows.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sqdist_kernel(x_ptr, y_ptr, out_ptr, n, m, d,
                   sxb, sxn, sxd, syb, sym, syd, sob, son, som, refine_tol,
                   DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_base = x_ptr + b * sxb
    y_base = y_ptr + b * syb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ny = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        rk = k0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_base + rm[:, None] * sxn + rk[None, :] * sxd,
                     mask=(rm[:, None] < n) & (rk[None, :] < d), other=0.0).to(tl.float32)
        yt = tl.load(y_base + rn[:, None] * sym + rk[None, :] * syd,
                     mask=(rn[:, None] < m) & (rk[None, :] < d), other=0.0).to(tl.float32)
        acc += tl.dot(xt, tl.trans(yt), input_precision="ieee")
        nx += tl.sum(xt * xt, axis=1)
        ny += tl.sum(yt * yt, axis=1)
    if DOT:
        res = acc
    else:
        scale = nx[:, None] + ny[None, :]
        res = scale - 2.0 * acc
        refine = (res <= refine_tol * scale) & (scale > 0)  # pairs of zero rows are exactly 0 already
        if tl.max(refine.to(tl.int32)) > 0:
            exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, d, BLOCK_R):
                rk = k0 + tl.arange(0, BLOCK_R)
                xt = tl.load(x_base + rm[:, None] * sxn + rk[None, :] * sxd,
                             mask=(rm[:, None] < n) & (rk[None, :] < d), other=0.0).to(tl.float32)
                yt = tl.load(y_base + rn[:, None] * sym + rk[None, :] * syd,
                             mask=(rn[:, None] < m) & (rk[None, :] < d), other=0.0).to(tl.float32)
                diff = xt[:, None, :] - yt[None, :, :]
                exact += tl.sum(diff * diff, axis=2)
            res = tl.where(refine, exact, res)
        res = tl.maximum(res, 0.0)
    tl.store(out_ptr + b * sob + rm[:, None] * son + rn[None, :] * som, res,
             mask=(rm[:, None] < n) & (rn[None, :] < m))


def sqdist(x: torch.Tensor, y: torch.Tensor, dot: bool, refine_tol: float) -> torch.Tensor:
    """``(B, n, d) x (B, m, d) -> (B, n, m)`` squared distances (or dot products), fp32 accumulation."""
    B, n, d = x.shape
    m = y.shape[1]
    out = torch.empty(B, n, m, device=x.device, dtype=torch.float32)
    block_m = 64 if n > 32 else 32
    block_n = 64 if m > 32 else 32
    grid = (triton.cdiv(n, block_m), triton.cdiv(m, block_n), B)
    _sqdist_kernel[grid](x, y, out, n, m, d, *x.stride(), *y.stride(), *out.stride(), refine_tol,
                         DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=32, BLOCK_R=4)
    return out.to(x.dtype)
