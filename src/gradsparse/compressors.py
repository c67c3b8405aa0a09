"""Compressors C : R^d -> R^d (ALGORITHMS.md §1), each returning one :class:`SparseBatch`.

A compressor acts on a batch of rows ``x`` of shape ``[n, d]`` (one row per worker; an engine
with one worker per process passes ``n = 1``) and returns the compressed rows as a
:class:`~gradsparse.messages.SparseBatch` — the message that goes on the wire. It is stateless:
everything it needs besides ``x`` comes in a :class:`CompressionContext` (the step, the workers'
ids and the name of the random stream, for random-k).

=================  ==========================================================================
kind               rule
=================  ==========================================================================
identity           C(x) = x (a ``dense`` batch)
topk               the k entries of largest |x_i| per row (per segment when layer-wise)
hard_threshold     the entries with |x_i| >= lambda; the count varies and may be 0
randomk            k coordinates uniform without replacement, drawn from a seed that is a
                   function of (seed, stream, step, worker), so a receiver regenerates them
approximate_topk   entries with |x_i| >= a threshold estimated from a uniform sample (about k
                   of them); with ``exact: true`` corrected to exactly the top-k
=================  ==========================================================================

Tie rule for top-k (one implementation, :mod:`gradsparse.kernels`): entries are ranked by
``|x_i|`` descending, NaN above +inf, and among equal magnitudes the LOWER index wins.

Rounding rule for a density ``rho`` (paper 003): ``k = d - floor((1 - rho) * d)``, at least 1.

Scope: ``entire`` treats the flattened model as one vector; ``layerwise`` applies the rule to
each segment (parameter tensor) separately: segment ``l`` gets ``k_l`` from ``rho * d_l``, or,
when a count ``k`` is given, ``k_l = max(1, round(k * d_l / d))``. Hard-threshold is the same in
both scopes.

Named random streams: random-k draws its support from ``stream_seed(seed, stream, step,
worker)``. The workers' uplink messages use stream ``"uplink"`` with their worker id, the
server's downlink message stream ``"downlink"`` (worker 0), diagnostics ``"diagnostic"``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import kernels
from .messages import SparseBatch
from .segments import Layout

__all__ = [
    "CompressionContext",
    "Compressor",
    "Identity",
    "TopK",
    "HardThreshold",
    "RandomK",
    "ApproximateTopK",
    "COMPRESSORS",
    "make_compressor",
    "k_from_density",
    "random_k_indices",
    "stream_seed",
    "threshold_for_topk_volume",
    "threshold_for_precision",
]

STREAMS = ("uplink", "downlink", "diagnostic")


@dataclass(frozen=True)
class CompressionContext:
    """What a compressor may depend on besides its input.

    step:    the step counter of the message (for a worker's message, the model version it was
             computed at; for the server's, the server step);
    workers: ids of the rows' workers (``None``: 0..n-1);
    stream:  ``"uplink"``, ``"downlink"`` or ``"diagnostic"`` (see the module docstring).
    """

    step: int = 0
    workers: torch.Tensor | None = None
    stream: str = "uplink"

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"unknown random stream {self.stream!r}; allowed: {', '.join(STREAMS)}")

    def worker_ids(self, n: int) -> list[int]:
        if self.workers is None:
            return list(range(n))
        ids = [int(w) for w in self.workers.reshape(-1).tolist()]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} worker ids for {n} rows")
        return ids


def k_from_density(rho: float, d: int) -> int:
    """Paper 003's rounding rule: K = d - floor((1 - rho) d), kept >= 1 (and <= d)."""
    if not (0.0 < rho <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {rho!r}")
    if d == 0:
        return 0
    k = d - math.floor((1.0 - rho) * d)
    return int(min(max(k, 1), d))


def stream_seed(seed: int, stream: str, step: int, worker: int) -> int:
    """The 63-bit seed of one random-k message: a fixed function of (seed, stream, step, worker)."""
    z = (
        int(seed) * 0x9E3779B97F4A7C15
        + zlib.crc32(stream.encode()) * 0xD6E8FEB86659FD93
        + int(step) * 0xBF58476D1CE4E5B9
        + int(worker) * 0x94D049BB133111EB
    )
    return int(z & ((1 << 63) - 1))


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
    """Base class: ``compress(x [n, d], context) -> SparseBatch``."""

    kind: ClassVar[str] = "compressor"
    #: True when a receiver rebuilds the support from a seed (no indices on the wire)
    seeded_support: ClassVar[bool] = False

    def compress(self, x: torch.Tensor, context: CompressionContext | None = None) -> SparseBatch:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, context: CompressionContext | None = None) -> SparseBatch:
        return self.compress(x, context)

    # ---- stateful compressors (e.g. a threshold that adapts to a byte budget) ----------------
    def init_state(self, layout: Layout, n: int) -> dict[str, torch.Tensor] | None:
        """State of a stateful compressor: plain tensors with one row per worker (``None``: stateless).
        It lives in the workers' state (:class:`~gradsparse.algorithm.WorkerState`), so engines
        checkpoint it and slice it per worker like the memory."""
        return None

    def for_step(self, state: dict[str, torch.Tensor] | None, context: CompressionContext) -> "Compressor":
        """The (stateless) compressor this step uses, given the state; stateless ones are themselves."""
        return self

    def observe(self, state: dict[str, torch.Tensor] | None, message: SparseBatch, nbytes: torch.Tensor,
                context: CompressionContext) -> dict[str, torch.Tensor] | None:
        """The new state after the step sent ``message`` (``nbytes``: each row's exact wire size)."""
        return state

    def compress_accumulated_(self, buffer: torch.Tensor, g: torch.Tensor | None, alpha: float):
        """Optional fused pass for one row: ``buffer += alpha * g`` (unless ``g`` is None), then
        ``s = C(buffer)`` and ``buffer <- buffer - s`` in place, where C keeps values unchanged.
        Returns (message, accumulated values at the support) or ``None`` when this compressor
        has no fused kernel for this input (the caller then runs the unfused steps)."""
        return None

    def describe(self) -> str:
        return self.kind

    @classmethod
    def from_config(cls, options: dict[str, Any], layout: Layout, base_lr: float | None = None) -> "Compressor":
        """Build from a config section's options (the keys other than ``kind``)."""
        return cls(**options)


class Identity(Compressor):
    """C(x) = x: every entry is sent (a ``dense`` message)."""

    kind = "identity"

    def compress(self, x, context=None):
        return SparseBatch.from_dense(x)


class _FixedCount(Compressor):
    """Compressors that keep k entries per row, k given as a count or as a density k/d."""

    label: ClassVar[str] = "top-k"

    def _set_amount(self, k: int | None, density: float | None) -> None:
        if (k is None) == (density is None):
            raise ValueError(f"{self.label} needs exactly one of k (count) or density (k/d)")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
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
    """Keep the k entries of largest magnitude per row (per segment when layer-wise).

    Give exactly one of ``k`` (a count) or ``density`` (rho = k/d, paper 003's rounding).
    ``layout``: the model's segments (needed for ``scope="layerwise"``).
    """

    kind = "topk"

    def __init__(
        self,
        k: int | None = None,
        density: float | None = None,
        scope: str = "entire",
        layout: Layout | None = None,
    ) -> None:
        self._set_amount(k, density)
        if scope not in ("entire", "layerwise"):
            raise ValueError(f"top-k scope must be 'entire' or 'layerwise', got {scope!r}")
        if scope == "layerwise" and layout is None:
            raise ValueError("top-k scope 'layerwise' needs the model's layout")
        self.scope, self.layout = scope, layout

    @classmethod
    def from_config(cls, options, layout, base_lr=None):
        return cls(layout=layout, **options)

    def segment_ks(self, d: int) -> list[tuple[int, int, int]]:
        """[(start, stop, k_l)] for the configured scope."""
        if self.scope == "entire":
            return [(0, d, self.k_for(d))]
        if self.layout.d != d:
            raise ValueError(f"layer-wise top-k built for d = {self.layout.d} got rows of d = {d}")
        out = []
        for _, a, b in self.layout.bounds():
            dl = b - a
            kl = k_from_density(self.density, dl) if self.density is not None else min(dl, max(1, round(self.k * dl / d)))
            out.append((a, b, kl))
        return out

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """[n, k] selected columns, ascending within each segment."""
        segs = self.segment_ks(x.shape[-1])
        if len(segs) == 1:
            return kernels.topk_indices_rows(x, segs[0][2])
        return torch.cat([kernels.topk_indices_rows(x[:, a:b], kl) + a for a, b, kl in segs], dim=1)

    def compress(self, x, context=None):
        cols = self.columns(x)
        return SparseBatch.from_rows(cols, x.gather(1, cols), x.shape[-1], sorted_rows=True)

    def compress_accumulated_(self, buffer, g, alpha):
        if buffer.shape[0] != 1 or len(self.segment_ks(buffer.shape[-1])) != 1 or not buffer.is_contiguous():
            return None
        k = self.k_for(buffer.shape[-1])
        idx, vals = kernels.accumulate_topk_(buffer.view(-1), None if g is None else g.reshape(-1), float(alpha), k)
        return SparseBatch.from_rows(idx.view(1, -1), vals.view(1, -1), buffer.shape[-1], sorted_rows=True), vals

    def describe(self):
        return f"top-k({self._amount()}, {self.scope})"


class HardThreshold(Compressor):
    """Keep entries with |x_i| >= lambda (NaN never passes). The count varies and may be 0.

    ``threshold``: lambda, or a tuning rule of paper 002 resolved when the run is built
    (``{rule: topk_volume, k: K}``: lambda = 1/(2 sqrt K), about top-K's volume on DNNs;
    ``{rule: precision, epsilon: eps}``: lambda with d lr^2 lambda^2 = eps on a convex task).
    """

    kind = "hard_threshold"

    def __init__(self, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (threshold >= 0.0) or math.isinf(threshold):
            raise ValueError(f"hard-threshold lambda must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    @classmethod
    def from_config(cls, options, layout, base_lr=None):
        thr = options["threshold"]
        if isinstance(thr, dict):
            rule = thr.get("rule")
            if rule == "topk_volume":
                return cls(threshold_for_topk_volume(int(thr["k"])))
            if rule == "precision":
                if base_lr is None:
                    raise ValueError("threshold rule 'precision' needs the run's base step size")
                return cls(threshold_for_precision(float(thr["epsilon"]), layout.d, base_lr))
            raise ValueError(f"unknown threshold rule {rule!r}; allowed: topk_volume, precision")
        return cls(thr)

    def compress(self, x, context=None):
        return SparseBatch.from_mask(x, x.abs() >= self.threshold)

    def compress_accumulated_(self, buffer, g, alpha):
        if buffer.shape[0] != 1 or not buffer.is_contiguous():
            return None
        idx, vals = kernels.accumulate_threshold_(
            buffer.view(-1), None if g is None else g.reshape(-1), float(alpha), self.threshold
        )
        d = buffer.shape[-1]
        msg = SparseBatch(d, torch.tensor([0, idx.numel()], dtype=torch.long), vals, idx, sorted_rows=True)
        return msg, vals

    def describe(self):
        return f"hard-threshold(lambda={self.threshold:g})"


class RandomK(_FixedCount):
    """k coordinates uniform without replacement, regenerable from (seed, stream, step, worker).

    With ``scale=True`` the kept values are multiplied by d/k (unbiased estimator).
    """

    kind = "randomk"
    label = "random-k"
    seeded_support = True

    def __init__(self, k: int | None = None, density: float | None = None, seed: int = 0, scale: bool = False) -> None:
        self._set_amount(k, density)
        self.seed, self.scale = int(seed), bool(scale)

    def message_seeds(self, n: int, context: CompressionContext | None) -> list[int]:
        ctx = context or CompressionContext()
        return [stream_seed(self.seed, ctx.stream, ctx.step, w) for w in ctx.worker_ids(n)]

    def compress(self, x, context=None):
        n, d = x.shape
        k = self.k_for(d)
        seeds = self.message_seeds(n, context)
        cols = torch.stack([random_k_indices(s, d, k) for s in seeds]) if n else torch.empty(0, k, dtype=torch.long)
        vals = x.gather(1, cols)
        if self.scale and k:
            vals = vals * (d / k)
        return SparseBatch.from_rows(cols, vals, d, seeds=torch.tensor(seeds, dtype=torch.long), sorted_rows=True)

    def describe(self):
        return f"random-k({self._amount()}{', scaled' if self.scale else ''})"


class ApproximateTopK(_FixedCount):
    """Top-k by an estimated threshold (deep gradient compression style; ALGORITHMS.md §1).

    Per row: lambda = :func:`gradsparse.kernels.sampled_threshold` of a uniform sample of
    ``sample_fraction * d`` entries (drawn from the random stream of the message, so runs are
    deterministic), then keep |x_i| >= lambda (about k entries, a varying count). With
    ``exact=True`` a row whose count is not k is corrected to the exact top-k.
    """

    kind = "approximate_topk"
    label = "approximate top-k"

    def __init__(self, k: int | None = None, density: float | None = None, sample_fraction: float = 0.01,
                 exact: bool = False, seed: int = 0) -> None:
        self._set_amount(k, density)
        if not (0.0 < sample_fraction <= 1.0):
            raise ValueError(f"approximate top-k sample_fraction must be in (0, 1], got {sample_fraction!r}")
        self.sample_fraction, self.exact, self.seed = float(sample_fraction), bool(exact), int(seed)

    def compress(self, x, context=None):
        n, d = x.shape
        k = self.k_for(d)
        ctx = context or CompressionContext()
        mask = torch.zeros(n, d, dtype=torch.bool, device=x.device)
        for q, w in enumerate(ctx.worker_ids(n)):
            gen = torch.Generator().manual_seed(stream_seed(self.seed, ctx.stream, ctx.step, w))
            thr = kernels.sampled_threshold(x[q], k, sample_fraction=self.sample_fraction, generator=gen)
            row = x[q].abs() >= thr
            if self.exact and int(row.sum()) != k:
                row = torch.zeros(d, dtype=torch.bool, device=x.device)
                row[kernels.topk_indices_rows(x[q : q + 1], k)[0]] = True
            mask[q] = row
        msg = SparseBatch.from_mask(x, mask)
        if self.exact:
            msg.fixed_k = k
        return msg

    def describe(self):
        return f"approximate-top-k({self._amount()}, sample={self.sample_fraction:g}{', exact' if self.exact else ''})"


#: the one table of compressor kinds (configs, the CLI and docs read it)
COMPRESSORS: dict[str, type[Compressor]] = {
    c.kind: c for c in (Identity, TopK, HardThreshold, RandomK, ApproximateTopK)
}


def make_compressor(kind: str, layout: Layout | None = None, base_lr: float | None = None, **options) -> Compressor:
    """Build a compressor from its config section: ``make_compressor("topk", layout, density=0.01)``."""
    if kind not in COMPRESSORS:
        raise ValueError(f"unknown compressor {kind!r}; allowed: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[kind].from_config(options, layout, base_lr)


# ---- hard-threshold tuning rules (paper 002) ------------------------------------------------
def threshold_for_topk_volume(k: int) -> float:
    """lambda ~ 1/(2 sqrt(k)): paper 002's rule of thumb to send about as much as top-k on DNNs.

    The realised density varies per step; runs report it as ``avg_density``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"threshold rule topk_volume needs an integer k >= 1, got {k!r}")
    return 1.0 / (2.0 * math.sqrt(k))


def threshold_for_precision(epsilon: float, d: int, lr: float) -> float:
    """lambda with d * lr^2 * lambda^2 = epsilon: the error floor of hard-threshold EF on a convex task."""
    if not (epsilon > 0) or d < 1 or not (lr > 0) or math.isinf(epsilon):
        raise ValueError(f"threshold rule precision needs epsilon > 0, d >= 1, lr > 0; got epsilon={epsilon!r}, d={d!r}, lr={lr!r}")
    return math.sqrt(epsilon / (d * lr * lr))
