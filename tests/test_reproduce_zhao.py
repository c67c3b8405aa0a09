"""Paper 004 reproductions: the claim-building logic on hand-made measurements (the verdict flips
when the measurements do), and each reproduction end to end on tiny settings (slow)."""

import math

import pytest

from gradsparse.reproduce import zhao as Z
from gradsparse.reproduce.base import execute

from conftest import check_reproduction


def test_match_claim_flips_with_the_ratio_to_dense():
    assert Z.match_claim({("linreg", "constant"): [1.9, 1.2], ("mlp", "constant"): [1.1, 1.4]}).verdict == "holds"
    # 1.9 is inside linreg's factor (f - f*) but outside the MLP's (loss)
    assert Z.match_claim({("mlp", "constant"): [1.9, 1.6]}).verdict == "does not hold"
    assert Z.match_claim({("mlp", "constant"): [1.9, 1.0]}).verdict == "inconclusive"
    assert Z.match_claim({("linreg", "constant"): [math.inf, math.inf]}).verdict == "does not hold"
    assert Z.match_claim({("mlp", "constant"): [0.5, 0.6]}).verdict == "does not hold"  # both ways


def test_ratio_of_missing_or_diverged_values_is_infinite():
    assert Z._ratio(2.0, 1.0) == 2.0
    assert Z._ratio(None, 1.0) == math.inf and Z._ratio(1.0, float("nan")) == math.inf


def test_stage_losses_reads_the_summary():
    summary = {"stages": [{"stage": 1, "loss_at_average": 1.5}, {"stage": 2, "loss_at_average": 0.5}]}
    assert Z.stage_losses(summary) == [1.5, 0.5]
    assert Z.stage_losses({"stages": None}) == []


def test_stagewise_claim_flips_with_the_stage_losses():
    good, dense, regime = (2.3, [1.0, 0.5]), (2.3, [0.9, 0.45]), [120.0, 120.0]
    assert Z.stagewise_claim([good, good], [dense, dense], regime).verdict == "holds"
    rising = (2.3, [1.0, 1.2])  # not monotone on one seed, and 2.7x dense there
    assert Z.stagewise_claim([good, rising], [dense, dense], regime).verdict == "inconclusive"
    stuck = (2.3, [2.2, 2.1])  # decreasing but 4.7x dense's loss at w~_S on every seed
    assert Z.stagewise_claim([stuck, stuck], [dense, dense], regime).verdict == "does not hold"
    assert Z.stagewise_claim([(2.3, [])], [dense], regime).verdict == "does not hold"
    assert Z.stagewise_claim([good], [dense], [4.0, 4.0]).verdict == "inconclusive"  # outside the regime


def test_stagewise_run_reports_the_last_stage_average(tmp_path):
    """The runner forms w~_S at the end: stages.csv has one row per stage and the final loss is
    the loss at w~_S (the algorithm's output), not at the last iterate."""
    from gradsparse.reproduce.base import Context

    sched = {"kind": "stagewise", "lr": 0.05, "stage_steps": [6, 8], "prox_gamma": 10.0}
    cfg = Z._config({"name": "digits_mlp", "options": {"hidden": 8}}, seed=0, steps=14, every=7, schedule=sched,
                    sparse=True, names=["step", "loss"], scope="layerwise")
    res = Context("t", "small", [0], tmp_path).run_many({"sw": cfg})["sw"]
    rows = (res.dir / "stages.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + w~_1, w~_2
    stages = Z.stage_losses(res.summary)
    assert len(stages) == 2 and res.summary["final_is"] == "stage_average"
    assert res.final("loss") == stages[-1] != res.summary["final_last_iterate"]["loss"]
    assert res.summary["final_last_iterate"]["loss"] == res.metrics["loss"][-1]


def test_best_lr_picks_the_smallest_finite_final():
    assert Z.best_lr({0.01: 0.3, 0.02: 0.2, 0.04: None}) == 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zhao-momentum", "zhao-stagewise"])
def test_reproduction_end_to_end_tiny(name, tmp_path, monkeypatch):
    tiny = {"steps": 40, "every": 10}
    monkeypatch.setattr(Z, "SETTINGS", {"small": {"linreg": tiny, "mlp": tiny,
                                                  "stagewise": {"stage_steps": [10, 15, 20], "every": 5}}})
    monkeypatch.setattr(Z, "LINREG", {"name": "linreg", "options": {"n_samples": 400, "n_features": 64}})
    monkeypatch.setattr(Z, "MLP", {"name": "digits_mlp", "options": {"hidden": 8}})
    rep = {r.name: r for r in Z.REPRODUCTIONS}[name]
    summary = execute(rep, "small", 1, tmp_path / name)
    assert summary["figures"]
    check_reproduction(rep, summary, tmp_path / name, 1, again=name == "zhao-stagewise")  # reuse: once per file
