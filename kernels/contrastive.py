"""Tiled contrastive-loss kernels with an online logsumexp: memory O((N + M) d), never N x M.

Anchors a (N, d) against candidates c (M, d); s_ij = sim(a_i, c_j) / tau with sim = <a, c>
(METRIC 0; cosine arrives as unit rows), -|a - c|^2 (1) or -|a - c| (2, from centred rows by
the expansion |a|^2 + |c|^2 - 2<a, c>). Denominator set D(i): valid j, minus j = i with
EXCLUDE_SELF; positives P(i): j in D(i) with equal labels.

forward: per row lse_i over D(i), the sum of positive logits and |P(i)|.
backward (FlashAttention-style recomputation of the logit tiles from the saved lse):
  G_ij = w_i (softmax_ij - [j in P(i)] / |P(i)|), then dL/d(inner product) or dL/dD per metric;
  dA by a row-parallel kernel, dC by a column-parallel kernel, each over one chunk of the
  feature dimension (grid axis 1) so the accumulators stay in registers; no atomics.
"""
import torch
import triton
import triton.language as tl

NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)  # running-max start: finite, so masked tiles never form inf - inf


@triton.jit
def _logit_tile(a_ptr, c_ptr, rm, rn, N, M, d, sa, sad, sc, scd, inv_temp, na, nc,
                METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Logits s (BLOCK_M, BLOCK_N) and, for distance metrics, D (0 for the dot metric)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        at = tl.load(a_ptr + rm[:, None] * sa + rk[None, :] * sad, mask=(rm[:, None] < N) & (rk[None, :] < d),
                     other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + rn[:, None] * sc + rk[None, :] * scd, mask=(rn[:, None] < M) & (rk[None, :] < d),
                     other=0.0).to(tl.float32)
        acc += tl.dot(at, tl.trans(ct), input_precision="ieee")
    if METRIC == 0:
        dist = acc * 0.0
        s = acc * inv_temp
    else:
        dist = tl.maximum(na[:, None] + nc[None, :] - 2.0 * acc, 0.0)
        if METRIC == 2:
            dist = tl.sqrt(dist)
        s = -dist * inv_temp
    return s, dist


@triton.jit
def _sets(rm, rn, N, M, a_lab_ptr, c_lab_ptr, c_valid_ptr, EXCLUDE_SELF: tl.constexpr):
    """Boolean tiles: j in D(i), and j in P(i)."""
    la = tl.load(a_lab_ptr + rm, mask=rm < N, other=-1)
    lc = tl.load(c_lab_ptr + rn, mask=rn < M, other=-2)
    vc = tl.load(c_valid_ptr + rn, mask=rn < M, other=0) != 0
    den = (rm[:, None] < N) & vc[None, :]
    if EXCLUDE_SELF:
        den = den & (rm[:, None] != rn[None, :])
    pos = den & (la[:, None] == lc[None, :])
    return den, pos


@triton.jit
def _norms(ptr, r, n, d, s, sd, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        t = tl.load(ptr + r[:, None] * s + rk[None, :] * sd, mask=(r[:, None] < n) & (rk[None, :] < d),
                    other=0.0).to(tl.float32)
        acc += tl.sum(t * t, axis=1)
    return acc


@triton.jit
def _fwd_kernel(a_ptr, c_ptr, a_lab_ptr, c_lab_ptr, c_valid_ptr, lse_ptr, pos_sum_ptr, pos_cnt_ptr,
                N, M, d, sa, sad, sc, scd, inv_temp,
                METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    na = _norms(a_ptr, rm, N, d, sa, sad, BLOCK_M, BLOCK_K)
    m_i = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nc = _norms(c_ptr, rn, M, d, sc, scd, BLOCK_N, BLOCK_K)
        s, dist = _logit_tile(a_ptr, c_ptr, rm, rn, N, M, d, sa, sad, sc, scd, inv_temp, na, nc,
                              METRIC, BLOCK_M, BLOCK_N, BLOCK_K)
        den, pos = _sets(rm, rn, N, M, a_lab_ptr, c_lab_ptr, c_valid_ptr, EXCLUDE_SELF)
        m_new = tl.maximum(m_i, tl.max(tl.where(den, s, NEG_BIG), axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(den, tl.exp(s - m_new[:, None]), 0.0), axis=1)
        m_i = m_new
        pos_sum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        pos_cnt += tl.sum(pos.to(tl.float32), axis=1)
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(lse_ptr + rm, lse, mask=rm < N)
    tl.store(pos_sum_ptr + rm, pos_sum, mask=rm < N)
    tl.store(pos_cnt_ptr + rm, pos_cnt, mask=rm < N)


@triton.jit
def _grad_tile(s, dist, den, pos, lse, w, cnt, inv_temp, METRIC: tl.constexpr):
    """dL/d<a, c> (dot) or dL/dD (distances) for one tile, from the saved row statistics."""
    lse_safe = tl.where(lse > float("-inf"), lse, 0.0)
    p = tl.where(den, tl.exp(s - lse_safe[:, None]), 0.0)
    inv_cnt = tl.where(cnt > 0, 1.0 / tl.maximum(cnt, 1.0), 0.0)
    g = w[:, None] * (p - tl.where(pos, inv_cnt[:, None], 0.0)) * inv_temp
    if METRIC == 1:
        g = -g
    if METRIC == 2:
        g = tl.where(dist > 0, -g / (2.0 * tl.maximum(dist, 1e-30)), 0.0)
    return g


@triton.jit
def _bwd_rows_kernel(a_ptr, c_ptr, a_lab_ptr, c_lab_ptr, c_valid_ptr, lse_ptr, w_ptr, cnt_ptr, ga_ptr,
                     N, M, d, sa, sad, sc, scd, sga, inv_temp,
                     METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    na = _norms(a_ptr, rm, N, d, sa, sad, BLOCK_M, BLOCK_K)
    lse = tl.load(lse_ptr + rm, mask=rm < N, other=0.0)
    w = tl.load(w_ptr + rm, mask=rm < N, other=0.0)
    cnt = tl.load(cnt_ptr + rm, mask=rm < N, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nc = _norms(c_ptr, rn, M, d, sc, scd, BLOCK_N, BLOCK_K)
        s, dist = _logit_tile(a_ptr, c_ptr, rm, rn, N, M, d, sa, sad, sc, scd, inv_temp, na, nc,
                              METRIC, BLOCK_M, BLOCK_N, BLOCK_K)
        den, pos = _sets(rm, rn, N, M, a_lab_ptr, c_lab_ptr, c_valid_ptr, EXCLUDE_SELF)
        g = _grad_tile(s, dist, den, pos, lse, w, cnt, inv_temp, METRIC)
        ct = tl.load(c_ptr + rn[:, None] * sc + rd[None, :] * scd, mask=(rn[:, None] < M) & (rd[None, :] < d),
                     other=0.0).to(tl.float32)
        acc += tl.dot(g, ct, input_precision="ieee")
        gsum += tl.sum(g, axis=1)
    if METRIC != 0:  # D = |a|^2 + |c|^2 - 2<a, c>: grad_a = 2 (rowsum(G) a - G c)
        at = tl.load(a_ptr + rm[:, None] * sa + rd[None, :] * sad, mask=(rm[:, None] < N) & (rd[None, :] < d),
                     other=0.0).to(tl.float32)
        acc = 2.0 * (gsum[:, None] * at - acc)
    tl.store(ga_ptr + rm[:, None] * sga + rd[None, :], acc, mask=(rm[:, None] < N) & (rd[None, :] < d))


@triton.jit
def _bwd_cols_kernel(a_ptr, c_ptr, a_lab_ptr, c_lab_ptr, c_valid_ptr, lse_ptr, w_ptr, cnt_ptr, gc_ptr,
                     N, M, d, sa, sad, sc, scd, sgc, inv_temp,
                     METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nc = _norms(c_ptr, rn, M, d, sc, scd, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        na = _norms(a_ptr, rm, N, d, sa, sad, BLOCK_M, BLOCK_K)
        lse = tl.load(lse_ptr + rm, mask=rm < N, other=0.0)
        w = tl.load(w_ptr + rm, mask=rm < N, other=0.0)
        cnt = tl.load(cnt_ptr + rm, mask=rm < N, other=0.0)
        s, dist = _logit_tile(a_ptr, c_ptr, rm, rn, N, M, d, sa, sad, sc, scd, inv_temp, na, nc,
                              METRIC, BLOCK_M, BLOCK_N, BLOCK_K)
        den, pos = _sets(rm, rn, N, M, a_lab_ptr, c_lab_ptr, c_valid_ptr, EXCLUDE_SELF)
        g = _grad_tile(s, dist, den, pos, lse, w, cnt, inv_temp, METRIC)
        at = tl.load(a_ptr + rm[:, None] * sa + rd[None, :] * sad, mask=(rm[:, None] < N) & (rd[None, :] < d),
                     other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g), at, input_precision="ieee")
        gsum += tl.sum(g, axis=0)
    if METRIC != 0:  # grad_c = 2 (colsum(G) c - G^T a)
        ct = tl.load(c_ptr + rn[:, None] * sc + rd[None, :] * scd, mask=(rn[:, None] < M) & (rd[None, :] < d),
                     other=0.0).to(tl.float32)
        acc = 2.0 * (gsum[:, None] * ct - acc)
    tl.store(gc_ptr + rn[:, None] * sgc + rd[None, :], acc, mask=(rn[:, None] < M) & (rd[None, :] < d))


# One tile shape for every size: masks handle the ragged edges, and each (metric, exclude_self)
# pair compiles once. Backward accumulates (64, 128) feature chunks in registers.
BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D = 64, 64, 32, 128


def forward(a, c, a_lab, c_lab, c_valid, temperature: float, metric: int, exclude_self: bool):
    """Row statistics ``(lse, pos_sum, pos_cnt)``, each ``(N,)`` fp32."""
    N, d = a.shape
    M = c.shape[0]
    bm, bn, bk = BLOCK_M, BLOCK_N, BLOCK_K
    lse, pos_sum, pos_cnt = (torch.empty(N, device=a.device, dtype=torch.float32) for _ in range(3))
    _fwd_kernel[(triton.cdiv(N, bm),)](a, c, a_lab, c_lab, c_valid, lse, pos_sum, pos_cnt, N, M, d,
                                       *a.stride(), *c.stride(), 1.0 / temperature,
                                       METRIC=metric, EXCLUDE_SELF=exclude_self,
                                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return lse, pos_sum, pos_cnt


def backward(a, c, a_lab, c_lab, c_valid, lse, w, cnt, temperature: float, metric: int, exclude_self: bool):
    """``(grad_a, grad_c)`` for row weights ``w = dL/dloss_i``."""
    N, d = a.shape
    M = c.shape[0]
    bm, bn, bk, bd = BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D
    ga = torch.empty(N, d, device=a.device, dtype=torch.float32)
    gc = torch.empty(M, d, device=a.device, dtype=torch.float32)
    args = (a, c, a_lab, c_lab, c_valid, lse, w, cnt)
    _bwd_rows_kernel[(triton.cdiv(N, bm), triton.cdiv(d, bd))](
        *args, ga, N, M, d, *a.stride(), *c.stride(), ga.stride(0), 1.0 / temperature,
        METRIC=metric, EXCLUDE_SELF=exclude_self, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
    _bwd_cols_kernel[(triton.cdiv(M, bn), triton.cdiv(d, bd))](
        *args, gc, N, M, d, *a.stride(), *c.stride(), gc.stride(0), 1.0 / temperature,
        METRIC=metric, EXCLUDE_SELF=exclude_self, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
    return ga.to(a.dtype), gc.to(c.dtype)
