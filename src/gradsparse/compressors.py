"""Compressors C : R^d -> R^d (ALGORITHMS.md §1).

Every compressor works on a batch of rows ``x`` of shape ``[n, d]`` (one row per worker; an
engine with one worker per process passes ``n = 1``) and returns the compressed rows (dense
tensors with zeros off the support) together with the boolean support that goes on the wire.

Tie rule for top-k (everywhere in gradsparse): entries are ranked by ``|x_i|`` descending and,
among equal magnitudes, the LOWER index wins. NaN ranks above +inf (as in ``torch.topk``);
gradsparse does not guard against NaN gradients in the hot path (the runner stops a run whose
model becomes non-finite).

Rounding rule for a density ``rho`` (paper 003): ``k = d - floor((1 - rho) * d)``, at least 1.

Scope: ``entire`` treats the flattened model as one vector; ``layerwise`` applies the rule to
each parameter tensor separately (segment ``l`` gets ``k_l`` from ``rho * d_l``, or, when a
count ``k`` is given, ``k_l = max(1, round(k * d_l / d))``). Hard-threshold is the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels

__all__ = [
    "RowSparse",
    "topk_indices_rows",
    "Compressor",
    "Identity",
    "TopK",
    "HardThreshold",
    "RandomK",
    "k_from_density",
    "topk_mask_rows",
    "make_compressor",
    "random_k_indices",
]


def k_from_density(rho: float, d: int) -> int:
    """Paper 003's rounding rule: K = d - floor((1 - rho) d), kept >= 1 (and <= d)."""
    if not (0.0 < rho <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {rho!r}")
    if d == 0:
        return 0
    k = d - math.floor((1.0 - rho) * d)
    return int(min(max(k, 1), d))


def topk_indices_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact per-row top-k by magnitude, ties to the lower index: column indices ``[n, k]``.

    The order of the k columns within a row is unspecified (use ``.sort(dim=1)`` if needed).
    """
    n, d = x.shape
    if k < 0 or k > d:
        raise ValueError(f"top-k k = {k} must be in [0, d = {d}]")
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=x.device)
    if k == d:
        return torch.arange(d, device=x.device).expand(n, d).contiguous()
    if x.dtype == torch.float32 and x.device.type == "cpu" and kernels.has_extension():
        # compiled exact kernel (same tie rule); returns each row's k columns in ascending order
        xc = x.contiguous()
        offsets = torch.arange(0, n * d + 1, d, dtype=torch.long)
        flat = kernels.topk_indices_layerwise(xc.view(-1), offsets, torch.full((n,), k, dtype=torch.long))
        return flat.view(n, k) - offsets[:-1, None]
    mag = x.abs()
    # the k+1 largest magnitudes per row: when the k-th and (k+1)-th differ, torch.topk's first k
    # indices are exactly the top-k set; rows where they tie get the lower-index rule explicitly
    vals, idx = torch.topk(mag, k + 1, dim=1, sorted=True)
    idx = idx[:, :k].contiguous()
    tied = vals[:, k - 1] == vals[:, k]
    if bool(tied.any()):
        rows = torch.nonzero(tied).reshape(-1)
        m = mag[rows]
        thr = vals[rows, k - 1 : k]
        above = m > thr
        need = k - above.sum(dim=1, keepdim=True)
        at = m == thr
        sel = above | (at & (torch.cumsum(at, dim=1) <= need))
        idx[rows] = torch.nonzero(sel)[:, 1].reshape(-1, k)
    return idx


def topk_mask_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [n, d] mask of :func:`topk_indices_rows` (exactly min(k, d) True per row)."""
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, topk_indices_rows(x, k), True)


@dataclass
class RowSparse:
    """n compressed rows with the same number of entries each: ``indices``/``values`` ``[n, k]``.

    This is what fixed-count compressors (top-k, random-k) produce; it keeps the cost of error
    feedback and aggregation O(n k) instead of O(n d).
    """

    indices: torch.Tensor
    values: torch.Tensor
    d: int

    def dense(self) -> torch.Tensor:
        n = self.indices.shape[0]
        out = torch.zeros(n, self.d, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)

    def mask(self) -> torch.Tensor:
        n = self.indices.shape[0]
        out = torch.zeros(n, self.d, dtype=torch.bool, device=self.values.device)
        return out.scatter_(1, self.indices, True)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_q weights_q * row_q as a dense [d] vector."""
        out = torch.zeros(self.d, dtype=self.values.dtype, device=self.values.device)
        contrib = (weights.to(self.values.dtype)[:, None] * self.values).reshape(-1)
        return out.index_add_(0, self.indices.reshape(-1), contrib)


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries per row of a boolean [n, d] mask (int64).

    numpy's count_nonzero is about 10x faster than torch's bool reductions on CPU.
    """
    if mask.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.asarray(np.count_nonzero(mask.numpy(), axis=-1), dtype=np.int64))
    return torch.count_nonzero(mask, dim=-1)


def random_k_indices(seed: int, d: int, k: int) -> torch.Tensor:
    """Sorted k-of-d indices, uniform without replacement, fixed by ``seed``.

    For k <= d/16: the first k distinct values of an i.i.d. uniform sequence drawn from
    ``torch.Generator().manual_seed(seed)`` (a uniform k-subset, O(k log k) — no O(d) permutation,
    so regenerating a 0.1% support of d = 25M costs milliseconds). Otherwise
    ``torch.randperm(d)[:k]`` from the same generator. Sorted ascending. The random-k compressor
    and the wire's default regenerator (seeded messages) both call this function.
    """
    d, k = int(d), int(k)
    if not 0 <= k <= d:
        raise ValueError(f"random-k needs 0 <= k <= d, got k = {k}, d = {d}")
    if k == 0:  # nothing to draw (and no randperm of a possibly huge d)
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    if 16 * k > d:
        return torch.sort(torch.randperm(d, generator=gen)[:k]).values
    draws = torch.zeros(0, dtype=torch.int64)
    while True:
        extra = torch.randint(0, d, (k + k // 8 + 16,), generator=gen, dtype=torch.int64)
        draws = torch.cat([draws, extra])
        # one stable sort: each distinct value (ascending) with the position of its first draw
        srt, order = torch.sort(draws, stable=True)
        new_value = torch.ones(srt.numel(), dtype=torch.bool)
        torch.ne(srt[1:], srt[:-1], out=new_value[1:])
        values, first = srt[new_value], order[new_value]
        if values.numel() >= k:
            # keep the k values drawn first: those whose first draw is among the k earliest
            # (first positions are distinct, so the cut is exact); values stay ascending
            cut = torch.kthvalue(first, k).values if values.numel() > k else first.max()
            return values[first <= cut]


class Compressor:
    """Base class. Subclasses implement :meth:`mask` (the support) and may override
    :meth:`__call__` (e.g. to rescale values)."""

    name = "compressor"
    #: C(c x) = c C(x) for c > 0 (then ef and ef-scaled coincide).
    scale_invariant = True
    #: True when the receiver can rebuild the support without transmitted indices.
    seeded_support = False

    def mask(self, x: torch.Tensor, step: int = 0, workers: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    #: True when every row keeps the same number of entries and :meth:`select` is available
    fixed_count = False

    def __call__(
        self, x: torch.Tensor, step: int = 0, workers: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress rows of ``x`` ([n, d]); returns (compressed rows, support mask)."""
        if self.fixed_count:
            rs = self.select(x, step, workers)
            return rs.dense(), rs.mask()
        m = self.mask(x, step, workers)
        return torch.where(m, x, torch.zeros((), dtype=x.dtype)), m

    def select(self, x: torch.Tensor, step: int = 0, workers: torch.Tensor | None = None) -> RowSparse:
        """Fixed-count compressors: the compressed rows as (indices, values) [n, k]."""
        raise NotImplementedError(f"{self.name} keeps a varying number of entries; use __call__")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> str:
        return self.name


class Identity(Compressor):
    name = "identity"

    def mask(self, x, step=0, workers=None):
        return torch.ones_like(x, dtype=torch.bool)

    def __call__(self, x, step=0, workers=None):
        return x.clone(), torch.ones_like(x, dtype=torch.bool)


def _segments(d: int, layout: Sequence[int] | None) -> list[tuple[int, int]]:
    if layout is None:
        return [(0, d)]
    if sum(layout) != d:
        raise ValueError(f"layout sizes sum to {sum(layout)} but the vector has d = {d}")
    out, off = [], 0
    for n in layout:
        out.append((off, off + int(n)))
        off += int(n)
    return out


class _FixedCount(Compressor):
    """Compressors that keep k entries per row, k given as a count or as a density k/d."""

    fixed_count = True
    label = "top-k"

    def _set_amount(self, k: int | None, density: float | None) -> None:
        if (k is None) == (density is None):
            raise ValueError(f"{self.label} needs exactly one of k (count) or density (k/d)")
        if k is not None and (not isinstance(k, int) or k < 0):
            raise ValueError(f"{self.label} k must be a non-negative integer, got {k!r}")
        if density is not None and not (0.0 < density <= 1.0):
            raise ValueError(f"{self.label} density must be in (0, 1], got {density!r}")
        self.k, self.density = k, density

    def k_for(self, d: int) -> int:
        if self.density is not None:
            return k_from_density(self.density, d)
        if self.k > d:
            raise ValueError(f"{self.label} k = {self.k} exceeds the vector size d = {d}")
        return self.k

    def _amount(self) -> str:
        return f"k={self.k}" if self.k is not None else f"density={self.density}"


class TopK(_FixedCount):
    """Keep the k entries of largest magnitude (per row; per segment when layer-wise).

    Give exactly one of ``k`` (a count) or ``density`` (rho = k/d, paper 003's rounding).
    ``layout``: the sizes of the parameter tensors in flattening order (layer-wise scope).
    """

    name = "topk"

    def __init__(
        self,
        k: int | None = None,
        density: float | None = None,
        scope: str = "entire",
        layout: Sequence[int] | None = None,
    ) -> None:
        self._set_amount(k, density)
        if scope not in ("entire", "layerwise"):
            raise ValueError(f"scope must be 'entire' or 'layerwise', got {scope!r}")
        self.scope = scope
        self.layout = list(layout) if layout is not None else None

    def segment_ks(self, d: int) -> list[tuple[int, int, int]]:
        """[(start, stop, k_l)] for the configured scope."""
        if self.scope == "entire" or self.layout is None:
            return [(0, d, self.k_for(d))]
        segs = _segments(d, self.layout)
        out = []
        for a, b in segs:
            dl = b - a
            if self.density is not None:
                kl = k_from_density(self.density, dl)
            else:
                kl = min(dl, max(1, round(self.k * dl / d)))
            out.append((a, b, kl))
        return out


    def indices(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        segs = self.segment_ks(d)
        if len(segs) == 1:
            return topk_indices_rows(x, segs[0][2])
        return torch.cat([topk_indices_rows(x[:, a:b], kl) + a for a, b, kl in segs], dim=1)

    def select(self, x, step=0, workers=None):
        idx = self.indices(x)
        return RowSparse(idx, x.gather(1, idx), x.shape[-1])

    def mask(self, x, step=0, workers=None):
        return torch.zeros_like(x, dtype=torch.bool).scatter_(1, self.indices(x), True)

    def describe(self):
        return f"top-k({self._amount()}, {self.scope})"


class HardThreshold(Compressor):
    """Keep entries with |x_i| >= lambda. The count varies per step and may be 0."""

    name = "hard_threshold"
    scale_invariant = False

    def __init__(self, threshold: float) -> None:
        if not (threshold >= 0.0) or math.isinf(threshold):
            raise ValueError(f"hard-threshold lambda must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    def mask(self, x, step=0, workers=None):
        return x.abs() >= self.threshold

    def describe(self):
        return f"hard-threshold(lambda={self.threshold:g})"


class RandomK(_FixedCount):
    """k coordinates uniform without replacement, regenerable from (seed, step, worker).

    With ``scale=True`` the kept values are multiplied by d/k (unbiased estimator).
    """

    name = "randomk"
    label = "random-k"

    def __init__(
        self, k: int | None = None, density: float | None = None, seed: int = 0, scale: bool = False
    ) -> None:
        self._set_amount(k, density)
        self.seed, self.scale = int(seed), bool(scale)
        self.seeded_support = True
        # the scaled variant is still linear in x, so it stays scale invariant
        self.scale_invariant = True

    def message_seed(self, step: int, worker: int) -> int:
        """The seed a receiver needs: a deterministic function of (seed, step, worker)."""
        # 64-bit mix (splitmix-style constants) keeps seeds of neighbouring steps unrelated
        z = (self.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + worker * 0x94D049BB133111EB)
        z &= (1 << 63) - 1
        return int(z)

    def indices(self, x: torch.Tensor, step: int, workers: torch.Tensor | None) -> torch.Tensor:
        n, d = x.shape
        if workers is None:
            workers = torch.arange(n)
        k = self.k_for(d)
        rows = [random_k_indices(self.message_seed(step, int(w)), d, k) for w in workers.tolist()]
        return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)

    def select(self, x, step=0, workers=None):
        idx = self.indices(x, step, workers)
        vals = x.gather(1, idx)
        d, k = x.shape[-1], idx.shape[1]
        if self.scale and k:
            vals = vals * (d / k)
        return RowSparse(idx, vals, d)

    def mask(self, x, step=0, workers=None):
        return torch.zeros_like(x, dtype=torch.bool).scatter_(1, self.indices(x, step, workers), True)

    def describe(self):
        return f"random-k({self._amount()}{', scaled' if self.scale else ''})"


COMPRESSORS = {"identity": Identity, "topk": TopK, "hard_threshold": HardThreshold, "randomk": RandomK}


def make_compressor(kind: str, layout: Sequence[int] | None = None, **options) -> Compressor:
    """Build a compressor by name: identity, topk, hard_threshold, randomk."""
    if kind not in COMPRESSORS:
        raise ValueError(f"unknown compressor {kind!r}; allowed: {', '.join(COMPRESSORS)}")
    if kind == "topk":
        return TopK(layout=layout, **options)
    return COMPRESSORS[kind](**options)


# ---- hard-threshold tuning rules (paper 002) ------------------------------------------------
def threshold_for_topk_volume(k: int) -> float:
    """lambda ~ 1/(2 sqrt(k)): paper 002's rule of thumb to send about as much as top-k on DNNs.

    The realised density varies per step; runs report it as ``avg_density``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    return 1.0 / (2.0 * math.sqrt(k))


def threshold_for_precision(eps: float, d: int, lr: float) -> float:
    """lambda with d * lr^2 * lambda^2 = eps: the error floor of hard-threshold EF on a convex task."""
    if eps <= 0 or d < 1 or lr <= 0:
        raise ValueError(f"need eps > 0, d >= 1, lr > 0; got eps={eps!r}, d={d!r}, lr={lr!r}")
    return math.sqrt(eps / (d * lr * lr))
