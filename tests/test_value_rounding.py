"""Values as sent: every engine's messages carry what a receiver decodes from the wire.

With ``value_dtype`` fp16 / bf16 (or fp32 values of a float64 model) the algorithm rounds each
message's values to that dtype; error feedback keeps what rounding took off, the downlink memory
likewise, and ``ps_uplink`` applies the aggregate as the workers decode it. So the bytes a run is
charged and the values it computes with are the same frames a real transport sends.
"""

from __future__ import annotations

import pytest
import torch

from gradsparse import wire
from gradsparse.algorithm import Algorithm
from gradsparse.compressors import Identity, TopK
from gradsparse.engines import SyncSimulator
from gradsparse.schedules import Schedule
from gradsparse.segments import Layout
from gradsparse.tasks import make_task

FP16_MAX = 65504.0


def test_round_values_by_hand():
    x = torch.tensor([1.0 + 2.0 ** -12, 70000.0, -1e9, float("inf"), float("nan"), 2.0 ** -30], dtype=torch.float64)
    got = wire.round_values(x, "fp16")
    # 1 + 2^-12 rounds to 1 (ties to even below half an ulp of 2^-10); beyond 65504 saturates
    # (a finite value never arrives as inf); inf and NaN pass; 2^-30 underflows to 0 in fp16
    assert got[:4].tolist() == [1.0, FP16_MAX, -FP16_MAX, float("inf")]
    assert torch.isnan(got[4]) and got[5] == 0.0
    assert wire.round_values(x, "bf16")[0] == 1.0 and wire.round_values(x, "bf16")[1] == 70144.0
    assert wire.round_values(x, "fp64") is x
    f32 = torch.randn(50)
    assert wire.round_values(f32, "fp32") is f32 and wire.round_values(f32, "fp64") is f32
    torch.testing.assert_close(wire.round_values(x, "fp32"), x.float().double(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("in_place", [False, True])
def test_worker_step_sends_decodable_values_and_keeps_the_rounding_error(value_dtype, in_place):
    """Top-k 3 of a = e + lr g by hand: the message's values are a[S] rounded (saturated where
    beyond the dtype), decode(encode(message)) gives them bit for bit, and the memory is
    a - sent exactly (the fused in-place kernel and the out-of-place step agree)."""
    g = torch.tensor([[0.1234567, -3.3333333, 9.87654321e5, 0.5, -2.7182818, 1e-3]])
    e = torch.tensor([[0.0, 0.1, 0.0, -0.25, 0.0, 0.0]])
    alg = Algorithm(compressor=TopK(k=3), feedback="ef", value_dtype=value_dtype)
    layout = Layout.flat(6)
    state = alg.init_worker_state(layout, 1)
    state.memory.flat.copy_(e)
    lr = 0.1
    a = e + lr * g
    if in_place:
        out = alg.worker_step_in_place(g, state, step=0, lr=lr)
        memory = state.memory.flat
    else:
        out = alg.worker_step(g, None, state, step=0, lr=lr)
        memory = out.state.memory.flat
    support = sorted(torch.topk(a.abs()[0], 3).indices.tolist())
    assert sorted(out.message.indices.tolist()) == support == [1, 2, 4]
    dt = wire.value_dtype_of(value_dtype)
    want = {i: float(min(max(a[0, i].item(), -torch.finfo(dt).max), torch.finfo(dt).max)) for i in support}
    want = {i: float(torch.tensor(v).to(dt).float()) for i, v in want.items()}
    got = dict(zip(out.message.indices.tolist(), out.message.values.tolist()))
    assert got == want
    assert got[2] == (FP16_MAX if value_dtype == "fp16" else float(torch.tensor(98765.4321).to(torch.bfloat16)))
    decoded = wire.decode(wire.encode(out.message, value_dtype=value_dtype))
    assert torch.equal(decoded.values.float(), out.message.values)
    # sent + new memory == accumulated, exactly (a - round(a) is exact by Sterbenz's lemma;
    # the saturated entry keeps its excess in the memory)
    accumulated = out.accumulated()
    torch.testing.assert_close(accumulated, a, rtol=1e-7, atol=0)
    torch.testing.assert_close(memory + out.message.to_dense(), accumulated, rtol=0, atol=0)
    assert float(memory[0, 2]) == float(accumulated[0, 2]) - got[2] != 0.0
    assert int(out.nbytes[0]) == len(wire.encode(out.message, value_dtype=value_dtype))


def test_fp32_values_of_a_float64_model_are_rounded_and_fp64_keeps_them():
    g = torch.tensor([[1.0 / 3.0, 2.0 / 3.0]], dtype=torch.float64)
    for value_dtype, exact in (("fp32", False), ("fp64", True)):
        alg = Algorithm(compressor=Identity(), feedback="ef", value_dtype=value_dtype)
        state = alg.init_worker_state(Layout.flat(2), 1, torch.float64)
        out = alg.worker_step(g, None, state, step=0, lr=1.0)
        assert torch.equal(out.message.values, g[0]) == exact
        assert torch.equal(out.message.values, g[0].float().double()) != exact
        assert torch.equal(out.message.values + out.state.memory.flat[0], g[0])
        assert int(out.nbytes[0]) == wire.dense_nbytes(2, 8 if exact else 4)


def test_bidirectional_downlink_sends_rounded_values_and_keeps_the_error():
    alg = Algorithm(compressor=Identity(), feedback="none", topology="bidirectional",
                    down_compressor=TopK(k=2), value_dtype="fp16")
    layout = Layout.flat(4)
    server = alg.init_server_state(layout)
    msg = alg.worker_step(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 70000.0]]), None,
                          alg.init_worker_state(layout, 2), step=0, lr=1.0).message
    srv = alg.server_step(msg, server, step=0, lr=1.0, weights=torch.tensor([0.5, 0.5]))
    sent = srv.message.values
    assert torch.equal(sent, sent.half().float())
    G = srv.pre_downlink
    # the applied update is the decoded message; delta holds G - update exactly
    assert torch.equal(srv.update, srv.message.to_dense()[0])
    assert torch.equal(srv.state.downlink_memory.flat + srv.update, G)


def test_ps_uplink_applies_the_aggregate_the_workers_decode():
    alg = Algorithm(compressor=Identity(), feedback="none", topology="ps_uplink", value_dtype="bf16")
    layout = Layout.flat(3)
    msg = alg.worker_step(torch.tensor([[1.0, 2.0, 3.0], [0.001, 0.002, 0.7]]), None,
                          alg.init_worker_state(layout, 2), step=0, lr=1.0).message
    srv = alg.server_step(msg, alg.init_server_state(layout), step=0, lr=1.0, weights=torch.tensor([0.5, 0.5]))
    decoded = wire.decode(wire.encode(srv.message, value_dtype="bf16")).to_dense(torch.float32)[0]
    assert torch.equal(srv.update, decoded) and torch.equal(srv.aggregate, decoded)
    exact = 0.5 * (msg.to_dense()[0] + msg.to_dense()[1])
    assert not torch.equal(exact, decoded)  # bf16 rounding really changed something here


def test_fp16_run_computes_with_what_it_is_charged_for():
    """Paper 003's toy, bidirectional top-1: an fp16 run is charged 2-byte values and computes
    with values rounded to fp16, so it ends elsewhere than the fp32 run (error feedback keeps
    the rounding errors, so it still converges: compare the README's fp16 figure)."""
    def run(value_dtype):
        task = make_task("toy_quadratic", dtype="float64")
        alg = Algorithm(compressor=TopK(k=1), feedback="ef", topology="bidirectional", down_compressor=TopK(k=1),
                        value_dtype=value_dtype)
        sim = SyncSimulator(task, alg, Schedule(lr=0.01), n_workers=3, batch_size="full")
        for _ in range(200):
            rec = sim.step()
            assert torch.equal(rec.worker.message.values, wire.round_values(rec.worker.message.values, value_dtype))
            assert torch.equal(rec.server.message.values, wire.round_values(rec.server.message.values, value_dtype))
        return sim.full_loss() - task.f_star, sim.ledger
    f16, ledger16 = run("fp16")
    f32, ledger32 = run("fp32")
    f64, ledger64 = run("fp64")
    assert ledger32.uplink_bytes - ledger16.uplink_bytes == 200 * 3 * 2  # one value per message, 2 bytes less
    assert ledger64.uplink_bytes - ledger32.uplink_bytes == 200 * 3 * 4
    assert abs(f16 - f32) > 1e-3 and abs(f32 - f64) < 1e-4
