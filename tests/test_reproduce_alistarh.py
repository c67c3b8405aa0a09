"""Paper 000 reproductions: the claim-building logic on hand-made measurements (the verdict flips
when the measurements do), and each reproduction end to end on tiny settings (slow)."""

import math

import pytest

from gradsparse.reproduce import alistarh as A
from gradsparse.reproduce.base import execute

from conftest import check_reproduction


def test_xi_stats_skips_the_transient_and_measures_spread_and_growth():
    s = A.xi_stats([math.nan, 50.0] + [2.0] * 18)
    assert s["max"] == 2.0 and s["spread"] == 1.0 and s["growth"] == 1.0
    rising = A.xi_stats([1.0] * 10 + [4.0] * 10)
    assert rising["growth"] > 2


def test_xi_claim_flips_with_the_measurements():
    small = {"max": 2.0, "median": 1.8, "spread": 1.1, "growth": 1.0}
    assert A.xi_claim({"a": [small, small]}).verdict == "holds"
    big = {**small, "max": 500.0, "spread": 250.0}
    assert A.xi_claim({"a": [small, big]}).verdict == "does not hold"
    unstable = {**small, "spread": 5.0}  # within bounds for "does not hold", outside for "holds"
    assert A.xi_claim({"a": [small, unstable]}).verdict == "inconclusive"
    assert A.xi_claim({"a": [A.xi_stats([])]}).verdict == "inconclusive"


def test_half_norm_density_interpolates_and_ratio_at():
    curve = [(0.0, 1.0), (0.1, 0.6), (0.2, 0.4), (1.0, 0.0)]
    assert A.half_norm_density(curve) == pytest.approx(0.15)
    assert A.ratio_at(curve, 0.05) == pytest.approx(0.8)
    assert math.isnan(A.half_norm_density([(0.0, 1.0), (0.5, 0.9)]))
    uniform = [(x / 100, math.sqrt(1 - x / 100)) for x in range(101)]
    assert A.half_norm_density(uniform) == pytest.approx(0.75, abs=0.01)


def test_residual_claim_flips_between_concentrated_and_noise_like_gradients():
    fast = {10: [(0.0, 1.0), (0.05, 0.5), (1.0, 0.0)]}
    uniform = {10: [(x / 100, math.sqrt(1 - x / 100)) for x in range(101)]}
    assert A.residual_claim({"t": [fast, fast]}).verdict == "holds"
    assert A.residual_claim({"t": [fast, uniform]}).verdict == "does not hold"
    # between half a Gaussian's share (0.135) and 3/4 of it (0.203): neither
    middle = {10: [(0.0, 1.0), (0.17, 0.5), (1.0, 0.0)]}
    assert A.residual_claim({"t": [middle]}).verdict == "inconclusive"
    # per task: one noise-like task makes the claim fail, and the report names it
    claim = A.residual_claim({"mlp": [fast], "linreg": [uniform]})
    assert claim.verdict == "does not hold" and claim.measured["linreg verdict"] == "does not hold"


def test_gaussian_reference_is_the_closed_form():
    assert A.gaussian_residual_ratio(0.0) == 1.0 and A.gaussian_residual_ratio(1.0) == 0.0
    # half the norm at k/d = 0.2707 (|x| >= 1.1 holds 75% of the squared norm of a standard normal)
    assert A.gaussian_residual_ratio(A.GAUSSIAN_HALF) == pytest.approx(0.5, abs=2e-3)


def test_sweep_claims_flip_with_the_ratios_and_slowdowns():
    ratios = A.ratio_to_sgd({"sgd": [1.0, 2.0], "0.1": [1.1, 2.2], "0.01": [2.0, 4.0], "0.001": [3.0, None]})
    assert ratios["0.1"] == pytest.approx([1.1, 1.1]) and ratios["0.001"][1] == math.inf
    close, slow = A.sweep_claims({"t": ratios}, {"t": {"0.01": [1.5, 2.0], "0.001": [3.0, 7.5]}})
    assert close.verdict == "holds" and slow.verdict == "holds"
    close, slow = A.sweep_claims({"t": {"0.1": [3.0, 2.0]}}, {"t": {"0.01": [1.0, 1.05], "0.001": [1.5, 2.0]}})
    assert close.verdict == "does not hold" and slow.verdict == "does not hold"  # 1% shows no slowdown
    _, slow = A.sweep_claims({"t": {"0.1": [1.0]}}, {"t": {"0.01": [2.0], "0.001": [math.inf]}})
    assert slow.verdict == "does not hold"  # never reaches SGD's level: not converging
    _, slow = A.sweep_claims({"t": {"0.1": [1.0, 1.0]}}, {"t": {"0.01": [2.0, 2.0], "0.001": [2.0, 12.0]}})
    assert slow.verdict == "inconclusive"


def test_slowdown_reads_steps_to_sgds_level():
    from pathlib import Path

    from gradsparse.reproduce.base import RunResult

    steps = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    sgd = RunResult("s", Path("."), {}, {}, {"step": steps, "loss": [8, 4, 2, 1, 0.5, 0.4, 0.3, 0.2, 0.1]})
    slow = RunResult("t", Path("."), {}, {}, {"step": steps, "loss": [8, 6, 5, 4, 3, 2, 1.5, 1.2, 0.9]})
    # SGD's objective at 1/8 of the run (step 10) is 4: SGD needed 10 steps, the slow run 30
    assert A.slowdown(sgd, slow, "loss") == pytest.approx(3.0)


def test_best_lr_ignores_diverged_runs():
    assert A.best_lr({0.1: 0.5, 0.2: None, 0.05: 0.4}) == 0.05
    with pytest.raises(RuntimeError):
        A.best_lr({0.1: None, 0.2: float("nan")})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alistarh-xi", "alistarh-residual", "alistarh-k-sweep"])
def test_reproduction_end_to_end_tiny(name, tmp_path, monkeypatch):
    tiny = {"steps": 40, "every": 10}
    monkeypatch.setattr(A, "SETTINGS", {"small": {k: tiny for k in ("linreg", "mlp", "sweep_linreg", "sweep_mlp")}})
    monkeypatch.setattr(A, "LINREG", {"name": "linreg", "options": {"n_samples": 400, "n_features": 64}})
    monkeypatch.setattr(A, "MLP", {"name": "digits_mlp", "options": {"hidden": 8}})
    rep = {r.name: r for r in A.REPRODUCTIONS}[name]
    summary = execute(rep, "small", 1, tmp_path / name)
    assert summary["figures"]
    check_reproduction(rep, summary, tmp_path / name, 1, again=name == "alistarh-residual")  # reuse: once per file
