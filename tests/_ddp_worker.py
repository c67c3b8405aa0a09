"""One rank of the DDP hook tests (started twice by tests/test_ddp.py; not collected by pytest).

usage: python _ddp_worker.py RANK WORLD PORT SCENARIOS.pt OUT_DIR

SCENARIOS.pt (written by the test) is a list of dicts: name, model ("mlp" | "reordered" |
"unused"), the model's sizes, init params by name, the algorithm spec, lr, per-rank batches
x [T, b, f] and y [T, b], and options:

  bucket_cap_mb, ddp (DistributedDataParallel keyword arguments: gradient_as_bucket_view,
  static_graph, find_unused_parameters), state (SparsifiedState keyword arguments:
  whole_model, dense_fallback, warmup_steps, collective), plain (also run DDP without a hook), resume_at
  (stop there, reload everything from per-rank files under weights_only, continue),
  micro_batches (split each step's batch and accumulate under no_sync()), dtype (the model's
  parameter dtype), nan_at ([rank, step]: that rank's gradient gets a NaN at that step),
  join_steps ({rank: steps}: uneven inputs under model.join()).

Each scenario writes OUT_DIR/<name>.rank<r>.pt: final params by name, the hook's state_dict,
the error a step raised (if any), and, for the first scenario, whether a checkpoint of another
world size was refused.
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


class WithUnused(Reordered):
    """A parameter the forward never uses (DDP needs find_unused_parameters=True)."""

    def __init__(self, in_features: int, hidden: int, n_classes: int) -> None:
        super().__init__(in_features, hidden, n_classes)
        self.unused = nn.Linear(hidden, hidden)


def build_model(spec: dict) -> nn.Module:
    from gradsparse.tasks.models import MLP

    f, h, c = spec["sizes"]
    return {"mlp": lambda: MLP(f, [h], c), "reordered": lambda: Reordered(f, h, c),
            "unused": lambda: WithUnused(f, h, c)}[spec["model"]]()


def build_algorithm(spec: dict, model: nn.Module, layout=None):
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import make_compressor
    from gradsparse.ddp import layout_of

    a = spec["algorithm"]
    layout = layout if layout is not None else layout_of(model)

    def compressor(section):
        return make_compressor(section["kind"], layout, **{k: v for k, v in section.items() if k != "kind"})

    topology = a.get("topology", {"kind": "all_to_all"})
    down = compressor(topology["down_compressor"]) if "down_compressor" in topology else None
    return Algorithm(compressor=compressor(a["compressor"]), feedback=a.get("feedback", "ef"),
                     value_dtype=a.get("value_dtype", "fp32"), on_nonfinite=a.get("on_nonfinite", "stop"),
                     topology=topology["kind"], down_compressor=down)


def run(spec: dict, rank: int, world: int, out_dir: str, first: bool) -> None:
    import gradsparse.ddp as gddp

    dtype = getattr(torch, spec.get("dtype", "float32"))

    def fresh(params_by_name):
        model = build_model(spec).to(dtype)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params_by_name[n])
        ddp = DDP(model, bucket_cap_mb=spec.get("bucket_cap_mb", 25), **spec.get("ddp", {}))
        return model, ddp

    x, y = spec["x"][rank].to(dtype), spec["y"][rank]
    T, lr = x.shape[0], spec["lr"]
    steps = spec.get("join_steps", {}).get(rank, T)
    micro = spec.get("micro_batches", 1)
    result = {"error": None}

    def train_step(ddp, opt, t):
        opt.zero_grad()
        if micro == 1:
            F.cross_entropy(ddp(x[t]), y[t]).backward()
        else:  # accumulate micro-batch gradients locally, synchronise at the last one
            xs, ys = x[t].chunk(micro), y[t].chunk(micro)
            with ddp.no_sync():
                for i in range(micro - 1):
                    (F.cross_entropy(ddp(xs[i]), ys[i]) / micro).backward()
            (F.cross_entropy(ddp(xs[-1]), ys[-1]) / micro).backward()
        opt.step()

    if spec.get("plain"):
        model, ddp = fresh(spec["init"])
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        for t in range(T):
            train_step(ddp, opt, t)
        result["plain"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, ddp = fresh(spec["init"])
    state = gddp.SparsifiedState(ddp, build_algorithm(spec, model), lr=lr, **spec.get("state", {}))
    ddp.register_comm_hook(state, gddp.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    nan_rank, nan_step = spec.get("nan_at", (None, None))
    if nan_rank == rank:
        target = next(iter(model.parameters()))
        target.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")) if state.step == nan_step else g)
    stop = spec.get("resume_at") or T
    try:
        if "join_steps" in spec:
            with ddp.join():
                for t in range(steps):
                    train_step(ddp, opt, t)
            result["memory_norm_at_join"] = None
        else:
            for t in range(stop):
                train_step(ddp, opt, t)
    except Exception as exc:  # on_nonfinite: stop -> every rank raises at the same step
        result["error"] = f"{type(exc).__name__}: {exc}"
    if stop < T and result["error"] is None:  # checkpoint per rank (plain tensors), then a fresh model, DDP and hook state
        path = os.path.join(out_dir, f"{spec['name']}.ckpt.rank{rank}.pt")
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, tmp)
        os.replace(tmp, path)
        ck = torch.load(path, weights_only=True)
        model, ddp = fresh(ck["model"])
        state = gddp.SparsifiedState(ddp, build_algorithm(spec, model), lr=lr, **spec.get("state", {}))
        state.load_state_dict(ck["hook"])
        ddp.register_comm_hook(state, gddp.hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        opt.load_state_dict(ck["opt"])
        for t in range(stop, T):
            train_step(ddp, opt, t)
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    result["state"] = state.state_dict()
    result["memory_dtypes"] = sorted({str(s.worker.memory.flat.dtype) for s in state.segments.values()
                                      if s.worker.memory is not None})
    if first:  # a checkpoint of another world size is refused, and the refusal changes nothing
        sd = state.state_dict()
        sd["world_size"] = world + 1
        before = state.state_dict()
        try:
            state.load_state_dict(sd)
            result["other_world_refused"] = False
        except ValueError as exc:
            after = state.state_dict()
            unchanged = before["step"] == after["step"] and all(
                (a is None and b is None) or torch.equal(a, b) for a, b in zip(before["memory"].values(), after["memory"].values()))
            result["other_world_refused"] = ("ranks" in str(exc)) and unchanged
    torch.save(result, os.path.join(out_dir, f"{spec['name']}.rank{rank}.pt"))


def main() -> None:
    rank, world, port, scen, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for i, spec in enumerate(torch.load(scen, weights_only=False)):
            run(spec, rank, world, out_dir, i == 0)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
