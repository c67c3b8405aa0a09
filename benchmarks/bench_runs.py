"""Costs of the run-safety pieces (issue 9), printed as medians of ``--repeats`` runs.

1. The per-step non-finite check (``gradsparse.divergence.find_nonfinite``: model, memories,
   momentum, server state, messages) against the step it guards, on the synchronous simulator in
   paper 003's setting (100 workers, MLP 784-64-10, d = 50,890, batch 10, top-k 0.1% with ef),
   and the full scan of the [N, d] memories that compressors without top-k's guarantee pay.
2. Random-k supports for many workers (one vectorized ``random_k_indices_rows`` call) against
   top-k on the same ``[N, d]`` rows (N = 1,000 workers, d = 50,890, 0.1%).
3. A simulator step with ``batch_size: full`` and unequal shards (one gradient call per shard
   size) against the same step with equal shards, at 1,000 workers (logistic-regression-sized
   linear model, top-k 1% with ef).

    python benchmarks/bench_runs.py [--workers 100] [--rk-workers 1000] [--repeats 7] [--threads 1] [--quick]

torch is pinned to ``--threads`` threads (default 1: on a shared machine torch's default thread
count can run many times slower).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import CompressionContext, RandomK, TopK
from gradsparse.divergence import find_nonfinite
from gradsparse.engines.sync_sim import SyncSimulator
from gradsparse.schedules import Schedule
from gradsparse.tasks.models import MLP, module_task


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--rk-workers", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.workers, args.rk_workers, args.repeats = 10, 50, 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6000, 784, generator=g)
    y = torch.randint(0, 10, (6000,), generator=g)
    task = module_task("mnist_shaped_mlp", MLP(784, [64], 10), x, y, None, None)
    alg = Algorithm(compressor=TopK(density=0.001), feedback="ef")
    sim = SyncSimulator(task, alg, Schedule(lr=0.05), n_workers=args.workers, batch_size=10)
    sim.track_total_error = False
    holder = {}

    def step():
        holder["rec"] = sim.step()

    step_ms = _median_ms(step, args.repeats)
    check_ms = _median_ms(lambda: find_nonfinite(sim, holder["rec"]), args.repeats)
    full_ms = _median_ms(lambda: find_nonfinite(sim, holder["rec"], full=True), args.repeats)
    print(f"non-finite check: {check_ms:.2f} ms per step = {100 * check_ms / step_ms:.1f}% of the "
          f"{step_ms:.1f} ms step ({args.workers} workers, d = {sim.d}; top-k: the message proves the memories finite)")
    print(f"  full scan (what hard-threshold, random-k and approximate top-k pay; every run's first step): "
          f"{full_ms:.2f} ms = {100 * full_ms / step_ms:.1f}% of the step")

    d = 50_890
    rows = torch.randn(args.rk_workers, d, generator=g)
    rk, tk = RandomK(density=0.001), TopK(density=0.001)
    ctx = iter(range(10**9))
    rk_ms = _median_ms(lambda: rk.compress(rows, CompressionContext(next(ctx))), args.repeats)
    tk_ms = _median_ms(lambda: tk.compress(rows), args.repeats)
    print(f"random-k supports, {args.rk_workers} workers x d = {d} at 0.1%: {rk_ms:.1f} ms; top-k {tk_ms:.1f} ms; "
          f"ratio {rk_ms / tk_ms:.2f}")

    from gradsparse.tasks import make_task

    n_eq = 20 * args.rk_workers
    steps = {}
    for label, n_rows in (("equal shards", n_eq), ("unequal shards", n_eq + args.rk_workers // 2)):
        task = make_task("linreg", n_samples=n_rows, n_features=500, seed=0)
        sim = SyncSimulator(task, Algorithm(compressor=TopK(density=0.01), feedback="ef"), Schedule(lr=0.01),
                            n_workers=args.rk_workers, batch_size="full")
        sim.track_total_error = False
        steps[label] = (_median_ms(sim.step, args.repeats), sim.data.ragged)
    (eq, _), (uneq, ragged) = steps["equal shards"], steps["unequal shards"]
    print(f"full-batch step, {args.rk_workers} workers: equal shards {eq:.1f} ms, unequal shards {uneq:.1f} ms "
          f"(ragged={ragged}), ratio {uneq / eq:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
