"""Study of approximate top-k thresholds: how often does a threshold estimated without sorting
select about k entries?

For random vectors of four families (Gaussian, Laplace, Student-t with 2 degrees of freedom,
log-normal with a random sign) it estimates a threshold ``thr`` for ``k = density * d`` with

- ``sampled``: :func:`gradsparse.kernels.sampled_threshold` (1% uniform sample, the estimator the
  library's approximate top-k compressor uses);
- ``fitted:<family>``: a distribution of that family fitted to ``x`` by moments, its tail
  inverted at ``k / d`` (:func:`fitted_threshold`; only for this study, the library never fits),

counts ``|{i : |x_i| >= thr}|`` and prints the fraction of trials whose count lies in
``[0.7k, 1.3k]`` (the "hit rate"), with the median count / k, as a grid (the numbers the README
quotes). Torch is pinned to one thread (``torch.set_num_threads(1)``) when run as a script; the
results are deterministic (fixed seeds) and do not depend on it, only the running time does.

    python benchmarks/threshold_study.py            # d = 1M, 20 trials per cell
    python benchmarks/threshold_study.py --quick    # d = 1M, 5 trials per cell

``benchmarks/bench_topk.py`` adds these rows (``kind = "hit_rate"``) to its CSV via
:func:`hit_rates`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
from typing import Callable

import torch

from gradsparse.kernels import sampled_threshold

DENSITIES = (0.001, 0.01)
METHODS = ("sampled", "fitted:gaussian", "fitted:exponential", "fitted:lognormal", "fitted:gamma")
DISTS = ("gaussian", "laplace", "student_t2", "lognormal")
FITS = ("gaussian", "exponential", "laplace", "lognormal", "gamma")
BAND = (0.7, 1.3)


def make_test_vector(dist: str, d: int, generator: torch.Generator) -> torch.Tensor:
    """Random float32 vectors: ``gaussian``, ``laplace``, ``student_t2`` (Student-t, 2 degrees of
    freedom), ``lognormal`` (random sign times exp(N(0,1)))."""
    if dist == "gaussian":
        return torch.randn(d, generator=generator)
    sign = torch.randint(0, 2, (d,), generator=generator).float().mul_(2).sub_(1)
    if dist == "laplace":
        return torch.empty(d).exponential_(generator=generator).mul_(sign)
    if dist == "student_t2":
        z = torch.randn(d, generator=generator)
        return z.div_(torch.empty(d).exponential_(generator=generator).sqrt_())  # chi2_2 / 2 = Exp(1)
    if dist == "lognormal":
        return torch.randn(d, generator=generator).exp_().mul_(sign)
    raise ValueError(f"unknown dist {dist!r}; use one of {DISTS}")


def fitted_threshold(x: torch.Tensor, k: int, dist: str = "gaussian") -> float:
    """Threshold from a distribution fitted to ``x`` by moments, its tail inverted at ``k/d``.

    - ``"gaussian"``: ``x ~ N(mean, std^2)``; solves ``P(|x| >= t) = k/d`` (two-sided tail, by
      bisection).
    - ``"exponential"`` (alias ``"laplace"``): ``|x| ~ Exp`` with mean ``mean|x|``:
      ``t = mean|x| * ln(d/k)``.
    - ``"lognormal"``: ``log|x|`` over the nonzero entries ``~ N(mu, s^2)``:
      ``t = exp(mu + s * Phi^{-1}(1 - k/nnz))``.
    - ``"gamma"``: ``|x| ~ Gamma`` with shape ``mean^2/var`` and scale ``var/mean`` of ``|x|``
      (needs scipy).
    """
    flat = x.reshape(-1)
    d = flat.numel()
    if not 0 <= k <= d:
        raise ValueError(f"k={k} must lie in [0, d={d}]")
    if dist not in FITS:
        raise ValueError(f"dist must be one of {FITS}, got {dist!r}")
    if d == 0 or k == 0:
        return math.inf
    if k == d:
        return 0.0
    p = k / d
    a = flat.abs().double()
    if dist == "gaussian":
        mu = float(flat.double().mean())
        sd = float(flat.double().std()) if d > 1 else 0.0
        if sd == 0.0:
            return abs(mu)

        def tail(t: float) -> float:
            return 0.5 * math.erfc((t - mu) / (sd * math.sqrt(2))) + 0.5 * math.erfc((t + mu) / (sd * math.sqrt(2)))

        lo, hi = 0.0, abs(mu) + sd
        while tail(hi) > p:
            hi *= 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if tail(mid) > p:
                lo = mid
            else:
                hi = mid
        return hi
    if dist in ("exponential", "laplace"):
        return float(a.mean()) * math.log(d / k)
    if dist == "lognormal":
        nz = a[a > 0]
        if nz.numel() <= k:
            return 0.0
        la = nz.log()
        mu, s = float(la.mean()), float(la.std()) if nz.numel() > 1 else 0.0
        return math.exp(mu + s * statistics.NormalDist().inv_cdf(1.0 - k / nz.numel()))
    from scipy.special import gammainccinv  # gamma

    mean, var = float(a.mean()), float(a.var())
    if mean <= 0.0 or var <= 0.0:
        return mean
    shape, scale = mean * mean / var, var / mean
    return float(scale * gammainccinv(shape, p))


def _method_fn(method: str | Callable, sample_fraction: float) -> Callable[[torch.Tensor, int, torch.Generator], float]:
    if callable(method):
        return method
    if method == "sampled":
        return lambda x, k, gen: sampled_threshold(x, k, sample_fraction, gen)
    if method.startswith("fitted:"):
        dist = method.split(":", 1)[1]
        if dist not in FITS:
            raise ValueError(f"unknown fit {dist!r}; use one of {FITS}")
        return lambda x, k, gen: fitted_threshold(x, k, dist)
    raise ValueError(f"unknown method {method!r}; use 'sampled' or 'fitted:<dist>' or a callable")


def threshold_count_ratios(
    method: str | Callable, dist: str, d: int, k: int, trials: int = 20, seed: int = 0, sample_fraction: float = 0.01
) -> torch.Tensor:
    """Ratios ``|{i: |x_i| >= thr}| / k`` over ``trials`` random vectors of :func:`make_test_vector`.

    ``method``: ``"sampled"``, ``"fitted:<dist>"`` or a callable ``(x, k, generator) -> thr``.
    """
    fn = _method_fn(method, sample_fraction)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        x = make_test_vector(dist, d, gen)
        thr = fn(x, k, gen)
        out[t] = int((x.abs() >= thr).sum()) / k
    return out


def hit_rates(d: int, trials: int, seed: int = 0, densities=DENSITIES, methods=METHODS, dists=DISTS) -> list[dict]:
    """One row per (density, method, dist): hit rate (fraction of trials in ``BAND``) and the
    median count / k."""
    rows = []
    for rho in densities:
        k = max(1, int(rho * d))
        for dist in dists:
            for method in methods:
                r = threshold_count_ratios(method, dist, d, k, trials=trials, seed=seed)
                hit = float(((r >= BAND[0]) & (r <= BAND[1])).double().mean())
                rows.append(
                    {
                        "kind": "hit_rate",
                        "d": d,
                        "k": k,
                        "density": rho,
                        "method": method,
                        "dist": dist,
                        "hit_rate": round(hit, 3),
                        "median_count_over_k": round(float(r.median()), 3),
                        "trials": trials,
                    }
                )
    return rows


def print_grid(rows: list[dict]) -> None:
    h = [r for r in rows if r["kind"] == "hit_rate"]
    if not h:
        return
    dists = list(dict.fromkeys(r["dist"] for r in h))
    print(f"fraction of trials with |{{|x| >= thr}}| in [{BAND[0]}k, {BAND[1]}k]  (d={h[0]['d']}, trials={h[0]['trials']})")
    print(f"{'density':>8} {'method':<20} " + " ".join(f"{dd:>11}" for dd in dists))
    for rho in dict.fromkeys(r["density"] for r in h):
        for m in dict.fromkeys(r["method"] for r in h):
            vals = {r["dist"]: r for r in h if r["density"] == rho and r["method"] == m}
            cells = " ".join(f"{vals[dd]['hit_rate']:>5.2f}({vals[dd]['median_count_over_k']:>4.2f})" for dd in dists)
            print(f"{rho:>8} {m:<20} {cells}")
    print("cells: hit rate (median count / k)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 trials per cell instead of 20")
    p.add_argument("--d", type=int, default=1_000_000, help="vector length (default 1M)")
    p.add_argument("--trials", type=int, default=None, help="random vectors per cell (20; 5 quick)")
    p.add_argument("--out", default=None, help="also write the rows to this CSV")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("torch threads pinned to 1 (results do not depend on it)")
    trials = a.trials or (5 if a.quick else 20)
    rows = hit_rates(a.d, trials)
    print_grid(rows)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
