"""Input validation shared by every op: errors name the argument and what was expected."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def floating(t: Tensor, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float32/float64/float16/bfloat16), got {t.dtype}")


def finite(t: Tensor, name: str, op: str) -> None:
    """Reject NaN/inf. Skipped while tracing (torch.compile / fake tensors): the check needs data."""
    if _tracing(t):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains NaN or inf")


def _tracing(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)  # dynamo cannot trace is_fake


def points(t: Tensor, name: str, op: str) -> Tensor:
    """Accept ``(n, d)`` or ``(B, n, d)``; return the batched ``(B, n, d)`` view."""
    floating(t, name, op)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape (n, d) or (B, n, d), got {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{op}: {name} must have a non-empty feature dimension d, got {tuple(t.shape)}")
    return t


def same_dtype_device(op: str, **tensors: Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {k} has dtype {t.dtype} but {k0} has {t0.dtype}; they must match")
        if t.device != t0.device:
            raise ValueError(f"{op}: {k} is on {t.device} but {k0} is on {t0.device}; they must match")


def point_mask(mask: Optional[Tensor], name: str, shape: tuple[int, int], device: torch.device,
               op: str) -> Optional[Tensor]:
    """A boolean ``(B, n)`` mask (True = real point), or ``(n,)`` for an unbatched input."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor of shape {shape}, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (B, n), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the points are on {device}")
    return mask


def positive(value: float, name: str, op: str) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Python float, got a tensor")
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def choice(value: str, name: str, options: tuple[str, ...], op: str) -> str:
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value
