"""Random-k: k coordinates drawn from a seed the receiver regenerates (no indices on the wire)."""

from __future__ import annotations

import torch

from ..constraints import Interval, check
from ..messages import SparseBatch
from ..random_support import random_k_indices_rows, stream_seed
from .base import CompressionContext, _FixedCount

#: a compressor's random seed
SEED = Interval(0, None, integer=True)


def _check_seed_flag(label: str, seed, **flags) -> None:
    """A compressor's ``seed`` is an integer >= 0 and its switches are true/false (not 'maybe' or [1])."""
    check(label, "seed", seed, SEED)
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
    CONSTRAINTS = {**_FixedCount.CONSTRAINTS, "seed": SEED}
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
