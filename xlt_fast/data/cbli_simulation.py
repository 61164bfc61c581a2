"""The synthetic contextual-BLI simulation of seed 002 (Zhao & Eger, Sec. 4.3; spec realnvp.md 3).

Source "word occurrences" are drawn from a two-dimensional Gaussian mixture: ``words`` (20) words,
word i has a mean ``mu_i ~ U[-5, 5]^2``; train occurrences ``~ N(mu_i, I)``, validation and test
occurrences ``~ N(mu_i + eps, I)`` (eps added to every coordinate), ``k`` occurrences per word and
split. Targets are exact images of the sources:

* ``t = 1`` (isomorphic): ``y = Q x`` with Q a random orthogonal matrix;
* ``t > 1``: the paper "combines translation with rotation to perform non-linear transformation"
  without saying how t parametrises it. Our choice: a swirl plus a translation,
  ``y = R(theta_0 + (t - 1) kappa |x|) x + b`` (``theta_0 ~ U[0, 2 pi)``, ``b ~ U[-5, 5]^2``,
  ``kappa = pi / 40`` per unit of radius): each point is rotated by an angle that grows with its
  radius, so the map is a smooth bijection of the plane (a function of x, so it can be learned)
  that preserves no distances between points at different radii for t > 1 (at t = 5 the angle
  varies by about 0.9 pi over the points). The spec's first idea, a rigid motion per group of
  words, is not a function of x where words of different groups overlap (they do, at unit
  variance in [-5, 5]^2), so no map could retrieve an occurrence there.

The words' means and the map depend on ``seed`` only; the occurrences on ``(seed, k)`` and, for a
test set, on its eps: so for one seed, models trained at different k see the same words and map.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch


@dataclasses.dataclass
class Split:
    """Paired occurrences: ``x[i]`` (source) translates to ``y[i]`` (target); ``word[i]`` its word."""

    x: torch.Tensor
    y: torch.Tensor
    word: torch.Tensor


@dataclasses.dataclass
class Simulation:
    train: Split
    tests: dict[float, Split]      # one test set per eps
    validation: Split              # at eps = 0 (the training domain)


KAPPA = np.pi / 40  # extra rotation per unit radius and per degree of non-isomorphism


def transform(x: np.ndarray, t: int, theta: float, shift: np.ndarray, reflect: np.ndarray) -> np.ndarray:
    """Target points of source points ``x (n, 2)``: ``t = 1`` the orthogonal map ``reflect`` (Q);
    ``t > 1`` the swirl ``R(theta + (t - 1) kappa |x|) x + shift``."""
    if t == 1:
        return x @ reflect.T
    angle = theta + (t - 1) * KAPPA * np.linalg.norm(x, axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], 1) + shift


def simulate(k: int, t: int, eps: Sequence[float], words: int = 20, seed: int = 0) -> Simulation:
    """One simulated language pair: ``k`` occurrences per word in the train split, the validation
    split and one test split per value of ``eps``; isomorphism degree ``t`` (1 = a rotation)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"simulate: k (occurrences per word) must be an int >= 1, got {k!r}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"simulate: t (degree of isomorphism) must be an int >= 1, got {t!r}")
    world = np.random.default_rng([seed, 0])
    mu = world.uniform(-5, 5, (words, 2))
    q, r = np.linalg.qr(world.standard_normal((2, 2)))
    q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix (a reflection half the time)
    theta, shift = world.uniform(0, 2 * np.pi), world.uniform(-5, 5, 2)

    def split(offset: float, *stream: int) -> Split:
        rng = np.random.default_rng([seed, k, *stream])
        word = np.repeat(np.arange(words), k)
        x = mu[word] + offset + rng.standard_normal((len(word), 2))
        y = transform(x, t, theta, shift, q)
        return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), torch.tensor(word))

    tests = {float(e): split(float(e), 2, int(round(float(e) * 1000))) for e in eps}
    return Simulation(split(0.0, 0), tests, split(0.0, 1))
