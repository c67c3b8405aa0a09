"""Worker/server steps: invariants and equivalences from ALGORITHMS.md §2, §3, §5."""

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import HardThreshold, Identity, RandomK, TopK
from gradsparse.feedback import feedback_step


def grads_stream(n, d, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("kind", ["ef", "memory", "ef-scaled"])
@pytest.mark.parametrize("comp", [TopK(k=3), HardThreshold(0.7), RandomK(k=4, seed=2)], ids=lambda c: c.name)
def test_sent_plus_new_memory_equals_accumulated_exactly(kind, comp):
    e = torch.zeros(4, 20)
    for t, g in enumerate(grads_stream(4, 20, 30)):
        s, m, e_new, acc = feedback_step(kind, comp, g, e, 0.3, t, torch.arange(4))
        assert torch.equal(s + e_new, acc), (kind, comp.name, t)
        # memory is zero where something was sent (ef-scaled: up to the rounding of
        # gamma * (p / gamma), which the memory keeps, so the identity above stays exact)
        if kind == "ef-scaled":
            assert torch.all(e_new[m].abs() <= 1e-6 * acc[m].abs())
        elif comp.name != "randomk" or not comp.scale:
            assert torch.all(e_new[m] == 0)
        e = e_new


def test_ef_equals_ef_scaled_for_topk():
    comp = TopK(k=2)
    e1 = e2 = torch.zeros(3, 12)
    for t, g in enumerate(grads_stream(3, 12, 50)):
        s1, m1, e1, _ = feedback_step("ef", comp, g, e1, 0.05, t)
        s2, m2, e2, _ = feedback_step("ef-scaled", comp, g, e2, 0.05, t)
        assert torch.equal(m1, m2)
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(e1, e2, rtol=1e-6, atol=1e-7)


def test_ef_scaled_differs_from_ef_for_hard_threshold():
    comp = HardThreshold(0.5)
    g = torch.full((1, 4), 2.0)
    s1, *_ = feedback_step("ef", comp, g, torch.zeros(1, 4), 0.1, 0)  # |0.2| < 0.5: nothing sent
    s2, *_ = feedback_step("ef-scaled", comp, g, torch.zeros(1, 4), 0.1, 0)  # |2| >= 0.5: sent
    assert torch.count_nonzero(s1) == 0
    torch.testing.assert_close(s2, torch.full((1, 4), 0.2))


def run_alg(alg, steps, n=3, d=10, lr=lambda t: 0.1, seed=0):
    w = torch.zeros(d)
    ws, ss = alg.init_worker_state(n, d), alg.init_server_state(d)
    p = torch.full((n,), 1.0 / n)
    traj = []
    for t, g in enumerate(grads_stream(n, d, steps, seed)):
        wo = alg.worker_step(g, w, ws, t, lr(t))
        so = alg.server_step(wo.sent, p, ss, t, lr(t))
        ws, ss = wo.state, so.state
        w = w - so.update
        traj.append(w.clone())
    return traj, ws, ss


def test_memory_equals_ef_under_constant_step_but_not_decaying():
    a = Algorithm(compressor=TopK(k=2), feedback="ef")
    b = Algorithm(compressor=TopK(k=2), feedback="memory")
    ta, wa, _ = run_alg(a, 40)
    tb, wb, _ = run_alg(b, 40)
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa["e"], 0.1 * wb["e"], rtol=1e-5, atol=1e-6)
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
    assert torch.count_nonzero(sb["delta"]) == 0


def test_bidirectional_server_memory_invariant():
    # G = aggregate + delta_old; update + delta_new == G exactly
    bi = Algorithm(compressor=TopK(k=2), feedback="ef", topology="bidirectional", down_compressor=TopK(k=1))
    ws, ss = bi.init_worker_state(3, 10), bi.init_server_state(10)
    p = torch.full((3,), 1 / 3)
    for t, g in enumerate(grads_stream(3, 10, 20)):
        wo = bi.worker_step(g, torch.zeros(10), ws, t, 0.1)
        so = bi.server_step(wo.sent, p, ss, t, 0.1)
        assert torch.equal(so.update + so.state["delta"], so.pre_downlink)
        torch.testing.assert_close(so.pre_downlink, p @ wo.sent + ss["delta"])
        assert int((so.update != 0).sum()) <= 1
        ws, ss = wo.state, so.state


def test_downlink_only_forces_uncompressed_uplink():
    alg = Algorithm(compressor=TopK(k=1), feedback="ef", topology="downlink_only", down_compressor=TopK(k=1))
    assert alg.compressor.name == "identity" and alg.feedback == "none"
    wo = alg.worker_step(torch.ones(2, 5), torch.zeros(5), alg.init_worker_state(2, 5), 0, 0.5)
    torch.testing.assert_close(wo.sent, torch.full((2, 5), 0.5))


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_momentum_identity_equals_momentum_sgd_by_hand(nesterov):
    alg = Algorithm(compressor=Identity(), feedback="memory", momentum="update", beta=0.9, nesterov=nesterov)
    traj, *_ = run_alg(alg, 6, n=2, d=3)
    w, m = torch.zeros(3), torch.zeros(2, 3)
    for g, got in zip(grads_stream(2, 3, 6), traj):
        m = 0.9 * m + g
        direction = g + 0.9 * m if nesterov else m
        w = w - 0.1 * direction.mean(0)
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("nesterov", [False, True])
def test_gradient_momentum_by_hand(nesterov):
    alg = Algorithm(compressor=TopK(k=1), feedback="memory", momentum="gradient", beta=0.5, nesterov=nesterov)
    traj, _, ss = run_alg(alg, 8, n=2, d=4)
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
    torch.testing.assert_close(ss["m"], m)


def test_momentum_factor_masking_zeroes_transmitted_coordinates():
    alg = Algorithm(compressor=TopK(k=2), feedback="memory", momentum="update", beta=0.9, masking=True)
    ws = alg.init_worker_state(3, 8)
    for t, g in enumerate(grads_stream(3, 8, 5)):
        wo = alg.worker_step(g, torch.zeros(8), ws, t, 0.1)
        assert torch.all(wo.state["m"][wo.support] == 0)
        assert torch.all(wo.state["e"][wo.support] == 0)
        ws = wo.state


def test_weight_decay_added_before_compression():
    alg = Algorithm(compressor=Identity(), feedback="none", weight_decay=0.5)
    w = torch.tensor([2.0, -4.0])
    wo = alg.worker_step(torch.zeros(1, 2), w, alg.init_worker_state(1, 2), 0, 1.0)
    torch.testing.assert_close(wo.sent[0], torch.tensor([1.0, -2.0]))


def test_worker_weights_are_used():
    alg = Algorithm(compressor=Identity(), feedback="none")
    sent = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    so = alg.server_step(sent, torch.tensor([0.25, 0.75]), {}, 0, 1.0)
    torch.testing.assert_close(so.update, torch.tensor([0.25, 0.75]))


def test_bad_algorithm_options_are_named():
    with pytest.raises(ValueError, match="unknown error feedback 'efx'"):
        Algorithm(feedback="efx")
    with pytest.raises(ValueError, match="unknown topology 'ring'"):
        Algorithm(topology="ring")
    with pytest.raises(ValueError, match="needs a downlink compressor"):
        Algorithm(topology="bidirectional")
    with pytest.raises(ValueError, match="beta"):
        Algorithm(momentum="update", beta=1.5)
