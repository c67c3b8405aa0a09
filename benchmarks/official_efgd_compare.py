"""EF-GD* run for run: gradsparse against paper 002's official code on the same data.

Paper 002's authors published their logistic-regression code (github.com/sands-lab/
rethinking-sparsification, MIT licence, folder ``logistic-regression``: numpy, one Python loop
over workers). This script does not ship or copy it: give the folder with ``--official`` and it
is imported from there. Both implementations then run EF-GD* (full local gradients shifted by
the same rows' gradient at x*, error feedback e + gamma g, the average of the workers' messages
applied) on gradsparse's ``madelon_like`` task as ``gradsparse reproduce sahu-efgdstar`` builds
it at small scale (1,000 x 100 with 20% held out, float64, step 1/L, start 0), with the same
rows per worker (gradsparse's split is handed to the official function) and the same
compressor (top-k with k entries, or hard-threshold lambda). It prints, per method and worker
count: the largest difference of (f - f*)/(f_0 - f*) between the two trajectories up to each
checkpoint, the step each reaches 5e-12, and the data each counts by then (the official code:
32 bits per kept value per worker; gradsparse: entries per worker and exact wire bytes).

    python benchmarks/official_efgd_compare.py --official PATH/rethinking-sparsification/logistic-regression \
        [--workers 20,100] [--steps 600] [--methods topk:1,topk:5,threshold:x1]

``threshold:xM`` is M times the reproduction's precision rule lambda (the grid sahu-efgdstar searches).
Threads pinned to 1 (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from gradsparse.config import load_config
from gradsparse.experiments.build import build_engine
from gradsparse.reproduce.sahu import SMALL_EFGD, _precision_lambda
from gradsparse.tasks import make_task

TARGET = 5e-12
CHECKPOINTS = (10, 50, 100, 200, 400, 600, 1000)


def task_spec() -> dict:
    return {"name": "logreg", "options": {**SMALL_EFGD, "dtype": "float64"}}


def gradsparse_run(workers: int, steps: int, compressor: dict, lr: float, value_dtype: str):
    """(f - f* per step from step 0, cumulative entries per worker, cumulative uplink bytes, rows per
    worker). Feedback as the reproduction runs it: ef for top-k, ef-scaled for hard-threshold."""
    feedback = "ef-scaled" if compressor["kind"] == "hard_threshold" else "ef"
    cfg = load_config({
        "task": task_spec(), "workers": {"count": workers, "batch_size": "full"}, "steps": steps, "seed": 0,
        "value_dtype": value_dtype, "schedule": {"lr": lr},
        "algorithm": {"compressor": compressor, "feedback": feedback, "gradient_shift": "optimum"},
    })
    engine = build_engine(cfg)
    f_star = engine.task.f_star
    gaps, entries, nbytes = [engine.full_loss() - f_star], [0.0], [0]
    for _ in range(steps):
        rec = engine.step()
        gaps.append(engine.full_loss() - f_star)
        entries.append(entries[-1] + float(rec.worker.message.counts.double().mean()))
        nbytes.append(engine.ledger.uplink_bytes)
    rows = [r.numpy() for r in engine.data.rows]
    return gaps, entries, nbytes, rows


def official_run(official: Path, workers: int, steps: int, method: tuple[str, float], lr: float, rows: list):
    """The official ``ec_gd_star_const_stepsize`` on the same data, rows, step and compressor."""
    sys.path.insert(0, str(official))
    try:
        import distrib_algs
        import functions
    finally:
        sys.path.pop(0)
    task = make_task("logreg", **task_spec()["options"])
    A = task.train_x.numpy().astype(np.float64)
    y = task.train_y.numpy().astype(np.float64)
    x_star = task.x_star["w"].numpy().astype(np.float64)
    mu = float(task.info["mu"])
    kind, amount = method
    sparsifier = functions.topk if kind == "topk" else functions.threshold
    if kind == "threshold":  # the official code thresholds e + gamma g; ef-scaled thresholds (e + gamma g) / gamma
        amount = amount * lr
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        os.mkdir("dump")  # the official function pickles its result there
        res = distrib_algs.ec_gd_star_const_stepsize(
            "compare", np.zeros(A.shape[1]), _sparse(A), y, lr, sparsifier, [kind, int(amount) if kind == "topk" else amount],
            [np.asarray(r) for r in rows], l2=mu, sparse_full=False, sparse_stoch=False, S=steps,
            save_info_period=1, x_star=x_star, f_star=task.f_star)
    return list(res["func_vals"]), list(np.asarray(res["bits"]) / 32.0)


def _sparse(A: np.ndarray):
    from scipy.sparse import csr_matrix

    return csr_matrix(A)


def first_below(rel: list[float], target: float) -> int | None:
    return next((t for t, v in enumerate(rel) if v <= target), None)


def _reach(name: str, rel: list[float], entries: list[float], nbytes: list[int] | None) -> None:
    t = first_below(rel, TARGET)
    if t is None:
        print(f"  {name}: final relative f - f* {rel[-1]:.3e}; never reaches {TARGET:g} in {len(rel) - 1} steps")
        return
    extra = "" if nbytes is None else f", {nbytes[t]:,} uplink bytes (all workers)"
    print(f"  {name}: final relative f - f* {rel[-1]:.3e}; reaches {TARGET:g} at step {t}, "
          f"{entries[t]:.0f} entries per worker{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="the logistic-regression folder of sands-lab/rethinking-sparsification")
    ap.add_argument("--workers", default="20,100")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--methods", default="topk:1,topk:5,threshold:x1,threshold:x4")
    ap.add_argument("--value-dtypes", default="fp64,fp32",
                    help="gradsparse's wire value dtypes to run (the reproduction runs fp32, the default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    official = Path(args.official).resolve()
    task = make_task("logreg", **task_spec()["options"])
    lr = 1.0 / float(task.info["L"])
    lam0 = _precision_lambda(task_spec())
    print(f"task madelon_like {tuple(task.train_x.shape)} float64, step 1/L = {lr:.6g}, precision-rule lambda = {lam0:.4g}, "
          f"target (f - f*)/(f_0 - f*) <= {TARGET:g}")
    for workers in (int(w) for w in args.workers.split(",")):
        for spec in args.methods.split(","):
            kind, amount = spec.split(":")
            if kind == "topk":
                method, compressor = ("topk", float(amount)), {"kind": "topk", "k": int(amount)}
            else:
                lam = lam0 * float(amount.lstrip("x"))
                method, compressor = ("threshold", lam), {"kind": "hard_threshold", "threshold": lam}
            label = f"top-{int(amount)}" if kind == "topk" else f"hard-threshold {amount} (lambda {method[1]:.3g})"
            print(f"\nN = {workers}, {label}")
            theirs = None
            for value_dtype in args.value_dtypes.split(","):
                gaps, entries, nbytes, rows = gradsparse_run(workers, args.steps, compressor, lr, value_dtype)
                if theirs is None:
                    theirs, their_entries = official_run(official, workers, args.steps, method, lr, rows)
                    rel_off = [g / theirs[0] for g in theirs]
                    _reach("official (numpy float64)", rel_off, their_entries, None)
                rel_gs = [g / gaps[0] for g in gaps]
                diffs = [abs(a - b) for a, b in zip(rel_gs, rel_off)]
                worst = {c: max(diffs[: c + 1]) for c in CHECKPOINTS if c <= args.steps}
                _reach(f"gradsparse, values {value_dtype}", rel_gs, entries, nbytes)
                print(f"    |relative f - f*, gradsparse - official| up to step "
                      + ", ".join(f"{c}: {v:.2e}" for c, v in worst.items())
                      + ("" if math.isfinite(max(diffs)) else " (a trajectory is not finite)"))


if __name__ == "__main__":
    main()
