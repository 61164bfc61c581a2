"""Bundled trainers, one module per method: ``Config`` (a dataclass), ``build``, ``phases``,
``evaluate``, ``summary`` and ``train(cfg)``; the loop machinery is :mod:`xlt_fast.training`."""
from __future__ import annotations

import importlib
from types import ModuleType

TRAINERS = ("iwda", "wordot", "wca", "realnvp", "conlst")


def get(name: str) -> ModuleType:
    """The trainer module ``xlt_fast.trainers.<name>``."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; available: {', '.join(TRAINERS)}")
    return importlib.import_module(f"xlt_fast.trainers.{name}")
