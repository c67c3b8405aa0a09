"""The DDP communication hook (gradsparse.ddp) against the vectorized simulator, on 2 real
processes (gloo on CPU, 127.0.0.1).

Every scenario runs once in one launch of 2 ranks (tests/_ddp_worker.py). Each rank gets the
mini-batches the simulator drew for its worker, so the hook with ``scope: layerwise`` must end
at the simulator's parameters (fp32 tolerance) and count, per parameter, the wire size of the
simulator's message restricted to that parameter. The scenarios also cover PyTorch's own
comm-hook situations (bucket rebuild, gradient_as_bucket_view, static_graph,
find_unused_parameters, no_sync() accumulation, join() with uneven inputs, bf16 parameters,
resume under weights_only, a checkpoint of another world size) and the hook's own rules (dense
fallback, byte budgets, on_nonfinite stop and skip, what a rank sends).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsparse import wire
from gradsparse.algorithm import Algorithm
from gradsparse.comm.collective import ring_all_reduce_nbytes
from gradsparse.compressors import make_compressor
from gradsparse.engines import SyncSimulator
from gradsparse.messages import SparseBatch
from gradsparse.schedules import Schedule
from gradsparse.tasks.models import MLP, module_task

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_ddp_worker", HERE / "_ddp_worker.py")
worker_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker_mod)

SIZES = (8, 16, 4)
T, B, N = 6, 4, 2
TOPK = {"compressor": {"kind": "topk", "density": 0.1, "scope": "layerwise"}}
BUDGET_BYTES = 2400  # per rank over the T steps: tight enough that the thresholds bind

SCENARIOS = {
    "identity": {"model": "mlp", "algorithm": {"compressor": {"kind": "identity"}}, "lr": 0.1, "plain": True},
    "topk_ef": {"model": "mlp", "algorithm": TOPK, "lr": 0.1},
    "threshold_ef_scaled": {"model": "mlp", "lr": 0.1,
                            "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.05},
                                          "feedback": "ef-scaled"}},
    "reordered_tiny_buckets_memory": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1,
                                      "algorithm": {"compressor": {"kind": "topk", "k": 20, "scope": "layerwise"},
                                                    "feedback": "memory"}},
    # scope entire: whole-model mode (pending futures resolved at the last of several buckets)
    "topk_entire_tiny_buckets": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1,
                                 "algorithm": {"compressor": {"kind": "topk", "density": 0.05}}},
    "topk_ef_resumed": {"model": "mlp", "resume_at": 3, "lr": 0.1, "algorithm": TOPK},
    # PyTorch's comm-hook situations
    "topk_bucket_view": {"model": "mlp", "lr": 0.1, "algorithm": TOPK, "ddp": {"gradient_as_bucket_view": True}},
    "topk_static_graph": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1, "algorithm": TOPK,
                          "ddp": {"static_graph": True}},
    "topk_unused_parameters": {"model": "unused", "lr": 0.1, "algorithm": TOPK,
                               "ddp": {"find_unused_parameters": True}},
    "topk_no_sync_accumulation": {"model": "mlp", "lr": 0.1, "algorithm": TOPK, "micro_batches": 2},
    "topk_fp16_values": {"model": "mlp", "lr": 0.1, "algorithm": {**TOPK, "value_dtype": "fp16"}},
    # lambda 0 sends every entry: the sparse frames cost more than the dense all-reduce
    "threshold_dense_fallback": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1,
                                 "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.0}}},
    "budget_whole_model": {"model": "mlp", "lr": 0.1, "algorithm": {
        "compressor": {"kind": "budget_threshold", "budget_bytes": BUDGET_BYTES, "steps": T}, "feedback": "ef-scaled"}},
    "budget_per_parameter": {"model": "mlp", "lr": 0.1, "compare": False, "state": {"whole_model": False},
                             "algorithm": {"compressor": {"kind": "budget_threshold", "budget_bytes": BUDGET_BYTES,
                                                          "steps": T}, "feedback": "ef-scaled"}},
    "warmup_is_plain_ddp": {"model": "mlp", "lr": 0.1, "compare": False, "plain": True, "algorithm": TOPK,
                            "state": {"warmup_steps": T}},
    "bf16_model": {"model": "mlp", "lr": 0.1, "compare": False, "dtype": "bfloat16", "algorithm": TOPK},
    "join_uneven_inputs": {"model": "mlp", "lr": 0.1, "compare": False, "algorithm": TOPK, "join_steps": {1: T - 2}},
    "nan_skip": {"model": "mlp", "lr": 0.1, "compare": False, "nan_at": (1, 3),
                 "algorithm": {**TOPK, "on_nonfinite": "skip"}},
    "nan_stop": {"model": "mlp", "lr": 0.1, "compare": False, "nan_at": (1, 3), "algorithm": TOPK},
    # whole-model mode with the step size outside the messages: the bucket holds U / lr
    "topk_entire_memory": {"model": "mlp", "lr": 0.1, "algorithm": {"compressor": {"kind": "topk", "density": 0.05},
                                                                    "feedback": "memory"}},
    # collectives (gradsparse.comm.collectives): compared with the simulator run by the same collective
    "topk_sharded": {"model": "mlp", "lr": 0.1, "algorithm": TOPK, "state": {"collective": "sharded"}},
    "topk_sharded_fp16": {"model": "mlp", "lr": 0.1, "algorithm": {**TOPK, "value_dtype": "fp16"},
                          "state": {"collective": "sharded"}},
    "topk_sharded_tiny_buckets_memory": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1, "state": {
        "collective": "sharded"}, "algorithm": {"compressor": {"kind": "topk", "k": 20, "scope": "layerwise"},
                                                "feedback": "memory"}},
    "topk_entire_sharded": {"model": "mlp", "lr": 0.1, "algorithm": {"compressor": {"kind": "topk", "density": 0.05}},
                            "state": {"collective": "sharded"}},
    "topk_sharded_bidirectional": {"model": "mlp", "lr": 0.1, "state": {"collective": "sharded"}, "algorithm": {
        **TOPK, "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "density": 0.05}}}},
    "threshold_sharded_dense_fallback": {"model": "reordered", "bucket_cap_mb": 0.0005, "lr": 0.1,
                                         "state": {"collective": "sharded"},
                                         "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.0}}},
    "randomk_allreduce_whole_model": {"model": "mlp", "lr": 0.1, "state": {"collective": "allreduce", "whole_model": True},
                                      "algorithm": {"compressor": {"kind": "randomk", "density": 0.1,
                                                                   "shared_support": True}}},
    # per parameter (the hook's own random streams): allreduce against allgather of the same messages
    "randomk_shared_allgather": {"model": "mlp", "lr": 0.1, "compare": False, "algorithm": {
        "compressor": {"kind": "randomk", "density": 0.1, "shared_support": True}}},
    "randomk_shared_allreduce": {"model": "mlp", "lr": 0.1, "compare": False, "state": {"collective": "allreduce"},
                                 "algorithm": {"compressor": {"kind": "randomk", "density": 0.1, "shared_support": True}}},
    "nan_stop_sharded": {"model": "mlp", "lr": 0.1, "compare": False, "nan_at": (1, 3), "algorithm": TOPK,
                         "state": {"collective": "sharded"}},
    "nan_stop_allreduce": {"model": "mlp", "lr": 0.1, "compare": False, "nan_at": (1, 3), "state": {"collective": "allreduce"},
                           "algorithm": {"compressor": {"kind": "randomk", "density": 0.1, "shared_support": True}}},
}


def _collective(spec: dict) -> str:
    return spec.get("state", {}).get("collective", "allgather")


COMPARED = sorted(n for n, s in SCENARIOS.items() if s.get("compare", True) and _collective(s) == "allgather")
COLLECTIVE = sorted(n for n, s in SCENARIOS.items() if s.get("compare", True) and _collective(s) != "allgather")


def _whole_model(spec: dict) -> bool:
    c = spec["algorithm"]["compressor"]
    default = (c["kind"] == "topk" and c.get("scope", "entire") == "entire") or c["kind"] == "budget_threshold"
    return spec.get("state", {}).get("whole_model", default)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name: str, spec: dict):
    """The simulator run with 2 workers; returns the scenario for the ranks and the simulator."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[2], (64,), generator=g)
    module = worker_mod.build_model({"sizes": SIZES, "model": spec["model"]})
    task = module_task("ddp_test", module, x, y, None, None)
    from gradsparse.segments import Layout

    layout = Layout.of(task.init_params(torch.Generator().manual_seed(0)))
    a = spec["algorithm"]
    value_dtype = a.get("value_dtype", "fp32")
    alg = worker_mod.build_algorithm(spec, None, layout)
    sim = SyncSimulator(task, alg, Schedule(lr=spec["lr"]), n_workers=N, batch_size=B, seed=0,
                        collective=_collective(spec))
    init = {n: v.clone() for n, v in sim.layout.unflatten(sim.w.clone()).items()}
    drawn = []
    sample = sim.data.sample

    def recording_sample():
        idx = sample()
        drawn.append(idx.clone())
        return idx

    sim.data.sample = recording_sample
    bytes_per_param = [0] * N
    for _ in range(T):
        rec = sim.step()
        msg = rec.worker.message
        for q in range(N):  # the wire size of worker q's message restricted to each parameter
            if _whole_model(spec):
                bytes_per_param[q] += int(rec.worker.nbytes[q])  # whole-model mode: one message
                continue
            row = msg.row(q)
            cols, vals = row.indices, row.values
            for _, lo, hi in sim.layout.bounds():
                keep = (cols >= lo) & (cols < hi)
                part = SparseBatch(hi - lo, torch.tensor([0, int(keep.sum())]), vals[keep], cols[keep] - lo,
                                   dense=row.dense and True, sorted_rows=True)
                bytes_per_param[q] += int(wire.encoded_nbytes(part, value_dtype=value_dtype)[0])
    idx = torch.stack(drawn)  # [T, N, B]
    scenario = {**spec, "name": name, "sizes": SIZES, "init": init,
                "x": [x[idx[:, q]] for q in range(N)], "y": [y[idx[:, q]] for q in range(N)]}
    return scenario, sim, bytes_per_param


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    refs, scenarios = {}, []
    for name, spec in SCENARIOS.items():
        scenario, sim, nbytes = _reference(name, spec)
        refs[name] = (sim, nbytes)
        scenarios.append(scenario)
    torch.save(scenarios, tmp / "scenarios.pt")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(HERE / "_ddp_worker.py"), str(r), str(N), str(port),
                               str(tmp / "scenarios.pt"), str(tmp)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(N)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out.decode(errors="replace"))
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    results = {name: [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=True) for r in range(N)]
               for name in SCENARIOS}
    return refs, results, tmp


def _flat(params: dict, names) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in names])


@pytest.mark.parametrize("name", COMPARED)
def test_hook_equals_simulator_layerwise(launched, name):
    refs, results, _ = launched
    sim, nbytes = refs[name]
    for r in range(N):
        got = _flat(results[name][r]["params"], sim.layout.names)
        torch.testing.assert_close(got, sim.w, rtol=1e-5, atol=1e-6)
        st = results[name][r]["state"]
        assert st["step"] == T
        # exact wire size of what this rank's messages are, parameter by parameter (whole-model
        # mode: one message)
        assert st["ledger"]["uplink_bytes"] == nbytes[r]
        assert st["ledger"]["downlink_bytes"] == (N - 1) * nbytes[r]
        # the memories are this worker's rows of the simulator's memory, by name
        if sim.worker_state.memory is not None:
            mem = torch.cat([st["memory"][n].reshape(-1) for n in sim.layout.names])
            torch.testing.assert_close(mem, sim.worker_state.memory.flat[r], rtol=1e-5, atol=1e-6)


DENSE = ("identity", "threshold_dense_fallback")


@pytest.mark.parametrize("name", sorted(n for n in COMPARED if n not in DENSE))
def test_what_a_rank_sends_is_its_frames_to_each_other_rank_and_the_size_records(launched, name):
    """sent_bytes = (P - 1) x the frames counted as uplink + (P - 1) x 16 bytes per size record
    (one record per bucket exchange)."""
    _, results, _ = launched
    for r in range(N):
        ledger = results[name][r]["state"]["ledger"]
        overhead = ledger["sent_bytes"] - (N - 1) * ledger["uplink_bytes"]
        assert overhead > 0 and overhead % ((N - 1) * 16) == 0
        assert results[name][r]["state"]["counters"]["dense_fallbacks"] == 0


@pytest.mark.parametrize("name", DENSE)
def test_dense_fallback_never_sends_more_than_dense(launched, name):
    """Identity, and hard-threshold with lambda 0, keep every entry: each frame is larger than the
    dense bucket, so every bucket goes as DDP's all-reduce would: sent bytes = the ring
    all-reduce's and the size records, never the frames."""
    refs, results, _ = launched
    for r in range(N):
        st = results[name][r]["state"]
        buckets = st["counters"]["dense_fallbacks"]
        assert buckets >= T
        assert st["ledger"]["sent_bytes"] == st["counters"]["dense_bytes"] + buckets * (N - 1) * 16
    # without the fallback the same run would send more (its frames) than dense: the fallback is what bounds it
    assert (N - 1) * refs[name][1][0] > results[name][0]["state"]["counters"]["dense_bytes"]


def _assert_params_and_memories(results, name, sim, tol):
    for r in range(N):
        got = _flat(results[name][r]["params"], sim.layout.names)
        torch.testing.assert_close(got, sim.w, **tol)
        st = results[name][r]["state"]
        assert st["step"] == T
        if sim.worker_state.memory is not None:
            mem = torch.cat([st["memory"][n].reshape(-1) for n in sim.layout.names])
            torch.testing.assert_close(mem, sim.worker_state.memory.flat[r], **tol)


ONE_BUCKET = ("topk_sharded", "topk_sharded_fp16", "topk_entire_sharded", "topk_sharded_bidirectional",
              "randomk_allreduce_whole_model")


@pytest.mark.parametrize("name", COLLECTIVE)
def test_collective_hook_equals_the_simulator_by_the_same_collective(launched, name):
    """Parameters and memories equal the simulator run with the same ``collective``; with the
    whole model in one exchange a step (one bucket, or whole-model mode) the ranks' ledgers add
    up to the simulator's: the owners' parts and shards (sharded), the k values (allreduce), and
    what all ranks handed to the collectives equals the simulator's prediction
    ``all_ranks_sent_bytes`` (allreduce: plus the hook's 8-byte non-finite check per step)."""
    refs, results, _ = launched
    sim, _ = refs[name]
    _assert_params_and_memories(results, name, sim, dict(rtol=1e-5, atol=1e-6))
    ledgers = [results[name][r]["state"]["ledger"] for r in range(N)]
    if name in ONE_BUCKET:
        for key in ("uplink_bytes", "downlink_bytes", "uplink_messages", "downlink_messages"):
            assert sum(lg[key] for lg in ledgers) == getattr(sim.ledger, key), key
        checks = N * T * ring_all_reduce_nbytes(8, N) if _collective(SCENARIOS[name]) == "allreduce" else 0
        assert sum(lg["sent_bytes"] for lg in ledgers) == sim.ledger.all_ranks_sent_bytes + checks
    if _collective(SCENARIOS[name]) == "sharded" and "dense_fallback" not in name:
        for lg, r in zip(ledgers, range(N)):  # a rank sends its parts, its shard to each other rank, and records
            records = lg["sent_bytes"] - lg["uplink_bytes"] - lg["downlink_bytes"]
            assert records > 0 and records % ((N - 1) * (24 + 16)) == 0
            assert results[name][r]["state"]["counters"]["dense_fallbacks"] == 0


def test_sharded_equals_allgather_to_rounding(launched):
    """The same top-k messages summed by their owners and pulled back, or all-gathered and summed
    by every rank: the same parameters and memories up to float32 rounding; with fp16 values the
    pulled sums are rounded to fp16 once more (compared with the all-gather of fp16 messages)."""
    _, results, _ = launched
    for r in range(N):
        for name, ref, tol in (("topk_sharded", "topk_ef", dict(rtol=1e-6, atol=1e-7)),
                               ("topk_sharded_fp16", "topk_fp16_values", dict(rtol=1e-3, atol=1e-4))):
            a, b = results[ref][r], results[name][r]
            for n in a["params"]:
                torch.testing.assert_close(b["params"][n], a["params"][n], **tol)
        a, b = results["topk_ef"][r]["state"]["memory"], results["topk_sharded"][r]["state"]["memory"]
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7)


def test_sharded_downlink_memory_is_this_ranks_slice_of_every_parameter(launched):
    """Bidirectional per shard: each rank keeps the downlink memory of its own slice of each
    parameter (its half here), and the two halves are the simulator's server memory delta."""
    refs, results, _ = launched
    sim, _ = refs["topk_sharded_bidirectional"]
    delta = sim.server_state.downlink_memory.flat
    for name, a, b in sim.layout.bounds():
        d_l = b - a
        halves = [results["topk_sharded_bidirectional"][r]["state"]["shard_memory"][name] for r in range(N)]
        assert [h.numel() for h in halves] == [d_l // 2, d_l - d_l // 2]
        torch.testing.assert_close(torch.cat(halves), delta[a:b], rtol=1e-5, atol=1e-7)
    assert float(delta.abs().sum()) > 0  # the downlink compression kept something back


def test_sharded_dense_fallback_never_sends_more_than_dense(launched):
    """Hard-threshold at 0 pushes every entry: the split records show every rank's push total
    above half a ring all-reduce, so every rank sends the bucket dense instead: sent bytes = the
    ring all-reduce's and the split records."""
    _, results, _ = launched
    for r in range(N):
        st = results["threshold_sharded_dense_fallback"][r]["state"]
        buckets = st["counters"]["dense_fallbacks"]
        assert buckets >= T
        assert st["ledger"]["sent_bytes"] == st["counters"]["dense_bytes"] + buckets * (N - 1) * 24


def test_allreduce_equals_allgather_of_the_same_shared_support_messages(launched):
    """Per-parameter shared-support random-k: summed by one all-reduce of the k values, or
    all-gathered as frames: the same parameters and memories; the all-reduce sends, per step,
    the ring all-reduce of sum_l k_l float32 values and the 8-byte non-finite check, nothing else."""
    from gradsparse.compressors import k_from_density

    _, results, _ = launched
    k = sum(k_from_density(0.1, n) for n in (SIZES[0] * SIZES[1], SIZES[1], SIZES[1] * SIZES[2], SIZES[2]))
    for r in range(N):
        a, b = results["randomk_shared_allgather"][r], results["randomk_shared_allreduce"][r]
        for n in a["params"]:
            torch.testing.assert_close(b["params"][n], a["params"][n], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(b["state"]["memory"][n], a["state"]["memory"][n], rtol=1e-6, atol=1e-7)
        assert b["state"]["ledger"]["sent_bytes"] == T * (ring_all_reduce_nbytes(4 * k, N) + ring_all_reduce_nbytes(8, N))
        assert b["state"]["ledger"]["sent_bytes"] < a["state"]["ledger"]["sent_bytes"]


def test_resume_under_weights_only_is_bit_identical(launched):
    _, results, _ = launched
    for r in range(N):
        a, b = results["topk_ef"][r], results["topk_ef_resumed"][r]
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), n
        for n in a["state"]["memory"]:
            assert torch.equal(a["state"]["memory"][n], b["state"]["memory"][n]), n
        assert a["state"]["ledger"] == b["state"]["ledger"]


def test_a_checkpoint_of_another_world_size_is_refused_atomically(launched):
    _, results, _ = launched
    first = next(iter(SCENARIOS))
    assert all(results[first][r]["other_world_refused"] for r in range(N))


def test_budget_per_parameter_never_exceeds_the_budget(launched):
    _, results, _ = launched
    whole = [results["budget_whole_model"][r]["state"]["ledger"]["uplink_bytes"] for r in range(N)]
    split = [results["budget_per_parameter"][r]["state"]["ledger"]["uplink_bytes"] for r in range(N)]
    for r in range(N):
        assert 0.8 * BUDGET_BYTES <= whole[r] <= BUDGET_BYTES
        assert 0.5 * BUDGET_BYTES <= split[r] <= BUDGET_BYTES


def test_warmup_steps_are_plain_ddp_bit_for_bit(launched):
    """Warm-up steps average the gradients exactly as DDP's own all-reduce does (divide, then
    sum), so T warm-up steps give plain DDP's parameters bit for bit, and no memory changes."""
    _, results, _ = launched
    for r in range(N):
        res = results["warmup_is_plain_ddp"][r]
        for n, p in res["plain"].items():
            assert torch.equal(res["params"][n], p), n
        assert all(float(m.abs().max()) == 0.0 for m in res["state"]["memory"].values())
        ledger = res["state"]["ledger"]
        assert ledger["sent_bytes"] == res["state"]["counters"]["dense_bytes"]  # ring all-reduces only


def test_bf16_parameters_keep_fp32_memories(launched):
    _, results, _ = launched
    a, b = results["bf16_model"]
    assert a["memory_dtypes"] == ["torch.float32"] and a["error"] is None
    for n in a["params"]:
        assert a["params"][n].dtype == torch.bfloat16 and torch.equal(a["params"][n], b["params"][n])
        assert bool(torch.isfinite(a["params"][n].float()).all())
    assert a["state"]["step"] == T
    ledger = a["state"]["ledger"]  # one message per parameter and step, its frames to the other rank
    assert ledger["uplink_messages"] == T * len(a["params"]) and ledger["downlink_bytes"] == ledger["uplink_bytes"]
    # handed to the transport: those frames plus one 16-byte size record per step (one bucket)
    assert ledger["sent_bytes"] == ledger["uplink_bytes"] + 16 * T


def test_join_with_uneven_inputs_finishes_on_every_rank(launched):
    """Rank 1 runs out of inputs two steps early; under model.join() it runs the hook on zero
    gradients for the missing steps (its memory keeps draining), so every rank counts T steps and
    ends with the same parameters."""
    _, results, _ = launched
    a, b = results["join_uneven_inputs"]
    assert a["error"] is None and b["error"] is None
    assert a["state"]["step"] == b["state"]["step"] == T
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n])
    # the joined steps ran the hook too: rank 1 sent one message per parameter at every one of the T
    # steps, as rank 0 did, and each rank received what the other sent
    la, lb = a["state"]["ledger"], b["state"]["ledger"]
    assert la["uplink_messages"] == lb["uplink_messages"] == T * len(a["params"])
    assert la["downlink_bytes"] == la["uplink_bytes"] and lb["downlink_bytes"] == lb["uplink_bytes"]


def test_nonfinite_skip_drops_the_message_and_training_goes_on(launched):
    _, results, _ = launched
    a, b = results["nan_skip"]
    assert a["error"] is None and b["error"] is None
    assert b["state"]["counters"]["skipped_messages"] >= 1 and a["state"]["counters"]["skipped_messages"] == 0
    for n in a["params"]:
        assert bool(torch.isfinite(a["params"][n]).all()) and torch.equal(a["params"][n], b["params"][n])
    for mem in b["state"]["memory"].values():
        assert bool(torch.isfinite(mem).all())


@pytest.mark.parametrize("name", ["nan_stop", "nan_stop_sharded", "nan_stop_allreduce"])
def test_nonfinite_stop_stops_every_rank_at_the_same_step(launched, name):
    _, results, _ = launched
    errors = [results[name][r]["error"] for r in range(N)]
    assert all(e is not None and "NonFiniteGradient" in e for e in errors), errors
    assert all("rank(s) [1] at step 3" in e for e in errors), errors
    assert [results[name][r]["state"]["step"] for r in range(N)] == [3, 3]
    for r in range(N):
        for n, p in results[name][r]["params"].items():
            assert bool(torch.isfinite(p).all()), n


def test_identity_hook_equals_plain_ddp_allreduce(launched):
    _, results, _ = launched
    for r in range(N):
        res = results["identity"][r]
        for n, p in res["plain"].items():
            torch.testing.assert_close(res["params"][n], p, rtol=1e-5, atol=1e-6)


def test_state_dict_loads_under_weights_only_and_round_trips(launched, tmp_path):
    import gradsparse.ddp as gddp

    _, results, _ = launched
    sd = results["threshold_ef_scaled"][0]["state"]
    assert sd["world_size"] == N and sd["rank"] == 0
    torch.save(sd, tmp_path / "hook.pt")
    loaded = torch.load(tmp_path / "hook.pt", weights_only=True)
    model = MLP(SIZES[0], [SIZES[1]], SIZES[2])
    alg = Algorithm(compressor=make_compressor("hard_threshold", gddp.layout_of(model), threshold=0.05), feedback="ef-scaled")
    state = gddp.SparsifiedState(model, alg, lr=0.1)
    state.load_state_dict(loaded)
    again = state.state_dict()
    assert again["step"] == sd["step"] and again["counters"] == sd["counters"] and again["ledger"] == sd["ledger"]
    for n in sd["memory"]:
        assert torch.equal(again["memory"][n], sd["memory"][n])
    # pickling drops the process group; a different model is a clear error
    clone = pickle.loads(pickle.dumps(state)).bind(model)
    assert clone.process_group is None and clone.step == T
    other = torch.nn.Linear(3, 2)
    bad = gddp.SparsifiedState(other, Algorithm(compressor=make_compressor("hard_threshold", gddp.layout_of(other), threshold=0.05),
                                               feedback="ef-scaled"), lr=0.1)
    with pytest.raises(ValueError, match="do not match"):
        bad.load_state_dict(loaded)


def test_server_topologies_and_layerwise_entire_mix_are_rejected():
    import gradsparse.ddp as gddp

    model = MLP(SIZES[0], [SIZES[1]], SIZES[2])
    layout = gddp.layout_of(model)
    state = gddp.SparsifiedState(model, Algorithm(compressor=make_compressor("topk", layout, k=3)), lr=0.1)
    assert state.whole_model  # scope entire: whole-model mode
    with pytest.raises(ValueError, match="layerwise"):  # entire top-k cannot be split per parameter
        gddp.SparsifiedState(model, Algorithm(compressor=make_compressor("topk", layout, k=3)), lr=0.1, whole_model=False)
    with pytest.raises(ValueError, match="all_to_all"):
        gddp.SparsifiedState(model, Algorithm(compressor=make_compressor("topk", layout, k=3, scope="layerwise"),
                                              topology="ps_uplink"), lr=0.1)
