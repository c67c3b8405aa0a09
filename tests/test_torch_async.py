"""``engine: torch_async``: the asynchronous parameter server as real processes. With one
worker it is sequential SGD and equals the simulator bitwise; with several, the run's counts
obey the protocol (every update's staleness recorded once, the last messages drained)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradsparse.config import ConfigError, load_config
from gradsparse.experiments.plots import read_metrics
from gradsparse.experiments.runner import run

from conftest import launch_env

CONFIG = {
    "engine": "async",
    "task": {"name": "digits_mlp"},
    "workers": {"count": 1, "batch_size": 8},
    "algorithm": {"compressor": {"kind": "topk", "density": 0.05}, "feedback": "memory",
                  "topology": {"kind": "ps_uplink"}},
    "schedule": {"lr": 0.1}, "steps": 30, "plots": False,
    "metrics": {"every": 5, "names": ["step", "epoch", "loss", "test_accuracy", "density", "uplink_bytes",
                                      "downlink_bytes", "mean_memory_norm", "total_error", "staleness_mean",
                                      "staleness_max"]},
}


def _launch(tmp: Path, cfg: dict, nproc: int) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = launch_env()
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", str(path), "--nproc", str(nproc),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.multiprocess
def test_one_worker_over_processes_equals_the_simulator(tmp_path):
    out = _launch(tmp_path, CONFIG, nproc=2)
    ref = run(load_config(CONFIG), tmp_path / "sim", progress=False)
    got, want = read_metrics(out), read_metrics(ref)
    for col in CONFIG["metrics"]["names"]:
        if col != "downlink_bytes":
            assert got[col] == want[col], col  # bitwise: the same batches, steps and messages
    # the simulator also sends (and charges) the model after the last update; the real server
    # sends a stop there instead
    model_bytes = want["downlink_bytes"][1] / 5
    assert got["downlink_bytes"][:-1] == want["downlink_bytes"][:-1]
    assert got["downlink_bytes"][-1] == want["downlink_bytes"][-1] - model_bytes
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["w"], b["w"])
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"] == "torch_async" and s["staleness_histogram"] == {"0": 30} and s["drained_messages"] == 0


@pytest.mark.multiprocess
def test_one_worker_of_a_float64_task_equals_the_simulator_bitwise(tmp_path):
    """Values travel as fp32 frames (the default value_dtype) in both engines, rounded the same
    way; the model goes down as a dense float64 frame: parameters and bytes agree exactly."""
    cfg = {**CONFIG, "task": {"name": "linreg", "options": {"n_samples": 200, "n_features": 30, "dtype": "float64"}},
           "steps": 12, "metrics": {"every": 4, "names": ["step", "loss", "uplink_bytes", "downlink_bytes"]}}
    out = _launch(tmp_path, cfg, nproc=2)
    ref = run(load_config(cfg), tmp_path / "sim", progress=False)
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert a["w"].dtype == torch.float64 and torch.equal(a["w"], b["w"])
    got, want = read_metrics(out), read_metrics(ref)
    assert got["loss"] == want["loss"] and got["uplink_bytes"] == want["uplink_bytes"]
    # the simulator also charges the model it sends after the last update: one dense frame of 30
    # float64 values (fixed header 9, d 1, count 1, index length 1, value length 2, CRC 4)
    model_bytes = 30 * 8 + 9 + 1 + 1 + 1 + 2 + 4
    assert want["downlink_bytes"][-1] - got["downlink_bytes"][-1] == model_bytes


@pytest.mark.multiprocess
def test_three_workers_follow_the_protocol(tmp_path):
    cfg = {**CONFIG, "workers": {"count": 3, "batch_size": 8}, "steps": 60,
           "asynchronous": {"drop_older_than": 1}}
    s = json.loads((_launch(tmp_path, cfg, nproc=4) / "summary.json").read_text())
    steps, n = 60, 3
    hist = {int(k): v for k, v in s["staleness_histogram"].items()}
    assert sum(hist.values()) == steps and max(hist) <= 1  # staler messages were dropped, not applied
    dropped = s["rejected_messages"]["drop_older_than"]
    assert s["drained_messages"] == n - 1
    # every message sent is applied, dropped or drained; every reply but the last update's carries
    # a (charged) model; the first models x_0 are not charged, as in the simulator
    assert s["uplink_messages"] == steps + dropped + n - 1
    assert s["downlink_messages"] == steps + dropped - 1
    assert s["final"]["loss"] < 2.30  # it trains (the start is ~2.31 = log 10)


def test_unsupported_rules_and_running_outside_torchrun_are_clear_errors(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    bad = {**CONFIG, "engine": "torch_async", "asynchronous": {"staleness_bound": 2}}
    with pytest.raises(ConfigError, match="does not run staleness_bound"):
        run(load_config(bad), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="gradsparse launch"):
        run(load_config({**CONFIG, "engine": "torch_async"}), tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
