"""Paper 001 reproductions (candela-lambda, candela-rho): configs, the claim rules on hand-made
measurements, and a tiny end-to-end run of each."""

from __future__ import annotations

import math

import pytest

from gradsparse.config import load_config
from gradsparse.reproduce import base, candela
from gradsparse.reproduce.base import RunResult

from conftest import check_reproduction

INF = math.inf
LAMS = candela.LAMBDAS


def verdicts(claims):
    return {c.id: c.verdict for c in claims}


def lambda_steps(asgd, phisgd, phimem, kardam):
    out = {}
    for lam in LAMS:
        out["ASGD", lam], out["phiSGD", lam] = list(asgd), list(phisgd)
        out["phiMemSGD", lam], out["Kardam", lam] = list(phimem), list(kardam)
        out["Kardam-exp", lam] = list(kardam)
    return out


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------


def test_configs_of_the_four_methods_are_the_papers():
    s = candela.SMALL
    cfgs = {m: candela.run_config(m, 0.1, 2, s) for m in candela.METHODS}
    for cfg in cfgs.values():
        load_config(cfg)
        assert cfg["engine"] == "async" and cfg["workers"]["count"] == 8 and cfg["workers"]["batch_size"] == 64
        assert cfg["asynchronous"]["network"] == {"offset": 0.002, "rate": 0.1} and cfg["seed"] == 2
    assert cfgs["ASGD"]["algorithm"]["compressor"] == {"kind": "identity"}
    assert cfgs["phiSGD"]["algorithm"]["compressor"]["density"] == 0.5
    assert cfgs["phiSGD"]["algorithm"]["feedback"] == "none"
    assert cfgs["phiMemSGD"]["algorithm"]["feedback"] == "memory"
    assert cfgs["phiMemSGD"]["algorithm"]["compressor"]["density"] == 0.1
    k = cfgs["Kardam"]
    assert k["asynchronous"]["kardam"]["enabled"] and not cfgs["ASGD"]["asynchronous"]["kardam"]["enabled"]
    assert k["algorithm"]["staleness"] == {"kind": "exponential_density", "beta": 0.2}
    assert cfgs["Kardam-exp"]["algorithm"]["staleness"] == {"kind": "exponential", "beta": 0.2}
    assert k["schedule"]["lr"] == pytest.approx(2.5 * cfgs["ASGD"]["schedule"]["lr"])
    assert cfgs["ASGD"]["task"]["name"] == "mnist5k_lenet"  # 28x28 offline MNIST, d = 61,706
    assert all(c["asynchronous"]["target"]["stop"] for c in cfgs.values())
    full = candela.run_config("Kardam", 1.0, 0, candela.FULL)
    assert full["task"]["name"] == "mnist_lenet" and full["schedule"]["lr"] == 0.005
    assert candela.run_config("ASGD", 1.0, 0, candela.FULL)["schedule"]["lr"] == 0.002
    assert candela.run_config("phiMemSGD", 1.0, 0, s, rho=0.01)["algorithm"]["compressor"]["density"] == 0.01


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def test_steps_to_target_counts_a_miss_as_infinite(tmp_path):
    def result(summary):
        return RunResult("k", tmp_path, {}, summary, {})

    assert candela.steps_to_target(result({"status": "completed", "steps_to_target": 300})) == 300
    assert candela.steps_to_target(result({"status": "completed", "steps_to_target": None})) == INF
    assert candela.steps_to_target(result({"status": "diverged", "steps_to_target": None})) == INF


def test_histogram_stats_and_quantiles():
    st = candela.histogram_stats({0: 10, 5: 80, 20: 10})
    assert st["mean"] == pytest.approx(6.0) and st["p50"] == 5 and st["p90"] == 5 and st["p99"] == 20
    assert st["max"] == 20 and st["std"] == pytest.approx(math.sqrt(0.1 * 36 + 0.8 * 1 + 0.1 * 196))
    assert math.isnan(candela.histogram_stats({})["mean"])
    assert candela.quantile({7: 99, 30: 1}, 0.99) == 7 and candela.quantile({7: 98, 30: 2}, 0.99) == 30


def test_smallest_and_best_rho():
    steps = {0.01: [INF, 500], 0.1: [400, 300], 0.5: [200, 200]}
    assert candela.smallest_tolerated_rho(steps) == 0.1
    assert candela.smallest_tolerated_rho({0.1: [INF]}) == INF
    assert candela.best_rho(steps, 1000) == 0.5
    assert candela.best_rho({0.1: [300, 300], 0.5: [300, 300]}, 1000) == 0.5  # tie -> larger rho
    assert math.isnan(candela.best_rho({0.1: [INF], 0.5: [INF]}, 1000))


def test_median_ratio_is_a_lower_bound_when_the_numerator_misses():
    assert candela.median_ratio([400, 400, 400], [200, 200, 200], 1000) == (2.0, False)
    r, lower = candela.median_ratio([INF, INF, 400], [200, 200, 200], 1000)
    assert r == 5.0 and lower
    assert math.isnan(candela.median_ratio([400] * 3, [INF, INF, 200], 1000)[0])


# ------------------------------------------------------------------------------------------
# claim rules
# ------------------------------------------------------------------------------------------


def test_lambda_claims_flip_with_the_measurements():
    good = candela.lambda_claims(lambda_steps([400, 420, 380], [200, 210, 190], [190, 200, 180], [INF] * 3),
                                 LAMS, 1000, 0.8)
    assert verdicts(good) == {"sparse-fewer-iterations-than-ASGD": "holds", "speed-up-about-2x": "holds",
                              "sparse-much-fewer-iterations-than-Kardam": "holds"}
    bad = candela.lambda_claims(lambda_steps([200, 210, 190], [400, 420, 380], [390, 400, 380], [100] * 3),
                                LAMS, 1000, 0.8)
    assert set(verdicts(bad).values()) == {"does not hold"}
    mixed = candela.lambda_claims(lambda_steps([350, 200, 350], [300, 300, 300], [300, 300, 300], [INF] * 3),
                                  LAMS, 1000, 0.8)
    assert verdicts(mixed)["sparse-fewer-iterations-than-ASGD"] == "inconclusive"
    assert verdicts(mixed)["speed-up-about-2x"] == "inconclusive"  # 1.17: neither in [1.33, 3] nor <= 1
    # one lambda where phiSGD loses on every seed is enough to contradict "for every lambda"
    steps = lambda_steps([400, 420, 380], [200, 210, 190], [190, 200, 180], [INF] * 3)
    steps["phiSGD", 10.0] = [500, 500, 500]
    assert verdicts(candela.lambda_claims(steps, LAMS, 1000, 0.8))["sparse-fewer-iterations-than-ASGD"] == "does not hold"


def rho_steps(sgd: dict, mem: dict, lams=(0.1, 10.0)):
    out = {}
    for lam in lams:
        for rho in sgd:
            out["phiSGD", lam, rho] = list(sgd[rho][lam] if isinstance(sgd[rho], dict) else sgd[rho])
            out["phiMemSGD", lam, rho] = list(mem[rho][lam] if isinstance(mem[rho], dict) else mem[rho])
    return out


def test_rho_claims_flip_with_the_measurements():
    rhos, lams = (0.01, 0.1, 0.5), (0.1, 10.0)
    # phiMemSGD reaches at 1%, phiSGD only at 50%; the best rho shrinks at the larger lambda (the paper's order)
    sgd = {0.01: [INF] * 3, 0.1: [INF] * 3, 0.5: {0.1: [300] * 3, 10.0: [400] * 3}}
    mem = {0.01: {0.1: [600] * 3, 10.0: [350] * 3}, 0.1: {0.1: [400] * 3, 10.0: [380] * 3},
           0.5: {0.1: [300] * 3, 10.0: [390] * 3}}
    good = candela.rho_claims(rho_steps(sgd, mem), lams, rhos, 1000, 0.75)
    assert verdicts(good) == {"memsgd-tolerates-smaller-rho": "holds", "best-rho-shrinks-as-lambda-grows": "holds"}
    # the order of the lambdas given does not matter: the paper's order is by value
    assert verdicts(candela.rho_claims(rho_steps(sgd, mem), (10.0, 0.1), rhos, 1000, 0.75)) == verdicts(good)
    # same tolerance, and the best rho grows with lambda
    mem2 = {0.01: [INF] * 3, 0.1: {0.1: [300] * 3, 10.0: [500] * 3}, 0.5: {0.1: [400] * 3, 10.0: [300] * 3}}
    sgd2 = {0.01: [INF] * 3, 0.1: [500] * 3, 0.5: [300] * 3}
    bad = candela.rho_claims(rho_steps(sgd2, mem2), lams, rhos, 1000, 0.75)
    assert verdicts(bad) == {"memsgd-tolerates-smaller-rho": "does not hold",
                             "best-rho-shrinks-as-lambda-grows": "does not hold"}
    # the best rho never changes: not shown
    flat = candela.rho_claims(rho_steps(sgd2, {r: [300 if r == 0.5 else 500] * 3 for r in rhos}), lams, rhos, 1000, 0.75)
    assert verdicts(flat)["best-rho-shrinks-as-lambda-grows"] == "inconclusive"
    # nobody reaches the target: nothing to compare
    none = candela.rho_claims(rho_steps({r: [INF] * 3 for r in rhos}, {r: [INF] * 3 for r in rhos}), lams, rhos,
                              1000, 0.75)
    assert set(verdicts(none).values()) == {"inconclusive"}


def test_expected_runs_match_the_grids():
    assert candela.REPRODUCTIONS[0].expected_runs("small", 3) == 3 * 5 * 3  # lambdas x methods (2 Kardams) x seeds
    s = candela.SMALL
    assert candela.REPRODUCTIONS[1].expected_runs("small", 3) == 3 * len(s["rhos"]) * len(s["rho_lambdas"]) * 2


# ------------------------------------------------------------------------------------------
# end to end, tiny
# ------------------------------------------------------------------------------------------


def test_both_reproductions_end_to_end_tiny(tmp_path, monkeypatch):
    tiny = {**candela.SMALL, "task": {"name": "digits_lenet"}, "steps": 16, "every": 8, "target": 0.12,
            "rho_target": 0.12, "rho_lambdas": (10.0, 0.1), "rhos": (0.1,)}
    monkeypatch.setattr(candela, "SMALL", tiny)
    for rep in candela.REPRODUCTIONS:
        out = tmp_path / rep.name
        summary = base.execute(rep, "small", 1, out)
        check_reproduction(rep, summary, out, 1, again=rep is candela.REPRODUCTIONS[-1])  # reuse: once
    assert [c["id"] for c in summary["claims"]] == ["memsgd-tolerates-smaller-rho", "best-rho-shrinks-as-lambda-grows"]
