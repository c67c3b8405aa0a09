"""Momentum rules (ALGORITHMS.md §3), as small objects with state.

- ``none``.
- ``update`` — update compression (paper 002 Alg. 3, paper 004 Alg. 1), at the workers:
  m^q <- beta m^q + g^q; the worker feeds m^q (heavy ball) or g^q + beta m^q (Nesterov) to its
  error feedback. Option momentum-factor masking (deep gradient compression): after sending,
  m^q and the memory are zeroed at the transmitted coordinates.
- ``gradient`` — gradient compression (paper 002 Alg. 2, PowerSGD style), on the aggregate:
  workers compress g + e; the aggregate D' is the same on every worker (or at the server);
  m <- beta m + D'; direction m (heavy ball) or D' + beta m (Nesterov). Its state is identical
  on all workers, so it lives with the server step.

``init`` returns the state (a :class:`~gradsparse.segments.SegmentedTensor`, or ``None``);
``update(g, state) -> (direction, new state)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .constraints import Interval, check_all
from .messages import SparseBatch
from .segments import Layout, SegmentedTensor

__all__ = ["Momentum", "NoMomentum", "UpdateMomentum", "GradientMomentum", "MOMENTA", "make_momentum"]


class Momentum:
    kind: ClassVar[str]
    #: "worker" (update compression), "server" (gradient compression) or None
    side: ClassVar[str | None] = None
    #: the bounds of the numeric parameters (the config schema reads the same table)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {"beta": Interval(0.0, 1.0, closed="left")}

    def __init__(self, beta: float = 0.0, nesterov: bool = False, masking: bool = False) -> None:
        check_all("momentum", self.CONSTRAINTS, {"beta": beta})
        if masking and self.side != "worker":
            raise ValueError("momentum-factor masking applies to momentum 'update' only")
        self.beta, self.nesterov, self.masking = float(beta), bool(nesterov), bool(masking)

    def init(self, layout: Layout, *lead: int, dtype=torch.float32) -> SegmentedTensor | None:
        return None

    def update(self, g: torch.Tensor, state: SegmentedTensor | None) -> tuple[torch.Tensor, SegmentedTensor | None]:
        return g, state

    def describe(self) -> str:
        return f"{self.kind}(beta={self.beta}{', nesterov' if self.nesterov else ''}{', masking' if self.masking else ''})"


class NoMomentum(Momentum):
    kind = "none"

    def __init__(self, beta: float = 0.0, nesterov: bool = False, masking: bool = False) -> None:
        super().__init__(0.0, False, masking)

    def describe(self) -> str:
        return "none"


class _HeavyBall(Momentum):
    def init(self, layout, *lead, dtype=torch.float32):
        return SegmentedTensor.zeros(layout, *lead, dtype=dtype)

    def update(self, g, state):
        m = torch.add(g, state.flat, alpha=self.beta)  # beta m + g
        direction = torch.add(g, m, alpha=self.beta) if self.nesterov else m
        return direction, SegmentedTensor(state.layout, m)


class UpdateMomentum(_HeavyBall):
    """Worker-side momentum (update compression), optionally with momentum-factor masking."""

    kind = "update"
    side = "worker"

    def mask_(self, state: SegmentedTensor, message: SparseBatch, memory: SegmentedTensor | None) -> None:
        """Momentum-factor masking: zero m^q (and the memory) where row q was transmitted."""
        zeros = torch.zeros_like(message.values, dtype=state.flat.dtype)
        message.scatter_(state.flat, zeros)
        if memory is not None:
            message.scatter_(memory.flat, zeros)


class GradientMomentum(_HeavyBall):
    """Momentum on the aggregate (gradient compression); state identical on every worker."""

    kind = "gradient"
    side = "server"


#: the one table of momentum kinds
MOMENTA: dict[str, type[Momentum]] = {c.kind: c for c in (NoMomentum, UpdateMomentum, GradientMomentum)}


def make_momentum(kind: str | Momentum = "none", **options) -> Momentum:
    if isinstance(kind, Momentum):
        return kind
    if kind not in MOMENTA:
        raise ValueError(f"unknown momentum {kind!r}; allowed: {', '.join(MOMENTA)}")
    return MOMENTA[kind](**options)
