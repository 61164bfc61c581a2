"""Checkpoints: one complete directory per step, written atomically, loaded strictly.

``checkpoints/step-000120/`` holds ``state.pt`` (modules, optimizers, schedulers, generators),
``rng-<rank>.pt`` (each rank's global RNG states: tensors and plain numbers, so
``torch.load(weights_only=True)`` reads them) and ``progress.json`` (step, phase, stream positions,
seed, world size, config hash, versions). The directory is filled as ``step-000120.tmp/`` and
renamed when complete; the newest directory with a ``progress.json`` is the latest checkpoint, so
a half-written one is never used. Only rank 0 writes (the other ranks' RNG states are gathered).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlt_fast.training import atomic

_NAME = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() and (p / "progress.json").is_file()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch CPU and CUDA, numpy, python) as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                        "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, payload: dict[str, Any], rng_states: list[dict[str, Any]],
         progress: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically (rank 0); then keep only the newest ``keep`` (>= 1)."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic.torch_save(tmp / "state.pt", payload)
    for rank, state in enumerate(rng_states):
        atomic.torch_save(tmp / f"rng-{rank}.pt", state)
    atomic.write_json(tmp / "progress.json", progress)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover ``.tmp`` directories."""
    found = complete_checkpoints(root)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    if root.is_dir():
        for tmp in root.glob("step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def read_progress(path: Path) -> dict[str, Any]:
    return json.loads((path / "progress.json").read_text())


def load(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(payload, rng_state)`` of checkpoint ``path`` for ``rank`` (tensors only: weights_only), on
    the CPU: ``load_state_dict`` moves module and optimizer tensors to their device, and generator
    states must stay CPU byte tensors."""
    payload = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / f"rng-{rank}.pt", map_location="cpu", weights_only=True)
    return payload, rng
