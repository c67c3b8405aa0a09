"""Asynchronous engine: cost per server update against one plain single-model SGD step.

Paper 001's setting for the cost: LeNet (28x28 inputs, d = 61,706) on MNIST-shaped random data
(speed does not depend on pixel values), mini-batch 64, 8 workers, top-k 10% with memory
(phi-MemSGD), uniform compute times and network delays. The baseline, measured in the same run
with the same thread count (torch pinned to 1 thread), is one ordinary training step of one
model: forward, backward and an in-place SGD update of the module's parameters on a batch of 64.
In steady state the engine computes one gradient per server update and handles three events
(a worker's gradient is done, its message arrives, the new model arrives back), so the ratio
"engine ms per update / plain SGD step ms" is the engine's overhead: the target is <= 1.3.

    python benchmarks/bench_async.py [--quick] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK
from gradsparse.engines.async_sim import AsyncSimulator, ComputeLaw, NetworkLaw
from gradsparse.schedules import Schedule
from gradsparse.tasks.models import LeNet, module_task


def make_task(n_rows: int = 4096, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_rows, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_rows,), generator=g)
    return module_task("mnist_shaped_lenet", LeNet(28), x, y, None, None)


def plain_sgd_step_ms(task, batch: int, steps: int) -> float:
    """Median-free mean over ``steps`` of one ordinary module training step."""
    model = LeNet(28)
    opt = torch.optim.SGD(model.parameters(), lr=0.002)
    gen = torch.Generator().manual_seed(1)
    loss_fn = torch.nn.functional.cross_entropy
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, task.n_train, (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(task.train_x[idx]), task.train_y[idx]).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def engine_update_ms(task, batch: int, steps: int, engine: AsyncSimulator) -> tuple[float, float]:
    events0 = engine._seq
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = time.perf_counter() - t0
    return dt / steps * 1e3, (engine._seq - events0) / dt


def run(quick: bool = False, repeats: int = 7, batch: int = 64) -> list[dict]:
    torch.set_num_threads(1)
    steps = 5 if quick else 20
    repeats = 3 if quick else repeats
    task = make_task()
    alg = Algorithm(compressor=TopK(density=0.1), feedback="memory", topology="ps_uplink")
    engine = AsyncSimulator(task, alg, Schedule(lr=0.002), n_workers=8, batch_size=batch, seed=0,
                            compute=ComputeLaw("uniform", low=0.9, high=1.1), network=NetworkLaw(0.002, 1.0))
    engine.track_total_error = False
    plain_sgd_step_ms(task, batch, 3), engine_update_ms(task, batch, 3, engine)  # warm-up
    plain, eng, eps = [], [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        plain.append(plain_sgd_step_ms(task, batch, steps))
        ms, rate = engine_update_ms(task, batch, steps, engine)
        eng.append(ms)
        eps.append(rate)
    p, e = statistics.median(plain), statistics.median(eng)
    return [{
        "case": f"async engine, 8 workers, LeNet (d={engine.d}), batch {batch}, top-k 10% memory",
        "engine_ms_per_update": e, "plain_sgd_step_ms": p, "overhead_vs_plain_sgd": e / p,
        "events_per_second": statistics.median(eps), "threads": torch.get_num_threads(), "repeats": repeats,
    }]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    for r in run(a.quick, a.repeats):
        print(f"{r['case']}: {r['engine_ms_per_update']:.2f} ms per server update, plain SGD step "
              f"{r['plain_sgd_step_ms']:.2f} ms, ratio {r['overhead_vs_plain_sgd']:.2f} (target <= 1.3), "
              f"{r['events_per_second']:.0f} events/s; torch threads {r['threads']}, median of {r['repeats']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
