"""Channels: how the algorithm's messages travel, and the one place that charges the ledger.

A :class:`Channel` delivers messages between workers (and a server) and charges its
:class:`~gradsparse.comm.ledger.ByteLedger` with what it sent. There is one channel per
transport, and the engines (and the DDP hook) send through theirs instead of counting bytes
themselves:

=================================  ===========================================================
:class:`SimulatedRounds`           synchronous rounds in one process (``engine: sync``, ``loop``):
                                   delivery is handing the batch on; charged with the topology's
                                   synchronous rule
:class:`VirtualTimeNetwork`        events in virtual time (``engine: async``): each message's
                                   arrival time from the network law and its exact size
:class:`~gradsparse.comm.collective.CollectiveChannel`
                                   torch.distributed collectives (``engine: torch`` and the DDP
                                   hook): wire frames as uint8 tensors, sizes exchanged first
:class:`~gradsparse.comm.point_to_point.PointToPointChannel`
                                   torch.distributed send/recv with one message header (the
                                   parameter server of ``engine: torch``, ``engine: torch_async``)
=================================  ===========================================================

Every channel moves the same thing: the wire format's frames (:func:`gradsparse.wire.encode`) of
:class:`~gradsparse.messages.SparseBatch` messages whose values are already what a receiver
decodes (the algorithm rounds them to its ``value_dtype``), so a simulated run and a real one
charge the same bytes for the same messages, and a real run's count is what its transport
was handed.
"""

from __future__ import annotations

import torch

from .ledger import ByteLedger

__all__ = ["Channel", "SimulatedRounds", "VirtualTimeNetwork"]


class Channel:
    """Delivers messages and charges :attr:`ledger` (see the module docstring)."""

    def __init__(self, ledger: ByteLedger | None = None) -> None:
        self.ledger = ledger if ledger is not None else ByteLedger()


class SimulatedRounds(Channel):
    """Synchronous rounds of N simulated workers (one process).

    Round: the N workers' messages (one batch, row q = worker q, each row's exact frame size in
    ``worker_nbytes``) go up, the server's one message (``server_nbytes``; none for all-to-all)
    comes down. The topology says how many copies travel (``Topology.synchronous_traffic``):
    all-to-all delivers each worker's message to the N - 1 others; a parameter server its
    message to each of the N workers.
    """

    def __init__(self, topology, n_workers: int, ledger: ByteLedger | None = None) -> None:
        super().__init__(ledger)
        self.topology, self.n_workers = topology, int(n_workers)

    def deliver_round(self, worker_nbytes: torch.Tensor, server_nbytes: int) -> tuple[int, int]:
        """Charge one round; returns its (uplink, downlink) bytes."""
        n = self.n_workers
        up, down = self.topology.synchronous_traffic(worker_nbytes, server_nbytes, n)
        down_messages = n if self.topology.has_server else (n - 1) * n
        self.ledger.add(up, down, n, down_messages)
        return up, down


class VirtualTimeNetwork(Channel):
    """Messages of an asynchronous parameter server in virtual time.

    A message sent at time ``now`` arrives at ``now + law.draw(stream, nbytes)``; the stream is
    the sender's (uplink) or receiver's (downlink) own generator, so the k-th message of a worker
    always takes the same time (see :mod:`gradsparse.engines.async_sim`). Uplink: one worker
    message of its exact frame size. Downlink: the model, sent dense at its own precision
    (``model_nbytes``, a dense frame).
    """

    def __init__(self, law, uplink_streams: list[torch.Generator], downlink_streams: list[torch.Generator],
                 model_nbytes: int, ledger: ByteLedger | None = None) -> None:
        super().__init__(ledger)
        self.law = law
        self.uplink_streams, self.downlink_streams = uplink_streams, downlink_streams
        self.model_nbytes = int(model_nbytes)

    def send_uplink(self, worker: int, nbytes: int, now: float) -> float:
        """Worker ``worker`` sends a message of ``nbytes``; returns its arrival time."""
        self.ledger.add(nbytes, 0, 1, 0)
        return now + self.law.draw(self.uplink_streams[worker], int(nbytes))

    def send_model(self, worker: int, now: float) -> float:
        """The server sends the model to ``worker``; returns its arrival time."""
        self.ledger.add(0, self.model_nbytes, 0, 1)
        return now + self.law.draw(self.downlink_streams[worker], self.model_nbytes)
