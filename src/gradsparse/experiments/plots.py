"""PNG plots of run directories (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """A run's ``metrics.csv`` as columns (empty cells are NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (it holds no metrics.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
    return cols


def _series(cols, x, y):
    pts = [(a, b) for a, b in zip(cols[x], cols[y]) if not (math.isnan(a) or math.isnan(b))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_key(cols) -> str | None:
    if "suboptimality" in cols and any(not math.isnan(v) for v in cols["suboptimality"]):
        return "suboptimality"
    return "loss" if "loss" in cols else None


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    cols = read_metrics(run_dir)
    made = []
    key = _loss_key(cols)
    if key:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        x, y = _series(cols, "step", key)
        axes[0].plot(x, y)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel(key)
        if "uplink_bytes" in cols:
            total = [u + (dn if "downlink_bytes" in cols else 0.0) for u, dn in zip(cols["uplink_bytes"], cols.get("downlink_bytes", [0.0] * len(cols["uplink_bytes"])))]
            pts = [(b, v) for b, v in zip(total, cols[key]) if not (math.isnan(b) or math.isnan(v))]
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts])
            axes[1].set_xlabel("bytes sent (uplink + downlink)")
            axes[1].set_ylabel(key)
        if key == "suboptimality" or (y and min(y) > 0 and max(y) / max(min(y), 1e-300) > 100):
            for ax in axes:
                ax.set_yscale("log")
        fig.suptitle(run_dir.name)
        fig.tight_layout()
        made.append(run_dir / "loss.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    for name, ylabel in (("mean_memory_norm", "||mean memory||"), ("density", "density k/d"), ("test_accuracy", "test accuracy")):
        if name in cols and any(not math.isnan(v) for v in cols[name]):
            fig, ax = plt.subplots(figsize=(5, 4))
            x, y = _series(cols, "step", name)
            ax.plot(x, y)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(run_dir.name)
            fig.tight_layout()
            made.append(run_dir / f"{name}.png")
            fig.savefig(made[-1], dpi=100)
            plt.close(fig)
    rr = run_dir / "residual_ratio.csv"
    if rr.exists():
        with open(rr, newline="") as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(5, 4))
        for step in sorted({int(r["step"]) for r in rows}):
            pts = [r for r in rows if int(r["step"]) == step]
            ax.plot([float(r["density"]) for r in pts], [float(r["ratio"]) for r in pts], label=f"step {step}")
        pts = [r for r in rows if int(r["step"]) == int(rows[0]["step"])]
        ax.plot([float(r["density"]) for r in pts], [float(r["uniform_bound"]) for r in pts], "k--", label="sqrt(1-k/d)")
        ax.set_xlabel("k / d")
        ax.set_ylabel("||G - TopK(G)|| / ||G||")
        ax.legend()
        fig.tight_layout()
        made.append(run_dir / "residual_ratio.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    return made


def compare_runs(run_dirs: list[str | Path], out: str | Path, metric: str | None = None) -> Path:
    """One figure with ``metric`` (default: suboptimality or loss) vs step and vs bytes."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for d in run_dirs:
        cols = read_metrics(d)
        key = metric or _loss_key(cols)
        if key not in cols:
            raise ValueError(f"run {str(d)!r} has no metric {key!r}")
        x, y = _series(cols, "step", key)
        axes[0].plot(x, y, label=Path(d).name)
        total = [u + dn for u, dn in zip(cols.get("uplink_bytes", [math.nan] * len(x)), cols.get("downlink_bytes", [0.0] * len(x)))]
        pts = [(b, v) for b, v in zip(total, cols[key]) if not (math.isnan(b) or math.isnan(v))]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], label=Path(d).name)
        axes[0].set_ylabel(key)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("bytes sent (uplink + downlink)")
    for ax in axes:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
