"""Top-k: the k entries of largest magnitude per row (per segment when layer-wise)."""

from __future__ import annotations

import torch

from .. import kernels
from ..messages import SparseBatch
from ..segments import Layout
from .base import _FixedCount, k_from_density


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
        if x.shape[0] == 1 or (x.shape[0] > 1 and len(segs) >= 8):
            # every segment of a row in one kernel call: faster for one row (1.9x on the MNIST MLP's
            # 4 segments) and for many segments (1.1x on LeNet's 10 at 8 rows); one call per segment
            # over all rows wins for a few segments and several rows (benchmarks/bench_layerwise_topk.py)
            offsets = torch.tensor([segs[0][0]] + [b for _, b, _ in segs])
            ks = torch.tensor([kl for *_, kl in segs])
            return torch.stack([kernels.topk_indices_layerwise(row, offsets, ks) for row in x])
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
