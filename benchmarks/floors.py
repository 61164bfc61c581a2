"""Floors: the time of an op's unavoidable work alone (its GEMMs at the case's shapes), timed in
the same run as the case, so that each ratio can be read against the ceiling it can reach.

A case gets its floor from, in this order:

* ``Case.floor``: a zero-argument callable set by the bench module that builds the case (with
  ``Case.floor_label`` if the floor is not GEMMs, e.g. ``"floor (exp/log only)"`` for Sinkhorn);
* this registry: ``@register("op name")`` on a function ``(case, device) -> callable or None``;
  a bench module may register its own ops' floors the same way (it runs when the module is imported).

The harness prints the floor as a row (its ratio is the baseline's time over the floor's: the
ceiling of any implementation's ratio) and each of our backends' ``% of floor`` (floor time / our
time x 100: 100 % is the bound).

Floors here: ``pairwise_distance`` (the one batched GEMM x y^T), ``supcon`` (the similarity GEMM
forward, one GEMM for the gradient: the two terms of a symmetric loss add before it),
``info_nce`` (a b^T forward, G b and G^T a backward), ``negative_contrastive`` and ``CoNL step``
(the batched anchor-negative dot products forward and the two backward contractions, on
pre-gathered negatives: the gather and the pool gradient's scatter are not GEMMs).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch

FloorFactory = Callable[[Any, torch.device], Optional[Callable[[], Any]]]
FLOORS: dict[str, FloorFactory] = {}


def register(op: str) -> Callable[[FloorFactory], FloorFactory]:
    """Decorator: ``factory(case, device)`` returns the floor callable of a case of ``op`` (or None)."""
    def deco(factory: FloorFactory) -> FloorFactory:
        FLOORS[op] = factory
        return factory

    return deco


def floor_for(case, device: torch.device) -> Optional[Callable[[], Any]]:
    """The case's floor callable: ``case.floor`` if set, else the registry's, else None."""
    if getattr(case, "floor", None) is not None:
        return case.floor
    factory = FLOORS.get(case.op)
    return factory(case, device) if factory is not None else None


def shape_ints(shape: str) -> dict[str, int]:
    """``"B=8,n=128,d=768"`` -> ``{"B": 8, "n": 128, "d": 768}`` (entries that are not ``name=int`` skipped)."""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?=,|$)", shape)}


def _randn(*shape: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


@register("pairwise_distance")
def _pairwise(case, device):
    s = shape_ints(case.shape)
    x = _randn(s["B"], s["n"], s["d"], device=device, seed=0)
    yt = _randn(s["B"], s["m"], s["d"], device=device, seed=1).transpose(1, 2)
    return lambda: torch.bmm(x, yt)


@register("supcon")
def _supcon(case, device):
    s = shape_ints(case.shape)
    f = _randn(s["B"], s["d"], device=device, seed=0)
    g = _randn(s["B"], s["B"], device=device, seed=1)
    return lambda: (f @ f.T, g @ f)


@register("info_nce")
def _info_nce(case, device):
    s = shape_ints(case.shape)
    a, b = _randn(s["B"], s["d"], device=device, seed=0), _randn(s["B"], s["d"], device=device, seed=1)
    g = _randn(s["B"], s["B"], device=device, seed=2)
    return lambda: (a @ b.T, g @ b, g.T @ a)


def _negatives_floor(B: int, K: int, d: int, device: torch.device):
    a = _randn(B, 1, d, device=device, seed=0)
    neg = _randn(B, K, d, device=device, seed=1)
    g = _randn(B, 1, K, device=device, seed=2)
    return lambda: (torch.bmm(a, neg.transpose(1, 2)), torch.bmm(g, neg), torch.bmm(g.transpose(1, 2), a))


@register("negative_contrastive")
def _negative_contrastive(case, device):
    s = shape_ints(case.shape)
    return _negatives_floor(s["B"], s["K"], s["d"], device)


@register("CoNL step")
def _conl_step(case, device):
    s = shape_ints(case.shape)
    return _negatives_floor(s["B"], s["K"], s["d"], device)
