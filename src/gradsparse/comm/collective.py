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
from .ledger import ByteLedger

__all__ = ["CollectiveChannel", "ring_all_reduce_nbytes"]

#: bytes each rank contributes to the size exchange: its payload size and a flag word (int64 each)
SIZE_RECORD_NBYTES = 16


def ring_all_reduce_nbytes(nbytes: int, world: int) -> int:
    """Bytes one rank transmits in a ring all-reduce of ``nbytes`` (reduce-scatter then
    all-gather: 2 (P - 1) / P of the buffer)."""
    return (2 * (world - 1) * int(nbytes)) // world


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

    def send_frames(self, payload: torch.Tensor, sizes: list[int], messages: int = 1) -> torch.futures.Future:
        """Start the all-to-all of every rank's payload (``payload``: this rank's uint8 frames;
        ``sizes``: every rank's byte count, from :meth:`exchange_sizes`; ``messages``: how many
        messages (frames) each rank's payload holds). Returns a future of the list of every
        rank's payload (uint8 tensors on :attr:`device`, this rank's own included)."""
        world, rank = self.world, self.rank
        mine = int(payload.numel())
        if sizes[rank] != mine:
            raise ValueError(f"rank {rank} exchanged size {sizes[rank]} but holds a payload of {mine} bytes")
        self._charge_frames(sizes, messages)
        payload = payload.to(self.device)
        if world == 1:
            fut = torch.futures.Future()
            fut.set_result([payload])
            return fut
        in_splits = [0 if q == rank else mine for q in range(world)]
        out_splits = [0 if q == rank else sizes[q] for q in range(world)]
        send = payload.repeat(world - 1) if mine else payload
        received = torch.empty(sum(out_splits), dtype=torch.uint8, device=self.device)
        work = dist.all_to_all_single(received, send, out_splits, in_splits, group=self.group, async_op=True)

        def split(_fut, _keep=send):  # _keep: the input stays alive until the collective is done
            parts, off = [], 0
            for q in range(world):
                if q == rank:
                    parts.append(payload)
                else:
                    parts.append(received[off : off + sizes[q]])
                    off += sizes[q]
            return parts

        return work.get_future().then(split)

    def all_reduce(self, tensor: torch.Tensor, *, message_nbytes: int = 0, messages: int = 0) -> torch.futures.Future:
        """Start a sum over ranks of ``tensor`` (in place); a future of the summed tensor.
        ``message_nbytes``/``messages``: the algorithm's message frames this dense sum carries
        (charged as messages; ``sent_bytes`` gets the ring all-reduce's bytes)."""
        world = self.world
        self.ledger.add_sent(ring_all_reduce_nbytes(tensor.numel() * tensor.element_size(), world))
        self._charge_messages([int(message_nbytes)] * world, messages)
        if world == 1:
            fut = torch.futures.Future()
            fut.set_result(tensor)
            return fut
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda _fut: tensor)

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
