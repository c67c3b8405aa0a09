"""Small helpers shared by the task builders: option validation, dtypes, train/test splits."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as int, or raise ValueError naming the option and the bad value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    strict_max: bool = False,
) -> float:
    """Return ``value`` as float, or raise ValueError naming the option and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value < minimum or (strict_min and value == minimum)):
        op = ">" if strict_min else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (strict_max and value == maximum)):
        op = "<" if strict_max else "<="
        raise ValueError(f"{name} must be {op} {maximum}, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """A held-out fraction in [0, 1)."""
    return check_float(name, value, minimum=0.0, maximum=1.0, strict_max=True)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        return dtype
    return _DTYPES[check_choice("dtype", dtype, list(_DTYPES))]


def n_test_rows(n: int, test_fraction: float) -> int:
    """Number of held-out rows for a fraction (0 when the fraction is 0, else at least 1)."""
    if test_fraction == 0.0:
        return 0
    n_test = int(round(test_fraction * n))
    n_test = min(max(n_test, 1), n - 1)
    return n_test


def split_indices(
    n: int, test_fraction: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test row indices (sorted). Stratified by ``stratify`` when given."""
    idx = np.arange(n)
    n_test = n_test_rows(n, test_fraction)
    if n_test == 0:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split

    try:
        tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    except ValueError:
        # Stratification impossible (e.g. a class with a single row): fall back to random.
        tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=None)
    return np.sort(tr), np.sort(te)


def subsample(n: int, m: int | None, seed: int, name: str) -> np.ndarray:
    """Sorted indices of ``m`` of ``n`` rows drawn without replacement (all rows when ``m`` is None)."""
    if m is None:
        return np.arange(n)
    m = check_int(name, m, minimum=1)
    if m > n:
        raise ValueError(f"{name}={m} exceeds the {n} rows available")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=m, replace=False))


def count_params(params: dict[str, torch.Tensor]) -> int:
    return int(sum(p.numel() for p in params.values()))
