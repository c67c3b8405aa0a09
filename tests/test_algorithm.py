"""Worker/server steps: invariants and equivalences from ALGORITHMS.md §2, §3, §5."""

import pytest
import torch

from gradsparse import wire
from gradsparse.algorithm import Algorithm, ServerState, WorkerState
from gradsparse.compressors import CompressionContext, HardThreshold, Identity, RandomK, TopK
from gradsparse.feedback import FEEDBACKS, make_feedback
from gradsparse.momentum import GradientMomentum, UpdateMomentum
from gradsparse.segments import Layout, SegmentedTensor
from gradsparse.staleness import StalenessDampening

COMPRESSORS = [TopK(k=3), HardThreshold(0.7), RandomK(k=4, seed=2), RandomK(k=4, seed=2, scale=True), Identity()]
IDS = ["topk", "hard_threshold", "randomk", "randomk_scaled", "identity"]


def grads_stream(n, d, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(steps)]


def memory_of(n, d, flat=None):
    layout = Layout.flat(d)
    return SegmentedTensor(layout, torch.zeros(n, d) if flat is None else flat)


def dense_reference(kind, comp, g, e, lr, ctx):
    """ALGORITHMS.md §2 on dense tensors, written from the formulas: (sent, new memory)."""
    def C(x):
        msg = comp.compress(x, ctx)
        return msg.to_dense(x.dtype), msg.support_mask()

    if kind == "none":
        s, _ = C(lr * g)
        return s, None
    if kind == "ef":
        a = torch.add(e, g, alpha=lr)  # e + lr g (the same rounding as the library: one fused op)
        s, _ = C(a)
        return s, a - s
    if kind == "ef-scaled":
        p = torch.add(e, g, alpha=lr)
        c, m = C(p / lr)
        s = lr * c
        return s, torch.where(m, p - s, p)
    v = e + g  # memory
    s, _ = C(v)
    return s, v - s


@pytest.mark.parametrize("kind", list(FEEDBACKS))
@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_sparse_feedback_equals_dense_formulas(kind, comp):
    """The library's SparseBatch path against a dense re-statement of ALGORITHMS.md §2."""
    fb = make_feedback(kind)
    n, d = 4, 20
    e_ref = torch.zeros(n, d)
    memory = fb.init(Layout.flat(d), n)
    for t, g in enumerate(grads_stream(n, d, 25, dtype=torch.float64)):
        g = g.float()
        ctx = CompressionContext(t, torch.arange(n))
        s_ref, e_ref = dense_reference(kind, comp, g, e_ref, 0.3, ctx)
        out, memory = fb.update(g, memory, lr=0.3, compressor=comp, context=ctx)
        assert torch.equal(out.message.to_dense(), s_ref), (kind, t)
        if e_ref is None:
            assert memory is None
        else:
            assert torch.equal(memory.flat, e_ref), (kind, t)


@pytest.mark.parametrize("kind", ["ef", "memory", "ef-scaled"])
@pytest.mark.parametrize("comp", COMPRESSORS[:4], ids=IDS[:4])
def test_sent_plus_new_memory_equals_accumulated_exactly(kind, comp):
    fb = make_feedback(kind)
    memory = fb.init(Layout.flat(20), 4)
    for t, g in enumerate(grads_stream(4, 20, 30)):
        before = memory.flat.clone()
        out, memory = fb.update(g, memory, lr=0.3, compressor=comp, context=CompressionContext(t))
        acc = out.accumulated_rows(memory.flat)
        # the accumulated vector is e + c g, computed independently here
        assert torch.equal(acc, torch.add(before, g, alpha=fb.accumulation_scale(0.3)))
        sent = out.message.to_dense()
        on = out.message.support_mask()
        assert torch.equal((sent + memory.flat)[~on], acc[~on])
        # on the support: exact zero memory where C keeps values; else the rounding of a - s
        if kind != "ef-scaled" and not getattr(comp, "scale", False):
            assert torch.all(memory.flat[on] == 0)
        torch.testing.assert_close((sent + memory.flat)[on], acc[on], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["ef", "memory", "ef-scaled"])
@pytest.mark.parametrize("comp", [TopK(k=3), HardThreshold(0.7), TopK(k=20)], ids=["topk", "threshold", "topk_all"])
def test_in_place_step_equals_update_one_row_and_many(kind, comp):
    """The in-place entry (fused kernels for one row) gives the out-of-place step's results."""
    fb = make_feedback(kind)
    for n in (1, 3):
        a = fb.init(Layout.flat(20), n)
        b = fb.init(Layout.flat(20), n)
        for t, g in enumerate(grads_stream(n, 20, 15, seed=n)):
            ctx = CompressionContext(t)
            out_a, a = fb.update(g, a, lr=0.2, compressor=comp, context=ctx)
            out_b = fb.step_in_place_(b, g, lr=0.2, compressor=comp, context=ctx)
            assert torch.equal(out_a.message.to_dense(), out_b.message.to_dense()), (n, t)
            assert torch.equal(a.flat, b.flat), (n, t)


def test_ef_equals_ef_scaled_for_topk():
    comp = TopK(k=2)
    e1 = e2 = memory_of(3, 12)
    ef, scaled = make_feedback("ef"), make_feedback("ef-scaled")
    for t, g in enumerate(grads_stream(3, 12, 50)):
        ctx = CompressionContext(t)
        o1, e1 = ef.update(g, e1, lr=0.05, compressor=comp, context=ctx)
        o2, e2 = scaled.update(g, e2, lr=0.05, compressor=comp, context=ctx)
        assert torch.equal(o1.message.support_mask(), o2.message.support_mask())
        torch.testing.assert_close(o1.message.to_dense(), o2.message.to_dense(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(e1.flat, e2.flat, rtol=1e-6, atol=1e-7)


def test_ef_scaled_differs_from_ef_for_hard_threshold():
    comp = HardThreshold(0.5)
    g = torch.full((1, 4), 2.0)
    ctx = CompressionContext(0)
    o1, _ = make_feedback("ef").update(g, memory_of(1, 4), lr=0.1, compressor=comp, context=ctx)  # |0.2| < 0.5
    o2, _ = make_feedback("ef-scaled").update(g, memory_of(1, 4), lr=0.1, compressor=comp, context=ctx)  # |2| >= 0.5
    assert o1.message.nnz == 0
    torch.testing.assert_close(o2.message.to_dense(), torch.full((1, 4), 0.2))


def run_alg(alg, steps, n=3, d=10, lr=lambda t: 0.1, seed=0):
    layout = Layout.flat(d)
    w = torch.zeros(d)
    worker_state, server_state = alg.init_worker_state(layout, n), alg.init_server_state(layout)
    p = torch.full((n,), 1.0 / n)
    traj = []
    for t, g in enumerate(grads_stream(n, d, steps, seed)):
        worker_out = alg.worker_step(g, w, worker_state, step=t, lr=lr(t))
        server_out = alg.server_step(worker_out.message, server_state, step=t, lr=lr(t), weights=p)
        worker_state, server_state = worker_out.state, server_out.state
        w = w - server_out.update
        traj.append(w.clone())
    return traj, worker_state, server_state


def test_memory_equals_ef_under_constant_step_but_not_decaying():
    a = Algorithm(compressor=TopK(k=2), feedback="ef")
    b = Algorithm(compressor=TopK(k=2), feedback="memory")
    ta, wa, _ = run_alg(a, 40)
    tb, wb, _ = run_alg(b, 40)
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.memory.flat, 0.1 * wb.memory.flat, rtol=1e-5, atol=1e-6)
    decay = lambda t: 0.1 / (t + 1)  # noqa: E731
    ta, *_ = run_alg(a, 40, lr=decay)
    tb, *_ = run_alg(b, 40, lr=decay)
    assert (ta[-1] - tb[-1]).abs().max() > 1e-3


def test_one_worker_identity_is_plain_sgd_by_hand():
    alg = Algorithm(compressor=Identity(), feedback="none")
    traj, *_ = run_alg(alg, 5, n=1, d=4)
    w = torch.zeros(4)
    for g, got in zip(grads_stream(1, 4, 5), traj):
        w = w - 0.1 * g[0]
        torch.testing.assert_close(got, w)


def test_bidirectional_with_full_downlink_equals_uplink_only():
    up = Algorithm(compressor=TopK(k=2), feedback="ef", topology="ps_uplink")
    bi = Algorithm(compressor=TopK(k=2), feedback="ef", topology="bidirectional", down_compressor=TopK(k=10))
    tu, *_ = run_alg(up, 30)
    tb, _, sb = run_alg(bi, 30)
    for x, y in zip(tu, tb):
        assert torch.equal(x, y)
    assert torch.count_nonzero(sb.downlink_memory.flat) == 0


def test_bidirectional_server_memory_invariant():
    # G = aggregate + delta_old; update + delta_new == G exactly
    bi = Algorithm(compressor=TopK(k=2), feedback="ef", topology="bidirectional", down_compressor=TopK(k=1))
    layout = Layout.flat(10)
    worker_state, server_state = bi.init_worker_state(layout, 3), bi.init_server_state(layout)
    p = torch.full((3,), 1 / 3)
    for t, g in enumerate(grads_stream(3, 10, 20)):
        worker_out = bi.worker_step(g, torch.zeros(10), worker_state, step=t, lr=0.1)
        server_out = bi.server_step(worker_out.message, server_state, step=t, lr=0.1, weights=p)
        assert torch.equal(server_out.update + server_out.state.downlink_memory.flat, server_out.pre_downlink)
        torch.testing.assert_close(server_out.pre_downlink, p @ worker_out.message.to_dense() + server_state.downlink_memory.flat)
        assert int((server_out.update != 0).sum()) <= 1
        assert server_out.message.nnz == 1 and server_out.nbytes == int(wire.encoded_nbytes(server_out.message)[0])
        worker_state, server_state = worker_out.state, server_out.state


def test_downlink_only_rejects_a_compressed_uplink_or_memory():
    with pytest.raises(ValueError, match="compressor must be identity"):
        Algorithm(compressor=TopK(k=1), feedback="none", topology="downlink_only", down_compressor=TopK(k=1))
    with pytest.raises(ValueError, match="feedback must be 'none'"):
        Algorithm(compressor=Identity(), feedback="ef", topology="downlink_only", down_compressor=TopK(k=1))
    alg = Algorithm(compressor=Identity(), feedback="none", topology="downlink_only", down_compressor=TopK(k=1))
    worker_out = alg.worker_step(torch.ones(2, 5), None, alg.init_worker_state(Layout.flat(5), 2), step=0, lr=0.5)
    torch.testing.assert_close(worker_out.message.to_dense(), torch.full((2, 5), 0.5))
    assert worker_out.message.dense


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_momentum_identity_equals_momentum_sgd_by_hand(nesterov):
    alg = Algorithm(compressor=Identity(), feedback="memory", momentum=UpdateMomentum(beta=0.9, nesterov=nesterov))
    traj, *_ = run_alg(alg, 6, n=2, d=3)
    w, m = torch.zeros(3), torch.zeros(2, 3)
    for g, got in zip(grads_stream(2, 3, 6), traj):
        m = 0.9 * m + g
        direction = g + 0.9 * m if nesterov else m
        w = w - 0.1 * direction.mean(0)
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("nesterov", [False, True])
def test_gradient_momentum_by_hand(nesterov):
    alg = Algorithm(compressor=TopK(k=1), feedback="memory", momentum=GradientMomentum(beta=0.5, nesterov=nesterov))
    traj, _, server_state = run_alg(alg, 8, n=2, d=4)
    w, m, u = torch.zeros(4), torch.zeros(4), torch.zeros(2, 4)
    for g, got in zip(grads_stream(2, 4, 8), traj):
        v = u + g
        s = torch.zeros_like(v)
        for q in range(2):
            i = int(v[q].abs().argmax())
            s[q, i] = v[q, i]
        u = v - s
        agg = s.mean(0)
        m = 0.5 * m + agg
        w = w - 0.1 * (agg + 0.5 * m if nesterov else m)
        torch.testing.assert_close(got, w)
    torch.testing.assert_close(server_state.momentum.flat, m)


def test_ps_uplink_downlink_is_the_aggregate_not_the_momentum_direction():
    """ps_uplink sends G = sum_q p_q s_q; workers apply momentum themselves: the downlink message
    has the aggregate's support (at most N k entries), not that of beta m + G."""
    alg = Algorithm(compressor=TopK(k=1), feedback="ef", topology="ps_uplink", momentum=GradientMomentum(beta=0.9))
    layout = Layout.flat(50)
    worker_state, server_state = alg.init_worker_state(layout, 2), alg.init_server_state(layout)
    p = torch.full((2,), 0.5)
    for t, g in enumerate(grads_stream(2, 50, 10)):
        worker_out = alg.worker_step(g, None, worker_state, step=t, lr=0.1)
        server_out = alg.server_step(worker_out.message, server_state, step=t, lr=0.1, weights=p)
        assert server_out.message.nnz <= 2
        assert torch.equal(server_out.message.to_dense()[0], server_out.aggregate)
        assert server_out.nbytes == int(wire.encoded_nbytes(server_out.message)[0])
        worker_state, server_state = worker_out.state, server_out.state
    assert int((server_out.update != 0).sum()) > 2  # the momentum direction is denser than what was sent


def test_worker_step_returns_exact_wire_sizes():
    alg = Algorithm(compressor=HardThreshold(0.8), feedback="ef", value_dtype="fp16")
    worker_out = alg.worker_step(torch.randn(3, 200, generator=torch.Generator().manual_seed(0)), None,
                         alg.init_worker_state(Layout.flat(200), 3), step=0, lr=1.0)
    assert worker_out.nbytes.tolist() == [len(wire.encode(worker_out.message.row(q), value_dtype="fp16")) for q in range(3)]


def test_momentum_factor_masking_zeroes_transmitted_coordinates():
    alg = Algorithm(compressor=TopK(k=2), feedback="memory", momentum=UpdateMomentum(beta=0.9, masking=True))
    worker_state = alg.init_worker_state(Layout.flat(8), 3)
    for t, g in enumerate(grads_stream(3, 8, 5)):
        worker_out = alg.worker_step(g, torch.zeros(8), worker_state, step=t, lr=0.1)
        on = worker_out.message.support_mask()
        assert torch.all(worker_out.state.momentum.flat[on] == 0)
        assert torch.all(worker_out.state.memory.flat[on] == 0)
        assert torch.count_nonzero(worker_out.state.momentum.flat[~on]) == int((~on).sum())
        worker_state = worker_out.state


def test_weight_decay_added_before_compression():
    alg = Algorithm(compressor=Identity(), feedback="none", weight_decay=0.5)
    w = torch.tensor([2.0, -4.0])
    worker_out = alg.worker_step(torch.zeros(1, 2), w, alg.init_worker_state(Layout.flat(2), 1), step=0, lr=1.0)
    torch.testing.assert_close(worker_out.message.to_dense()[0], torch.tensor([1.0, -2.0]))


def test_worker_weights_and_staleness_dampening_are_used():
    alg = Algorithm(compressor=Identity(), feedback="none", staleness=StalenessDampening("exponential", 0.5))
    msg = Identity().compress(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    st = alg.init_server_state(Layout.flat(2))
    server_out = alg.server_step(msg, st, step=5, lr=1.0, weights=torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(server_out.update, torch.tensor([0.25, 0.75]))
    # versions 5 and 3 at server step 5: staleness 0 and 2 -> factors 1 and e^{-1}
    server_out = alg.server_step(msg, st, step=5, lr=1.0, weights=torch.tensor([0.25, 0.75]), versions=torch.tensor([5, 3]))
    torch.testing.assert_close(server_out.update, torch.tensor([0.25, 0.75 * torch.exp(torch.tensor(-1.0)).item()]))
    density = StalenessDampening("exponential_density", 0.2).factor(torch.tensor([0, 1]))
    torch.testing.assert_close(density, torch.tensor([0.2, 0.2 * torch.exp(torch.tensor(-0.2)).item()], dtype=torch.float64))
    assert StalenessDampening("inverse").factor(torch.tensor([3])).item() == 0.25
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        alg.server_step(msg, st, step=1, lr=1.0, weights=torch.ones(2), versions=torch.tensor([2, 0]))


def test_state_dict_round_trip_and_clear_mismatch_errors():
    alg = Algorithm(compressor=TopK(k=2), feedback="ef", momentum=UpdateMomentum(beta=0.9),
                    topology="bidirectional", down_compressor=TopK(k=3))
    layout = Layout(("a", "b"), ((2, 3), (4,)))
    _, worker_state, server_state = None, alg.init_worker_state(layout, 10), alg.init_server_state(layout)
    worker_state.memory.flat.normal_()
    server_state.downlink_memory.flat.normal_()
    sd = alg.state_dict(worker_state, server_state, layout=layout, n_workers=10)
    assert set(sd["worker"]["memory"]) == {"a", "b"} and sd["worker"]["memory"]["a"].shape == (10, 6)
    w2, s2 = alg.load_state_dict(sd, layout=layout, n_workers=10)
    assert torch.equal(w2.memory.flat, worker_state.memory.flat) and torch.equal(s2.downlink_memory.flat, server_state.downlink_memory.flat)
    with pytest.raises(ValueError, match="state of 10 workers, this run has 8"):
        alg.load_state_dict(sd, layout=layout, n_workers=8)
    none = Algorithm(compressor=TopK(k=2), feedback="none", momentum=UpdateMomentum(beta=0.9),
                     topology="bidirectional", down_compressor=TopK(k=3))
    with pytest.raises(ValueError, match="feedback 'ef', this run has 'none'"):
        none.load_state_dict(sd, layout=layout, n_workers=10)
    with pytest.raises(ValueError, match="do not match this model"):
        alg.load_state_dict(sd, layout=Layout(("a", "c"), ((2, 3), (4,))), n_workers=10)


def test_bad_algorithm_options_are_named():
    with pytest.raises(ValueError, match="unknown error feedback 'efx'"):
        Algorithm(feedback="efx")
    with pytest.raises(ValueError, match="unknown topology 'ring'"):
        Algorithm(topology="ring")
    with pytest.raises(ValueError, match="needs a downlink compressor"):
        Algorithm(topology="bidirectional")
    with pytest.raises(ValueError, match="beta"):
        UpdateMomentum(beta=1.5)
    with pytest.raises(ValueError, match="masking applies to momentum 'update' only"):
        GradientMomentum(beta=0.5, masking=True)
    with pytest.raises(ValueError, match="in-place worker step does not apply"):
        Algorithm(compressor=TopK(k=1), feedback="none").worker_step_in_place(
            None, WorkerState(), step=0, lr=0.1
        )
    assert ServerState().momentum is None


class BytesSpentTopK(TopK):
    """A stateful compressor for the test: keeps each worker's bytes sent so far, and sends one
    entry fewer per row once a worker has spent more than 200 bytes."""

    def init_state(self, layout, n):
        return {"bytes_spent": torch.zeros(n, dtype=torch.long)}

    def for_step(self, state, context):
        return TopK(k=self.k - 1) if bool((state["bytes_spent"] > 200).all()) else self

    def observe(self, state, message, nbytes, context):
        return {"bytes_spent": state["bytes_spent"] + nbytes}


def test_stateful_compressor_state_is_kept_per_worker_and_checkpointed():
    from gradsparse.engines import ENGINES
    from gradsparse.schedules import Schedule
    from gradsparse.tasks import make_task

    task = make_task("linreg", n_samples=200, n_features=30)
    engines = {}
    for name in ("sync", "loop"):
        alg = Algorithm(compressor=BytesSpentTopK(k=4), feedback="ef")
        e = ENGINES[name](task, alg, Schedule(lr=0.01), n_workers=3, batch_size=4)
        counts = [e.step().worker.message.counts.tolist() for _ in range(12)]
        engines[name] = e
        # the state saw every message: it equals the bytes each worker sent
        assert int(e.worker_state.compressor["bytes_spent"].sum()) == e.ledger.uplink_bytes
        assert counts[0] == [4, 4, 4] and counts[-1] == [3, 3, 3]  # the state changed what was sent
    assert torch.equal(engines["sync"].worker_state.compressor["bytes_spent"],
                       engines["loop"].worker_state.compressor["bytes_spent"])
    sd = engines["sync"].state_dict()
    engines["loop"].load_state_dict(sd)
    assert torch.equal(engines["loop"].worker_state.compressor["bytes_spent"],
                       engines["sync"].worker_state.compressor["bytes_spent"])
    sd["algorithm"]["worker"]["compressor"] = None
    with pytest.raises(ValueError, match="whether the uplink compressor keeps state"):
        engines["loop"].load_state_dict(sd)


@pytest.mark.parametrize("kind", ["sparse", "ragged", "dense"])
def test_weighted_sum_into_a_given_buffer_equals_the_allocating_sum_by_hand(kind):
    from gradsparse.messages import SparseBatch

    rows = torch.tensor([[0.0, 2.0, 0.0, -1.0], [3.0, 0.0, 0.0, 4.0]])
    if kind == "dense":
        batch = SparseBatch.from_dense(rows)
    elif kind == "sparse":
        batch = TopK(k=2).compress(rows)
    else:
        batch = HardThreshold(2.5).compress(rows)  # rows keep 0 and 2 entries
    w = torch.tensor([0.25, 0.5])
    expected = {"dense": [1.5, 0.5, 0.0, 1.75], "sparse": [1.5, 0.5, 0.0, 1.75], "ragged": [1.5, 0.0, 0.0, 2.0]}[kind]
    out = torch.full((4,), 99.0)  # stale contents must not leak into the sum
    got = batch.weighted_sum(w, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert out.tolist() == expected == batch.weighted_sum(w).tolist()
    with pytest.raises(ValueError, match="out must be"):
        batch.weighted_sum(w, out=torch.zeros(5))
    with pytest.raises(ValueError, match="out must be"):
        batch.weighted_sum(w, out=torch.zeros(4, dtype=torch.float64))



@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 0.0], True),
    ([3e38, 3e38, -1.0], True),  # the sum overflows to inf: the exact check must still say finite
    ([-3e38, -3e38], True),
    ([1.0, float("inf")], False),
    ([float("-inf"), 2.0], False),
    ([float("inf"), float("-inf")], False),  # the sum is NaN
    ([1.0, float("nan")], False),
    ([], True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_is_the_entrywise_check(values, finite, dtype):
    from gradsparse.divergence import all_finite

    x = torch.tensor(values, dtype=dtype)
    assert all_finite(x) is finite
    assert all_finite(x.reshape(1, -1)) is finite


def test_all_finite_on_half_precision():
    from gradsparse.divergence import all_finite

    big = torch.full((8,), 6e4, dtype=torch.float16)  # finite halves whose fp16 sum would overflow
    assert all_finite(big)
    big[3] = float("nan")
    assert not all_finite(big)
