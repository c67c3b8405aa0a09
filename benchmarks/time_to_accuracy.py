"""Time to a fixed test accuracy on a real, rate-limited network (Agarwal et al., MLSys'22: compare
time-to-accuracy, against an fp16 baseline, not only step time).

    sudo python benchmarks/time_to_accuracy.py [--ranks 4,8] [--rates 100mbit,1gbit]
        [--task mnist5k_cnn_paper003] [--targets 0.90,0.93,0.95] [--max-steps 1500] [--eval-every 10]
        [--methods dense,fp16,powersgd2,topk1] [--out bench_results/time_to_accuracy]

One DDP rank per network namespace (benchmarks/netns.py, ``tc tbf`` at each rate), torch pinned
to one thread per rank. The model and data are an offline MNIST task (``--task``: by default
``mnist5k_cnn_paper003``, paper 003's CNN, 1,199,882 parameters, or ``mnist5k_cnn``; 4,000 real
28x28 training digits, 1,000 test digits):
rank r trains on rows r, r + P, ... (an iid split), mini-batches of ``--batch`` drawn from its
rows by its own generator (the same draws for every method), plain SGD at ``--lr`` (the same for
every method: gradsparse's ``ef`` puts the step size inside its messages and needs plain SGD).
Every ``--eval-every`` steps rank 0 measures the test accuracy (not timed) and tells the others
whether the target is reached. Reported per method: the steps and the wall-clock seconds of
training (the sum of the step times, evaluations excluded) to the first evaluation at or above
each of ``--targets`` (a run stops at the highest), the final accuracy, and the kernel TX of rank 0
per step. The targets are an argument fixed before the runs.

Methods: ``dense`` (DDP's all-reduce), ``fp16`` (PyTorch's ``fp16_compress_hook``),
``powersgd2`` (PyTorch's PowerSGD hook, rank 2, one bucket, start iteration 10), ``topk1``
(gradsparse's hook: layer-wise top-k at 1% with error feedback, all-gather of frames), and any
bench_network.py gradsparse method with a collective suffix (``topk1_sharded_bidir``, ...).
Writes ``time_to_accuracy.csv``; prints a table. Without root, ``ip`` or ``tc`` it exits 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gradsparse_netns", HERE / "netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)
_spec = importlib.util.spec_from_file_location("gradsparse_bench_network", HERE / "bench_network.py")
bench_network = importlib.util.module_from_spec(_spec)  # its wrap_method: the same methods, built the same way
_spec.loader.exec_module(bench_network)

TASK = "mnist5k_cnn_paper003"  #: the default --task


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from gradsparse.tasks import TASKS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{netns.SUBNET}.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    task = TASKS[args.task]()
    net = task.module
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(task.init_params(torch.Generator().manual_seed(0))[n])
    for p in net.parameters():  # a task's module holds its parameters frozen (the simulator's functional calls)
        p.requires_grad_(True)
    model, _ = bench_network.wrap_method(net, args.method, lr=args.lr, powersgd_start=10)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    rows = torch.arange(args.rank, task.train_x.shape[0], args.world)
    g = torch.Generator().manual_seed(1000 + args.rank)
    targets = sorted(float(t) for t in args.targets.split(","))
    trained, reached, acc = 0.0, {}, 0.0
    tx0 = netns.own_tx_bytes()
    steps = 0
    for step in range(1, args.max_steps + 1):
        batch = rows[torch.randint(0, rows.numel(), (args.batch,), generator=g)]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(task.train_x[batch]), task.train_y[batch]).backward()
        opt.step()
        trained += time.perf_counter() - t0
        steps = step
        if step % args.eval_every == 0:
            flag = torch.zeros(1, dtype=torch.int64)
            if args.rank == 0:
                with torch.no_grad():
                    net.eval()
                    acc = float((net(task.test_x).argmax(1) == task.test_y).float().mean())
                    net.train()
                for t in targets:
                    if acc >= t and t not in reached:
                        reached[t] = (step, trained)
                flag[0] = 1 if targets[-1] in reached else 0
            dist.broadcast(flag, 0)
            if int(flag[0]):
                break
    tx = netns.own_tx_bytes() - tx0
    if args.rank == 0:
        Path(args.result).write_text(json.dumps({
            "reached": {f"{t:g}": reached.get(t) for t in targets},
            "final_accuracy": acc, "steps": steps, "train_seconds": trained, "tx_bytes_per_step": tx / steps,
            "d": sum(p.numel() for p in net.parameters())}))
    dist.barrier()
    dist.destroy_process_group()


def run(net, method: str, ranks: int, args, tmp: Path) -> dict:
    port = 29500 + (os.getpid() + sum(map(ord, method)) + ranks) % 2000
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    res = tmp / f"{method}.{ranks}.json"
    res.unlink(missing_ok=True)
    procs = [subprocess.Popen(net.exec_prefix(r) + [
        sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(ranks), "--port", str(port),
        "--method", method, "--task", args.task, "--result", str(res), "--lr", str(args.lr), "--batch", str(args.batch),
        "--targets", args.targets, "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(ranks)]
    deadline = time.time() + args.timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    if any(p.poll() is None for p in procs):
        for p in procs:
            p.kill()
        return {"error": f"timed out after {args.timeout} s"}
    if any(p.returncode != 0 for p in procs):
        out = procs[0].stdout.read().decode(errors="replace").strip()
        return {"error": f"rank failed: {out.splitlines()[-1] if out else '?'}"}
    return json.loads(res.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="4,8")
    ap.add_argument("--task", default=TASK, help="an offline MNIST task of gradsparse.tasks (default %(default)s)")
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--methods", default="dense,fp16,powersgd2,topk1")
    ap.add_argument("--targets", default="0.90,0.93,0.95", help="test accuracies, comma-separated")
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="bench_results/time_to_accuracy")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--rank", "--world", "--port"):
        ap.add_argument(a, type=int, help=argparse.SUPPRESS)
    for a in ("--method", "--result"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    why = netns.can_run()
    if why:
        print(f"time_to_accuracy: skipped: {why}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    rows = []
    try:
        for ranks in [int(r) for r in args.ranks.split(",")]:
            net = netns.Net(ranks)
            try:
                net.up()
                for rate in args.rates.split(","):
                    net.shape(rate)
                    for m in args.methods.split(","):
                        row = {"ranks": ranks, "rate": rate, "method": m, **run(net, m, ranks, args, tmp)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                net.down()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets = sorted(float(t) for t in args.targets.split(","))
    flat = []  # one row per (run, target)
    for r in rows:
        for t in targets:
            hit = (r.get("reached") or {}).get(f"{t:g}")
            flat.append({**{k: r.get(k) for k in ("ranks", "rate", "method", "d", "final_accuracy", "steps",
                                                  "train_seconds", "tx_bytes_per_step", "error")},
                         "target": t, "steps_to_target": hit[0] if hit else None,
                         "seconds_to_target": hit[1] if hit else None})
    fields = ["ranks", "rate", "method", "d", "target", "steps_to_target", "seconds_to_target", "final_accuracy",
              "steps", "train_seconds", "tx_bytes_per_step", "error"]
    with open(out / "time_to_accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in flat:
            w.writerow({k: r.get(k) for k in fields})
    print(f"\n{args.task}, lr {args.lr}, batch {args.batch} per rank, at most {args.max_steps} steps")
    print(f"{'ranks':>5} {'rate':>8} {'method':>20} {'target':>6} {'steps':>6} {'seconds':>11} {'vs dense':>9} "
          f"{'final acc':>9} {'TX KB/step':>11}")
    for r in flat:
        if r.get("error"):
            print(f"{r['ranks']:>5} {r['rate']:>8} {r['method']:>20}  {r['error']}")
            continue
        dense = next((x for x in flat if x["ranks"] == r["ranks"] and x["rate"] == r["rate"] and x["method"] == "dense"
                      and x["target"] == r["target"] and x.get("seconds_to_target")), None)
        sec = r.get("seconds_to_target")
        rel = f"{sec / dense['seconds_to_target']:.2f}x" if sec and dense else ""
        print(f"{r['ranks']:>5} {r['rate']:>8} {r['method']:>20} {r['target']:>6.2f} {r['steps_to_target'] or '-':>6} "
              f"{(f'{sec:.1f}' if sec else 'not reached'):>11} {rel:>9} {r['final_accuracy']:>9.3f} "
              f"{r['tx_bytes_per_step'] / 1e3:>11.1f}")
    print(f"wrote {out / 'time_to_accuracy.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
