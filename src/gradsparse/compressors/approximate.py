"""Approximate top-k: a threshold estimated from a uniform sample of the entries."""

from __future__ import annotations

import torch

from .. import kernels
from ..messages import SparseBatch
from ..constraints import Interval, check_all
from ..random_support import stream_seed
from .base import CompressionContext, _FixedCount
from .randomk import SEED, _check_seed_flag


class ApproximateTopK(_FixedCount):
    """Top-k by an estimated threshold (deep gradient compression style; ALGORITHMS.md §1).

    Per row: lambda = :func:`gradsparse.kernels.sampled_threshold` of a uniform sample of
    ``sample_fraction * d`` entries (drawn from the random stream of the message, so runs are
    deterministic), then keep |x_i| >= lambda (about k entries, a varying count). With
    ``exact=True`` a row whose count is not k is corrected to the exact top-k.
    """

    kind = "approximate_topk"
    label = "approximate top-k"
    CONSTRAINTS = {**_FixedCount.CONSTRAINTS, "seed": SEED, "sample_fraction": Interval(0.0, 1.0, closed="right")}

    def __init__(self, k: int | None = None, density: float | None = None, sample_fraction: float = 0.01,
                 exact: bool = False, seed: int = 0) -> None:
        self._set_amount(k, density)
        _check_seed_flag("approximate top-k", seed, exact=exact)
        check_all(self.label, self.CONSTRAINTS, {"sample_fraction": sample_fraction})
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
