"""The asynchronous engine against hand-written delayed SGD, staleness laws and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import Identity, TopK
from gradsparse.engines.async_sim import AsyncSimulator, ComputeLaw, KardamFilter, NetworkLaw
from gradsparse.schedules import Schedule
from gradsparse.staleness import StalenessDampening
from gradsparse.tasks import make_task

ZERO_NETWORK = NetworkLaw(offset=0.0, rate=None)


def linreg():
    return make_task("linreg", n_samples=240, n_features=20, dtype="float64")


def asgd(**kw):
    return Algorithm(compressor=Identity(), feedback="none", topology="ps_uplink", **kw)


def engine(alg=None, n=4, seed=0, task=None, lr=0.05, **kw):
    return AsyncSimulator(task or linreg(), alg or asgd(), Schedule(lr=lr), n_workers=n, batch_size=4, seed=seed, **kw)


def test_round_robin_staleness_is_n_minus_1_and_equals_hand_written_delayed_sgd():
    n, steps = 4, 40
    e = engine(n=n, compute=ComputeLaw("constant", value=1.0), network=ZERO_NETWORK)
    sampler = engine(n=n, compute=ComputeLaw("constant", value=1.0), network=ZERO_NETWORK)  # same batches
    records = [e.step() for _ in range(steps)]
    # warm-up: worker q's first message waits for the q updates before it; then exactly N - 1
    assert [r.staleness for r in records[:n]] == list(range(n))
    assert all(r.staleness == n - 1 for r in records[n:])
    assert [r.worker_id for r in records] == [t % n for t in range(steps)]
    # hand-written delayed SGD: x_{t+1} = x_t - lr g_q(x_{tau_q}), q = t mod N, the message
    # lr g rounded to the wire's fp32 values (feedback none: the rounding error is not kept)
    task = sampler.task
    x = sampler.w.clone()
    models = [x.clone() for _ in range(n)]
    for t in range(steps):
        q = t % n
        rows = sampler.data.sample_worker(q)
        g = sampler._grad(models[q], task.train_x[rows], task.train_y[rows])
        x = x - (0.05 * g).float().double()
        models[q] = x.clone()
    torch.testing.assert_close(e.w, x, rtol=1e-12, atol=1e-14)
    assert e.now == pytest.approx(steps / n + 1 - 1)  # N updates per unit of virtual time


def test_random_delays_mean_staleness_close_to_n_minus_1():
    n = 6
    e = engine(n=n, compute=ComputeLaw("uniform", low=0.9, high=1.1), network=NetworkLaw(offset=0.002, rate=10.0))
    for _ in range(600):
        e.step()
    hist = e.staleness_histogram()
    mean = sum(s * c for s, c in hist) / sum(c for _, c in hist)
    assert abs(mean - (n - 1)) < 0.3


@pytest.mark.parametrize("bound", [0, 2, 5])
def test_staleness_bound_is_never_exceeded_and_nothing_is_lost(bound):
    n = 5
    alg = Algorithm(compressor=TopK(k=3), feedback="memory", topology="ps_uplink")
    e = engine(alg, n=n, compute=ComputeLaw("exponential", value=1.0), staleness_bound=bound)
    stale = [e.step().staleness for _ in range(150)]
    assert max(stale) <= bound
    if bound < n - 1:
        assert e.rejected["staleness_bound"] > 0  # the bound was active


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_same_seed_identical_event_trace(seed, n):
    def trace(alg):
        e = engine(alg, n=n, seed=seed, compute=ComputeLaw("uniform", low=0.5, high=1.5))
        e.record_trace = True
        for _ in range(30):
            e.step()
        return e.trace, e.w

    a, wa = trace(asgd())
    b, wb = trace(asgd())
    assert a == b and torch.equal(wa, wb)
    # another algorithm (top-k with memory, another density): the same delays, the same event order
    c, _ = trace(Algorithm(compressor=TopK(k=2), feedback="memory", topology="ps_uplink"))
    assert c == a


def test_kardam_filter_off_and_no_dampening_equals_asgd_and_dampening_scales_updates():
    kw = dict(n=3, compute=ComputeLaw("constant", value=1.0), network=ZERO_NETWORK)
    plain = engine(**kw)
    kardam = engine(asgd(staleness=StalenessDampening("none")), kardam=KardamFilter(enabled=False), **kw)
    for _ in range(20):
        plain.step(), kardam.step()
    assert torch.equal(plain.w, kardam.w)
    damped = engine(asgd(staleness=StalenessDampening("exponential", 0.2)), **kw)
    undamped = engine(**kw)
    for _ in range(12):
        rd, ru = damped.step(), undamped.step()
        if rd.staleness == ru.staleness == 2 and torch.equal(rd.params_before, ru.params_before):
            torch.testing.assert_close(rd.server.update, math.exp(-0.4) * ru.server.update)
    assert not torch.equal(damped.w, undamped.w)


def test_kardam_filter_rejects_an_outlier():
    e = engine(n=3, compute=ComputeLaw("constant", value=1.0), network=ZERO_NETWORK,
               kardam=KardamFilter(enabled=True, byzantine=1))
    for _ in range(30):
        e.step()
    honest = e.rejected["kardam"]
    assert honest < 30  # honest workers: most messages pass
    # a worker whose gradient is suddenly 1000x larger has a large Lipschitz coefficient
    original = e._worker_gradient

    def byzantine(q):
        g, samples = original(q)
        return (g * 1000.0 if q == 1 else g), samples

    e._worker_gradient = byzantine
    applied = [e.step().worker_id for _ in range(20)]
    assert e.rejected["kardam"] >= honest + 8  # the outlier's messages are refused ...
    assert applied.count(1) <= 2  # ... and hardly any of them reaches the model


def test_memory_with_k_equal_d_equals_asgd():
    kw = dict(n=4, compute=ComputeLaw("uniform", low=0.5, high=1.5))
    # fp64 values: with fp32 ones the two differ by design (memory keeps each rounding error,
    # feedback none loses it)
    a = engine(asgd(value_dtype="fp64"), **kw)
    b = engine(Algorithm(compressor=TopK(k=20), feedback="memory", topology="ps_uplink", value_dtype="fp64"), **kw)
    for _ in range(40):
        a.step(), b.step()
    torch.testing.assert_close(a.w, b.w, rtol=1e-12, atol=1e-14)


def test_memory_invariant_with_in_flight_messages():
    """memory feedback, constant step: x_t - eta sum_q u_q - eta sum_in-flight s = x_0 - eta sum of
    every gradient computed so far (applied, in flight, or kept in a memory)."""
    eta = 0.05
    alg = Algorithm(compressor=TopK(k=3), feedback="memory", topology="ps_uplink")
    e = engine(alg, n=5, lr=eta, compute=ComputeLaw("uniform", low=0.5, high=1.5), network=NetworkLaw(0.1, 2.0))
    x0 = e.w.clone()
    computed = torch.zeros_like(x0)
    original = e._worker_gradient

    def counting(q):
        g, samples = original(q)
        computed.add_(g[0])
        return g, samples

    e._worker_gradient = counting
    for _ in range(60):
        e.step()
        in_flight = sum((f.output.message.to_dense(x0.dtype)[0] for f in e.in_flight.values()), torch.zeros_like(x0))
        memory = e.worker_state.memory.flat.sum(0)
        torch.testing.assert_close(e.w - eta * memory - eta * in_flight, x0 - eta * computed, rtol=1e-10, atol=1e-12)
    assert len(e.in_flight) > 0


def test_checkpoint_at_an_event_resumes_the_uninterrupted_run():
    kw = dict(n=4, compute=ComputeLaw("exponential", value=1.0), staleness_bound=3)
    alg = lambda: Algorithm(compressor=TopK(k=3), feedback="memory", topology="ps_uplink")  # noqa: E731
    a = engine(alg(), **kw)
    for _ in range(25):
        a.step()
    sd = a.state_dict()
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    b = engine(alg(), **kw)
    b.load_state_dict(sd)
    for _ in range(25):
        ra, rb = a.step(), b.step()
        assert (ra.worker_id, ra.staleness, ra.virtual_time) == (rb.worker_id, rb.staleness, rb.virtual_time)
    assert torch.equal(a.w, b.w) and a.ledger == b.ledger
    assert torch.equal(a.worker_state.memory.flat, b.worker_state.memory.flat)


def test_configs_that_cannot_run_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="use topology 'ps_uplink'"):
        engine(Algorithm(compressor=TopK(k=1), topology="bidirectional", down_compressor=TopK(k=1)))
    with pytest.raises(ValueError, match="stagewise"):
        AsyncSimulator(linreg(), asgd(), Schedule(kind="stagewise", lr=0.1, stage_steps=[3]), n_workers=2)
    with pytest.raises(ValueError, match="speeds has 2 entries for 3 workers"):
        engine(n=3, compute=ComputeLaw("constant", speeds=[1.0, 2.0]))


def test_heterogeneous_speeds_make_slow_workers_staler():
    e = engine(n=4, compute=ComputeLaw("constant", value=1.0, speeds=[1.0, 1.0, 1.0, 4.0]), network=ZERO_NETWORK)
    by_worker: dict[int, list[int]] = {}
    for _ in range(120):
        r = e.step()
        by_worker.setdefault(r.worker_id, []).append(r.staleness)
    slow = sum(by_worker[3]) / len(by_worker[3])
    fast = sum(by_worker[0]) / len(by_worker[0])
    assert slow > 3 * fast and len(by_worker[3]) < len(by_worker[0]) / 3
