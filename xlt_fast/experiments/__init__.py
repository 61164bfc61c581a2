"""Each paper's key experiment: a grid of trainer configs and the claims it checks
(``run(out_dir, quick) -> list[Claim]`` writing ``claims.json``, ``claims.md`` and plots)."""
from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = ("iwda", "wordot", "wca", "realnvp-sim", "realnvp", "conlst")


def get(name: str) -> ModuleType:
    """The experiment module ``xlt_fast.experiments.<name>``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"xlt_fast.experiments.{name.replace('-', '_')}")
