"""budget_threshold (issue 11): a hard-threshold whose lambda tunes itself to a total byte budget.

Guarantees checked here: the run never exceeds the budget (per worker and in total, over a grid
of tasks, budgets, feedbacks, scopes and seeds, and on adversarial synthetic inputs); the realised
total is within 5% below the budget on every task of the suite; lambda converges on i.i.d.
gradients; a budget of dense frames (or density 1) is the identity compressor; checkpoint/resume
mid-run equals the uninterrupted run; sync and loop engines agree; the runner fills in ``steps``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import COMPRESSORS, BudgetThreshold
from gradsparse.config import ConfigError, load_config
from gradsparse.experiments.build import build_engine
from gradsparse.experiments.runner import run
from gradsparse.segments import Layout

TASKS = {
    "toy_quadratic": ("toy_quadratic", {"dtype": "float64"}, 0.01, "full"),
    "linreg": ("linreg", {"n_samples": 400, "n_features": 200}, 0.01, 4),
    "gisette_like": ("logreg", {"dataset": "gisette_like", "n_samples": 300, "solve": False}, 0.05, 2),
    "madelon_like": ("logreg", {"dataset": "madelon_like", "n_samples": 400, "solve": False}, 0.05, 4),
    "breast_cancer": ("logreg", {"dataset": "breast_cancer", "solve": False}, 0.5, 4),
    "digits_mlp": ("digits_mlp", {}, 0.1, 8),
}


def _config(task: str, budget: dict, *, steps=30, workers=3, feedback="ef-scaled", engine="sync", seed=0, scope="entire"):
    name, opts, lr, batch = TASKS[task]
    return {
        "task": {"name": name, "options": opts}, "engine": engine, "seed": seed,
        "workers": {"count": workers, "batch_size": batch},
        "algorithm": {"compressor": {"kind": "budget_threshold", "scope": scope, **budget}, "feedback": feedback},
        "schedule": {"lr": lr}, "steps": steps, "progress": False, "plots": False,
    }


def _dense_frame(engine) -> int:
    return engine.alg.compressor._sizes(engine.d)[1]


def _run(cfg: dict):
    engine = build_engine(load_config(cfg))
    for _ in range(cfg["steps"]):
        engine.step()
    return engine


def test_registered_and_validated():
    assert COMPRESSORS["budget_threshold"] is BudgetThreshold
    with pytest.raises(ConfigError, match="exactly one of budget_bytes"):
        load_config({"algorithm": {"compressor": {"kind": "budget_threshold"}}, "steps": 5})
    with pytest.raises(ConfigError, match="exactly one of budget_bytes"):
        load_config({"algorithm": {"compressor": {"kind": "budget_threshold", "budget_bytes": 10, "density": 0.1}}, "steps": 5})
    with pytest.raises(ConfigError, match="density"):
        load_config({"algorithm": {"compressor": {"kind": "budget_threshold", "density": 1.5}}, "steps": 5})
    # fewer planned steps than the run has: the extra steps' frames would not fit the budget
    cfg = _config("linreg", {"budget_bytes": 10_000, "steps": 5}, steps=10)
    with pytest.raises(ConfigError, match="fewer than the run's 10 steps"):
        build_engine(load_config(cfg))
    # a budget below the empty frames of the run cannot be respected at all
    with pytest.raises(ConfigError, match="empty frame"):
        build_engine(load_config(_config("linreg", {"budget_bytes": 20}, steps=10)))
    with pytest.raises(ConfigError, match="uplink compressor"):
        build_engine(load_config({
            "task": {"name": "toy_quadratic"}, "steps": 5,
            "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {
                "kind": "bidirectional", "down_compressor": {"kind": "budget_threshold", "budget_bytes": 1000}}}}))


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("fraction", [0.003, 0.05, 0.4])
def test_never_exceeds_and_spends_within_5_percent_on_every_task(task, fraction):
    """Per worker and in total: spent <= B (hard), and >= 0.95 B unless the budget exceeds what
    sending every entry every step costs."""
    steps, workers = 30, 3
    probe = build_engine(load_config(_config(task, {"budget_bytes": 10**9}, steps=steps, workers=workers)))
    dense = _dense_frame(probe)
    empty = probe.alg.compressor._sizes(probe.d)[0]
    budget = max(int(fraction * steps * dense), 3 * steps * empty)
    engine = _run(_config(task, {"budget_bytes": budget}, steps=steps, workers=workers))
    spent = engine.worker_state.compressor["spent"]
    assert int(spent.sum()) == engine.ledger.uplink_bytes
    assert bool((spent <= budget).all()), (spent.tolist(), budget)
    assert engine.ledger.uplink_bytes <= workers * budget
    reachable = min(budget, steps * dense)
    assert bool((spent >= 0.95 * reachable).all()), (spent.tolist(), budget, reachable)


GRID = [
    # task, fraction of dense, feedback, scope, workers, seed
    ("linreg", 0.01, "ef", "entire", 4, 1),
    ("linreg", 0.2, "ef-scaled", "entire", 2, 2),
    ("linreg", 0.9, "none", "entire", 3, 3),
    ("breast_cancer", 0.1, "ef-scaled", "entire", 5, 4),
    ("breast_cancer", 0.7, "memory", "entire", 2, 5),
    ("madelon_like", 0.02, "ef", "entire", 3, 6),
    ("digits_mlp", 0.01, "ef", "layerwise", 3, 7),
    ("digits_mlp", 0.1, "memory", "layerwise", 2, 8),
    ("toy_quadratic", 0.3, "ef", "entire", 3, 9),
]


@pytest.mark.parametrize("task,fraction,feedback,scope,workers,seed", GRID)
def test_never_exceeds_across_configs(task, fraction, feedback, scope, workers, seed):
    steps = 25
    probe = build_engine(load_config(_config(task, {"budget_bytes": 10**9}, steps=steps, workers=workers)))
    budget = max(int(fraction * steps * _dense_frame(probe)), 3 * steps * probe.alg.compressor._sizes(probe.d)[0])
    engine = _run(_config(task, {"budget_bytes": budget}, steps=steps, workers=workers, feedback=feedback,
                          scope=scope, seed=seed))
    spent = engine.worker_state.compressor["spent"]
    assert bool((spent <= budget).all()) and engine.ledger.uplink_bytes <= workers * budget
    assert bool((spent >= 0.95 * min(budget, steps * _dense_frame(engine))).all()), (spent.tolist(), budget)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
def test_never_exceeds_on_adversarial_inputs(seed, value_dtype):
    """Synthetic rows whose scale jumps by orders of magnitude, bursts of zeros and heavy tails:
    the exact frames still add up to at most the budget (the hard cap), in bytes and in entries."""
    gen = torch.Generator().manual_seed(seed)
    d, n, steps = 300 + 97 * seed, 3, 40
    layout = Layout.flat(d)
    dense = BudgetThreshold(budget_bytes=1)._sizes(d)[1]
    for budget in ({"budget_bytes": int((0.02 + 0.1 * seed) * steps * dense)}, {"density": 0.003 + 0.05 * seed}):
        comp = BudgetThreshold(**budget, steps=steps, burst=None if seed % 2 else 4.0)
        comp.bind_run(steps, value_dtype)
        alg = Algorithm(compressor=comp, feedback="none", value_dtype=value_dtype)
        state = alg.init_worker_state(layout, n)
        total_bytes = torch.zeros(n, dtype=torch.long)
        total_entries = torch.zeros(n, dtype=torch.long)
        for t in range(steps):
            scale = 10.0 ** torch.randint(-4, 5, (n, 1), generator=gen).double()
            x = torch.distributions.StudentT(1.5).sample((n, d)) * scale.float()
            if t % 7 == 3:
                x[0] = 0.0
            out = alg.worker_step(x, None, state, step=t, lr=1.0)
            state = out.state
            total_bytes += out.nbytes
            total_entries += out.message.counts
        if "budget_bytes" in budget:
            assert bool((total_bytes <= budget["budget_bytes"]).all()), (total_bytes.tolist(), budget)
            assert torch.equal(total_bytes, state.compressor["spent"])
        else:
            assert bool((total_entries <= math.floor(budget["density"] * d * steps)).all())
            assert torch.equal(total_entries, state.compressor["spent"])


def _iid_thresholds(steps: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda_t of 2 workers on i.i.d. N(0, 1) rows, and the lambda at which the expected count
    equals the share that step had (the two-sided normal quantile of K_t / d)."""
    d, n = 4000, 2
    torch.manual_seed(0)
    comp = BudgetThreshold(density=0.01, steps=steps, **options)
    alg = Algorithm(compressor=comp, feedback="none")
    state = alg.init_worker_state(Layout.flat(d), n)
    lams, ideal = [], []
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    for t in range(steps - 1):  # the last step sends what is left (lambda = 0): not part of the law
        k = torch.tensor(comp._plan(state.compressor, d)["k"], dtype=torch.float64)
        ideal.append(normal.icdf(1 - k / (2 * d)))
        lams.append(comp.thresholds(state.compressor)[:, 0].clone())
        state = alg.worker_step(torch.randn(n, d), None, state, step=t, lr=1.0).state
    return torch.stack(lams), torch.stack(ideal)


def test_threshold_converges_on_iid_gradients():
    """Stationary magnitudes (i.i.d. N(0, 1) rows, no error feedback): lambda settles at the
    quantile where the expected count buys the per-step share (about P(|z| >= lambda) = 40 / 4000,
    lambda = 2.5758; the share moves a little as spending so far is paid back or caught up), from
    the first step's top-K measurement, or from a starting lambda far off (0.01). With the gain
    decaying to 0 (gain_floor 0) its spread around that quantile shrinks; with the default floor
    it stays in a narrow band."""
    lams, ideal = _iid_thresholds(600, gain_floor=0.0)
    assert float(lams[0, 0]) == 0.0 and abs(float(lams[1, 0]) - 2.5758) < 0.3  # top-K, then measured
    rel = (lams - ideal) / ideal
    early, late = rel[50:150], rel[-150:-50]
    assert bool((late.mean(0).abs() < 0.01).all()), late.mean(0)
    assert float(late.std(0).max()) < 0.01
    assert bool((late.std(0) < early.std(0)).all())
    assert bool(((ideal[-150:-50] - 2.5758).abs() < 0.1).all())
    for options in ({}, {"threshold": 0.01}):
        lams, ideal = _iid_thresholds(300, **options)
        rel = ((lams - ideal) / ideal)[-150:-50]
        assert bool((rel.mean(0).abs() < 0.02).all()) and float(rel.std(0).max()) < 0.03, (options, rel.mean(0), rel.std(0))


@pytest.mark.parametrize("mode", ["bytes", "density"])
@pytest.mark.parametrize("feedback", ["ef", "none"])
def test_dense_budget_is_identity(mode, feedback):
    steps = 12
    cfg = _config("digits_mlp", {"density": 1.0}, steps=steps, feedback=feedback)
    if mode == "bytes":
        probe = build_engine(load_config(cfg))
        cfg["algorithm"]["compressor"] = {"kind": "budget_threshold", "budget_bytes": steps * _dense_frame(probe)}
    budgeted = _run(cfg)
    ident = dict(cfg, algorithm={"compressor": {"kind": "identity"}, "feedback": feedback})
    reference = _run(ident)
    assert torch.equal(budgeted.w, reference.w)
    assert budgeted.ledger.uplink_bytes == reference.ledger.uplink_bytes


def test_dense_budget_ef_scaled_matches_identity_to_fp_tolerance():
    steps = 10
    cfg = _config("breast_cancer", {"density": 1.0}, steps=steps, feedback="ef-scaled")
    budgeted = _run(cfg)
    reference = _run(dict(cfg, algorithm={"compressor": {"kind": "identity"}, "feedback": "ef"}))
    assert torch.allclose(budgeted.w, reference.w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["entire", "layerwise"])
def test_sync_and_loop_engines_agree(scope):
    task = "digits_mlp" if scope == "layerwise" else "madelon_like"
    budget = {"budget_bytes": 6000} if scope == "entire" else {"density": 0.02}
    engines = {e: _run(_config(task, budget, steps=15, engine=e, scope=scope)) for e in ("sync", "loop")}
    a, b = engines["sync"], engines["loop"]
    assert torch.allclose(a.w, b.w, rtol=0, atol=1e-6)
    for k in a.worker_state.compressor:
        assert torch.equal(a.worker_state.compressor[k], b.worker_state.compressor[k]) or torch.allclose(
            a.worker_state.compressor[k], b.worker_state.compressor[k], equal_nan=True), k
    assert a.ledger.uplink_bytes == b.ledger.uplink_bytes


@pytest.mark.parametrize("engine", ["sync", "loop"])
def test_checkpoint_resume_equals_uninterrupted(engine):
    cfg = _config("madelon_like", {"budget_bytes": 8000}, steps=20, engine=engine)
    whole = _run(cfg)
    first = build_engine(load_config(cfg))
    for _ in range(9):
        first.step()
    sd = first.state_dict()
    sd = torch.serialization.pickle.loads(torch.serialization.pickle.dumps(sd))  # a detached copy
    second = build_engine(load_config(cfg))
    second.load_state_dict(sd)
    for _ in range(11):
        second.step()
    assert torch.equal(second.w, whole.w)
    for k, v in whole.worker_state.compressor.items():
        assert torch.equal(second.worker_state.compressor[k], v), k
    assert second.ledger.uplink_bytes == whole.ledger.uplink_bytes


def test_runner_fills_steps_from_epochs_and_summary_respects_budget(tmp_path):
    cfg = _config("breast_cancer", {"budget_bytes": 1500}, steps=1)
    del cfg["steps"]
    cfg["epochs"] = 0.5  # 455 train rows / (3 workers x 4) -> 19 steps
    out = run(load_config(cfg), tmp_path / "r")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 19
    assert 0.95 * 3 * 1500 <= summary["uplink_bytes"] <= 3 * 1500
    budget = summary["uplink_budget"]
    assert budget["unit"] == "bytes" and budget["per_worker"] == 1500 and budget["total"] == 4500
    assert budget["spent_total"] == summary["uplink_bytes"] and max(budget["spent_per_worker"]) <= 1500
    assert "steps: null" in (out / "config.yaml").read_text()  # resolved config: null = the run's length


def test_python_api_without_steps_says_what_is_missing():
    comp = BudgetThreshold(budget_bytes=1000)
    alg = Algorithm(compressor=comp, feedback="ef")
    state = alg.init_worker_state(Layout.flat(10), 1)
    with pytest.raises(ValueError, match="needs steps"):
        alg.worker_step(torch.randn(1, 10), None, state, step=0, lr=0.1)
    comp.bind_run(5)
    out = alg.worker_step(torch.randn(1, 10), None, state, step=0, lr=0.1)
    assert int(out.state.compressor["spent"][0]) == int(out.nbytes[0])


def _paired_rule(differences: list[float], bytes_ok: bool) -> str:
    """The module docstring's rule, written out: with D_s = loss(ours) - loss(other) per seed,
    holds when every D_s <= 0, does not hold when every D_s > 0, else (or off budget) inconclusive."""
    if not bytes_ok or any(math.isnan(d) for d in differences):
        return "inconclusive"
    if all(d <= 0 for d in differences):
        return "holds"
    return "does not hold" if all(d > 0 for d in differences) else "inconclusive"


def test_budget_compare_quick(tmp_path):
    """The comparison users run (``gradsparse budget-compare --quick``), checked against its own
    run directories: every table row is the mean of its runs' finals, the per-seed loss
    differences are those of the runs, each verdict is the stated rule applied to them (and
    the markdown says the same verdicts), budget_threshold at top-k's bytes."""
    import csv
    import re

    from gradsparse.cli import main
    from gradsparse.experiments.budget import METHODS, TASKS

    out = tmp_path / "cmp"
    assert main(["budget-compare", "--out", str(out), "--seeds", "3", "--quick"]) == 0
    summary = json.loads((out / "verdict.json").read_text())
    assert set(summary["verdicts"]) == set(TASKS)

    def finals(task, method, key):
        runs = [json.loads((out / "runs" / task / f"{method}-seed{s}" / "summary.json").read_text()) for s in range(3)]
        return [math.nan if r["final"].get(key) is None else float(r["final"][key]) for r in runs] if key != "bytes" \
            else [float(r["uplink_bytes"]) for r in runs]

    rows = list(csv.DictReader(open(out / "budget_compare.csv")))
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in TASKS for m in METHODS}
    for r in rows:
        assert r["seeds"] == "3"
        assert float(r["final_loss_mean"]) == pytest.approx(sum(finals(r["task"], r["method"], "loss")) / 3, rel=1e-12)
        assert float(r["uplink_bytes_mean"]) == pytest.approx(sum(finals(r["task"], r["method"], "bytes")) / 3, rel=1e-12)
    markdown = (out / "budget_compare.md").read_text()
    said = {m[1]: (m[2], m[3]) for m in re.finditer(r"^- (\S+): vs top-k \*\*([a-z ]+)\*\*, vs hand-tuned hard-threshold "
                                                     r"\*\*([a-z ]+)\*\*$", markdown, re.M)}
    for task, v in summary["verdicts"].items():
        ours, topk, hard = (finals(task, m, "loss") for m in ("budget_threshold", "topk", "hard_threshold"))
        ratios = [a / b for a, b in zip(finals(task, "budget_threshold", "bytes"), finals(task, "topk", "bytes"))]
        assert all(0.95 <= x <= 1.0 for x in ratios), (task, ratios)  # the budget spends top-k's bytes, never more
        assert v["budget_bytes_within_[0.95,1]_of_topk"] is True
        diffs = [a - b for a, b in zip(ours, topk)]
        assert v["loss_difference_vs_topk_per_seed"] == pytest.approx(diffs, rel=1e-12)
        vs_topk = v["budget_threshold loss <= top-k loss at equal bytes"]
        vs_hard = v["budget_threshold loss <= hand-tuned hard-threshold loss"]
        assert vs_topk == _paired_rule(diffs, True)
        assert vs_hard == _paired_rule([a - b for a, b in zip(ours, hard)], True)
        assert said[task] == (vs_topk, vs_hard)
    assert set(said) == set(summary["verdicts"])
    assert (out / "budget_compare.png").stat().st_size > 10_000
    # a second comparison into the same directory replaces its own runs, nothing else
    (out / "runs" / ".budget-compare").unlink()
    with pytest.raises(FileExistsError):
        from gradsparse.experiments.budget import compare

        compare(out, seeds=1, quick=True, tasks=["logreg_madelon_like"])
