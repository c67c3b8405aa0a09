"""The collectives' ownership plan, their byte rules, and the simulator run by each collective
(gradsparse.comm.collectives; the real transports are tested in tests/test_ddp.py,
tests/test_torch_engine.py and tests/test_network.py)."""

from __future__ import annotations

import pytest
import torch

from gradsparse import wire
from gradsparse.algorithm import Algorithm
from gradsparse.comm import SimulatedRounds
from gradsparse.comm.collectives import (
    SIZE_RECORD_NBYTES, SPLIT_RECORD_NBYTES, ShardPlan, allgather_traffic, allreduce_traffic, collective_traffic,
    ring_all_reduce_nbytes, sharded_traffic)
from gradsparse.compressors import CompressionContext, RandomK, TopK, k_from_density
from gradsparse.config import load_config
from gradsparse.engines.synchronous import configure_collective
from gradsparse.experiments.build import build_engine
from gradsparse.messages import SparseBatch
from gradsparse.segments import Layout
from gradsparse.topology import make_topology


def test_plan_owns_contiguous_slices_of_every_segment():
    # segments of 5 and 3 over 2 ranks: owner 0 holds [0, 2) and [5, 6); owner 1 [2, 5) and [6, 8)
    plan = ShardPlan([5, 3], 2)
    assert plan.owner_sizes == [3, 5]
    assert plan.pieces_of(0) == [(0, 2, 0), (5, 1, 2)]
    assert plan.pieces_of(1) == [(2, 3, 0), (6, 2, 3)]
    owner, local = plan.owner_of(torch.arange(8))
    assert owner.tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    assert local.tolist() == [0, 1, 0, 1, 2, 2, 3, 4]
    for o in range(2):
        assert plan.to_global(o, local[owner == o]).tolist() == torch.arange(8)[owner == o].tolist()
    # a segment smaller than P: the first owners' slices are empty, the entry goes to the last
    small = ShardPlan([1, 4], 3)
    assert small.owner_of(torch.tensor([0]))[0].tolist() == [2]
    assert small.owner_sizes == [1, 1, 3] and sum(small.owner_sizes) == 5
    assert small.piece_layout().sizes == (0, 0, 1, 1, 1, 2)


def test_split_keeps_every_entry_once_and_in_order():
    g = torch.Generator().manual_seed(0)
    plan = ShardPlan([37, 1, 100, 12], 5)
    idx = torch.sort(torch.randperm(150, generator=g)[:60]).values
    vals = torch.randn(60, generator=g)
    parts = plan.split(idx, vals)
    back_idx = torch.cat([plan.to_global(o, i) for o, (i, _) in enumerate(parts)])
    back_vals = torch.cat([v for _, v in parts])
    order = torch.argsort(back_idx)
    assert torch.equal(back_idx[order], idx) and torch.equal(back_vals[order], vals)
    for o, (i, _) in enumerate(parts):
        assert bool((i[1:] > i[:-1]).all()) and (i.numel() == 0 or int(i.max()) < plan.owner_sizes[o])


def test_traffic_rules_by_hand():
    ag = allgather_traffic([100, 50, 0])
    assert ag.sent == [2 * (100 + 16), 2 * (50 + 16), 2 * 16]
    assert (ag.uplink_bytes, ag.downlink_bytes, ag.uplink_messages, ag.downlink_messages) == (150, 300, 3, 6)
    # rank 0 pushes 30 to rank 1 (its own 70 stays); rank 1 pushes 20 to rank 0; shards of 40 and 0 bytes
    sh = sharded_traffic([[70, 30], [20, 0]], [40, 0])
    assert sh.sent == [30 + 40 + SPLIT_RECORD_NBYTES + SIZE_RECORD_NBYTES, 20 + 0 + SPLIT_RECORD_NBYTES + SIZE_RECORD_NBYTES]
    assert (sh.uplink_bytes, sh.downlink_bytes, sh.uplink_messages, sh.downlink_messages) == (50, 40, 2, 1)
    ar = allreduce_traffic(4000, 4)
    assert ar.sent == [6000] * 4 and ring_all_reduce_nbytes(4000, 4) == 6000
    assert (ar.uplink_bytes, ar.downlink_bytes) == (16000, 16000)


def test_sharded_traffic_of_two_messages_is_their_parts_and_the_unions():
    """d = 8 in one segment, 2 ranks: owner 0 holds [0, 4), owner 1 [4, 8). Row 0 keeps {0, 5},
    row 1 keeps {5, 7}: row 0 pushes {5} (local 1) to owner 1, row 1 pushes nothing to owner 0;
    owner 0 pulls back the union {0}, owner 1 the union {1, 3} (local)."""
    msg = SparseBatch.from_rows(torch.tensor([[0, 5], [5, 7]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 8,
                                sorted_rows=True)
    plan = ShardPlan([8], 2)

    def frame(local):
        row = SparseBatch(4, torch.tensor([0, len(local)]), torch.zeros(len(local)), torch.tensor(local), sorted_rows=True)
        return int(wire.encoded_nbytes(row)[0])

    t = collective_traffic("sharded", msg, wire.encoded_nbytes(msg), "fp32", plan=plan)
    assert t.uplink_bytes == frame([1]) and t.uplink_messages == 1
    assert t.downlink_bytes == frame([0]) + frame([1, 3]) and t.downlink_messages == 2
    assert t.sent == [frame([1]) + frame([0]) + 40, 0 + frame([1, 3]) + 40]


def test_shared_support_random_k_draws_one_support_for_every_worker():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    ctx = CompressionContext(step=3, workers=torch.tensor([0, 1, 2, 3]))
    shared = RandomK(density=0.05, seed=7, shared_support=True).compress(x, ctx)
    own = RandomK(density=0.05, seed=7).compress(x, ctx)
    cols, vals = shared.rows_k()
    assert all(torch.equal(cols[q], cols[0]) for q in range(4))
    assert torch.equal(vals, x.gather(1, cols))
    own_cols, _ = own.rows_k()
    assert torch.equal(own_cols[0], cols[0])  # worker 0's own stream is the shared one
    assert not torch.equal(own_cols[1], cols[1])
    other_step = RandomK(density=0.05, seed=7, shared_support=True).compress(x, CompressionContext(step=4))
    assert not torch.equal(other_step.rows_k()[0][0], cols[0])


DIGITS = {"task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 3},
          "algorithm": {"compressor": {"kind": "topk", "density": 0.02, "scope": "layerwise"}},
          "schedule": {"lr": 0.1}, "steps": 3, "plots": False, "progress": False}


def _steps(cfg: dict):
    engine = build_engine(load_config(cfg))
    for _ in range(cfg["steps"]):
        engine.step()
    return engine


def test_sharded_simulator_equals_allgather_and_charges_its_own_traffic():
    ag, sh = _steps(DIGITS), _steps({**DIGITS, "collective": "sharded"})
    assert torch.equal(ag.w, sh.w)  # float32 values: the pulled sums are exact
    assert sh.ledger.uplink_bytes != ag.ledger.uplink_bytes
    P, T = DIGITS["workers"]["count"], DIGITS["steps"]
    # allgather: every rank's frames go to the P - 1 others, each after a 16-byte size record
    assert ag.ledger.downlink_bytes == (P - 1) * ag.ledger.uplink_bytes
    assert ag.ledger.all_ranks_sent_bytes == ag.ledger.downlink_bytes + T * P * (P - 1) * SIZE_RECORD_NBYTES
    # sharded: the parts pushed to their owners, each owner's shard to the P - 1 others, and per
    # rank and round one split record and one size record to every peer
    assert sh.ledger.downlink_bytes % (P - 1) == 0
    assert sh.ledger.all_ranks_sent_bytes == sh.ledger.uplink_bytes + sh.ledger.downlink_bytes + \
        T * P * (P - 1) * (SPLIT_RECORD_NBYTES + SIZE_RECORD_NBYTES)
    fp16 = _steps({**DIGITS, "collective": "sharded", "value_dtype": "fp16"})
    fp16_ag = _steps({**DIGITS, "value_dtype": "fp16"})
    assert not torch.equal(fp16.w, fp16_ag.w)  # the sums travel in fp16 too
    torch.testing.assert_close(fp16.w, fp16_ag.w, rtol=1e-3, atol=1e-4)


def test_allreduce_simulator_equals_allgather_of_shared_support_and_charges_the_ring():
    rk = {**DIGITS, "algorithm": {"compressor": {"kind": "randomk", "density": 0.02, "shared_support": True}}}
    ag, ar = _steps(rk), _steps({**rk, "collective": "allreduce"})
    assert torch.equal(ag.w, ar.w)
    k = k_from_density(0.02, ar.d)
    assert ar.ledger.all_ranks_sent_bytes == 3 * 4 * ring_all_reduce_nbytes(4 * k, 4)
    assert ar.ledger.uplink_bytes == ar.ledger.downlink_bytes == 3 * 4 * 4 * k


def test_simulator_predicts_what_many_ranks_send_per_rank():
    """The question the collectives answer: per-rank bytes per step as P grows (d = 400,000,
    1% density): the all-gather grows about linearly in P, the shared-support all-reduce is
    2 (P - 1)/P x k x 4 bytes, sharded with a per-owner downlink top-k sends about
    2 (P - 1)/P x k entries, 1.29x more at 32 ranks than at 4 by that factor alone, and stays
    within 1.4x (its split and size records and frame headers add about 80 bytes per other
    rank: with a small k and many ranks they dominate, 15 KB against 8 KB at k = 1,000 and
    P = 64)."""
    d, k = 400_000, 4000
    layout = Layout.flat(d)
    g = torch.Generator().manual_seed(0)
    per_rank = {}
    for world in (4, 32):
        x = torch.randn(world, d, generator=g)
        topk = TopK(density=0.01).compress(x)
        for name, collective, msg, down in (
                ("allgather", "allgather", topk, None), ("sharded_bidirectional", "sharded", topk, 0.01),
                ("allreduce", "allreduce", RandomK(density=0.01, shared_support=True).compress(x), None)):
            topo = make_topology("bidirectional", TopK(density=down)) if down else make_topology("all_to_all")
            plan = ShardPlan.of_layout(layout, world) if collective == "sharded" else None
            ch = SimulatedRounds(topo, world, collective=collective, plan=plan, values_per_rank=k)
            server = None
            if down:
                alg = Algorithm(compressor=TopK(density=0.01), topology=topo)
                configure_collective(alg, "sharded", layout, world)
                server = alg.server_step(msg, alg.init_server_state(layout), step=0, lr=1.0,
                                         weights=torch.full((world,), 1.0 / world)).message
            ch.deliver_round(wire.encoded_nbytes(msg), 0, msg, server)
            per_rank[name, world] = ch.ledger.all_ranks_sent_bytes / world
    assert per_rank["allreduce", 4] == ring_all_reduce_nbytes(4 * k, 4)
    assert per_rank["allreduce", 32] == ring_all_reduce_nbytes(4 * k, 32)
    assert per_rank["allgather", 32] > 8 * per_rank["allgather", 4]
    assert per_rank["sharded_bidirectional", 32] < 1.4 * per_rank["sharded_bidirectional", 4]
    assert per_rank["sharded_bidirectional", 32] < per_rank["allgather", 32] / 10


def test_engine_refuses_what_a_collective_cannot_carry():
    from gradsparse.engines.synchronous import configure_collective

    layout = Layout.flat(10)
    with pytest.raises(ValueError, match="shared_support"):
        configure_collective(Algorithm(compressor=RandomK(k=2)), "allreduce", layout, 2)
    with pytest.raises(ValueError, match="top-k with a density"):
        configure_collective(Algorithm(compressor=TopK(k=2), topology=make_topology("bidirectional", TopK(k=1))),
                             "sharded", layout, 2)
    with pytest.raises(ValueError, match="all_to_all or bidirectional"):
        configure_collective(Algorithm(compressor=TopK(k=2), topology="ps_uplink"), "sharded", layout, 2)
    with pytest.raises(ValueError, match="collective must be one of"):
        SimulatedRounds(make_topology("all_to_all"), 2, collective="ring")
