"""Bandwidth benchmark on a real, rate-limited network: network namespaces, veth pairs, a
bridge and ``tc tbf`` (benchmarks/netns.py); one DDP rank per namespace; Gloo over the veths.

    sudo python benchmarks/bench_network.py [--ranks 4 | --ranks 4,8,16] [--rates 100mbit,1gbit]
        [--params 11000000] [--steps 3] [--bucket-mb 25]
        [--methods dense,fp16,powersgd1,powersgd4,topk0.1,topk1,threshold,budget,ps0.1]
        [--out benchmarks/results/network]

The collectives' scaling (issue 21), on the same machine, one command:

    sudo python benchmarks/bench_network.py --ranks 4,8,16 --params 2000000 --steps 3 \
        --methods dense,powersgd1,topk0.1,topk1,topk0.1_sharded,topk1_sharded,topk1_sharded_bidir,randomk1_allreduce

Each method trains the same model (Linear 1024x1024 layers, about ``--params`` parameters,
random data, batch 16, torch pinned to 1 thread per rank) in DDP buckets of ``--bucket-mb`` MB
(DDP's default 25; PowerSGD always one bucket). Every call of gradsparse's hook costs fixed size
exchanges with each of the P - 1 peers (and their TCP/IP headers and acknowledgements), so at
many ranks fewer, larger buckets send less per step: ``--bucket-mb 100000`` is one bucket.

* ``dense``: DDP's default all-reduce; ``fp16``: PyTorch's ``fp16_compress_hook``;
  ``powersgd1`` / ``powersgd4``: PyTorch's PowerSGD hook, rank 1 / 4 (one bucket: Gloo aborts it
  with several), start iteration 2;
* gradsparse's hook with ``ef``: ``topk0.1`` / ``topk1`` (layer-wise top-k at 0.1% / 1%),
  ``threshold`` (hard-threshold, lambda set for about 1% of the first gradient; with error
  feedback the memories grow and more passes later: the dense fall-back bounds it), ``budget``
  (``budget_threshold`` at an average density of 1% planned over 1,000 steps, burst 1, split
  per parameter so buckets overlap);
* ``ps0.1``: gradsparse's parameter server (rank 0 serves the other ranks: bidirectional
  layer-wise top-k at 0.1% with error feedback on both sides, over point-to-point messages);
* a collective as a suffix (:mod:`gradsparse.comm.collectives`): ``topk1_sharded`` (the owners'
  push and pull), ``topk1_sharded_bidir`` (each owner sends top-k at the same density of its
  slices, with its own downlink memory), ``randomk1_allreduce`` (random-k at 1% with one support
  shared by every rank, summed by one all_reduce of the k values); ``randomk1`` alone is random-k
  with each rank's own support, all-gathered.

Per method: median step time over ``--steps`` timed steps (after 2 untimed: bucket rebuild,
PowerSGD's start iteration); per rank, the kernel's TX counter of its ``eth0`` over the timed
steps (what crossed the shaped link, headers included) and, for gradsparse, the bytes the hook
reports as sent (``state.sent_bytes``) over the same steps; their ratio; and for the hook, on
rank 0, the time of its own compute per step (the worker steps of every parameter, encoding
the frames, decoding P - 1 other ranks' frames and summing them into the bucket: everything but
the communication), measured alone (median of 5 calls on copies of the state), as a fraction of the step. Prints ratios against dense
measured in the same run. For gradsparse's methods also the simulator's prediction
(``sim/TX``): after the timed steps every rank's messages go to rank 0, which charges them with
the rule of :class:`gradsparse.comm.SimulatedRounds` for the method's collective (what the
simulator's ``all_ranks_sent_bytes`` is), per rank and step, against the measured TX. Writes
``network.csv`` and ``network.png`` (one rank count) or ``network_scaling.png`` (several: TX
per rank and step time against P). Without root, ``ip`` or ``tc`` it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gradsparse_netns", HERE / "netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)

METHODS = "dense,fp16,powersgd1,powersgd4,topk0.1,topk1,threshold,budget,ps0.1"


# ---- one rank -----------------------------------------------------------------------------------
def build_model(n_params: int):
    import torch
    from torch import nn

    width = 1024
    layers = max(1, round(n_params / (width * width + width)))
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]), width


def parameter_server(args, net, width) -> dict:
    """Method ``ps<density>``: rank 0 is a parameter server, ranks 1..R-1 workers (bidirectional
    top-k at ``density`` with error feedback on both sides, layer-wise). A round: every worker
    computes its gradient, runs the worker step and sends its message's frames; the server
    receives all, runs the server step and sends C_down(G) back to every worker, which applies it."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import gradsparse.ddp as gddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.comm import PointToPointChannel
    from gradsparse.compressors import TopK
    from gradsparse.messages import SparseBatch
    from gradsparse.topology import Bidirectional

    layout = gddp.layout_of(net)
    density = float(args.method[2:]) / 100
    alg = Algorithm(compressor=TopK(density=density, scope="layerwise", layout=layout), feedback="ef",
                    topology=Bidirectional(TopK(density=density, scope="layerwise", layout=layout)))
    channel = PointToPointChannel("server" if args.rank == 0 else "worker")
    workers = args.world - 1
    params = list(net.parameters())
    g = torch.Generator().manual_seed(args.rank)
    x, y = torch.randn(16, width, generator=g), torch.randn(16, width, generator=g)
    wstate, sstate = alg.init_worker_state(layout, 1), alg.init_server_state(layout)
    weights = torch.full((workers,), 1.0 / workers)
    times = []
    for it in range(2 + args.steps):
        if it == 2:
            dist.barrier()
            time.sleep(0.3)
            tx0, sent0 = netns.own_tx_bytes(), channel.ledger.sent_bytes
        t0 = time.perf_counter()
        if args.rank == 0:
            msgs = [channel.recv("uplink", q, step=it)[2] for q in range(1, args.world)]
            srv = alg.server_step(SparseBatch.cat(msgs), sstate, step=it, lr=0.01, weights=weights)
            sstate = srv.state
            for q in range(1, args.world):
                channel.send(q, "downlink", srv.message, step=it)
        else:
            for p in params:
                p.grad = None
            F.mse_loss(net(x), y).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])[None]
            out = alg.worker_step_in_place(grad, wstate, step=it, lr=0.01)
            channel.send(0, "uplink", out.message, step=it)
            down = channel.recv("downlink", 0, step=it)[2].to_dense()[0]
            with torch.no_grad():
                offset = 0
                for p in params:
                    p -= down[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
        times.append(time.perf_counter() - t0)
    time.sleep(0.3)
    return {"d": layout.d, "step_s": statistics.median(times[2:]), "compute_s": None,
            "tx": netns.own_tx_bytes() - tx0, "sent": channel.ledger.sent_bytes - sent0}


#: the hook compute is the median of this many calls, each on a fresh copy of the state (one cold call
#: includes first-touch allocations: about 2x the warm figure on a 10.5M model)
COMPUTE_REPEATS = 5


def hook_compute_seconds(model, state, x, y, world: int) -> float:
    """The hook's own work for one step on this rank's real gradient, without communication:
    worker steps, frames, decoding P - 1 payloads (this rank's, standing in for the others') and
    the aggregate written into a bucket. On a copy of the state (the run's memories stay put)."""
    import copy

    import torch
    import torch.nn.functional as F

    import gradsparse.ddp as gddp
    from gradsparse import wire

    model.zero_grad()
    with model.no_sync():  # this rank's own gradient, not the aggregate
        F.mse_loss(model(x), y).backward()
    params = [p for p in model.module.parameters() if p.requires_grad]
    gradient = torch.cat([p.grad.reshape(-1) for p in params])
    times = []
    for _ in range(COMPUTE_REPEATS):
        twin = copy.deepcopy(state)
        twin._bind({n: p for n, p in model.module.named_parameters()})
        bucket = gradient.clone()
        t0 = time.perf_counter()
        segs, outs = gddp.compress_bucket(twin, params, bucket, twin.step, 0.01, 0)
        payload = torch.frombuffer(bytearray(b"".join(wire.encode(o.message, value_dtype=s.alg.value_dtype)
                                                      for s, o in zip(segs, outs))), dtype=torch.uint8)
        rows = gddp.decode_bucket([payload] * world, 0, outs, max_d=max(p.numel() for p in params))
        gddp.aggregate_bucket(twin, segs, rows, bucket, 0.01, twin.step, world)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{netns.SUBNET}.1:{args.port}", rank=args.rank, world_size=args.world)
    net, width = build_model(args.params)
    if args.method.startswith("ps"):
        res = parameter_server(args, net, width)
        Path(args.result).write_text(json.dumps(res))
        dist.barrier()
        dist.destroy_process_group()
        return
    d = sum(p.numel() for p in net.parameters())
    method = args.method
    model, state = wrap_method(net, method, lr=0.01, threshold=args.threshold, powersgd_start=2,
                               bucket_mb=args.bucket_mb)
    if state is not None:
        import gradsparse.distributed.ddp_hook as hook_module

        records = record_messages(hook_module)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(args.rank)
    x = torch.randn(16, width, generator=g)
    y = torch.randn(16, width, generator=g)
    times = []
    for it in range(2 + args.steps):
        if it == 2:
            dist.barrier()
            time.sleep(0.3)  # the barrier's packets and acknowledgements are out
            tx0, sent0 = netns.own_tx_bytes(), (state.sent_bytes if state is not None else 0)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    time.sleep(0.3)  # delayed acknowledgements of the last step
    tx = netns.own_tx_bytes() - tx0
    sent = None if state is None else state.sent_bytes - sent0
    dist.barrier()
    compute = predicted = None
    if state is not None:  # the simulator's rule on every rank's messages of the run (after the timing)
        gathered = [None] * args.world if args.rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        if args.rank == 0:
            predicted = predict_sent(gathered, net, parse_method(method), args.steps)
    if state is not None and args.rank == 0 and state.collective == "allgather":
        compute = hook_compute_seconds(model, state, x, y, args.world)
    dist.barrier()  # the other ranks wait (blocked, idle) while rank 0 times its compute alone
    res = {"d": d, "step_s": statistics.median(times[2:]), "compute_s": compute, "tx": tx, "sent": sent,
           "dense_fallbacks": None if state is None else state.dense_fallbacks, "predicted": predicted}
    Path(args.result).write_text(json.dumps(res))
    dist.destroy_process_group()


def wrap_method(net, method: str, *, lr: float, threshold: float | None = None, powersgd_start: int = 2,
                bucket_mb: float = 25):
    """``net`` in DDP (buckets of ``bucket_mb`` MB, DDP's default 25; PowerSGD always one bucket)
    with ``method``'s communication: ``dense`` (DDP's all-reduce), ``fp16``
    (PyTorch's fp16 hook), ``powersgdR`` (PyTorch's PowerSGD at rank R, one bucket, from step
    ``powersgd_start``) or a gradsparse method (``topkP``, ``randomkP``, ``threshold``, ``budget``,
    with a collective suffix: see the module docstring). Returns (model, gradsparse state or None)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(net, bucket_cap_mb=100_000 if method.startswith("powersgd") else bucket_mb)
    if method == "dense":
        return model, None
    if method.startswith("powersgd"):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

        model.register_comm_hook(P.PowerSGDState(process_group=None, matrix_approximation_rank=int(method[8:]),
                                                 start_powerSGD_iter=powersgd_start), P.powerSGD_hook)
        return model, None
    if method == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return model, None
    import gradsparse.ddp as gddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import BudgetThreshold, HardThreshold, RandomK, TopK

    layout = gddp.layout_of(net)
    whole = None
    base, collective, bidirectional = parse_method(method)
    topology = {}
    if base.startswith("topk"):
        density = float(base[4:]) / 100
        comp = TopK(density=density, scope="layerwise", layout=layout)
        if bidirectional:  # each owner sends top-k at the same density of its slices
            topology = dict(topology="bidirectional", down_compressor=TopK(density=density))
    elif base.startswith("randomk"):
        comp = RandomK(density=float(base[7:]) / 100, shared_support=collective == "allreduce")
    elif method == "budget":
        # planned over a long run (1,000 steps), of which a few are timed; burst 1: no step
        # spends more than its share (the first steps keep exactly their top 1%)
        comp, whole = BudgetThreshold(density=0.01, steps=1000, burst=1.0, scope="layerwise", layout=layout), False
    elif method == "threshold":
        comp = HardThreshold(threshold)
    else:
        raise ValueError(f"unknown method {method!r}")
    feedback = "ef-scaled" if method == "budget" else "ef"
    state = gddp.SparsifiedState(model, Algorithm(compressor=comp, feedback=feedback, **topology), lr=lr,
                                 whole_model=whole, collective=collective)
    model.register_comm_hook(state, gddp.hook)
    return model, state


def parse_method(method: str) -> tuple[str, str, bool]:
    """``topk1_sharded_bidir`` -> ("topk1", "sharded", True): the compressor, the collective and
    whether the owners compress their slices (sharded, topology bidirectional)."""
    parts = method.split("_")
    collective = "sharded" if "sharded" in parts else "allreduce" if "allreduce" in parts else "allgather"
    return parts[0], collective, "bidir" in parts


def record_messages(hook_module) -> list:
    """Keep every message the hook's worker steps produce, by step: ``records[t][name] =
    (indices, values)`` (the hook looks ``compress_bucket`` up in its own module,
    :mod:`gradsparse.distributed.ddp_hook`, at each call: that module's name is replaced)."""
    records: list[dict] = []
    compress = hook_module.compress_bucket

    def recording(state, params, buf, step, lr, rank):
        segs, outs = compress(state, params, buf, step, lr, rank)
        while len(records) <= step:
            records.append({})
        for seg, out in zip(segs, outs):
            m = out.message
            records[step][seg.name] = (m.indices.clone(), m.values.clone())
        return segs, outs

    hook_module.compress_bucket = recording
    return records


def predict_sent(gathered: list, net, method: tuple[str, str, bool], timed: int) -> float:
    """What the simulator's channel (:class:`gradsparse.comm.SimulatedRounds`, the rule it charges
    ``all_ranks_sent_bytes`` with) predicts one rank sends per step, on the messages the ranks
    really produced: per step, the P whole-model rows (every parameter's message at its offset in
    the layout); with a per-owner downlink, the server steps replayed from step 0 (the owners'
    memories). Mean over the ``timed`` last steps and the ranks. One exchange a step: the hook's
    per-bucket frame headers and size records are not in it."""
    import torch

    import gradsparse.ddp as gddp
    from gradsparse import wire
    from gradsparse.algorithm import Algorithm
    from gradsparse.comm import SimulatedRounds
    from gradsparse.comm.collectives import ShardPlan
    from gradsparse.compressors import TopK
    from gradsparse.engines.synchronous import configure_collective
    from gradsparse.messages import SparseBatch

    base, collective, bidirectional = method
    layout = gddp.layout_of(net)
    world, steps = len(gathered), min(len(r) for r in gathered)
    plan = ShardPlan.of_layout(layout, world) if collective == "sharded" else None
    alg = None
    if bidirectional:
        density = float(base[4:]) / 100
        alg = Algorithm(compressor=TopK(density=density), topology="bidirectional", down_compressor=TopK(density=density))
        configure_collective(alg, "sharded", layout, world)
        server = alg.init_server_state(layout)
    bounds = {n: a for n, a, _ in layout.bounds()}
    total = 0
    for t in range(steps):
        idx, vals, offsets = [], [], [0]
        for rec in gathered:
            row_i = torch.cat([rec[t][n][0] + bounds[n] for n in layout.names])
            idx.append(row_i)
            vals.append(torch.cat([rec[t][n][1] for n in layout.names]))
            offsets.append(offsets[-1] + row_i.numel())
        message = SparseBatch(layout.d, torch.tensor(offsets), torch.cat(vals), torch.cat(idx), sorted_rows=True)
        down = None
        if alg is not None:
            srv = alg.server_step(message, server, step=t, lr=0.01, weights=torch.full((world,), 1.0 / world))
            server, down = srv.state, srv.message
        if t < steps - timed:
            continue
        k = int(message.counts.max())
        channel = SimulatedRounds(alg.topology if alg else Algorithm().topology, world, collective=collective,
                                  plan=plan, values_per_rank=k)
        channel.deliver_round(wire.encoded_nbytes(message), 0, message, down)
        total += channel.ledger.all_ranks_sent_bytes
    return total / (timed * world)


# ---- driver -------------------------------------------------------------------------------------
def choose_threshold(n_params: int, density: float = 0.01) -> float:
    """lambda giving about ``density`` of one gradient of the benchmark model (ef: lr * g)."""
    import torch
    import torch.nn.functional as F

    net, width = build_model(n_params)
    g = torch.Generator().manual_seed(0)
    F.mse_loss(net(torch.randn(16, width, generator=g)), torch.randn(16, width, generator=g)).backward()
    a = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).abs() * 0.01
    return float(torch.quantile(a[torch.randperm(a.numel())[:1_000_000]], 1 - density))


def run_method(net, method: str, args, tmp: Path, threshold: float) -> dict:
    port = 29500 + (os.getpid() + sum(map(ord, method))) % 2000
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    procs, results = [], []
    for r in range(args.ranks):
        res = tmp / f"{method}.{r}.json"
        res.unlink(missing_ok=True)
        results.append(res)
        procs.append(subprocess.Popen(
            net.exec_prefix(r) + [sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(args.ranks),
                                  "--port", str(port), "--method", method, "--params", str(args.params), "--steps",
                                  str(args.steps), "--threshold", str(threshold), "--bucket-mb", str(args.bucket_mb),
                                  "--result", str(res)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.time() + args.timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    if any(p.poll() is None for p in procs):
        for p in procs:
            p.kill()
        return {"method": method, "error": f"timed out after {args.timeout} s"}
    if any(p.returncode != 0 for p in procs):
        out = procs[0].stdout.read().decode(errors="replace")[-400:]
        return {"method": method, "error": f"rank failed: {out.strip().splitlines()[-1] if out.strip() else '?'}"}
    ranks = [json.loads(res.read_text()) for res in results]
    r0 = ranks[0]
    tx = statistics.mean(r["tx"] / args.steps for r in ranks)
    sent = None if r0["sent"] is None else statistics.mean(r["sent"] / args.steps for r in ranks)
    ratios = None if r0["sent"] is None else [r["sent"] / r["tx"] for r in ranks]
    predicted = r0.get("predicted")
    return {"method": method, "step_s": r0["step_s"], "tx_bytes_per_step": tx, "reported_bytes_per_step": sent,
            "reported_over_tx_min": None if ratios is None else min(ratios),
            "reported_over_tx_max": None if ratios is None else max(ratios), "d": r0["d"],
            "predicted_bytes_per_step": predicted, "predicted_over_tx": None if predicted is None else predicted / tx,
            "compute_fraction": None if r0["compute_s"] is None else r0["compute_s"] / r0["step_s"],
            "dense_fallbacks": r0.get("dense_fallbacks")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="4", help="one rank count or several: 4,8,16")
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--params", type=int, default=11_000_000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--bucket-mb", type=float, default=25.0,
                    help="DDP's bucket cap in MB for every method but PowerSGD (one bucket); 25 is DDP's default. "
                         "Each hook call costs fixed size exchanges with every peer, so fewer buckets send less")
    ap.add_argument("--out", default="benchmarks/results/network")
    ap.add_argument("--from-csv", help="no runs: merge these network.csv files (comma-separated; e.g. 32 ranks "
                                       "measured apart), print the table and draw the plot into --out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--rank", "--world", "--port"):
        ap.add_argument(a, type=int, help=argparse.SUPPRESS)
    for a in ("--method", "--result"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.from_csv:
        return merge_results(args.from_csv.split(","), Path(args.out))
    try:
        rank_counts = [int(r) for r in str(args.ranks).split(",")]
    except ValueError:
        ap.error(f"--ranks must be rank counts separated by commas (e.g. 4,8,16), got {args.ranks!r}")
    if any(r < 2 for r in rank_counts):
        ap.error(f"--ranks: every rank count must be >= 2, got {args.ranks!r}")
    why = netns.can_run()
    if why:
        print(f"bench_network: skipped: {why}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    methods = args.methods.split(",")
    rates = args.rates.split(",")
    threshold = choose_threshold(args.params) if "threshold" in methods else 0.0
    rows = []
    try:
        for ranks in rank_counts:
            args.ranks = ranks
            net = netns.Net(ranks)
            try:
                net.up()
                for rate in rates:
                    net.shape(rate)
                    for m in methods:
                        row = {"rate": rate, "ranks": ranks, **run_method(net, m, args, tmp, threshold)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                net.down()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_csv(rows, out / "network.csv")
    print_table(rows, rank_counts, rates)
    try:
        plot(rows, rank_counts, rates, methods, out)
    except Exception as exc:  # the CSV is the result; the plot is a convenience
        print(f"bench_network: no plot ({exc})")
    print(f"wrote {out / 'network.csv'}")
    return 0


FIELDS = ["rate", "ranks", "method", "d", "step_s", "tx_bytes_per_step", "reported_bytes_per_step",
          "reported_over_tx_min", "reported_over_tx_max", "predicted_bytes_per_step", "predicted_over_tx",
          "compute_fraction", "dense_fallbacks", "error"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in FIELDS})


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``network.csv`` as :func:`run_method` returns them (numbers parsed; an empty
    cell is None; a row without an error has no ``error`` key)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k == "error":
                    if v:
                        row[k] = v
                elif k in ("rate", "method"):
                    row[k] = v
                else:
                    row[k] = None if v == "" else (int(v) if k in ("ranks", "d", "dense_fallbacks") else float(v))
            rows.append(row)
    return rows


def merge_results(paths: list[str], out: Path) -> int:
    """``--from-csv``: the rows of several runs as one result (table, ``network.csv``, plot); a
    (rate, ranks, method) measured twice is refused rather than silently picked."""
    rows, seen = [], {}
    for p in paths:
        for r in read_csv(Path(p)):
            key = (r["rate"], r["ranks"], r["method"])
            if key in seen:
                raise SystemExit(f"bench_network: {key} is in both {seen[key]} and {p}; keep one")
            seen[key] = p
            rows.append(r)
    rows.sort(key=lambda r: r["ranks"])
    rank_counts = sorted({r["ranks"] for r in rows})
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "network.csv")
    print_table(rows, rank_counts, rates)
    plot(rows, rank_counts, rates, methods, out)
    print(f"wrote {out / 'network.csv'}")
    return 0


def print_table(rows: list[dict], rank_counts: list[int], rates: list[str]) -> None:
    for ranks in rank_counts:
        print(f"\n{ranks} ranks, torch 1 thread per rank; per rank and step")
        print(f"{'rate':>8} {'method':>20} {'step s':>8} {'speed-up':>9} {'TX KB':>10} {'reported KB':>12} "
              f"{'rep/TX':>12} {'sim/TX':>7} {'TX/dense':>9} {'compute':>8}")
        for rate in rates:
            mine = [r for r in rows if r["rate"] == rate and r["ranks"] == ranks]
            dense = next((r for r in mine if r["method"] == "dense" and "error" not in r), None)
            for r in mine:
                if "error" in r:
                    print(f"{rate:>8} {r['method']:>20}  {r['error']}")
                    continue
                sp = dense["step_s"] / r["step_s"] if dense else float("nan")
                br = r["tx_bytes_per_step"] / dense["tx_bytes_per_step"] if dense else float("nan")
                rep = "" if r["reported_bytes_per_step"] is None else f"{r['reported_bytes_per_step'] / 1e3:.1f}"
                ratio = "" if r["reported_over_tx_min"] is None else f"{r['reported_over_tx_min']:.3f}-{r['reported_over_tx_max']:.3f}"
                sim = "" if r.get("predicted_over_tx") is None else f"{r['predicted_over_tx']:.3f}"
                cf = "" if r["compute_fraction"] is None else f"{r['compute_fraction']:.1%}"
                print(f"{rate:>8} {r['method']:>20} {r['step_s']:>8.3f} {sp:>8.2f}x {r['tx_bytes_per_step'] / 1e3:>10.1f} "
                      f"{rep:>12} {ratio:>12} {sim:>7} {br:>9.4f} {cf:>8}")


def plot(rows: list[dict], rank_counts: list[int], rates: list[str], methods: list[str], out: Path) -> None:
    """One rank count: bars per rate. Several: kernel TX per rank and step against P (the first
    rate; TX does not depend on the rate) and seconds per step against P for each rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    d = ok[0].get("d", "?") if ok else "?"
    if len(rank_counts) > 1:
        fig, axes = plt.subplots(1, 1 + len(rates), figsize=(5 * (1 + len(rates)), 4.2))
        for m in methods:
            pts = [(r["ranks"], r["tx_bytes_per_step"]) for r in ok if r["method"] == m and r["rate"] == rates[0]]
            if pts:
                axes[0].plot(*zip(*pts), marker="o", label=m)
            for ax, rate in zip(axes[1:], rates):
                pts = [(r["ranks"], r["step_s"]) for r in ok if r["method"] == m and r["rate"] == rate]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
        axes[0].set_ylabel("bytes sent per rank and step (kernel TX)")
        for ax, title in zip(axes, ["TX per rank"] + [f"step time at {rt}" for rt in rates]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(rank_counts, [str(p) for p in rank_counts])
            ax.set_xlabel("ranks P")
            ax.set_title(title)
        for ax in axes[1:]:
            ax.set_ylabel("seconds per step (median)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{d} parameters, one torch thread per rank")
        fig.tight_layout()
        fig.savefig(out / "network_scaling.png", dpi=120)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        for ax, key in zip(axes, ("step_s", "tx_bytes_per_step")):
            vals = [next((r[key] for r in ok if r["rate"] == rt and r["method"] == m), float("nan")) for rt in rates]
            ax.bar([j + i * width for j in range(len(rates))], vals, width=width, label=m)
    for ax, label in zip(axes, ("seconds per step", "bytes sent per rank and step (kernel TX)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rates))], rates)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{rank_counts[0]} ranks, {d} parameters")
    fig.tight_layout()
    fig.savefig(out / "network.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
