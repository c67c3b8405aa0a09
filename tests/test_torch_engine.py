"""``engine: torch`` as real processes (``gradsparse launch``, 4 ranks, gloo, 127.0.0.1) against
``sync`` on the same configs: the same parameters (fp32/fp64 tolerance), the same exact bytes and
messages, the same memories, and the same run directory files.

All-to-all configs run 4 workers (replicated server; by each ``collective``: the ranks' summed
sent bytes equal the simulator's prediction); ``ps_*`` configs run 3 workers and a parameter
server on rank 0 (point-to-point, wire format). One launch runs every config (the engine-equivalence fixture in tests/test_engines.py cannot
step an out-of-process engine: ``TorchDistEngine.synchronous_equivalent`` returns None there).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from gradsparse.config import load_config
from gradsparse.experiments.runner import run

from conftest import launch_env

TOY = {"name": "toy_quadratic", "options": {"dtype": "float64"}}

CONFIGS = {
    # fixed count, in-place fused path: one all_gather per step
    "mlp_topk_ef": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 3},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.01}}, "schedule": {"lr": 0.1}, "steps": 6, "plots": False,
    },
    # varying count (size exchange + padded all_gather), out of place (momentum, weight decay)
    "logreg_threshold_ef_scaled": {
        "task": {"name": "logreg", "options": {"dataset": "breast_cancer", "dtype": "float64"}},
        "workers": {"count": 4, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.05}, "feedback": "ef-scaled",
                      "momentum": {"kind": "update", "beta": 0.5}, "weight_decay": 1e-3},
        "schedule": {"lr": 0.5}, "steps": 8, "plots": False,
    },
    # layer-wise top-k with memory feedback on a parameter server topology (replicated server)
    "mlp_layerwise_memory_bidirectional": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 4},
        "algorithm": {"compressor": {"kind": "topk", "density": 0.02, "scope": "layerwise"}, "feedback": "memory",
                      "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "density": 0.05}}},
        "schedule": {"lr": 0.05}, "steps": 6, "plots": False,
    },
    # collectives (gradsparse.comm.collectives): the owners' push and pull, per-owner downlink
    # top-k, the shared-support random-k summed by one all_reduce
    "mlp_topk_sharded": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 3}, "collective": "sharded",
        "algorithm": {"compressor": {"kind": "topk", "density": 0.02, "scope": "layerwise"}}, "schedule": {"lr": 0.1},
        "steps": 6, "plots": False,
    },
    "mlp_topk_sharded_bidirectional_fp16": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 3}, "collective": "sharded",
        "value_dtype": "fp16",
        "algorithm": {"compressor": {"kind": "topk", "density": 0.02, "scope": "layerwise"},
                      "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "density": 0.02}}},
        "schedule": {"lr": 0.1}, "steps": 6, "plots": False,
    },
    "mlp_randomk_allreduce": {
        "task": {"name": "digits_mlp"}, "workers": {"count": 4, "batch_size": 3}, "collective": "allreduce",
        "algorithm": {"compressor": {"kind": "randomk", "density": 0.02, "shared_support": True}},
        "schedule": {"lr": 0.1}, "steps": 6, "plots": False,
    },
    # parameter-server mode: 3 workers + a server rank (point-to-point wire-format messages)
    "ps_toy_uplink": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"}, "plots": False, "steps": 12,
        "algorithm": {"compressor": {"kind": "topk", "k": 1}, "topology": {"kind": "ps_uplink"},
                      "momentum": {"kind": "gradient", "beta": 0.5}},
        "metrics": {"every": 3, "names": ["step", "loss", "mean_memory_norm", "total_error", "density", "uplink_bytes",
                                          "downlink_bytes", "xi", "rho_hat", "gamma_hat_up", "compression_ratio_up",
                                          "aggregate_density"]},
    },
    "ps_toy_bidirectional_threshold": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"}, "plots": False, "steps": 12,
        "algorithm": {"compressor": {"kind": "hard_threshold", "threshold": 0.5}, "feedback": "ef-scaled",
                      "topology": {"kind": "bidirectional", "down_compressor": {"kind": "topk", "k": 3}}},
    },
    "ps_toy_downlink_only": {
        "task": TOY, "workers": {"count": 3, "batch_size": "full"}, "plots": False, "steps": 12,
        "algorithm": {"compressor": {"kind": "identity"}, "feedback": "none",
                      "topology": {"kind": "downlink_only", "down_compressor": {"kind": "topk", "k": 1}}},
    },
}
NPROC = 4


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch_engine")
    paths = []
    for name, cfg in CONFIGS.items():
        p = tmp / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        paths.append(str(p))
    env = launch_env()
    proc = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", *paths, "--nproc", str(NPROC),
                           "--out", str(tmp / "runs")], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    refs = {}
    for name, cfg in CONFIGS.items():
        refs[name] = run(load_config({**cfg, "engine": "sync"}), tmp / "sync" / name, progress=False)
    return tmp, refs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_engine_equals_sync(launched, name):
    tmp, refs = launched
    got_dir, ref_dir = tmp / "runs" / name, refs[name]
    got = torch.load(got_dir / "checkpoint.pt", weights_only=True)
    ref = torch.load(ref_dir / "checkpoint.pt", weights_only=True)
    assert got["engine"] == "torch" and ref["engine"] == "sync"
    exact = ref["w"].dtype == torch.float64
    tol = dict(rtol=1e-9, atol=1e-12) if exact else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["w"], ref["w"], **tol)
    # the algorithm's messages: the same ledger; what rank 0 handed to its transport: only torch's
    algorithm_counts = ("uplink_bytes", "downlink_bytes", "uplink_messages", "downlink_messages")
    assert {k: got["ledger"][k] for k in algorithm_counts} == {k: ref["ledger"][k] for k in algorithm_counts}
    assert got["t"] == ref["t"] and ref["ledger"]["sent_bytes"] == ref["ledger"]["diagnostic_bytes"] == 0
    n, steps = CONFIGS[name]["workers"]["count"], got["t"]
    if name.startswith("ps_"):  # rank 0 is the server: it sent N downlink messages a step, each a
        # 5-field int64 header and the frames the ledger counts; it receives the diagnostics
        assert got["ledger"]["sent_bytes"] == got["ledger"]["downlink_bytes"] + steps * n * 5 * 8
        assert got["ledger"]["diagnostic_bytes"] == 0
        assert got["ledger"]["all_ranks_sent_bytes"] == 0 < ref["ledger"]["all_ranks_sent_bytes"]  # not summed there
    else:  # every rank sends its frames to the N - 1 others after a 16-byte size record each,
        # and its diagnostics (gradient, accumulated vector, memory, ...) in all-gathers
        assert got["ledger"]["sent_bytes"] > steps * (n - 1) * 16
        assert got["ledger"]["diagnostic_bytes"] > 0
        # what the 4 ranks handed to the collectives, summed, is what the simulator predicts for
        # the config's collective (all-gather, owners' push and pull, or the ring all-reduce)
        assert got["ledger"]["all_ranks_sent_bytes"] == ref["ledger"]["all_ranks_sent_bytes"] > 0
    for part in ("memory", "momentum"):
        a, b = got["algorithm"]["worker"][part], ref["algorithm"]["worker"][part]
        assert (a is None) == (b is None)
        for seg in (a or {}):
            torch.testing.assert_close(a[seg], b[seg], **tol)
    # the same run directory: files, metric columns, byte totals
    assert sorted(p.name for p in got_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    assert (got_dir / "metrics.csv").read_text().splitlines()[0] == (ref_dir / "metrics.csv").read_text().splitlines()[0]
    if name.startswith("ps_"):  # float64 and exact: every recorded metric is the same
        assert (got_dir / "metrics.csv").read_text() == (ref_dir / "metrics.csv").read_text()
    sg, sr = json.loads((got_dir / "summary.json").read_text()), json.loads((ref_dir / "summary.json").read_text())
    assert sg["uplink_bytes"] == sr["uplink_bytes"] and sg["downlink_bytes"] == sr["downlink_bytes"]
    assert sg["engine"] == "torch" and sg["workers"] == CONFIGS[name]["workers"]["count"]


def test_torch_engine_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    from gradsparse.config import ConfigError

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises((ConfigError, ValueError), match="gradsparse launch"):
        run(load_config({**CONFIGS["mlp_topk_ef"], "engine": "torch"}), tmp_path / "x", progress=False)


def test_launch_dry_run_prints_the_torchrun_command(capsys):
    from gradsparse.distributed.launch import main

    assert main(["toy_uplink", "--nproc", "3", "--out", "runs/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node=3" in out and "gradsparse.distributed.worker" in out


@pytest.mark.parametrize("args, code, needle", [
    (["logreg_topk", "--nproc", "2"], 2, "--nproc 20, or --set workers.count"),  # 20 workers, all-to-all
    (["toy_uplink", "--nproc", "2"], 2, "--nproc 3 or 4"),  # ps_uplink: replicated server or rank 0 serving
    (["toy_uplink", "--nproc", "4"], 0, None),
    (["toy_uplink", "--nproc", "3", "--set", "steps=-1"], 2, "config key 'steps'"),
    (["async_lenet_lambda1", "--nproc", "8"], 2, "engine 'torch_async' runs rank 0 as the server"),
    (["async_lenet_lambda1", "--nproc", "9"], 0, None),
    ([], 2, "launch needs a config"),
    (["toy_uplink"], 2, "launch needs --nproc"),
])
def test_launch_checks_the_config_and_process_count_before_starting_torchrun(capsys, args, code, needle):
    from gradsparse.distributed.launch import main

    assert main([*args, "--dry-run"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if needle is None:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith("gradsparse: error:") and needle in err[0]


def test_launch_drops_only_torchruns_own_tracebacks():
    from gradsparse.distributed.launch import without_launcher_tracebacks

    torchrun_tb = ["Traceback (most recent call last):\n", '  File "/x/torch/distributed/run.py", line 1, in main\n',
                   "    run(args)\n", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"]
    rank_tb = ["Traceback (most recent call last):\n", '  File "/x/gradsparse/worker.py", line 3, in main\n',
               "ValueError: bad\n"]
    lines = ["W1202 warning\n", *torchrun_tb, "=====\n", *rank_tb, "last\n"]
    assert list(without_launcher_tracebacks(lines)) == ["W1202 warning\n", "=====\n", *rank_tb, "last\n"]
    assert list(without_launcher_tracebacks(rank_tb[:2])) == rank_tb[:2]  # an unfinished block is kept
