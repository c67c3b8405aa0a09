"""One prepared GPU check (run it when a machine with a GPU is lent; tests never need one).

    torchrun --nproc-per-node G benchmarks/gpu_check.py      # G = number of GPUs (1 is fine)

1. The DDP hook on NCCL, one process per GPU (NCCL refuses two ranks on one GPU): layer-wise
   top-k 1% with ``ef`` on a 4-layer Linear 1024 model for 20 steps; every rank must end with the
   same parameters, and with one rank, with the simulator's (the hook's message is then the
   whole update). Prints the hook's sent bytes per step and the step time.
2. On rank 0: gradsparse's exact top-k (``kernels.topk_indices``, the pure-torch path on CUDA)
   against ``torch.topk(x.abs(), k)`` on a device vector of 25M floats at 0.1% and 1%, both
   results compared (same support: ties aside, Gaussian data has none), medians of 7 runs with
   ``torch.cuda.synchronize``.
3. On rank 0: encode and decode of a device message (``wire.encode`` copies values and columns to
   the host; decode gives host tensors), timed, and the round trip checked bit for bit.
Prints one line per figure, with the card's name.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def median_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    import gradsparse.ddp as gddp
    from gradsparse import wire
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK
    from gradsparse.kernels import topk_indices
    from gradsparse.messages import SparseBatch

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local)
    card = torch.cuda.get_device_name(dev)
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).to(dev)
    model = DDP(net, device_ids=[local])
    alg = Algorithm(compressor=TopK(density=0.01, scope="layerwise", layout=gddp.layout_of(net)), feedback="ef")
    state = gddp.SparsifiedState(model, alg, lr=0.01)
    model.register_comm_hook(state, gddp.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator(device=dev).manual_seed(rank)
    x, y = torch.randn(32, 1024, device=dev, generator=g), torch.randn(32, 1024, device=dev, generator=g)
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], t) for t in gathered)
    if rank == 0:
        print(f"[{card}] nccl hook, {world} rank(s): params equal on every rank: {same}; "
              f"sent {state.sent_bytes / state.step:.0f} B/step; median step {statistics.median(times[2:]) * 1e3:.2f} ms; "
              f"dense fallbacks {state.dense_fallbacks}")
        v = torch.randn(25_000_000, device=dev)
        for rho in (0.001, 0.01):
            k = int(rho * v.numel())
            ours = median_ms(lambda: topk_indices(v, k))
            theirs = median_ms(lambda: torch.topk(v.abs(), k))
            agree = torch.equal(topk_indices(v, k).sort().values, torch.topk(v.abs(), k).indices.sort().values)
            copy = median_ms(lambda: v.clone())
            print(f"[{card}] top-k {rho:.1%} of 25M: gradsparse {ours:.2f} ms ({ours / copy:.1f}x a copy), "
                  f"torch.topk {theirs:.2f} ms ({theirs / copy:.1f}x), ratio {theirs / ours:.2f}, same support: {agree}")
            idx = topk_indices(v, k)
            msg = SparseBatch.from_rows(idx[None], v[idx][None], v.numel(), sorted_rows=True)
            enc = median_ms(lambda: wire.encode(msg))
            data = wire.encode(msg)
            dec = median_ms(lambda: wire.decode(data))
            back = wire.decode(data)
            exact = torch.equal(back.indices, idx.cpu()) and torch.equal(back.values, v[idx].cpu())
            print(f"[{card}] wire, device message of {k} entries: encode {enc:.2f} ms, decode {dec:.2f} ms, "
                  f"{len(data)} bytes, round trip exact: {exact}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
