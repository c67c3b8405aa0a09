"""Engine equivalence: the same config on every engine gives the same parameters and bytes.

``engine_name`` is parametrized over :data:`gradsparse.engines.ENGINES`; an engine added to that
table (asynchronous, torch.distributed) is checked here against the vectorized reference
``sync`` on the configs it supports. Also: stagewise learning against a hand implementation of
paper 004's eq. 15-16, and the interface every engine provides.
"""

from __future__ import annotations

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK
from gradsparse.config import load_config
from gradsparse.engines import ENGINES
from gradsparse.engines.synchronous import SynchronousEngine
from gradsparse.experiments.build import build_engine
from gradsparse.momentum import UpdateMomentum
from gradsparse.schedules import Schedule
from gradsparse.tasks import make_task

TOY = {"name": "toy_quadratic", "options": {"dtype": "float64"}}

CONFIGS = {
    "toy_uplink_topk_ef": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"},
        "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink"}}, "steps": 40,
    },
    "toy_bidirectional": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"},
        "algorithm": {"compressor": {"kind": "topk", "k": 2},
                      "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "k": 3}}}, "steps": 40,
    },
    "toy_downlink_only": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"},
        "algorithm": {"compressor": {"kind": "identity"}, "feedback": "none",
                      "topology": {"kind": "downlink_only", "down_compressor": {"kind": "topk", "k": 1}}}, "steps": 40,
    },
    "mlp_topk_ef_in_place": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 5, "batch_size": 3},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.01}}, "schedule": {"lr": 0.1}, "steps": 8,
    },
    "mlp_layerwise_memory_update_momentum_masking": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 5},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.02, "scope": "layerwise"}, "feedback": "memory",
                      "momentum": {"kind": "update", "beta": 0.9, "masking": True}}, "schedule": {"lr": 0.05}, "steps": 8,
    },
    "logreg_hard_threshold_ef_scaled_gradient_momentum": {
        "task": {"name": "logreg", "options": {"dataset": "breast_cancer", "dtype": "float64"}},
        "workers": {"count": 4, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.05}, "feedback": "ef-scaled",
                      "momentum": {"kind": "gradient", "beta": 0.5}, "weight_decay": 1e-3}, "schedule": {"lr": 0.5},
        "steps": 12,
    },
    "linreg_randomk_scaled_none": {
        "task": {"name": "linreg", "options": {"n_samples": 200, "n_features": 40}},
        "workers": {"count": 3, "batch_size": 4, "weights": [0.5, 0.3, 0.2]},
        "algorithm": {"compressor": {"kind": "randomk", "k": 5, "scale": True}, "feedback": "none"},
        "schedule": {"lr": 0.01}, "steps": 10,
    },
    "logreg_efgd_star_full_batch": {
        "task": {"name": "logreg", "options": {"dataset": "breast_cancer", "dtype": "float64"}},
        "workers": {"count": 3, "batch_size": "full"},
        "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.01}, "feedback": "ef-scaled",
                      "gradient_shift": "optimum"}, "schedule": {"lr": 0.5}, "steps": 6,
    },
    "mlp_stagewise": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 3, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.02}, "feedback": "memory",
                      "momentum": {"kind": "update", "beta": 0.5}},
        "schedule": {"kind": "stagewise", "lr": 0.05, "stage_steps": [3, 4], "prox_gamma": 5.0}, "steps": 10,
    },
}


@pytest.fixture(params=sorted(ENGINES))
def engine_name(request):
    return request.param


def _run(config: dict, engine: str, steps: int):
    e = build_engine(load_config({**config, "engine": engine}))
    records = [e.step() for _ in range(steps)]
    return e, records


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_same_config_same_parameters_on_every_engine(engine_name, config):
    """Each engine names the variant of a config on which it must equal ``sync`` exactly
    (``Engine.synchronous_equivalent``: the config itself for synchronous engines; one worker and
    zero delays for the asynchronous one)."""
    cfg = ENGINES[engine_name].synchronous_equivalent(CONFIGS[config])
    if cfg is None:
        pytest.skip(f"engine {engine_name!r} has no synchronous equivalent of {config!r}")
    ref, ref_records = _run(cfg, "sync", cfg["steps"])
    other, other_records = _run(cfg, engine_name, cfg["steps"])
    assert other.name == engine_name
    same_downlink = not other.sends_model_down
    exact = ref.dtype == torch.float64
    tol = dict(rtol=1e-9, atol=1e-12) if exact else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(ref_records, other_records):
        # the same supports and the same exact bytes, message by message
        assert torch.equal(a.worker.message.support_mask(), b.worker.message.support_mask()), (config, a.step)
        assert a.worker.nbytes.tolist() == b.worker.nbytes.tolist()
        if same_downlink:
            assert a.server.nbytes == b.server.nbytes
    torch.testing.assert_close(other.w, ref.w, **tol)
    assert other.ledger.uplink_bytes == ref.ledger.uplink_bytes
    if same_downlink:
        assert other.ledger == ref.ledger
    for part in ("memory", "momentum"):
        x, y = getattr(ref.worker_state, part), getattr(other.worker_state, part)
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y.flat, x.flat, **tol)
    # the checkpoint of one synchronous engine resumes another
    if isinstance(other, SynchronousEngine):
        other.load_state_dict(ref.state_dict())
        assert torch.equal(other.w, ref.w)


@pytest.mark.parametrize("engine_name", ["sync", "loop", "async"])
def test_an_engine_runs_the_topologies_it_declares_and_refuses_the_others(engine_name):
    """What an engine declares (``topologies``, ``is_asynchronous``, ``stagewise``) is what it does:
    every declared topology builds and steps (one message per worker per round, or one per update
    when asynchronous, with its staleness), every other one is refused naming the engine."""
    from gradsparse.config import ConfigError
    from gradsparse.topology import TOPOLOGIES

    cls = ENGINES[engine_name]
    for kind in TOPOLOGIES:
        raw = {"task": {"name": "toy_quadratic", "options": {"dim": 12}}, "engine": engine_name,
               "workers": {"count": 3, "batch_size": "full"}, "steps": 2, "schedule": {"lr": 0.1},
               "algorithm": {"compressor": {"kind": "topk", "k": 2}, "feedback": "ef", "topology": {"kind": kind}}}
        if TOPOLOGIES[kind].compresses_downlink:
            raw["algorithm"]["topology"]["down_compressor"] = {"kind": "topk", "k": 3}
        if kind == "downlink_only":
            raw["algorithm"].update(compressor={"kind": "identity"}, feedback="none")
        if kind not in cls.topologies:
            with pytest.raises(ConfigError, match=f"config key 'engine': engine '{engine_name}' .*'{kind}'"):
                build_engine(load_config(raw))
            continue
        e = build_engine(load_config(raw))
        assert e.stagewise is None and e.is_asynchronous == (engine_name == "async")
        for _ in range(2):
            rec = e.step()
            assert rec.worker.message.n == (1 if e.is_asynchronous else 3)
            assert hasattr(rec, "staleness") == e.is_asynchronous
        assert e.t == 2
        if e.is_asynchronous:  # a message is charged when sent (every worker had one in flight); one model per update
            assert 3 <= e.ledger.uplink_messages <= 2 + 3 and e.ledger.downlink_messages == 2
        else:
            assert e.ledger.uplink_messages == 6


def hand_stagewise(task, eta0, stage_steps, gamma, beta, k):
    """Paper 004 §6 (Lemma 11, eq. 15-16) written out: every stage a fresh M-DSGD run."""
    x = task.train_x.double()
    w = task.init_params(None)["w"].double().clone()
    n, d = 3, w.numel()
    anchor = w.clone()
    averages = []
    for s, T in enumerate(stage_steps):
        eta = eta0 / (s + 1)
        w = anchor.clone()  # w_{s,0} = w~_s
        m = torch.zeros(n, d, dtype=torch.float64)  # momentum and memory start at zero
        u = torch.zeros(n, d, dtype=torch.float64)
        iterates = []
        for _ in range(T):
            iterates.append(w.clone())
            g = (w[None, :] - x) + (w - anchor)[None, :] / gamma  # grad F^q + proximal term
            m = beta * m + g
            v = m + u
            sent = torch.zeros_like(v)
            for q in range(n):
                idx = torch.sort(v[q].abs(), descending=True, stable=True).indices[:k]
                sent[q, idx] = v[q, idx]
            u = v - sent
            w = w - eta * sent.mean(0)
        anchor = torch.stack(iterates).mean(0)  # w~_{s+1} = (1/T_s) sum_{t<T_s} w_{s,t}
        averages.append(anchor.clone())
    return w, averages


@pytest.mark.parametrize("engine", ["sync", "loop"])  # the asynchronous engine refuses stagewise learning
def test_stagewise_equals_eq_15_16_by_hand(engine):
    task = make_task("toy_quadratic", dtype="float64", centers=(1.0, 4.0, 9.0), dim=6, w0=[3, -1, 2, 8, 0, 5])
    stage_steps = [3, 4, 5]
    # fp64 values on the wire: the hand computation below is exact float64 arithmetic
    alg = Algorithm(compressor=TopK(k=2), feedback="memory", momentum=UpdateMomentum(beta=0.6), value_dtype="fp64")
    sched = Schedule(kind="stagewise", lr=0.2, stage_steps=stage_steps, prox_gamma=2.0)
    sim = ENGINES[engine](task, alg, sched, n_workers=3, batch_size="full")
    for _ in range(sum(stage_steps)):
        sim.step()
    w_hand, averages = hand_stagewise(task, 0.2, stage_steps, 2.0, 0.6, 2)
    torch.testing.assert_close(sim.w, w_hand, rtol=1e-12, atol=1e-12)
    # the engine recorded the averages of the stages that ended (w~_1, w~_2; stage 3 is running)
    assert len(sim.stagewise.averages) == 2
    for got, want in zip(sim.stagewise.averages, averages):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the output w~_3: the mean of the last stage's iterates, formed at the end
    torch.testing.assert_close(sim.stagewise.output(), averages[2], rtol=1e-12, atol=1e-12)
    assert sched(3) == pytest.approx(0.1) and sched(7) == pytest.approx(0.2 / 3)
