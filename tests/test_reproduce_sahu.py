"""Paper 002 reproductions (gradsparse.reproduce.sahu): the measurements and claim rules on
hand-made runs (the verdict flips when the measurements do), and tiny end-to-end runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradsparse.reproduce import base, sahu
from gradsparse.reproduce.base import RunResult

from conftest import check_reproduction
import torch


def fake(sub, *, density=0.01, d=1000, total_error=1.0, err=None, acc=None) -> RunResult:
    """A run logged at steps 0, 10, 20, ... with f - f* ``sub`` and a constant density."""
    n = len(sub)
    steps = [10.0 * i for i in range(n)]
    metrics = {"step": steps, "suboptimality": list(sub), "avg_density": [density] * n,
               "uplink_bytes": [8.0 * density * d * s for s in steps], "worker_error_sq": list(err or [1.0] * n),
               "mean_memory_norm": [1.0] * n, "test_accuracy": list(acc or [0.5] * n)}
    final = {"suboptimality": sub[-1], "total_error": total_error, "avg_density": density,
             "test_accuracy": metrics["test_accuracy"][-1]}
    return RunResult("k", Path("."), {}, {"uplink_bytes": metrics["uplink_bytes"][-1], "final": final,
                                          "status": "completed", "d": d, "steps": int(steps[-1]),
                                          "avg_density": density}, metrics)


def test_entries_are_counted_per_worker_as_the_paper_counts():
    r = fake([1.0, 0.5, 0.1], density=0.002, d=500)
    assert sahu.entries(r) == pytest.approx(0.002 * 500 * 20)  # avg density x d x steps
    assert sahu.entries_series(r, "suboptimality") == ([0.0, 10.0, 20.0], [1.0, 0.5, 0.1])


def test_value_at_volume_and_entries_to_target():
    r = fake([1.0, 0.5, 1e-12, 1e-13], density=0.01, d=100)  # 10 entries per logged row
    assert sahu.value_at_volume(r, "suboptimality", 25) == 1e-12
    assert sahu.value_at_volume(r, "suboptimality", 9) == 1.0
    assert sahu.entries_to_target(r, 5e-12) == 20.0  # relative to f_0 - f* = 1
    assert sahu.entries_to_target(fake([1.0, 0.1]), 5e-12) == math.inf
    assert sahu.relative_suboptimality(fake([2.0, 1.0]))[1] == [1.0, 0.5]


def test_equal_volume_reads_both_at_the_smaller_total():
    a, b = fake([1.0, 0.4, 0.2], density=0.0105), fake([1.0, 0.5, 0.3], density=0.01)
    va, vb, budgets = sahu.equal_volume([a], [b], "suboptimality")
    assert budgets == [pytest.approx(200.0)] and va == [0.4] and vb == [0.3]


def _res(ht_sub: list[float], tk_sub: list[float], ht_te=1.0, tk_te=1.0, ht_density=0.01) -> dict:
    return {"ht": [fake([1.0, 0.5, s], total_error=ht_te, density=ht_density) for s in ht_sub],
            "topk": [fake([1.0, 0.5, s], total_error=tk_te) for s in tk_sub],
            "lambda": [1.0] * len(ht_sub), "tried": [[{}]] * len(ht_sub), "target": [200] * len(ht_sub)}


def test_better_at_equal_volume_flips_with_the_measurements():
    claim = sahu.better_at_equal_volume_claim
    assert claim(sahu.HT_BETTER, _res([0.1, 0.1], [0.2, 0.2]), "suboptimality").verdict == "holds"
    assert claim(sahu.HT_BETTER, _res([0.3, 0.3], [0.2, 0.2]), "suboptimality").verdict == "does not hold"
    assert claim(sahu.HT_BETTER, _res([0.1, 0.3], [0.2, 0.2]), "suboptimality").verdict == "inconclusive"
    # 4% apart is matched, 6% is not
    assert claim(sahu.HT_BETTER, _res([0.1, 0.1], [0.2, 0.2], ht_density=0.0096), "suboptimality").verdict == "holds"
    unmatched = claim(sahu.HT_BETTER, _res([0.1, 0.1], [0.2, 0.2], ht_density=0.0106), "suboptimality")
    assert unmatched.verdict == "inconclusive" and "seed 0: 5.7%" in unmatched.explanation
    # test accuracy: higher is better
    res = {"ht": [fake([1.0, 0.5], acc=[0.1, 0.9])], "topk": [fake([1.0, 0.5], acc=[0.1, 0.8])],
           "lambda": [1.0], "tried": [[]], "target": [100]}
    assert claim(sahu.HT_BETTER_ACC, res, "test_accuracy", lower_is_better=False).verdict == "holds"


def test_total_error_claim_rule_on_the_ratio():
    assert sahu.total_error_claim(sahu.HT_TOTAL_ERROR, _res([0.1], [0.1], ht_te=1.0, tk_te=3.0)).verdict == "holds"
    assert sahu.total_error_claim(sahu.HT_TOTAL_ERROR, _res([0.1], [0.1], ht_te=1.0, tk_te=1.5)).verdict == "inconclusive"
    assert sahu.total_error_claim(sahu.HT_TOTAL_ERROR, _res([0.1], [0.1], ht_te=2.0, tk_te=1.0)).verdict == "does not hold"


def test_sgd_match_claim():
    res = _res([0.1, 0.1], [0.2, 0.2])
    dense = [fake([1.0, 0.5, 0.1], density=1.0) for _ in range(2)]  # 100x the entries
    assert sahu.sgd_match_claim(res, dense).verdict == "holds"
    little = [fake([1.0, 0.5, 0.1], density=0.1) for _ in range(2)]  # only 10x more data
    assert sahu.sgd_match_claim(res, little).verdict == "does not hold"
    better = [fake([1.0, 0.5, 0.01], density=1.0) for _ in range(2)]  # SGD 10x lower f - f*
    assert sahu.sgd_match_claim(res, better).verdict == "does not hold"
    worse = [fake([1.0, 0.5, 1.0], density=1.0) for _ in range(2)]  # hard-threshold 10x *better* than SGD
    assert sahu.sgd_match_claim(res, worse).verdict == "does not hold"


def test_efgd_claim_flips():
    reach = fake([1.0, 1e-9, 1e-13], density=0.002)
    late = fake([1.0, 1e-9, 1e-13], density=0.01)
    never = fake([1.0, 1e-9, 1e-10], density=0.002)
    ht, tk = ("ht", [reach, reach], {}), ("tk", [late, late], {})
    assert sahu.efgd_claim(20, ht, tk).verdict == "holds"
    assert sahu.efgd_claim(20, ("ht", [late, late], {}), ("tk", [reach, reach], {})).verdict == "does not hold"
    assert sahu.efgd_claim(20, ("ht", [never, never], {}), ("tk", [never, never], {})).verdict == "does not hold"
    assert sahu.efgd_claim(20, ("ht", [reach, late], {}), ("tk", [late, reach], {})).verdict == "inconclusive"


def test_l_average_and_start_shift_of_the_logreg_task():
    from gradsparse.tasks import make_task

    t = make_task("logreg", dataset="madelon_like", n_samples=200, n_features=30, dtype="float64", start_shift=0.5)
    x = t.train_x
    assert t.info["L_average"] == pytest.approx(float((x * x).sum(1).mean()) / 4 + t.info["mu"])
    assert t.info["L_max"] >= t.info["L_average"] > t.info["L"]  # standardized: one row is stiffer than the mean
    torch.testing.assert_close(t.init_params(None)["w"], t.x_star["w"] + 0.5)
    with pytest.raises(ValueError, match="start_shift needs the optimum"):
        make_task("logreg", dataset="madelon_like", n_samples=200, n_features=30, solve=False, start_shift=1.0)


def test_registered_with_counts():
    from gradsparse.reproduce import reproductions

    table = reproductions()
    for name in ("sahu-logreg", "sahu-madelon-extreme", "sahu-efgdstar", "sahu-dnn"):
        rep = table[name]
        assert rep.paper == "002" and rep.settings["small"] and rep.settings["full"]
        assert rep.expected_runs("small", 3) > 0


@pytest.fixture
def tiny(monkeypatch):
    """Shrink every reproduction: few steps, small data, short lambda search."""
    monkeypatch.setattr(sahu, "SIZES", {"logreg_epochs": (1, 1), "madelon_epochs": (1, 1), "efgd_steps": (20, 20),
                                        "efgd_workers": ((20, 100), (20, 100)), "dnn_steps": (6, 6)})
    monkeypatch.setattr(sahu, "TUNE_RUNS", 2)
    small = {"dataset": "madelon_like", "n_samples": 250, "n_features": 30}
    monkeypatch.setattr(sahu, "SMALL_LOGREG", small)
    monkeypatch.setattr(sahu, "SMALL_MADELON", small)
    monkeypatch.setattr(sahu, "SMALL_EFGD", small)
    monkeypatch.setattr(sahu, "EFGD_LAMBDA_FACTORS", (1.0, 100.0))
    monkeypatch.setattr(sahu, "EFGD_KS", (1, 3))


@pytest.mark.parametrize("name", ["sahu-logreg", "sahu-efgdstar"])
def test_end_to_end_tiny(tiny, tmp_path, name):
    from gradsparse.reproduce import get

    summary = base.execute(get(name), "small", 2, tmp_path / name)
    # expected_runs is an upper bound here (a threshold search may stop early): runs are the
    # distinct run directories, at most the bound
    check_reproduction(get(name), summary, tmp_path / name, 2, count_runs=False, again=name == "sahu-logreg")
    assert summary["runs"] == len(list((tmp_path / name / "runs").iterdir())) <= get(name).expected_runs("small", 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sahu-madelon-extreme", "sahu-dnn"])
def test_end_to_end_tiny_slow(tiny, tmp_path, name):
    from gradsparse.reproduce import get

    summary = base.execute(get(name), "small", 2, tmp_path / name)
    check_reproduction(get(name), summary, tmp_path / name, 2, count_runs=False, again=False)
    assert summary["runs"] == len(list((tmp_path / name / "runs").iterdir())) <= get(name).expected_runs("small", 2)
