"""Benchmark of the sparsification kernels against a copy of the same vector.

For densities 0.1 % and 1 % of d it times (median of --repeats runs each):

- ``copy``: ``y.copy_(x)`` into a preallocated buffer, the baseline;
- ``torch_topk``: ``torch.topk(x.abs(), k)``;  ``np_argpartition``: ``np.argpartition(|x|, d-k)``;
- ``topk_indices[ext]`` / ``topk_indices[torch]``: gradsparse.kernels.topk_indices, compiled and
  pure-torch paths;
- ``topk_layerwise100[ext]`` / ``topk_layerwise100[torch]``: topk_indices_layerwise on the same
  vector cut into 100 equal segments (like 100 workers' rows), max(1, k // 100) per segment;
- ``ht_ef_plain`` vs ``ht_ef[ext]`` / ``ht_ef[torch]``: one hard-threshold error-feedback step
  (a = e + alpha g; send |a| >= lam; zero them), written plainly vs
  ``kernels.accumulate_threshold_`` (the kernel the library calls);
- ``topk_ef_plain`` vs ``topk_ef[ext]`` / ``topk_ef[torch]``: the same with exact top-k, vs
  ``kernels.accumulate_topk_``.

Each timed run is preceded by a timed copy, and ``x_copy`` is the method's median divided by the
median of the copies interleaved with it (so that load from other processes hits both alike).
It then prints how often approximate thresholds select between 0.7k and 1.3k entries (the rows
of ``benchmarks/threshold_study.py``, which can also be run on its own).

    python benchmarks/bench_topk.py                 # d = 25M
    python benchmarks/bench_topk.py --quick         # d = 1M
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gradsparse import kernels as K

DENSITIES = (0.001, 0.01)


def _threshold_study():
    """benchmarks/threshold_study.py, loaded by path (this file is itself loaded by path by
    ``gradsparse bench``, so the folder need not be on sys.path)."""
    path = Path(__file__).resolve().with_name("threshold_study.py")
    spec = importlib.util.spec_from_file_location("gradsparse_threshold_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _measure(fn, x: torch.Tensor, y: torch.Tensor, repeats: int, setup=None) -> tuple[float, float]:
    """(median seconds of fn, median seconds of the copies interleaved with it)."""
    fn() if setup is None else (setup(), fn())  # warm-up (buffers, page faults)
    ts, cs = [], []
    for _ in range(repeats):
        cs.append(_time(lambda: y.copy_(x)))
        if setup is not None:
            setup()
        ts.append(_time(fn))
    return statistics.median(ts), statistics.median(cs)


def time_kernels(d: int, repeats: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen)
    y = torch.empty_like(x)
    xn = x.numpy()
    e0 = torch.randn(d, generator=gen) * 0.1
    g = torch.randn(d, generator=gen)
    e = torch.empty_like(e0)
    alpha = 0.1
    has_ext = K.has_extension()
    rows: list[dict] = []
    for rho in DENSITIES:
        k = max(1, int(rho * d))
        a0 = e0.clone().add_(g, alpha=alpha)
        lam = float(a0.abs()[K.topk_indices(a0, k)].min())  # hard threshold giving ~k entries
        reset = lambda: e.copy_(e0)  # noqa: E731  (not timed)

        def ht_plain():
            e.add_(g, alpha=alpha)
            mask = e.abs() >= lam
            idx = mask.nonzero().view(-1)
            vals = e[idx]
            e[mask] = 0.0
            return idx, vals

        def topk_plain():
            e.add_(g, alpha=alpha)
            idx = torch.topk(e.abs(), k, sorted=False).indices
            vals = e[idx]
            e[idx] = 0.0
            return idx, vals

        offs = torch.linspace(0, d, 101).long()
        ks = torch.full((100,), max(1, k // 100), dtype=torch.long).clamp_(max=offs[1:] - offs[:-1])
        cases = [
            ("copy", lambda: y.copy_(x), None),
            ("torch_topk", lambda: torch.topk(x.abs(), k), None),
            ("np_argpartition", lambda: np.argpartition(np.abs(xn), d - k)[d - k :], None),
            ("topk_indices[torch]", lambda: K.topk_indices(x, k, use_ext=False), None),
            ("topk_layerwise100[torch]", lambda: K.topk_indices_layerwise(x, offs, ks, use_ext=False), None),
            ("ht_ef_plain", ht_plain, reset),
            ("ht_ef[torch]", lambda: K.accumulate_threshold_(e, g, alpha, lam, use_ext=False), reset),
            ("topk_ef_plain", topk_plain, reset),
            ("topk_ef[torch]", lambda: K.accumulate_topk_(e, g, alpha, k, use_ext=False), reset),
        ]
        if has_ext:
            cases.insert(4, ("topk_indices[ext]", lambda: K.topk_indices(x, k, use_ext=True), None))
            lw = lambda: K.topk_indices_layerwise(x, offs, ks, use_ext=True)  # noqa: E731
            cases.insert(5, ("topk_layerwise100[ext]", lw, None))
            cases.insert(8, ("ht_ef[ext]", lambda: K.accumulate_threshold_(e, g, alpha, lam, use_ext=True), reset))
            cases.append(("topk_ef[ext]", lambda: K.accumulate_topk_(e, g, alpha, k, use_ext=True), reset))
        res = {}
        for name, fn, setup in cases:
            t, c = _measure(fn, x, y, repeats, setup)
            res[name] = (t, c)
        t_topk = res["torch_topk"][0]
        for name, (t, c) in res.items():
            rows.append(
                {
                    "kind": "time",
                    "d": d,
                    "k": k,
                    "density": rho,
                    "method": name,
                    "median_ms": round(t * 1e3, 3),
                    "copy_ms": round(c * 1e3, 3),
                    "x_copy": round(t / c, 2),
                    "speedup_vs_torch_topk": round(t_topk / t, 2),
                    "repeats": repeats,
                    "threads": torch.get_num_threads(),
                }
            )
    return rows


def hit_rates(d: int, trials: int, seed: int = 0) -> list[dict]:
    """The threshold study's rows (``kind = "hit_rate"``), see benchmarks/threshold_study.py."""
    return _threshold_study().hit_rates(d, trials, seed=seed, densities=DENSITIES)


def run(quick: bool = False, d: int | None = None, repeats: int = 7, trials: int | None = None) -> list[dict]:
    """Suite entry point: timing rows then hit-rate rows (dicts, one per CSV line)."""
    d = d or (1_000_000 if quick else 25_000_000)
    trials = trials or (5 if quick else 20)
    return time_kernels(d, repeats) + hit_rates(min(d, 1_000_000), trials)


def print_rows(rows: list[dict]) -> None:
    print(f"extension: {K.extension_path() if K.has_extension() else 'not used'}; torch threads {torch.get_num_threads()}")
    t = [r for r in rows if r["kind"] == "time"]
    if t:
        print(f"\n{'density':>8} {'method':<24} {'median ms':>10} {'copy ms':>8} {'x copy':>7} {'vs torch.topk':>13}")
        for r in t:
            print(
                f"{r['density']:>8} {r['method']:<24} {r['median_ms']:>10.2f} {r['copy_ms']:>8.2f} "
                f"{r['x_copy']:>7.2f} {r['speedup_vs_torch_topk']:>12.2f}x"
            )
    if any(r["kind"] == "hit_rate" for r in rows):
        print()
        _threshold_study().print_grid(rows)


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=25_000_000, help="vector length (default 25M)")
    p.add_argument("--quick", action="store_true", help="d = 1M, fewer hit-rate trials")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per method (median reported)")
    p.add_argument("--trials", type=int, default=None, help="random vectors per hit-rate cell (20; 5 quick)")
    p.add_argument("--out", default="bench_results/topk.csv", help="CSV output path")
    a = p.parse_args(argv)
    d = 1_000_000 if a.quick else a.d
    rows = run(a.quick, d=d, repeats=max(1, a.repeats), trials=a.trials)
    print_rows(rows)
    write_csv(rows, a.out)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
