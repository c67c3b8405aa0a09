"""Argument checks shared by the selection functions: one message per bad value."""

from __future__ import annotations

import operator

import torch

from .keys import KEY_INFO


def check_float(x: torch.Tensor, name: str) -> None:
    """Raise TypeError unless ``x`` is a tensor of a floating dtype the kernels rank (KEY_INFO)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in KEY_INFO:
        raise TypeError(f"{name} must be a floating tensor (float32/64/16, bfloat16), got {x.dtype}")


def check_k(k: int, d: int, what: str = "") -> int:
    """``k`` as an int; TypeError unless it is an integer, ValueError unless 0 <= k <= d."""
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0{what}, got k={k}")
    if k > d:
        raise ValueError(f"k={k} exceeds the number of entries d={d}{what}")
    return k
