"""Paper 002 reproductions (gradsparse.reproduce.sahu): the measurements and claim rules on
hand-made runs (the verdict flips when the measurements do), and tiny end-to-end runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradsparse.reproduce import base, sahu
from gradsparse.reproduce.base import RunResult


def fake(bytes_, sub=None, *, total_error=1.0, err=None, acc=None, density=0.01) -> RunResult:
    """A run whose logged rows have cumulative uplink bytes ``bytes_`` and f - f* ``sub``."""
    n = len(bytes_)
    metrics = {"step": [float(10 * i) for i in range(n)], "uplink_bytes": [float(b) for b in bytes_],
               "suboptimality": list(sub or [1.0] * n), "worker_error_sq": list(err or [1.0] * n),
               "mean_memory_norm": [1.0] * n, "test_accuracy": list(acc or [0.5] * n)}
    final = {"suboptimality": metrics["suboptimality"][-1], "total_error": total_error, "avg_density": density,
             "test_accuracy": metrics["test_accuracy"][-1]}
    return RunResult("k", Path("."), {}, {"uplink_bytes": bytes_[-1], "final": final, "status": "completed"}, metrics)


def test_value_at_bytes_and_bytes_to_target():
    r = fake([0, 100, 200, 300], [1.0, 0.5, 1e-12, 1e-13])
    assert sahu.value_at_bytes(r, "suboptimality", 250) == 1e-12
    assert sahu.value_at_bytes(r, "suboptimality", 99) == 1.0
    assert sahu.bytes_to_target(r, 5e-12) == 200
    assert sahu.bytes_to_target(fake([0, 100], [1.0, 0.1]), 5e-12) == math.inf


def test_equal_bytes_reads_both_at_the_smaller_total():
    a, b = fake([0, 100, 210], [1.0, 0.4, 0.2]), fake([0, 100, 200], [1.0, 0.5, 0.3])
    va, vb, budgets = sahu.equal_bytes([a], [b], "suboptimality")
    assert budgets == [200] and va == [0.4] and vb == [0.3]


def _res(ht_sub: list[float], tk_sub: list[float], ht_te=1.0, tk_te=1.0) -> dict:
    return {"ht": [fake([0, 100, 200], [1.0, 0.5, s], total_error=ht_te) for s in ht_sub],
            "topk": [fake([0, 100, 200], [1.0, 0.5, s], total_error=tk_te) for s in tk_sub],
            "lambda": 1.0, "tried": [{}], "target": 200}


def test_better_at_equal_volume_flips_with_the_measurements():
    claim = sahu.better_at_equal_volume_claim
    assert claim("c", _res([0.1, 0.1], [0.2, 0.2]), "suboptimality", "s", "p").verdict == "holds"
    assert claim("c", _res([0.3, 0.3], [0.2, 0.2]), "suboptimality", "s", "p").verdict == "does not hold"
    assert claim("c", _res([0.1, 0.3], [0.2, 0.2]), "suboptimality", "s", "p").verdict == "inconclusive"
    # test accuracy: higher is better
    res = {"ht": [fake([0, 100], acc=[0.1, 0.9])], "topk": [fake([0, 100], acc=[0.1, 0.8])], "lambda": 1.0,
           "tried": [], "target": 100}
    assert claim("c", res, "test_accuracy", "s", "p", lower_is_better=False).verdict == "holds"


def test_total_error_claim_rule_on_the_ratio():
    assert sahu.total_error_claim("c", _res([0.1], [0.1], ht_te=1.0, tk_te=3.0), "p").verdict == "holds"
    assert sahu.total_error_claim("c", _res([0.1], [0.1], ht_te=1.0, tk_te=1.5), "p").verdict == "inconclusive"
    assert sahu.total_error_claim("c", _res([0.1], [0.1], ht_te=2.0, tk_te=1.0), "p").verdict == "does not hold"


def test_sgd_match_claim():
    res = _res([0.1, 0.1], [0.2, 0.2])
    dense = [fake([0, 10_000, 30_000], [1.0, 0.5, 0.1]) for _ in range(2)]
    assert sahu.sgd_match_claim(res, dense).verdict == "holds"
    little = [fake([0, 1_000, 2_000], [1.0, 0.5, 0.1]) for _ in range(2)]  # only 10x more data
    assert sahu.sgd_match_claim(res, little).verdict == "does not hold"
    better = [fake([0, 10_000, 30_000], [1.0, 0.5, 0.01]) for _ in range(2)]  # SGD 10x lower f - f*
    assert sahu.sgd_match_claim(res, better).verdict == "does not hold"


def test_efgd_claim_flips():
    reach = fake([0, 100, 200], [1.0, 1e-9, 1e-13])
    late = fake([0, 100, 400], [1.0, 1e-9, 1e-13])
    never = fake([0, 100, 200], [1.0, 1e-9, 1e-10])
    ht, tk = ("ht", [reach, reach], {}), ("tk", [late, late], {})
    assert sahu.efgd_claim(20, ht, tk).verdict == "holds"
    assert sahu.efgd_claim(20, ("ht", [late, late], {}), ("tk", [reach, reach], {})).verdict == "does not hold"
    assert sahu.efgd_claim(20, ("ht", [never, never], {}), ("tk", [never, never], {})).verdict == "does not hold"
    assert sahu.efgd_claim(20, ("ht", [reach, late], {}), ("tk", [late, reach], {})).verdict == "inconclusive"


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
    monkeypatch.setattr(sahu, "SIZES", {"logreg_epochs": (1, 1), "efgd_steps": (20, 20),
                                        "efgd_workers": ((4,), (4,)), "dnn_steps": (6, 6)})
    monkeypatch.setattr(sahu, "TUNE_RUNS", 2)
    small = {"dataset": "madelon_like", "n_samples": 120, "n_features": 30}
    monkeypatch.setattr(sahu, "SMALL_LOGREG", small)
    monkeypatch.setattr(sahu, "SMALL_MADELON", small)
    monkeypatch.setattr(sahu, "SMALL_EFGD", small)
    monkeypatch.setattr(sahu, "EFGD_LAMBDA_FACTORS", (1.0, 100.0))
    monkeypatch.setattr(sahu, "EFGD_KS", (1, 3))


@pytest.mark.parametrize("name", ["sahu-logreg", "sahu-efgdstar"])
def test_end_to_end_tiny(tiny, tmp_path, name):
    from gradsparse.reproduce import get

    summary = base.execute(get(name), "small", 2, tmp_path / name)
    assert summary["status"] == "completed" and summary["claims"]
    assert all(c["verdict"] in base.VERDICTS for c in summary["claims"])
    assert (tmp_path / name / "report.md").is_file()
    for f in summary["figures"]:
        assert (tmp_path / name / f).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sahu-madelon-extreme", "sahu-dnn"])
def test_end_to_end_tiny_slow(tiny, tmp_path, name):
    from gradsparse.reproduce import get

    summary = base.execute(get(name), "small", 2, tmp_path / name)
    assert summary["status"] == "completed" and summary["claims"]
