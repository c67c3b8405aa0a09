"""Run a validated config on its engine and write a run directory.

A run directory holds:

* ``config.yaml``   the resolved config (overrides applied, defaults filled in);
* ``metrics.csv``   one row per recording step (column names: :mod:`gradsparse.metrics`);
* ``summary.json``  final value of each metric, totals, steps, wall seconds;
* ``checkpoint.pt`` engine state at the end (model, memories and momentum keyed by segment, RNG,
  counters; plain tensors, loads under ``torch.load(weights_only=True)``);
* ``residual_ratio.csv`` when ``metrics.residual_ratio.steps`` is set;
* ``worker_error_norms.csv`` when ``metrics.per_worker_error_norms`` is set;
* ``stages.csv`` for stagewise learning: each stage's average w~_s and the loss there;
* PNG plots: loss vs step and vs bytes, memory norm, density (and residual ratio).
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
from ..engines import ENGINES
from ..metrics import METRICS, RUNNING_MAXIMA, cumulative_metrics, eval_metrics, residual_ratio_curve, step_metrics
from ..schedules import Schedule
from ..segments import Layout
from ..staleness import StalenessDampening
from ..tasks import make_task
from .asynchronous import AsyncRowStats, target_reached, write_staleness_histogram


def build_task(cfg: RunConfig):
    try:
        return make_task(cfg.task.name, seed=cfg.seed, **cfg.task.options)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'task': {exc}") from None


def build_algorithm(cfg: RunConfig, layout: Layout, base_lr: float) -> Algorithm:
    """Each component built from its own config section (see :mod:`gradsparse.config`)."""
    a = cfg.algorithm

    def compressor(key: str, section):
        try:
            return make_compressor(section.kind, layout, base_lr, **section.options())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config key 'algorithm.{key}': {exc}") from None

    up = compressor("compressor", a.compressor)
    down = None
    if a.topology.down_compressor is not None:
        down = compressor("topology.down_compressor", a.topology.down_compressor)
    try:
        return Algorithm(
            compressor=up,
            feedback=a.feedback,
            momentum=a.momentum.build(),
            topology=a.topology.kind,
            down_compressor=down,
            weight_decay=a.weight_decay,
            value_dtype=cfg.value_dtype,
            staleness=StalenessDampening(a.staleness.kind, a.staleness.beta),
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


def asynchronous_options(cfg: RunConfig) -> dict:
    """The ``asynchronous`` config section as the asynchronous engine's keyword arguments."""
    from ..engines.async_sim import ComputeLaw, KardamFilter, NetworkLaw

    a = cfg.asynchronous
    try:
        return dict(
            compute=ComputeLaw(**a.compute.model_dump()), network=NetworkLaw(**a.network.model_dump()),
            server_time=a.server_time, staleness_bound=a.staleness_bound, drop_older_than=a.drop_older_than,
            kardam=KardamFilter(**a.kardam.model_dump()), update_cosine=a.update_cosine,
        )
    except ValueError as exc:
        raise ConfigError(f"config key 'asynchronous': {exc}") from None


def build_engine(cfg: RunConfig):
    """Everything that can reject the config happens here, before any file is written."""
    task = build_task(cfg)
    layout = Layout.of(task.init_params(torch.Generator().manual_seed(cfg.seed)))
    sched = build_schedule(cfg, task)
    alg = build_algorithm(cfg, layout, sched.lr)
    w = cfg.workers
    kwargs = dict(
        n_workers=w.count, batch_size=w.batch_size, split=w.split, shards_per_worker=w.shards_per_worker,
        weights=w.weights, seed=cfg.seed, gradient_shift=cfg.algorithm.gradient_shift,
    )
    if cfg.engine == "sync":
        kwargs.update(gradient_path=cfg.simulator.gradient_path, in_place_memory=cfg.simulator.in_place_memory)
    if cfg.engine == "async":
        kwargs.update(asynchronous_options(cfg))
    try:
        engine = ENGINES[cfg.engine](task, alg, sched, **kwargs)
    except ValueError as exc:
        key = "simulator.gradient_path" if "gradient_path" in str(exc) else "workers"
        if cfg.engine == "async":
            key = "engine"
        raise ConfigError(f"config key '{key}': {exc}") from None
    if alg.topology.kind not in engine.topologies:
        raise ConfigError(f"config key 'engine': engine {cfg.engine!r} does not run topology {alg.topology.kind!r}")
    # a compressor that plans over the run (budget_threshold) learns the run's length here
    if alg.down_compressor is not None and hasattr(alg.down_compressor, "bind_run"):
        raise ConfigError("config key 'algorithm.topology.down_compressor': budget_threshold keeps per-worker "
                          "state and is an uplink compressor (algorithm.compressor)")
    if hasattr(alg.compressor, "bind_run"):
        try:
            alg.compressor.bind_run(total_steps(cfg, engine), cfg.value_dtype)
        except ValueError as exc:
            raise ConfigError(f"config key 'algorithm.compressor': {exc}") from None
    # dry run of the compressors on the real dimension (e.g. k > d is caught here)
    for key, comp in (("compressor", alg.compressor), ("topology.down_compressor", alg.down_compressor)):
        if comp is None:
            continue
        try:
            comp.compress(torch.zeros(1, engine.d, dtype=engine.dtype))
        except ValueError as exc:
            raise ConfigError(f"config key 'algorithm.{key}': {exc} (the model has d = {engine.d})") from None
    if alg.feedback.kind == "ef-scaled":
        per_step = engine.data.samples_per_step()

        def epoch_of(t: int) -> float:
            return t * per_step / max(task.n_train, 1)

        bad = sched.first_nonpositive(total_steps(cfg, engine), epoch_of)
        if bad is not None:
            raise ConfigError(
                f"config key 'schedule': feedback ef-scaled divides by the step size, which this schedule "
                f"makes {sched(bad, epoch_of(bad))!r} at step {bad} (e.g. a warm-up from warmup_start = 0); "
                "use feedback ef or a schedule that stays positive"
            )
    return engine


def total_steps(cfg: RunConfig, engine) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * engine.task.n_train / engine.data.samples_per_step()))


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


def async_summary(engine, rows: list[dict], cfg: RunConfig) -> dict:
    """What summary.json adds for the asynchronous engine (and staleness.csv / .png)."""
    hist = engine.staleness_histogram()
    total = sum(c for _, c in hist)
    return {
        "virtual_time": engine.now,
        "staleness_mean": sum(s * c for s, c in hist) / total if total else None,
        "staleness_max": max((s for s, _ in hist), default=None),
        "staleness_histogram": {str(s): c for s, c in hist},
        "rejected_messages": dict(engine.rejected),
        **target_reached(rows, cfg.asynchronous.target),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run(cfg: RunConfig, out: str | Path | None = None, *, progress: bool | None = None) -> Path:
    """Run ``cfg``; returns the run directory."""
    engine = build_engine(cfg)
    steps = total_steps(cfg, engine)
    names = list(dict.fromkeys(["step", "epoch", *cfg.metrics.names]))
    engine.track_total_error = "total_error" in names
    columns = [m for m in METRICS if m in names]
    # per-step metrics the running maxima need are computed at every step
    tracked = {RUNNING_MAXIMA[m] for m in names if m in RUNNING_MAXIMA}
    maxima = {m: -math.inf for m in names if m in RUNNING_MAXIMA}
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
    worker_rows: list[dict] = []
    t0 = time.perf_counter()
    f = open(run_dir / "metrics.csv", "w", newline="")
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()

    def record(row: dict) -> None:
        full = {c: row.get(c, "") for c in columns}
        writer.writerow(full)
        f.flush()
        rows.append(full)
        if cfg.metrics.per_worker_error_norms and engine.worker_state.memory is not None:
            norms = engine.worker_state.memory.flat.norm(dim=1).tolist()
            worker_rows.append({"step": engine.t, **{f"worker_{q}": v for q, v in enumerate(norms)}})

    record({**cumulative_metrics(engine, names), **eval_metrics(engine, names)})
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=cfg.name, unit="step", dynamic_ncols=True)
    try:
        for _ in range(steps):
            rec = engine.step()
            done = engine.t
            if tracked:
                for m, value in step_metrics(engine, rec, tracked).items():
                    for name, of in RUNNING_MAXIMA.items():
                        if of == m and name in maxima and not math.isnan(value):
                            maxima[name] = max(maxima[name], value)
            if done in rr.steps:
                G = rec.weighted_grad(engine.weights)
                ks = rr.ks or sorted({max(1, round(engine.d * (i / (rr.points - 1)) ** 2)) for i in range(rr.points)})
                for k, ratio, worst in residual_ratio_curve(G, [min(k, engine.d) for k in ks]):
                    rr_rows.append({"step": done, "k": k, "density": k / engine.d, "ratio": ratio, "uniform_bound": worst})
            if done % cfg.metrics.every == 0 or done == steps:
                row = {**cumulative_metrics(engine, names), **step_metrics(engine, rec, names), **eval_metrics(engine, names)}
                for name in maxima:
                    row[name] = maxima[name] if maxima[name] > -math.inf else math.nan
                    maxima[name] = -math.inf
                record(row)
                if bar is not None:
                    post = {}
                    if "loss" in row:
                        post["loss"] = f"{row['loss']:.4g}"
                    post["density"] = f"{float(rec.nnz.double().mean()) / engine.d:.3g}"
                    post["bytes"] = _fmt_bytes(engine.ledger.uplink_bytes + engine.ledger.downlink_bytes)
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if not torch.isfinite(engine.w).all():
                raise FloatingPointError(f"the model diverged (non-finite parameters) at step {done}; lower the step size")
    finally:
        if bar is not None:
            bar.close()
        f.close()
    wall = time.perf_counter() - t0

    torch.save(engine.state_dict(), run_dir / "checkpoint.pt")
    if rr_rows:
        _write_csv(run_dir / "residual_ratio.csv", rr_rows)
    if worker_rows:
        _write_csv(run_dir / "worker_error_norms.csv", worker_rows)
    stages = []
    if engine.stagewise is not None:
        for s, avg in enumerate(engine.stagewise.averages, start=1):
            stages.append({"stage": s, "loss_at_average": engine.full_loss(avg)})
        if stages:
            _write_csv(run_dir / "stages.csv", stages)
    final = {}
    for c in columns:
        vals = [r[c] for r in rows if r[c] != ""]
        final[c] = vals[-1] if vals else None
    summary = {
        "name": cfg.name,
        "engine": engine.name,
        "algorithm": engine.alg.describe(),
        "task": engine.task.name,
        "d": engine.d,
        "workers": engine.n_workers,
        "steps": engine.t,
        "epochs": engine.epoch,
        "wall_seconds": wall,
        "gradient_path": getattr(engine, "gradient_path", None),  # what "auto" resolved to
        "in_place_memory": getattr(engine, "uses_in_place_memory", False),
        "uplink_bytes": engine.ledger.uplink_bytes,
        "downlink_bytes": engine.ledger.downlink_bytes,
        "uplink_messages": engine.ledger.uplink_messages,
        "downlink_messages": engine.ledger.downlink_messages,
        "avg_density": engine.density_sum / max(engine.t, 1),
        "total_error": engine.total_error if engine.track_total_error else None,
        "hard_threshold": getattr(engine.alg.compressor, "threshold", None),
        "stages": stages or None,
        "f_star": engine.task.f_star,
        "final": final,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if cfg.plots:
        from .plots import plot_run

        plot_run(run_dir)
    return run_dir
