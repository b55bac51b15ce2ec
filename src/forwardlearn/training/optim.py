"""The device a run uses and the optimizer it builds by name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, **kw: Any) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9 unless given), ``adam`` or ``adamw`` by name."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        kw.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kw)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


__all__ = ["OPTIMIZERS", "make_optimizer", "resolve_device"]
