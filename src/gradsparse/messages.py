"""The one message type: a ragged batch of sparse rows (:class:`SparseBatch`).

Every compressor returns a :class:`SparseBatch`, whatever it keeps: a fixed count per row
(top-k, random-k), a varying count (hard-threshold, possibly 0), or everything (identity, the
``dense`` flag). Error feedback, aggregation, the wire format (:mod:`gradsparse.wire`) and the
byte accounting all work on it, so nothing above the compressor branches on message kinds.

Layout (CSR-like, one row per worker or per server message)::

    d        length of every row (the dense vector each row is a sparse view of)
    offsets  int64 [n + 1]; row q holds entries offsets[q] : offsets[q + 1]
    indices  int64 [nnz]; column of each entry, unique within a row. Order within a row is
             whatever the compressor produced (``sorted_rows`` says whether it is ascending);
             the wire encoder sorts.
    values   [nnz]; the values at those columns
    seeds    int64 [n] or None; random-k rows: the receiver regenerates the row's columns from
             (seed, d, count) with :func:`gradsparse.random_support.random_k_indices`, so the wire
             carries the seed instead of indices
    dense    True when every row holds all d entries in column order (identity compressor);
             ``indices`` is then built only on request

A fixed-count batch (every row the same count k) also exposes its columns and values as
``[n, k]`` views (:meth:`rows_k`), which is what the O(n k) fast paths of error feedback and
aggregation use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseBatch"]


@dataclass
class SparseBatch:
    d: int
    offsets: torch.Tensor
    values: torch.Tensor
    _indices: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    dense: bool = False
    sorted_rows: bool = False
    #: k when every row holds exactly k entries (set by the constructors), else None
    fixed_k: int | None = None

    # ---- constructors ------------------------------------------------------------------
    @staticmethod
    def from_rows(
        indices: torch.Tensor,
        values: torch.Tensor,
        d: int,
        *,
        seeds: torch.Tensor | None = None,
        sorted_rows: bool = False,
    ) -> "SparseBatch":
        """Fixed-count rows: ``indices``/``values`` of shape ``[n, k]``."""
        if indices.dim() != 2 or indices.shape != values.shape:
            raise ValueError(
                f"indices and values must both be [n, k], got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        n, k = indices.shape
        offsets = torch.arange(0, n * k + 1, max(k, 1), dtype=torch.long, device=indices.device)
        if k == 0:
            offsets = torch.zeros(n + 1, dtype=torch.long, device=indices.device)
        return SparseBatch(
            int(d), offsets, values.reshape(-1), indices.reshape(-1), seeds, False, sorted_rows, int(k)
        )

    @staticmethod
    def from_mask(x: torch.Tensor, mask: torch.Tensor) -> "SparseBatch":
        """Rows of ``x`` ([n, d]) at the True entries of ``mask`` (columns ascending)."""
        n, d = x.shape
        flat = torch.nonzero(mask.reshape(-1)).reshape(-1)
        values = x.reshape(-1)[flat]
        counts = torch.count_nonzero(mask, dim=1) if n else torch.zeros(0, dtype=torch.long)
        offsets = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return SparseBatch(int(d), offsets, values, flat - (flat // max(d, 1)) * d, None, False, True, None)

    @staticmethod
    def from_dense(x: torch.Tensor) -> "SparseBatch":
        """Every entry of the rows of ``x`` ([n, d]) (the identity compressor's message)."""
        n, d = x.shape
        offsets = torch.arange(0, n * d + 1, max(d, 1), dtype=torch.long, device=x.device)
        if d == 0:
            offsets = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        return SparseBatch(int(d), offsets, x.reshape(-1).clone(), None, None, True, True, int(d))

    @staticmethod
    def cat(batches: list["SparseBatch"]) -> "SparseBatch":
        """Stack the rows of several batches of the same d (e.g. one-row messages of N workers)."""
        if not batches:
            raise ValueError("SparseBatch.cat needs at least one batch")
        d = batches[0].d
        if any(b.d != d for b in batches):
            raise ValueError(f"SparseBatch.cat: rows of different lengths {sorted({b.d for b in batches})}")
        dense = all(b.dense for b in batches)
        seeded = [b.seeds is not None for b in batches]
        if any(seeded) and not all(seeded):
            raise ValueError("SparseBatch.cat: cannot mix seeded (random-k) and explicit rows")
        counts = torch.cat([b.counts for b in batches])
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=offsets[1:])
        ks = {b.fixed_k for b in batches}
        return SparseBatch(
            d,
            offsets,
            torch.cat([b.values for b in batches]),
            None if dense else torch.cat([b.indices for b in batches]),
            torch.cat([b.seeds for b in batches]) if all(seeded) else None,
            dense,
            all(b.sorted_rows for b in batches),
            ks.pop() if len(ks) == 1 else None,
        )

    # ---- shape -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of rows (messages)."""
        return int(self.offsets.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def counts(self) -> torch.Tensor:
        """int64 [n]: entries kept in each row (k_q)."""
        if self.fixed_k is not None:
            return torch.full((self.n,), self.fixed_k, dtype=torch.long)
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def indices(self) -> torch.Tensor:
        """int64 [nnz]: the column of every entry (built for ``dense`` batches on request)."""
        if self._indices is None:
            self._indices = torch.arange(self.d, device=self.values.device).repeat(self.n)
        return self._indices

    def rows_k(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-count batches: (columns, values) as ``[n, k]`` views."""
        if self.fixed_k is None:
            raise ValueError("rows_k() needs a fixed-count batch (every row the same count)")
        k = self.fixed_k
        return self.indices.view(self.n, k), self.values.view(self.n, k)

    def row_ids(self) -> torch.Tensor:
        """int64 [nnz]: the row of every entry."""
        return torch.repeat_interleave(torch.arange(self.n, device=self.values.device), self.counts)

    def flat_positions(self) -> torch.Tensor:
        """int64 [nnz]: row * d + column, positions in the row-major ``[n, d]`` dense tensor."""
        return self.row_ids() * self.d + self.indices

    def row(self, q: int) -> "SparseBatch":
        """Row ``q`` as a one-row batch."""
        a, b = int(self.offsets[q]), int(self.offsets[q + 1])
        return SparseBatch(
            self.d,
            torch.tensor([0, b - a], dtype=torch.long),
            self.values[a:b],
            None if self.dense else self.indices[a:b],
            None if self.seeds is None else self.seeds[q : q + 1],
            self.dense,
            self.sorted_rows,
            b - a if self.fixed_k is not None else None,
        )

    # ---- dense views and arithmetic ------------------------------------------------------
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[n, d]`` tensor, zeros off the support."""
        dtype = dtype or self.values.dtype
        if self.dense:
            return self.values.view(self.n, self.d).to(dtype).clone()
        out = torch.zeros(self.n * self.d, dtype=dtype, device=self.values.device)
        out[self.flat_positions()] = self.values.to(dtype)
        return out.view(self.n, self.d)

    def support_mask(self) -> torch.Tensor:
        """Boolean ``[n, d]``: which entries each row keeps."""
        if self.dense:
            return torch.ones(self.n, self.d, dtype=torch.bool, device=self.values.device)
        out = torch.zeros(self.n * self.d, dtype=torch.bool, device=self.values.device)
        out[self.flat_positions()] = True
        return out.view(self.n, self.d)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Entries of ``x`` ([n, d]) at this batch's support, in this batch's entry order."""
        if self.dense:
            return x.reshape(-1).clone()
        if self.fixed_k is not None:
            return x.gather(1, self.indices.view(self.n, self.fixed_k)).reshape(-1)
        return x.reshape(-1)[self.flat_positions()]

    def scatter_(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write ``values`` ([nnz]) into ``x`` ([n, d], in place) at this batch's support."""
        if self.dense:
            x.view(-1).copy_(values)
        elif self.fixed_k is not None:
            k = self.fixed_k
            x.scatter_(1, self.indices.view(self.n, k), values.view(self.n, k).to(x.dtype))
        else:
            x.view(-1)[self.flat_positions()] = values.to(x.dtype)
        return x

    def weighted_sum(self, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_q weights_q * row_q as a dense ``[d]`` vector (the server's aggregate), written into
        ``out`` (``[d]``, the values' dtype and device) when given."""
        w = weights.to(self.values.dtype)
        if w.numel() != self.n:
            raise ValueError(f"{w.numel()} weights for {self.n} rows")
        if out is not None and (out.shape != (self.d,) or out.dtype != self.values.dtype):
            raise ValueError(f"out must be [{self.d}] of {self.values.dtype}, got {tuple(out.shape)} of {out.dtype}")
        if self.dense:
            return torch.matmul(w, self.values.view(self.n, self.d), out=out)
        if out is None:
            out = torch.zeros(self.d, dtype=self.values.dtype, device=self.values.device)
        else:
            out.zero_()
        if self.fixed_k is not None:
            contrib = (w[:, None] * self.values.view(self.n, self.fixed_k)).reshape(-1)
        else:
            contrib = torch.repeat_interleave(w, self.counts) * self.values
        return out.index_add_(0, self.indices, contrib)

    def with_values(self, values: torch.Tensor) -> "SparseBatch":
        """The same support with other values (e.g. rescaled by a step size)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values of shape {tuple(values.shape)} for a batch of {self.nnz} entries")
        return SparseBatch(
            self.d, self.offsets, values, self._indices, self.seeds, self.dense, self.sorted_rows, self.fixed_k
        )

    def __repr__(self) -> str:
        kind = "dense" if self.dense else ("seeded" if self.seeds is not None else "sparse")
        return f"SparseBatch(n={self.n}, d={self.d}, nnz={self.nnz}, {kind})"
