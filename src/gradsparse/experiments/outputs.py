"""What a run writes when it ends (completed, diverged, interrupted or failed): ``summary.json``
(the final value of each metric, totals, steps, wall seconds, status and whatever the ending
adds), ``residual_ratio.csv``, ``worker_error_norms.csv``, ``stages.csv`` (stagewise learning:
each stage's average w~_s and the loss there) and, for the asynchronous engine, ``staleness.csv``.

``summary.json`` is strict JSON: NaN and infinities are written as null (:func:`strict_json`).
``metrics.csv`` is written row by row during the run (:mod:`gradsparse.experiments.loop`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from ..config import RunConfig
from .asynchronous import target_reached, write_staleness_histogram
from .rundir import atomic_write_text
from .run_state import RunState, config_sha256


def strict_json(x):
    """NaN / inf as null, tensors and numpy scalars as numbers: valid JSON."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
        return strict_json(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return v if math.isfinite(v) else None


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV file, the first row's keys as the header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


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
        **engine.summary_counts(),
        **target_reached(rows, cfg.asynchronous.target),
    }


def write_outputs(cfg: RunConfig, engine, columns: list[str], state: RunState, run_dir: Path, status: str,
                  extra: dict, async_stats) -> None:
    """Write the end-of-run files into ``run_dir``: summary.json with ``status`` and the ``extra``
    keys of that ending, and the side CSVs the run recorded (``async_stats`` is not None for an
    asynchronous engine)."""
    if state.rr_rows:
        write_csv(run_dir / "residual_ratio.csv", state.rr_rows)
    if state.worker_rows:
        write_csv(run_dir / "worker_error_norms.csv", state.worker_rows)
    stages, output = [], None
    if engine.stagewise is not None and status == "completed":
        # w~_1 .. w~_{S-1} started stages; the last stage's average w~_S is the algorithm's output
        output = engine.stagewise.output()
        averages = list(engine.stagewise.averages) + ([output] if output is not None else [])
        for s, avg in enumerate(averages, start=1):
            stages.append({"stage": s, "loss_at_average": engine.full_loss(avg)})
        if stages:
            write_csv(run_dir / "stages.csv", stages)
    final = {}
    for c in columns:
        vals = [r[c] for r in state.rows if r[c] != ""]
        final[c] = vals[-1] if vals else None
    final_last_iterate = None
    if output is not None:  # a stagewise run's final values are those of w~_S, not of the last iterate
        final_last_iterate = dict(final)
        final["loss"] = stages[-1]["loss_at_average"]
        if "suboptimality" in final and engine.task.f_star is not None:
            final["suboptimality"] = final["loss"] - engine.task.f_star
        if "test_accuracy" in final:
            final["test_accuracy"] = engine.test_accuracy(output)
    summary = {
        "name": cfg.name,
        "status": status,
        "run_id": state.run_id,
        "config_sha256": config_sha256(state.config) if state.config is not None else None,
        "engine": engine.name,
        "algorithm": engine.alg.describe(),
        "task": engine.task.name,
        "d": engine.d,
        "workers": engine.n_workers,
        "steps": engine.t,
        "epochs": engine.epoch,
        "wall_seconds": state.wall,
        "gradient_path": engine.gradient_path,  # what "auto" resolved to
        "in_place_memory": engine.uses_in_place_memory,
        "uplink_bytes": engine.ledger.uplink_bytes,
        "downlink_bytes": engine.ledger.downlink_bytes,
        "uplink_messages": engine.ledger.uplink_messages,
        "downlink_messages": engine.ledger.downlink_messages,
        # what this process (rank 0 of a real run) handed to its transport; 0 in the simulators
        "sent_bytes": engine.ledger.sent_bytes,
        "diagnostic_bytes": engine.ledger.diagnostic_bytes,
        # what all ranks together would hand (simulators: predicted) or handed (engine torch) to
        # their transports under the collective; per rank and step below
        "collective": engine.collective,
        "all_ranks_sent_bytes": engine.ledger.all_ranks_sent_bytes,
        "sent_bytes_per_rank_step": engine.ledger.all_ranks_sent_bytes / max(engine.n_workers * engine.t, 1),
        "avg_density": engine.density_sum / max(engine.t, 1),
        "total_error": engine.total_error if engine.track_total_error else None,
        "on_nonfinite": cfg.on_nonfinite,
        "skipped_messages": state.skipped,
        "hard_threshold": engine.alg.compressor.threshold,
        "uplink_budget": engine.alg.compressor.budget_summary(engine),
        "stages": stages or None,
        "final_is": "stage_average" if output is not None else "last_iterate",
        **({"final_last_iterate": final_last_iterate} if final_last_iterate is not None else {}),
        "f_star": engine.task.f_star,
        "final": final,
        **({"config_changes": state.config_changes} if state.config_changes else {}),
        **extra,
    }
    if async_stats is not None:
        write_staleness_histogram(engine, run_dir, cfg.plots and status == "completed")
        summary.update(async_summary(engine, state.rows, cfg))
    atomic_write_text(run_dir / "summary.json", json.dumps(strict_json(summary), indent=2, allow_nan=False))
