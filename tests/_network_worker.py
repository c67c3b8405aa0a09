"""One rank of tests/test_network.py, run inside its network namespace (not collected by pytest).

usage: python _network_worker.py RANK WORLD MASTER_ADDR PORT OUT.json

For each method: DDP with gradsparse's hook on a 1,049,600-parameter model, 2 untimed steps
(bucket rebuild), a barrier, then STEPS steps between two readings of this namespace's TX counter
(/sys/class/net/eth0/statistics/tx_bytes) and of the hook's ``sent_bytes``. Writes
{method: {"sent": bytes the hook reports, "tx": bytes the kernel counted}} for this rank.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 4
METHODS = {
    "topk1": dict(compressor=("topk", dict(density=0.02, scope="layerwise"))),
    "topk1_fp16": dict(compressor=("topk", dict(density=0.02, scope="layerwise")), value_dtype="fp16"),
    "hard_threshold": dict(compressor=("hard_threshold", dict(threshold=3e-5))),
    "identity": dict(compressor=("identity", {})),
    # collectives (gradsparse.comm.collectives)
    "topk1_sharded": dict(compressor=("topk", dict(density=0.02, scope="layerwise")), collective="sharded"),
    "topk1_sharded_bidirectional": dict(compressor=("topk", dict(density=0.02, scope="layerwise")), collective="sharded",
                                        down=("topk", dict(density=0.02))),
    "randomk_allreduce": dict(compressor=("randomk", dict(density=0.02, shared_support=True)), collective="allreduce"),
}


def tx() -> int:
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        return int(f.read())


def main() -> None:
    rank, world, addr, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    import gradsparse.ddp as gddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import make_compressor

    results = {}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 1024, generator=g), torch.randn(8, 1024, generator=g)
    for name, spec in METHODS.items():
        torch.manual_seed(0)
        net = nn.Linear(1024, 1024)
        model = DDP(net)
        kind, options = spec["compressor"]
        topology = {}
        if "down" in spec:
            topology = dict(topology="bidirectional", down_compressor=make_compressor(spec["down"][0], **spec["down"][1]))
        alg = Algorithm(compressor=make_compressor(kind, gddp.layout_of(net), **options), feedback="ef",
                        value_dtype=spec.get("value_dtype", "fp32"), **topology)
        state = gddp.SparsifiedState(model, alg, lr=0.01, collective=spec.get("collective", "allgather"))
        model.register_comm_hook(state, gddp.hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

        for _ in range(2):
            step()
        dist.barrier()
        time.sleep(0.3)  # the barrier's own packets and acknowledgements are out before the first reading
        tx0, sent0 = tx(), state.sent_bytes
        for _ in range(STEPS):
            step()
        time.sleep(0.3)  # delayed acknowledgements of the last step's data
        results[name] = {"sent": state.sent_bytes - sent0, "tx": tx() - tx0,
                         "dense_fallbacks": state.dense_fallbacks}
        dist.barrier()
    with open(out, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
