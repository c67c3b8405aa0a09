"""A DDP communication hook: top-k / random-k / hard-threshold / a byte budget, with error feedback.

Drop it into any ``DistributedDataParallel`` training script::

    import gradsparse.ddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK

    model = DDP(net)
    alg = Algorithm(compressor=TopK(density=0.01, scope="layerwise", layout=gradsparse.ddp.layout_of(net)),
                    feedback="ef")
    state = gradsparse.ddp.SparsifiedState(model, alg, lr=0.1)
    model.register_comm_hook(state, gradsparse.ddp.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # plain SGD applies the algorithm's update

What the hook does with a bucket at step t (P ranks, rank r):

1. **Worker step, per parameter** (:meth:`~gradsparse.algorithm.Algorithm.worker_update_`, the
   entry every engine calls; in place unless worker momentum, weight decay or ``on_nonfinite:
   skip`` need the out-of-place step): the
   parameter's gradient g is one row of a one-segment algorithm whose compressor is the
   model-wide one restricted to that parameter (:func:`segment_compressor`), so the result equals
   the simulator's ``scope: layerwise``: momentum (if any), ``a = e + c g``, ``s = C(a)`` with its
   values rounded to the algorithm's ``value_dtype`` (what the receivers decode), ``e <- a - s``.
   Memories, momentum and compressor state are keyed by parameter NAME, so DDP's bucket
   rebuild after the first iteration loses nothing.
2. **Frames**: the bucket's messages as wire frames (:func:`gradsparse.wire.encode`, one frame
   per parameter, concatenated; values in ``value_dtype``), a uint8 tensor of exactly the bytes
   the algorithm counts.
3. **Exchange** (:class:`~gradsparse.comm.CollectiveChannel`): a small blocking size exchange
   (payload bytes and a non-finite flag of every rank), then an *asynchronous*
   ``all_to_all_single`` of the frames (each rank sends its payload to the P - 1 others).
   The hook returns at once a future chained on it (``.then``), so this bucket travels while
   backward computes the next ones.
4. **Aggregate** (in the future's callback): decode the other ranks' frames, and write into the
   bucket the server step's update on the P messages (weights 1/P): ``U / lr`` for
   ``ef``/``ef-scaled``/``none`` (the step size is inside the messages) or ``U`` for ``memory``,
   so ``torch.optim.SGD(lr)`` without momentum or weight decay applies exactly the algorithm's
   update ``w <- w - U``. (With another optimizer prefer ``feedback: memory``: the bucket then
   holds the averaged compressed direction.)

**Never more than dense** (``dense_fallback``, on by default): after the size exchange every rank
knows every payload; when the largest costs its rank more than a dense ring all-reduce of the
bucket would, (P - 1) x max_q |payload_q| > 2 (P - 1) / P x |bucket|, every rank densifies its
messages into the bucket and the bucket is all-reduced instead (the same sum, up to summation
order; counted in ``dense_fallbacks``). So a hard-threshold whose memories grow, or a density
too high for the world size, costs at most what DDP's own all-reduce costs.

**Bytes** (``state.ledger``, a :class:`~gradsparse.comm.ByteLedger`, charged by the channel):
``sent_bytes`` is what this rank handed to the collectives (its frames once per other rank, the
size records, all-reduces at 2 (P - 1) / P of the buffer), within a few percent of the kernel's
TX counter (``tests/test_network.py``); ``uplink_bytes`` its messages' frames (the algorithm's
count), ``downlink_bytes`` their delivery to the P - 1 others, so the ranks' ledgers add up to
the simulator's. ``dense_bytes`` is what DDP's all-reduce of the same buckets would have sent.

**Collectives** (``collective``, :mod:`gradsparse.comm.collectives`; steps 3 and 4 above are
``allgather``, the default):

* ``sharded``: the bucket's parameters (in the model's registration order) make one vector; rank
  o owns 1/P of every parameter (a contiguous range). Each rank splits its messages by owner
  (one frame per owner), exchanges split records (blocking: each part's bytes, the non-finite
  flag and the rank's push total), pushes the parts (``all_to_all_single``, waited for: the
  owner's sum needs them), sums the P parts of its own slices (weights 1/P, message units), and
  sends back the reduced shard: the union of the parts' supports, values rounded to
  ``value_dtype`` (a size exchange, then an asynchronous pull that the returned future is
  chained on). Equal to ``allgather`` up to the rounding of the sums. With an algorithm of
  topology ``bidirectional`` (``Bidirectional(TopK(density=rho))``) each owner sends C_down(G)
  of its slices instead (top-k at rho of each slice, G = U + delta, delta <- G - C_down(G) kept
  per parameter name in ``state.shard_memory``): paper 003's bidirectional scheme per shard,
  O(k) pull. Dense fall-back: when some rank's push total exceeds half a ring all-reduce of the
  bucket (the pull of a shard is at most a dense shard: about the other half), every rank sends
  the bucket dense.
* ``allreduce``: with ``RandomK(..., shared_support=True)`` every rank's message of a parameter
  holds the same support (the seed of the run, the step and the parameter); the bucket's k
  values (zeros for a skipped message) are summed by one ring ``all_reduce`` in the value
  dtype, after a one-integer non-finite check (``on_nonfinite: stop``). No indices, no seeds,
  no size exchange.

Both also run in whole-model mode (one vector: the whole model), where they equal
``engine: torch`` and the simulator run with the same ``collective`` (bytes included); they keep
no server momentum. The ledger follows the collective: ``uplink_bytes`` the parts this rank
pushed (``sharded``) or its k values (``allreduce``), ``downlink_bytes`` its shard x (P - 1), or
the summed values once.

``scope: entire`` (one top-k over the concatenation of all parameters, in registration order)
and ``budget_threshold`` (one byte budget over the whole model) run in *whole-model mode*
(``whole_model=True``, their default): every bucket's gradients are copied into one model-sized
buffer and its future is left pending; at the last bucket the algorithm runs once on the whole
model (one message, one exchange) and every pending future gets its own fresh tensor. This is
the simulator's result exactly; the cost is that no bucket communicates before the backward
pass has finished, and one model-sized buffer. With ``whole_model=False`` a
``budget_threshold`` is split over the parameters instead (parameter l gets T empty frames plus
its share d_l / d of the rest of the budget: the total never exceeds it) and keeps the overlap.

``on_nonfinite`` (the algorithm's): ``stop`` checks each bucket's gradient and messages; if any
rank finds a NaN or infinity, every rank raises :class:`NonFiniteGradient` at the same bucket
of the same step (one message naming the ranks, the step and the parameters), before anything
of that bucket is sent. ``skip`` drops the message of each parameter whose accumulated vector
is non-finite (an empty frame), restores its memory, and counts it in ``skipped_messages``.

Other features: ``warmup_steps`` uncompressed steps (a dense all-reduce of the averaged
gradient, no memory change); gradients in fp16/bf16 keep fp32 memories (``memory_dtype``);
:meth:`SparsifiedState.state_dict` holds plain tensors (loads under
``torch.load(weights_only=True)``, one file per rank); ``pickle`` drops the process group
(``__getstate__``/``__setstate__``). The step counter advances at the last bucket of an
iteration (``bucket.is_last()``); under ``no_sync()`` DDP does not call the hook, so accumulated
gradients are compressed once, at the step that synchronises. Python comm hooks cannot be
compiled (eager only).

With k = d (or the identity compressor) and ``feedback: ef`` the result equals plain DDP up to
rounding, not bit for bit: the messages carry lr x g (the step size is inside them), the bucket
receives their average divided by lr, and SGD multiplies by lr again; DDP averages g itself.
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations
import itertools
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import wire
from ..algorithm import Algorithm, WorkerStepOutput
from ..comm import CollectiveChannel
from ..comm import collectives as coll
from ..comm.collective import ring_all_reduce_nbytes
from ..compressors import Compressor
from ..divergence import all_finite
from ..messages import SparseBatch

__all__ = ["SparsifiedState", "hook", "layout_of", "segment_compressor", "NonFiniteGradient"]


from .ddp_state import NonFiniteGradient, SparsifiedState, _Segment, layout_of, segment_compressor  # noqa: F401 (layout_of, segment_compressor: re-exported)


# ---- the hook ---------------------------------------------------------------------------------
def _done(t: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def _as_uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def hook(state: SparsifiedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The communication hook (see the module docstring)."""
    buf = bucket.buffer()
    channel = state.channel(buf.device)
    world = channel.world
    step = state.step
    params = bucket.parameters()  # the buffer holds their gradients back to back, in this order
    is_last = bucket.is_last()
    state.dense_bytes += ring_all_reduce_nbytes(buf.numel() * buf.element_size(), world)
    if step < state.warmup_steps:
        buf.div_(world)
        fut = channel.all_reduce(buf, message_nbytes=sum(wire.dense_nbytes(p.numel(), buf.element_size()) for p in params),
                                 messages=len(params))
        state.messages += len(params)
        if is_last:
            state.step += 1
        return fut
    if state.whole_model:
        return _whole_model_bucket(state, channel, bucket, buf, params, step, is_last)
    lr = state.lr_at(step)
    segs, outs = compress_bucket(state, params, buf, step, lr, channel.rank)
    if state.collective != "allgather":
        return _collective_bucket(state, channel, params, buf, segs, outs, step, lr, is_last)
    payload = _as_uint8(b"".join(wire.encode(o.message, value_dtype=s.alg.value_dtype) for s, o in zip(segs, outs)))
    sizes = _exchange_sizes(state, channel, payload.numel(), buf, outs, segs, step)
    state.messages += len(outs)
    if is_last:
        state.step += 1
    if state.dense_fallback and world > 1 and (world - 1) * max(sizes) > ring_all_reduce_nbytes(
            buf.numel() * buf.element_size(), world):
        # the sparse exchange would cost some rank more than DDP's all-reduce: send the bucket dense
        state.dense_fallbacks += 1
        off = 0
        for p, o in zip(params, outs):
            n = p.numel()
            buf[off : off + n].copy_(o.message.to_dense()[0].to(buf.dtype))
            off += n
        summed = channel.all_reduce(buf, message_nbytes=payload.numel(), messages=len(outs))

        def finish_dense(f):  # per parameter one dense row: the sum of the P messages
            rows = [[SparseBatch.from_dense(v[None])] for v in _slices(f.value(), params)]
            return aggregate_bucket(state, segs, rows, buf, lr, step, world)

        return summed.then(finish_dense)
    fut = channel.send_frames(payload, sizes, messages=len(outs))
    rank = channel.rank

    def finish(f):
        rows = decode_bucket(f.value(), rank, outs, max_d=max(p.numel() for p in params))
        return aggregate_bucket(state, segs, rows, buf, lr, step, world)

    return fut.then(finish)


def _slices(flat: torch.Tensor, params) -> list[torch.Tensor]:
    out, off = [], 0
    for p in params:
        out.append(flat[off : off + p.numel()].clone())
        off += p.numel()
    return out


def _nonfinite_flag(state: SparsifiedState, buf: torch.Tensor, outs: list[WorkerStepOutput]) -> int:
    """1 when ``on_nonfinite: stop`` and this rank's gradient or messages hold NaN or infinity."""
    if state.algorithm.on_nonfinite != "stop":
        return 0
    finite = all_finite(buf) and all(all_finite(o.message.values) for o in outs)
    return 0 if finite else 1


def _raise_nonfinite(flags: list[int], segs: list[_Segment], step: int) -> None:
    if any(flags):
        ranks = [r for r, f in enumerate(flags) if f]
        names = [s.name for s in segs]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise NonFiniteGradient(f"gradsparse hook: a non-finite gradient or message on rank(s) {ranks} at step {step} "
                                f"(bucket of {shown}); on_nonfinite 'stop': every rank stops at this step")


def _exchange_sizes(state: SparsifiedState, channel: CollectiveChannel, nbytes: int, buf: torch.Tensor,
                    outs: list[WorkerStepOutput], segs: list[_Segment], step: int) -> list[int]:
    """The size exchange, carrying this rank's non-finite flag (``on_nonfinite: stop``): when any
    rank has one, every rank raises :class:`NonFiniteGradient` here, before anything is sent."""
    sizes, flags = channel.exchange_sizes(nbytes, _nonfinite_flag(state, buf, outs))
    _raise_nonfinite(flags, segs, step)
    return sizes


# ---- the sharded and all-reduce collectives -----------------------------------------------------
class SparseUpdate(NamedTuple):
    """What a ``sharded`` or ``allreduce`` exchange returns: the summed update in bucket units at
    the entries it touches (``indices`` into the vector of its segments in layout order, each at
    most once); every other entry of the ``d`` is zero. Kept sparse so that the bucket is written
    in place: a model-sized temporary costs page faults and passes that dominate at many ranks."""

    indices: torch.Tensor
    values: torch.Tensor
    d: int

    def dense(self) -> torch.Tensor:
        total = torch.zeros(self.d, dtype=self.values.dtype)
        total[self.indices] = self.values
        return total


def _collective_bucket(state: SparsifiedState, channel: CollectiveChannel, params, buf: torch.Tensor,
                       segs: list[_Segment], outs: list[WorkerStepOutput], step: int, lr: float, is_last: bool):
    """One bucket under ``collective: sharded`` or ``allreduce``: the bucket's parameters in layout
    order make one vector (each parameter a segment of it); its exchange returns the summed
    update in bucket units, written back into the bucket in the bucket's own order."""
    world = channel.world
    order = sorted(range(len(params)), key=lambda i: state.layout.names.index(segs[i].name))
    names = [segs[i].name for i in order]
    sizes = [params[i].numel() for i in order]
    starts = _segment_starts([p.numel() for p in params])  # where each parameter sits in the bucket
    flag = _nonfinite_flag(state, buf, outs)
    messages = [outs[i].message for i in order]

    def write_back(update: SparseUpdate) -> torch.Tensor:
        buf.zero_()
        buf[_bucket_positions(update.indices, sizes, [starts[i] for i in order])] = update.values.to(buf.dtype)
        return buf

    def dense_fallback() -> torch.futures.Future:
        state.dense_fallbacks += 1
        for p_i, o in enumerate(outs):
            buf[starts[p_i] : starts[p_i] + params[p_i].numel()].copy_(o.message.to_dense()[0].to(buf.dtype))
        fut = channel.all_reduce(buf, message_nbytes=0, messages=0)
        return fut.then(lambda f: aggregate_bucket(state, segs, [[SparseBatch.from_dense(v[None])] for v in
                                                                 _slices(f.value(), params)], buf, lr, step, world))

    fallback_nbytes = ring_all_reduce_nbytes(buf.numel() * buf.element_size(), world) // 2 if state.dense_fallback else None
    if state.collective == "allreduce":
        fut = _allreduce_exchange(state, channel, [(segs[i].alg.compressor, outs[i].message, params[i].numel())
                                                   for i in order], step, lr, flag, [segs[i] for i in order])
    else:
        indices = torch.cat([m.indices + at for at, m in zip(_segment_starts(sizes), messages)])
        values = torch.cat([m.values for m in messages])
        fut = _sharded_exchange(state, channel, names, sizes, indices, values, step, lr, flag,
                                [segs[i] for i in order], fallback_nbytes)
    state.messages += len(outs)
    if is_last:
        state.step += 1
    if fut is None:  # every rank saw the same split totals: the bucket goes dense
        return dense_fallback()
    return fut.then(lambda f: write_back(f.value()))


def _segment_starts(sizes: list[int]) -> list[int]:
    """Where each of the back-to-back segments of ``sizes`` starts."""
    return list(itertools.accumulate(sizes[:-1], initial=0)) if sizes else []


def _bucket_positions(indices: torch.Tensor, sizes: list[int], bucket_starts: list[int]) -> torch.Tensor:
    """Where entries of the layout-order vector (segments of ``sizes``) sit in the bucket, whose
    segments start at ``bucket_starts`` (the same segments in the bucket's own order)."""
    layout_starts = _segment_starts(sizes)
    if layout_starts == list(bucket_starts):
        return indices
    starts = torch.tensor(layout_starts, dtype=torch.int64)
    segment = torch.searchsorted(starts, indices, right=True) - 1
    return indices - starts[segment] + torch.tensor(bucket_starts, dtype=torch.int64)[segment]


def _bucket_units(state: SparsifiedState, lr: float, compressed: bool) -> float:
    """The factor from what travels (message units: sum_q p_q s_q, or the owner's C_down(G)) to
    what the bucket holds (SGD(lr) applies lr x the bucket)."""
    if compressed or state.algorithm.lr_inside:
        return 1.0 / lr if lr != 0 else 1.0
    return 1.0


def _sharded_exchange(state: SparsifiedState, channel: CollectiveChannel, names: list[str], sizes: list[int],
                      indices: torch.Tensor, values: torch.Tensor, step: int, lr: float, flag: int,
                      segs: list[_Segment], fallback_nbytes: int | None):
    """``sharded`` (:mod:`gradsparse.comm.collectives`) for one vector of segments ``names``/``sizes``
    (layout order) holding this rank's message (``indices`` into the vector, ``values``):

    1. split by owner, one frame per owner; exchange the split records (blocking; they carry the
       non-finite flag: every rank raises here, before anything is sent, and every rank's push
       total: when the largest exceeds ``fallback_nbytes`` every rank returns None, and the
       caller sends the bucket dense);
    2. push the parts (all_to_all_single), wait: this rank's shard needs the P parts;
    3. sum them in rank order with weights 1/P (message units); without a compressed downlink
       the reduced shard is the union of the parts' supports, values rounded to the value dtype;
       with topology ``bidirectional``: G = U + delta over this rank's slices, send C_down(G)
       (top-k of each slice), delta <- G - C_down(G) (``state.shard_memory``, by name);
    4. exchange the shards' sizes (blocking) and start the pull (all_to_all_single of this
       rank's shard to every rank); the returned future resolves to the whole vector's update in
       bucket units (every owner's shard), a :class:`SparseUpdate`.
    """
    world, rank = channel.world, channel.rank
    alg, vd = state.algorithm, state.algorithm.value_dtype
    plan = coll.ShardPlan(sizes, world)
    indices, values = indices.cpu(), values.cpu()  # the owner's bookkeeping runs on the CPU
    parts = plan.split(indices, values)
    # this rank's own part stays here as it is (its values are already what a frame would carry)
    frames = [b"" if o == rank else coll.encode_part(plan.owner_sizes[o], i, v, vd) for o, (i, v) in enumerate(parts)]
    received, flags, totals = channel.exchange_split_sizes([len(f) for f in frames], flag)
    _raise_nonfinite(flags, segs, step)
    if fallback_nbytes is not None and world > 1 and max(totals) > fallback_nbytes:
        return None
    got = channel.send_parts([_as_uint8(f) for f in frames], received).wait()
    size = plan.owner_sizes[rank]
    dtype = values.dtype if values.is_floating_point() else torch.float32
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    decoded = []
    for sender, payload in enumerate(got):
        if sender == rank:
            decoded.append((parts[rank][0], parts[rank][1]))
        elif payload.numel() == 0:
            decoded.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)))
        else:
            b = wire.decode(payload.cpu().numpy(), max_d=max(size, 1))
            decoded.append((b.indices, b.values))
    acc, union = coll.reduce_shard(size, decoded, [1.0 / world] * world, dtype)
    compressed = alg.topology.compresses_downlink
    if compressed:
        pieces = plan.pieces_of(rank)
        update = acc if alg.lr_inside else lr * acc
        deltas = [state.shard_delta(name, n, dtype) for name, (_, n, _) in zip(names, pieces)]
        G = update + torch.cat(deltas) if deltas else update
        cols, vals = coll.compress_shard(plan, rank, G, alg.down_compressor.density, vd)
        new = G.clone()
        new[cols] -= vals.to(dtype)
        at = 0
        for name, (_, n, _) in zip(names, pieces):
            state.shard_memory[name] = new[at : at + n].clone()
            at += n
    else:
        cols, vals = union, wire.round_values(acc[union], vd)
    shard = _as_uint8(coll.encode_part(size, cols, vals, vd))
    shard_sizes, _ = channel.exchange_sizes(shard.numel())
    fut = channel.send_frames(shard, shard_sizes, messages=1, role="pull")
    scale = _bucket_units(state, lr, compressed)

    def assemble(f):
        where, what = [], []
        for owner, payload in enumerate(f.value()):
            if owner == rank:  # this rank's own shard, as it encoded it
                where.append(plan.to_global(rank, cols))
                what.append(vals.to(dtype))
            elif payload.numel():
                b = wire.decode(payload.cpu().numpy(), max_d=max(plan.owner_sizes[owner], 1))
                where.append(plan.to_global(owner, b.indices))
                what.append(b.values.to(dtype))
        indices = torch.cat(where) if where else torch.zeros(0, dtype=torch.int64)
        values = torch.cat(what) if what else torch.zeros(0, dtype=dtype)
        return SparseUpdate(indices, values * scale if scale != 1.0 else values, plan.d)

    return fut.then(assemble)


def _allreduce_exchange(state: SparsifiedState, channel: CollectiveChannel,
                        pieces: list[tuple[Compressor, SparseBatch, int]], step: int, lr: float, flag: int,
                        segs: list[_Segment]):
    """``allreduce``: each piece (compressor, this rank's message, size; layout order) holds the
    support every rank drew from the shared seed; the k values of all pieces (zeros for a skipped
    message) go into one ring all-reduce in the value dtype (after a one-integer non-finite
    check, ``on_nonfinite: stop``: every rank raises before the values are sent). The future
    resolves to the vector's update in bucket units: the sum x 1/P at the shared supports (a
    :class:`SparseUpdate`)."""
    world = channel.world
    vt = wire.value_dtype_of(state.algorithm.value_dtype)
    if state.algorithm.on_nonfinite == "stop" and channel.any_flag(flag):
        _raise_nonfinite(channel.which_ranks(flag), segs, step)
    supports, chunks, sizes = [], [], [n for _, _, n in pieces]
    for compressor, m, n in pieces:
        cols = coll.shared_support(compressor, step, n)
        supports.append(cols)
        chunks.append(m.values.cpu().to(vt) if m.nnz else torch.zeros(cols.numel(), dtype=vt))
    values = torch.cat(chunks) if chunks else torch.zeros(0, dtype=vt)
    fut = channel.all_reduce_values(values)
    scale = _bucket_units(state, lr, False) / world
    dtype = torch.float32 if vt in (torch.float16, torch.bfloat16) else vt

    indices = torch.cat([at + cols for at, cols in zip(_segment_starts(sizes), supports)]) if supports else \
        torch.zeros(0, dtype=torch.int64)

    def assemble(f):
        return SparseUpdate(indices, f.value().cpu().to(dtype) * scale, sum(sizes))

    return fut.then(assemble)


def compress_bucket(state: SparsifiedState, params, buf: torch.Tensor, step: int, lr: float,
                    rank: int) -> tuple[list[_Segment], list[WorkerStepOutput]]:
    """Step 1 of the hook: the worker step of every parameter of the bucket on this rank's
    gradient (values rounded to the value dtype, memories updated)."""
    rank_id = torch.tensor([rank])
    segs, outs = [], []
    start = 0
    for p in params:
        g = buf[start : start + p.numel()]
        start += p.numel()
        seg = state.segments[state.name_of(p)]
        dtype = seg.worker.memory.flat.dtype if seg.worker.memory is not None else state._dtype_for(p)
        g_row = g.detach().reshape(1, -1).to(dtype)
        w = p.detach().reshape(-1).to(dtype) if seg.alg.weight_decay else None
        # the segment owns its state and nothing views it: the out-of-place step rebinds, as before
        out = seg.alg.worker_update_(g_row, w, seg.worker, step=step, lr=lr, workers=rank_id, rebind=True)
        segs.append(seg)
        outs.append(out)
    return segs, outs


def decode_bucket(payloads: list[torch.Tensor], rank: int, outs: list[WorkerStepOutput],
                  max_d: int) -> list[list[SparseBatch]]:
    """Every rank's messages of the bucket, per parameter (this rank's own are its messages as
    sent; the others' decoded from their frames): ``rows[i][r]``."""
    rows: list[list[SparseBatch]] = [[] for _ in outs]
    for r, payload in enumerate(payloads):
        if r == rank:
            batches = [o.message for o in outs]
        else:
            batches = wire.decode_each(payload.cpu().numpy(), max_d=max_d)
            if len(batches) != len(outs):
                raise RuntimeError(f"rank {r} sent {len(batches)} frames for a bucket of {len(outs)} parameters")
        for i, b in enumerate(batches):
            rows[i].append(b)
    return rows


def aggregate_bucket(state: SparsifiedState, segs: list[_Segment], rows: list[list[SparseBatch]], buf: torch.Tensor,
                     lr: float, step: int, world: int) -> torch.Tensor:
    """Step 4 of the hook: per parameter, the server step on the P messages (``rows[i]``: every
    rank's message, or one dense row holding their sum) with weights 1/P, written into the bucket
    as ``U / lr`` (step size inside the messages) or ``U``. Returns the bucket."""
    off = 0
    for seg, parts in zip(segs, rows):
        n = seg.layout.d
        target = buf[off : off + n]
        off += n
        dtype = seg.worker.memory.flat.dtype if seg.worker.memory is not None else target.dtype
        weight = 1.0 / world
        if _plain_average(seg.alg):
            # U = sum_q p_q s_q (times lr for memory, which SGD(lr) applies): summed straight into
            # the bucket when it has the messages' dtype
            scale = weight / lr if seg.alg.lr_inside and lr != 0 else weight
            acc = target if target.dtype == dtype else torch.zeros(n, dtype=dtype, device=target.device)
            acc.zero_()
            for b in parts:
                values = b.values.to(dtype) * scale
                if b.dense:
                    acc.add_(values)
                else:
                    acc.index_add_(0, b.indices.to(acc.device), values.to(acc.device))
            if acc is not target:
                target.copy_(acc)
            continue
        batch = SparseBatch.cat([b.with_values(b.values.to(dtype)) for b in parts])
        weights = torch.full((batch.n,), weight, dtype=dtype)
        srv = seg.alg.server_step(batch, seg.server, step=step, lr=lr, weights=weights)
        seg.server = srv.state
        # U / lr: SGD(lr) then applies w <- w - U (for memory, U = lr * D: the bucket holds D)
        update = srv.update / lr if lr != 0 else srv.update
        target.copy_(update.reshape(-1).to(buf.dtype))
    return buf


def _plain_average(alg: Algorithm) -> bool:
    """Whether the server step's update is exactly the weighted aggregate (times lr for
    ``memory``): no server momentum, no compressed downlink."""
    return alg.momentum.side != "server" and not alg.topology.compresses_downlink


def _whole_model_bucket(state: SparsifiedState, channel: CollectiveChannel, bucket, buf, params, step: int, is_last: bool):
    """Whole-model mode: keep this bucket's gradients; at the last bucket compress the whole model
    once, exchange its frames and resolve every bucket's future with its own fresh tensor."""
    names, start = [], 0
    for p in params:
        name = state.name_of(p)
        a, b = state._bounds[name]
        state._grad_full[a:b].copy_(buf[start : start + p.numel()].reshape(-1))
        start += p.numel()
        names.append(name)
    fut = torch.futures.Future()
    state._pending.append((names, fut, buf.dtype))
    if not is_last:
        return fut
    alg, lr = state.algorithm, state.lr_at(step)
    rank, world = channel.rank, channel.world
    worker = state._whole_worker
    g = state._grad_full[None]
    # in place: the per-name views of the whole-model state stay current
    out = alg.worker_update_(g, None, worker, step=step, lr=lr, workers=torch.tensor([rank]))
    pending, state._pending = state._pending, []
    segs = [state.segments[n] for names_, _, _ in pending for n in names_]
    if state.collective != "allgather":  # one vector: the layout (engine torch's and the simulator's plan)
        flag = _nonfinite_flag(state, state._grad_full, [out])
        if state.collective == "allreduce":
            exchanged = _allreduce_exchange(state, channel, [(alg.compressor, out.message, state.layout.d)], step, lr,
                                            flag, segs)
        else:
            exchanged = _sharded_exchange(state, channel, list(state.layout.names), list(state.layout.sizes),
                                          out.message.indices, out.message.values, step, lr, flag, segs, None)
        state.messages += 1
        state.step += 1
        return exchanged.then(lambda f: _resolve_pending(state, pending, fut, f.value().dense()))
    payload = _as_uint8(wire.encode(out.message, value_dtype=alg.value_dtype))
    sizes = _exchange_sizes(state, channel, payload.numel(), state._grad_full, [out], segs, step)
    state.messages += 1
    state.step += 1
    exchanged = channel.send_frames(payload, sizes, messages=1)

    def finish(f):
        rows = decode_bucket(f.value(), rank, [out], max_d=state.layout.d)[0]
        batch = SparseBatch.cat([b.with_values(b.values.to(g.dtype)) for b in rows])
        weights = torch.full((world,), 1.0 / world, dtype=g.dtype, device=g.device)
        srv = alg.server_step(batch, state._whole_server, step=step, lr=lr, weights=weights)
        if state._whole_server.momentum is not None:
            state._whole_server.momentum.flat.copy_(srv.state.momentum.flat)
        # U / lr: SGD(lr) then applies w <- w - U (for memory feedback U = lr x D: the bucket holds D)
        update = srv.update / lr if lr != 0 else srv.update
        return _resolve_pending(state, pending, fut, update)

    return exchanged.then(finish)


def _resolve_pending(state: SparsifiedState, pending: list, fut: torch.futures.Future, update: torch.Tensor):
    """Whole-model mode: every pending bucket's future gets its own fresh tensor cut from the
    model-sized ``update`` (bucket units); returns the last bucket's."""
    mine = None
    for bucket_names, pending_fut, dtype in pending:
        t = torch.cat([update[state._bounds[n][0] : state._bounds[n][1]] for n in bucket_names]).to(
            device=state._grad_full.device, dtype=dtype)
        if pending_fut is fut:
            mine = t
        else:
            pending_fut.set_result(t)
    return mine
