"""The collectives that carry an all-to-all round, who owns what, and what each one sends.

An all-to-all round (every rank ends with ``sum_q p_q s_q`` of the P ranks' messages) can travel
three ways (``collective`` in a config, ``SparsifiedState(collective=...)`` in the DDP hook):

``allgather`` (default)
    every rank sends its message's frames to each of the P - 1 others (``all_to_all_single``
    with its whole payload to everyone: the volume of a ring all-gather, without padding), and
    every rank sums the P messages. Per rank and round:
    ``(P - 1) |m_r| + (P - 1) x 16`` bytes (the size record). Grows with P.
``sharded``
    every rank *owns* one slice of each segment (see :class:`ShardPlan`); a rank splits its
    message by owner and pushes each part to its owner (``all_to_all_single``, uneven splits,
    after an exchange of the split sizes); the owner sums the P parts of its slice and sends the
    reduced shard back to everyone (pull). Per rank:
    ``sum_{o != r} |part_{r,o}| + (P - 1) |shard_r| + (P - 1) x (24 + 16)`` bytes, about
    ``(P - 1)/P x |m| + (P - 1) x g |m| / P`` where g in [1, P] is the fill-in of the sum (how
    many ranks' supports the union of a shard spans). With a compressed downlink (topology
    ``bidirectional``: the owner sends ``C_down(G_o)`` of its own slice, with its own downlink
    memory, paper 003 per shard) the pull is ``(P - 1)/P x k_down`` and the traffic per rank
    stays about ``2 (P - 1)/P x k`` entries: flat in P. Without it the pull grows with the
    fill-in (up to the all-gather's volume when the ranks' supports are disjoint).
``allreduce``
    random-k with one support shared by every rank (``RandomK(shared_support=True)``): the
    messages share their columns, so their sum is a dense ``all_reduce`` of the k values (no
    indices, no seed on the wire: every rank regenerates the support). Per rank: the ring
    all-reduce's ``2 (P - 1)/P x k x value bytes``. Flat in P.

Ownership (:class:`ShardPlan`): owner o of P holds the contiguous range
``[floor(o d_l / P), floor((o + 1) d_l / P))`` of every segment l (a parameter tensor, or a
segment of the model's layout), i.e. each rank owns 1/P of every segment. Contiguous ranges
rather than a hash because (1) a sorted message splits into owner parts with one search per
entry and each part keeps its indices sorted and close, so the wire's gap codes (varint, rice,
packed) cost no more per index than in the unsplit message (a hash would scatter them over the
owner's slice); (2) the owner's slice of every segment lives inside that segment, so a
per-parameter state (the owner's downlink memory) is keyed by the parameter's name and survives
the DDP bucket rebuild; (3) nothing random: the plan is a function of the sizes and P. The price
is balance: owners get 1/P of every segment's *coordinates*, not of its *entries*; a segment whose
large entries cluster in one range loads that range's owner more (a hash would spread them; Zen,
OSDI'25, hashes for that reason). An owner's part of a bucket or model is the concatenation of
its slices in segment order, one frame per (sender, owner).

:func:`collective_traffic` is the rule the simulator's channel charges and predicts with
(:class:`~gradsparse.comm.channel.SimulatedRounds`); :class:`~gradsparse.comm.collective.CollectiveChannel`
charges each rank what it really hands to the collectives, by the same formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import wire
from ..messages import SparseBatch
from ..segments import Layout

__all__ = ["COLLECTIVES", "check_collective", "ShardPlan", "Traffic", "collective_traffic", "allgather_traffic",
           "sharded_traffic", "allreduce_traffic", "SIZE_RECORD_NBYTES", "SPLIT_RECORD_NBYTES"]

COLLECTIVES = ("allgather", "sharded", "allreduce")

#: bytes per rank and destination of the all-gather's size exchange: payload bytes, flag (int64)
SIZE_RECORD_NBYTES = 16
#: bytes per rank and destination of the sharded push's size exchange: the part's bytes, a flag
#: and the sender's total push bytes (int64 each; the total lets every rank take the same
#: dense fall-back decision)
SPLIT_RECORD_NBYTES = 24


def check_collective(collective: str) -> str:
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {', '.join(COLLECTIVES)}; got {collective!r}")
    return collective


def ring_all_reduce_nbytes(nbytes: int, world: int) -> int:
    """Bytes one rank transmits in a ring all-reduce of ``nbytes`` (reduce-scatter then
    all-gather: 2 (P - 1) / P of the buffer)."""
    return (2 * (world - 1) * int(nbytes)) // world


class ShardPlan:
    """Which rank owns which entries of a vector made of consecutive segments (see the module
    docstring): owner o holds ``[floor(o d_l / P), floor((o + 1) d_l / P))`` of segment l.

    sizes: the segments' lengths d_l, in vector order; world: P.

    A *piece* is one owner's slice of one segment; pieces are numbered in vector order
    (segment-major, owner-minor). Owner o's *shard* is its pieces concatenated in segment order:
    a vector of ``owner_sizes[o]`` entries, its local coordinates.
    """

    def __init__(self, sizes, world: int) -> None:
        sizes = [int(s) for s in sizes]
        world = int(world)
        if world < 1:
            raise ValueError(f"a shard plan needs world >= 1, got {world}")
        if any(s < 0 for s in sizes):
            raise ValueError(f"segment sizes must be >= 0, got {sizes}")
        self.sizes, self.world = sizes, world
        self.d = sum(sizes)
        starts, lengths, owners, local = [], [], [], []
        filled = [0] * world
        seg_start = 0
        for d_l in sizes:
            cuts = [(o * d_l) // world for o in range(world + 1)]
            for o in range(world):
                n = cuts[o + 1] - cuts[o]
                starts.append(seg_start + cuts[o])
                lengths.append(n)
                owners.append(o)
                local.append(filled[o])
                filled[o] += n
            seg_start += d_l
        #: per piece: first global index, length, owner, offset in the owner's shard
        self.piece_start = torch.tensor(starts, dtype=torch.int64)
        self.piece_length = torch.tensor(lengths, dtype=torch.int64)
        self.piece_owner = torch.tensor(owners, dtype=torch.int64)
        self.piece_local = torch.tensor(local, dtype=torch.int64)
        #: entries each owner holds
        self.owner_sizes = filled

    @staticmethod
    def of_layout(layout: Layout, world: int) -> "ShardPlan":
        return ShardPlan(layout.sizes, world)

    def pieces_of(self, owner: int) -> list[tuple[int, int, int]]:
        """Owner ``owner``'s pieces as (global start, length, offset in its shard), segment order."""
        sel = (self.piece_owner == owner).nonzero().reshape(-1).tolist()
        return [(int(self.piece_start[p]), int(self.piece_length[p]), int(self.piece_local[p])) for p in sel]

    def piece_layout(self) -> Layout:
        """The pieces as segments of a layout (vector order): a layer-wise compressor over it
        compresses every owner's slice of every segment alone, as the owners do."""
        lengths = [int(n) for n in self.piece_length.tolist()]
        return Layout(tuple(f"piece{i}" for i in range(len(lengths))), tuple((n,) for n in lengths))

    def owner_of(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner, index in the owner's shard) of each global index."""
        idx = indices.to(torch.int64).reshape(-1)
        piece = torch.searchsorted(self.piece_start, idx, right=True) - 1  # empty pieces are skipped
        return self.piece_owner[piece], idx - self.piece_start[piece] + self.piece_local[piece]

    def split(self, indices: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Entries (global indices, values) by owner: ``parts[o] = (local indices, values)``, in
        the order given (ascending global indices give ascending local ones)."""
        owner, local = self.owner_of(indices)
        order = torch.sort(owner, stable=True).indices
        counts = torch.bincount(owner, minlength=self.world).tolist()
        local, vals = local[order], values.reshape(-1)[order]
        parts, off = [], 0
        for c in counts:
            parts.append((local[off : off + c], vals[off : off + c]))
            off += c
        return parts

    def to_global(self, owner: int, local: torch.Tensor) -> torch.Tensor:
        """Global indices of entries of owner ``owner``'s shard."""
        mine = (self.piece_owner == owner).nonzero().reshape(-1)
        offsets, starts = self.piece_local[mine], self.piece_start[mine]
        p = torch.searchsorted(offsets, local.to(torch.int64), right=True) - 1
        return local - offsets[p] + starts[p]


def _row(d: int, indices: torch.Tensor, values: torch.Tensor) -> SparseBatch:
    return SparseBatch(int(d), torch.tensor([0, int(indices.numel())], dtype=torch.long), values, indices,
                       sorted_rows=True)


def part_frames(plan: ShardPlan, message: SparseBatch, value_dtype: str) -> list[list[int]]:
    """``push[q][o]``: the frame bytes of row q's part for owner o (0 when the part is empty:
    nothing is sent for it). Vectorised: the entries are grouped by (owner, row) once, and each
    owner's N parts are sized in one call (P calls, not N x P)."""
    n, world = message.n, plan.world
    owner, local = plan.owner_of(message.indices)
    rows = message.row_ids()
    order = torch.sort(owner * n + rows, stable=True).indices  # rows stay sorted within an owner
    owner, local, rows = owner[order], local[order], rows[order]
    values = message.values[order]
    per_owner = torch.bincount(owner, minlength=world).tolist()
    push = torch.zeros(n, world, dtype=torch.int64)
    start = 0
    for o, count in enumerate(per_owner):
        if count:
            sel = slice(start, start + count)
            counts = torch.bincount(rows[sel], minlength=n)
            offsets = torch.zeros(n + 1, dtype=torch.long)
            torch.cumsum(counts, 0, out=offsets[1:])
            part = SparseBatch(plan.owner_sizes[o], offsets, values[sel], local[sel], sorted_rows=True)
            push[:, o] = torch.where(counts > 0, wire.encoded_nbytes(part, value_dtype=value_dtype), 0)
        start += count
    return push.tolist()


def union_shards(plan: ShardPlan, message: SparseBatch) -> list[torch.Tensor]:
    """Per owner, the sorted local indices of the union of the rows' supports in its shard: the
    support of the reduced shard it sends back (exact zeros of the sum included, so the frame's
    size does not depend on cancellations)."""
    mask = torch.zeros(plan.d, dtype=torch.bool)
    mask[message.indices] = True
    owner, local = plan.owner_of(mask.nonzero().reshape(-1))
    return [local[owner == o] for o in range(plan.world)]


def shard_frame_nbytes(plan: ShardPlan, owner: int, local: torch.Tensor, value_dtype: str) -> int:
    if local.numel() == 0:
        return 0
    vals = torch.zeros(local.numel(), dtype=torch.float32)
    return int(wire.encoded_nbytes(_row(plan.owner_sizes[owner], local, vals), value_dtype=value_dtype)[0])


def part_row(size: int, indices: torch.Tensor, values: torch.Tensor) -> SparseBatch:
    """One owner's part (or reduced shard) as a one-row message over its shard of ``size`` entries."""
    return _row(size, indices, values)


def encode_part(size: int, indices: torch.Tensor, values: torch.Tensor, value_dtype: str) -> bytes:
    """The frame of one part (``b""`` for an empty part: nothing is sent for it)."""
    if indices.numel() == 0:
        return b""
    return wire.encode(_row(size, indices, values), value_dtype=value_dtype)


def reduce_shard(size: int, parts: list[tuple[torch.Tensor, torch.Tensor]], weights, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """An owner's sum of the P parts of its shard: ``acc = sum_q weights[q] * part_q`` (dense,
    ``size`` entries, added in rank order entry by entry, as the simulator's aggregate is) and the
    union of the parts' supports (sorted local indices)."""
    acc = torch.zeros(size, dtype=dtype)
    mask = torch.zeros(size, dtype=torch.bool)
    for w, (idx, vals) in zip(weights, parts):
        if idx.numel():
            acc.index_add_(0, idx, torch.as_tensor(w, dtype=dtype) * vals.to(dtype))
            mask[idx] = True
    return acc, mask.nonzero().reshape(-1)


def compress_shard(plan: ShardPlan, owner: int, G: torch.Tensor, density: float, value_dtype: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An owner's downlink compression of its shard ``G`` (``sharded`` + ``bidirectional``):
    top-k at ``density`` of each of its pieces alone (the rule the simulator applies with top-k
    over :meth:`ShardPlan.piece_layout`). Returns (sorted local indices, values rounded to the
    value dtype)."""
    from ..compressors import TopK

    lengths = [n for _, n, _ in plan.pieces_of(owner)]
    if not lengths or G.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), G[:0]
    layout = Layout(tuple(f"piece{i}" for i in range(len(lengths))), tuple((n,) for n in lengths))
    cols = TopK(density=density, scope="layerwise", layout=layout).columns(G[None])[0]
    return cols, wire.round_values(G[cols], value_dtype)


def shared_support(compressor, step: int, d: int) -> torch.Tensor:
    """The columns every rank's shared-support random-k message holds at ``step`` (uplink
    stream): what ``collective: allreduce`` sums, regenerated by every rank."""
    from ..compressors import CompressionContext, random_k_indices

    seed = compressor.message_seeds(1, CompressionContext(step, None, "uplink"))[0]
    return random_k_indices(seed, d, compressor.k_for(d))


@dataclass
class Traffic:
    """One round of a collective: the algorithm's messages (the ledger's uplink/downlink
    counts) and what each rank transmits (``sent[r]``, bytes)."""

    uplink_bytes: int
    downlink_bytes: int
    uplink_messages: int
    downlink_messages: int
    sent: list[int] = field(default_factory=list)


def allgather_traffic(nbytes: list[int]) -> Traffic:
    """Each rank's frames to every other rank, after a size record to each."""
    world = len(nbytes)
    up = sum(int(b) for b in nbytes)
    sent = [(world - 1) * (int(b) + SIZE_RECORD_NBYTES) if world > 1 else 0 for b in nbytes]
    return Traffic(up, (world - 1) * up, world, (world - 1) * world, sent)


def sharded_traffic(push: list[list[int]], pull: list[int]) -> Traffic:
    """``push[q][o]``: bytes of rank q's part for owner o (its own part, ``push[q][q]``, stays);
    ``pull[o]``: bytes of owner o's reduced shard, sent to the P - 1 others. Uplink: the pushed
    parts; downlink: the pulled shards, once per receiving rank. Records: a split record to each
    other rank, then a size record to each other rank."""
    world = len(pull)
    if world == 1:
        return Traffic(0, 0, 0, 0, [0])
    sent, up, up_msgs = [], 0, 0
    for q in range(world):
        mine = sum(int(b) for o, b in enumerate(push[q]) if o != q)
        up += mine
        up_msgs += sum(1 for o, b in enumerate(push[q]) if o != q and b)
        sent.append(mine + (world - 1) * (int(pull[q]) + SPLIT_RECORD_NBYTES + SIZE_RECORD_NBYTES))
    down = (world - 1) * sum(int(b) for b in pull)
    return Traffic(up, down, up_msgs, (world - 1) * sum(1 for b in pull if b), sent)


def allreduce_traffic(values_nbytes: int, world: int) -> Traffic:
    """A ring all-reduce of every rank's k values (``values_nbytes`` = k x value bytes). The
    algorithm's messages: each rank's values once (uplink), their sum to each rank (downlink)."""
    b = int(values_nbytes)
    return Traffic(world * b, world * b, world, world, [ring_all_reduce_nbytes(b, world)] * world)


def collective_traffic(collective: str, message: SparseBatch, nbytes: torch.Tensor, value_dtype: str,
                       plan: ShardPlan | None = None, down_message: SparseBatch | None = None,
                       values_per_rank: int | None = None) -> Traffic:
    """What one round of ``collective`` sends for the P rows of ``message`` (``nbytes``: each
    row's frame bytes). ``sharded`` needs the ``plan``; with ``down_message`` (the owners'
    compressed downlink, one row over the whole vector) the pull carries its parts instead of
    the union of the rows' supports. ``allreduce`` needs ``values_per_rank`` (k: each rank
    all-reduces k values, whatever its row holds)."""
    world = message.n
    if collective == "allgather":
        return allgather_traffic([int(b) for b in nbytes.tolist()])
    if collective == "allreduce":
        if values_per_rank is None:
            raise ValueError("collective allreduce: the traffic needs values_per_rank (k)")
        itemsize = wire.value_dtype_of(value_dtype).itemsize
        return allreduce_traffic(int(values_per_rank) * itemsize, world)
    if collective == "sharded":
        if plan is None or plan.world != world:
            raise ValueError(f"collective sharded: the traffic needs a shard plan over {world} ranks")
        push = part_frames(plan, message, value_dtype)
        if down_message is None:
            pull = [shard_frame_nbytes(plan, o, local, value_dtype) for o, local in enumerate(union_shards(plan, message))]
        else:
            parts = plan.split(down_message.indices, down_message.values)
            pull = [int(wire.encoded_nbytes(_row(plan.owner_sizes[o], i, v), value_dtype=value_dtype)[0])
                    if i.numel() else 0 for o, (i, v) in enumerate(parts)]
        return sharded_traffic(push, pull)
    check_collective(collective)
    raise AssertionError(collective)  # pragma: no cover - every collective is handled above
