"""Grouped per-worker gradients and the in-place error-feedback memory of the simulator.

The grouped path (one forward/backward over all workers' samples, one batched outer-product sum
per Linear layer) must give the same gradients as ``vmap(grad)``, and the fused step
(e <- e + c g written by the kernel, then compressed in place) the same trajectory as the plain
worker step.
"""

import pytest
import torch
import torch.nn.functional as F

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import TopK
from gradsparse.momentum import GradientMomentum, UpdateMomentum
from gradsparse.engines.sync_sim import SyncSimulator
from gradsparse.schedules import Schedule
from gradsparse.tasks import make_task
from gradsparse.tasks.base import Task

# ---- gradient paths --------------------------------------------------------------------------


def _sim(task, gradient_path="auto", **kw):
    alg = kw.pop("alg", None) or Algorithm(compressor=TopK(density=0.01), feedback="ef")
    kw.setdefault("n_workers", 7)
    kw.setdefault("batch_size", 4)
    return SyncSimulator(task, alg, Schedule(lr=0.1), gradient_path=gradient_path, **kw)


def test_grouped_gradients_equal_vmap_on_a_deeper_mlp():
    task = make_task("digits_mlp", hidden=[32, 16])
    sim = _sim(task)
    assert sim.gradient_path == "grouped"
    idx = sim.data.sample()
    x, y = task.train_x[idx], task.train_y[idx]
    g_grouped = sim._vgrad_grouped(sim.w, x, y)
    g_vmap = sim._vgrad_vmap(sim.w, x, y)
    g_loop = torch.stack([sim._grad(sim.w, task.train_x[i], task.train_y[i]) for i in idx])
    torch.testing.assert_close(g_grouped, g_vmap, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_grouped, g_loop, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_factors_write_accumulate_and_weighted_sum(dtype):
    task = make_task("digits_mlp", hidden=[16])
    if dtype == "float64":
        task.train_x = task.train_x.double()
    sim = _sim(task, gradient_path="grouped")
    w = sim.w.to(task.train_x.dtype)
    idx = sim.data.sample()
    x, y = task.train_x[idx], task.train_y[idx]
    params = {k: v.to(x.dtype) for k, v in sim.layout.unflatten(w).items()}
    factors = sim._grouped.factors(params, x, y)
    G = factors.dense(sim.d, x.dtype)
    torch.testing.assert_close(G, sim._vgrad_vmap(w, x, y).to(x.dtype), rtol=1e-4, atol=1e-6)
    e = torch.randn(7, sim.d, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(factors.write_into(e.clone(), alpha=-0.3, accumulate=True), e - 0.3 * G)
    torch.testing.assert_close(factors.write_into(e.clone(), alpha=2.0), 2.0 * G)
    p = torch.rand(7, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(factors.weighted_sum(p, sim.d), p @ G)


def test_auto_gradient_path_choice_and_errors():
    assert _sim(make_task("digits_mlp")).gradient_path == "grouped"
    assert _sim(make_task("digits_cnn")).gradient_path == "vmap"  # convolutions: vmap
    assert _sim(make_task("digits_mlp"), "vmap").gradient_path == "vmap"
    logreg = make_task("logreg", dataset="breast_cancer")
    assert _sim(logreg).gradient_path == "vmap"  # no module
    with pytest.raises(ValueError, match="gradient_path 'grouped' needs .*'logreg'"):
        _sim(logreg, "grouped")
    with pytest.raises(ValueError, match=r"gradient_path must be one of \['auto', 'vmap', 'grouped'\], got 'fast'"):
        _sim(make_task("digits_mlp"), "fast")


def test_auto_falls_back_to_vmap_when_the_loss_couples_samples():
    base = make_task("digits_mlp", hidden=16)

    def coupled_loss(params, x, y):  # not a mean of per-sample losses: the batch mean enters
        logits = base.predict(params, x)
        return F.cross_entropy(logits, y) + (logits - logits.mean(0)).square().mean()

    task = Task(
        name="coupled", init_params=base.init_params, loss=coupled_loss, train_x=base.train_x,
        train_y=base.train_y, predict=base.predict, module=base.module,
    )
    sim = _sim(task)
    assert sim.gradient_path == "vmap"
    # forcing the grouped path would give different (wrong) gradients: the probe is what saves us
    forced = _sim(task, "grouped")
    idx = forced.data.sample()
    x, y = task.train_x[idx], task.train_y[idx]
    assert (forced._vgrad_grouped(forced.w, x, y) - forced._vgrad_vmap(forced.w, x, y)).abs().max() > 1e-4


# ---- fused error-feedback memory ---------------------------------------------------------------


@pytest.mark.parametrize(
    "alg_kw",
    [
        dict(feedback="ef"),
        dict(feedback="memory"),
        dict(feedback="ef-scaled"),
        dict(feedback="ef", momentum=GradientMomentum(beta=0.9)),
    ],
)
def test_in_place_memory_follows_the_plain_worker_step(alg_kw):
    task = make_task("digits_mlp")

    def sim(in_place):
        alg = Algorithm(compressor=TopK(density=0.02), **alg_kw)
        return _sim(task, alg=alg, seed=3, in_place_memory=in_place)

    fused, plain = sim(True), sim(False)
    assert fused.uses_in_place_memory and not plain.uses_in_place_memory
    for _ in range(12):
        rf, rp = fused.step(), plain.step()
        torch.testing.assert_close(rf.grads, rp.grads, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fused.worker_state.memory.flat, plain.worker_state.memory.flat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.w, plain.w, rtol=1e-4, atol=1e-6)
    assert fused.ledger == plain.ledger


def test_in_place_memory_invariant_and_stale_accumulated_is_refused():
    task = make_task("digits_mlp")
    sim = _sim(task, seed=1)
    assert sim.uses_in_place_memory
    e_before = sim.worker_state.memory.flat.clone()
    rec = sim.step()
    # sent + new memory == accumulated, exactly; accumulated == e + lr * g (up to rounding)
    assert torch.equal(rec.worker.message.to_dense() + sim.worker_state.memory.flat, rec.accumulated())
    torch.testing.assert_close(rec.accumulated(), e_before + rec.lr * rec.grads, rtol=1e-5, atol=1e-7)
    # sum_q p_q g_q from the factors equals the weighted sum of the dense gradients
    torch.testing.assert_close(rec.weighted_grad(sim.weights), sim.weights @ rec.grads, rtol=1e-5, atol=1e-7)
    old = sim.step()
    sim.step()  # overwrites the memory old.worker would need
    with pytest.raises(RuntimeError, match="accumulated vectors of step 1 are gone"):
        old.accumulated()
    assert old.grads.shape == (7, sim.d)  # gradients stay available: they are kept factored


def test_fused_path_is_off_where_it_does_not_apply():
    task = make_task("digits_mlp")
    for alg in (
        Algorithm(compressor=TopK(density=0.02), feedback="ef", weight_decay=1e-3),
        Algorithm(compressor=TopK(density=0.02), feedback="ef", momentum=UpdateMomentum(beta=0.5)),
        Algorithm(compressor=TopK(density=0.02), feedback="none"),
    ):
        assert not _sim(task, alg=alg).uses_in_place_memory


@pytest.mark.parametrize("alg_kw", [dict(weight_decay=1e-3), dict(momentum=UpdateMomentum(beta=0.5)),
                                    dict(on_nonfinite="skip")])
def test_factors_handed_to_an_out_of_place_step_are_expanded_to_the_same_trajectory(alg_kw):
    """The simulator hands the worker entry its gradient factors whatever the algorithm; where the
    in-place step does not apply, the entry expands them and takes the out-of-place step: the same
    parameters, memories and bytes as the dense-gradient path, step for step."""
    task = make_task("digits_mlp")

    def sim(in_place):
        alg = Algorithm(compressor=TopK(density=0.02), feedback="ef", **alg_kw)
        return _sim(task, alg=alg, seed=5, in_place_memory=in_place)

    factored, dense = sim(True), sim(False)
    assert factored.hands_factors and not dense.hands_factors and not factored.uses_in_place_memory
    for _ in range(6):
        rf, rd = factored.step(), dense.step()
        assert not rf.worker.in_place
        torch.testing.assert_close(rf.grads, rd.grads, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(factored.worker_state.memory.flat, dense.worker_state.memory.flat, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factored.w, dense.w, rtol=1e-5, atol=1e-7)
    assert factored.ledger == dense.ledger
