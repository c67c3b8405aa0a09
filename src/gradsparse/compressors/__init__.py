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

Modules: :mod:`.base` (the interface, identity), :mod:`.topk`, :mod:`.threshold` (with paper 002's
tuning rules), :mod:`.randomk` (its sampler in :mod:`gradsparse.random_support`, a leaf the wire imports),
:mod:`.approximate`, :mod:`.budget`.
"""

from __future__ import annotations

from ..segments import Layout
from .approximate import ApproximateTopK
from .base import STREAMS, CompressionContext, Compressor, Identity, k_from_density
from .budget import BudgetThreshold
from ..random_support import random_k_indices, random_k_indices_rows, stream_seed
from .randomk import RandomK
from .threshold import HardThreshold, threshold_for_precision, threshold_for_topk_volume
from .topk import TopK

__all__ = [
    "CompressionContext",
    "Compressor",
    "Identity",
    "BudgetThreshold",
    "TopK",
    "HardThreshold",
    "RandomK",
    "ApproximateTopK",
    "COMPRESSORS",
    "make_compressor",
    "k_from_density",
    "random_k_indices",
    "random_k_indices_rows",
    "STREAMS",
    "stream_seed",
    "threshold_for_topk_volume",
    "threshold_for_precision",
]

#: the one table of compressor kinds (configs, the CLI and docs read it)
COMPRESSORS: dict[str, type[Compressor]] = {
    c.kind: c for c in (Identity, TopK, HardThreshold, RandomK, ApproximateTopK, BudgetThreshold)
}


def make_compressor(kind: str, layout: Layout | None = None, base_lr: float | None = None, **options) -> Compressor:
    """Build a compressor from its config section: ``make_compressor("topk", layout, density=0.01)``."""
    if kind not in COMPRESSORS:
        raise ValueError(f"unknown compressor {kind!r}; allowed: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[kind].from_config(options, layout, base_lr)
