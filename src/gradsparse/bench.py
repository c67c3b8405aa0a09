"""Benchmark suite runner: ``gradsparse bench [--quick] [--only NAMES] [--out DIR]``.

Runs the scripts of the repository's ``benchmarks/`` folder (each exposes ``run(quick) -> rows``),
prints every row and writes one CSV per benchmark. Each case reports medians of repeated runs and
ratios against baselines measured in the same run; nothing here asserts a time. At the end the
ratios are compared with the performance targets (:data:`TARGETS`) and a table of
target / measured / met is printed and written to ``targets.csv``.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

BENCHES = ("topk", "wire", "simulator", "async", "hook")


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


#: (benchmark, description, row filter, column, comparison, bound). The topk and wire rows are for
#: d = 25M (quick runs use smaller sizes, so their verdicts are only indicative).
TARGETS: tuple = (
    *(
        (
            "topk", f"exact top-k ({path}) at {rho:.1%}: <= 5x a copy", dict(kind="time", method=f"topk_indices[{path}]", density=rho, largest_d=True),
            "x_copy", "<=", 5.0,
        )
        for path in ("ext", "torch") for rho in (0.001, 0.01)
    ),
    *(
        (
            "topk", f"exact top-k ({path}) at {rho:.1%}: >= 8x faster than torch.topk",
            dict(kind="time", method=f"topk_indices[{path}]", density=rho, largest_d=True), "speedup_vs_torch_topk", ">=", 8.0,
        )
        for path in ("ext", "torch") for rho in (0.001, 0.01)
    ),
    *(
        ("topk", f"layer-wise top-k ({path}), 100 segments, at {rho:.1%}: <= 5x a copy",
         dict(kind="time", method=f"topk_layerwise100[{path}]", density=rho, largest_d=True), "x_copy", "<=", 5.0)
        for path in ("ext", "torch") for rho in (0.001, 0.01)
    ),
    *(
        ("topk", f"hard-threshold EF step ({path}) at {rho:.1%}: <= 3x a copy",
         dict(kind="time", method=f"ht_ef[{path}]", density=rho, largest_d=True), "x_copy", "<=", 3.0)
        for path in ("ext", "torch") for rho in (0.001, 0.01)
    ),
    *(
        ("topk", f"top-k EF step ({path}) at {rho:.1%}: <= 6x a copy",
         dict(kind="time", method=f"topk_ef[{path}]", density=rho, largest_d=True), "x_copy", "<=", 6.0)
        for path in ("ext", "torch") for rho in (0.001, 0.01)
    ),
    *(
        ("wire", f"Rice index payload at {rho:.1%}: <= 1.05x log2 C(d,k)",
         dict(kind="codec", encoding="rice", density=rho, largest_d=True), "idx_vs_entropy", "<=", 1.05)
        for rho in (0.001, 0.01)
    ),
    ("wire", "byte-aligned index payload, worst density in 0.05%-0.99%: <= 1.35x log2 C(d,k)",
     dict(kind="sweep_max"), "idx_vs_entropy", "<=", 1.35),
    ("wire", "encode + decode of a 0.1% message (auto): <= 0.1x torch.topk",
     dict(kind="codec", encoding="auto", density=0.001, largest_d=True), "encdec_over_topk", "<=", 0.1),
    ("wire", "encode + decode of a 0.1% message (auto): <= 0.5x gradsparse's exact top-k",
     dict(kind="codec", encoding="auto", density=0.001, largest_d=True), "encdec_over_exact_topk", "<=", 0.5),
    ("simulator", "vectorized simulator (default engine): >= 5x faster than the loop over model copies",
     dict(case_prefix="sync step [grouped+in-place]"), "speedup_vs_loop", ">=", 5.0),
    ("async", "asynchronous engine, LeNet batch 64, top-k 10% memory: <= 1.3x a plain SGD step per update",
     dict(case_prefix="async engine"), "overhead_vs_plain_sgd", "<=", 1.3),
    *(
        ("hook", f"DDP hook, top-k {rho:.1%} layer-wise: encode + decode <= 40% of the hook's compute",
         dict(case_prefix="hook step", density=rho), "encdec_fraction", "<=", 0.4)
        for rho in (0.001, 0.01)
    ),
)


def _matches(row: dict, filt: dict) -> bool:
    for k, v in filt.items():
        if k == "largest_d":
            continue
        if k == "case_prefix":
            if not str(row.get("case", "")).startswith(v):
                return False
        elif isinstance(v, float):
            if not isinstance(row.get(k), (int, float)) or abs(float(row[k]) - v) > 1e-12:
                return False
        elif row.get(k) != v:
            return False
    return True


def check_targets(results: dict[str, list[dict]]) -> list[dict]:
    """One row per target whose benchmark ran: target, measured value, met (True/False), or
    ``met = None`` when no row matched (e.g. the compiled kernels are not built)."""
    out = []
    for bench, desc, filt, col, op, bound in TARGETS:
        if bench not in results:
            continue
        rows = [r for r in results[bench] if _matches(r, filt) and r.get(col) not in (None, "")]
        if rows and filt.get("largest_d"):  # the target is stated for the largest size measured
            dmax = max(int(r["d"]) for r in rows)
            rows = [r for r in rows if int(r["d"]) == dmax]
        vals = [float(r[col]) for r in rows]
        if not vals:
            out.append({"target": desc, "measured": None, "met": None})
            continue
        v = max(vals) if op == "<=" else min(vals)  # the worst matching row decides
        out.append({"target": desc, "measured": v, "met": v <= bound if op == "<=" else v >= bound})
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    from .command_line import OneLineParser, UsageError, error

    ap = OneLineParser(prog="gradsparse bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the targets)")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--out", default="bench_results")
    try:
        a = ap.parse_args(argv)
    except UsageError as exc:
        return error(exc)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if not names:
        return error(f"bench --only {a.only!r} names no benchmark; allowed: {', '.join(BENCHES)}")
    if bad:
        return error(f"bench --only: unknown benchmark(s) {bad}; allowed: {', '.join(BENCHES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name in names:
        rows = results[name] = _load(name).run(a.quick)
        print(f"== {name} ==")
        for r in rows:
            print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        print(f"  -> {out / (name + '.csv')}")
    verdicts = check_targets(results)
    if verdicts:
        note = " (quick sizes: indicative only)" if a.quick else ""
        print(f"== targets{note} ==")
        for v in verdicts:
            met = {True: "met", False: "NOT MET", None: "not measured"}[v["met"]]
            meas = "-" if v["measured"] is None else f"{v['measured']:.4g}"
            print(f"  {met:>12}  {meas:>8}  {v['target']}")
        with open(out / "targets.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["target", "measured", "met"])
            w.writeheader()
            w.writerows(verdicts)
        print(f"  -> {out / 'targets.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
