"""budget_threshold on the asynchronous engine (issue 23): ``steps`` counts server updates, of which
each worker computes its share, so each worker plans its budget over its own number of messages
(replayed from the event trace) and spends it within 5%, never above."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from gradsparse.config import ConfigError, load_config
from gradsparse.experiments.build import build_engine
from gradsparse.experiments.runner import run

sys.path.insert(0, str(Path(__file__).parent))
from test_budget import _config, _dense_frame, _run  # noqa: E402

STEPS, WORKERS = 120, 4


def _async(task, budget, **extra):
    cfg = _config(task, budget, steps=STEPS, workers=WORKERS, engine="async")
    cfg["algorithm"]["topology"] = {"kind": "ps_uplink"}
    cfg["asynchronous"] = extra
    return cfg


def _budget(task, fraction, **extra):
    probe = build_engine(load_config(_async(task, {"budget_bytes": 10**9}, **extra)))
    empty = probe.alg.compressor._sizes(probe.d)[0]
    return max(int(fraction * STEPS / WORKERS * _dense_frame(probe)), 3 * STEPS * empty)


LAWS = {
    "default": {},
    "heterogeneous": {"compute": {"kind": "exponential", "speeds": [1.0, 2.0, 4.0, 0.5]}},
    "staleness bound": {"staleness_bound": 2},
}


@pytest.mark.parametrize("task", ["linreg", "gisette_like", "digits_mlp"])
@pytest.mark.parametrize("law", list(LAWS))
def test_each_worker_spends_its_budget_over_its_own_messages(task, law):
    budget = _budget(task, 0.05, **LAWS[law])
    engine = _run(_async(task, {"budget_bytes": budget}, **LAWS[law]))
    state = engine.worker_state.compressor
    spent, messages = state["spent"].tolist(), state["steps_done"].tolist()
    # the plan replayed the trace exactly: each worker sent what it planned for
    assert messages == engine.alg.compressor.worker_steps and sum(messages) >= STEPS
    assert max(spent) <= budget
    if law != "staleness bound":  # (the ledger also counts messages the bound sent back, whose spend was undone)
        assert engine.ledger.uplink_bytes <= WORKERS * budget
    assert min(spent) >= 0.95 * budget, (spent, budget)


def test_density_budgets_count_each_workers_own_messages():
    rho = 0.05
    engine = _run(_async("linreg", {"density": rho}, **LAWS["heterogeneous"]))
    comp, state = engine.alg.compressor, engine.worker_state.compressor
    for q, (entries, t) in enumerate(zip(state["spent"].tolist(), comp.worker_steps)):
        cap = math.floor(rho * engine.d * t)
        assert 0.95 * cap <= entries <= cap, (q, entries, cap)


def test_a_bandwidth_term_makes_the_plan_an_estimate_the_budget_still_holds():
    extra = {"network": {"bandwidth": 20000.0, "latency": 0.01}}
    budget = _budget("linreg", 0.05, **extra)
    engine = _run(_async("linreg", {"budget_bytes": budget}, **extra))
    spent = engine.worker_state.compressor["spent"].tolist()
    assert max(spent) <= budget and min(spent) >= 0.95 * budget, (spent, budget)


def test_the_summary_reports_the_plan(tmp_path):
    budget = _budget("linreg", 0.05)
    out = run(load_config(_async("linreg", {"budget_bytes": budget})), tmp_path / "r")
    b = json.loads((out / "summary.json").read_text())["uplink_budget"]
    assert b["planned_messages_per_worker"] == b["messages_per_worker"] and sum(b["messages_per_worker"]) >= STEPS
    assert b["spent_total"] >= 0.95 * b["total"] and max(b["spent_per_worker"]) <= budget


def test_kardam_and_a_budget_are_refused_on_the_asynchronous_engine():
    cfg = _async("linreg", {"budget_bytes": 10**6}, kardam={"enabled": True})
    with pytest.raises(ConfigError, match="algorithm.compressor.*Kardam"):
        build_engine(load_config(cfg))


def test_resume_mid_run_equals_the_uninterrupted_run():
    cfg = _async("linreg", {"budget_bytes": _budget("linreg", 0.05)})
    full = _run(cfg)
    first = build_engine(load_config(cfg))
    for _ in range(50):
        first.step()
    second = build_engine(load_config(cfg))
    second.load_state_dict(first.state_dict())
    for _ in range(STEPS - 50):
        second.step()
    assert second.worker_state.compressor["spent"].tolist() == full.worker_state.compressor["spent"].tolist()
    assert second.w.equal(full.w)
