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
                   (``shared_support``: the same columns for every worker at a step)
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


def _i64(x: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic: the same bits as uint64)."""
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def _counter_draws(keys: torch.Tensor, start: int, m: int) -> torch.Tensor:
    """[n, m] 63-bit uniform integers: draw j of row q is mix(key_q + (start + j) * golden)."""
    j = torch.arange(start, start + m, dtype=torch.int64)
    return _srl(_mix64(keys[:, None] + j[None, :] * _GOLDEN), 1)


def random_k_indices_rows(seeds, d: int, k: int) -> torch.Tensor:
    """``[n, k]`` sorted k-of-d supports, uniform without replacement, row q fixed by ``seeds[q]``
    alone (vectorized over rows: one call for all workers). :func:`random_k_indices` is row 0 of
    this function for one seed, so sender and receiver regenerate the same support.

    Draws come from a counter-based generator (splitmix64 of the seed and the draw's position),
    so many rows are drawn in one batch of tensor operations. For k <= d/16: the first k distinct
    values of the i.i.d. sequence ``draw_j mod d`` (a uniform k-subset, O(k log k) per row — no
    O(d) permutation). Otherwise the k columns with the smallest i.i.d. keys ``draw_j``, j < d (a
    uniform k-subset; rows processed in chunks of about 4M keys).
    """
    d, k = int(d), int(k)
    if not 0 <= k <= d:
        raise ValueError(f"random-k needs 0 <= k <= d, got k = {k}, d = {d}")
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    n = seeds.numel()
    if k == 0 or n == 0:
        return torch.zeros(n, k, dtype=torch.int64)
    keys = _mix64(seeds * _GOLDEN + _MIX2)
    if 16 * k > d:
        out = torch.empty(n, k, dtype=torch.int64)
        chunk = max(1, (1 << 22) // d)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            draws = _counter_draws(keys[a:b], 0, d)
            # ties between 63-bit keys are broken by the lower column (stable sort)
            order = torch.sort(draws, dim=1, stable=True).indices[:, :k]
            out[a:b] = torch.sort(order, dim=1).values
        return out
    m0 = k + k // 8 + 16
    draws = _counter_draws(keys, 0, m0) % d
    while True:
        m = draws.shape[1]
        srt, order = torch.sort(draws, dim=1, stable=True)
        new_value = torch.ones(n, m, dtype=torch.bool)
        torch.ne(srt[:, 1:], srt[:, :-1], out=new_value[:, 1:])
        if int(new_value.sum(dim=1).min()) >= k:
            # keep in each row the k values drawn first (first positions are distinct)
            first = torch.where(new_value, order, torch.full_like(order, m))
            cut = torch.kthvalue(first, k, dim=1).values
            keep = first <= cut[:, None]
            return srt[keep].view(n, k)
        draws = torch.cat([draws, _counter_draws(keys, m, m0) % d], dim=1)


def random_k_indices(seed: int, d: int, k: int) -> torch.Tensor:
    """Sorted k-of-d indices, uniform without replacement, fixed by ``seed``: the support of a
    random-k message, regenerated by the receiver (the wire's default regenerator). Defined as
    ``random_k_indices_rows([seed], d, k)[0]`` (see there for the sampler)."""
    return random_k_indices_rows(torch.tensor([int(seed)], dtype=torch.int64), d, k)[0]


class Compressor:
    """Base class: ``compress(x [n, d], context) -> SparseBatch``."""

    kind: ClassVar[str] = "compressor"
    #: True when a receiver rebuilds the support from a seed (no indices on the wire)
    seeded_support: ClassVar[bool] = False
    #: True when the compressor plans over the whole run (a byte budget): :meth:`bind_run` is
    #: called with the run's length before the first step, and it is an uplink compressor only
    plans_over_run: ClassVar[bool] = False
    #: the hard threshold lambda (hard_threshold; budget_threshold's fixed one), else None;
    #: recorded in summary.json
    threshold: float | None = None

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

    def reveals_nonfinite(self, d: int) -> bool:
        """Whether a row with a non-finite entry always gives a message row with a non-finite
        value (then :mod:`gradsparse.divergence` need not scan the memories); False unless the
        compressor knows it does."""
        return False

    def budget_summary(self, engine) -> dict | None:
        """What summary.json records under ``uplink_budget`` (budget_threshold); None for others."""
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

    def reveals_nonfinite(self, d: int) -> bool:
        """A row with a non-finite entry gives a message row with a non-finite value (used by
        :mod:`gradsparse.divergence` to skip scanning the memories)."""
        return True

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
        if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                    or not (0.0 < density <= 1.0)):
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

    def reveals_nonfinite(self, d: int) -> bool:
        """A row with a non-finite entry gives a message row with a non-finite value: NaN and
        infinities rank first, so with k_l >= 1 in every segment they are sent."""
        return all(k >= 1 for _, _, k in self.segment_ks(d))

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
        if "threshold" not in options:
            raise ValueError("hard_threshold needs threshold: a number lambda >= 0, "
                             "{rule: topk_volume, k: K} or {rule: precision, epsilon: EPS}")
        thr = options["threshold"]
        if isinstance(thr, dict):
            rule = thr.get("rule")
            needs = {"topk_volume": "k", "precision": "epsilon"}
            if rule not in needs:
                raise ValueError(f"unknown threshold rule {rule!r}; allowed: topk_volume, precision")
            extra = sorted(set(map(str, thr)) - {"rule", needs[rule]})
            if extra or needs[rule] not in thr:
                raise ValueError(f"threshold rule {rule} takes exactly {{rule: {rule}, {needs[rule]}: ...}}"
                                 + (f"; unknown key {extra[0]!r}" if extra else f"; {needs[rule]} is missing"))
            if rule == "topk_volume":
                return cls(threshold_for_topk_volume(thr["k"]))
            if base_lr is None:
                raise ValueError("threshold rule 'precision' needs the run's base step size")
            eps = thr["epsilon"]
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise ValueError(f"threshold rule precision needs a number epsilon > 0, got {eps!r}")
            return cls(threshold_for_precision(float(eps), layout.d, base_lr))
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


def _check_seed_flag(label: str, seed, **flags) -> None:
    """A compressor's ``seed`` is an integer >= 0 and its switches are true/false (not 'maybe' or [1])."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{label} seed must be an integer >= 0, got {seed!r}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{label} {name} must be true or false, got {v!r}")


class RandomK(_FixedCount):
    """k coordinates uniform without replacement, regenerable from (seed, stream, step, worker).

    With ``scale=True`` the kept values are multiplied by d/k (unbiased estimator).

    ``shared_support=True``: every worker draws the *same* support at a step, from
    ``stream_seed(seed, stream, step, 0)`` (the worker id is left out), so the workers' messages
    share their columns and their sum is a dense sum of k values: ``collective: allreduce``
    sends exactly that (a ring all-reduce of k values instead of every worker's frame to every
    other). Each worker's message is still an unbiased (with ``scale``) random-k of its own vector;
    what changes is that the workers' errors are no longer independent.
    """

    kind = "randomk"
    label = "random-k"
    seeded_support = True

    def __init__(self, k: int | None = None, density: float | None = None, seed: int = 0, scale: bool = False,
                 shared_support: bool = False) -> None:
        self._set_amount(k, density)
        _check_seed_flag("random-k", seed, scale=scale, shared_support=shared_support)
        self.seed, self.scale, self.shared_support = int(seed), bool(scale), bool(shared_support)

    def message_seeds(self, n: int, context: CompressionContext | None) -> list[int]:
        ctx = context or CompressionContext()
        if self.shared_support:
            return [stream_seed(self.seed, ctx.stream, ctx.step, 0)] * n
        return [stream_seed(self.seed, ctx.stream, ctx.step, w) for w in ctx.worker_ids(n)]

    def compress(self, x, context=None):
        n, d = x.shape
        k = self.k_for(d)
        seeds = self.message_seeds(n, context)
        cols = random_k_indices_rows(torch.tensor(seeds, dtype=torch.long), d, k)  # all rows at once
        vals = x.gather(1, cols)
        if self.scale and k:
            vals = vals * (d / k)
        return SparseBatch.from_rows(cols, vals, d, seeds=torch.tensor(seeds, dtype=torch.long), sorted_rows=True)

    def describe(self):
        return f"random-k({self._amount()}{', scaled' if self.scale else ''}{', shared support' if self.shared_support else ''})"


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
        _check_seed_flag("approximate top-k", seed, exact=exact)
        if isinstance(sample_fraction, bool) or not isinstance(sample_fraction, (int, float)) or not (0.0 < sample_fraction <= 1.0):
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


# ---- a hard-threshold that tunes itself to a byte budget (issue 11) -------------------------
class _ThresholdStep(Compressor):
    """One step of :class:`BudgetThreshold`: per row q and segment l keep ``|x_i| >= lam[q, l]``
    (NaN never passes); a row holding fewer than ``floors[q]`` is raised to its largest
    ``floors[q]``; a row holding more than ``limits[q]`` entries is cut to its largest
    ``limits[q]``; and a row whose worst-case frame could exceed ``avail[q]`` bytes (more than
    ``hard[q]`` entries) is cut to its largest c entries with c the largest count (searched by
    bisection from ``hard[q]``) whose exact frame fits ``avail[q]``. Stateless: built by
    :meth:`BudgetThreshold.for_step`."""

    kind = "budget_threshold_step"

    def __init__(self, lam: torch.Tensor, limits: list[int], hard: list[int], avail: list[int | None],
                 seg_sizes: list[int], value_dtype: str = "fp32", floors: list[int] | None = None,
                 first: list[list[int] | None] | None = None) -> None:
        self.lam, self.limits, self.hard, self.avail = lam, limits, hard, avail
        self.floors = floors or [0] * len(limits)
        #: rows without a lambda yet: per segment the count k_l to keep by exact top-k; the
        #: k_l-th largest magnitude of each segment is recorded in ``measured`` ([n, segments])
        self.first = first or [None] * len(limits)
        self.measured: torch.Tensor | None = None
        self.seg_sizes, self.value_dtype = seg_sizes, value_dtype

    def _fits(self, cols: torch.Tensor, d: int, avail: int) -> bool:
        from . import wire

        row = torch.sort(cols).values
        one = SparseBatch(d, torch.tensor([0, row.numel()], dtype=torch.long), torch.zeros(row.numel()), row,
                          sorted_rows=True)
        return int(wire.encoded_nbytes(one, value_dtype=self.value_dtype)[0]) <= avail

    def compress(self, x, context=None):
        n, d = x.shape
        lam = self.lam.to(x.dtype)
        if lam.shape[1] == 1:
            mask = x.abs() >= lam
        else:
            sizes = torch.tensor(self.seg_sizes, dtype=torch.long)
            mask = x.abs() >= lam.repeat_interleave(sizes, dim=1)
        if any(f is not None for f in self.first):
            self.measured = torch.full((n, len(self.seg_sizes)), math.nan, dtype=torch.float64)
            bounds = [0]
            for size in self.seg_sizes:
                bounds.append(bounds[-1] + size)
            for q, ks in enumerate(self.first):
                if ks is None:
                    continue
                mask[q] = False
                for l, kl in enumerate(ks):
                    a, b = bounds[l], bounds[l + 1]
                    kl = min(kl, b - a)
                    if kl <= 0:
                        continue
                    cols = kernels.topk_indices_rows(x[q : q + 1, a:b], kl)[0] + a
                    mask[q, cols] = True
                    mags = x[q, cols].abs()
                    mags = mags[~torch.isnan(mags)]
                    if mags.numel():
                        self.measured[q, l] = float(mags.min())
        counts = mask.sum(1).tolist()
        for q in range(n):
            if counts[q] < self.floors[q]:  # must spend: the row's largest entries up to the floor
                mask[q] = False
                mask[q, kernels.topk_indices_rows(x[q : q + 1], self.floors[q])[0]] = True
                counts[q] = self.floors[q]
            c_hi = min(counts[q], self.limits[q])
            if counts[q] <= min(self.limits[q], self.hard[q]):
                continue
            keep = torch.where(mask[q], x[q], torch.zeros((), dtype=x.dtype))
            # the kept entries by magnitude, largest first (exact top-k order, ties -> lower index)
            order = kernels.topk_indices_rows(keep[None], c_hi)[0] if c_hi > 0 else torch.zeros(0, dtype=torch.long)
            if c_hi > 0:
                order = order[torch.argsort(-keep[order].abs(), stable=True)]
            c = c_hi
            if c_hi > self.hard[q]:  # the worst case may not fit: the largest prefix that does
                lo, hi = max(self.hard[q], 0), c_hi  # lo fits (worst case), find the largest fitting c
                if self._fits(order[:hi], d, self.avail[q]):
                    lo = hi
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._fits(order[:mid], d, self.avail[q]):
                        lo = mid
                    else:
                        hi = mid
                c = lo
            row = torch.zeros(d, dtype=torch.bool, device=x.device)
            row[order[:c]] = True
            mask[q] = row
        return SparseBatch.from_mask(x, mask)

    def describe(self):
        return f"threshold-step(lambda={self.lam.reshape(-1).tolist()}, limits={self.limits})"


class BudgetThreshold(Compressor):
    """Hard-threshold whose lambda tunes itself, per worker, to spend a total uplink budget.

    Give exactly one of ``budget_bytes`` (B: the most bytes one worker's uplink frames may add up
    to over the run, exact wire sizes) or ``density`` (rho: at most ``floor(rho d T)`` entries in
    total per worker, i.e. an average density rho). ``steps`` (T): the run's number of steps; in a
    config leave it out (``null``) and the runner fills in the run's length (``steps``, or the
    steps that ``epochs`` make); from Python pass it or call :meth:`bind_run`. Use it with
    ``feedback: ef-scaled`` for paper 002's hard-threshold with error feedback (lambda then lives
    on the gradient's scale), or any other feedback.

    Rule (each worker q alone, from what it has sent; state: spent S, steps done t, log lambda
    per segment, an estimate b of the bytes per kept entry). With R = T - t steps left:

    * **share** s = (B - S) / R: what this step may spend so the rest of the budget spreads
      evenly over the steps left (under- or over-spending so far changes later shares);
    * **send everything** when s is at least a full message (the dense frame, or d entries):
      lambda = 0, so a budget of T dense frames (or rho = 1) is the identity compressor; the last
      step (R = 1) also has lambda = 0: it spends what is left on its largest entries; and when
      M = B - S - (R - 1) x dense frame > 0 (what even dense messages on every later step could no
      longer spend), the step sends at least its largest ceil((M - E) / b) entries (a floor);
    * otherwise keep ``|x_i| >= lambda_l`` (segment l; one segment for ``scope: entire``) and cut
      the row to its largest ``cap`` entries when it holds more, with
      ``cap = min(hard, ceil(burst * K))``, K = (s - E) / b the entries the share buys (E: the
      empty frame) and **hard** the largest count whose worst-case frame (raw int32 indices and
      4-byte values, or the dense frame if smaller) fits ``B - S - (R - 1) E``, the bytes left
      once an empty frame is kept for each later step. The exact size is known only after
      compression (``observe`` adds it to S); since it never exceeds the worst case, S <= B after
      every step: the run never exceeds the budget, and its last steps send less rather than
      overshoot. In density mode the cost is the count, hard = entries left, and E = 0, b = 1;
    * **update** after the step (observe): with c_l the entries sent in segment l and
      K_l = K d_l / d its share, ``log lambda_l += eta_t * clip(log((c_l + 1) / (K_l + 1)), ±log 8)``,
      eta_t = max(gain_floor, gain / sqrt(1 + t)) (stochastic approximation: with i.i.d.
      gradients lambda settles where the expected count is K; the floor keeps it tracking a
      drifting distribution), and ``b <- 0.7 b + 0.3 (nbytes - E) / c`` when c > 0.

    lambda starts at ``threshold`` when given; else the first step keeps exactly its top K_0
    entries (per segment round(K_0 d_l / d), at least 1; K_0 the entries the first share buys at
    b_0 = 4 + 4 bytes per entry) and lambda_1 is, per segment, the smallest magnitude it kept
    (the step hands it from ``for_step``'s compressor to the same worker step's ``observe``).
    Later it moves by at most a factor 8^eta per step. Steps beyond T (a run longer than planned) send empty messages: each still
    costs an empty frame, so give ``steps`` >= the run's length (:meth:`bind_run` rejects less).
    The state (plain tensors, one row per worker) is checkpointed with the workers' state; a
    worker uses only its own state and messages, so it runs unchanged on every engine. Used
    statelessly (``compress`` outside a step, e.g. a diagnostic) it applies the first step's rule.
    """

    kind = "budget_threshold"
    plans_over_run = True
    #: worst-case value bytes per entry (fp32; fp16/bf16 frames are smaller)
    _BOUND_VALUE_BYTES = 4

    def __init__(
        self,
        budget_bytes: int | None = None,
        density: float | None = None,
        steps: int | None = None,
        scope: str = "entire",
        threshold: float | None = None,
        gain: float = 0.5,
        gain_floor: float = 0.05,
        burst: float | None = 4.0,
        layout: Layout | None = None,
    ) -> None:
        if (budget_bytes is None) == (density is None):
            raise ValueError("budget_threshold needs exactly one of budget_bytes (total bytes per worker) or density")
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0):
            raise ValueError(f"budget_threshold budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0):
            raise ValueError(f"budget_threshold density must be in (0, 1], got {density!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"budget_threshold steps must be an integer >= 1 (or null: the run's steps), got {steps!r}")
        if scope not in ("entire", "layerwise"):
            raise ValueError(f"budget_threshold scope must be 'entire' or 'layerwise', got {scope!r}")
        if scope == "layerwise" and layout is None:
            raise ValueError("budget_threshold scope 'layerwise' needs the model's layout")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 < threshold < math.inf):
            raise ValueError(f"budget_threshold initial threshold must be a finite number > 0, got {threshold!r}")
        for name, v in (("gain", gain), ("gain_floor", gain_floor)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 2.0:
                raise ValueError(f"budget_threshold {name} must be in [0, 2], got {v!r}")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, (int, float)) or not burst >= 1.0):
            raise ValueError(f"budget_threshold burst must be >= 1 or null (no burst cap), got {burst!r}")
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.density = None if density is None else float(density)
        self.steps = steps
        self.scope, self.layout = scope, layout
        self.threshold = None if threshold is None else float(threshold)
        self.gain, self.gain_floor = float(gain), float(gain_floor)
        self.burst = None if burst is None else float(burst)
        self.value_bytes, self.value_dtype = self._BOUND_VALUE_BYTES, "fp32"
        #: each worker's own number of steps (messages), when it differs from ``steps``: the
        #: asynchronous engine, where ``steps`` counts server updates (see :meth:`bind_run`)
        self.worker_steps: list[int] | None = None
        #: per worker: messages beyond ``worker_steps`` it may still have to send (a plan that is
        #: an estimate); an empty frame is kept back for each, so the budget holds even then
        self.reserve_messages: list[int] | None = None

    @classmethod
    def from_config(cls, options, layout, base_lr=None):
        return cls(layout=layout, **options)

    def bind_run(self, steps: int, value_dtype: str | None = None, worker_steps: list[int] | None = None,
                 reserve_messages: list[int] | None = None) -> None:
        """Called by the runner with the run's number of steps (and the wire's value dtype, which
        tightens the worst-case frame). Fills in ``steps`` when not given; rejects fewer steps than
        the run has (the extra steps' empty frames would not fit the budget).

        ``worker_steps``: how many messages each worker will send, when that is not ``steps``
        (the asynchronous engine: ``steps`` server updates, of which each worker computes its
        share, planned from the event trace by
        :meth:`gradsparse.engines.async_sim.AsyncSimulator.planned_messages`). Each worker then
        spreads its budget over its own messages (``density``: ``floor(rho d T_q)`` entries),
        instead of over ``steps`` (which spent about 1/N of it). ``reserve_messages``: when the
        plan is an estimate, how many more messages each worker may send; an empty frame is
        kept back for each (messages past the plan are empty)."""
        if self.steps is None:
            self.steps = int(steps)
        elif self.steps < steps:
            raise ValueError(f"budget_threshold steps = {self.steps} is fewer than the run's {steps} steps "
                             "(leave it out to use the run's length)")
        if worker_steps is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in worker_steps):
                raise ValueError(f"budget_threshold worker_steps must be integers >= 0, got {worker_steps!r}")
            self.worker_steps = [int(t) for t in worker_steps]
        if reserve_messages is not None:
            self.reserve_messages = [max(0, int(m)) for m in reserve_messages]
        if value_dtype is not None:
            self.value_bytes = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[value_dtype]
            self.value_dtype = value_dtype
        if self.layout is not None and self.layout.d < (1 << 40):  # d known: check the budget now
            ids = None if self.worker_steps is None else list(range(len(self.worker_steps)))
            self._plan(self.init_state(self.layout, 1 if ids is None else len(ids)), self.layout.d, ids)

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def bytes_mode(self) -> bool:
        return self.budget_bytes is not None

    def _sizes(self, d: int) -> tuple[int, int]:
        """(empty frame, dense frame) in bytes for rows of length d (exact, from the wire)."""
        from . import wire
        from .wire import format as wf

        cached = getattr(self, "_size_cache", None)
        if cached is not None and cached[0] == (d, self.value_bytes):
            return cached[1]
        no_entries = SparseBatch(d, torch.zeros(2, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        empty = int(wire.encoded_nbytes(no_entries)[0])
        dense = int(wf.frame_nbytes(d, d, "dense", False, 0, d * self.value_bytes))
        self._size_cache = ((d, self.value_bytes), (empty, dense))
        return empty, dense

    def _bound(self, d: int, c: int) -> int:
        """An upper bound on the frame of any c-entry row (what ``auto`` picks is never larger)."""
        from .wire import format as wf

        vb = self.value_bytes
        if d < wf.RAW32_LIMIT:
            sparse = wf.frame_nbytes(d, c, "raw32", False, 4 * c, vb * c)
        else:
            ib = c * wf.uvarint_len(d)
            sparse = wf.frame_nbytes(d, c, "varint", False, ib, vb * c)
        return int(min(sparse, self._sizes(d)[1]))

    def _hard_count(self, d: int, avail: int) -> int:
        """The largest c <= d whose worst-case frame fits ``avail`` bytes (-1: not even an empty one)."""
        if self._bound(d, 0) > avail:
            return -1
        if self._bound(d, d) <= avail:
            return d
        per = 4 + self.value_bytes
        c = max(0, min(d, (avail - 40) // per))
        while c > 0 and self._bound(d, c) > avail:
            c -= 1
        while c < d and self._bound(d, c + 1) <= avail:
            c += 1
        return c

    # ---- state ------------------------------------------------------------------------------
    def _segments(self, d: int) -> list[int]:
        if self.scope == "entire":
            return [d]
        if self.layout.d != d:
            raise ValueError(f"layer-wise budget_threshold built for d = {self.layout.d} got rows of d = {d}")
        return [b - a for _, a, b in self.layout.bounds()]

    def init_state(self, layout, n):
        if self.layout is None:  # scope entire: only d is needed, taken from the model it runs on
            self.layout = layout
        n_seg = 1 if self.scope == "entire" else len(layout.sizes)
        return {
            "spent": torch.zeros(n, dtype=torch.long),  # bytes (or entries) sent so far
            "steps_done": torch.zeros(n, dtype=torch.long),
            "log_threshold": torch.full((n, n_seg), math.nan, dtype=torch.float64),  # nan: not yet set
            "bytes_per_entry": torch.full((n,), math.nan, dtype=torch.float64),
        }

    def steps_of(self, worker: int | None) -> int:
        """The steps worker ``worker`` plans over: its own (``worker_steps``) or the run's."""
        if self.worker_steps is not None and worker is not None:
            if not 0 <= worker < len(self.worker_steps):
                raise ValueError(f"budget_threshold has a plan for {len(self.worker_steps)} workers, not worker {worker}")
            return self.worker_steps[worker]
        return self.steps

    def _total(self, d: int, steps: int) -> int:
        return self.budget_bytes if self.bytes_mode else math.floor(self.density * d * steps)

    def _plan(self, state: dict[str, torch.Tensor], d: int, workers: list[int] | None = None) -> dict:
        """Per row: share, the entries it buys (K), whether the step sends everything, the cap,
        and the thresholds (see the class docstring). ``workers``: the rows' worker ids (for
        ``worker_steps``; None: rows 0..n-1)."""
        if self.steps is None:
            raise ValueError("budget_threshold needs steps (the run's number of steps): pass steps=, "
                             "or run it from a config, where the runner fills it in")
        n = state["spent"].shape[0]
        ids = list(range(n)) if workers is None else workers
        empty, dense = self._sizes(d) if self.bytes_mode else (0, d)
        b0 = float(4 + self._BOUND_VALUE_BYTES) if self.bytes_mode else 1.0
        shares, ks, send_all, limits, hards, avails, floors = [], [], [], [], [], [], []
        for q in range(n):
            worker = ids[q] if self.worker_steps is not None else None
            steps = self.steps_of(worker)
            reserve = self.reserve_messages[worker] if self.reserve_messages is not None and worker is not None else 0
            total = self._total(d, steps) - reserve * empty
            if total < steps * empty:
                who = f"worker {ids[q]}'s {steps} messages" if self.worker_steps is not None else f"the run's {steps} steps"
                raise ValueError(f"budget_bytes = {total} is below the empty frames of {who} "
                                 f"({steps} x {empty} bytes): every step sends at least an empty frame")
            spent, t = int(state["spent"][q]), int(state["steps_done"][q])
            b = float(state["bytes_per_entry"][q])
            b = b0 if math.isnan(b) or not self.bytes_mode else b
            left, r = total - spent, steps - t
            if r <= 0:  # past the planned steps: nothing more
                shares.append(0.0), ks.append(0.0), send_all.append(False)
                limits.append(0), hards.append(0), avails.append(None), floors.append(0)
                continue
            share = left / r
            k = max(0.0, (share - empty) / b)
            if self.bytes_mode:
                avail = left - (r - 1) * empty
                hard = max(0, self._hard_count(d, avail))
            else:
                avail, hard = None, int(min(d, max(left, 0)))
            full = share >= dense or r == 1  # the last step spends what is left on its largest entries
            limit = d if (full or self.burst is None) else max(1, math.ceil(self.burst * k))
            if not self.bytes_mode:
                limit = min(limit, hard)
            # must spend: what even full messages on every later step could not use any more
            must = left - (r - 1) * dense
            floor = 0 if full or must <= 0 else min(d, hard, math.ceil((must - empty) / b))
            shares.append(share), ks.append(k), send_all.append(full)
            limits.append(int(min(max(limit, floor), d))), hards.append(hard), avails.append(avail), floors.append(int(floor))
        log_lam = state["log_threshold"].clone()
        sizes = self._segments(d)
        first: list[list[int] | None] = [None] * n
        for q in range(n):
            if math.isnan(float(log_lam[q, 0])):
                if self.threshold is not None:  # the given starting lambda
                    log_lam[q] = math.log(self.threshold)
                else:  # no lambda yet: this step keeps the top K_l per segment and measures lambda
                    first[q] = [max(1, round(ks[q] * dl / d)) for dl in sizes]
                    log_lam[q] = 0.0  # unused (lambda = 0 below; observe sets the measured one)
        lam = torch.exp(log_lam)
        for q in range(n):
            if first[q] is not None:
                lam[q] = 0.0
        for q in range(n):
            if send_all[q]:
                lam[q] = 0.0
        return {"share": shares, "k": ks, "send_all": send_all, "limits": limits, "hard": hards, "avail": avails,
                "floors": floors, "first": [None if send_all[q] else first[q] for q in range(n)],
                "log_threshold": log_lam, "lam": lam}

    def _step(self, plan: dict, d: int) -> _ThresholdStep:
        return _ThresholdStep(plan["lam"], plan["limits"], plan["hard"], plan["avail"], self._segments(d), self.value_dtype,
                              plan["floors"], plan["first"])

    def for_step(self, state, context):
        d = self.layout.d if self.layout is not None else None
        if d is None:
            raise ValueError("budget_threshold needs the model's layout (built from a config, or pass layout=)")
        step = self._step(self._plan(state, d, self._ids(state, context)), d)
        # the step that measures a first lambda hands it to the observe of the same worker step
        self._measuring = step if any(f is not None for f in step.first) else None
        return step

    def _ids(self, state, context) -> list[int] | None:
        """The rows' worker ids when the plan is per worker (None otherwise)."""
        if self.worker_steps is None:
            return None
        n = state["spent"].shape[0]
        return context.worker_ids(n) if context is not None else list(range(n))

    def observe(self, state, message, nbytes, context):
        d = message.d
        ids = self._ids(state, context)
        plan = self._plan(state, d, ids)
        sizes = self._segments(d)
        n = message.n
        counts = message.counts.to(torch.long)
        if len(sizes) == 1:
            seg_counts = counts[:, None].to(torch.float64)
        else:
            bounds = torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0)[:-1]
            seg = torch.bucketize(message.indices, bounds, right=True)
            seg_counts = torch.zeros(n * len(sizes), dtype=torch.float64)
            seg_counts.index_add_(0, message.row_ids() * len(sizes) + seg, torch.ones(seg.numel(), dtype=torch.float64))
            seg_counts = seg_counts.view(n, len(sizes))
        cost = nbytes.to(torch.long) if self.bytes_mode else counts
        empty = self._sizes(d)[0] if self.bytes_mode else 0
        log_lam = plan["log_threshold"].clone()
        measuring, self._measuring = getattr(self, "_measuring", None), None
        bpe = state["bytes_per_entry"].clone()
        frac = torch.tensor(sizes, dtype=torch.float64) / d
        for q in range(n):
            t = int(state["steps_done"][q])
            if plan["first"][q] is not None:  # lambda_1: the measured K_l-th magnitudes (else unset)
                got = measuring.measured[q] if measuring is not None and measuring.measured is not None and measuring.measured.shape[0] == n else None
                if got is None or bool(torch.isnan(got).all()) or bool((got <= 0).any()):
                    log_lam[q] = math.nan
                else:
                    fill = got[~torch.isnan(got)].min()
                    log_lam[q] = torch.log(torch.where(torch.isnan(got), fill, got))
            elif not plan["send_all"][q] and t < self.steps_of(None if ids is None else ids[q]) - 1:
                eta = max(self.gain_floor, self.gain / math.sqrt(1.0 + t))
                target = plan["k"][q] * frac
                u = torch.log((seg_counts[q] + 1.0) / (target + 1.0)).clamp(-math.log(8.0), math.log(8.0))
                log_lam[q] = log_lam[q] + eta * u
            c = int(counts[q])
            if self.bytes_mode and c > 0:
                per = (int(nbytes[q]) - empty) / c
                bpe[q] = per if math.isnan(float(bpe[q])) else 0.7 * float(bpe[q]) + 0.3 * per
        return {
            "spent": state["spent"] + cost,
            "steps_done": state["steps_done"] + 1,
            "log_threshold": log_lam,
            "bytes_per_entry": bpe,
        }

    def compress(self, x, context=None):
        n, d = x.shape
        layout = self.layout if self.layout is not None else Layout.flat(d)
        state = self.init_state(layout, n)
        return self._step(self._plan(state, d), d).compress(x, context)

    def thresholds(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n, segments] the lambda each worker's next step uses (0 where it sends everything)."""
        ids = None if self.worker_steps is None else list(range(state["spent"].shape[0]))
        return self._plan(state, self.layout.d, ids)["lam"]

    def budget_for(self, d: int, worker: int | None = None) -> int:
        """The budget of worker ``worker`` (any worker when the plan is not per worker) in its
        unit (bytes, or entries in density mode)."""
        if self.bytes_mode:
            return self.budget_bytes
        if self.steps is None:
            raise ValueError("budget_threshold needs steps")
        return self._total(d, self.steps_of(worker))

    def budget_summary(self, engine) -> dict:
        """What a run's ``summary.json`` records under ``uplink_budget``: the budget per worker and
        in total, what each worker spent (same unit), and the thresholds its next step would use;
        with a per-worker plan (engine async) also each worker's planned messages."""
        state = engine.worker_state.compressor
        unit = "bytes" if self.bytes_mode else "entries"
        n = int(state["spent"].numel())
        budgets = [self.budget_for(engine.d, q) for q in range(n)]
        out = {
            "unit": unit, "per_worker": budgets[0] if len(set(budgets)) == 1 else budgets, "total": sum(budgets),
            "spent_per_worker": state["spent"].tolist(), "spent_total": int(state["spent"].sum()),
            "steps": self.steps, "scope": self.scope,
            "final_thresholds": torch.exp(state["log_threshold"]).tolist(),
        }
        if self.worker_steps is not None:
            out["planned_messages_per_worker"] = list(self.worker_steps)
            out["messages_per_worker"] = state["steps_done"].tolist()
        return out

    def describe(self):
        amount = f"budget_bytes={self.budget_bytes}" if self.bytes_mode else f"density={self.density:g}"
        return f"budget-threshold({amount}, steps={self.steps}, {self.scope})"


COMPRESSORS[BudgetThreshold.kind] = BudgetThreshold
