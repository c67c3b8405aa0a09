"""Topologies (ALGORITHMS.md §5): what the server sends back, and who receives what.

A topology receives the aggregate ``A = sum_q p_q s_q`` and the model update ``U`` (``A`` after
server momentum and, for ``memory`` feedback, the step size) and returns the update the workers
apply together with the one downlink message the server sends (or ``None``):

- ``all_to_all``:    no server: every worker receives every s_q (an allgather) and applies U.
- ``ps_uplink``:     the server sends the aggregate A itself (support up to N k); workers run the
                     (deterministic, identical) momentum and step size on it and apply U.
- ``bidirectional``: server memory delta (starts at 0): G = U + delta; sends C_down(G);
                     delta <- G - C_down(G); workers apply C_down(G).
- ``downlink_only``: as ``bidirectional``, with workers sending alpha g uncompressed (the uplink
                     compressor must be ``identity`` and the feedback ``none``: checked).

``init(layout) -> state`` (the downlink memory delta, or ``None``) and
``downlink(aggregate, update, state, context, value_dtype) -> (applied update, message or None,
new state)``. A downlink message's values are what the workers decode (rounded to the wire's
``value_dtype``): the applied update is built from them, and delta keeps the rounding error.

Byte accounting: a step returns the size of each message it sends (:mod:`gradsparse.wire`);
:meth:`Topology.synchronous_traffic` is the synchronous engine's rule for how many copies travel:
all-to-all delivers each worker's message to the N - 1 others; a parameter server delivers its
one message to each of the N workers.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .compressors import CompressionContext, Compressor, Identity
from .messages import SparseBatch
from .segments import Layout, SegmentedTensor
from .wire import sendable

__all__ = ["Topology", "AllToAll", "ParameterServerUplink", "Bidirectional", "DownlinkOnly", "TOPOLOGIES", "make_topology"]


class Topology:
    kind: ClassVar[str]
    #: whether the server compresses what it sends (and keeps a downlink memory delta)
    compresses_downlink: ClassVar[bool] = False
    #: whether there is a server message at all
    has_server: ClassVar[bool] = True
    #: whether the server sends the aggregate A itself (then A is rounded to the wire's value
    #: dtype before the server step uses it, so server and workers apply the same values)
    sends_aggregate: ClassVar[bool] = False

    down_compressor: Compressor | None = None

    def init(self, layout: Layout, dtype=torch.float32) -> SegmentedTensor | None:
        return None

    def check_uplink(self, compressor: Compressor, feedback_kind: str) -> None:
        """Reject uplink settings this topology cannot run (raises ValueError naming the key)."""

    def downlink(self, aggregate: torch.Tensor, update: torch.Tensor, state, context: CompressionContext,
                 value_dtype: str = "fp32"):
        raise NotImplementedError

    def synchronous_traffic(self, up_nbytes: torch.Tensor, down_nbytes: int, n_workers: int) -> tuple[int, int]:
        """(uplink, downlink) bytes of one synchronous round (see the module docstring)."""
        return int(up_nbytes.sum()), n_workers * int(down_nbytes)

    def describe(self) -> str:
        if self.down_compressor is not None:
            return f"{self.kind}(down={self.down_compressor.describe()})"
        return self.kind


class AllToAll(Topology):
    kind = "all_to_all"
    has_server = False

    def downlink(self, aggregate, update, state, context, value_dtype="fp32"):
        return update, None, state

    def synchronous_traffic(self, up_nbytes, down_nbytes, n_workers):
        up = int(up_nbytes.sum())
        return up, (n_workers - 1) * up


class ParameterServerUplink(Topology):
    kind = "ps_uplink"
    sends_aggregate = True

    def downlink(self, aggregate, update, state, context, value_dtype="fp32"):
        row = aggregate[None]
        return update, SparseBatch.from_mask(row, row != 0), state


class Bidirectional(Topology):
    kind = "bidirectional"
    compresses_downlink = True

    def __init__(self, down_compressor: Compressor | None = None) -> None:
        if down_compressor is None:
            raise ValueError(f"topology {self.kind!r} needs a downlink compressor (algorithm.topology.down_compressor)")
        self.down_compressor = down_compressor

    def init(self, layout, dtype=torch.float32):
        return SegmentedTensor.zeros(layout, dtype=dtype)

    def downlink(self, aggregate, update, state, context, value_dtype="fp32"):
        G = update + state.flat
        message = sendable(self.down_compressor.compress(G[None], context), value_dtype)
        sent = message.to_dense(G.dtype)[0]
        return sent, message, SegmentedTensor(state.layout, G - sent)


class DownlinkOnly(Bidirectional):
    kind = "downlink_only"

    def check_uplink(self, compressor, feedback_kind):
        if not isinstance(compressor, Identity):
            raise ValueError(
                f"topology 'downlink_only' sends alpha g uncompressed: algorithm.compressor must be "
                f"identity, got {compressor.describe()}"
            )
        if feedback_kind != "none":
            raise ValueError(
                f"topology 'downlink_only' keeps no worker memory: algorithm.feedback must be 'none', got {feedback_kind!r}"
            )


#: the one table of topologies
TOPOLOGIES: dict[str, type[Topology]] = {c.kind: c for c in (AllToAll, ParameterServerUplink, Bidirectional, DownlinkOnly)}


def make_topology(kind: str | Topology = "all_to_all", down_compressor: Compressor | None = None) -> Topology:
    if isinstance(kind, Topology):
        return kind
    if kind not in TOPOLOGIES:
        raise ValueError(f"unknown topology {kind!r}; allowed: {', '.join(TOPOLOGIES)}")
    cls = TOPOLOGIES[kind]
    if cls.compresses_downlink:
        return cls(down_compressor)
    if down_compressor is not None:
        raise ValueError(f"topology {kind!r} sends no compressed downlink; remove algorithm.topology.down_compressor")
    return cls()
