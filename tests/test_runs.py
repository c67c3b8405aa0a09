"""Runs that never lie: divergence policy, validation before writing, whole-or-absent run
directories, checkpoint/resume (bitwise), signals, strict JSON."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradsparse.algorithm import Algorithm
from gradsparse.cli import main
from gradsparse.compressors import HardThreshold, TopK
from gradsparse.config import ConfigError, load_config
from gradsparse.divergence import find_nonfinite, first_nonfinite
from gradsparse.experiments import build, loop, memory_estimate, runner
from gradsparse.experiments.errors import RunInterrupted
from gradsparse.segments import Layout

from conftest import patched, write_config

TOY = {
    "name": "t",
    "task": {"name": "toy_quadratic", "options": {"dtype": "float64"}},
    "workers": {"count": 3, "batch_size": "full"},
    "algorithm": {"compressor": {"kind": "topk", "k": 1}, "feedback": "ef", "topology": {"kind": "ps_uplink"}},
    "schedule": {"lr": 0.01},
    "steps": 30,
    "metrics": {"every": 5},
    "plots": False,
    "progress": False,
}

LINREG = {
    "name": "lin",
    "seed": 3,
    "task": {"name": "linreg", "options": {"n_samples": 120, "n_features": 20}},
    "workers": {"count": 4, "batch_size": 3},
    "algorithm": {"compressor": {"kind": "topk", "k": 2}, "feedback": "ef"},
    "schedule": {"lr": 0.05},
    "steps": 40,
    "metrics": {"every": 3, "names": ["step", "epoch", "loss", "mean_memory_norm", "total_error", "density",
                                      "avg_density", "uplink_bytes", "rho_hat_max", "compression_ratio_up_max"],
                "residual_ratio": {"steps": [7, 33], "points": 5}},
    "plots": False,
    "progress": False,
}


# ---- detection -----------------------------------------------------------------------------
def test_first_nonfinite_names_worker_segment_and_entry():
    layout = Layout.of({"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)})
    x = torch.zeros(3, layout.d)
    assert first_nonfinite("memory", x, 5, layout) is None
    x[2, 6 + 1] = float("nan")  # worker 2, segment b.bias entry 1
    x[2, 8] = float("inf")
    found = first_nonfinite("memory", x, 5, layout)
    assert (found.what, found.worker, found.segment, found.index, found.step) == ("memory", 2, "b.bias", 1, 5)
    assert "worker 2" in found.describe() and "'b.bias'" in found.describe() and "step 5" in found.describe()
    # huge finite values whose sum overflows are not reported
    big = torch.full((2, layout.d), 3e38)
    assert first_nonfinite("memory", big, 1, layout) is None


def _poisoned_task(monkeypatch, worker_row_value=float("nan")):
    """linreg with one training row set to NaN: the worker that draws it gets a NaN gradient."""
    real = build.build_task

    def poisoned(cfg):
        task = real(cfg)
        task.train_x[0] = worker_row_value
        return task

    monkeypatch.setattr(build, "build_task", poisoned)


def test_hard_threshold_nan_memory_stops_the_run_naming_memory(tmp_path, monkeypatch, capsys):
    # NaN never passes |x| >= lambda: the model stays finite, the memory does not
    _poisoned_task(monkeypatch)
    raw = patched(LINREG, **{"algorithm.compressor": {"kind": "hard_threshold", "threshold": 0.05},
                            "workers.batch_size": "full", "checkpoint_every": 1000})
    raw["metrics"]["residual_ratio"] = {"steps": []}
    out = tmp_path / "r"
    rc = main(["run", str(write_config(tmp_path, raw)), "--out", str(out)])
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite memory" in err[0] and "worker" in err[0] and "step 1" in err[0]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "diverged" and s["diverged_at_step"] == 1 and s["nonfinite"]["what"] == "memory"
    assert s["nonfinite"]["segment"] is not None
    assert not (out / "checkpoint.pt").exists()  # no finite checkpoint was ever written
    assert not list(tmp_path.glob(".r.partial*"))


@pytest.mark.parametrize("compressor", [{"kind": "hard_threshold", "threshold": 0.05}, {"kind": "topk", "k": 2},
                                        {"kind": "randomk", "k": 2}, {"kind": "identity"}])
def test_skip_drops_the_poisoned_worker_and_keeps_memories_finite(tmp_path, monkeypatch, compressor):
    _poisoned_task(monkeypatch)
    raw = patched(LINREG, **{"algorithm.compressor": compressor, "workers.batch_size": "full",
                            "on_nonfinite": "skip", "steps": 6, "metrics.every": 1})
    # the loss over the training set includes the NaN row: record what the workers' state tells
    raw["metrics"]["names"] = ["step", "mean_memory_norm", "uplink_bytes", "skipped_messages"]
    raw["metrics"]["residual_ratio"] = {"steps": []}
    cfg = load_config(raw)
    out = runner.run(cfg, tmp_path / "r")
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed"
    # one worker owns row 0 and is skipped at every one of the 6 steps
    assert s["skipped_messages"] == 6
    lines = (out / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("skipped_messages")
    assert [int(line.split(",")[col]) for line in lines[1:]] == [0, 1, 2, 3, 4, 5, 6]
    sd = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.isfinite(sd["w"]).all()
    for seg in (sd["algorithm"]["worker"]["memory"] or {}).values():
        assert torch.isfinite(seg).all()


def test_skip_in_the_algorithm_restores_memory_and_empties_the_row():
    layout = Layout.flat(6)
    alg = Algorithm(compressor=TopK(k=2), feedback="ef", on_nonfinite="skip")
    state = alg.init_worker_state(layout, 3)
    state.memory.flat[:] = torch.arange(18.0).view(3, 6) / 100
    before = state.memory.flat.clone()
    g = torch.ones(3, 6)
    g[1, 4] = float("inf")
    out = alg.worker_step(g, None, state, step=0, lr=0.1)
    assert out.message.counts.tolist() == [2, 0, 2]
    assert torch.equal(out.state.memory.flat[1], before[1])
    assert torch.isfinite(out.state.memory.flat).all()
    assert alg.skipped_messages == 1
    # the in-place entry (grads given) does the same
    alg2 = Algorithm(compressor=TopK(k=2), feedback="ef", on_nonfinite="skip")
    state2 = alg2.init_worker_state(layout, 3)
    state2.memory.flat.copy_(before)
    out2 = alg2.worker_step_in_place(g, state2, step=0, lr=0.1)
    assert out2.message.counts.tolist() == [2, 0, 2]
    assert torch.equal(state2.memory.flat, out.state.memory.flat)
    assert not alg2.supports_in_place  # engines take the out-of-place step under skip


def test_stop_policy_leaves_algorithm_untouched_and_find_nonfinite_sees_memory():
    from gradsparse.engines import SyncSimulator
    from gradsparse.schedules import Schedule
    from gradsparse.tasks import make_task

    task = make_task("toy_quadratic", dtype="float64")
    sim = SyncSimulator(task, Algorithm(compressor=HardThreshold(threshold=0.5), feedback="ef"), Schedule(lr=0.01),
                        n_workers=3, batch_size="full")
    rec = sim.step()
    assert find_nonfinite(sim, rec) is None
    sim.worker_state.memory.flat[1, 7] = float("nan")
    found = find_nonfinite(sim, rec)
    assert (found.what, found.worker, found.index) == ("memory", 1, 7)


@pytest.mark.parametrize("make", [lambda layout: TopK(k=3), lambda layout: TopK(density=0.2, scope="layerwise", layout=layout),
                                  lambda layout: __import__("gradsparse.compressors", fromlist=["Identity"]).Identity()])
@pytest.mark.parametrize("feedback", ["ef", "memory", "ef-scaled", "none"])
def test_message_check_finds_exactly_what_the_full_scan_finds(make, feedback):
    """With exact top-k / identity the memories are not scanned: a finite message proves them
    finite. Random NaN / +-inf in the gradients of random workers, 30 steps: the fast check and
    the full scan agree at every step (both None, or the same report)."""
    from gradsparse.engines import SyncSimulator
    from gradsparse.schedules import Schedule
    from gradsparse.tasks import make_task

    task = make_task("logreg", dataset="madelon_like", n_samples=120, n_features=30, seed=0)
    gen = torch.Generator().manual_seed(3)
    probe = SyncSimulator(task, Algorithm(compressor=TopK(k=1), feedback="ef"), Schedule(lr=0.1), n_workers=4, batch_size=8)
    comp = make(probe.layout)
    assert comp.reveals_nonfinite(probe.d)
    found_any = 0
    for trial in range(6):
        sim = SyncSimulator(task, Algorithm(compressor=comp, feedback=feedback), Schedule(lr=0.1), n_workers=4, batch_size=8,
                            seed=trial)
        poison_at = int(torch.randint(1, 30, (1,), generator=gen))
        for t in range(30):
            if t == poison_at:  # a training row turns non-finite: whoever draws it gets a bad gradient
                row = int(torch.randint(0, task.n_train, (1,), generator=gen))
                col = int(torch.randint(0, task.train_x.shape[1], (1,), generator=gen))
                task.train_x[row, col] = [float("nan"), float("inf"), -float("inf")][trial % 3]
            rec = sim.step()
            fast, full = find_nonfinite(sim, rec), find_nonfinite(sim, rec, full=True)
            assert (fast is None) == (full is None), (trial, t, fast, full)
            if full is not None:
                assert fast.describe() == full.describe()
                found_any += 1
                break
        task.train_x.nan_to_num_(0.0, 0.0, 0.0)
    assert found_any >= 1


def test_message_check_relies_on_finite_memories_before_the_step():
    """The contract of the fast path: memories poisoned from outside a step (not through a
    gradient) are seen by the full scan only, which is why the runner scans fully on a run's
    first step (after a resume too); hard-threshold and k = 0 never take the fast path."""
    from gradsparse.engines import SyncSimulator
    from gradsparse.schedules import Schedule
    from gradsparse.tasks import make_task

    task = make_task("toy_quadratic", dtype="float64")
    sim = SyncSimulator(task, Algorithm(compressor=TopK(k=1), feedback="ef"), Schedule(lr=0.01), n_workers=3, batch_size="full")
    rec = sim.step()
    sim.worker_state.memory.flat[2, 5] = float("nan")
    assert find_nonfinite(sim, rec) is None
    assert find_nonfinite(sim, rec, full=True).what == "memory"
    for comp in (HardThreshold(threshold=0.5), TopK(k=0)):  # the message proves nothing: memories scanned
        sim = SyncSimulator(task, Algorithm(compressor=comp, feedback="ef"), Schedule(lr=0.01), n_workers=3,
                            batch_size="full")
        rec = sim.step()
        sim.worker_state.memory.flat[2, 5] = float("nan")
        assert (find_nonfinite(sim, rec).what, find_nonfinite(sim, rec).worker) == ("memory", 2)


# ---- resume ----------------------------------------------------------------------------------
def _files(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.suffix in (".csv",)}


def test_a_signal_caught_before_the_run_started_ends_it_at_its_first_check(tmp_path):
    # a torchrun rank catches SIGTERM from its start (distributed/worker.py); one that arrives
    # while it sets up (before the run's own catcher) must still end the run as "interrupted"
    raw = patched(LINREG, checkpoint_every=10)
    with loop.StopSignals() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer.signum == signal.SIGTERM
        with pytest.raises(RunInterrupted) as info:
            runner.run(load_config(raw), tmp_path / "r")
    assert info.value.exit_code == 143
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"] == 0 and (tmp_path / "r" / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("compressor", [{"kind": "topk", "k": 2}, {"kind": "hard_threshold", "threshold": 0.02}])
def test_resume_is_bitwise_equal_to_the_uninterrupted_run(tmp_path, compressor, monkeypatch):
    raw = patched(LINREG, **{"algorithm.compressor": compressor, "checkpoint_every": 10})
    full = runner.run(load_config(raw), tmp_path / "full")
    # a run that stops after step 20 (as an interruption would), then resumes
    calls = {"n": 0}
    real_step = loop.find_nonfinite

    def interrupt_after(engine, rec, done, **kw):
        calls["n"] += 1
        if done == 17:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(engine, rec, done, **kw)

    monkeypatch.setattr(loop, "find_nonfinite", interrupt_after)
    with pytest.raises(RunInterrupted) as info:
        runner.run(load_config(raw), tmp_path / "part")
    assert info.value.exit_code == 130
    part = tmp_path / "part"
    s = json.loads((part / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"] == 17
    monkeypatch.setattr(loop, "find_nonfinite", real_step)
    run_id = s["run_id"]
    runner.resume(part)
    assert _files(part) == _files(full)
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["w"], b["w"])
    for k in a["algorithm"]["worker"]["memory"]:
        assert torch.equal(a["algorithm"]["worker"]["memory"][k], b["algorithm"]["worker"]["memory"][k])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    for s_ in (sa, sb):
        s_.pop("wall_seconds")
    # a resumed run keeps the run id it started with; two runs have two ids
    assert sb.pop("run_id") == run_id != sa.pop("run_id")
    assert sa == sb and sb["status"] == "completed"
    with pytest.raises(ConfigError, match="already completed"):
        runner.resume(part)


@pytest.mark.multiprocess
def test_sigterm_subprocess_writes_checkpoint_then_resume_matches(tmp_path):
    raw = patched(LINREG, steps=4000, **{"metrics.every": 50})
    raw["metrics"]["residual_ratio"] = {"steps": []}
    cfg = write_config(tmp_path, raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "gradsparse.cli", "run", str(cfg), "--out", str(out)],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".r.partial-*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--resume" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and 0 < s["steps"] < 4000
    assert main(["run", "--resume", str(out)]) == 0
    ref = runner.run(load_config(raw), tmp_path / "ref")
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()


# ---- run directories ---------------------------------------------------------------------------
def test_existing_run_dir_is_an_error_unless_overwrite(tmp_path, capsys):
    cfg = write_config(tmp_path, TOY)
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    first = (out / "metrics.csv").read_bytes()
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "existing run directory" in capsys.readouterr().err
    assert not (tmp_path / "r-1").exists()
    assert main(["run", str(cfg), "--out", str(out), "--overwrite", "--set", "steps=10"]) == 0
    assert (out / "metrics.csv").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "r"]


def test_a_crash_mid_run_leaves_no_directory(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop, "write_outputs", boom)
    with pytest.raises(RuntimeError):
        runner.run(load_config(TOY), tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_summary_is_strict_json(tmp_path):
    raw = patched(TOY, **{"metrics.names": ["step", "loss", "suboptimality", "rho_hat_max"]})
    out = runner.run(load_config(raw), tmp_path / "r")
    text = (out / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in summary.json"))


# ---- validation before anything is written ---------------------------------------------------
BAD_SETS = [
    (["--set", "steps=[1"], "not valid YAML"),
    (["--set", "steps={a: 1"], "not valid YAML"),
    (["--set", "epochs=.inf", "--set", "steps=null"], "epochs"),
    (["--set", "epochs=.nan", "--set", "steps=null"], "epochs"),
    (["--set", "seed=1180591620717411303424"], "seed"),
    (["--set", "seed=-1"], "seed"),
    (["--set", "seed=2**70"], "seed"),
    (["--set", "steps=1e400"], "steps"),
    (["--set", "steps=99999999999999999999999"], "steps"),
    (["--set", "schedule.lr=.nan"], "schedule.lr"),
    (["--set", "schedule.lr=.inf"], "schedule.lr"),
    (["--set", "schedule.lr=-.inf"], "schedule.lr"),
    (["--set", "schedule.warmup_epochs=.inf"], "schedule.warmup_epochs"),
    (["--set", "schedule.milestones=[.nan]", "--set", "schedule.kind=step_decay"], "schedule.milestones"),
    (["--set", "schedule.milestones=[-1]", "--set", "schedule.kind=step_decay"], "schedule.milestones"),
    (["--set", "schedule.power=.inf"], "schedule.power"),
    (["--set", "workers.weights=[.nan, 0.5, 0.5]"], "workers.weights"),
    (["--set", "workers.weights=[.inf, 0, 0]"], "workers.weights"),
    (["--set", "workers.weights=[0, 0, 0]"], "all zero"),
    (["--set", "workers.weights=[0.5, 0.5, 0.5]"], "not normalised"),
    (["--set", "workers.weights=[-0.5, 1.0, 0.5]"], ">= 0"),
    (["--set", "workers.weights=[0.5, 0.5]"], "entries"),
    (["--set", "workers.batch_size=100000000"], "workers.batch_size"),
    (["--set", "workers.batch_size=900000", "--set", "memory_limit_gb=1"], "estimated"),
    (["--set", "workers.batch_size=1e8"], "workers.batch_size"),
    (["--set", "workers.batch_size=-1"], "batch_size"),
    (["--set", "workers.count=1000000000"], "workers.count"),
    (["--set", "metrics.residual_ratio.ks=[-5, 3]", "--set", "metrics.residual_ratio.steps=[2]"], "ks"),
    (["--set", "metrics.residual_ratio.ks=[0]"], "ks"),
    (["--set", "metrics.residual_ratio.steps=[0]"], "steps"),
    (["--set", "metrics.residual_ratio.steps=[999]"], "residual_ratio.steps"),
    (["--set", "metrics.every=0"], "metrics.every"),
    (["--set", "name=../../x"], "name"),
    (["--set", "name="], "name"),
    (["--set", "name=''"], "name"),
    (["--set", "name=a/b"], "name"),
    (["--set", "name=.hidden"], "name"),
    (["--set", "algorithm.compressor={kind: topk, density: .nan}"], "density"),
    (["--set", "algorithm.compressor={kind: hard_threshold, threshold: .inf}"], "threshold"),
    (["--set", "algorithm.weight_decay=.inf"], "weight_decay"),
    (["--set", "algorithm.momentum={kind: gradient, beta: .nan}"], "beta"),
    (["--set", "on_nonfinite=ignore"], "on_nonfinite"),
    (["--set", "checkpoint_every=0"], "checkpoint_every"),
    (["--set", "memory_limit_gb=-1"], "memory_limit_gb"),
    (["--set", "memory_limit_gb=0.000001"], "estimated"),
    (["--set", "task.options={w0: .nan}"], "task.options.w0"),
    (["--set", "noequals"], "dotted.key=value"),
    (["--set", "=3"], "dotted key"),
    (["--set", "steps.x=3"], "holds a value"),
]


def _assert_one_line_error(capsys, rc, needle, tmp_path, keep=("c.yaml",)):
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert len(err) == 1 and err[0].startswith("gradsparse: error: "), captured.err
    assert "Traceback" not in captured.err
    assert needle in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize("args, needle", BAD_SETS, ids=[" ".join(a) for a, _ in BAD_SETS])
def test_bad_overrides_one_line_exit_2_no_directory(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, TOY)
    rc = main(["run", str(cfg), *args])
    _assert_one_line_error(capsys, rc, needle, tmp_path)


BAD_FILES = [
    (b"steps: [1, 2\n", "line 2, column 1"),
    (b"a: 1\n  b: 2\n", "line 2"),
    (b"\xff\xfe\x00s\x00t", "not UTF-8"),
    (b"steps: 3\x00\x01\x02", "binary"),
    (b"- 1\n- 2\n", "mapping"),
    (b"just a string", "mapping"),
    (b"steps: 10\nsteps: 20\n", "key 'steps' is given twice at line 2, column 1"),  # PyYAML alone keeps the last
    (b"epochs: .inf\n", "epochs"),
    (b"seed: 2**70\n", "seed"),
    (b"name: ../../x\nsteps: 3\n", "name"),
    (b"name: ''\nsteps: 3\n", "name"),
    (b"steps: !!python/object:os.system ls\n", "not valid YAML"),
]


@pytest.mark.parametrize("data, needle", BAD_FILES)
def test_bad_config_files_one_line_exit_2_no_directory(tmp_path, capsys, monkeypatch, data, needle):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    rc = main(["run", str(p)])
    _assert_one_line_error(capsys, rc, needle, tmp_path)


def test_out_paths_are_checked_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, TOY)
    (tmp_path / "afile").write_text("x")
    keep = ("c.yaml", "afile")
    for out, needle in [(tmp_path / "afile" / "r", "is a file"), (tmp_path / "afile", "not a directory"),
                        (Path("/proc/gs_run"), "/proc"), (Path("/sys/x/y"), "/sys")]:
        rc = main(["run", str(cfg), "--out", str(out)])
        _assert_one_line_error(capsys, rc, needle, tmp_path, keep)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("mine")
    rc = main(["run", str(cfg), "--out", str(tmp_path / "other")])
    _assert_one_line_error(capsys, rc, "not a run directory", tmp_path, keep + ("other",))
    # --overwrite replaces run directories only: never a directory that holds something else
    rc = main(["run", str(cfg), "--out", str(tmp_path / "other"), "--overwrite"])
    _assert_one_line_error(capsys, rc, "not a run directory", tmp_path, keep + ("other",))
    assert (tmp_path / "other" / "data.txt").read_text() == "mine"
    for out in ("/", "", str(tmp_path) + "/.."):
        rc = main(["run", str(cfg), "--out", out, "--overwrite"])
        assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    rc = main(["run", "--resume", str(tmp_path / "nope")])
    _assert_one_line_error(capsys, rc, "--resume", tmp_path, keep + ("other",))
    rc = main(["run", str(tmp_path / "missing.yaml")])
    _assert_one_line_error(capsys, rc, "does not exist", tmp_path, keep + ("other",))


def test_demo_with_a_bad_override_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--set", "schedule.lr=.nan"])
    captured = capsys.readouterr()
    assert rc == 2 and len(captured.err.strip().splitlines()) == 1 and "schedule.lr" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_refuses_and_can_be_overridden(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = patched(TOY, memory_limit_gb=1e-9)
    rc = main(["run", str(write_config(tmp_path, raw))])
    captured = capsys.readouterr()
    assert rc == 2 and "estimated" in captured.err and "limit" in captured.err
    assert not (tmp_path / "runs").exists()
    assert main(["run", str(tmp_path / "c.yaml"), "--no-memory-check", "--out", str(tmp_path / "r")]) == 0
    need, how = memory_estimate.estimate_memory(load_config(TOY), *_task_layout_alg(TOY))
    # 3 workers x d = 100 x 8 bytes x (grads, accumulated, memory) + data
    assert need >= 3 * 100 * 8 * 3 and "3 workers x d = 100" in how


def _task_layout_alg(raw):
    cfg = load_config(raw)
    task = build.build_task(cfg)
    layout = Layout.of(task.init_params(torch.Generator().manual_seed(0)))
    return task, layout, build.build_algorithm(cfg, layout, 0.01)


@pytest.mark.parametrize("engine", ["loop", "async"])
def test_resume_and_skip_on_the_other_in_process_engines(tmp_path, monkeypatch, engine):
    raw = patched(LINREG, engine=engine, checkpoint_every=7, **{"algorithm.topology": {"kind": "ps_uplink"}})
    raw["metrics"]["residual_ratio"] = {"steps": []}
    full = runner.run(load_config(raw), tmp_path / "full")
    real = loop.find_nonfinite

    def interrupt_after(engine_, rec, done, **kw):
        if done == 17:
            os.kill(os.getpid(), signal.SIGINT)
        return real(engine_, rec, done, **kw)

    monkeypatch.setattr(loop, "find_nonfinite", interrupt_after)
    with pytest.raises(RunInterrupted):
        runner.run(load_config(raw), tmp_path / "part")
    monkeypatch.setattr(loop, "find_nonfinite", real)
    runner.resume(tmp_path / "part")
    assert (tmp_path / "part" / "metrics.csv").read_bytes() == (full / "metrics.csv").read_bytes()
    # the skip policy lives in the algorithm's worker step: the same on this engine
    _poisoned_task(monkeypatch)
    raw = patched(raw, on_nonfinite="skip", steps=5, checkpoint_every=None,
                 **{"algorithm.compressor": {"kind": "hard_threshold", "threshold": 0.05}, "workers.batch_size": "full"})
    raw["metrics"]["names"] = ["step", "mean_memory_norm", "skipped_messages"]
    out = runner.run(load_config(raw), tmp_path / "skip")
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["skipped_messages"] >= 1
    sd = torch.load(out / "checkpoint.pt", weights_only=True)
    for seg in sd["algorithm"]["worker"]["memory"].values():
        assert torch.isfinite(seg).all()


@pytest.mark.parametrize("shift", ["none", "optimum"])
def test_full_batches_of_unequal_shards_are_vectorized_and_exact(shift):
    """batch_size full with unequal shards: one gradient call per shard size, each row equal to
    that worker's own full-batch gradient (computed one worker at a time here)."""
    from gradsparse.engines import SyncSimulator
    from gradsparse.schedules import Schedule
    from gradsparse.tasks import make_task

    task = make_task("linreg", n_samples=103, n_features=12, seed=4)
    sim = SyncSimulator(task, Algorithm(compressor=TopK(k=3), feedback="ef"), Schedule(lr=0.05), n_workers=10,
                        batch_size="full", gradient_shift=shift)
    assert sim.data.ragged and len(set(sim.data.lens.tolist())) == 2
    w = torch.randn(12, generator=torch.Generator().manual_seed(0))
    g = sim.worker_gradients(w)
    grad = torch.func.grad(sim._loss_flat)
    for q, rows in enumerate(sim.data.rows):
        ref = grad(w, task.train_x[rows], task.train_y[rows])
        if shift == "optimum":
            ref = ref - grad(sim.x_star, task.train_x[rows], task.train_y[rows])
        torch.testing.assert_close(g[q], ref, rtol=1e-5, atol=1e-6)
    assert sim.samples_seen == 103
