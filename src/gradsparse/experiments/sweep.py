"""``gradsparse sweep CONFIG --grid key=v1,v2 ... [--seeds N]``: a grid of runs in parallel processes.

Every combination of the grid's values (each ``key`` a dotted config key, each value parsed as
YAML) is run for seeds 0..N-1, in up to ``--processes`` worker processes (default: the number of
cores), with one overall progress bar. Each run writes its own run directory under ``OUT/runs``;
the sweep writes ``OUT/sweep.csv`` (one row per run), ``OUT/table.csv`` and ``OUT/table.md``
(per grid point: mean ± std over seeds of the final value of each requested metric, and of
``steps_to_target`` / ``time_to_target`` when the config sets a target) and ``OUT/sweep.png``
(the table's first metric against the grid's first key, one line per value of the others).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..config import ConfigError, parse_yaml_value, load_config

#: summary.json fields tabulated besides the final metric values
SUMMARY_FIELDS = ("steps_to_target", "time_to_target")


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["a.b=1,2", "c=x"]`` -> {"a.b": [1, 2], "c": ["x"]} (values parsed as YAML)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not of the form dotted.key=value1,value2")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or not all(key.split(".")):
            raise ConfigError(f"--grid {item!r}: {key!r} is not a dotted config key")
        values = [parse_yaml_value(v, key, label="--grid") for v in text.split(",")]
        if key in grid:
            raise ConfigError(f"--grid {key!r} is given twice")
        grid[key] = values
    if not grid:
        raise ConfigError("sweep needs at least one --grid key=value1,value2")
    return grid


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def plan(config: str, grid: dict[str, list], seeds: int, base_overrides: list[str]) -> list[dict]:
    """Every (grid point, seed) as overrides, each validated before anything runs."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    runs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        for seed in range(seeds):
            overrides = [*base_overrides, *(_override(k, v) for k, v in point.items()), f"seed={seed}",
                         "progress=false"]
            cfg = load_config(config, overrides)  # raises ConfigError for a bad grid value
            if not runs:  # the task of the first run is built once: a user task that does not
                # import or has the wrong shape is one line before anything is written
                from .build import build_task

                build_task(cfg)
                if cfg.metrics.tensorboard:
                    from .tensorboard import require_tensorboard

                    require_tensorboard("config key 'metrics.tensorboard'")
            runs.append({"point": point, "seed": seed, "overrides": overrides})
    return runs


def _one(config: str, overrides: list[str], out: str) -> dict:
    import torch

    torch.set_num_threads(1)  # several runs share the machine's cores
    from .errors import RunDiverged
    from .runner import run

    try:
        run_dir = run(load_config(config, overrides), out)
    except RunDiverged as exc:  # a grid point may diverge (a large step size): its directory says so
        run_dir = exc.run_dir
    return json.loads((Path(run_dir) / "summary.json").read_text())


class SweepInterrupted(Exception):
    """Ctrl-C / SIGTERM during a sweep: the runs under way were interrupted (each says so in its
    summary.json and can be continued with ``gradsparse run --resume``); no tables were written."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def sweep(config: str, grid_items: list[str], out: str | Path, *, seeds: int = 1, processes: int | None = None,
          overrides: list[str] | None = None, progress: bool = True) -> Path:
    grid = parse_grid(grid_items)
    runs = plan(config, grid, seeds, overrides or [])
    if processes is not None and (isinstance(processes, bool) or processes < 1):
        raise ConfigError(f"--processes must be >= 1 (or left out: the number of cores), got {processes}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; choose another folder")
    from .rundir import check_out_dir

    check_out_dir(out, overwrite=True)  # a file, /dev/null, /proc/..., an unwritable parent: before any run
    (out / "runs").mkdir(parents=True, exist_ok=True)
    processes = max(1, min(processes or os.cpu_count() or 1, len(runs)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="sweep", unit="run", dynamic_ncols=True)
    results = []
    try:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            futures = {}
            for i, r in enumerate(runs):
                name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in r["point"].items()) + f"_seed{r['seed']}"
                futures[pool.submit(_one, config, r["overrides"], str(out / "runs" / f"{i:03d}_{name}"))] = r
            for fut in as_completed(futures):
                r = futures[fut]
                results.append({**r, "summary": fut.result()})
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:  # the runs in the pool's processes got the signal too and stopped
        if bar is not None:
            bar.close()
        raise SweepInterrupted(f"interrupted (SIGINT): {len(results)} of {len(runs)} runs finished; the run "
                               f"directories are in {out / 'runs'} (interrupted ones continue with gradsparse run "
                               "--resume DIR); no tables were written", signal.SIGINT) from None
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: (list(map(str, r["point"].values())), r["seed"]))
    write_tables(results, grid, out)
    return out


def _metrics_of(summary: dict) -> dict:
    """The run's final metrics; none for a run that did not complete (a diverged run's last finite
    row would read as a result), so means are over the completed seeds."""
    if summary.get("status", "completed") != "completed":
        return {}
    out = {f"final_{k}": v for k, v in summary["final"].items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
    for k in SUMMARY_FIELDS:
        if isinstance(summary.get(k), (int, float)):
            out[k] = summary[k]
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def write_tables(results: list[dict], grid: dict[str, list], out: Path) -> None:
    keys = list(grid)
    metric_names = sorted({m for r in results for m in _metrics_of(r["summary"])})
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "seed", "status", *metric_names])
        for r in results:
            m = _metrics_of(r["summary"])
            w.writerow([*(r["point"][k] for k in keys), r["seed"], r["summary"].get("status", "completed"),
                        *(m.get(n, "") for n in metric_names)])
    table = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(keys, values))
        mine = [r["summary"] for r in results if r["point"] == point]
        group = [_metrics_of(m) for m in mine]
        row = {**point, "seeds": len(group), "diverged": sum(m.get("status") == "diverged" for m in mine)}
        for n in metric_names:
            row[n] = _mean_std([g.get(n) for g in group])
        table.append(row)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "seeds", "diverged", *(f"{n}_{s}" for n in metric_names for s in ("mean", "std"))])
        for row in table:
            w.writerow([*(row[k] for k in keys), row["seeds"], row["diverged"], *(v for n in metric_names for v in row[n])])
    lines = ["| " + " | ".join([*keys, "seeds", "diverged", *metric_names]) + " |",
             "|" + "---|" * (len(keys) + 2 + len(metric_names))]
    for row in table:
        cells = [str(row[k]) for k in keys] + [str(row["seeds"]), str(row["diverged"])]
        cells += [f"{row[n][0]:.4g} ± {row[n][1]:.2g}" if not math.isnan(row[n][0]) else "–" for n in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(table, keys, metric_names, out)


def _plot(table: list[dict], keys: list[str], metric_names: list[str], out: Path) -> None:
    preferred = [n for n in ("steps_to_target", "final_test_accuracy", "final_loss") if n in metric_names]
    if not preferred:
        return
    metric = preferred[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x_key, others = keys[0], keys[1:]
    groups: dict = {}
    for row in table:
        groups.setdefault(tuple(row[k] for k in others), []).append(row)
    for label, rows in groups.items():
        xs = [str(r[x_key]) for r in rows]
        means = [r[metric][0] for r in rows]
        stds = [r[metric][1] for r in rows]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                    label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, label)) or None)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
