"""One rank of the DDP hook tests (started twice by tests/test_ddp.py; not collected by pytest).

usage: python _ddp_worker.py RANK WORLD PORT SCENARIOS.pt OUT_DIR

SCENARIOS.pt (written by the test) is a list of dicts: name, model ("mlp" | "reordered"), the
model's sizes, init params by name, the algorithm spec, lr, per-rank batches x [T, b, f] and
y [T, b], bucket_cap_mb, warmup_steps, and flags (plain: also run DDP without a hook;
resume_at: stop there, reload everything from per-rank files, continue). Each scenario writes
OUT_DIR/<name>.rank<r>.pt: final params by name, the hook's counters and its state_dict.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class Reordered(nn.Module):
    """Registration order (out, then inp) differs from the order the forward uses them."""

    def __init__(self, in_features: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden, n_classes)
        self.inp = nn.Linear(in_features, hidden)
        self.mid = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out(F.relu(self.mid(F.relu(self.inp(x)))))


def build_model(spec: dict) -> nn.Module:
    from gradsparse.tasks.models import MLP

    f, h, c = spec["sizes"]
    return MLP(f, [h], c) if spec["model"] == "mlp" else Reordered(f, h, c)


def build_algorithm(spec: dict, model: nn.Module):
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import make_compressor
    from gradsparse.ddp import layout_of

    a = spec["algorithm"]
    comp = make_compressor(a["compressor"]["kind"], layout_of(model),
                           **{k: v for k, v in a["compressor"].items() if k != "kind"})
    return Algorithm(compressor=comp, feedback=a.get("feedback", "ef"))


def run(spec: dict, rank: int, out_dir: str) -> None:
    import gradsparse.ddp as gddp

    def fresh(params_by_name):
        model = build_model(spec)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params_by_name[n])
        ddp = DDP(model, bucket_cap_mb=spec.get("bucket_cap_mb", 25))
        return model, ddp

    x, y = spec["x"][rank], spec["y"][rank]
    T, lr = x.shape[0], spec["lr"]
    result = {}

    if spec.get("plain"):
        model, ddp = fresh(spec["init"])
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        for t in range(T):
            opt.zero_grad()
            F.cross_entropy(ddp(x[t]), y[t]).backward()
            opt.step()
        result["plain"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, ddp = fresh(spec["init"])
    alg = build_algorithm(spec, model)
    state = gddp.SparsifiedState(ddp, alg, lr=lr, warmup_steps=spec.get("warmup_steps", 0))
    ddp.register_comm_hook(state, gddp.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    stop = spec.get("resume_at") or T
    for t in range(stop):
        opt.zero_grad()
        F.cross_entropy(ddp(x[t]), y[t]).backward()
        opt.step()
    if stop < T:  # checkpoint per rank (plain tensors), then a fresh model, DDP and hook state resume
        path = os.path.join(out_dir, f"{spec['name']}.ckpt.rank{rank}.pt")
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, tmp)
        os.replace(tmp, path)
        ck = torch.load(path, weights_only=True)
        model, ddp = fresh(ck["model"])
        state = gddp.SparsifiedState(ddp, build_algorithm(spec, model), lr=lr,
                                     warmup_steps=spec.get("warmup_steps", 0))
        state.load_state_dict(ck["hook"])
        ddp.register_comm_hook(state, gddp.hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        opt.load_state_dict(ck["opt"])
        for t in range(stop, T):
            opt.zero_grad()
            F.cross_entropy(ddp(x[t]), y[t]).backward()
            opt.step()
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    result["state"] = state.state_dict()
    result["buckets_after"] = None
    torch.save(result, os.path.join(out_dir, f"{spec['name']}.rank{rank}.pt"))


def main() -> None:
    rank, world, port, scen, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for spec in torch.load(scen, weights_only=False):
            run(spec, rank, out_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
