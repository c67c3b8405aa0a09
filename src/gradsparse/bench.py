"""Benchmark suite runner: ``gradsparse bench [--quick] [--only NAMES] [--out DIR]``.

Runs the scripts of the repository's ``benchmarks/`` folder (each exposes ``run(quick) -> rows``),
prints every row and writes one CSV per benchmark. Each case reports medians of repeated runs and
ratios against baselines measured in the same run; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

BENCHES = ("topk", "wire", "simulator")


def _bench_dir() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "benchmarks"
        if cand.is_dir() and (cand / "bench_simulator.py").exists():
            return cand
    raise FileNotFoundError("benchmarks/ not found: run `gradsparse bench` from a source checkout")


def _load(name: str):
    path = _bench_dir() / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"gradsparse_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gradsparse bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the targets)")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--out", default="bench_results")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if bad:
        print(f"gradsparse bench: unknown benchmark(s) {bad}; allowed: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = _load(name).run(a.quick)
        print(f"== {name} ==")
        for r in rows:
            print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        print(f"  -> {out / (name + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
