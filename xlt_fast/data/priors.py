"""Class priors for label-shift experiments (seed 000, Sec. 2.2 and 4.2): named families of target
priors relative to a source prior, written as short strings so that configs and grids can name them.

* ``source``: the source prior itself (no shift);
* ``peaked:<class>:<t>``: ``(1 - t) pi_S + t e_c``, mass ``t`` moved onto one class (name or index),
  so ``TV(pi_S, pi_T) = t (1 - pi_S[c])``;
* ``dirichlet:<alpha>:<seed>``: a draw from ``Dirichlet(alpha * 1)``;
* ``k`` numbers: the prior itself (non-negative, summing to 1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def peaked_prior(base: np.ndarray, c: int, t: float) -> np.ndarray:
    """``(1 - t) base + t e_c``."""
    out = (1 - t) * np.asarray(base, dtype=np.float64)
    out[c] += t
    return out


def dirichlet_prior(k: int, alpha: float, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, k]).dirichlet(np.full(k, alpha))


def _class_index(token: str, label_names: Sequence[str]) -> int:
    if token in label_names:
        return list(label_names).index(token)
    if token.isdigit() and int(token) < len(label_names):
        return int(token)
    raise ValueError(f"unknown class {token!r}; expected one of {list(label_names)} or an index")


def resolve_priors(spec: Sequence[str], base: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    """The prior a spec names (module docstring); ``ValueError`` saying what is wrong otherwise."""
    k = len(label_names)
    spec = [str(s) for s in spec]
    if len(spec) == 1:
        kind, _, rest = spec[0].partition(":")
        if kind == "source" and not rest:
            return np.asarray(base, dtype=np.float64).copy()
        if kind == "peaked":
            parts = rest.split(":")
            if len(parts) != 2:
                raise ValueError(f"expected peaked:<class>:<t>, got {spec[0]!r}")
            t = float(parts[1])
            if not 0 <= t <= 1:
                raise ValueError(f"peaked prior: t must be in [0, 1], got {t}")
            return peaked_prior(base, _class_index(parts[0], label_names), t)
        if kind == "dirichlet":
            parts = rest.split(":")
            if len(parts) != 2 or float(parts[0]) <= 0:
                raise ValueError(f"expected dirichlet:<alpha > 0>:<seed>, got {spec[0]!r}")
            return dirichlet_prior(k, float(parts[0]), int(parts[1]))
    try:
        values = np.asarray([float(s) for s in spec], dtype=np.float64)
    except ValueError:
        raise ValueError(f"unknown prior {spec}; expected source, peaked:<class>:<t>, dirichlet:<alpha>:<seed> "
                         f"or {k} numbers") from None
    if values.shape != (k,) or (values < 0).any() or not np.isclose(values.sum(), 1, atol=1e-6):
        raise ValueError(f"a prior needs {k} non-negative numbers summing to 1, got {spec}")
    return values / values.sum()


def prior_name(spec: Sequence[str]) -> str:
    """A short label of a prior spec for tables and directory names."""
    return "_".join(str(s) for s in spec).replace(":", "-").replace("/", "-")
