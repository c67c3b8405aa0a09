"""Paper 003 reproductions (zou-workers, zou-noniid): the claim rules on hand-made runs, and
both reproductions end to end on a tiny plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gradsparse.reproduce import base, zou
from gradsparse.reproduce.base import RunResult

from conftest import check_reproduction

D = 50_890
K = 51  # 0.001 d by paper 003's rounding rule


def _run(n=20, acc=0.9, loss=0.3, rho=(1.0, 1.0), agg=(0.02, 0.02), down=1000, status="completed"):
    metrics = {"step": [0.0, 1.0, 2.0, 3.0], "rho_hat": [math.nan, 5.0, *rho], "aggregate_density": [math.nan, 0.0, *agg]}
    summary = {"status": status, "d": D, "downlink_bytes": down, "final": {"test_accuracy": acc, "loss": loss}}
    return RunResult("k", Path("."), {"workers": {"count": n}}, summary, metrics)


def _study(up_runs, bi_runs, lr=0.1):
    return {"t N=20": {"uplink-only": zou.Arm("uplink-only", {lr: up_runs[0]}, lr, up_runs),
                       "bidirectional": zou.Arm("bidirectional", {lr: bi_runs[0]}, lr, bi_runs)}}


def test_k_rounding_rule():
    assert zou.top_k(D) == K


def test_choose_lr_takes_lowest_final_loss_and_skips_diverged():
    grid = {0.01: _run(loss=0.5), 0.1: _run(loss=0.2), 0.25: _run(loss=0.1, status="diverged")}
    assert zou.choose_lr(grid) == 0.1
    assert zou.choose_lr({0.05: _run(loss=0.2), 0.1: _run(loss=0.2)}) == 0.05  # tie: smaller step


def test_accuracy_verdict_flips_with_the_measurements():
    assert zou.accuracy_verdict([0.90, 0.91, 0.92], [0.89, 0.90, 0.915]) == "holds"  # within 2 points
    assert zou.accuracy_verdict([0.90, 0.91, 0.92], [0.80, 0.85, 0.86]) == "does not hold"
    assert zou.accuracy_verdict([0.90, 0.91, 0.92], [0.80, 0.92, 0.86]) == "inconclusive"  # a seed disagrees
    assert zou.accuracy_verdict([0.9, math.nan], [0.9, 0.9]) == "inconclusive"
    up = [_run(acc=a) for a in (0.90, 0.91, 0.92)]
    assert zou.accuracy_claim(_study(up, [_run(acc=a) for a in (0.895, 0.9, 0.92)])).verdict == "holds"
    claim = zou.accuracy_claim(_study(up, [_run(acc=a) for a in (0.7, 0.7, 0.7)]))
    assert claim.verdict == "does not hold" and "t N=20" in claim.explanation


def test_rho_claim_is_paired_over_seeds_on_the_late_mean():
    up = [_run(rho=(4.0, 4.0)) for _ in range(3)]
    assert zou.rho_claim(_study(up, [_run(rho=(2.0, 3.0)) for _ in range(3)])).verdict == "holds"
    assert zou.rho_claim(_study(up, [_run(rho=(5.0, 6.0)) for _ in range(3)])).verdict == "does not hold"
    mixed = [_run(rho=(2.0, 3.0)), _run(rho=(5.0, 6.0)), _run(rho=(2.0, 3.0))]
    assert zou.rho_claim(_study(up, mixed)).verdict == "inconclusive"
    # the transient (first half of the rows) does not count: rho 5.0 at row 1 is left out
    assert zou._late_mean([math.nan, 5.0, 1.0, 2.0]) == 1.5


def test_aggregate_claim_compares_with_NK_over_d():
    bound = 20 * K / D
    bi = [_run(down=100) for _ in range(2)]
    near = zou.aggregate_claim(_study([_run(agg=(0.9 * bound, 0.95 * bound), down=1800)] * 2, bi))
    assert near.verdict == "holds"
    assert near.measured["t N=20: downlink values uplink-only / bidirectional (vs N = 20)"] == pytest.approx(18.5)
    assert zou.aggregate_claim(_study([_run(agg=(0.3 * bound,) * 2)] * 2, bi)).verdict == "does not hold"
    mid = zou.aggregate_claim(_study([_run(agg=(0.7 * bound,) * 2)] * 2, bi))
    assert mid.verdict == "inconclusive" and "overlap" in mid.explanation


def test_configs_follow_the_paper():
    cfg = zou.nn_config(zou.SMALL_PLAN, "mnist5k_mlp", "shards", 50, "bidirectional", 0.1, 2)
    assert cfg["task"]["options"] == {}  # all 4,000 rows, cut into 200 shards of 20, two per worker
    assert cfg["workers"] == {"count": 50, "split": "shards", "shards_per_worker": 2, "batch_size": 10,
                              "sampling": "reshuffle", "n_shards": 200}
    assert cfg["algorithm"]["topology"]["down_compressor"] == {"kind": "topk", "density": 0.001}
    full = zou.nn_config(zou.FULL_PLAN, "mnist_mlp", "shards", 20, "uplink-only", 0.1, 0)
    assert full["workers"]["n_shards"] == 200 and full["epochs"] == 100.0  # 200 shards of 300 MNIST rows
    assert full["metrics"]["every"] == 60 and full["algorithm"]["topology"] == {"kind": "ps_uplink"}
    assert zou.nn_config(zou.FULL_PLAN, "mnist_mlp", "iid", 20, "uplink-only", 0.1, 0)["task"]["options"] == {}
    assert zou.nn_expected_runs("small", 3) == 3 * 2 * (4 + 2)
    # full scale runs the thesis's models: the MNIST MLP 784-64-10 and paper 003's CNN / Fashion models
    assert set(zou.FULL_PLAN.tasks) == {"mnist_mlp", "mnist_cnn_paper003", "fashion_mnist_mlp_paper003",
                                        "fashion_mnist_cnn_paper003"}
    assert zou.SMALL_PLAN.epochs == 100.0 and zou.SMALL_PLAN.steps is None  # 100 epochs, as the thesis
    # a row every 2 epochs at small scale: 4,000 rows / (20 workers x batch 10) = 20 steps an epoch
    assert zou.nn_config(zou.SMALL_PLAN, "mnist5k_mlp", "iid", 20, "uplink-only", 0.1, 0)["metrics"]["every"] == 40
    assert zou.nn_expected_runs("full", 1) == 4 * 3 * 2 * 6


@pytest.mark.parametrize("name", ["zou-workers", "zou-noniid"])
def test_end_to_end_on_a_tiny_plan(tmp_path, monkeypatch, name):
    tiny = zou.Plan(("mnist5k_mlp",), (4,), (0.05, 0.1), steps=4, epochs=None, every=1, shard_rows=10,
                    train_rows=4000)
    monkeypatch.setattr(zou, "SMALL_PLAN", tiny)
    rep = next(r for r in zou.REPRODUCTIONS if r.name == name)
    summary = base.execute(rep, "small", 2, tmp_path)
    assert summary["runs"] == rep.expected_runs("small", 2) == 2 * (2 + 1)
    assert [c["id"] for c in summary["claims"]] == ["bidirectional-matches-uplink-accuracy",
                                                    "rho-hat-smaller-bidirectional", "aggregate-density-near-NK/d"]
    assert json.loads((tmp_path / "summary.json").read_text())["name"] == name
    check_reproduction(rep, summary, tmp_path, 2, again=name == "zou-noniid")  # reuse: once per file
