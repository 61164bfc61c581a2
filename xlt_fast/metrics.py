"""Evaluation metrics for cross-lingual transfer.

Classification (accuracy, macro-F1), entity-level F1 with the chunking rules of CoNLL's
``conlleval`` (the default mode of seqeval; IOB1, IOB2 and BIOES tags), the conditional feature
shift of IWDA (Tan et al., "Cross-lingual transfer with class-weighted language-invariant
representations", ICLR 2022, eqs. 1-2), the total-variation prior shift, bilingual retrieval
precision at k with cosine or CSLS scores (Conneau et al., "Word translation without parallel
data", ICLR 2018) and Pearson correlation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ArrayLike = Sequence | np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of equal labels."""
    t, p = _np(y_true), _np(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"need two non-empty label arrays of one shape, got {t.shape}, {p.shape}")
    return float((t == p).mean())


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence | None = None) -> float:
    """Unweighted mean of the per-class F1 over ``labels`` (default: every label in either
    array); a class with no true and no predicted example has F1 0."""
    t, p = _np(y_true), _np(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"need two non-empty label arrays of one shape, got {t.shape}, {p.shape}")
    classes = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(labels)
    scores = []
    for c in classes:
        tp = np.sum((t == c) & (p == c))
        denom = np.sum(t == c) + np.sum(p == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is not O or B-/I-/E-/S-TYPE")
    return prefix, kind


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive) of one tag sequence, by conlleval's rules.

    A chunk ends before a B/S tag, after an E/S tag, on O, or when the type changes; it starts
    on B/S, on a type change, or on I/E after O, E or S. This reads IOB1, IOB2 and BIOES alike.
    """
    entities = []
    prev_tag, prev_type, start = "O", "", None
    for i, full in enumerate(list(tags) + ["O"]):
        tag, kind = _split_tag(full)
        ends = (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
                or (prev_tag != "O" and prev_type != kind))
        if ends and start is not None:
            entities.append((prev_type, start, i - 1))
            start = None
        starts = (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
                  or (tag != "O" and prev_type != kind))
        if starts:
            start = i
        prev_tag, prev_type = tag, kind
    return entities


def entity_f1(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> float:
    """Micro F1 over exactly matching entities (type and span) of tagged sentences."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true sentences but {len(y_pred)} predicted")
    gold, pred = set(), set()
    for s, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s}: {len(t)} true tags but {len(p)} predicted")
        gold.update((s, *e) for e in get_entities(t))
        pred.update((s, *e) for e in get_entities(p))
    tp = len(gold & pred)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(gold)
    return 2 * precision * recall / (precision + recall)


def conditional_feature_shift(source: ArrayLike, source_labels: ArrayLike, target: ArrayLike,
                              target_labels: ArrayLike) -> float:
    """IWDA eqs. 1-2: mean over classes of the l1 distance between the class-conditional means
    of source and target features ``[N, d]``; classes absent from either side are skipped."""
    zs, ys = torch.as_tensor(_np(source), dtype=torch.float64), _np(source_labels)
    zt, yt = torch.as_tensor(_np(target), dtype=torch.float64), _np(target_labels)
    if zs.ndim != 2 or zt.ndim != 2 or zs.shape[1] != zt.shape[1]:
        raise ValueError(f"features must be [N, d] with one d, got {tuple(zs.shape)}, {tuple(zt.shape)}")
    if len(ys) != len(zs) or len(yt) != len(zt):
        raise ValueError("one label per feature row is needed")
    shared = np.intersect1d(ys, yt)
    if shared.size == 0:
        raise ValueError("no class occurs in both the source and the target labels")
    dists = [(zs[torch.from_numpy(ys == c)].mean(0) - zt[torch.from_numpy(yt == c)].mean(0)).abs().sum()
             for c in shared]
    return float(torch.stack(dists).mean())


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """Total-variation distance ``0.5 * sum |p - q|`` between two distributions."""
    p, q = _np(p).astype(np.float64), _np(q).astype(np.float64)
    if p.shape != q.shape:
        raise ValueError(f"distributions of different shapes: {p.shape} vs {q.shape}")
    return float(0.5 * np.abs(p - q).sum())


def prior_correction(target_prior: ArrayLike, source_prior: ArrayLike, estimated_prior: ArrayLike) -> float:
    """Percent prior-shift correction of IWDA (seed 000, Sec. 4.2):
    ``100 [TV(p_T, p_S) - TV(p_T, p^_T)] / TV(p_T, p_S)`` with ``p^_T = p_S * w`` the estimated
    target prior; 100 is a perfect estimate, 0 no better than assuming no shift, below 0 worse.
    NaN when there is no shift (``TV(p_T, p_S) = 0``)."""
    shift = total_variation(target_prior, source_prior)
    if shift == 0:
        return float("nan")
    return float(100 * (shift - total_variation(target_prior, estimated_prior)) / shift)


def prior_shift(source_labels: ArrayLike, target_labels: ArrayLike, num_classes: int) -> float:
    """Total-variation distance between the class frequencies of two label arrays."""
    ps = np.bincount(_np(source_labels).astype(np.int64), minlength=num_classes)
    pt = np.bincount(_np(target_labels).astype(np.int64), minlength=num_classes)
    return total_variation(ps / ps.sum(), pt / pt.sum())


SIMILARITIES = ("cosine", "euclidean")


def _checked_pair(queries: ArrayLike, keys: ArrayLike, similarity: str = "cosine",
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as checked ``dtype`` rows (unit rows for cosine)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    x = torch.as_tensor(_np(queries), dtype=dtype)
    y = torch.as_tensor(_np(keys), dtype=dtype)
    for name, t in (("queries", x), ("keys", y)):
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [N, d] array, got shape {tuple(t.shape)}")
        bad = (~torch.isfinite(t).all(1)).nonzero().flatten()
        if bad.numel():  # one NaN row would shift the CSLS means of every other row
            raise ValueError(f"{name} rows {bad[:5].tolist()} contain NaN or inf")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"queries and keys must have the same d, got {x.shape[1]} and {y.shape[1]}")
    if similarity == "euclidean":
        return x, y
    return torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)


def _similarity(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """``[A, B]`` cosines of unit rows, or negative Euclidean distances."""
    return a @ b.T if similarity == "cosine" else -torch.cdist(a, b)


def retrieval_scores(queries: ArrayLike, keys: ArrayLike, method: str = "cosine",
                     csls_k: int = 10) -> torch.Tensor:
    """``[Q, K]`` similarity of every query to every key: cosine, or CSLS
    ``2 cos(x, y) - r_K(x) - r_Q(y)`` with ``r`` the mean cosine to the ``csls_k`` nearest
    neighbours in the other set (the whole matrix: :func:`retrieval_topk` for large sets)."""
    x, y = _checked_pair(queries, keys)
    cos = x @ y.T
    if method == "cosine":
        return cos
    if method != "csls":
        raise ValueError(f"unknown method {method!r}; expected 'cosine' or 'csls'")
    if not 1 <= csls_k <= min(cos.shape):
        raise ValueError(f"csls_k={csls_k} must be in 1..{min(cos.shape)}")
    r_query = cos.topk(csls_k, dim=1).values.mean(1)
    r_key = cos.topk(csls_k, dim=0).values.mean(0)
    return 2 * cos - r_query[:, None] - r_key[None, :]


def _mean_topk(a: torch.Tensor, b: torch.Tensor, k: int, budget: int, similarity: str) -> torch.Tensor:
    """Per row of ``a``, the mean of its ``k`` largest similarities to the rows of ``b`` (blocks of
    at most ``budget`` similarities)."""
    step = max(1, budget // len(b))
    return torch.cat([_similarity(a[i:i + step], b, similarity).topk(k, dim=1).values.mean(1)
                      for i in range(0, len(a), step)])


def _best_keys(x: torch.Tensor, y: torch.Tensor, k: int, similarity: str, budget: int,
               r_x: torch.Tensor | None, r_y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys of every query, blockwise; CSLS when the neighbourhood means are given."""
    scores, indices = [], []
    step = max(1, budget // len(y))
    for i in range(0, len(x), step):
        block = _similarity(x[i:i + step], y, similarity)
        if r_x is not None:
            block = 2 * block - r_x[i:i + step, None] - r_y[None, :]
        top = block.topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)


def _csls_k(csls_k: int, x: torch.Tensor, y: torch.Tensor) -> int:
    if not 1 <= csls_k <= min(len(x), len(y)):
        raise ValueError(f"csls_k={csls_k} must be in 1..{min(len(x), len(y))} (the smaller set's size)")
    return csls_k


def retrieval_topk(queries: ArrayLike, keys: ArrayLike, k: int = 1, method: str = "cosine", csls_k: int = 10,
                   budget: int = 1 << 24, similarity: str = "cosine",
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, indices)`` ``[Q, k]`` of each query's ``k`` best keys by similarity (``cosine``,
    or ``euclidean``: the negative distance) or by CSLS on it (``method="csls"``), computed in
    blocks of at most ``budget`` similarities (128 MB in float64), so no ``[Q, K]`` matrix is ever
    held: memory O((Q + K) d + budget + Q k) for 30k x 30k pools."""
    x, y = _checked_pair(queries, keys, similarity, dtype)
    if method not in ("cosine", "csls"):
        raise ValueError(f"unknown method {method!r}; expected 'cosine' or 'csls'")
    if not 1 <= k <= len(y):
        raise ValueError(f"k={k} must be in 1..{len(y)} (the number of keys)")
    r_x = r_y = None
    if method == "csls":
        c = _csls_k(csls_k, x, y)
        r_x, r_y = _mean_topk(x, y, c, budget, similarity), _mean_topk(y, x, c, budget, similarity)
    return _best_keys(x, y, k, similarity, budget, r_x, r_y)


def _mutual_pairs(x: torch.Tensor, y: torch.Tensor, n: int, csls_k: int, similarity: str,
                  budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`mutual_csls_pairs` on rows already checked (and unit for cosine)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    c = _csls_k(csls_k, x, y)
    r_x, r_y = _mean_topk(x, y, c, budget, similarity), _mean_topk(y, x, c, budget, similarity)
    score, fwd = (t[:, 0] for t in _best_keys(x, y, 1, similarity, budget, r_x, r_y))
    back = _best_keys(y, x, 1, similarity, budget, r_y, r_x)[1][:, 0]
    src = (back[fwd] == torch.arange(len(x))).nonzero().flatten()
    src = src[score[src].argsort(descending=True)[:n]]
    return src, fwd[src], score[src]


def mutual_csls_pairs(source: ArrayLike, target: ArrayLike, n: int, csls_k: int = 10, similarity: str = "cosine",
                      budget: int = 1 << 24, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` most confident translation pairs induced by CSLS (Conneau et al. 2018; seed 002
    Sec. 4.2): ``(source index, target index, CSLS score)`` of the mutual nearest neighbours
    (i's best target is j and j's best source is i), the ``n`` highest scores first. Blockwise
    (four passes over ``S x T`` similarities, none kept): memory O((S + T) d + budget)."""
    x, y = _checked_pair(source, target, similarity, dtype)
    return _mutual_pairs(x, y, n, csls_k, similarity, budget)


def semantic_criterion(source: ArrayLike, target: ArrayLike, n: int = 30000, csls_k: int = 10,
                       similarity: str = "cosine") -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """The unsupervised semantic criterion of Lample et al. (2018), as seed 002 uses it (Sec. 4.2):
    the mean similarity (cosine, or negative distance) of the ``n`` most confident mutual-CSLS
    translation pairs between the mapped source pool and the target pool; higher is better.
    Returns it and the pairs ``(source indices, target indices)``."""
    x, y = _checked_pair(source, target, similarity, torch.float32)
    i, j, _ = _mutual_pairs(x, y, n, csls_k, similarity, 1 << 24)
    sim = (x[i] * y[j]).sum(1) if similarity == "cosine" else -(x[i] - y[j]).norm(dim=1)
    return float(sim.double().mean()), (i, j)


def structural_criterion(source: ArrayLike, target: ArrayLike) -> float:
    """Singular-value gap of paired matrices (Dubossarsky et al. 2020; seed 002 Sec. 4.2):
    ``sum_i (log s_i(X) - log s_i(Y))^2`` over the ordered singular values of the ``[n, d]``
    source and target rows of induced pairs; lower is better (0 for isometric sets)."""
    x, y = (torch.as_tensor(_np(a), dtype=torch.float64) for a in (source, target))
    if x.shape != y.shape or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"structural_criterion: need two [n, d] arrays of one shape with n >= 2, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    sx, sy = torch.linalg.svdvals(x), torch.linalg.svdvals(y)
    tiny = 1e-12 * max(float(sx[0]), float(sy[0]), 1e-300)
    return float((sx.clamp_min(tiny).log() - sy.clamp_min(tiny).log()).square().sum())


def retrieval_precision_at_k(queries: ArrayLike, keys: ArrayLike, k: int = 1,
                             method: str = "cosine", csls_k: int = 10,
                             gold: ArrayLike | None = None) -> float:
    """Fraction of queries whose gold key (default: the key of the same index) is among the
    ``k`` highest-scoring keys (blockwise, :func:`retrieval_topk`)."""
    n_q, n_k = len(_np(queries)), len(_np(keys))
    gold_idx = torch.arange(n_q) if gold is None else torch.as_tensor(_np(gold))
    if gold_idx.shape != (n_q,) or not 1 <= k <= n_k:
        raise ValueError("need one gold key index per query and 1 <= k <= number of keys")
    if gold_idx.dtype.is_floating_point or ((gold_idx < 0) | (gold_idx >= n_k)).any():
        raise ValueError(f"gold must hold integer key indices in [0, {n_k})")
    top = retrieval_topk(queries, keys, k, method, csls_k)[1]
    return float((top == gold_idx[:, None]).any(1).double().mean())


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation coefficient of two 1-D samples."""
    a, b = _np(x).astype(np.float64).ravel(), _np(y).astype(np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError("need two samples of one size >= 2")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        raise ValueError("Pearson correlation is undefined for a constant sample")
    return float((a * b).sum() / denom)
