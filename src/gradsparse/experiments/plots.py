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


def seed_band(curves, *, logx: bool = False, logy: bool = False, points: int = 200):
    """Average several runs' (x, y) curves (one per seed) on a common x axis.

    Each curve is interpolated onto one grid: the x values themselves when every curve was logged
    at the same x (e.g. steps), else ``points`` values spanning the range all curves cover (the
    overlap; geometric when ``logx``). Interpolation and averaging happen on the plotted scale:
    log10 x when ``logx``, log10 y when ``logy`` (so the centre is the geometric mean and the band
    a factor, not an arithmetic band that spans orders of magnitude). Returns
    ``(grid, centre, low, high)`` as NumPy arrays, ``low``/``high`` = centre -/+ one standard
    deviation over the curves on that scale (equal to the centre for a single curve), or None when
    the curves share no x range. Curves are cut at their first non-finite value; values <= 0 are
    dropped on a log scale."""
    import numpy as np

    prepared = []
    for xs, ys in curves:
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        if logx:
            keep &= x > 0
        if logy:
            keep &= y > 0
        x, y = x[keep], y[keep]
        if len(x) == 0:
            continue
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        x, last = np.unique(x[::-1], return_index=True)  # a repeated x keeps its last logged y
        y = y[::-1][last]
        prepared.append((np.log10(x) if logx else x, np.log10(y) if logy else y))
    if not prepared:
        return None
    same = all(len(c[0]) == len(prepared[0][0]) and np.array_equal(c[0], prepared[0][0]) for c in prepared)
    if same:
        grid = prepared[0][0]
    else:
        lo, hi = max(c[0][0] for c in prepared), min(c[0][-1] for c in prepared)
        if lo > hi:
            return None
        grid = np.linspace(lo, hi, points) if hi > lo else np.asarray([lo])
    values = np.asarray([np.interp(grid, cx, cy) for cx, cy in prepared])
    centre, spread = values.mean(axis=0), values.std(axis=0)
    back_x = (lambda v: 10.0 ** v) if logx else (lambda v: v)
    back_y = (lambda v: 10.0 ** v) if logy else (lambda v: v)
    return back_x(grid), back_y(centre), back_y(centre - spread), back_y(centre + spread)


def readable_axis(ax, axis: str, quantity: str | None) -> None:
    """Tick labels that do not overlap: bytes in engineering notation (kB, MB, ...) on a linear
    axis, at most 6 ticks; a log axis keeps matplotlib's powers of ten."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    scale = ax.get_xscale() if axis == "x" else ax.get_yscale()
    if scale == "log":
        return
    target.set_major_locator(MaxNLocator(nbins=6))
    if quantity is not None and "bytes" in quantity:
        target.set_major_formatter(EngFormatter(unit="B"))


def _series(cols, x, y):
    pts = [(a, b) for a, b in zip(cols[x], cols[y]) if not (math.isnan(a) or math.isnan(b))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_key(cols) -> str | None:
    if "suboptimality" in cols and any(not math.isnan(v) for v in cols["suboptimality"]):
        return "suboptimality"
    return "loss" if "loss" in cols else None


def plot_run(run_dir: str | Path, title: str | None = None) -> list[Path]:
    """loss.png (and the diagnostics' figures) of a run directory, titled ``title`` (default: the
    directory's name; a run being written is plotted in its temporary directory, so the runner
    passes the name it will have)."""
    run_dir = Path(run_dir)
    title = run_dir.name if title is None else title
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
        fig.suptitle(title)
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
            ax.set_title(title)
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
