"""Hard-threshold: the entries with |x_i| >= lambda, and paper 002's rules for choosing lambda."""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..messages import SparseBatch
from ..constraints import Interval, check_all
from .base import Compressor


class HardThreshold(Compressor):
    """Keep entries with |x_i| >= lambda (NaN never passes). The count varies and may be 0.

    ``threshold``: lambda, or a tuning rule of paper 002 resolved when the run is built
    (``{rule: topk_volume, k: K}``: lambda = 1/(2 sqrt K), about top-K's volume on DNNs;
    ``{rule: precision, epsilon: eps}``: lambda with d lr^2 lambda^2 = eps on a convex task).
    """

    kind = "hard_threshold"
    CONSTRAINTS = {"threshold": Interval(0.0, None)}

    def __init__(self, threshold: float) -> None:
        check_all("hard-threshold", self.CONSTRAINTS, {"threshold": threshold})
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
