"""``gradsparse launch`` and restart checkpoints under hostile conditions (issue 23): one writer per
run directory, the advice after Ctrl-C, ``--overwrite``, torchrun dying with its launcher, restart
files that are damaged or have no manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradsparse.cli import main
from gradsparse.config import dump_config, load_config
from gradsparse.distributed.restart import RestartCheckpoints, restart_dir
from gradsparse.experiments import rundir
from gradsparse.experiments.plots import read_metrics
from gradsparse.experiments.runner import run

from conftest import launch_env, wait_for

CONFIG = {
    "task": {"name": "logreg", "options": {"dataset": "breast_cancer", "dtype": "float64"}},
    "workers": {"count": 2, "batch_size": 4},
    "algorithm": {"compressor": {"kind": "topk", "density": 0.1}, "feedback": "ef"},
    "schedule": {"lr": 0.5}, "steps": 12, "checkpoint_every": 4, "metrics": {"every": 2}, "plots": False,
}
ENV = launch_env()


def _cfg(tmp: Path, config: dict, name="cfg.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(config))
    return p


def _launch_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradsparse.cli", "launch", str(cfg), "--nproc", "2", "--out", str(out), *extra]


def _processes_mentioning(text: str, exclude: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (exclude, os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return found


# ---- restart files: which can be resumed from ------------------------------------------------------
def _checkpoints(tmp_path, rank=1):
    text = dump_config(load_config(CONFIG))
    ck = RestartCheckpoints(tmp_path / "out", rank=rank, world_size=2, config_text=text)
    ck.dir.mkdir(parents=True)
    return ck


CORRUPTIONS = {
    "truncated": lambda good: good[: len(good) // 2],
    "garbage": lambda good: bytes(range(256)) * 8,
    "empty": lambda good: b"",
    "foreign pickle": None,  # a valid torch file of something else
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_damaged_restart_file_is_named_and_skipped(tmp_path, kind):
    ck = _checkpoints(tmp_path)
    state = {"t": 4, "w": torch.ones(3), "runner": {"rows": []}}
    ck.save(4, state)
    ck.save(8, {**state, "t": 8})
    path = ck._path(8)
    if CORRUPTIONS[kind] is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    good, bad = ck.readable_steps()
    assert good == [4] and list(bad) == [8]
    assert {"truncated": "does not load", "garbage": "does not load", "empty": "empty",
            "foreign pickle": "no gradsparse engine state"}[kind] in bad[8]
    assert ck.problem(4) is None


def test_a_file_holding_another_step_is_skipped(tmp_path):
    ck = _checkpoints(tmp_path)
    ck.save(8, {"t": 4, "runner": {}})
    assert "state of step 4, not 8" in ck.readable_steps()[1][8]


def test_restart_files_without_a_manifest_are_refused(tmp_path):
    ck = _checkpoints(tmp_path, rank=1)  # rank 1 saves no manifest
    ck.save(4, {"t": 4, "runner": {}})
    with pytest.raises(ValueError, match="no manifest.json"):
        ck.check_manifest()
    (ck.dir / "manifest.json").write_text(json.dumps({"world_size": 2, "config_sha256": ck.config_sha256}))
    ck.check_manifest()


@pytest.mark.multiprocess
def test_launch_refuses_restart_files_without_a_manifest_before_any_step(tmp_path):
    ck = _checkpoints(tmp_path)
    ck.save(4, {"t": 4, "runner": {}})
    proc = subprocess.run(_launch_cmd(_cfg(tmp_path, CONFIG), tmp_path / "out"), env=ENV, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("no manifest.json") == 1  # said once (rank 0), every rank stopped
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_corrupt_newest_restart_checkpoint_falls_back_to_the_older_step(tmp_path):
    """The audit's case: a stopped job whose rank 1 newest restart file is truncated. ``launch
    --resume`` says which file it skips, continues from the older step every rank can read and
    ends equal to the uninterrupted simulator run."""
    cfg = _cfg(tmp_path, CONFIG)
    out = tmp_path / "out"
    failed = subprocess.run(_launch_cmd(cfg, out), env={**ENV, "GRADSPARSE_FAIL_ONCE_AT": "1:9"},
                            capture_output=True, text=True, timeout=400)
    assert failed.returncode != 0
    folder = restart_dir(out)
    newest = folder / "rank1-step000000008.pt"
    assert newest.is_file() and (folder / "rank1-step000000004.pt").is_file()
    newest.write_bytes(newest.read_bytes()[:100])
    again = subprocess.run([sys.executable, "-m", "gradsparse.cli", "launch", "--resume", str(out)], env=ENV,
                           capture_output=True, text=True, timeout=400)
    log = again.stdout + again.stderr
    assert again.returncode == 0 and "Traceback" not in log, log[-4000:]
    assert f"rank 1: skipped restart checkpoint {newest}: does not load" in log
    assert "rank 0: skipped restart checkpoint" in log and "have no readable checkpoint of step 8" in log
    assert "rank 1: resuming from the restart checkpoint of step 4" in log
    ref = run(load_config({**CONFIG, "engine": "sync"}), tmp_path / "sync", progress=False)
    got = torch.load(out / "checkpoint.pt", weights_only=True)
    want = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert got["t"] == want["t"] == 12
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-9, atol=1e-12)
    assert read_metrics(out)["step"] == read_metrics(ref)["step"]


# ---- the launcher ---------------------------------------------------------------------------------------
def test_launch_into_a_directory_being_written_is_refused_before_torchrun(tmp_path, capsys):
    cfg = _cfg(tmp_path, CONFIG)
    out = tmp_path / "out"
    with rundir.RunLock(out):
        rc = main(["launch", str(cfg), "--nproc", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"process {os.getpid()}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_launch_overwrite_and_resume_do_not_mix(capsys):
    rc = main(["launch", "--resume", "runs/x", "--overwrite"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_launch_dry_run_passes_overwrite(capsys):
    assert main(["launch", "toy_uplink", "--nproc", "3", "--overwrite", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("--overwrite")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launch_advice_overwrite_and_torchrun_dying_with_its_launcher(tmp_path):
    long = {**CONFIG, "steps": 200000, "checkpoint_every": 50, "metrics": {"every": 50}}
    cfg = _cfg(tmp_path, long)
    out = tmp_path / "out"
    # 1. SIGTERM to launch: every rank stops after the same step; the advice is a command that works
    p = subprocess.Popen(_launch_cmd(cfg, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(tmp_path.glob(".out.partial-*/metrics.csv")), "rank 0 to start", timeout=180.0, poll=0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    assert f"continue with: gradsparse launch --resume {out}" in err and "same command" not in err
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    # 2. the same command is refused, naming both ways on
    same = subprocess.run(_launch_cmd(cfg, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and "--resume" in same.stderr and "--overwrite" in same.stderr
    # 3. --overwrite starts afresh (not from the interrupted run's restart checkpoints); SIGKILL
    #    of the launcher stops torchrun and its ranks
    assert list(restart_dir(out).glob("rank0-step*.pt"))
    log = open(tmp_path / "overwrite.log", "w")
    p = subprocess.Popen(_launch_cmd(cfg, out, "--overwrite"), env=ENV, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: [d for d in tmp_path.glob(".out.partial-*/metrics.csv")], "the new rank 0 to start", timeout=180.0, poll=0.1)
    children = _processes_mentioning(str(cfg), exclude=p.pid)
    assert len(children) >= 3  # torchrun and two ranks
    p.kill()
    p.wait()
    wait_for(lambda: not _processes_mentioning(str(cfg), exclude=p.pid), "torchrun and the ranks to stop", timeout=180.0, poll=0.1)
    log.close()
    assert "resuming from the restart checkpoint" not in (tmp_path / "overwrite.log").read_text()
    # they stopped as on kill -TERM: a checkpoint and status interrupted, no leftovers
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert not list(tmp_path.glob(".out.partial-*"))
