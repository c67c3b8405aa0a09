"""Run a validated config on the synchronous simulator and write a run directory.

A run directory holds:

* ``config.yaml``   the resolved config (overrides applied, defaults filled in);
* ``metrics.csv``   one row per recording step (column names: :mod:`gradsparse.metrics`);
* ``summary.json``  final value of each metric, totals, steps, wall seconds;
* ``checkpoint.pt`` simulator state at the end (model, memories, momentum, RNG, counters);
* ``residual_ratio.csv`` when ``metrics.residual_ratio.steps`` is set;
* PNG plots: loss vs step and vs bytes, error norm, density (and residual ratio).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

from ..algorithm import Algorithm
from ..compressors import make_compressor
from ..config import ConfigError, RunConfig, dump_config
from ..engines.sync_sim import SyncSimulator
from ..metrics import METRICS, cumulative_metrics, eval_metrics, residual_ratio_curve, step_metrics
from ..schedules import Schedule
from ..tasks import make_task


def build_task(cfg: RunConfig):
    try:
        return make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'task': {exc}") from None


def build_algorithm(cfg: RunConfig, layout: list[int]) -> Algorithm:
    a = cfg.algorithm
    try:
        up = make_compressor(a.compressor.kind, layout=layout, **a.compressor.options())
        down = None
        if a.topology.down_compressor is not None:
            dc = a.topology.down_compressor
            down = make_compressor(dc.kind, layout=layout, **dc.options())
        return Algorithm(
            compressor=up,
            feedback=a.feedback,
            momentum=a.momentum.kind,
            beta=a.momentum.beta if a.momentum.kind != "none" else 0.0,
            nesterov=a.momentum.nesterov,
            masking=a.momentum.masking,
            weight_decay=a.weight_decay,
            topology=a.topology.kind,
            down_compressor=down,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'algorithm': {exc}") from None


def build_schedule(cfg: RunConfig, task) -> Schedule:
    s = cfg.schedule
    lr = s.lr
    if lr == "1/L":
        if "L" not in task.info:
            raise ConfigError(f"config key 'schedule.lr': '1/L' needs a task that knows L; {task.name!r} does not")
        lr = 1.0 / task.info["L"]
    try:
        return Schedule(
            kind=s.kind, lr=float(lr), milestones=s.milestones, warmup_epochs=s.warmup_epochs,
            warmup_start=s.warmup_start, power=s.power, beta=s.beta, mu=s.mu,
            stage_steps=s.stage_steps, prox_gamma=s.prox_gamma,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'schedule': {exc}") from None


def build_simulator(cfg: RunConfig) -> SyncSimulator:
    """Everything that can reject the config happens here, before any file is written."""
    task = build_task(cfg)
    params = task.init_params(torch.Generator().manual_seed(cfg.seed))
    layout = [int(p.numel()) for p in params.values()]
    alg = build_algorithm(cfg, layout)
    sched = build_schedule(cfg, task)
    w = cfg.workers
    try:
        sim = SyncSimulator(
            task, alg, sched, n_workers=w.count, batch_size=w.batch_size, split=w.split,
            shards_per_worker=w.shards_per_worker, weights=w.weights, seed=cfg.seed,
            value_dtype=cfg.value_dtype, gradient_shift=cfg.algorithm.gradient_shift,
            gradient_path=cfg.simulator.gradient_path, in_place_memory=cfg.simulator.in_place_memory,
        )
    except ValueError as exc:
        key = "simulator.gradient_path" if "gradient_path" in str(exc) else "workers"
        raise ConfigError(f"config key '{key}': {exc}") from None
    # dry run of the compressors on the real dimension (e.g. k > d is caught here)
    for key, comp in (("compressor", alg.compressor), ("topology.down_compressor", alg.down_compressor)):
        if comp is None:
            continue
        try:
            comp(torch.zeros(1, sim.d, dtype=sim.dtype))
        except ValueError as exc:
            raise ConfigError(f"config key 'algorithm.{key}': {exc} (the model has d = {sim.d})") from None
    return sim


def total_steps(cfg: RunConfig, sim: SyncSimulator) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = sim.n_workers * (int(sim.lens.max()) if sim.batch_size == "full" else sim.batch_size)
    return max(1, math.ceil(cfg.epochs * sim.task.n_train / per_step))


def unique_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 1
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}PB"


def run(cfg: RunConfig, out: str | Path | None = None, *, progress: bool | None = None) -> Path:
    """Run ``cfg``; returns the run directory."""
    sim = build_simulator(cfg)
    steps = total_steps(cfg, sim)
    names = list(dict.fromkeys(["step", "epoch", *cfg.metrics.names]))
    sim.track_total_error = "total_error" in names
    columns = [m for m in METRICS if m in names]
    rr = cfg.metrics.residual_ratio
    bad = [s for s in rr.steps if not 1 <= s <= steps]
    if bad:
        raise ConfigError(f"config key 'metrics.residual_ratio.steps': steps {bad} outside 1..{steps}")

    run_dir = unique_dir(Path(out) if out is not None else Path("runs") / cfg.name)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    show = cfg.progress if progress is None else progress
    rows: list[dict] = []
    rr_rows: list[dict] = []
    t0 = time.perf_counter()
    f = open(run_dir / "metrics.csv", "w", newline="")
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()

    def record(row: dict) -> None:
        full = {c: row.get(c, "") for c in columns}
        writer.writerow(full)
        f.flush()
        rows.append(full)

    record({**cumulative_metrics(sim, names), **eval_metrics(sim, names)})
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=cfg.name, unit="step", dynamic_ncols=True)
    try:
        for _ in range(steps):
            rec = sim.step()
            done = sim.t
            if done in rr.steps:
                G = sim.weights @ rec.worker.accumulated
                ks = rr.ks or sorted({max(1, round(sim.d * (i / (rr.points - 1)) ** 2)) for i in range(rr.points)})
                for k, ratio, worst in residual_ratio_curve(G, [min(k, sim.d) for k in ks]):
                    rr_rows.append({"step": done, "k": k, "density": k / sim.d, "ratio": ratio, "uniform_bound": worst})
            if done % cfg.metrics.every == 0 or done == steps:
                row = {**cumulative_metrics(sim, names), **step_metrics(sim, rec, names), **eval_metrics(sim, names)}
                record(row)
                if bar is not None:
                    post = {}
                    if "loss" in row:
                        post["loss"] = f"{row['loss']:.4g}"
                    post["density"] = f"{float(rec.nnz.float().mean()) / sim.d:.3g}"
                    post["bytes"] = _fmt_bytes(sim.uplink_bytes + sim.downlink_bytes)
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if not torch.isfinite(sim.w).all():
                raise FloatingPointError(f"the model diverged (non-finite parameters) at step {done}; lower the step size")
    finally:
        if bar is not None:
            bar.close()
        f.close()
    wall = time.perf_counter() - t0

    torch.save(sim.state_dict(), run_dir / "checkpoint.pt")
    if rr_rows:
        with open(run_dir / "residual_ratio.csv", "w", newline="") as g:
            w = csv.DictWriter(g, fieldnames=list(rr_rows[0]))
            w.writeheader()
            w.writerows(rr_rows)
    final = {}
    for c in columns:
        vals = [r[c] for r in rows if r[c] != ""]
        final[c] = vals[-1] if vals else None
    summary = {
        "name": cfg.name,
        "algorithm": sim.alg.describe(),
        "task": sim.task.name,
        "d": sim.d,
        "workers": sim.n_workers,
        "steps": sim.t,
        "epochs": sim.epoch,
        "wall_seconds": wall,
        "gradient_path": sim.gradient_path,  # what "auto" resolved to
        "in_place_memory": sim.fused_memory,
        "uplink_bytes": sim.uplink_bytes,
        "downlink_bytes": sim.downlink_bytes,
        "avg_density": sim.density_sum / max(sim.t, 1),
        "total_error": sim.total_error if sim.track_total_error else None,
        "f_star": sim.task.f_star,
        "final": final,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if cfg.plots:
        from .plots import plot_run

        plot_run(run_dir)
    return run_dir
