"""Vectorized synchronous simulator vs a loop over per-worker model copies.

Paper 003's setting: 100 workers, MLP 784-64-10 (d = 50,890), batch 10 per worker, top-k with
K = 0.001 d and error feedback, all-to-all. The data are MNIST-shaped random tensors (speed does
not depend on pixel values). All engines draw the same mini-batches from the same seed; the
script checks that they end at the same parameters (fp32 tolerance) and prints the median time
per step of each and the speed-up over the loop measured in the same run. Three configurations
of the vectorized engine are timed (an ablation):

* ``vmap``: ``vmap(grad)`` gradients, then the plain worker step (e + lr g in a new tensor);
* ``grouped``: grouped per-worker gradients (one forward/backward, one batched matmul per layer);
* ``grouped+in-place``: the default, the gradients accumulated straight into the memory.

Every engine runs the same algorithm code after the gradients (the loop engine, ``engine: loop``,
calls the algorithm's in-place worker entry once per worker on its own memory row, as each worker
process or DDP hook would; that entry uses the fused one-row error-feedback kernel)
and keeps the same byte accounting; the optional total-error diagnostic is off in all of them.

    python benchmarks/bench_simulator.py [--workers 100] [--steps 5] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK
from gradsparse.engines.loop_sim import LoopSimulator
from gradsparse.engines.sync_sim import SyncSimulator
from gradsparse.schedules import Schedule
from gradsparse.tasks.models import MLP, module_task


def make_task(n_rows: int = 6000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_rows, 784, generator=g)
    y = torch.randint(0, 10, (n_rows,), generator=g)
    return module_task("mnist_shaped_mlp", MLP(784, [64], 10), x, y, None, None)


VARIANTS = {
    "vmap": dict(gradient_path="vmap", in_place_memory=False),
    "grouped": dict(gradient_path="grouped", in_place_memory=False),
    "grouped+in-place": dict(gradient_path="grouped", in_place_memory=True),
}


def build(kind: str, task, workers: int, batch: int):
    alg = Algorithm(compressor=TopK(density=0.001), feedback="ef", topology="all_to_all")
    kw = dict(n_workers=workers, batch_size=batch, seed=0)
    if kind == "loop":
        sim = LoopSimulator(task, alg, Schedule(lr=0.05), **kw)
    else:
        sim = SyncSimulator(task, alg, Schedule(lr=0.05), **VARIANTS[kind], **kw)
    # the algorithm's step only: the total-error diagnostic is off, as in runs that don't ask for it
    sim.track_total_error = False
    return sim


def time_steps(sim, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        sim.step()
    return (time.perf_counter() - t0) / steps


def run(quick: bool = False, workers: int = 100, batch: int = 10, steps: int = 5, repeats: int = 7) -> list[dict]:
    if quick:
        workers, steps, repeats = min(workers, 20), 2, 3
    task = make_task()
    kinds = ["loop", *VARIANTS]
    sims = {k: build(k, task, workers, batch) for k in kinds}
    for s in sims.values():  # warm-up
        s.step()
    times = {k: [] for k in sims}
    for _ in range(repeats):  # interleaved, so machine noise hits every engine alike
        for k, s in sims.items():
            times[k].append(time_steps(s, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    d = sims["loop"].d
    rows = []
    for k in VARIANTS:
        diff = float((sims[k].w - sims["loop"].w).abs().max())
        rows.append(
            {
                "case": f"sync step [{k}], {workers} workers, MLP 784-64-10 (d={d}), batch {batch}, top-k 0.1% ef",
                "engine_ms": med[k] * 1e3,
                "loop_ms": med["loop"] * 1e3,
                "speedup_vs_loop": med["loop"] / med[k],
                "max_abs_param_diff": diff,
                "repeats": repeats,
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_results/simulator.csv")
    a = ap.parse_args(argv)
    rows = run(a.quick, a.workers, a.batch, a.steps, a.repeats)
    for r in rows:
        print(
            f"{r['case']}: {r['engine_ms']:.1f} ms/step, loop {r['loop_ms']:.1f} ms/step, "
            f"speed-up {r['speedup_vs_loop']:.1f}x (median of {r['repeats']}), max |param diff| {r['max_abs_param_diff']:.2e}"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
