"""The compressor interface, its context, and the identity compressor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..constraints import Interval, check_all
from ..messages import SparseBatch
from ..segments import Layout

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
    #: the bounds of the numeric options (:mod:`gradsparse.constraints`; the config passes the
    #: options to the constructor, which checks them against this table)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {}

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
    CONSTRAINTS = {"k": Interval(0, None, integer=True), "density": Interval(0.0, 1.0, closed="right")}

    def _set_amount(self, k: int | None, density: float | None) -> None:
        if (k is None) == (density is None):
            raise ValueError(f"{self.label} needs exactly one of k (count) or density (k/d)")
        check_all(self.label, self.CONSTRAINTS, {"k": k} if k is not None else {"density": density})
        self.k, self.density = k, density

    def k_for(self, d: int) -> int:
        if self.density is not None:
            return k_from_density(self.density, d)
        if self.k > d:
            raise ValueError(f"{self.label} k = {self.k} exceeds the vector size d = {d}")
        return self.k

    def _amount(self) -> str:
        return f"k={self.k}" if self.k is not None else f"density={self.density}"
