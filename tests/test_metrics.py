"""Diagnostics (ALGORITHMS.md §7) against independent computations."""

import csv
import math

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import HardThreshold, TopK
from gradsparse.config import load_config
from gradsparse.engines.sync_sim import SyncSimulator
from gradsparse.experiments.build import build_engine
from gradsparse.experiments.runner import run
from gradsparse.metrics import cumulative_metrics, residual_ratio_curve, step_metrics
from gradsparse.schedules import Schedule
from gradsparse.tasks import make_task


def linreg_sim(alg, n_workers=4, **kw):
    task = make_task("linreg", n_samples=300, n_features=30, dtype="float64")
    return SyncSimulator(task, alg, Schedule(lr=0.05), n_workers=n_workers, batch_size=4, seed=2, **kw)


def test_residual_ratio_has_no_cancellation_near_k_equal_d():
    d = 1000
    G = torch.full((d,), 1e-6, dtype=torch.float64)
    G[0] = 1e4
    (k, ratio, _), = residual_ratio_curve(G, [d - 1])
    # one entry of 1e-6 is left out of ||G|| = 1e4 (to 1e-17): ratio 1e-10 exactly
    assert ratio == pytest.approx(1e-10, rel=1e-9)
    rows = residual_ratio_curve(G, [1, 2, d])
    assert rows[0][1] == pytest.approx(math.sqrt((d - 1) * 1e-12) / 1e4, rel=1e-9)
    assert rows[1][1] == pytest.approx(math.sqrt((d - 2) * 1e-12) / 1e4, rel=1e-9)
    assert rows[2][1] == 0.0


def test_residual_ratio_in_a_run_is_measured_on_the_gradient(tmp_path):
    raw = {
        "task": {"name": "linreg", "options": {"n_samples": 300, "n_features": 30, "dtype": "float64"}},
        "workers": {"count": 4, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "topk", "k": 2}},
        "schedule": {"lr": 0.05},
        "steps": 3,
        "metrics": {"every": 3, "residual_ratio": {"steps": [3], "ks": [1, 5, 29]}},
        "plots": False, "progress": False,
    }
    out = run(load_config(raw), tmp_path / "r")
    with open(out / "residual_ratio.csv") as f:
        got = [float(r["ratio"]) for r in csv.DictReader(f)]
    engine = build_engine(load_config(raw))
    for _ in range(3):
        rec = engine.step()
    G = rec.weighted_grad(engine.weights)  # the gradient, not gradient + memory
    want = [r[1] for r in residual_ratio_curve(G, [1, 5, 29])]
    assert got == pytest.approx(want, rel=1e-12)
    on_accumulated = [r[1] for r in residual_ratio_curve(engine.weights @ rec.accumulated(), [1, 5, 29])]
    assert got != pytest.approx(on_accumulated, rel=1e-3)


def test_total_error_is_the_running_sum_of_the_per_worker_average():
    sim = linreg_sim(Algorithm(compressor=TopK(k=2), feedback="ef"))
    names = ["mean_memory_norm", "worker_error_sq", "total_error"]
    running = 0.0
    for _ in range(6):
        sim.step()
        e = sim.worker_state.memory.flat
        per_worker = float(e.square().sum(1).mean())
        running += per_worker
        m = cumulative_metrics(sim, names)
        assert m["worker_error_sq"] == pytest.approx(per_worker, rel=1e-12)
        assert m["total_error"] == pytest.approx(running, rel=1e-12)
        assert m["mean_memory_norm"] == pytest.approx(float(e.mean(0).norm()), rel=1e-12)
    # the mean memory's norm is a different (smaller) quantity than the per-worker average
    assert m["mean_memory_norm"] ** 2 < m["worker_error_sq"]


@pytest.mark.parametrize("feedback", ["ef-scaled", "memory"])
def test_xi_applies_lambda_on_the_workers_scale(feedback):
    """One worker: C(mean a) is exactly what the worker sent when C is applied as the worker
    applied it, so xi = 0. Applying lambda to the update-scale vector instead would not."""
    alg = Algorithm(compressor=HardThreshold(0.05), feedback=feedback)
    sim = linreg_sim(alg, n_workers=1)
    sent_any = False
    for _ in range(10):
        rec = sim.step()
        m = step_metrics(sim, rec, ["xi", "rho_hat"])
        assert m["xi"] == 0.0 and m["rho_hat"] == 0.0
        sent_any |= rec.worker.message.nnz > 0
    assert sent_any


def test_xi_denominator_uses_the_gradient_with_weight_decay():
    alg = Algorithm(compressor=TopK(k=3), feedback="ef", weight_decay=0.3)
    sim = linreg_sim(alg)
    for _ in range(4):
        rec = sim.step()
    p = sim.weights
    g = rec.grads + 0.3 * rec.params_before  # what the workers fed to error feedback
    a, s = rec.accumulated(), rec.worker.message.to_dense()
    mean_a = p @ a
    top = torch.zeros_like(mean_a)
    idx = torch.sort(mean_a.abs(), descending=True, stable=True).indices[:3]
    top[idx] = mean_a[idx].float().to(mean_a.dtype)  # top-k's values as sent (the wire's fp32)
    want = float((top - p @ s).norm() / (rec.lr * (p @ g)).norm())
    assert step_metrics(sim, rec, ["xi"])["xi"] == pytest.approx(want, rel=1e-10)


def test_running_maxima_cover_every_step(tmp_path):
    raw = {
        "task": {"name": "linreg", "options": {"n_samples": 300, "n_features": 30, "dtype": "float64"}},
        "workers": {"count": 3, "batch_size": 2},
        "algorithm": {"compressor": {"kind": "topk", "k": 3},
                      "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "k": 2}}},
        "schedule": {"lr": 0.05},
        "steps": 20,
        "metrics": {"every": 5, "names": ["rho_hat", "rho_hat_max", "compression_ratio_up", "compression_ratio_up_max"]},
        "plots": False, "progress": False,
    }
    out = run(load_config(raw), tmp_path / "m")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))[1:]
    engine = build_engine(load_config(raw))
    per_step = [step_metrics(engine, engine.step(), ["rho_hat", "compression_ratio_up"]) for _ in range(20)]
    for i, row in enumerate(rows):
        window = per_step[5 * i : 5 * i + 5]
        assert float(row["rho_hat_max"]) == pytest.approx(max(m["rho_hat"] for m in window), rel=1e-12)
        assert float(row["compression_ratio_up_max"]) == pytest.approx(max(m["compression_ratio_up"] for m in window), rel=1e-12)
        assert float(row["rho_hat"]) == pytest.approx(window[-1]["rho_hat"], rel=1e-12)
    assert any(float(r["rho_hat_max"]) > float(r["rho_hat"]) for r in rows)  # the maximum is not the sample
