"""Bandwidth benchmark on a real, rate-limited network: network namespaces, veth pairs, a
bridge and ``tc tbf``; one DDP rank per namespace; Gloo over the veths.

    sudo python benchmarks/bench_network.py [--ranks 4] [--rates 100mbit,1gbit,none]
        [--params 11000000] [--steps 3] [--methods dense,powersgd,topk0.1,topk1,threshold,ps0.1]
        [--out benchmarks/results/network]

Topology: a hub namespace holds a bridge; each rank's namespace holds ``eth0`` (10.213.0.R+1/24),
the other end of its veth is a bridge port in the hub. ``tc qdisc replace dev eth0 root tbf``
limits each rank's egress (``none``: unshaped). Every name it creates starts with
``gsbn<pid>-``; it deletes exactly those (namespaces; the veths and the bridge go with them) when
it ends, also on errors. Without root, ``ip netns`` or ``tc`` it prints why and exits 0.

Each method runs the same model (Linear layers, about ``--params`` parameters, random data):
``dense`` (DDP's default allreduce), ``powersgd`` (PyTorch's PowerSGD hook, rank 1, one bucket:
Gloo aborts it with several), and gradsparse's hook with layer-wise top-k at 0.1% and 1% and
hard-threshold (lambda chosen from the first gradient for about 1% density), all with ``ef``;
and ``ps0.1``, gradsparse's parameter server (rank 0 serves, the other ranks are workers:
bidirectional layer-wise top-k at 0.1% with error feedback on both sides, wire-format messages
over Gloo send/recv; its bytes per step are the mean over all ranks, server included).
Per method: median step time over ``--steps`` timed steps (after 2 untimed: bucket rebuild,
PowerSGD's start iteration), bytes per step and rank from the kernel's TX counter of ``eth0``
(what really crossed the shaped link, headers included), and for the hook the time of its own
compute (worker step on this rank's own gradient + densifying the gathered messages into the
bucket, no communication) measured alone, as a fraction of the step.
Prints ratios against dense measured in the same run; writes ``network.csv`` and
``network.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFIX = f"gsbn{os.getpid() % 100000}-"
SUBNET = "10.213.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


# ---- network ------------------------------------------------------------------------------------
class Net:
    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.hub = PREFIX + "hub"
        self.ns = [f"{PREFIX}r{r}" for r in range(ranks)]
        self.made: list[str] = []

    def up(self) -> None:
        sh("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for r, ns in enumerate(self.ns):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", self.hub, "link", "add", f"v{r}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", f"v{r}", "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", f"v{r}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def shape(self, rate: str) -> None:
        for ns in self.ns:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate != "none":
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                   "rate", rate, "burst", "512kb", "latency", "200ms")

    def tx_bytes(self, r: int) -> int:
        out = sh("ip", "-n", self.ns[r], "-s", "-j", "link", "show", "eth0").stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def down(self) -> None:
        for ns in reversed(self.made):  # only what this run created, by name
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    probe = PREFIX + "probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


# ---- one rank -----------------------------------------------------------------------------------
def build_model(n_params: int):
    import torch
    from torch import nn

    width = 1024
    layers = max(1, round(n_params / (width * width + width)))
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]), width


def parameter_server(args, net, width) -> None:
    """Method ``ps<density>``: rank 0 is a parameter server, ranks 1..R-1 workers (bidirectional
    top-k at ``density`` with error feedback on both sides, layer-wise). A round: every worker
    computes its gradient, runs the worker step and sends its wire-format message (header +
    frame, :mod:`gradsparse.distributed.server`); the server receives all, runs the server step
    and sends C_down(G) back to every worker, which applies it. Rank 0 times the rounds."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import gradsparse.ddp as gddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK
    from gradsparse.distributed.server import recv_message, send_message
    from gradsparse.messages import SparseBatch
    from gradsparse.topology import Bidirectional

    layout = gddp.layout_of(net)
    density = float(args.method[2:]) / 100
    alg = Algorithm(compressor=TopK(density=density, scope="layerwise", layout=layout), feedback="ef",
                    topology=Bidirectional(TopK(density=density, scope="layerwise", layout=layout)))
    workers = args.world - 1
    params = list(net.parameters())
    g = torch.Generator().manual_seed(args.rank)
    x, y = torch.randn(16, width, generator=g), torch.randn(16, width, generator=g)
    wstate, sstate = alg.init_worker_state(layout, 1), alg.init_server_state(layout)
    weights = torch.full((workers,), 1.0 / workers)
    times, sent = [], 0
    for it in range(2 + args.steps):
        if it == 2:
            dist.barrier()
            Path(args.ready).write_text("timed")
        t0 = time.perf_counter()
        if args.rank == 0:
            msgs = [recv_message(q, step=it)[0] for q in range(1, args.world)]
            srv = alg.server_step(SparseBatch.cat(msgs), sstate, step=it, lr=0.01, weights=weights)
            sstate = srv.state
            for q in range(1, args.world):
                sent += send_message(srv.message, q, step=it, charged=srv.nbytes)
        else:
            for p in params:
                p.grad = None
            F.mse_loss(net(x), y).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])[None]
            out = alg.worker_step_in_place(grad, wstate, step=it, lr=0.01)
            sent += send_message(out.message, 0, step=it, charged=int(out.nbytes[0]))
            down = recv_message(0, step=it)[0].to_dense()[0]
            with torch.no_grad():
                offset = 0
                for p in params:
                    p -= down[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    res = {"d": layout.d, "step_s": statistics.median(times[2:]), "compute_s": None,
           "wire_bytes_per_step": sent / (2 + args.steps)}
    Path(args.result).write_text(json.dumps(res))
    dist.destroy_process_group()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{SUBNET}.1:{args.port}", rank=args.rank, world_size=args.world)
    net, width = build_model(args.params)
    if args.method.startswith("ps"):
        return parameter_server(args, net, width)
    d = sum(p.numel() for p in net.parameters())
    method = args.method
    model = DDP(net, bucket_cap_mb=100_000 if method == "powersgd" else 25)
    state = None
    if method == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

        model.register_comm_hook(P.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                                 start_powerSGD_iter=2), P.powerSGD_hook)
    elif method != "dense":
        import gradsparse.ddp as gddp
        from gradsparse.algorithm import Algorithm
        from gradsparse.compressors import HardThreshold, TopK

        layout = gddp.layout_of(net)
        if method.startswith("topk"):
            comp = TopK(density=float(method[4:]) / 100, scope="layerwise", layout=layout)
        else:
            comp = HardThreshold(args.threshold)
        state = gddp.SparsifiedState(model, Algorithm(compressor=comp, feedback="ef"), lr=0.01)
        model.register_comm_hook(state, gddp.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(args.rank)
    x = torch.randn(16, width, generator=g)
    y = torch.randn(16, width, generator=g)
    times = []
    for it in range(2 + args.steps):
        if it == 2:
            dist.barrier()
            Path(args.ready).write_text("timed")
        t0 = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    compute = None
    if state is not None and args.rank == 0:  # the hook's own compute, alone, on a real gradient
        import copy

        from gradsparse.messages import SparseBatch

        opt.zero_grad()
        with model.no_sync():  # this rank's own gradient, not the aggregate
            F.mse_loss(model(x), y).backward()
        grads = {n: p.grad.detach().reshape(1, -1).clone() for n, p in model.module.named_parameters()}
        segments = copy.deepcopy(state.segments)  # the timing must not move the run's memories
        weights = torch.full((args.world,), 1.0 / args.world)
        t0 = time.perf_counter()
        for name, seg in segments.items():
            out = seg.alg.worker_step_in_place(grads[name], seg.worker, step=state.step, lr=0.01)
            batch = SparseBatch.cat([out.message] * args.world)  # the all-gathered messages
            batch.weighted_sum(weights, out=grads[name][0])  # densify into the bucket
        compute = time.perf_counter() - t0
    res = {"d": d, "step_s": statistics.median(times[2:]), "compute_s": compute,
           "wire_bytes_per_step": (state.uplink_bytes / state.step) if state is not None and state.step else None}
    Path(args.result).write_text(json.dumps(res))
    dist.destroy_process_group()


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


def run_method(net: Net, method: str, args, tmp: Path, threshold: float) -> dict:
    port = 29500 + (os.getpid() + hash(method)) % 2000
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    procs, results, ready = [], [], []
    for r in range(args.ranks):
        res, rd = tmp / f"{method}.{r}.json", tmp / f"{method}.{r}.ready"
        for f in (res, rd):
            f.unlink(missing_ok=True)
        results.append(res)
        ready.append(rd)
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", net.ns[r], sys.executable, __file__, "--worker", "--rank", str(r), "--world",
             str(args.ranks), "--port", str(port), "--method", method, "--params", str(args.params), "--steps",
             str(args.steps), "--threshold", str(threshold), "--result", str(res), "--ready", str(rd),
             "--tx-file", "-"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.time() + args.timeout
    tx0 = None
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if tx0 is None and all(rd.exists() for rd in ready):
            tx0 = [net.tx_bytes(r) for r in range(args.ranks)]
        time.sleep(0.05)
    if any(p.poll() is None for p in procs):
        for p in procs:
            p.kill()
        return {"method": method, "error": f"timed out after {args.timeout} s"}
    if any(p.returncode != 0 for p in procs):
        out = procs[0].stdout.read().decode(errors="replace")[-400:]
        return {"method": method, "error": f"rank failed: {out.strip().splitlines()[-1] if out.strip() else '?'}"}
    tx1 = [net.tx_bytes(r) for r in range(args.ranks)]
    r0 = json.loads(results[0].read_text())
    # TX from the first timed step to the end: timed steps plus the final barrier (small)
    tx = statistics.mean((b - a) / args.steps for a, b in zip(tx0 or tx1, tx1))
    return {"method": method, "step_s": r0["step_s"], "tx_bytes_per_step": tx, "d": r0["d"],
            "compute_fraction": None if r0["compute_s"] is None else r0["compute_s"] / r0["step_s"],
            "wire_bytes_per_step": r0["wire_bytes_per_step"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rates", default="100mbit,1gbit,none")
    ap.add_argument("--params", type=int, default=11_000_000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default="dense,powersgd,topk0.1,topk1,threshold,ps0.1")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default="benchmarks/results/network")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--rank", "--world", "--port"):
        ap.add_argument(a, type=int, help=argparse.SUPPRESS)
    for a in ("--method", "--result", "--ready", "--tx-file"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    why = can_run()
    if why:
        print(f"bench_network: skipped: {why}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    methods = args.methods.split(",")
    threshold = choose_threshold(args.params) if "threshold" in methods else 0.0
    net = Net(args.ranks)
    rows = []
    try:
        net.up()
        for rate in args.rates.split(","):
            net.shape(rate)
            for m in methods:
                row = {"rate": rate, "ranks": args.ranks, **run_method(net, m, args, tmp, threshold)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        net.down()
        shutil.rmtree(tmp, ignore_errors=True)
    fields = ["rate", "ranks", "method", "d", "step_s", "tx_bytes_per_step", "wire_bytes_per_step", "compute_fraction", "error"]
    with open(out / "network.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    print(f"\n{'rate':>8} {'method':>10} {'step s':>9} {'MB/step/rank':>13} {'speedup':>8} {'bytes/dense':>12} {'compute':>8}")
    for rate in args.rates.split(","):
        dense = next((r for r in rows if r["rate"] == rate and r["method"] == "dense" and "error" not in r), None)
        for r in (r for r in rows if r["rate"] == rate):
            if "error" in r:
                print(f"{rate:>8} {r['method']:>10}  {r['error']}")
                continue
            sp = dense["step_s"] / r["step_s"] if dense else float("nan")
            br = r["tx_bytes_per_step"] / dense["tx_bytes_per_step"] if dense else float("nan")
            cf = "" if r["compute_fraction"] is None else f"{r['compute_fraction']:.1%}"
            print(f"{rate:>8} {r['method']:>10} {r['step_s']:>9.3f} {r['tx_bytes_per_step'] / 1e6:>13.3f} {sp:>7.1f}x {br:>12.4f} {cf:>8}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        rates = args.rates.split(",")
        for i, m in enumerate(methods):
            vals = [next((r["step_s"] for r in rows if r["rate"] == rt and r["method"] == m and "error" not in r), float("nan"))
                    for rt in rates]
            ax.bar([j + i * 0.15 for j in range(len(rates))], vals, width=0.15, label=m)
        ax.set_xticks([j + 0.3 for j in range(len(rates))], rates)
        ax.set_ylabel("seconds per step")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "network.png", dpi=120)
    except Exception as exc:  # the CSV is the result; the plot is a convenience
        print(f"bench_network: no plot ({exc})")
    print(f"wrote {out / 'network.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
