"""Layer-wise top-k: one call per segment (``kernels.topk_indices_rows`` on each segment's
columns, all rows at once) vs one call per row (``kernels.topk_indices_layerwise``: every
segment of a row in one kernel call). Prints the median time of each and the ratio, measured
in the same run, for three layouts (MNIST MLP 784-64-10, LeNet-5, 60 segments of a ResNet-sized
model) at density 1% per segment, for 1 row (one worker per process: engines torch, loop,
async, the DDP hook) and 8 rows (the vectorized simulator). Both give the same columns (checked).

Threads: torch and the compiled kernels are pinned to 1 thread (``torch.set_num_threads(1)``;
run with ``OMP_NUM_THREADS=1``), so the numbers do not depend on the machine's load.

    OMP_NUM_THREADS=1 python benchmarks/bench_layerwise_topk.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradsparse import kernels


def layouts():
    yield "MLP 784-64-10", [784 * 64, 64, 64 * 10, 10]
    yield "LeNet-5", [150, 6, 2400, 16, 48000, 120, 10080, 84, 840, 10]
    g = torch.Generator().manual_seed(0)
    yield "60 segments", [int(s) for s in torch.randint(100, 40000, (60,), generator=g)]


def per_segment(x, segs):
    return torch.cat([kernels.topk_indices_rows(x[:, a:b], k) + a for a, b, k in segs], dim=1)


def per_row(x, segs):
    offsets = torch.tensor([segs[0][0]] + [b for _, b, _ in segs])
    ks = torch.tensor([k for *_, k in segs])
    return torch.stack([kernels.topk_indices_layerwise(x[q], offsets, ks) for q in range(x.shape[0])])


def median_time(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"compiled kernels: {kernels.has_extension()}; threads pinned to 1")
    for name, sizes in layouts():
        segs, a = [], 0
        for s in sizes:
            segs.append((a, a + s, max(1, round(0.01 * s))))
            a += s
        for n in (1, 8):
            x = torch.randn(n, a, generator=torch.Generator().manual_seed(n))
            assert torch.equal(per_segment(x, segs), per_row(x, segs))
            t_seg = median_time(per_segment, x, segs, repeats=args.repeats)
            t_row = median_time(per_row, x, segs, repeats=args.repeats)
            print(f"{name:14s} segments={len(segs):3d} d={a:9,d} rows={n}: per segment {t_seg * 1e3:7.2f} ms, "
                  f"per row {t_row * 1e3:7.2f} ms, per segment / per row {t_seg / t_row:5.2f}x")


if __name__ == "__main__":
    main()
