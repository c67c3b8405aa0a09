"""The synchronous simulator on real tasks: invariants, convergence, vectorization, checkpoints."""

import math

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import HardThreshold, Identity, TopK
from gradsparse.config import load_config
from gradsparse.engines.sync_sim import SyncSimulator
from gradsparse.experiments.build import build_engine
from gradsparse.metrics import residual_ratio_curve, step_metrics
from gradsparse.momentum import UpdateMomentum
from gradsparse.schedules import Schedule
from gradsparse.tasks import make_task


def toy_sim(topology="ps_uplink", k=1, k_down=1, steps_lr=0.01, w0=20.0, feedback="ef"):
    task = make_task("toy_quadratic", w0=w0, dtype="float64")
    down = TopK(k=k_down) if topology in ("bidirectional", "downlink_only") else None
    if topology == "downlink_only":
        up, feedback = Identity(), "none"
    else:
        up = TopK(k=k)
    alg = Algorithm(compressor=up, feedback=feedback, topology=topology, down_compressor=down)
    return SyncSimulator(task, alg, Schedule(lr=steps_lr), n_workers=3, batch_size="full")


def test_paper000_invariant_v_minus_x_equals_mean_error():
    task = make_task("linreg", n_samples=400, n_features=32)
    alg = Algorithm(compressor=TopK(k=3), feedback="ef", topology="all_to_all")
    sim = SyncSimulator(task, alg, Schedule(kind="inverse_power", lr=0.05, power=0.3), n_workers=4, batch_size=8, seed=1)
    x = sim.w.clone().double()
    for _ in range(60):
        rec = sim.step()
        x = x - rec.lr * rec.grads.double().mean(0)
        mean_e = sim.worker_state.memory.flat.double().mean(0)
        torch.testing.assert_close(sim.w.double() - x, mean_e, rtol=1e-4, atol=1e-5)


def test_toy_downlink_only_converges_to_fstar():
    sim = toy_sim("downlink_only")
    for _ in range(3000):
        sim.step()
    fstar = 6100 / 9
    assert sim.task.f_star == pytest.approx(fstar)
    assert sim.full_loss() - fstar < 1e-4 * fstar
    assert sim.full_loss() >= fstar - 1e-3
    # the model approaches w* = 16/3 in every coordinate
    assert (sim.w - 16 / 3).abs().max() < 0.05


@pytest.mark.parametrize("topology", ["ps_uplink", "bidirectional"])
def test_toy_uplink_compression_reaches_a_neighbourhood(topology):
    # with uplink top-1 the workers' memories hold O(alpha d |grad F^q(w*)|) at the optimum,
    # so the iterates stay in a neighbourhood of w* instead of converging (paper 003)
    sim = toy_sim(topology)
    start = sim.full_loss()
    for _ in range(3000):
        sim.step()
    fstar = 6100 / 9
    assert sim.full_loss() - fstar < 0.1 * (start - fstar)


def test_traffic_accounting_bidirectional_vs_uplink():
    task = make_task("linreg", n_samples=400, n_features=64)

    def sim(topology):
        down = TopK(k=4) if topology == "bidirectional" else None
        alg = Algorithm(compressor=TopK(k=4), feedback="ef", topology=topology, down_compressor=down)
        return SyncSimulator(task, alg, Schedule(lr=0.01), n_workers=8, batch_size=4)

    up, bi, a2a = sim("ps_uplink"), sim("bidirectional"), sim("all_to_all")
    unions = []
    for _ in range(30):
        ru, rb, ra = up.step(), bi.step(), a2a.step()
        assert rb.server.message.nnz <= 4
        assert 4 <= ru.server.message.nnz <= 8 * 4  # union of eight top-4 supports
        unions.append(ru.server.message.nnz)
        assert ru.uplink_bytes == ra.uplink_bytes and ra.downlink_bytes == 7 * ra.uplink_bytes
        assert ru.downlink_bytes == 8 * ru.server.nbytes and ra.server.message is None
        assert ru.uplink_bytes == int(ru.worker.nbytes.sum())
    assert max(unions) > 4  # workers' supports differ
    assert bi.ledger.downlink_bytes < up.ledger.downlink_bytes
    assert bi.ledger.uplink_bytes == pytest.approx(up.ledger.uplink_bytes, rel=0.05)  # same k; index gaps differ


def test_vectorized_gradients_equal_a_per_worker_loop():
    for name in ("digits_mlp", "digits_cnn", "logreg"):
        opts = {"dataset": "breast_cancer"} if name == "logreg" else {}
        task = make_task(name, **opts)
        sim = SyncSimulator(task, Algorithm(), Schedule(lr=0.1), n_workers=7, batch_size=5, seed=3)
        idx = sim.data.sample()
        vec = sim._vgrad(sim.w, task.train_x[idx], task.train_y[idx])
        loop = torch.stack([sim._grad(sim.w, task.train_x[i], task.train_y[i]) for i in idx])
        torch.testing.assert_close(vec, loop, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("momentum", ["update", "none"])  # "none": grouped gradients, in-place memory
def test_same_seed_same_run_and_checkpoint_resume(momentum):
    def make(seed):
        task = make_task("digits_mlp")
        alg = Algorithm(compressor=TopK(density=0.05), feedback="ef",
                        momentum=UpdateMomentum(beta=0.9) if momentum == "update" else "none")
        return SyncSimulator(task, alg, Schedule(lr=0.05), n_workers=4, batch_size=4, seed=seed)

    assert make(0).uses_in_place_memory == (momentum == "none")
    a, b = make(0), make(0)
    for _ in range(10):
        a.step(), b.step()
    assert torch.equal(a.w, b.w)
    sd = a.state_dict()
    for _ in range(5):
        a.step()
    c = make(0)
    c.load_state_dict(sd)
    for _ in range(5):
        c.step()
    assert torch.equal(a.w, c.w) and torch.equal(a.worker_state.memory.flat, c.worker_state.memory.flat)
    assert a.ledger == c.ledger
    # the checkpoint is plain tensors keyed by segment: it loads under weights_only=True
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    assert set(sd2["algorithm"]["worker"]["memory"]) == set(a.layout.names)
    # another seed draws other mini-batches
    assert not torch.equal(make(1).data.sample(), make(0).data.sample())


def test_step_metrics_bounds_on_toy():
    sim = toy_sim("bidirectional")
    names = ["density", "xi", "rho_hat", "gamma_hat_up", "compression_ratio_up", "gamma_hat_down",
             "compression_ratio_down", "aggregate_density"]
    for _ in range(30):
        rec = sim.step()
        m = step_metrics(sim, rec, names)
        assert m["density"] == pytest.approx(1 / 100)
        assert 0 < m["aggregate_density"] <= 3 / 100  # at most N k / d nonzeros
        # top-1 of a d = 100 vector keeps at least 1/d of the energy: ratio <= sqrt(1 - 1/d)
        assert m["compression_ratio_up"] <= math.sqrt(1 - 1 / 100) + 1e-9
        assert m["gamma_hat_up"] == pytest.approx(1 - m["compression_ratio_up"])
        assert m["gamma_hat_down"] == pytest.approx(1 - m["compression_ratio_down"])
        # xi by hand from the record: ||TopK(mean a) - mean TopK(a)|| / ||alpha mean g||, both
        # top-k's values as sent (rounded to the wire's fp32: this toy runs in float64)
        a = rec.accumulated()
        mean_a = a.mean(0)
        top = torch.zeros_like(mean_a)
        i = int(mean_a.abs().argmax())
        top[i] = mean_a[i].float().double()
        xi = float((top - rec.worker.message.to_dense().mean(0)).norm() / (rec.lr * rec.grads.mean(0)).norm())
        assert m["xi"] == pytest.approx(xi, rel=1e-9)


def test_residual_ratio_curve_by_hand():
    G = torch.tensor([3.0, -4.0, 0.0, 12.0])
    rows = residual_ratio_curve(G, [0, 1, 2, 4])
    assert [r[0] for r in rows] == [0, 1, 2, 4]
    assert rows[0][1] == pytest.approx(1.0)
    assert rows[1][1] == pytest.approx(5 / 13)
    assert rows[2][1] == pytest.approx(3 / 13)
    assert rows[3][1] == pytest.approx(0.0)
    assert rows[1][2] == pytest.approx(math.sqrt(0.75))


def test_hard_threshold_sends_nothing_below_lambda_and_density_varies():
    task = make_task("logreg", dataset="breast_cancer")
    alg = Algorithm(compressor=HardThreshold(1e9), feedback="ef-scaled")
    sim = SyncSimulator(task, alg, Schedule(lr=0.1), n_workers=4, batch_size=2)
    rec = sim.step()
    assert int(rec.nnz.sum()) == 0
    assert torch.equal(sim.w, rec.params_before)


def test_shard_split_and_weights_run():
    cfg = load_config({
        "task": {"name": "digits_mlp"},
        "workers": {"count": 5, "split": "shards", "batch_size": 4, "weights": [0.4, 0.3, 0.1, 0.1, 0.1]},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.01}},
        "steps": 3,
    })
    sim = build_engine(cfg)
    for _ in range(3):
        sim.step()
    assert torch.isfinite(sim.w).all()
    labels = [set(sim.task.train_y[r].tolist()) for r in sim.data.rows]
    assert sum(len(s) for s in labels) / len(labels) <= 4


def test_efgd_star_shift_vanishes_at_the_optimum():
    task = make_task("logreg", dataset="breast_cancer", dtype="float64")
    # fp64 values on the wire: exactly zero shifted gradients at x* must keep the model at x*
    # (with fp32 values, step 1's rounding error stays in the memories and is sent later)
    alg = Algorithm(compressor=HardThreshold(0.0), feedback="ef-scaled", value_dtype="fp64")
    sim = SyncSimulator(task, alg, Schedule(lr=0.5), n_workers=4, batch_size="full", gradient_shift="optimum")
    x_star = torch.cat([p.reshape(-1) for p in task.x_star.values()]).clone()
    # away from x*, the shifted gradients differ from the raw ones by the gradient at x* of the
    # same samples, g_i(x) - g_i(x*): check it against a worker-by-worker computation
    rec = sim.step()
    for q, rows in enumerate(sim.data.rows):
        raw = sim._grad(rec.params_before, task.train_x[rows], task.train_y[rows])
        at_star = sim._grad(x_star, task.train_x[rows], task.train_y[rows])
        torch.testing.assert_close(rec.grads[q], raw - at_star, rtol=1e-12, atol=1e-14)
        assert float(at_star.abs().max()) > 1e-6  # the shift is not trivially zero per worker
    sim.w = x_star.clone()
    for _ in range(3):
        rec = sim.step()
        assert float(rec.grads.abs().max()) == 0.0
    assert sim.full_loss() - task.f_star < 1e-12
