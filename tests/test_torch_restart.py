"""``engine: torch`` restarts: a rank that fails once under ``torchrun --max-restarts 1`` makes
the job restart from the ranks' newest common checkpoint, and the run ends as the uninterrupted
(simulated) run does; restart folders of another world size or config are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradsparse.config import dump_config, load_config
from gradsparse.distributed.restart import KEEP, RestartCheckpoints, injected_failure, restart_dir
from gradsparse.experiments.plots import read_metrics
from gradsparse.experiments.errors import RunDiverged
from gradsparse.experiments.runner import run

from conftest import launch_env

CONFIG = {
    "task": {"name": "logreg", "options": {"dataset": "breast_cancer", "dtype": "float64"}},
    "workers": {"count": 2, "batch_size": 4},
    "algorithm": {"compressor": {"kind": "topk", "density": 0.1}, "feedback": "ef",
                  "momentum": {"kind": "update", "beta": 0.5}},
    "schedule": {"lr": 0.5}, "steps": 12, "checkpoint_every": 4, "metrics": {"every": 2}, "plots": False,
}


def _launch(tmp: Path, extra_env: dict, max_restarts: int, config: dict | None = None) -> subprocess.CompletedProcess:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG if config is None else config))
    env = launch_env(**extra_env)
    return subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", str(cfg), "--nproc", "2",
                           "--out", str(tmp / "out"), "--max-restarts", str(max_restarts)],
                          env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.multiprocess
def test_a_rank_failing_once_restarts_the_job_from_the_common_checkpoint(tmp_path):
    proc = _launch(tmp_path, {"GRADSPARSE_FAIL_ONCE_AT": "1:7"}, max_restarts=1)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "injected failure on rank 1 after step 7" in log  # the first attempt did fail
    for rank in (0, 1):  # checkpoints at 4 (and 8, never reached): both ranks went back to step 4
        assert f"rank {rank}: resuming from the restart checkpoint of step 4" in log
    assert not restart_dir(tmp_path / "out").exists()  # removed once the run completed
    ref = run(load_config({**CONFIG, "engine": "sync"}), tmp_path / "sync", progress=False)
    got = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    want = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert got["t"] == want["t"] == 12 and _messages(got["ledger"]) == _messages(want["ledger"])
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-9, atol=1e-12)
    for seg, mem in got["algorithm"]["worker"]["memory"].items():
        torch.testing.assert_close(mem, want["algorithm"]["worker"]["memory"][seg], rtol=1e-9, atol=1e-12)
    # metrics.csv: every row once (none repeated from the failed attempt), values as the simulator's
    a, b = read_metrics(tmp_path / "out"), read_metrics(ref)
    assert a["step"] == b["step"] == [float(s) for s in range(0, 13, 2)]
    for col in ("loss", "uplink_bytes", "mean_memory_norm"):
        assert a[col] == pytest.approx(b[col], rel=1e-9)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.multiprocess
def test_a_stopped_job_continues_by_hand_with_launch_resume(tmp_path, capsys):
    """No --max-restarts: the job fails (rank 1 after step 7) and stops; ``gradsparse launch
    --resume OUT`` takes the config and world size from the restart manifest and finishes the
    run as the uninterrupted simulator run does; ``gradsparse run --resume`` points there."""
    from gradsparse.cli import main as cli_main

    proc = _launch(tmp_path, {"GRADSPARSE_FAIL_ONCE_AT": "1:7"}, max_restarts=0)
    assert proc.returncode != 0
    manifest = json.loads((restart_dir(tmp_path / "out") / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "engine: torch" in manifest["config"]
    assert cli_main(["run", "--resume", str(tmp_path / "out")]) == 2  # not the in-process resume
    assert f"gradsparse launch --resume {tmp_path / 'out'}" in capsys.readouterr().err
    env = launch_env()
    bad = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", "--resume", str(tmp_path / "out"),
                          "--nproc", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "started with 2 processes" in bad.stderr
    again = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", "--resume", str(tmp_path / "out")],
                           env=env, capture_output=True, text=True, timeout=400)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert "rank 1: resuming from the restart checkpoint of step 4" in log
    assert not restart_dir(tmp_path / "out").exists()
    ref = run(load_config({**CONFIG, "engine": "sync"}), tmp_path / "sync", progress=False)
    got = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    want = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert got["t"] == want["t"] == 12 and _messages(got["ledger"]) == _messages(want["ledger"])
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-9, atol=1e-12)
    a, b = read_metrics(tmp_path / "out"), read_metrics(ref)
    assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "completed"
    missing = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", "--resume", str(tmp_path / "sync")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no restart checkpoints" in missing.stderr


@pytest.mark.multiprocess
def test_a_restart_folder_of_another_world_size_is_refused(tmp_path):
    folder = restart_dir(tmp_path / "out")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"world_size": 3, "config_sha256": "x"}))
    proc = _launch(tmp_path, {}, max_restarts=0)
    assert proc.returncode != 0
    assert "written by 3 ranks, this job has 2" in proc.stderr and str(folder) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_restart_files_are_atomic_keep_the_newest_and_check_the_config(tmp_path):
    text = dump_config(load_config(CONFIG))
    ckpt = RestartCheckpoints(tmp_path / "out", rank=0, world_size=2, config_text=text)
    for step in (4, 8, 12):
        ckpt.save(step, {"t": torch.tensor(step)})
    assert ckpt.steps() == [8, 12][-KEEP:]
    assert int(ckpt.load(12)["t"]) == 12
    assert not [p for p in ckpt.dir.iterdir() if ".tmp-" in p.name]
    ckpt.check_manifest()  # same world size and config: fine
    other = RestartCheckpoints(tmp_path / "out", rank=1, world_size=2, config_text=text + "# changed\n")
    with pytest.raises(ValueError, match="different config"):
        other.check_manifest()
    assert other.steps() == []  # rank 1 has no files of its own
    ckpt.clear()
    assert not ckpt.dir.exists()


def test_injected_failure_fires_once_on_its_rank_only():
    assert injected_failure(None, 0, 0) is None
    assert injected_failure("1:3", 0, 0) is None  # another rank
    assert injected_failure("1:3", 1, 1) is None  # a restarted attempt
    hook = injected_failure("1:3", 1, 0)
    hook(2)
    with pytest.raises(RuntimeError, match="after step 3"):
        hook(3)
    with pytest.raises(ValueError, match="RANK:STEP"):
        injected_failure("seven", 0, 0)


@pytest.mark.multiprocess
def test_a_divergence_seen_by_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Only rank 0 records the loss, so only it can see it turn infinite: the ranks agree after
    every step (engine.agree_to_stop), all stop after step 4 with one report, no rank is left
    waiting on a collective, and the run directory says diverged as the simulator's does."""
    config = {**CONFIG, "task": {"name": "linreg", "options": {"n_samples": 200, "n_features": 20}},
              "algorithm": {"compressor": {"kind": "topk", "density": 0.5}, "feedback": "ef"},
              "schedule": {"lr": 40.0}, "metrics": {"every": 2}}
    del config["checkpoint_every"]
    proc = _launch(tmp_path, {}, max_restarts=0, config=config)
    ref = tmp_path / "sync"
    with pytest.raises(RunDiverged):
        run(load_config({**config, "engine": "sync"}), ref, progress=False)
    log = proc.stderr
    assert proc.returncode != 0 and "Traceback" not in log, log[-3000:]
    assert log.count("gradsparse: diverged: non-finite loss") == 1 and "another rank stopped" not in log
    got = json.loads((tmp_path / "out" / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert got["status"] == want["status"] == "diverged"
    assert got["diverged_at_step"] == want["diverged_at_step"]


def _messages(ledger: dict) -> dict:
    """The algorithm's message counts of a ledger (what sync and torch share; torch's ledger also
    has what its rank handed to the transport)."""
    return {k: ledger[k] for k in ("uplink_bytes", "downlink_bytes", "uplink_messages", "downlink_messages")}
