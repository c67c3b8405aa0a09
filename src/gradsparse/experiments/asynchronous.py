"""Run-directory additions for the asynchronous engine: per-row staleness statistics, the
staleness histogram (``staleness.csv``, ``staleness.png``) and steps/time to a target."""

from __future__ import annotations

import csv
import math
from pathlib import Path


class AsyncRowStats:
    """Collects, over the server updates since the last recorded row, the metrics of
    :data:`gradsparse.metrics.ASYNC_METRICS` (the engine must be asynchronous)."""

    def __init__(self, engine, names) -> None:
        self.engine, self.names = engine, set(names)
        self.staleness: list[int] = []
        self.cosines: list[float] = []

    def observe(self, record) -> None:
        self.staleness.append(record.staleness)
        if getattr(record, "update_cosine", None) is not None:
            self.cosines.append(record.update_cosine)

    def row(self) -> dict:
        out = {"virtual_time": self.engine.now}
        if self.staleness:
            out["staleness_mean"] = sum(self.staleness) / len(self.staleness)
            out["staleness_max"] = max(self.staleness)
        if self.cosines:
            finite = [c for c in self.cosines if not math.isnan(c)]
            out["update_cosine"] = sum(finite) / len(finite) if finite else math.nan
        self.staleness, self.cosines = [], []
        return {k: v for k, v in out.items() if k in self.names}


def target_reached(rows: list[dict], target) -> dict:
    """steps_to_target / time_to_target: the first recorded row whose metric reaches the target
    (accuracy: >= value; loss, suboptimality: <= value); None when never reached."""
    if target is None:
        return {}
    out = {"target": {"metric": target.metric, "value": target.value}, "steps_to_target": None, "time_to_target": None}
    for r in rows:
        v = r.get(target.metric, "")
        if v == "" or v is None or math.isnan(float(v)):
            continue
        hit = float(v) >= target.value if target.metric == "test_accuracy" else float(v) <= target.value
        if hit:
            out["steps_to_target"] = int(r["step"])
            out["time_to_target"] = float(r["virtual_time"]) if r.get("virtual_time", "") != "" else None
            break
    return out


def write_staleness_histogram(engine, run_dir: Path, plots: bool) -> None:
    rows = engine.staleness_histogram()
    with open(run_dir / "staleness.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["staleness", "updates"])
        w.writerows(rows)
    if plots and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([s for s, _ in rows], [c for _, c in rows], width=0.8)
        ax.set_xlabel("staleness t - tau (server versions)")
        ax.set_ylabel("updates")
        ax.set_title(f"{engine.n_workers} workers, {engine.t} updates")
        fig.tight_layout()
        fig.savefig(run_dir / "staleness.png", dpi=100)
        plt.close(fig)
