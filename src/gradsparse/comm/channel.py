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
    comes down.

    ``collective`` (:mod:`gradsparse.comm.collectives`) says how a round would travel between N
    real ranks, and the channel charges what that sends:

    * ``allgather`` (default): the topology says how many copies travel
      (``Topology.synchronous_traffic``): all-to-all delivers each worker's message to the
      N - 1 others; a parameter server its message to each of the N workers;
    * ``sharded`` (needs ``plan``, a :class:`~gradsparse.comm.collectives.ShardPlan` over the N
      ranks): uplink = the parts each worker pushes to the other owners, downlink = each
      owner's reduced shard (or, with a compressed downlink, its part of the server's message)
      once per other rank;
    * ``allreduce`` (needs ``values_per_rank``, k): each worker's k values once up, their sum
      once to each worker.

    Every collective also charges ``all_ranks_sent_bytes``: what the N ranks would hand to their
    transports in the round (frames, size records, ring all-reduce), the same formulas
    :class:`~gradsparse.comm.collective.CollectiveChannel` charges each real rank with; the last
    round's per-rank figures are in :attr:`last_traffic`.
    """

    def __init__(self, topology, n_workers: int, ledger: ByteLedger | None = None, *, collective: str = "allgather",
                 plan=None, value_dtype: str = "fp32", values_per_rank: int | None = None) -> None:
        from .collectives import check_collective

        super().__init__(ledger)
        self.topology, self.n_workers = topology, int(n_workers)
        self.collective = check_collective(collective)
        self.plan, self.value_dtype, self.values_per_rank = plan, value_dtype, values_per_rank
        if collective == "sharded" and (plan is None or plan.world != self.n_workers):
            raise ValueError(f"collective sharded needs a shard plan over the {self.n_workers} workers")
        if collective == "allreduce" and values_per_rank is None:
            raise ValueError("collective allreduce needs values_per_rank (k)")
        self.last_traffic = None
        #: charge ``all_ranks_sent_bytes`` with the prediction (off where a real transport
        #: charges what it measured: ``engine: torch``)
        self.predicts_sent = True

    def deliver_round(self, worker_nbytes: torch.Tensor, server_nbytes: int, message=None,
                      server_message=None) -> tuple[int, int]:
        """Charge one round; returns its (uplink, downlink) bytes. ``message`` (the N rows) is
        needed by ``sharded``, and ``server_message`` there when the topology compresses its
        downlink."""
        from .collectives import allgather_traffic, collective_traffic

        n = self.n_workers
        if self.collective == "allgather":
            traffic = allgather_traffic([int(b) for b in worker_nbytes.reshape(-1).tolist()])
            up, down = self.topology.synchronous_traffic(worker_nbytes, server_nbytes, n)
            down_messages = n if self.topology.has_server else (n - 1) * n
            self.ledger.add(up, down, n, down_messages)
        else:
            down_message = server_message if self.topology.compresses_downlink else None
            traffic = collective_traffic(self.collective, message, worker_nbytes, self.value_dtype, plan=self.plan,
                                         down_message=down_message, values_per_rank=self.values_per_rank)
            up, down = traffic.uplink_bytes, traffic.downlink_bytes
            self.ledger.add(up, down, traffic.uplink_messages, traffic.downlink_messages)
        if self.predicts_sent:
            self.ledger.add_all_ranks_sent(sum(traffic.sent))
        self.last_traffic = traffic
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
