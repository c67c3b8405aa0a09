"""Wire frames over torch.distributed collectives (``engine: torch`` and the DDP hook).

Every rank holds a payload: the concatenated wire frames (:func:`gradsparse.wire.encode`) of its
messages, values already rounded to the algorithm's value dtype. One exchange is two
collectives, both issued by the caller (never from a future's callback: on Gloo that hangs):

1. **size exchange** (:meth:`CollectiveChannel.exchange_sizes`, blocking, small): two int64 per
   rank, the payload's byte count and a flag word (the DDP hook uses it so that every rank learns
   whether any rank met a non-finite gradient), sent to every other rank with
   ``all_to_all_single``: each rank transmits (P - 1) x 16 bytes.
2. **frames** (:meth:`CollectiveChannel.send_frames`, asynchronous): ``all_to_all_single`` of
   uint8 tensors with uneven splits, each rank sending its payload to every other rank (its own
   split is empty) and receiving theirs. A rank transmits exactly (P - 1) x its payload: no
   padding, no forwarding (Gloo's all-gather refuses uneven sizes; padding would be sent). The
   returned future resolves to every rank's payload (this rank's own included), so a DDP hook
   can chain its aggregation with ``.then`` while backward goes on.

A dense path (:meth:`CollectiveChannel.all_reduce`, asynchronous) sums a tensor over ranks; a
ring all-reduce transmits 2 (P - 1) / P of the buffer per rank.

The other collectives of :mod:`gradsparse.comm.collectives` use the same primitives:

* ``sharded`` push: :meth:`CollectiveChannel.exchange_split_sizes` (blocking, an
  ``all_to_all_single`` of three int64 to each rank: the part's bytes, a flag and the sender's
  total, (P - 1) x 24 bytes per rank), then :meth:`CollectiveChannel.send_parts` (asynchronous
  ``all_to_all_single`` of each part to its owner: a rank transmits exactly its parts for the
  P - 1 others); pull: :meth:`exchange_sizes` and :meth:`send_frames` of the owner's reduced
  shard (``role="pull"``: charged as downlink only).
* ``allreduce``: :meth:`CollectiveChannel.all_reduce_values`, a ring all-reduce of the k values.

Diagnostics (:meth:`CollectiveChannel.gather_diagnostics`): an all-gather of plain rows that
only rank 0's metrics need (``engine: torch``); charged as ``diagnostic_bytes``.

Charging (:class:`~gradsparse.comm.ledger.ByteLedger`): ``sent_bytes`` gets what this rank
transmits in each collective, by the formulas above (checked against the kernel's TX counters
of network namespaces in ``tests/test_network.py``). With ``charge_messages`` (the DDP hook) the
channel also charges this rank's messages of the algorithm: its frames as uplink, their delivery
to the P - 1 others as downlink, so the ranks' ledgers add up to the simulator's all-to-all
ledger. ``engine: torch`` charges the algorithm's rounds with the simulator's rule instead (its
server topologies run the server step on every rank: the downlink message is computed, not
sent) and uses this channel for what it really sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .channel import Channel
from .collectives import SIZE_RECORD_NBYTES, SPLIT_RECORD_NBYTES, ring_all_reduce_nbytes
from .ledger import ByteLedger

__all__ = ["CollectiveChannel", "ring_all_reduce_nbytes"]


class CollectiveChannel(Channel):
    """Frames between the ranks of a process group (see the module docstring).

    group:           the process group (default: the world)
    device:          where the collectives' tensors live (CPU for Gloo, the rank's GPU for NCCL)
    charge_messages: also charge this rank's messages of the algorithm (see the module docstring)
    """

    def __init__(self, group=None, device: torch.device | str | None = None, charge_messages: bool = True,
                 ledger: ByteLedger | None = None) -> None:
        super().__init__(ledger)
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.charge_messages = bool(charge_messages)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    # ---- the two collectives of an exchange -------------------------------------------------
    def exchange_sizes(self, nbytes: int, flag: int = 0) -> tuple[list[int], list[int]]:
        """Blocking exchange of (payload bytes, flag) of every rank -> (sizes, flags), lists indexed
        by rank: an ``all_to_all_single`` of the 16-byte record to every other rank (Gloo sends
        each directly; about half the protocol overhead of a ring all-gather of the same bytes)."""
        world = self.world
        mine = torch.tensor([int(nbytes), int(flag)], dtype=torch.int64, device=self.device)
        if world == 1:
            return [int(nbytes)], [int(flag)]
        out = torch.empty(2 * world, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(out, mine.repeat(world), group=self.group)
        self.ledger.add_sent((world - 1) * SIZE_RECORD_NBYTES)
        table = out.view(world, 2).cpu().tolist()
        return [int(r[0]) for r in table], [int(r[1]) for r in table]

    def send_frames(self, payload: torch.Tensor, sizes: list[int], messages: int = 1,
                    role: str = "message") -> torch.futures.Future:
        """Start the all-to-all of every rank's payload (``payload``: this rank's uint8 frames;
        ``sizes``: every rank's byte count, from :meth:`exchange_sizes`; ``messages``: how many
        messages (frames) each rank's payload holds). Returns a future of the list of every
        rank's payload (uint8 tensors on :attr:`device`, this rank's own included).
        ``role="pull"``: the payload is an owner's reduced shard (``sharded``): charged as
        downlink to the P - 1 others only (its uplink was the pushed parts)."""
        world, rank = self.world, self.rank
        mine = int(payload.numel())
        if sizes[rank] != mine:
            raise ValueError(f"rank {rank} exchanged size {sizes[rank]} but holds a payload of {mine} bytes")
        if role == "pull":
            self.ledger.add_sent((world - 1) * mine)
            if self.charge_messages:
                self.ledger.add(0, (world - 1) * mine, 0, (world - 1) * messages if mine else 0)
        elif role == "message":
            self._charge_frames(sizes, messages)
        else:
            raise ValueError(f"role must be 'message' or 'pull', got {role!r}")
        payload = payload.to(self.device)
        if world == 1:
            return _done([payload])
        send = payload.repeat(world - 1) if mine else payload
        return self._all_to_all_uneven(send, [0 if q == rank else mine for q in range(world)], sizes, payload)

    def all_reduce(self, tensor: torch.Tensor, *, message_nbytes: int = 0, messages: int = 0) -> torch.futures.Future:
        """Start a sum over ranks of ``tensor`` (in place); a future of the summed tensor.
        ``message_nbytes``/``messages``: the algorithm's message frames this dense sum carries
        (charged as messages; ``sent_bytes`` gets the ring all-reduce's bytes)."""
        world = self.world
        self.ledger.add_sent(ring_all_reduce_nbytes(tensor.numel() * tensor.element_size(), world))
        self._charge_messages([int(message_nbytes)] * world, messages)
        if world == 1:
            return _done(tensor)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda _fut: tensor)

    def exchange_split_sizes(self, sizes: list[int], flag: int = 0) -> tuple[list[int], list[int], list[int]]:
        """Blocking all-to-all of split records: this rank will send ``sizes[o]`` bytes to rank o
        (its own entry is ignored). Returns, indexed by sender: the bytes each rank will send to
        this one, each rank's flag and each rank's total to the others (so every rank can take
        the same decision on the totals)."""
        world, rank = self.world, self.rank
        if len(sizes) != world:
            raise ValueError(f"{len(sizes)} split sizes for a world of {world} ranks")
        total = sum(int(b) for o, b in enumerate(sizes) if o != rank)
        mine = torch.tensor([[int(b), int(flag), total] for b in sizes], dtype=torch.int64, device=self.device)
        self.ledger.add_sent((world - 1) * SPLIT_RECORD_NBYTES)
        if world == 1:
            table = mine.cpu().tolist()
        else:
            got = torch.empty_like(mine)
            dist.all_to_all_single(got, mine, group=self.group)
            table = got.cpu().tolist()
        return [int(r[0]) for r in table], [int(r[1]) for r in table], [int(r[2]) for r in table]

    def send_parts(self, parts: list[torch.Tensor], received_sizes: list[int]) -> torch.futures.Future:
        """Start the all-to-all of split parts: ``parts[o]`` (uint8, possibly empty) goes to
        rank o, ``parts[rank]`` stays; ``received_sizes[q]``: the bytes rank q sends here (from
        :meth:`exchange_split_sizes`). Returns a future of the list of the parts this rank
        receives, indexed by sender (its own part included). Charges ``sent_bytes`` with the
        parts for the others and, with ``charge_messages``, uplink with them (one message per
        non-empty part)."""
        world, rank = self.world, self.rank
        if len(parts) != world:
            raise ValueError(f"{len(parts)} parts for a world of {world} ranks")
        out_bytes = [0 if o == rank else int(p.numel()) for o, p in enumerate(parts)]
        self.ledger.add_sent(sum(out_bytes))
        if self.charge_messages:
            self.ledger.add(sum(out_bytes), 0, sum(1 for b in out_bytes if b), 0)
        own = parts[rank].to(self.device)
        if world == 1:
            return _done([own])
        send = torch.cat([p.to(self.device) for o, p in enumerate(parts) if o != rank]) if sum(out_bytes) else \
            torch.zeros(0, dtype=torch.uint8, device=self.device)
        return self._all_to_all_uneven(send, out_bytes, received_sizes, own)

    def _all_to_all_uneven(self, send: torch.Tensor, send_splits: list[int], received_sizes: list[int],
                           own: torch.Tensor) -> torch.futures.Future:
        """Start ``all_to_all_single`` of uint8 ``send`` (``send_splits[q]`` bytes to rank q, 0 to
        this rank) receiving ``received_sizes[q]`` bytes from each rank q; a future of the list of
        what each rank sent here, indexed by sender, with ``own`` in this rank's place."""
        world, rank = self.world, self.rank
        recv_splits = [0 if q == rank else int(received_sizes[q]) for q in range(world)]
        received = torch.empty(sum(recv_splits), dtype=torch.uint8, device=self.device)
        work = dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.group, async_op=True)

        def split(_fut, _keep=send):  # _keep: the input stays alive until the collective is done
            got, off = [], 0
            for q in range(world):
                if q == rank:
                    got.append(own)
                else:
                    got.append(received[off : off + recv_splits[q]])
                    off += recv_splits[q]
            return got

        return work.get_future().then(split)

    def all_reduce_values(self, values: torch.Tensor, messages: int = 1) -> torch.futures.Future:
        """Start a sum over ranks of ``values`` (in place; ``collective: allreduce``, the k values
        of a shared support): ``sent_bytes`` gets the ring all-reduce's bytes; with
        ``charge_messages`` the values count once as uplink and their sum once as downlink."""
        world = self.world
        nbytes = values.numel() * values.element_size()
        self.ledger.add_sent(ring_all_reduce_nbytes(nbytes, world))
        if self.charge_messages:
            self.ledger.add(nbytes, nbytes, messages, messages)
        if world == 1:
            return _done(values)
        work = dist.all_reduce(values, group=self.group, async_op=True)
        return work.get_future().then(lambda _fut: values)

    def any_flag(self, flag: int) -> bool:
        """Blocking: whether any rank has a non-zero ``flag`` (a ring all-reduce of one int64,
        charged to ``sent_bytes``)."""
        world = self.world
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        self.ledger.add_sent(ring_all_reduce_nbytes(8, world))
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(int(t.item()))

    def which_ranks(self, flag: int) -> list[int]:
        """Blocking all-gather of every rank's ``flag`` (after :meth:`any_flag` said one is set:
        the ranks to name in the error)."""
        world = self.world
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(world)]
        self.ledger.add_sent((world - 1) * 8)
        dist.all_gather(out, t, group=self.group)
        return [int(x.item()) for x in out]

    def sum_over_ranks(self, value: int) -> int:
        """Blocking sum of one integer over ranks: bookkeeping (e.g. the ranks' sent bytes for
        ``all_ranks_sent_bytes``), charged as ``diagnostic_bytes``."""
        world = self.world
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self.ledger.add_sent(ring_all_reduce_nbytes(8, world), diagnostic=True)
        if world > 1:
            dist.all_reduce(t, group=self.group)
        return int(t.item())

    def gather_payloads_diagnostic(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's uint8 ``payload`` (uneven sizes) on every rank, for metrics only: the
        all-gather's size exchange and frames, charged as ``diagnostic_bytes`` (``engine: torch``
        under ``sharded``/``allreduce``, where the messages themselves do not travel whole)."""
        world, rank = self.world, self.rank
        mine = torch.tensor([int(payload.numel())], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(sizes, mine, group=self.group)
        sizes = [int(t.item()) for t in sizes]
        self.ledger.add_sent((world - 1) * (8 + sizes[rank]), diagnostic=True)
        payload = payload.to(self.device)
        recv_splits = [0 if q == rank else sizes[q] for q in range(world)]
        send_splits = [0 if q == rank else sizes[rank] for q in range(world)]
        send = payload.repeat(world - 1) if sizes[rank] else payload
        received = torch.empty(sum(recv_splits), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.group)
        parts, off = [], 0
        for q in range(world):
            if q == rank:
                parts.append(payload)
            else:
                parts.append(received[off : off + sizes[q]])
                off += sizes[q]
        return parts

    def gather_diagnostics(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` (the same shape and dtype everywhere) stacked ``[P, ...]`` on the
        CPU: plain data that only metrics need (``diagnostic_bytes``: a ring all-gather)."""
        world = self.world
        t = row.contiguous().to(self.device)
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t, group=self.group)
        self.ledger.add_sent((world - 1) * t.numel() * t.element_size(), diagnostic=True)
        return torch.stack(out).cpu()

    # ---- charging ---------------------------------------------------------------------------
    def _charge_frames(self, sizes: list[int], messages: int) -> None:
        world, mine = len(sizes), sizes[self.rank]
        self.ledger.add_sent((world - 1) * mine)
        self._charge_messages(sizes, messages)

    def _charge_messages(self, sizes: list[int], messages: int) -> None:
        if self.charge_messages:
            world, mine = len(sizes), sizes[self.rank]
            self.ledger.add(mine, (world - 1) * mine, messages, (world - 1) * messages)


def _done(value) -> torch.futures.Future:
    """A future already holding ``value`` (a world of one rank sends nothing)."""
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut
