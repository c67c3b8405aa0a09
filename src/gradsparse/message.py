"""The unit that goes on the wire: a sparse view of one tensor.

A :class:`SparseMessage` holds the support (flat indices into a tensor of ``shape``,
sorted ascending, unique) and the values at those indices. Random-k messages may carry
``seed`` instead of needing their indices transmitted: the receiver regenerates the
support from ``(seed, step, worker)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch


@dataclass
class SparseMessage:
    """Sparse representation of a dense tensor of ``shape``.

    indices: int64, 1-D, flat (row-major) positions, strictly increasing.
    values:  1-D, same length as ``indices``; its dtype is the wire value dtype.
    seed:    for random-k, the generator seed from which the receiver rebuilds ``indices``.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("SparseMessage indices and values must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise ValueError(
                f"SparseMessage has {self.indices.numel()} indices but {self.values.numel()} values"
            )

    @property
    def numel(self) -> int:
        """Number of entries of the dense tensor (d)."""
        return prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of transmitted entries (k)."""
        return int(self.indices.numel())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        if self.nnz:
            out[self.indices] = self.values.to(out.dtype)
        return out.view(self.shape)

    @staticmethod
    def from_dense(x: torch.Tensor) -> "SparseMessage":
        """Support = the nonzero entries of ``x``."""
        flat = x.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
        return SparseMessage(tuple(x.shape), idx, flat[idx].clone())
