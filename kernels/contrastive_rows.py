"""Row-wise contrastive kernels: each anchor or logit row is a small independent problem.

candidate_softmax (seed 004 eq. 6): anchor i against its own K + 1 candidates (the positive
first): loss_i = logsumexp_{valid k} s_ik - s_i0; one program per anchor, distances by explicit
differences; a second pass over d writes the gradients for the weight 1 / B.

indexed_candidate_softmax: the same loss with the negatives given as indices (B, K) into a pool
(P, d), read by index and never gathered; arithmetic in the input dtype (fp32 or fp64). One program
per anchor forms the loss, the anchor's and the positive's gradients and each negative's coefficient
(forward). indexed_pool_grad (backward) sums the pool gradient per pool row, over that row's segment
of the contributions sorted by row (stable), one program per (row, d block): every entry is written
once, in a fixed order, without atomics.

negative_learning (seed 004 eq. 1): loss_i = sum_k w_ik (lse(z_i) - lse_{j != k}(z_i)), with
sum_{j != k} e^{z_j - max} = S - e^{z_k - max} except at the argmax, where it is summed directly.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _candidate_softmax_kernel(a_ptr, c_ptr, valid_ptr, loss_ptr, ga_ptr, gc_ptr, K1, d, inv_temp, inv_b,
                              METRIC: tl.constexpr, NEED_GRAD: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_row = a_ptr + i * d
    c_rows = c_ptr + i * K1 * d
    valid = tl.load(valid_ptr + i * K1 + rk, mask=rk < K1, other=0) != 0
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_row + rd, mask=rd < d, other=0.0).to(tl.float32)
        c = tl.load(c_rows + rk[:, None] * d + rd[None, :], mask=(rk[:, None] < K1) & (rd[None, :] < d),
                    other=0.0).to(tl.float32)
        if METRIC == 0:
            acc += tl.sum(a[None, :] * c, axis=1)
        else:
            diff = a[None, :] - c
            acc += tl.sum(diff * diff, axis=1)
    if METRIC == 0:
        dist = acc * 0.0
        s = acc * inv_temp
    else:
        dist = acc
        if METRIC == 2:
            dist = tl.sqrt(acc)
        s = -dist * inv_temp
    mx = tl.max(tl.where(valid, s, -1.0e30), axis=0)
    e = tl.where(valid, tl.exp(s - mx), 0.0)
    lse = mx + tl.log(tl.sum(e, axis=0))
    s0 = tl.sum(tl.where(rk == 0, s, 0.0), axis=0)
    tl.store(loss_ptr + i, lse - s0)
    if NEED_GRAD:
        g = tl.where(valid, tl.exp(s - lse) - tl.where(rk == 0, 1.0, 0.0), 0.0) * inv_temp * inv_b
        if METRIC == 1:
            coef = -2.0 * g
        elif METRIC == 2:
            coef = tl.where(dist > 0, -g / tl.maximum(dist, 1e-30), 0.0)
        else:
            coef = g
        for d0 in range(0, d, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_row + rd, mask=rd < d, other=0.0).to(tl.float32)
            cmask = (rk[:, None] < K1) & (rd[None, :] < d)
            c = tl.load(c_rows + rk[:, None] * d + rd[None, :], mask=cmask, other=0.0).to(tl.float32)
            if METRIC == 0:
                ga = tl.sum(coef[:, None] * c, axis=0)
                gc = coef[:, None] * a[None, :]
            else:
                diff = coef[:, None] * (a[None, :] - c)
                ga = tl.sum(diff, axis=0)
                gc = -diff
            tl.store(ga_ptr + i * d + rd, ga, mask=rd < d)
            tl.store(gc_ptr + i * K1 * d + rk[:, None] * d + rd[None, :], gc, mask=cmask)


def candidate_softmax(anchor, cands, valid, temperature: float, metric: int, need_grad: bool):
    """``(loss, grad_anchor, grad_candidates)``; the gradients are empty without ``need_grad``."""
    anchor, cands = anchor.contiguous(), cands.contiguous()
    B, K1, d = cands.shape
    row_loss = torch.empty(B, device=anchor.device, dtype=torch.float32)
    ga = torch.empty((B, d) if need_grad else (0,), device=anchor.device, dtype=torch.float32)
    gc = torch.empty((B, K1, d) if need_grad else (0,), device=anchor.device, dtype=torch.float32)
    _candidate_softmax_kernel[(B,)](anchor, cands, valid.contiguous(), row_loss, ga, gc, K1, d, 1.0 / temperature,
                                    1.0 / B, METRIC=metric, NEED_GRAD=need_grad,
                                    BLOCK_K=max(triton.next_power_of_2(K1), 2), BLOCK_D=64)
    return row_loss.mean().to(anchor.dtype), ga.to(anchor.dtype), gc.to(anchor.dtype)


@triton.jit
def _indexed_softmax_kernel(a_ptr, p_ptr, pool_ptr, idx_ptr, valid_ptr, scal_ptr, loss_ptr, ga_ptr, gp_ptr, coef_ptr,
                            K, d, METRIC: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    dtype = a_ptr.dtype.element_ty
    inv_temp = tl.load(scal_ptr)  # 1 / tau and 1 / B in the input dtype (a float argument would be fp32)
    inv_b = tl.load(scal_ptr + 1)
    rk = tl.arange(0, BLOCK_K)
    valid = tl.load(valid_ptr + i * K + rk, mask=rk < K, other=0) != 0
    rows = tl.load(idx_ptr + i * K + rk, mask=valid, other=0).to(tl.int64)  # a masked entry's row is never read
    a_row = a_ptr + i * d
    p_row = p_ptr + i * d
    acc = tl.zeros((BLOCK_K,), dtype=dtype)
    acc0 = tl.zeros((BLOCK_D,), dtype=dtype)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_row + rd, mask=rd < d, other=0.0)
        p = tl.load(p_row + rd, mask=rd < d, other=0.0)
        c = tl.load(pool_ptr + rows[:, None] * d + rd[None, :], mask=valid[:, None] & (rd[None, :] < d), other=0.0)
        if METRIC == 0:
            acc0 += a * p
            acc += tl.sum(a[None, :] * c, axis=1)
        else:
            acc0 += (a - p) * (a - p)
            diff = a[None, :] - c
            acc += tl.sum(diff * diff, axis=1)
    acc0_sum = tl.sum(acc0, axis=0)
    if METRIC == 0:
        dist, dist0 = acc, acc0_sum
        s, s0 = acc * inv_temp, acc0_sum * inv_temp
    else:
        dist, dist0 = acc, acc0_sum
        if METRIC == 2:
            dist, dist0 = tl.sqrt(acc), tl.sqrt(acc0_sum)
        s, s0 = -dist * inv_temp, -dist0 * inv_temp
    mx = tl.max(tl.where(valid, s, s0), axis=0)  # over the positive (always a candidate) and the valid negatives
    total = tl.exp(s0 - mx) + tl.sum(tl.where(valid, tl.exp(s - mx), 0.0), axis=0)
    lse = mx + tl.log(total)
    tl.store(loss_ptr + i, lse - s0)
    if NEED_GRAD:
        # dL/ds_k = p_k for the negatives, p_0 - 1 = -sum_k p_k for the positive (exact 0 without negatives)
        pk = tl.where(valid, tl.exp(s - lse), 0.0)
        w = pk * inv_temp * inv_b
        w0 = -tl.sum(pk, axis=0) * inv_temp * inv_b
        if METRIC == 0:
            coef, c0 = w, w0
        elif METRIC == 1:
            coef, c0 = -2.0 * w, -2.0 * w0
        else:  # -(a - c) / |a - c|, 0 at a = c
            coef = tl.where(valid & (dist > 0), -w / tl.where(dist > 0, dist, 1.0), 0.0)
            c0 = tl.where(dist0 > 0, -w0 / tl.where(dist0 > 0, dist0, 1.0), 0.0)
        tl.store(coef_ptr + i * K + rk, coef, mask=rk < K)
        for d0 in range(0, d, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_row + rd, mask=rd < d, other=0.0)
            p = tl.load(p_row + rd, mask=rd < d, other=0.0)
            c = tl.load(pool_ptr + rows[:, None] * d + rd[None, :], mask=valid[:, None] & (rd[None, :] < d),
                        other=0.0)
            if METRIC == 0:
                ga = c0 * p + tl.sum(coef[:, None] * c, axis=0)
                gp = c0 * a
            else:
                ga = c0 * (a - p) + tl.sum(coef[:, None] * (a[None, :] - c), axis=0)
                gp = -c0 * (a - p)
            tl.store(ga_ptr + i * d + rd, ga, mask=rd < d)
            tl.store(gp_ptr + i * d + rd, gp, mask=rd < d)


@triton.jit
def _pool_grad_segments_kernel(a_ptr, pool_ptr, coef_ptr, order_ptr, starts_ptr, scale_ptr, gpool_ptr, K, d,
                               METRIC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pool row j, columns of block 1: its contributions are order[starts[j]:starts[j + 1]] (flat
    indices i * K + k), summed in that order. dot: sum w a_i; distances: (sum w) row_j - sum w a_i;
    times the upstream gradient."""
    j = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dtype = a_ptr.dtype.element_ty
    scale = tl.load(scale_ptr).to(dtype)
    start = tl.load(starts_ptr + j)
    end = tl.load(starts_ptr + j + 1)
    acc = tl.zeros((BLOCK_D,), dtype=dtype)
    wsum = tl.zeros((BLOCK_D,), dtype=dtype)
    for t in range(start, end):
        e = tl.load(order_ptr + t)
        w = tl.load(coef_ptr + e)
        acc += w * tl.load(a_ptr + (e // K) * d + rd, mask=rd < d, other=0.0)
        wsum += w
    if METRIC == 0:
        g = acc
    else:
        # the row is read only when a real negative uses it (an unused row may hold anything)
        g = wsum * tl.load(pool_ptr + j * d + rd, mask=(rd < d) & (end > start), other=0.0) - acc
    tl.store(gpool_ptr + j * d + rd, g * scale, mask=rd < d)


def indexed_candidate_softmax(anchor, positive, pool, index, valid, temperature: float, metric: int,
                              need_grad: bool):
    """``(loss, grad_anchor, grad_positive, coef (B, K))`` for fp32 or fp64 rows; all but the loss empty
    without ``need_grad``. ``index (B, K)`` int64 rows of ``pool``, read only where ``valid``."""
    anchor, positive, pool = anchor.contiguous(), positive.contiguous(), pool.contiguous()
    index, valid = index.contiguous(), valid.contiguous()
    B, K = index.shape
    d = pool.shape[1]
    dev, dtype = anchor.device, anchor.dtype
    scal = torch.tensor([1.0 / temperature, 1.0 / B], dtype=dtype, device=dev)
    row_loss = torch.empty(B, device=dev, dtype=dtype)

    def grad_buffer(*shape):  # distinct tensors even when empty (a custom op's outputs may not alias)
        return torch.empty(shape if need_grad else (0,), device=dev, dtype=dtype)

    ga, gp, coef = grad_buffer(B, d), grad_buffer(B, d), grad_buffer(B, K)
    block_k = max(triton.next_power_of_2(K), 2)
    block_d = max(16, min(64, 4096 // block_k))
    _indexed_softmax_kernel[(B,)](anchor, positive, pool, index, valid, scal, row_loss, ga, gp, coef, K, d,
                                  METRIC=metric, NEED_GRAD=need_grad, BLOCK_K=block_k, BLOCK_D=block_d)
    return row_loss.mean(), ga, gp, coef


def indexed_pool_grad(anchor, pool, index, valid, coef, scale, metric: int):
    """The pool gradient ``(P, d)`` from ``indexed_candidate_softmax``'s ``coef`` for the upstream
    gradient ``scale`` (a one-element tensor, read on the device): per pool row, the sum of its
    contributions in (anchor, slot) order, by a stable sort of the valid entries' rows."""
    anchor, pool, coef = anchor.contiguous(), pool.contiguous(), coef.contiguous()
    P, d = pool.shape
    K = index.shape[1]
    keys = torch.where(valid, index, P).flatten()  # masked entries sort past every row's segment
    order = torch.argsort(keys, stable=True)
    starts = torch.searchsorted(keys[order], torch.arange(P + 1, device=pool.device, dtype=keys.dtype))
    gpool = torch.empty(P, d, device=pool.device, dtype=anchor.dtype)
    _pool_grad_segments_kernel[(P, triton.cdiv(d, 64))](anchor, pool, coef, order, starts, scale.reshape(1), gpool,
                                                         K, d, METRIC=metric, BLOCK_D=64)
    return gpool


@triton.jit
def _negative_learning_kernel(z_ptr, w_ptr, loss_ptr, g_ptr, B, C, inv_b, NEED_GRAD: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rc = tl.arange(0, BLOCK_C)
    mask = (rb[:, None] < B) & (rc[None, :] < C)
    offs = rb[:, None].to(tl.int64) * C + rc[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=-1.0e30).to(tl.float32)  # finite: padded rows stay NaN-free
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    am = tl.argmax(z, axis=1)
    mx = tl.max(z, axis=1)
    e = tl.where(mask, tl.exp(z - mx[:, None]), 0.0)  # e_j = exp(z_j - M), e_argmax = 1
    total = tl.maximum(tl.sum(e, axis=1), 1e-30)
    is_max = rc[None, :] == am[:, None]
    # Without the argmax, the sum is taken relative to the second largest logit M2 (R2 >= 1): its
    # log, (M2 - M) + log R2, stays finite for any logit gap, where sum_{j != argmax} e_j underflows.
    z_rest = tl.where(is_max, -1.0e30, z)
    m2 = tl.max(z_rest, axis=1)
    e2 = tl.where(mask, tl.exp(z_rest - m2[:, None]), 0.0)
    r2 = tl.maximum(tl.sum(e2, axis=1), 1e-30)
    rest = tl.where(is_max, 1.0, tl.maximum(total[:, None] - e, 1e-30))  # sum_{j != k} e_j for k != argmax
    log_rest = tl.where(is_max, (m2 - mx + tl.log(r2))[:, None], tl.log(rest))
    loss = tl.sum(tl.where(w != 0, w * (tl.log(total)[:, None] - log_rest), 0.0), axis=1)
    tl.store(loss_ptr + rb, loss, mask=rb < B)
    if NEED_GRAD:
        # d/dz_j = sum_k w_k (p_j - q(k)_j), q(k) the softmax over j != k: e_j / rest_k for k != argmax,
        # e2_j / R2 for k = argmax
        wsum = tl.sum(w, axis=1)
        w_over_rest = tl.where((w != 0) & ~is_max, w / rest, 0.0)
        w_max = tl.sum(tl.where(is_max, w, 0.0), axis=1)
        g = e * (wsum[:, None] / total[:, None] - (tl.sum(w_over_rest, axis=1)[:, None] - w_over_rest))
        g = g - w_max[:, None] * e2 / r2[:, None]
        tl.store(g_ptr + offs, g * inv_b, mask=mask)


def negative_learning(logits, weights, need_grad: bool):
    """``(loss, grad_logits)`` for the mean over rows; the gradient is empty without ``need_grad``."""
    logits, weights = logits.contiguous(), weights.contiguous()
    B, C = logits.shape
    row_loss = torch.empty(B, device=logits.device, dtype=torch.float32)
    g = torch.empty((B, C) if need_grad else (0,), device=logits.device, dtype=torch.float32)
    block_c = max(triton.next_power_of_2(C), 2)
    block_b = max(1, min(64, 4096 // block_c))
    _negative_learning_kernel[(triton.cdiv(B, block_b),)](logits, weights, row_loss, g, B, C, 1.0 / B,
                                                         NEED_GRAD=need_grad, BLOCK_B=block_b, BLOCK_C=block_c)
    return row_loss.mean().to(logits.dtype), g.to(logits.dtype)
