"""Contrastive losses of CoNLST (seed 004) and SimCSE: ``info_nce``, ``supcon``,
``negative_contrastive``, ``negative_learning``.

Kernels: the C++ CPU kernels form loss and input gradients in one pass (backward is a scale);
the Triton kernels tile the logits with an online logsumexp (memory O((N + M) d), never N x M)
and recompute tiles in backward. negative_contrastive with integer negatives reads the pool rows
by index on both kernel backends (never a (B, K, d) gather) and returns the pool's gradient dense.
Cosine arrives at the kernels as unit rows with the dot metric; distance metrics as centred rows
for info_nce and supcon (distances are translation invariant; centring shrinks the norms that the
|a|^2 + |c|^2 - 2<a, c> expansion cancels against), while negative_contrastive's kernels take
explicit differences.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from xlt_fast import _backend, _validate as V
from xlt_fast.ops.pairwise import masked_center
from xlt_fast.reference import contrastive as ref
from xlt_fast.reference.pairwise import unit_rows

METRICS = ("cosine", "dot", "sqeuclidean", "euclidean")
_METRIC_CODE = {"cosine": 0, "dot": 0, "sqeuclidean": 1, "euclidean": 2}
_KERNELS = ("reference", "cpu", "triton")
# One Triton program holds a whole logit row of negative_learning in registers.
MAX_TRITON_CLASSES = 16384


def _grad_or_empty(need_grad: bool, t: Tensor, shape) -> Tensor:
    return t.new_empty(shape if need_grad else (0,))


def _register_precomputed_grad(op, n_inputs: int) -> None:
    """Autograd for ops returning ``(loss, grad_1, ..., grad_k)`` for the first k inputs: the
    kernels formed dloss/dinput in the forward pass, so backward only scales them."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, *_):
        grads = tuple(grad_loss * g if g.numel() else None for g in ctx.saved_tensors)
        return grads + (None,) * (n_inputs - len(grads))

    op.register_autograd(backward, setup_context=setup)


# -- info_nce / supcon: anchors against candidates with label-defined positives ------------------

@torch.library.custom_op("xlt_fast::contrastive_dense", mutates_args=())
def contrastive_dense(a: Tensor, c: Optional[Tensor], a_labels: Tensor, c_labels: Tensor, a_valid: Tensor,
                      c_valid: Tensor, temperature: float, metric: int, exclude_self: bool, need_grad: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """C++ kernel: ``(loss, dloss/da, dloss/dc)`` (gradients empty without ``need_grad``).

    ``c=None`` means the candidates are the anchors (supcon): the whole gradient is then in
    dloss/da, formed as (G + G^T) a with one GEMM, and dloss/dc is empty."""
    return _backend.extension().contrastive_dense(a, c, a_labels, c_labels, a_valid, c_valid, temperature, metric,
                                                  exclude_self, need_grad)


@contrastive_dense.register_fake
def _(a, c, a_labels, c_labels, a_valid, c_valid, temperature, metric, exclude_self, need_grad):
    grad_c = _grad_or_empty(need_grad and c is not None, a, a.shape if c is None else c.shape)
    return a.new_empty(()), _grad_or_empty(need_grad, a, a.shape), grad_c


_register_precomputed_grad(contrastive_dense, 10)


@torch.library.custom_op("xlt_fast::contrastive_tiled", mutates_args=())
def contrastive_tiled(a: Tensor, c: Tensor, a_labels: Tensor, c_labels: Tensor, a_valid: Tensor, c_valid: Tensor,
                      temperature: float, metric: int, exclude_self: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton kernel: ``(loss, lse, n_pos)``; lse and the positive counts per anchor feed backward."""
    from xlt_fast.kernels import contrastive as K

    lse, pos_sum, cnt = K.forward(a, c, a_labels, c_labels, c_valid, temperature, metric, exclude_self)
    included = a_valid & (cnt > 0)
    per_row = torch.where(included, lse - pos_sum / cnt.clamp_min(1), 0)
    loss = per_row.sum() / included.sum().clamp_min(1)
    return loss.to(a.dtype), lse, cnt


@contrastive_tiled.register_fake
def _(a, c, a_labels, c_labels, a_valid, c_valid, temperature, metric, exclude_self):
    n = a.shape[0]
    return a.new_empty(()), a.new_empty(n, dtype=torch.float32), a.new_empty(n, dtype=torch.float32)


def _tiled_setup(ctx, inputs, output):
    a, c, a_labels, c_labels, a_valid, c_valid, temperature, metric, exclude_self = inputs
    _, lse, cnt = output
    ctx.save_for_backward(a, c, a_labels, c_labels, a_valid, c_valid, lse, cnt)
    ctx.args = (temperature, metric, exclude_self)


@torch.library.custom_op("xlt_fast::contrastive_tiled_backward", mutates_args=())
def contrastive_tiled_backward(a: Tensor, c: Tensor, a_labels: Tensor, c_labels: Tensor, c_valid: Tensor,
                               lse: Tensor, row_weight: Tensor, n_pos: Tensor, temperature: float, metric: int,
                               exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Triton kernels: ``(grad_a, grad_c)`` for per-anchor weights ``row_weight = dL/dloss_i``."""
    from xlt_fast.kernels import contrastive as K

    return K.backward(a, c, a_labels, c_labels, c_valid, lse, row_weight, n_pos, temperature, metric, exclude_self)


@contrastive_tiled_backward.register_fake
def _(a, c, a_labels, c_labels, c_valid, lse, row_weight, n_pos, temperature, metric, exclude_self):
    return torch.empty_like(a), torch.empty_like(c)


def _tiled_backward(ctx, grad_loss, _lse, _cnt):
    a, c, a_labels, c_labels, a_valid, c_valid, lse, cnt = ctx.saved_tensors
    included = a_valid & (cnt > 0)
    w = included.float() * (grad_loss.float() / included.sum().clamp_min(1))
    ga, gc = contrastive_tiled_backward(a, c, a_labels, c_labels, c_valid, lse, w, cnt, *ctx.args)
    return ga, gc, None, None, None, None, None, None, None


contrastive_tiled.register_autograd(_tiled_backward, setup_context=_tiled_setup)


def _prepare(a: Tensor, c: Tensor, metric: str, a_valid: Tensor, c_valid: Tensor):
    """Kernel inputs: fp32/fp64 rows, unit rows for cosine, centred rows for distances (when the
    anchors are the candidates, as in supcon, both come back as one tensor)."""
    same = a is c
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
        c = a if same else c.float()
    if metric == "cosine":
        a = unit_rows(a)
        c = a if same else unit_rows(c)
    elif metric in ("sqeuclidean", "euclidean"):
        center = masked_center(a.unsqueeze(0), c.unsqueeze(0), a_valid.unsqueeze(0), c_valid.unsqueeze(0))[0]
        a = a - center
        c = a if same else c - center
    return a, c


def _label_loss(a: Tensor, c: Tensor, a_labels: Tensor, c_labels: Tensor, a_valid: Tensor, c_valid: Tensor,
                temperature: float, metric: str, exclude_self: bool, kind: str) -> Tensor:
    dtype = a.dtype
    a, c = _prepare(a, c, metric, a_valid, c_valid)
    code = _METRIC_CODE[metric]
    if kind == "cpu":
        need_grad = torch.is_grad_enabled() and (a.requires_grad or c.requires_grad)
        loss = contrastive_dense(a, None if c is a else c, a_labels, c_labels, a_valid, c_valid, temperature, code,
                                 exclude_self, need_grad)[0]
    else:
        loss = contrastive_tiled(a, c, a_labels, c_labels, a_valid, c_valid, temperature, code, exclude_self)[0]
    return loss.to(dtype)


def _rows(t: Tensor, name: str, op: str) -> None:
    V.floating(t, name, op)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{op}: {name} must have shape (N, d) with N, d >= 1, got {tuple(t.shape)}")


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.05, metric: str = "cosine", *,
             check_finite: bool = True, backend: _backend.Backend = "auto") -> Tensor:
    """SimCSE InfoNCE with in-batch negatives (seed 004 eq. 3; Gao et al. 2021).

    ``loss = mean_i [ logsumexp_j s(a_i, b_j) - s(a_i, b_i) ]``, s = sim / temperature, positives on
    the diagonal. ``a, b``: ``(N, d)`` (e.g. two dropout views). ``metric``: cosine | dot |
    sqeuclidean | euclidean (minus the distance as similarity). Equals pytorch-metric-learning's
    ``NTXentLoss(temperature)(a, arange(N), ref_emb=b, ref_labels=arange(N))`` for cosine.
    """
    op = "info_nce"
    _rows(a, "a", op)
    _rows(b, "b", op)
    V.same_dtype_device(op, a=a, b=b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: a and b must have the same shape (N, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    temperature = V.positive(temperature, "temperature", op)
    V.choice(metric, "metric", METRICS, op)
    kind = _backend.resolve(backend, a.device, op, gpu_default="triton", available=_KERNELS)
    checks = V.Checks(op, check_finite)
    checks.finite("a", a)
    checks.finite("b", b)
    checks.run()
    if kind == "reference":
        return ref.info_nce(a, b, temperature, metric)
    n = a.shape[0]
    labels = torch.arange(n, device=a.device)
    valid = torch.ones(n, dtype=torch.bool, device=a.device)
    return _label_loss(a, b, labels, labels, valid, valid, temperature, metric, False, kind)


def supcon(features: Tensor, labels: Tensor, temperature: float = 0.1, metric: str = "cosine",
           mask: Optional[Tensor] = None, *, check_finite: bool = True,
           backend: _backend.Backend = "auto") -> Tensor:
    """Supervised contrastive loss (seed 004 eq. 2; Khosla et al. 2020), multi-positive.

    For anchor i: A(i) = other unmasked samples, P(i) = those with its label;
    ``loss_i = logsumexp_{A(i)} s_i. - mean_{P(i)} s_ip``, averaged over the anchors with at least
    one positive (others are excluded, never NaN; no positive at all gives 0).
    ``features (N, d)``, integer ``labels (N,)``, optional bool ``mask (N,)`` (True = sample takes part;
    the rows of the others are never read, so they may hold anything, NaN included).
    Equals pytorch-metric-learning's ``SupConLoss(temperature)`` for cosine, except for a batch in
    which no anchor has a negative (every sample of one label): PML returns 0 by convention, while
    the formula, and this op, give ``logsumexp_A - mean_A >= log |A(i)| > 0``.
    """
    op = "supcon"
    _rows(features, "features", op)
    n = features.shape[0]
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.dtype.is_complex:
        raise TypeError(f"{op}: labels must be an integer tensor of shape ({n},), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{op}: labels must have shape ({n},) (one per row of features), got {tuple(labels.shape)}")
    valid = V.point_mask(mask, "mask", (1, n), features.device, op)
    valid = torch.ones(n, dtype=torch.bool, device=features.device) if valid is None else valid[0]
    temperature = V.positive(temperature, "temperature", op)
    V.choice(metric, "metric", METRICS, op)
    kind = _backend.resolve(backend, features.device, op, gpu_default="triton", available=_KERNELS)
    labels = labels.to(device=features.device, dtype=torch.int64)
    checks = V.Checks(op, check_finite)
    checks.finite("features", features, valid)
    checks.run()
    features = V.masked(features, valid)  # no backend reads the rows of masked-out samples
    if kind == "reference":
        return ref.supcon(features, labels, temperature, metric, mask=valid)
    return _label_loss(features, features, labels, labels, valid, valid, temperature, metric, True, kind)


# -- negative_contrastive: each anchor against its own candidates --------------------------------

@torch.library.custom_op("xlt_fast::candidate_softmax", mutates_args=())
def candidate_softmax(anchor: Tensor, candidates: Tensor, candidate_valid: Tensor, temperature: float, metric: int,
                      need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``mean_i [logsumexp_{valid k} s_ik - s_i0]`` with candidate 0 the positive; returns
    ``(loss, dloss/danchor, dloss/dcandidates)`` (gradients empty without ``need_grad``)."""
    if backend == "triton":
        from xlt_fast.kernels.contrastive_rows import candidate_softmax as kernel

        return kernel(anchor, candidates, candidate_valid, temperature, metric, need_grad)
    return _backend.extension().candidate_softmax(anchor, candidates, candidate_valid, temperature, metric, need_grad)


@candidate_softmax.register_fake
def _(anchor, candidates, candidate_valid, temperature, metric, need_grad, backend):
    return (anchor.new_empty(()), _grad_or_empty(need_grad, anchor, anchor.shape),
            _grad_or_empty(need_grad, candidates, candidates.shape))


_register_precomputed_grad(candidate_softmax, 7)


@torch.library.custom_op("xlt_fast::indexed_candidate_softmax", mutates_args=())
def indexed_candidate_softmax(anchor: Tensor, positive: Tensor, pool: Tensor, index: Tensor, valid: Tensor,
                              temperature: float, metric: int, need_grad: bool, backend: str
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``candidate_softmax`` with the negatives as rows of ``pool (P, d)`` read by ``index (B, K)``
    (int64) where ``valid (B, K)``, never gathered (an entry not valid is never read: its index may be
    anything). Returns ``(loss, dloss/danchor, dloss/dpositive, coef)``, ``coef (B, K)`` the pool
    rows' gradient coefficients that :func:`indexed_pool_grad` turns into dloss/dpool in backward
    (all three empty without ``need_grad``). Autograd gives anchor, positive and pool their
    gradients; ``pool`` may be the tensor ``positive`` (autograd then sums both)."""
    if backend == "triton":
        from xlt_fast.kernels.contrastive_rows import indexed_candidate_softmax as kernel

        return kernel(anchor, positive, pool, index, valid, temperature, metric, need_grad)
    return _backend.extension().indexed_candidate_softmax(anchor, positive, pool, index, valid, temperature, metric,
                                                          need_grad)


@indexed_candidate_softmax.register_fake
def _(anchor, positive, pool, index, valid, temperature, metric, need_grad, backend):
    return (anchor.new_empty(()), _grad_or_empty(need_grad, anchor, anchor.shape),
            _grad_or_empty(need_grad, positive, positive.shape), _grad_or_empty(need_grad, anchor, index.shape))


@torch.library.custom_op("xlt_fast::indexed_pool_grad", mutates_args=())
def indexed_pool_grad(anchor: Tensor, pool: Tensor, index: Tensor, valid: Tensor, coef: Tensor, scale: Tensor,
                      metric: int, backend: str) -> Tensor:
    """dloss/dpool ``(P, d)`` times the upstream gradient ``scale`` (0-dim), dense, deterministic. CPU:
    scattered into zeros by column chunks, each visiting every (i, k) in order; Triton: one program
    per (pool row, d block) summing the row's contributions sorted by row (no atomics)."""
    if backend == "triton":
        from xlt_fast.kernels.contrastive_rows import indexed_pool_grad as kernel

        return kernel(anchor, pool, index, valid, coef, scale, metric)
    return _backend.extension().indexed_pool_grad(anchor, pool, index, valid, coef, scale, metric)


@indexed_pool_grad.register_fake
def _(anchor, pool, index, valid, coef, scale, metric, backend):
    return torch.empty_like(pool)


def _indexed_setup(ctx, inputs, output):
    anchor, positive, pool, index, valid, temperature, metric, need_grad, backend = inputs
    _, grad_anchor, grad_positive, coef = output
    ctx.save_for_backward(anchor, pool, index, valid, grad_anchor, grad_positive, coef)
    ctx.args = (metric, backend)


def _indexed_backward(ctx, grad_loss, *_):
    anchor, pool, index, valid, grad_anchor, grad_positive, coef = ctx.saved_tensors
    if not coef.numel():  # forward ran without need_grad
        return (None,) * 9
    grad_pool = None
    if ctx.needs_input_grad[2]:
        grad_pool = indexed_pool_grad(anchor, pool, index, valid, coef, grad_loss, *ctx.args)
    return (grad_loss * grad_anchor, grad_loss * grad_positive, grad_pool) + (None,) * 6


indexed_candidate_softmax.register_autograd(_indexed_backward, setup_context=_indexed_setup)


def _indexed_rows_probe(pool: Tensor, idx: Tensor, valid: Tensor, kind: str) -> Tensor:
    """``(B, K)``: 0 where the entry is not valid or its pool row is finite, NaN where a valid entry's
    row holds NaN or inf (for ``Checks.finite``), without gathering the rows. Entries whose index is
    out of range are reported by the range check and read as 0 here."""
    pool = pool.detach()
    if pool.dtype in (torch.float16, torch.bfloat16):
        pool = pool.float()
    in_range = valid & (idx >= 0) & (idx < pool.shape[0])
    if kind == "cpu":  # reads only the indexed rows
        return _backend.extension().indexed_rows_probe(pool, idx, in_range)
    row_ok = torch.isfinite(pool).all(1)
    ok = row_ok[idx.clamp(0, pool.shape[0] - 1)] | ~in_range
    return torch.where(ok, 0.0, float("nan"))


def negative_contrastive(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float = 0.05,
                         metric: str = "euclidean", *, pool: Optional[Tensor] = None,
                         negative_mask: Optional[Tensor] = None, check_finite: bool = True,
                         backend: _backend.Backend = "auto") -> Tensor:
    """CoNLST contrastive negative learning (seed 004 eq. 6).

    ``loss_i = -log( e^{s(h_i, h_i')} / (e^{s(h_i, h_i')} + sum_{j in N_i} e^{s(h_i, h_j')}) )``, mean over i,
    with ``anchor (B, d)`` = h_i, ``positive (B, d)`` = its second dropout view h_i', and the negatives
    N_i (samples whose pseudo-label is a complementary label of i, eq. 5) given either as
    ``(B, K, d)`` features or as integer indices ``(B, K)`` into ``pool (P, d)`` (default: ``positive``,
    i.e. the other samples' second views as in eq. 6). ``negative_mask (B, K)`` marks real negatives
    (the others are never read: their features or pool rows may hold anything, and their indices
    need not lie in range). An anchor without any real negative has loss 0 and no gradient. A bool
    membership matrix is not accepted as ``negatives`` (it would read as indices 0 and 1).
    Default metric euclidean: the paper uses euclidean distance for eq. 6 (after Snell et al.).

    Backends with integer negatives: ``cpu`` (C++) and ``triton`` (GPU) read the pool rows by index,
    never forming the ``(B, K, d)`` gathered negatives, and return the pool's gradient as a dense
    ``(P, d)`` tensor (several uses of a row add up); ``cpu`` scatters it by column chunks, ``triton``
    sums each pool row's contributions sorted by row (a segment sum); both are deterministic.
    ``reference`` gathers ``pool[negatives]`` and runs eager PyTorch. With feature negatives every
    backend takes the ``(B, K, d)`` tensor as given. ``pool`` may require grad, and may be the tensor
    ``positive`` (the default), whose gradient then sums both uses.
    """
    op = "negative_contrastive"
    _rows(anchor, "anchor", op)
    _rows(positive, "positive", op)
    V.same_dtype_device(op, anchor=anchor, positive=positive)
    B, d = anchor.shape
    if positive.shape != anchor.shape:
        raise ValueError(f"{op}: positive must have the shape of anchor {tuple(anchor.shape)}, "
                         f"got {tuple(positive.shape)}")
    if not isinstance(negatives, Tensor) or negatives.dtype == torch.bool or negatives.dtype.is_complex:
        raise TypeError(f"{op}: negatives must be a float tensor of points (B, K, d) or integer indices (B, K) into "
                        f"pool, got {getattr(negatives, 'dtype', type(negatives).__name__)}")
    if negatives.dim() >= 2 and negative_mask is not None:
        negative_mask = _bool_mask(negative_mask, B, negatives.shape[1], op)
    checks = V.Checks(op, check_finite)
    indexed = not negatives.dtype.is_floating_point
    if not indexed:
        if pool is not None:
            raise ValueError(f"{op}: pool is only used with integer negatives (indices), got feature negatives")
        if negatives.dim() != 3 or negatives.shape[0] != B or negatives.shape[2] != d:
            raise ValueError(f"{op}: negatives must have shape ({B}, K, {d}), got {tuple(negatives.shape)}")
        V.same_dtype_device(op, anchor=anchor, negatives=negatives)
    else:
        pool = positive if pool is None else pool
        _rows(pool, "pool", op)
        V.same_dtype_device(op, anchor=anchor, pool=pool)
        if pool.shape[1] != d:
            raise ValueError(f"{op}: pool must have shape (P, {d}), got {tuple(pool.shape)}")
        if negatives.dim() != 2 or negatives.shape[0] != B:
            raise ValueError(f"{op}: integer negatives must have shape ({B}, K), got {tuple(negatives.shape)}")
        idx = negatives.to(device=anchor.device, dtype=torch.int64)
        out_of_range = (idx < 0) | (idx >= pool.shape[0])
        if negative_mask is not None:  # masked-out indices may be anything
            out_of_range &= negative_mask
        checks.add(out_of_range.any(), f"negative indices must lie in [0, {pool.shape[0]}) (rows of pool)")
    K = negatives.shape[1]
    temperature = V.positive(temperature, "temperature", op)
    V.choice(metric, "metric", METRICS, op)
    kind = _backend.resolve(backend, anchor.device, op, gpu_default="triton", available=_KERNELS)
    checks.finite("anchor", anchor)
    checks.finite("positive", positive)
    pool_name = "pool (a row a real negative indexes)"
    if indexed and kind != "reference":  # the kernels read the pool rows by index
        valid = torch.ones(B, K, dtype=torch.bool, device=anchor.device) if negative_mask is None else negative_mask
        if check_finite and V.data_checks(pool):
            checks.finite(pool_name, _indexed_rows_probe(pool, idx, valid, kind), negative_mask)
        checks.run()
        return _indexed_loss(anchor, positive, pool, idx, valid, temperature, metric, kind)
    if indexed:  # the reference gathers
        neg = pool[idx.clamp(0, pool.shape[0] - 1)]
        checks.finite(pool_name, neg, negative_mask)
    else:
        neg = negatives
        checks.finite("negatives", neg, negative_mask)
    checks.run()
    neg = V.masked(neg, negative_mask)  # no backend reads a masked-out negative
    if kind == "reference":
        return ref.negative_contrastive(anchor, positive, neg, temperature, metric, negative_mask)
    dtype = anchor.dtype
    cands = torch.cat([positive.unsqueeze(1), neg], dim=1)
    a = anchor
    if dtype in (torch.float16, torch.bfloat16):
        a, cands = a.float(), cands.float()
    if metric == "cosine":
        a, cands = unit_rows(a), unit_rows(cands)
    valid = torch.ones(B, K + 1, dtype=torch.bool, device=anchor.device)
    if negative_mask is not None:
        valid[:, 1:] = negative_mask
    need_grad = torch.is_grad_enabled() and (a.requires_grad or cands.requires_grad)
    loss = candidate_softmax(a, cands, valid, temperature, _METRIC_CODE[metric], need_grad, kind)[0]
    return loss.to(dtype)


def _indexed_loss(anchor: Tensor, positive: Tensor, pool: Tensor, idx: Tensor, valid: Tensor, temperature: float,
                  metric: str, kind: str) -> Tensor:
    """negative_contrastive with integer negatives on a kernel backend: fp32/fp64 rows (unit rows for
    cosine), the pool kept as the same tensor as positive when it is one."""
    dtype = anchor.dtype
    same = pool is positive
    a, p, c = anchor, positive, pool
    if dtype in (torch.float16, torch.bfloat16):
        a, p = a.float(), p.float()
        c = p if same else c.float()
    if metric == "cosine":
        a, p = unit_rows(a), unit_rows(p)
        c = p if same else unit_rows(c)
    need_grad = torch.is_grad_enabled() and (a.requires_grad or p.requires_grad or c.requires_grad)
    loss = indexed_candidate_softmax(a, p, c, idx, valid, temperature, _METRIC_CODE[metric], need_grad, kind)[0]
    return loss.to(dtype)


def _bool_mask(mask: Tensor, B: int, K: int, op: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: negative_mask must be a bool tensor of shape ({B}, {K})")
    if tuple(mask.shape) != (B, K):
        raise ValueError(f"{op}: negative_mask must have shape ({B}, {K}), got {tuple(mask.shape)}")
    return mask


# -- negative_learning ----------------------------------------------------------------------------

@torch.library.custom_op("xlt_fast::negative_learning", mutates_args=())
def negative_learning_op(logits: Tensor, weights: Tensor, need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``mean_i sum_k w_ik * -log(1 - softmax(z_i)_k)`` and its gradient w.r.t. the logits."""
    if backend == "triton":
        from xlt_fast.kernels.contrastive_rows import negative_learning as kernel

        return kernel(logits, weights, need_grad)
    return _backend.extension().negative_learning(logits, weights, need_grad)


@negative_learning_op.register_fake
def _(logits, weights, need_grad, backend):
    return logits.new_empty(()), _grad_or_empty(need_grad, logits, logits.shape)


_register_precomputed_grad(negative_learning_op, 4)


def negative_learning(logits: Tensor, complementary_labels: Tensor, *, check_finite: bool = True,
                      backend: _backend.Backend = "auto") -> Tensor:
    """Negative learning (seed 004 eq. 1): ``mean_i sum_k ybar_ik * -log(1 - p_ik)``, p = softmax(logits).

    ``complementary_labels``: ``(B,)`` class indices in [0, C) (one complementary label per sample,
    e.g. argmin of the prediction for low-confidence samples, eq. 4), or ``(B, C)`` bool/float
    non-negative weights (e.g. every class but the argmax for confident samples). Computed as
    logsumexp(z) - logsumexp_{j != k}(z), the sum without the argmax taken relative to the second
    largest logit: finite and exact to fp32 rounding for any logit gap (e.g. 60.04 at gap 120).
    """
    op = "negative_learning"
    V.floating(logits, "logits", op)
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"{op}: logits must have shape (B, C) with B >= 1 and C >= 2 classes, "
                         f"got {tuple(logits.shape)}")
    B, C = logits.shape
    y = complementary_labels
    if not isinstance(y, Tensor):
        raise TypeError(f"{op}: complementary_labels must be a tensor of shape ({B},) or ({B}, {C})")
    checks = V.Checks(op, check_finite)
    checks.finite("logits", logits)
    if y.dim() == 1 and not y.dtype.is_floating_point and y.dtype != torch.bool:
        if tuple(y.shape) != (B,):
            raise ValueError(f"{op}: complementary_labels must have shape ({B},), got {tuple(y.shape)}")
        y = y.to(device=logits.device, dtype=torch.int64)
        checks.add(((y < 0) | (y >= C)).any(), f"complementary_labels must lie in [0, {C}) (number of classes)")
        checks.run()
        weights = torch.nn.functional.one_hot(y, C).to(logits.dtype)
    elif y.dim() == 2:
        if tuple(y.shape) != (B, C):
            raise ValueError(f"{op}: complementary_labels weights must have shape ({B}, {C}), got {tuple(y.shape)}")
        weights = y.to(device=logits.device, dtype=logits.dtype)
        checks.add(~((weights >= 0) & torch.isfinite(weights)).all(),
                   "complementary_labels weights must be finite and >= 0")
        checks.run()
    else:
        raise ValueError(f"{op}: complementary_labels must be integer ({B},) or weights ({B}, {C}), "
                         f"got {y.dtype} {tuple(y.shape)}")
    kind = _backend.resolve(backend, logits.device, op, gpu_default="triton", available=_KERNELS)
    if kind == "reference":
        return ref.negative_learning(logits, weights)
    if kind == "triton" and C > MAX_TRITON_CLASSES:
        raise ValueError(f"{op}: backend='triton' handles up to {MAX_TRITON_CLASSES} classes, got {C}")
    dtype = logits.dtype
    z = logits.float() if dtype in (torch.float16, torch.bfloat16) else logits
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return negative_learning_op(z, weights.to(z.dtype), need_grad, kind)[0].to(dtype)
