"""Benchmark of the DDP hook's own work per step (gradsparse.ddp), without the network.

One rank's step, on a real gradient of a stack of Linear 1024x1024 layers (batch 16), for
layer-wise top-k at 0.1% and 1% with ``ef`` and P = 4 ranks, split into the hook's phases as it
runs them (:func:`gradsparse.ddp.compress_bucket`, frames, :func:`~gradsparse.ddp.decode_bucket`,
:func:`~gradsparse.ddp.aggregate_bucket`; the other ranks' payloads are this rank's, decoded
P - 1 times):

* ``worker_ms``: the worker steps of every parameter (error feedback, top-k),
* ``encode_ms``: this rank's message as wire frames, ``decode_ms``: P - 1 payloads decoded,
* ``aggregate_ms``: the P messages summed into the bucket,
* ``hook_ms``: all of it, ``copy_ms``: a copy of the gradient (the memory-bandwidth yardstick),
* ``encdec_fraction``: (encode + decode) / hook, the share the wire format adds to the hook's
  compute (the network's share of a step is in ``benchmarks/bench_network.py``).

With ``--sharded``: one whole hook call for ``collective: sharded`` with the owners' top-k
(topology bidirectional, top-k 1% both ways, one bucket) at P = 4 and 16, rank 0 of P, through a
loopback channel (:class:`LoopbackChannel`: every exchange returns at once, and each peer's part
or reduced shard is one this rank built, with as many entries as a real peer's), so it is the
hook's compute alone: ``worker_ms`` and ``exchange_ms`` (split, encode P - 1 parts, decode P - 1
parts, sum the shard, the owner's top-k, encode its shard, decode P - 1 shards, write the bucket).
Its CPU per rank decides the step time when ranks share cores.

Medians of ``repeats`` runs; torch pinned to the thread count it is given (``--threads``, 1 by
default). A suite runner calls :func:`run`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

WORLD = 4


def _model(layers: int):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(1024, 1024), nn.ReLU())])


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def run(quick: bool = False, repeats: int | None = None) -> list[dict]:
    import gradsparse.ddp as gddp
    from gradsparse import wire
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK

    repeats = repeats or (3 if quick else 7)
    layers = 2 if quick else 10
    net = _model(layers)
    F.mse_loss(net(torch.randn(16, 1024)), torch.randn(16, 1024)).backward()
    params = [p for p in net.parameters()]
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    rows = []
    for density in (0.001, 0.01):
        alg = Algorithm(compressor=TopK(density=density, scope="layerwise", layout=gddp.layout_of(net)), feedback="ef")
        base = gddp.SparsifiedState(net, alg, lr=0.01)

        states = []  # a fresh state per repeat (zero memories), copied outside the timing
        for _ in range(repeats):
            states.append(copy.deepcopy(base))
            states[-1]._bind({n: p for n, p in net.named_parameters()})
        buckets = [grad.clone() for _ in range(repeats)]

        def worker():
            s, b = states.pop(), buckets.pop()
            return s, gddp.compress_bucket(s, params, b, 0, 0.01, 0)

        worker_ms, (state, (segs, outs)) = _timed(worker, repeats)
        encode_ms, payload = _timed(lambda: torch.frombuffer(bytearray(b"".join(
            wire.encode(o.message, value_dtype="fp32") for o in outs)), dtype=torch.uint8), repeats)
        decode_ms, decoded = _timed(lambda: gddp.decode_bucket([payload] * WORLD, 0, outs, max_d=1024 * 1024), repeats)
        bucket = grad.clone()
        aggregate_ms, _ = _timed(lambda: gddp.aggregate_bucket(state, segs, decoded, bucket, 0.01, 0, WORLD), repeats)
        copy_ms, _ = _timed(lambda: grad.clone(), repeats)
        hook_ms = worker_ms + encode_ms + decode_ms + aggregate_ms
        rows.append({"case": f"hook step, top-k {density:.1%} layer-wise, {WORLD} ranks", "d": grad.numel(),
                     "density": density, "payload_bytes": int(payload.numel()), "worker_ms": worker_ms,
                     "encode_ms": encode_ms, "decode_ms": decode_ms, "aggregate_ms": aggregate_ms,
                     "hook_ms": hook_ms, "copy_ms": copy_ms, "hook_x_copy": hook_ms / copy_ms,
                     "encdec_fraction": (encode_ms + decode_ms) / hook_ms, "threads": torch.get_num_threads()})
    return rows


class LoopbackChannel:
    """Rank 0 of a world of ``world`` ranks without a network, for :func:`sharded_hook_ms`: the
    size exchanges return at once; in the push, sender q's part for this rank is the part this
    rank built for owner q (the owners' shards are equal here, so it decodes as one of its own);
    in the pull, every owner's reduced shard is this rank's."""

    rank = 0

    def __init__(self, world: int):
        self.world = world
        self.parts = None

    @staticmethod
    def _done(value):
        fut = torch.futures.Future()
        fut.set_result(value)
        return fut

    def exchange_split_sizes(self, sizes, flag=0):
        return list(sizes), [flag] * self.world, [sum(sizes)] * self.world

    def send_parts(self, parts, received_sizes):
        self.parts = parts
        return self._done(list(parts))

    def exchange_sizes(self, nbytes, flag=0):
        return [nbytes] * self.world, [flag] * self.world

    def send_frames(self, payload, sizes, messages=1, role="message"):
        return self._done([payload] * self.world)


def sharded_hook_ms(world: int, repeats: int, layers: int, density: float = 0.01) -> dict:
    """One hook call of ``sharded`` + owners' top-k at ``density`` on rank 0 of ``world`` (see
    the module docstring), median of ``repeats`` calls on one state (the memories evolve as in a
    run)."""
    import gradsparse.ddp as gddp
    import gradsparse.distributed.ddp_hook as hook_module
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK

    net = _model(layers)
    F.mse_loss(net(torch.randn(16, 1024)), torch.randn(16, 1024)).backward()
    params = list(net.parameters())
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    alg = Algorithm(compressor=TopK(density=density, scope="layerwise", layout=gddp.layout_of(net)), feedback="ef",
                    topology="bidirectional", down_compressor=TopK(density=density))
    state = gddp.SparsifiedState(net, alg, lr=0.01, collective="sharded")
    channel = LoopbackChannel(world)
    worker, exchange = [], []
    for step in range(repeats + 1):  # the first call is not timed (first touch of the memories)
        bucket = grad.clone()
        t0 = time.perf_counter()
        segs, outs = hook_module.compress_bucket(state, params, bucket, step, 0.01, 0)
        t1 = time.perf_counter()
        hook_module._collective_bucket(state, channel, params, bucket, segs, outs, step, 0.01, True).wait()
        t2 = time.perf_counter()
        if step:
            worker.append((t1 - t0) * 1e3)
            exchange.append((t2 - t1) * 1e3)
    worker_ms, exchange_ms = statistics.median(worker), statistics.median(exchange)
    return {"case": f"hook call, top-k {density:.0%} sharded + owners' top-k, rank 0 of {world}", "d": grad.numel(),
            "world": world, "worker_ms": worker_ms, "exchange_ms": exchange_ms, "hook_ms": worker_ms + exchange_ms,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sharded", action="store_true", help="also one sharded hook call at P = 4 and 16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.quick)
    if args.sharded:
        rows += [sharded_hook_ms(world, 3 if args.quick else 7, 2 if args.quick else 10) for world in (4, 16)]
    for r in rows:
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
