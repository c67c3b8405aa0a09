"""Top-k vs hand-tuned hard-threshold vs ``budget_threshold`` at the same total bytes (issue 11).

``gradsparse budget-compare --out DIR [--seeds 3] [--quick]`` (or :func:`compare`) runs, on each
task (logistic regression on the gisette- and madelon-shaped data sets, paper 002's setting with
step 1/L and local batch 1; the digits MLP) and each seed:

1. **top-k** with error feedback (``ef``) at a fixed density (0.17% on the convex tasks as in
   paper 002, 1% on the MLP); its realised total uplink bytes T_k set the volume;
2. **hard-threshold** with ``ef-scaled`` and lambda tuned as paper 002 did, by hand to the same
   data volume: on seed 0 a search on log lambda (bracket by factors of 4, then bisection) for
   the lambda whose realised bytes come closest to T_k, then that lambda on every seed;
3. **budget_threshold** with ``ef-scaled`` and ``budget_bytes = floor(T_k / N)`` per worker: no
   tuning, the same bytes by construction (never more, and within 5% below).

Written to ``DIR``: ``runs/`` (one run directory per run), ``budget_compare.csv`` and
``budget_compare.md`` (per task and method, mean ± std over seeds: total uplink bytes and their
ratio to top-k's, final training loss, test accuracy, total error), ``budget_compare.png``
(loss and total error vs bytes sent, mean over seeds with a ± std band) and ``verdict.json``.

Verdict rule, per task, paired by seed: with D_s = loss(budget_threshold) − loss(top-k) at the
end of seed s, "holds" when D_s <= 0 on every seed, "does not hold" when D_s > 0 on every seed,
"inconclusive" otherwise (also when budget_threshold's bytes are not within [0.95, 1] of
top-k's on every seed: then the comparison is not at equal bytes). The same rule is reported
against the hand-tuned hard-threshold.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Callable

from ..config import load_config
from .runner import run

METHODS = ("topk", "hard_threshold", "budget_threshold")
MARKER = ".budget-compare"

#: task settings: (task section, workers, batch, schedule, top-k density, steps full / quick)
TASKS = {
    "logreg_gisette_like": {
        "task": {"name": "logreg", "options": {"dataset": "gisette_like", "solve": False}},
        "quick_options": {"n_samples": 500},
        "workers": 10, "batch_size": 1, "schedule": {"kind": "constant", "lr": "1/L"},
        "density": 0.0017, "steps": 320, "quick_steps": 40,
    },
    "logreg_madelon_like": {
        "task": {"name": "logreg", "options": {"dataset": "madelon_like", "solve": False}},
        "quick_options": {"n_samples": 500},
        "workers": 10, "batch_size": 1, "schedule": {"kind": "constant", "lr": "1/L"},
        "density": 0.0017, "steps": 320, "quick_steps": 40,
    },
    "digits_mlp": {
        "task": {"name": "digits_mlp", "options": {}},
        "quick_options": {},
        "workers": 10, "batch_size": 16, "schedule": {"kind": "constant", "lr": 0.1},
        "density": 0.01, "steps": 300, "quick_steps": 30,
    },
}

METRIC_NAMES = ["step", "epoch", "loss", "test_accuracy", "total_error", "uplink_bytes", "avg_density"]


def _config(task: str, method: str, seed: int, quick: bool, compressor: dict) -> dict:
    spec = TASKS[task]
    options = dict(spec["task"]["options"], **(spec["quick_options"] if quick else {}))
    steps = spec["quick_steps"] if quick else spec["steps"]
    return {
        "name": f"{task}-{method}-seed{seed}", "seed": seed, "engine": "sync",
        "task": {"name": spec["task"]["name"], "options": options},
        "workers": {"count": spec["workers"], "batch_size": spec["batch_size"]},
        "algorithm": {"compressor": compressor, "feedback": "ef" if method == "topk" else "ef-scaled"},
        "schedule": spec["schedule"], "steps": steps,
        "metrics": {"every": max(1, steps // 20), "names": METRIC_NAMES},
        "plots": False, "progress": False,
    }


def _run(cfg: dict, out: Path) -> dict:
    """Run one config into ``out``; the summary plus the recorded rows."""
    run_dir = run(load_config(cfg), out, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
    return {"summary": summary, "rows": rows, "dir": str(run_dir)}


def _final(res: dict, key: str) -> float:
    value = res["summary"]["final"].get(key)
    return math.nan if value is None else float(value)


def tune_threshold(task: str, target_bytes: int, quick: bool, out: Path, max_runs: int | None = None) -> tuple[float, list[dict]]:
    """Paper 002's hand tuning, automated: the lambda whose realised uplink bytes (seed 0) come
    closest to ``target_bytes``. Bracket on log lambda by factors of 4 from lambda = 1, then
    bisect; stops within ±3% or after ``max_runs`` runs. Returns (lambda, [(lambda, bytes)])."""
    count = [0]

    def bytes_at(lam: float) -> int:
        res = _run(_config(task, "hard_threshold", 0, quick, {"kind": "hard_threshold", "threshold": lam}),
                   out / f"lambda{count[0]}")
        count[0] += 1
        return int(res["summary"]["uplink_bytes"])

    return search_threshold(bytes_at, target_bytes, max_runs or (5 if quick else 9))


def search_threshold(bytes_at: Callable[[float], int], target_bytes: int, max_runs: int = 9, start: float = 1.0,
                     tolerance: float = 0.03) -> tuple[float, list[dict]]:
    """The search of :func:`tune_threshold` for any run: ``bytes_at(lambda)`` runs with that
    lambda and returns its realised uplink bytes. Bracket on log lambda by factors of 4 from
    ``start``, then bisect; stops within ±``tolerance`` of ``target_bytes`` or after ``max_runs``
    runs. Returns (the lambda closest to the target, [{threshold, uplink_bytes} per run])."""
    tried: list[dict] = []
    lo = hi = None  # lo: a lambda sending more than the target, hi: one sending less
    lam = start
    while len(tried) < max_runs:
        b = int(bytes_at(lam))
        tried.append({"threshold": lam, "uplink_bytes": b})
        if abs(b - target_bytes) <= tolerance * target_bytes:
            break
        if b > target_bytes:
            lo = lam
        else:
            hi = lam
        if lo is not None and hi is not None:
            lam = math.sqrt(lo * hi)
        else:
            lam = lam * 4.0 if hi is None else lam / 4.0
    best = min(tried, key=lambda r: abs(r["uplink_bytes"] - target_bytes))
    return best["threshold"], tried


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _verdict(ours: list[float], theirs: list[float], bytes_ok: bool) -> str:
    if not bytes_ok or any(math.isnan(a) or math.isnan(b) for a, b in zip(ours, theirs)):
        return "inconclusive"
    diffs = [a - b for a, b in zip(ours, theirs)]
    if all(d <= 0 for d in diffs):
        return "holds"
    if all(d > 0 for d in diffs):
        return "does not hold"
    return "inconclusive"


def compare(out: str | Path, seeds: int = 3, quick: bool = False, tasks: list[str] | None = None) -> dict:
    """Run the comparison (see the module docstring); returns the verdict dict (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    if runs.exists():  # a previous comparison's runs (marked) are replaced; anything else is left alone
        if not (runs / MARKER).exists():
            raise FileExistsError(f"{runs} exists and was not written by budget-compare; choose another --out")
        shutil.rmtree(runs)
    runs.mkdir()
    (runs / MARKER).write_text("run directories of gradsparse budget-compare; replaced by the next comparison\n")
    tasks = list(tasks or TASKS)
    results: dict[str, dict[str, list[dict]]] = {}
    tuning: dict[str, dict] = {}
    for task in tasks:
        spec = TASKS[task]
        n = spec["workers"]
        per = {m: [] for m in METHODS}
        topk = [
            _run(_config(task, "topk", s, quick, {"kind": "topk", "density": spec["density"]}), out / "runs" / task / f"topk-seed{s}")
            for s in range(seeds)
        ]
        per["topk"] = topk
        target0 = int(topk[0]["summary"]["uplink_bytes"])
        lam, tried = tune_threshold(task, target0, quick, out / "runs" / task / "tuning")
        tuning[task] = {"threshold": lam, "target_bytes": target0, "tried": tried}
        for s in range(seeds):
            per["hard_threshold"].append(_run(
                _config(task, "hard_threshold", s, quick, {"kind": "hard_threshold", "threshold": lam}),
                out / "runs" / task / f"hard_threshold-seed{s}"))
            budget = int(topk[s]["summary"]["uplink_bytes"]) // n
            per["budget_threshold"].append(_run(
                _config(task, "budget_threshold", s, quick, {"kind": "budget_threshold", "budget_bytes": budget}),
                out / "runs" / task / f"budget_threshold-seed{s}"))
        results[task] = per

    table = []
    verdicts = {}
    for task, per in results.items():
        topk_bytes = [float(r["summary"]["uplink_bytes"]) for r in per["topk"]]
        for method in METHODS:
            rs = per[method]
            b = [float(r["summary"]["uplink_bytes"]) for r in rs]
            ratio = [x / y for x, y in zip(b, topk_bytes)]
            row = {"task": task, "method": method, "seeds": len(rs),
                   "threshold": tuning[task]["threshold"] if method == "hard_threshold" else "",
                   "budget_bytes_per_worker": int(topk_bytes[0]) // TASKS[task]["workers"] if method == "budget_threshold" else ""}
            for key, vals in (("uplink_bytes", b), ("bytes_vs_topk", ratio),
                              ("final_loss", [_final(r, "loss") for r in rs]),
                              ("test_accuracy", [_final(r, "test_accuracy") for r in rs]),
                              ("total_error", [_final(r, "total_error") for r in rs])):
                m, sd = _mean_std(vals)
                row[f"{key}_mean"], row[f"{key}_std"] = m, sd
            table.append(row)
        ours = [_final(r, "loss") for r in per["budget_threshold"]]
        bytes_ok = all(0.95 <= float(r["summary"]["uplink_bytes"]) / t <= 1.0
                       for r, t in zip(per["budget_threshold"], topk_bytes))
        verdicts[task] = {
            "budget_threshold loss <= top-k loss at equal bytes": _verdict(ours, [_final(r, "loss") for r in per["topk"]], bytes_ok),
            "budget_threshold loss <= hand-tuned hard-threshold loss": _verdict(
                ours, [_final(r, "loss") for r in per["hard_threshold"]], bytes_ok),
            "loss_difference_vs_topk_per_seed": [a - _final(r, "loss") for a, r in zip(ours, per["topk"])],
            "budget_bytes_within_[0.95,1]_of_topk": bytes_ok,
        }

    with open(out / "budget_compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    (out / "budget_compare.md").write_text(markdown_table(table, verdicts, seeds, quick))
    plot = _plot(results, out / "budget_compare.png")
    summary = {"seeds": seeds, "quick": quick, "tuning": tuning, "verdicts": verdicts,
               "rule": "per task, paired by seed: holds if D_s = loss(budget_threshold) - loss(other) <= 0 on every seed, "
                       "does not hold if D_s > 0 on every seed, inconclusive otherwise or when budget_threshold's bytes "
                       "are not within [0.95, 1] of top-k's",
               "files": {"csv": str(out / "budget_compare.csv"), "markdown": str(out / "budget_compare.md"), "plot": str(plot)}}
    (out / "verdict.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _fmt(m: float, s: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}g} ± {s:.2g}"


def markdown_table(table: list[dict], verdicts: dict, seeds: int, quick: bool) -> str:
    lines = [f"# top-k vs hard-threshold vs budget_threshold at equal bytes ({seeds} seeds{', quick' if quick else ''})", "",
             "| task | method | lambda | uplink bytes | bytes / top-k | final loss | test accuracy | total error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lam = f"{r['threshold']:.4g}" if r["threshold"] != "" else ""
        lines.append(
            f"| {r['task']} | {r['method']} | {lam} | {_fmt(r['uplink_bytes_mean'], r['uplink_bytes_std'], 6)} | "
            f"{_fmt(r['bytes_vs_topk_mean'], r['bytes_vs_topk_std'], 3)} | {_fmt(r['final_loss_mean'], r['final_loss_std'])} | "
            f"{_fmt(r['test_accuracy_mean'], r['test_accuracy_std'], 3)} | {_fmt(r['total_error_mean'], r['total_error_std'], 3)} |")
    lines += ["", "Verdict (paired by seed: holds if loss(budget_threshold) <= loss(other) on every seed, does not hold "
              "if greater on every seed, else inconclusive; inconclusive too if budget_threshold's bytes are not within "
              "[0.95, 1] of top-k's):", ""]
    for task, v in verdicts.items():
        lines.append(f"- {task}: vs top-k **{v['budget_threshold loss <= top-k loss at equal bytes']}**, "
                     f"vs hand-tuned hard-threshold **{v['budget_threshold loss <= hand-tuned hard-threshold loss']}**")
    return "\n".join(lines) + "\n"


def _band(runs: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    n = min(len(r["rows"]) for r in runs)
    xs, ms, ss = [], [], []
    for i in range(n):
        xs.append(statistics.fmean(r["rows"][i]["uplink_bytes"] for r in runs))
        m, s = _mean_std([r["rows"][i][key] for r in runs])
        ms.append(m)
        ss.append(s)
    return xs, ms, ss


def _plot(results: dict, path: Path) -> Path:
    from .plots import plt

    tasks = list(results)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (key, label) in enumerate((("loss", "training loss"), ("total_error", "total error"))):
            ax = axes[i][j]
            for method in METHODS:
                xs, ms, ss = _band(results[task][method], key)
                pts = [(x, m, s) for x, m, s in zip(xs, ms, ss) if not math.isnan(m)]
                if not pts:
                    continue
                x, m, s = zip(*pts)
                ax.plot(x, m, label=method)
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
            ax.set_xlabel("uplink bytes sent (all workers)")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
            ax.set_ylabel(label)
            if key == "total_error":
                ax.set_yscale("log")  # the step-0 value (0) is left out
            ax.set_title(task)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
